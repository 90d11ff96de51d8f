/* offlog.c: the C client of offlog (c/offlog.h), built from docs/protocol.md.
 *
 * Theory of operation
 * -------------------
 * One offlog_t is one connection to the server, for one file (protocol 2). It speaks
 * the framed dialect, version 3 (protocol 5), and owns its socket, its ring and
 * two byte queues: ``out`` (frames not yet sent) and ``in`` (bytes not yet parsed).
 *
 *   open     connect; ask the kernel who runs the server (SO_PEERCRED): our
 *            effective uid or root, else EACCES before a byte is sent (2);
 *            send "\0OFFLOG\0" + OPEN(3, WANT_SHM?, FSYNC?, path); read "OFFLOG\0",
 *            then ERROR (the file's errno) or OPENED; after OPENED(SHM_OFFERED)
 *            + SHM_OFFER, check the memfd's seals and size, map it, check the
 *            header, answer SHM_ACCEPT, or SHM_DECLINE and use the socket (7.2).
 *   write    ring: the core of offlog/_ring_core.h (copy, release store of
 *            HEAD, acquire load of STATE; sem_post only when SLEEPING; 7.5, 7.9).
 *            socket: one DATA frame per write (5.5).
 *   sync     FLUSH(t), wait for FLUSHED(t) (5.5).
 *   close    shutdown(SHUT_WR), wait for BYE (5.7).
 *
 * Where a write's bytes wait. Over a ring, nowhere but in the ring: a write that
 * does not fit whole fails with EAGAIN and takes nothing. The ring already is a
 * bounded buffer, of the size the server chose; a backlog in front of it would be
 * a second copy that only this process can move (at a later call of its own), and
 * what sat in it would die with the process, while bytes in the ring reach the
 * file even if the client is killed the next instant. So the caller learns of
 * backpressure at once and chooses: retry, drop, or offlog_sync(). Over the
 * socket a frame must go out whole, so the rest of one the socket took in part,
 * and the frames after it, wait in ``out`` (at most OFFLOG_BACKLOG_MAX, then
 * EAGAIN), which every call sends on; FLUSH frames queue there too.
 *
 * Reading. The client reads its socket only when it has a reason: in offlog_sync
 * and offlog_close (poll() on the socket, so ERROR, BYE or the server's end stop
 * the wait at once), and when a write cannot go on (a full ring, a failed send,
 * STATE = FAILED). Frames are checked against ``accepts``, what each state may
 * receive (the client's table of 5.7), then handled by on_frame().
 *
 * Errors. The first one is kept (``error``, and the server's words in
 * ``error_text``); the connection is finished and every later call returns it.
 * ERROR frames map to errno as 6.3 says; STATE = FAILED gives ERRNO (7.8); the
 * server's end without a word is EPIPE. There is no reconnect: ESHUTDOWN means
 * "open again once a server is back".
 *
 * Threads: one mutex per offlog_t serialises every call (a ring has one
 * producer, 7.5). Nothing here is async-signal-safe. After fork() only the
 * process that opened a connection may use it (the child opens its own).
 */
#define _GNU_SOURCE
#include "offlog.h"

#include "../offlog/_ring_core.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* docs/protocol.md 1, 5.4, 5.6. */
static const unsigned char CLIENT_PREAMBLE[8] = {0, 'O', 'F', 'F', 'L', 'O', 'G', 0};
static const unsigned char SERVER_PREAMBLE[7] = {'O', 'F', 'F', 'L', 'O', 'G', 0};
enum { PROTOCOL = 3, OLDEST_PROTOCOL = 2, FRAME_HEADER = 5, PATH_MAX_BYTES = 4096 };
enum { WANT_SHM = 1, FSYNC = 2, NO_SHM_SUPPORT = 4, SHM_OFFERED = 1 };
#define MAX_PAYLOAD ((size_t)64 << 20)
#define MIN_CAPACITY ((uint64_t)1 << 16)
#define MAX_CAPACITY ((uint64_t)1 << 30)
#define MAX_INBOUND ((size_t)64 << 10) /* a server frame for a client is a note, an error text or a number */
#define READ_SIZE ((size_t)64 << 10)
#define LOOK_EVERY ((uint64_t)64 << 10) /* a socket writer reads what came every so many bytes */
#define MAX_FDS 4

/* A ring's doorbell is glibc's sem_t (7.7): a client elsewhere asks for none. */
#if defined(__linux__) && defined(__GLIBC__)
#define RINGS_HERE 1
#else
#define RINGS_HERE 0
#endif

enum state { GREETING, OPENING, OFFERED, SOCKET, RING, CLOSING, CLOSED };

/* The server frames each state accepts (the client's table of 5.7); any other is a protocol
 * error. K OPENED, S SHM_OFFER, f FLUSHED, W WRITTEN, E ERROR, B BYE. */
static const char *const accepts[] = {
    [GREETING] = "", /* no frame yet: "OFFLOG\0" (handle_input) */
    [OPENING] = "KE",
    [OFFERED] = "SE",
    [SOCKET] = "fWE",
    [RING] = "fE",
    [CLOSING] = "fWBE",
    [CLOSED] = "",
};

struct buf {
    unsigned char *bytes;
    size_t start, end, size; /* [start, end) holds the bytes */
};

struct offlog {
    pthread_mutex_t lock;
    /* The ring's hot path; ``ring`` is NULL for a socket session and once the connection failed. */
    struct offlog_ring_header *ring;
    unsigned char *data;
    uint64_t capacity, head, limit, tail; /* own HEAD; bound of the hot path; last TAIL read */
    struct offlog_ring_header *map;       /* the mapping, kept until close */
    size_t map_size;
    int fd;
    enum state state;
    uint16_t version; /* the server's, from OPENED */
    const char *transport;
    int error;
    char *error_text;
    struct buf out, in;
    uint64_t flushes_sent, flushes_done;           /* FLUSH tokens 1, 2, ... */
    uint64_t payload, payload_at_flush, confirmed; /* socket: DATA bytes taken; confirmed written */
    uint64_t payload_at_look;                      /* ... when the writer last read its socket */
    int fds[MAX_FDS], nfds;                        /* descriptors received during the handshake */
    int fds_dropped;                               /* ... and the kernel dropped some (MSG_CTRUNC) */
};

/* -- little helpers ------------------------------------------------------------------------- */
static uint64_t le(const unsigned char *p, int bytes)
{
    uint64_t v = 0;
    while (bytes--)
        v = v << 8 | p[bytes];
    return v;
}

static void put_le(unsigned char *p, uint64_t v, int bytes)
{
    for (int i = 0; i < bytes; i++, v >>= 8)
        p[i] = (unsigned char)v;
}

static size_t pending(const struct buf *b)
{
    return b->end - b->start;
}

/* Room for ``n`` more bytes at the end; 0, or -1 (ENOMEM). */
static int reserve(struct buf *b, size_t n)
{
    if (b->start == b->end)
        b->start = b->end = 0;
    if (b->end + n <= b->size)
        return 0;
    if (b->start > 0) {
        memmove(b->bytes, b->bytes + b->start, pending(b));
        b->end -= b->start;
        b->start = 0;
    }
    if (b->end + n <= b->size)
        return 0;
    size_t size = b->size ? b->size : 4096;
    while (size < b->end + n)
        size *= 2;
    unsigned char *bytes = realloc(b->bytes, size);
    if (bytes == NULL)
        return -1;
    b->bytes = bytes;
    b->size = size;
    return 0;
}

/* Append to ``b``, which has room (reserve()). */
static void append(struct buf *b, const void *bytes, size_t n)
{
    memcpy(b->bytes + b->end, bytes, n);
    b->end += n;
}

static void append_header(struct buf *b, char type, size_t length)
{
    unsigned char header[FRAME_HEADER] = {(unsigned char)type};
    put_le(header + 1, length, 4);
    append(b, header, FRAME_HEADER);
}

/* A deadline ``ms`` from now on the monotonic clock; negative ``ms``: none. */
struct deadline {
    int none;
    struct timespec at;
};

static struct deadline deadline_in(int ms)
{
    struct deadline d = {ms < 0, {0, 0}};
    clock_gettime(CLOCK_MONOTONIC, &d.at);
    if (ms > 0) {
        d.at.tv_sec += ms / 1000;
        d.at.tv_nsec += (long)(ms % 1000) * 1000000;
        if (d.at.tv_nsec >= 1000000000) {
            d.at.tv_sec++;
            d.at.tv_nsec -= 1000000000;
        }
    }
    return d;
}

/* Milliseconds left, rounded up (-1: no deadline). */
static int ms_left(const struct deadline *d)
{
    if (d->none)
        return -1;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long ns = (long long)(d->at.tv_sec - now.tv_sec) * 1000000000 + (d->at.tv_nsec - now.tv_nsec);
    if (ns <= 0)
        return 0;
    long long ms = (ns + 999999) / 1000000;
    return ms > INT32_MAX ? INT32_MAX : (int)ms;
}

/* -- errors --------------------------------------------------------------------------------- */
/* The connection failed with ``err`` (the server's ``text``, if any): keep the first error. */
static int fail_text(offlog_t *log, int err, const char *text, size_t text_len)
{
    if (log->error == 0) {
        log->error = err;
        if (text != NULL && (log->error_text = malloc(text_len + 1)) != NULL) {
            memcpy(log->error_text, text, text_len);
            log->error_text[text_len] = '\0';
        }
    }
    log->ring = NULL; /* publish nothing more, never post again */
    log->state = CLOSED;
    errno = log->error;
    return -1;
}

static int fail(offlog_t *log, int err, const char *text)
{
    return fail_text(log, err, text, text ? strlen(text) : 0);
}

static int failed(offlog_t *log)
{
    errno = log->error;
    return -1;
}

static int protocol_error(offlog_t *log, const char *what)
{
    return fail(log, EPROTO, what);
}

static int starts_with(const unsigned char *text, size_t len, const char *prefix)
{
    size_t n = strlen(prefix);
    return len >= n && memcmp(text, prefix, n) == 0;
}

/* The errno of an ERROR frame (6.3): its errno field, else by the text's class. */
static int error_errno(uint32_t field, const unsigned char *text, size_t len)
{
    static const char shutdown_text[] = "OSError: offlog server exited";
    if (field != 0 && field < 4096)
        return (int)field;
    if (len == sizeof shutdown_text - 1 && starts_with(text, len, shutdown_text))
        return ESHUTDOWN;
    if (starts_with(text, len, "ValueError: "))
        return EINVAL;
    if (starts_with(text, len, "TimeoutError: "))
        return ETIMEDOUT;
    return EIO;
}

/* An error text before "OFFLOG\0" (5.2): a 0.x server refusing the preamble as an empty path
 * (ValueError), or the legacy form of a current server's error while our dialect was not
 * known yet (3): its "[Errno N] " prefix, else its class (6.3). */
static int greeting_error(offlog_t *log, const unsigned char *text, size_t len)
{
    const unsigned char *colon = memchr(text, ':', len);
    if (starts_with(text, len, "ValueError: "))
        return fail(log, EPROTONOSUPPORT, "not an offlog 1.x server (offlog 0.x?)");
    int err = 0;
    if (colon != NULL && starts_with(colon, len - (size_t)(colon - text), ": [Errno "))
        for (size_t i = (size_t)(colon - text) + 9; i < len && text[i] >= '0' && text[i] <= '9' && err < 4096; i++)
            err = err * 10 + (text[i] - '0');
    return fail_text(log, err > 0 && err < 4096 ? err : error_errno(0, text, len), (const char *)text, len);
}

/* -- the ring ------------------------------------------------------------------------------- */
static void update_limit(offlog_t *log)
{
    uint64_t lap_end = (log->head | (log->capacity - 1)) + 1;
    uint64_t room_end = log->tail + log->capacity;
    log->limit = lap_end < room_end ? lap_end : room_end;
}

static void ring_doorbell(offlog_t *log)
{
    sem_post((sem_t *)(void *)log->ring->doorbell);
}

static int read_frames(offlog_t *log);

/* STATE = FAILED (7.8): the server's ERROR frame if it has come, else the ERRNO word. */
static int ring_failed(offlog_t *log)
{
    uint64_t err = atomic_load_explicit(&log->ring->err, memory_order_acquire);
    log->ring = NULL;
    if (read_frames(log) < 0)
        return -1;
    return fail(log, err > 0 && err < 4096 ? (int)err : EIO, NULL);
}

/* What the core's answer asks for after a publish; 0, or -1 once the connection failed. */
static int after_publish(offlog_t *log, enum offlog_put put)
{
    if (put == OFFLOG_PUT_POST)
        ring_doorbell(log);
    return put == OFFLOG_PUT_FAILED ? ring_failed(log) : 0;
}

/* Read TAIL (7.5 D1): the consumer's progress, checked. */
static int refresh_tail(offlog_t *log)
{
    uint64_t tail = atomic_load_explicit(&log->ring->tail, memory_order_acquire);
    if (tail < log->tail || tail > log->head) {
        shutdown(log->fd, SHUT_WR); /* the server drains what HEAD covers, as at any end */
        return fail(log, EBADMSG, "ring corrupted: TAIL outside what was published");
    }
    log->tail = tail;
    update_limit(log);
    return 0;
}

/* The slow path of a ring write: the hot path's bound said no. */
static ssize_t ring_write(offlog_t *log, const unsigned char *bytes, size_t n)
{
    if (refresh_tail(log) < 0)
        return -1;
    uint64_t free_bytes = log->capacity - (log->head - log->tail);
    size_t take = n <= free_bytes ? n : n > log->capacity ? (size_t)free_bytes : 0;
    if (take == 0) {
        /* Full. Is it draining? An ERROR, or the server's end, says why not. */
        if (read_frames(log) < 0)
            return -1;
        if (atomic_load_explicit(&log->ring->state, memory_order_acquire) == OFFLOG_SLEEPING)
            ring_doorbell(log);
        errno = EAGAIN;
        return -1;
    }
    uint64_t start = log->head & (log->capacity - 1);
    size_t first = take < log->capacity - start ? take : (size_t)(log->capacity - start);
    memcpy(log->data + start, bytes, first);
    memcpy(log->data, bytes + first, take - first); /* the part that wraps, if any */
    log->head += take;
    update_limit(log);
    if (after_publish(log, offlog_ring_publish(log->ring, log->head)) < 0)
        return -1;
    return (ssize_t)take;
}

/* Check the offered memory (7.2, steps 2 to 5) and map it; NULL, or why it is declined. */
static const char *map_ring(offlog_t *log, uint64_t capacity)
{
    const int seals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;
    if (log->version < 3)
        return "the server speaks protocol 2: its rings have names, not seals";
    if (log->nfds != 1 || log->fds_dropped)
        return "not exactly one descriptor came with the offer";
    if (capacity < MIN_CAPACITY || capacity > MAX_CAPACITY || (capacity & (capacity - 1)) != 0)
        return "the capacity is not a power of two in [65536, 2**30]";
    int have = fcntl(log->fds[0], F_GET_SEALS);
    if (have < 0)
        return "the memory is not sealable (F_GET_SEALS failed)";
    if ((have & seals) != seals)
        return "the memory is not sealed against shrinking, growing and new seals";
    struct stat st;
    size_t size = (size_t)(OFFLOG_DATA_OFFSET + capacity);
    if (fstat(log->fds[0], &st) < 0 || (uint64_t)st.st_size != OFFLOG_DATA_OFFSET + capacity)
        return "the memory is not 256 + capacity bytes";
    void *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, log->fds[0], 0);
    if (map == MAP_FAILED)
        return "mmap failed";
    struct offlog_ring_header *h = map;
    int identity = atomic_load_explicit(&h->magic, memory_order_acquire) == OFFLOG_MAGIC &&
                   atomic_load_explicit(&h->version, memory_order_relaxed) == OFFLOG_VERSION &&
                   atomic_load_explicit(&h->capacity, memory_order_relaxed) == capacity &&
                   atomic_load_explicit(&h->data_offset, memory_order_relaxed) == OFFLOG_DATA_OFFSET;
    uint64_t head = atomic_load_explicit(&h->head, memory_order_relaxed);
    uint64_t tail = atomic_load_explicit(&h->tail, memory_order_acquire);
    if (!identity || tail > head || head - tail > capacity) {
        munmap(map, size);
        return "the header is not a ring of layout version 2 and the offered capacity";
    }
    log->map = log->ring = h;
    log->map_size = size;
    log->data = (unsigned char *)map + OFFLOG_DATA_OFFSET;
    log->capacity = capacity;
    log->head = head;
    log->tail = tail;
    update_limit(log);
    return NULL;
}

static void close_received_fds(offlog_t *log)
{
    while (log->nfds > 0)
        close(log->fds[--log->nfds]);
}

/* SHM_OFFER: take the ring (SHM_ACCEPT) or say why not (SHM_DECLINE) and stay on the socket. */
static int answer_offer(offlog_t *log, uint64_t capacity)
{
    const char *why = map_ring(log, capacity);
    size_t len = why ? strlen(why) : 0; /* (memcpy from NULL is undefined, even of 0 bytes) */
    close_received_fds(log);
    if (reserve(&log->out, FRAME_HEADER + len) < 0)
        return fail(log, ENOMEM, NULL);
    append_header(&log->out, why ? 'N' : 'A', len);
    if (why)
        append(&log->out, why, len);
    log->state = why ? SOCKET : RING;
    return 0;
}

/* -- the socket ----------------------------------------------------------------------------- */
/* A send met EPIPE: the server closed (its last word, an ERROR, is waiting to be read; with
 * none it vanished: EPIPE, from on_eof), or, if the socket is still open, it only shut its
 * reading side, which a server does when it stops (6.6): its ERROR comes once it has
 * written what it received, but a write does not wait for it. */
static int connection_lost(offlog_t *log)
{
    if (read_frames(log) < 0)
        return -1;
    return log->state == CLOSED ? 0 : fail(log, ESHUTDOWN, NULL);
}

/* Send what ``out`` holds, as far as the socket takes it now. 0, or -1 once failed. */
static int pump(offlog_t *log)
{
    while (pending(&log->out) > 0 && log->error == 0) {
        ssize_t sent = send(log->fd, log->out.bytes + log->out.start, pending(&log->out), MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent >= 0)
            log->out.start += (size_t)sent;
        else if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        else if (errno == EPIPE || errno == ECONNRESET)
            return connection_lost(log);
        else if (errno != EINTR)
            return fail(log, errno, NULL);
    }
    return log->error ? failed(log) : 0;
}

/* A socket write: one DATA frame (one per 64 MiB), queued whole or not at all, then sent on.
 * Every 64 KiB it reads what came: WRITTEN frames must not fill the socket, or an ERROR
 * behind them could not get through (the server would hang up without it). */
static ssize_t socket_write(offlog_t *log, const unsigned char *bytes, size_t n)
{
    size_t frames = (n + MAX_PAYLOAD - 1) / MAX_PAYLOAD;
    size_t size = n + frames * FRAME_HEADER;
    if (log->payload - log->payload_at_look >= LOOK_EVERY) {
        log->payload_at_look = log->payload;
        if (read_frames(log) < 0)
            return -1;
    }
    if (pump(log) < 0)
        return -1;
    if (pending(&log->out) > 0 && pending(&log->out) + size > OFFLOG_BACKLOG_MAX) {
        errno = EAGAIN;
        return -1;
    }
    if (reserve(&log->out, size) < 0) {
        errno = ENOMEM; /* nothing taken; the connection goes on */
        return -1;
    }
    for (size_t done = 0; done < n; done += MAX_PAYLOAD) {
        size_t len = n - done < MAX_PAYLOAD ? n - done : MAX_PAYLOAD;
        append_header(&log->out, 'D', len);
        append(&log->out, bytes + done, len);
    }
    log->payload += n;
    return pump(log) < 0 ? -1 : (ssize_t)n;
}

/* Every byte taken is confirmed written (FLUSHED, WRITTEN or TAIL): an end without BYE lost nothing. */
static int all_confirmed(const offlog_t *log)
{
    if (log->map != NULL)
        return atomic_load_explicit(&log->map->tail, memory_order_acquire) == log->head;
    return pending(&log->out) == 0 && log->confirmed >= log->payload;
}

/* The server's end of file (ECONNRESET counts as one, 6.7). */
static int on_eof(offlog_t *log)
{
    switch (log->state) {
    case GREETING:
        if (pending(&log->in) > 0)
            return greeting_error(log, log->in.bytes + log->in.start, pending(&log->in));
        /* fall through */
    case OPENING:
    case OFFERED:
        return fail(log, ECONNRESET, "the server ended the handshake");
    case CLOSING:
        if (all_confirmed(log)) {
            log->state = CLOSED;
            return 0;
        }
        /* fall through */
    default:
        return fail(log, EPIPE, NULL);
    }
}

/* One whole frame from the server, allowed in this state. */
static int on_frame(offlog_t *log, char type, const unsigned char *p, size_t len)
{
    switch (type) {
    case 'K': /* OPENED: u16 version, u16 flags, note */
        if (len < 4)
            return protocol_error(log, "OPENED frame too short");
        log->version = (uint16_t)le(p, 2);
        if (log->version < OLDEST_PROTOCOL || log->version > PROTOCOL)
            return protocol_error(log, "the server answered with a protocol version this client does not speak");
        if (le(p + 2, 2) & SHM_OFFERED) {
            log->state = OFFERED;
        } else {
            close_received_fds(log);
            log->state = SOCKET;
        }
        return 0;
    case 'S': /* SHM_OFFER: u64 capacity, the memfd attached */
        if (len != 8)
            return protocol_error(log, "SHM_OFFER payload is not 8 bytes");
        return answer_offer(log, le(p, 8));
    case 'W': /* WRITTEN: u64 DATA bytes written so far */
        if (len != 8)
            return protocol_error(log, "WRITTEN payload is not 8 bytes");
        if (le(p, 8) > log->confirmed)
            log->confirmed = le(p, 8);
        return 0;
    case 'f': /* FLUSHED: u64 token; every DATA byte sent before that FLUSH is written */
        if (len != 8)
            return protocol_error(log, "FLUSHED payload is not 8 bytes");
        if (le(p, 8) == log->flushes_sent && log->payload_at_flush > log->confirmed)
            log->confirmed = log->payload_at_flush;
        if (le(p, 8) > log->flushes_done)
            log->flushes_done = le(p, 8);
        return 0;
    case 'E': /* ERROR: u32 errno, "<ExceptionClass>: <message>" */
        if (len < 4)
            return protocol_error(log, "ERROR frame too short");
        return fail_text(log, error_errno((uint32_t)le(p, 4), p + 4, len - 4), (const char *)p + 4, len - 4);
    case 'B': /* BYE */
        log->state = CLOSED;
        return 0;
    }
    return protocol_error(log, "unexpected frame");
}

/* Handle what ``in`` holds: the greeting, then every whole frame. */
static int handle_input(offlog_t *log)
{
    while (log->state != CLOSED) {
        const unsigned char *p = log->in.bytes + log->in.start;
        size_t have = pending(&log->in);
        if (log->state == GREETING) { /* 5.2: "OFFLOG\0", or an error text up to its NUL */
            size_t n = have < sizeof SERVER_PREAMBLE ? have : sizeof SERVER_PREAMBLE;
            if (memcmp(p, SERVER_PREAMBLE, n) != 0) {
                const unsigned char *nul = memchr(p, 0, have);
                if (nul != NULL)
                    return greeting_error(log, p, (size_t)(nul - p));
                return have > MAX_INBOUND ? protocol_error(log, "neither OFFLOG\\0 nor an error text") : 0;
            }
            if (n < sizeof SERVER_PREAMBLE)
                return 0;
            log->in.start += n;
            log->state = OPENING;
            continue;
        }
        if (have < FRAME_HEADER)
            return 0;
        char type = (char)p[0];
        size_t len = (size_t)le(p + 1, 4);
        if (type == 0 || strchr(accepts[log->state], type) == NULL)
            return protocol_error(log, "a server frame this state does not accept");
        if (len > MAX_INBOUND)
            return protocol_error(log, "a server frame larger than any the server sends");
        if (have < FRAME_HEADER + len)
            return 0;
        log->in.start += FRAME_HEADER + len;
        if (on_frame(log, type, p + FRAME_HEADER, len) < 0)
            return -1;
    }
    return 0;
}

/* Keep descriptors received during the handshake (the offer's memfd); close any other. */
static void take_fds(offlog_t *log, struct msghdr *msg)
{
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c != NULL; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            if (log->state <= OFFERED && log->nfds < MAX_FDS)
                log->fds[log->nfds++] = fd;
            else
                close(fd);
        }
    }
    if (msg->msg_flags & MSG_CTRUNC)
        log->fds_dropped = 1;
}

/* Read everything the socket holds now, without waiting, and handle it. 0, or -1 once failed. */
static int read_frames(offlog_t *log)
{
    while (log->state != CLOSED) {
        union {
            struct cmsghdr align;
            char bytes[CMSG_SPACE(MAX_FDS * sizeof(int))];
        } control;
        if (reserve(&log->in, READ_SIZE) < 0)
            return fail(log, ENOMEM, NULL);
        struct iovec iov = {log->in.bytes + log->in.end, READ_SIZE};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = &control, .msg_controllen = sizeof control};
        ssize_t got = recvmsg(log->fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (got > 0) {
            take_fds(log, &msg);
            log->in.end += (size_t)got;
            if (handle_input(log) < 0)
                return -1;
        } else if (got == 0 || errno == ECONNRESET) {
            return on_eof(log);
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return 0;
        } else if (errno != EINTR) {
            return fail(log, errno, NULL);
        }
    }
    return log->error ? failed(log) : 0;
}

/* Send and read until ``done`` holds; -1 once the connection failed, or ETIMEDOUT at ``deadline``. */
static int wait_until(offlog_t *log, int (*done)(const offlog_t *), const struct deadline *deadline)
{
    for (;;) {
        if (pump(log) < 0 || read_frames(log) < 0)
            return -1;
        if (done(log))
            return 0;
        if (log->state == CLOSED) /* closed while waiting for something else */
            return fail(log, EPIPE, NULL);
        struct pollfd p = {log->fd, (short)(POLLIN | (pending(&log->out) ? POLLOUT : 0)), 0};
        int ms = ms_left(deadline);
        if (ms == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        if (poll(&p, 1, ms) < 0 && errno != EINTR)
            return fail(log, errno, NULL);
    }
}

/* ... and SHM_ACCEPT or SHM_DECLINE sent: the ring's hot path never sends. */
static int handshaken(const offlog_t *log)
{
    return (log->state == SOCKET || log->state == RING) && pending(&log->out) == 0;
}

static int flushed(const offlog_t *log)
{
    return log->flushes_done >= log->flushes_sent;
}

static int all_sent(const offlog_t *log)
{
    return pending(&log->out) == 0;
}

static int closed(const offlog_t *log)
{
    return log->state == CLOSED;
}

/* Connect, and go on only with a server run by our effective uid or root (2). */
static int connect_trusted(offlog_t *log, const char *socket_path, const struct deadline *deadline)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(socket_path) >= sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(addr.sun_path, socket_path);
    log->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (log->fd < 0)
        return -1;
    while (connect(log->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EISCONN) {
        if (errno != EAGAIN && errno != EINTR)
            return -1;
        if (ms_left(deadline) == 0) { /* EAGAIN: the server's listen queue is full */
            errno = ETIMEDOUT;
            return -1;
        }
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    }
    struct ucred peer;
    socklen_t len = sizeof peer;
    if (getsockopt(log->fd, SOL_SOCKET, SO_PEERCRED, &peer, &len) < 0)
        return -1;
    if (peer.uid != geteuid() && peer.uid != 0) {
        errno = EACCES;
        return -1;
    }
    return 0;
}

/* -- the API -------------------------------------------------------------------------------- */
offlog_t *offlog_open(const char *path, const char *socket_path, int flags, int timeout_ms)
{
    struct deadline deadline = deadline_in(timeout_ms);
    size_t path_len = strlen(path);
    if (path[0] != '/' || path_len >= PATH_MAX_BYTES) {
        errno = EINVAL;
        return NULL;
    }
    offlog_t *log = calloc(1, sizeof *log);
    if (log == NULL)
        return NULL;
    pthread_mutex_init(&log->lock, NULL);
    log->fd = -1;
    log->state = GREETING;
    uint16_t open_flags = (flags & OFFLOG_FSYNC) ? FSYNC : 0;
    if (flags & OFFLOG_SHM)
        open_flags |= RINGS_HERE ? WANT_SHM : NO_SHM_SUPPORT;
    unsigned char fields[4];
    put_le(fields, PROTOCOL, 2);
    put_le(fields + 2, open_flags, 2);
    if (connect_trusted(log, socket_path ? socket_path : OFFLOG_DEFAULT_SOCKET, &deadline) < 0)
        goto failed;
    if (reserve(&log->out, sizeof CLIENT_PREAMBLE + FRAME_HEADER + sizeof fields + path_len) < 0)
        goto failed;
    append(&log->out, CLIENT_PREAMBLE, sizeof CLIENT_PREAMBLE);
    append_header(&log->out, 'O', sizeof fields + path_len);
    append(&log->out, fields, sizeof fields);
    append(&log->out, path, path_len);
    if (wait_until(log, handshaken, &deadline) < 0)
        goto failed;
    close_received_fds(log);
    log->transport = log->state == RING ? "shm" : "socket";
    return log;
failed:;
    int err = errno;
    offlog_close(log, 0);
    errno = err;
    return NULL;
}

ssize_t offlog_write(offlog_t *log, const void *buf, size_t n)
{
    /* The hot path, over a ring with room: lock, offlog_ring_put (bounds check, memcpy,
     * release store of HEAD: a plain mov on x86-64; acquire load of STATE: another),
     * unlock. About 10 ns for 100 B on x86-64 (python -m bench.c_client), no system
     * call. The rest is the slow path: a sleeping consumer (sem_post), a failed one,
     * no room before the cached TAIL or the end of the lap (ring_write), the socket. */
    enum offlog_put put = OFFLOG_PUT_NO_ROOM;
    ssize_t done = (ssize_t)n;
    pthread_mutex_lock(&log->lock);
    if (log->ring != NULL)
        put = offlog_ring_put(log->ring, log->data, log->capacity, log->head, log->limit, buf, n);
    if (put != OFFLOG_PUT_NO_ROOM) { /* published */
        log->head += n;
        if (put != OFFLOG_PUT_DONE && after_publish(log, put) < 0) /* the consumer sleeps, or failed */
            done = -1;
    } else if (log->error) {
        done = failed(log);
    } else if (n > 0) {
        done = log->ring ? ring_write(log, buf, n) : socket_write(log, buf, n);
    }
    pthread_mutex_unlock(&log->lock);
    return done;
}

int offlog_sync(offlog_t *log, int timeout_ms)
{
    struct deadline deadline = deadline_in(timeout_ms);
    int result;
    pthread_mutex_lock(&log->lock);
    if (log->error)
        result = failed(log);
    else if (reserve(&log->out, FRAME_HEADER + 8) < 0)
        result = -1; /* ENOMEM; the connection goes on */
    else {
        unsigned char token[8];
        put_le(token, ++log->flushes_sent, 8);
        log->payload_at_flush = log->payload;
        append_header(&log->out, 'F', sizeof token);
        append(&log->out, token, sizeof token);
        result = wait_until(log, flushed, &deadline);
    }
    pthread_mutex_unlock(&log->lock);
    return result;
}

int offlog_close(offlog_t *log, int timeout_ms)
{
    struct deadline deadline = deadline_in(timeout_ms);
    int result = 0;
    if (log == NULL)
        return 0;
    pthread_mutex_lock(&log->lock);
    if (log->error)
        result = failed(log);
    else if (log->state == SOCKET || log->state == RING) {
        result = wait_until(log, all_sent, &deadline);
        if (result == 0) {
            shutdown(log->fd, SHUT_WR);
            log->state = CLOSING;
            result = wait_until(log, closed, &deadline);
        }
    }
    int err = errno;
    pthread_mutex_unlock(&log->lock);
    close_received_fds(log);
    if (log->map != NULL)
        munmap(log->map, log->map_size);
    if (log->fd >= 0)
        close(log->fd);
    free(log->out.bytes);
    free(log->in.bytes);
    free(log->error_text);
    pthread_mutex_destroy(&log->lock);
    free(log);
    errno = err;
    return result;
}

const char *offlog_transport(const offlog_t *log)
{
    return log->transport;
}

const char *offlog_error(const offlog_t *log)
{
    return log->error_text;
}
