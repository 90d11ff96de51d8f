"""Byte layout of the shared-memory ring: the only place offsets are defined.

One ring carries one client's bytes to the server. The server creates the
ring's memory (a sealed memfd, :mod:`offlog.shm.objects`), writes this
header, and passes the descriptor to the client; the client is the producer,
the server the consumer. Every other module asks this one for an offset;
none hard-codes one.

All header fields but the doorbell are 64-bit little-endian words, read and
written through a ``memoryview.cast("Q")`` of the mapping, so every access is
one aligned 8-byte load or store (never ``struct.pack_into``, which zero-fills
its target before writing and lets a reader in another process see 0). The
doorbell is a POSIX semaphore (``sem_t``, initialised by the server with
``sem_init(sem, 1, 0)``: process-shared, value 0) on a cache line of its own;
the two 32-bit words of it that the server touches without the C library
(see :mod:`offlog.shm.objects`) are read and written through
``memoryview.cast("I")``, each one aligned 4-byte access.

::

    word  byte
         0 +---------------------------------------------------------------+
      0    | MAGIC    "OFFLOGR2" as u64                  set by the server  |
      1    | VERSION  layout version (2)                 set by the server  |
      2    | CAPACITY data bytes, a power of two         set by the server  |
      3    | DATA_OFFSET byte offset of the data area    set by the server  |
           |  (words 4..7 reserved, zero)                                  |
        64 +------------------------- producer line ---------------------- +
      8    | HEAD     bytes ever published (monotonic)   written: producer  |
           |  (words 9..15 reserved, zero)                                 |
       128 +------------------------- consumer line ---------------------- +
     16    | TAIL     bytes ever consumed (monotonic)    written: consumer  |
     17    | STATE    AWAKE=0, SLEEPING=1, FAILED=2      written: consumer  |
     18    | ERRNO    errno of the failure (STATE=FAILED) written: consumer |
           |  (words 19..23 reserved, zero)                                |
       192 +------------------------- doorbell line ---------------------- +
     24    | DOORBELL the sem_t (SEM_SIZE = 32 bytes), then zero to 256    |
           |   byte 192: its value, a u32 futex word   posted: both;       |
           |                                           taken: consumer     |
           |   byte 196: its waiter count, a u32       written: consumer   |
       256 +------------------------- data area -------------------------- +
           | CAPACITY bytes. Byte at position p lives at                   |
           | DATA_OFFSET + (p & (CAPACITY - 1)).                           |
           +---------------------------------------------------------------+

Invariants a consumer checks before trusting the header (it is written by an
untrusted peer): MAGIC, VERSION and CAPACITY unchanged, and
``tail <= HEAD <= tail + CAPACITY`` where ``tail`` is the consumer's own
private copy, never re-read from the shared word.
"""

from __future__ import annotations

MAGIC = int.from_bytes(b"OFFLOGR2", "little")
VERSION = 2

# Word indices into memoryview.cast("Q") of the mapping.
MAGIC_WORD = 0
VERSION_WORD = 1
CAPACITY_WORD = 2
DATA_OFFSET_WORD = 3
HEAD_WORD = 8  # producer's cache line
TAIL_WORD = 16  # consumer's cache line
STATE_WORD = 17
ERRNO_WORD = 18

HEADER_SIZE = 256
DATA_OFFSET = HEADER_SIZE

#: The doorbell: a POSIX semaphore on a 64-byte cache line of its own.
DOORBELL_OFFSET = 192
DOORBELL_SIZE = 64
#: sizeof(sem_t) in glibc's x86-64 and aarch64 ABIs (the only C library and machines rings
#: are offered with, see offlog.shm.objects.unsupported_reason); musl's is 32 bytes too. The
#: line leaves room.
SEM_SIZE = 32
# Word indices into memoryview.cast("I") of the doorbell line (glibc's sem_t: one 64-bit
# word whose low half is the value and whose high half counts the waiters).
BELL_VALUE = 0
BELL_WAITERS = 1

assert DOORBELL_OFFSET % DOORBELL_SIZE == 0 and DOORBELL_OFFSET >= (ERRNO_WORD + 1) * 8
assert SEM_SIZE <= DOORBELL_SIZE and DOORBELL_OFFSET + DOORBELL_SIZE <= HEADER_SIZE

# STATE values.
AWAKE = 0
SLEEPING = 1
FAILED = 2

MIN_CAPACITY = 64 * 1024  # every write up to 64 KiB stays whole
MAX_CAPACITY = 1 << 30
DEFAULT_CAPACITY = 4 * 1024 * 1024


class LayoutError(ValueError):
    """A header that does not describe a valid ring."""


def mapping_size(capacity: int) -> int:
    return DATA_OFFSET + capacity


def check_capacity(capacity: int) -> int:
    if capacity < MIN_CAPACITY or capacity > MAX_CAPACITY or capacity & (capacity - 1):
        raise LayoutError(f"ring capacity must be a power of two in [{MIN_CAPACITY}, {MAX_CAPACITY}], got {capacity}")
    return capacity


def init_header(words: memoryview, capacity: int) -> None:
    """Server side: write a fresh header into a zeroed mapping."""
    check_capacity(capacity)
    words[VERSION_WORD] = VERSION
    words[CAPACITY_WORD] = capacity
    words[DATA_OFFSET_WORD] = DATA_OFFSET
    words[MAGIC_WORD] = MAGIC  # last: a header with MAGIC is complete


def check_header(words: memoryview, capacity: int, size: int) -> None:
    """Raise LayoutError unless ``words`` is a ring of ``capacity`` in ``size`` bytes."""
    if words[MAGIC_WORD] != MAGIC:
        raise LayoutError(f"bad ring magic {words[MAGIC_WORD]:#018x}")
    if words[VERSION_WORD] != VERSION:
        raise LayoutError(f"ring layout version {words[VERSION_WORD]}, expected {VERSION}")
    if words[CAPACITY_WORD] != capacity:
        raise LayoutError(f"ring capacity {words[CAPACITY_WORD]}, expected {capacity}")
    if words[DATA_OFFSET_WORD] != DATA_OFFSET:
        raise LayoutError(f"ring data offset {words[DATA_OFFSET_WORD]}, expected {DATA_OFFSET}")
    if size != mapping_size(capacity):
        raise LayoutError(f"mapping of {size} bytes, expected {mapping_size(capacity)} for capacity {capacity}")
