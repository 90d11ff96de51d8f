/* The ring's hot paths in plain C, producer and consumer: no Python API, so a C client can share it.
 *
 * Theory of operation
 * -------------------
 * One ring carries one client's bytes to the server (docs/protocol.md, section 7).
 * The client is the producer: it copies a write's bytes into the data area at
 * ``head`` and then publishes ``head + n`` in HEAD; the server, the consumer,
 * reads HEAD, writes ``[tail, HEAD)`` to the file and publishes TAIL. Positions
 * are monotonic 64-bit byte counters; the byte at position p lives at
 * ``data[p & (capacity - 1)]``.
 *
 * ``offlog_ring_put`` is the whole hot path: a bounds check against the
 * caller's cached ``limit``, one memcpy, one release store of HEAD, one acquire
 * load of STATE. It takes only a write that fits in one piece before ``limit``
 * (the caller keeps it at most ``tail + capacity`` and at most the end of the
 * current lap of the data area, as offlog/shm/ring.py's ``Producer._limit``
 * does) and says ``OFFLOG_PUT_NO_ROOM``, having touched nothing, for any
 * other: the caller's slow path refreshes TAIL, wraps, and keeps a backlog.
 * The core checks the end of the data area itself too, so no ``limit`` can
 * make it write outside the mapping. It never blocks, never makes a system
 * call, and posts nothing: it says what the caller must do next
 * (``OFFLOG_PUT_POST``: post the doorbell; ``OFFLOG_PUT_FAILED``: the consumer
 * flagged an error, read ERRNO). ``offlog_ring_publish`` is its second half
 * alone, for a slow path that copied a write in itself (in two pieces, where it
 * wraps past the end of the data area: the C client of c/offlog.c).
 *
 * The consumer's side is ``offlog_ring_available`` (HEAD, loaded with acquire
 * and checked against the consumer's own ``tail`` and the header's identity
 * words exactly as offlog/shm/ring.py's ``Consumer.available`` checks them: the
 * header is hostile input), ``offlog_ring_pieces`` (``[tail, HEAD)`` as one or
 * two spans of the data area, two when they pass its end) and
 * ``offlog_ring_release`` (TAIL, stored with release once those bytes are
 * written). The caller writes the spans in between (offlog/_speedups.c: one
 * ``writev``); the core makes no system call on either side.
 *
 * Memory ordering
 * ---------------
 * * The copy, then HEAD with ``memory_order_release``: no store of the copy can
 *   become visible after HEAD, on any machine (a plain ``mov`` on x86-64, ``stlr``
 *   on aarch64), and the compiler can neither delay, split nor merge the store.
 *   The consumer loads HEAD with acquire before it reads the bytes, so it never
 *   reads a position before its bytes.
 * * STATE with ``memory_order_acquire``, after the HEAD store: a consumer that
 *   stored ERRNO and then FAILED (release) is seen with its ERRNO.
 * * Release-then-acquire does not order the HEAD store before the STATE load
 *   (store->load reordering is allowed: the store may sit in the store buffer
 *   while the load reads AWAKE). That is the Dekker window of the sleep
 *   handshake, and it stays closed where the pure-Python producer closes it:
 *   a consumer that stored SLEEPING re-reads HEAD once more SETTLE (1 ms)
 *   later, and a store buffer drains long before that (the doorbell section
 *   of offlog/shm/ring.py's header; docs/protocol.md 7.7). So no fence is
 *   paid here.
 * * HEAD with ``memory_order_acquire`` in the consumer, before it reads a byte:
 *   it pairs with the producer's release store, so every byte before that HEAD
 *   is visible to it (``ldar`` on aarch64). The bytes are read after the load
 *   in program order, by the caller or by the kernel inside its ``writev``.
 * * TAIL with ``memory_order_release``, after the bytes were written (the
 *   ``writev`` returned): no read of them is ordered after the store, so a
 *   producer that loads this TAIL (with acquire) never overwrites bytes that
 *   are still being read.
 * These hold on any machine with C11 atomics. The Python paths of
 * offlog/shm/ring.py order their own header accesses (a fence from
 * offlog._speedups where the machine needs one), so rings are offered on
 * x86-64 and, with this core, on aarch64 (offlog.shm.objects.unsupported_reason).
 *
 * Layout
 * ------
 * The offsets mirror offlog/shm/layout.py, the only place they are defined;
 * tests/test_speedups.py compares the values below (exported by offlog._speedups)
 * with layout.py's. The static asserts pin the struct to them and make every
 * header word an aligned, lock-free 8-byte atomic.
 */
#ifndef OFFLOG_RING_CORE_H
#define OFFLOG_RING_CORE_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

/* offlog/shm/layout.py: identity, word indices (8-byte words), byte offsets, STATE values. */
#define OFFLOG_MAGIC 0x3252474f4c46464fULL /* "OFFLOGR2" little-endian */
#define OFFLOG_VERSION 2
#define OFFLOG_MAGIC_WORD 0
#define OFFLOG_VERSION_WORD 1
#define OFFLOG_CAPACITY_WORD 2
#define OFFLOG_DATA_OFFSET_WORD 3
#define OFFLOG_HEAD_WORD 8
#define OFFLOG_TAIL_WORD 16
#define OFFLOG_STATE_WORD 17
#define OFFLOG_ERRNO_WORD 18
#define OFFLOG_DOORBELL_OFFSET 192
#define OFFLOG_DOORBELL_SIZE 64
#define OFFLOG_HEADER_SIZE 256
#define OFFLOG_DATA_OFFSET 256
#define OFFLOG_AWAKE 0
#define OFFLOG_SLEEPING 1
#define OFFLOG_FAILED 2

/* The header: every field but the doorbell a little-endian u64, each side's on its own cache line. */
struct offlog_ring_header {
    _Atomic uint64_t magic;
    _Atomic uint64_t version;
    _Atomic uint64_t capacity;
    _Atomic uint64_t data_offset;
    uint64_t reserved0[4];
    _Atomic uint64_t head; /* written by the producer only */
    uint64_t reserved1[7];
    _Atomic uint64_t tail; /* written by the consumer only, as are state and err */
    _Atomic uint64_t state;
    _Atomic uint64_t err;
    uint64_t reserved2[5];
    unsigned char doorbell[OFFLOG_DOORBELL_SIZE]; /* a process-shared sem_t; the producer only sem_posts it */
};

#define OFFLOG_WORD_AT(field, word) (offsetof(struct offlog_ring_header, field) == 8 * (word))
_Static_assert(OFFLOG_WORD_AT(magic, OFFLOG_MAGIC_WORD), "MAGIC_WORD");
_Static_assert(OFFLOG_WORD_AT(version, OFFLOG_VERSION_WORD), "VERSION_WORD");
_Static_assert(OFFLOG_WORD_AT(capacity, OFFLOG_CAPACITY_WORD), "CAPACITY_WORD");
_Static_assert(OFFLOG_WORD_AT(data_offset, OFFLOG_DATA_OFFSET_WORD), "DATA_OFFSET_WORD");
_Static_assert(OFFLOG_WORD_AT(head, OFFLOG_HEAD_WORD), "HEAD_WORD");
_Static_assert(OFFLOG_WORD_AT(tail, OFFLOG_TAIL_WORD), "TAIL_WORD");
_Static_assert(OFFLOG_WORD_AT(state, OFFLOG_STATE_WORD), "STATE_WORD");
_Static_assert(OFFLOG_WORD_AT(err, OFFLOG_ERRNO_WORD), "ERRNO_WORD");
_Static_assert(offsetof(struct offlog_ring_header, doorbell) == OFFLOG_DOORBELL_OFFSET, "DOORBELL_OFFSET");
_Static_assert(sizeof(struct offlog_ring_header) == OFFLOG_HEADER_SIZE, "HEADER_SIZE");
_Static_assert(OFFLOG_DATA_OFFSET == OFFLOG_HEADER_SIZE, "the data area follows the header");
_Static_assert(sizeof(_Atomic uint64_t) == 8, "an atomic word is 8 bytes, no lock inside");
_Static_assert(_Alignof(_Atomic uint64_t) == 8, "atomic words are 8-byte aligned");
_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "8-byte atomics are lock-free: two processes share no hidden lock");

/* What the caller does after offlog_ring_put. */
enum offlog_put {
    OFFLOG_PUT_NO_ROOM = -1, /* nothing written: take the slow path */
    OFFLOG_PUT_DONE = 0,     /* published; the consumer is awake (or STATE holds a value it never stores) */
    OFFLOG_PUT_POST = 1,     /* published; STATE = SLEEPING: post the doorbell */
    OFFLOG_PUT_FAILED = 2,   /* published; STATE = FAILED: the consumer flagged an error (ERRNO) */
};

/* Publish ``head`` (the bytes before it are copied in) with one release store of HEAD,
 * then load STATE: what the caller does next. */
static inline enum offlog_put offlog_ring_publish(struct offlog_ring_header *header, uint64_t head)
{
    atomic_store_explicit(&header->head, head, memory_order_release);
    switch (atomic_load_explicit(&header->state, memory_order_acquire)) {
    case OFFLOG_SLEEPING:
        return OFFLOG_PUT_POST;
    case OFFLOG_FAILED:
        return OFFLOG_PUT_FAILED;
    default:
        return OFFLOG_PUT_DONE;
    }
}

/* Copy the ``n`` bytes at ``src`` to position ``head`` of the ring whose header is ``header``
 * and whose data area is ``data`` (``capacity`` bytes, a power of two), and publish
 * ``head + n``, if they end at or before ``limit`` and before the end of the data area. */
static inline enum offlog_put offlog_ring_put(struct offlog_ring_header *header, unsigned char *data,
                                              uint64_t capacity, uint64_t head, uint64_t limit,
                                              const void *src, size_t n)
{
    uint64_t start = head & (capacity - 1);
    if (limit < head || n > limit - head || n > capacity - start)
        return OFFLOG_PUT_NO_ROOM;
    memcpy(data + start, src, n);
    return offlog_ring_publish(header, head + n);
}

/* What offlog_ring_available found; all but OFFLOG_AVAILABLE say the ring is corrupt. */
enum offlog_available {
    OFFLOG_AVAILABLE = 0,   /* HEAD within [tail, tail + capacity], the identity words intact */
    OFFLOG_BAD_HEAD = 1,    /* HEAD outside [tail, tail + capacity] */
    OFFLOG_BAD_MAGIC = 2,   /* MAGIC or CAPACITY overwritten */
    OFFLOG_BAD_VERSION = 3, /* VERSION or DATA_OFFSET overwritten */
};

/* Load HEAD (acquire) into ``*head`` and check it and the identity words, for a consumer
 * whose own position is ``tail`` in a ring of ``capacity`` bytes. */
static inline enum offlog_available offlog_ring_available(struct offlog_ring_header *header, uint64_t capacity,
                                                          uint64_t tail, uint64_t *head)
{
    *head = atomic_load_explicit(&header->head, memory_order_acquire);
    if (*head < tail || *head - tail > capacity)
        return OFFLOG_BAD_HEAD;
    if (atomic_load_explicit(&header->magic, memory_order_relaxed) != OFFLOG_MAGIC
        || atomic_load_explicit(&header->capacity, memory_order_relaxed) != capacity)
        return OFFLOG_BAD_MAGIC;
    if (atomic_load_explicit(&header->version, memory_order_relaxed) != OFFLOG_VERSION
        || atomic_load_explicit(&header->data_offset, memory_order_relaxed) != OFFLOG_DATA_OFFSET)
        return OFFLOG_BAD_VERSION;
    return OFFLOG_AVAILABLE;
}

/* The bytes in [tail, head) of the data area ``data`` (``capacity`` bytes, a power of two;
 * ``head - tail`` at most ``capacity``, as offlog_ring_available checks) as spans in
 * ``span``; returns how many: 0, 1, or 2 when they pass the end of the data area. */
static inline int offlog_ring_pieces(unsigned char *data, uint64_t capacity, uint64_t tail, uint64_t head,
                                     struct iovec span[2])
{
    uint64_t start = tail & (capacity - 1), n = head - tail;
    if (n == 0)
        return 0;
    span[0].iov_base = data + start;
    span[0].iov_len = n < capacity - start ? n : capacity - start;
    if (span[0].iov_len == n)
        return 1;
    span[1].iov_base = data;
    span[1].iov_len = n - span[0].iov_len;
    return 2;
}

/* Everything before ``position`` is written: hand the space back (TAIL, release). */
static inline void offlog_ring_release(struct offlog_ring_header *header, uint64_t position)
{
    atomic_store_explicit(&header->tail, position, memory_order_release);
}

#endif /* OFFLOG_RING_CORE_H */
