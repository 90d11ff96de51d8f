/* offlog.h: the C client of offlog, a non-blocking file-append service (Linux).
 *
 * An offlog_t appends to one file through a local offlog server, which owns the
 * file and does the blocking I/O. offlog_write() never waits: over a
 * shared-memory ring (a server started with --shm, OFFLOG_SHM) it is a memcpy
 * and two 8-byte memory accesses; over the Unix socket, one non-blocking send.
 * offlog_sync() is the barrier, offlog_close() the end. Errors are errno values:
 * the server's (ENOENT, EACCES, EISDIR, ENOSPC, EIO, ...), ESHUTDOWN when the
 * server stops, EPIPE when it vanishes without a word.
 *
 * Plain C99 and C++; the library itself (offlog.c) is C11. See c/README.md.
 */
#ifndef OFFLOG_H
#define OFFLOG_H

#include <stddef.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The socket a server listens on unless told otherwise (offlog -s). */
#define OFFLOG_DEFAULT_SOCKET "/tmp/offlog.sock"

/* offlog_open flags. */
#define OFFLOG_SHM 0x1   /* ask for a shared-memory ring; the socket if the server offers none */
#define OFFLOG_FSYNC 0x2 /* the server fsyncs the file before each offlog_sync returns */

/* What a socket connection keeps in memory for the server while its socket is full;
 * a write that would pass it fails with EAGAIN (a ring has its own, fixed size). */
#define OFFLOG_BACKLOG_MAX (4u << 20)

typedef struct offlog offlog_t;

/* Connect to the server at ``socket_path`` (NULL: OFFLOG_DEFAULT_SOCKET) and open the
 * absolute ``path`` for appending. ``timeout_ms`` bounds the whole open (negative: no
 * limit). The server must run as this process's effective uid or as root: any other is
 * refused with EACCES before a byte is sent. Returns NULL with errno set on failure:
 * the server's error for the file (ENOENT, EISDIR, EACCES, ...), EINVAL for a path that
 * is not absolute or is too long, ECONNREFUSED or ENOENT when no server listens,
 * ETIMEDOUT, EPROTONOSUPPORT for a server of offlog 0.x. */
offlog_t *offlog_open(const char *path, const char *socket_path, int flags, int timeout_ms);

/* Append ``n`` bytes. Never blocks. Returns ``n``, or -1 with errno:
 *   EAGAIN  no room now (the ring is full, or the socket and OFFLOG_BACKLOG_MAX are);
 *           nothing was taken: retry later, drop the record, or offlog_sync() first;
 *   else    the connection failed for good (the server's errno, ESHUTDOWN, EPIPE, ...):
 *           every later call returns the same.
 * Each write lands contiguous in the file, even with other clients appending to it,
 * up to the ring's size (at least 64 KiB) over a ring; a larger one is taken in parts
 * (a return value below ``n``: the rest is the caller's to write, as with write(2)). */
ssize_t offlog_write(offlog_t *log, const void *buf, size_t n);

/* Wait until the server has written (and with OFFLOG_FSYNC fsynced) every byte written
 * so far. 0, or -1 with errno: ETIMEDOUT after ``timeout_ms`` (negative: no limit; the
 * handle stays usable), or the connection's error. */
int offlog_sync(offlog_t *log, int timeout_ms);

/* Hand over what is left, end the connection and wait for the server to confirm that
 * every byte is written; then free ``log``, whatever happened. 0, or -1 with errno:
 * the connection's error, or ETIMEDOUT (what was still unsent is lost). */
int offlog_close(offlog_t *log, int timeout_ms);

/* "shm" or "socket": how this connection's bytes travel. */
const char *offlog_transport(const offlog_t *log);

/* The words for the error that failed this connection: the server's, e.g.
 * "OSError: [Errno 28] No space left on device: '/var/log/app.log'", or the client's
 * own for what it found itself (a corrupted ring, a protocol error); NULL if none. */
const char *offlog_error(const offlog_t *log);

#ifdef __cplusplus
}
#endif

#endif /* OFFLOG_H */
