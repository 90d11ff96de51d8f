"""The offlog wire protocol, as pure code over bytes.

Theory of operation
-------------------
Nothing in this module touches a socket, a file or a clock. The server, the
client transports and the tests all call it, so every byte sequence the
protocol allows (or forbids) can be exercised in-process. ``docs/protocol.md``
is the normative description; this module is its executable form, and the two
change together.

Two dialects share one Unix stream socket:

* **Legacy (0.x)**: the client sends ``<absolute path>\\0`` and then raw bytes.
  The server answers ``OK\\0`` or ``<ExceptionClass>: <message>\\0`` (and
  closes). When the client shuts down its write side, the server writes
  everything and answers ``BYE\\0``. Record boundaries are not visible.

* **Framed**: the client sends ``\\0OFFLOG\\0`` first. A 0.x server
  reads the empty path, fails to open it without touching the disk, replies
  with an error and closes: the client notices the missing ``OFFLOG\\0``
  greeting and reconnects in the legacy dialect. A current server answers
  ``OFFLOG\\0`` and from then on both sides exchange frames::

      +--------+----------------------+-------------------------+
      | type   | length (u32, little) | payload (length bytes)  |
      | 1 byte | 4 bytes              |                         |
      +--------+----------------------+-------------------------+

  Every client ``write()`` that travels on the socket is one DATA frame, so the
  server can write it with one system call and it lands contiguous.

Rules
-----
1. Every message type, its direction and its payload layout are defined in
   this file and nowhere else.
2. Parsers never raise on short input: they return ``None`` (need more bytes).
   They raise :class:`ProtocolError` on input that can never become valid.
3. Errors cross the wire as ``"<ExceptionClass>: <message>"``; only builtin
   exception classes are ever re-created on the receiving side
   (:func:`exception_from_text`), anything else becomes ``OSError``.
"""

from __future__ import annotations

import builtins
import functools
import json
import struct
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

# ---------------------------------------------------------------------------
# Legacy dialect
# ---------------------------------------------------------------------------
NUL = b"\0"
LEGACY_OK = b"OK\0"
LEGACY_BYE = b"BYE\0"
#: Longest path accepted in a handshake (Linux PATH_MAX, terminator included).
PATH_MAX = 4096

# ---------------------------------------------------------------------------
# Framed dialect
# ---------------------------------------------------------------------------
#: First bytes of a framed client: an empty legacy path, then the magic.
CLIENT_PREAMBLE = b"\0OFFLOG\0"
#: First bytes of a framed server's answer to CLIENT_PREAMBLE.
SERVER_PREAMBLE = b"OFFLOG\0"
#: The framed protocol version this module speaks.
VERSION = 3
#: The oldest version a peer may speak: a version-2 client gets no ring (its offer
#: named shared-memory objects; version 3 passes a sealed memfd), otherwise the same.
OLDEST_VERSION = 2
#: The first version whose SHM_OFFER passes the ring's memory as a descriptor.
SEALED_RINGS = 3

FRAME_HEADER = struct.Struct("<BI")
#: Largest payload of one frame. Bigger writes are split by the client and so
#: are only contiguous up to this size.
MAX_PAYLOAD = 64 * 1024 * 1024

# Client -> server frame types.
OPEN = ord("O")  # u16 version, u16 flags, path bytes (absolute, no NUL)
DATA = ord("D")  # bytes to append, written with one system call
FLUSH = ord("F")  # u64 token: answer FLUSHED once everything before is written
SHM_ACCEPT = ord("A")  # empty: the client has mapped the ring
SHM_DECLINE = ord("N")  # utf-8 reason: the client could not use the offer
DROPPED = ord("X")  # u64: bytes this client has dropped so far (its backlog was full)
STATUS = ord("Q")  # empty, instead of OPEN: ask for the server's status
REOPEN = ord("R")  # empty, instead of OPEN: reopen every file, answer REOPENED when done

# Server -> client frame types.
OPENED = ord("K")  # u16 version, u16 flags, utf-8 note (why no ring)
SHM_OFFER = ord("S")  # u64 capacity; the ring's memfd rides along (SCM_RIGHTS)
FLUSHED = ord("f")  # u64 token
ERROR = ord("E")  # u32 errno (0: none), utf-8 "<ExceptionClass>: <message>"
BYE = ord("B")  # empty: every byte of the client's is written; closing
STATUS_REPLY = ord("J")  # utf-8 JSON document (see docs/protocol.md), then close
WRITTEN = ord("W")  # u64: DATA payload bytes of this connection written so far (socket transport)
REOPENED = ord("r")  # utf-8 JSON {"reopened": [path], "failed": [{"path", "error"}]}, then close

CLIENT_FRAMES = frozenset({OPEN, DATA, FLUSH, SHM_ACCEPT, SHM_DECLINE, DROPPED, STATUS, REOPEN})
SERVER_FRAMES = frozenset({OPENED, SHM_OFFER, FLUSHED, ERROR, BYE, STATUS_REPLY, WRITTEN, REOPENED})

# OPEN flags.
WANT_SHM = 1 << 0  # the client would like a shared-memory ring
FSYNC = 1 << 1  # fsync the file before answering FLUSHED
NO_SHM_SUPPORT = 1 << 2  # the client cannot map a ring (not Linux x86-64 with glibc, no ctypes)

# OPENED flags.
SHM_OFFERED = 1 << 0  # a SHM_OFFER frame follows

_OPEN = struct.Struct("<HH")
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class ProtocolError(Exception):
    """Bytes or an event that the protocol can never accept.

    Not a ValueError: a bad path is a ValueError (an open error, section 6.4
    of docs/protocol.md) and must not be mistaken for one of these. On the
    wire the server still says ``ValueError: protocol error: <detail>``, the
    text 0.x clients understand (:func:`exception_text`). A connection
    machine that refuses an event also names the state it was in and the
    event (``state``, ``event``); the text stays the detail of section 5.9."""

    def __init__(self, detail: str, state: Optional[str] = None, event: Optional[str] = None) -> None:
        super().__init__(detail)
        self.state = state
        self.event = event


class TruncatedFrame(ProtocolError):
    """The peer's data ended in the middle of a frame (docs/protocol.md 5.7): the
    frame is discarded, never written in part. During a server stop this is
    answered with the shutdown error instead of a protocol error."""


class Frame(NamedTuple):
    type: int
    payload: memoryview


#: ``data_header(n)``: the 5-byte header of a DATA frame of ``n`` payload bytes
#: (one C call: the socket hot path packs its frames with it).
data_header = functools.partial(FRAME_HEADER.pack, DATA)


def frame(ftype: int, payload: bytes = b"") -> bytes:
    """Encode one frame."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return FRAME_HEADER.pack(ftype, len(payload)) + payload


class FrameReader:
    """Incremental frame parser: feed bytes, get back the whole frames they complete.

    ``allowed`` is the set of frame types this side may receive; any other
    type is a :class:`ProtocolError`. Payloads are memoryviews into the bytes
    received (no copy); a frame split across many reads is joined once.
    """

    def __init__(self, allowed: frozenset) -> None:
        self._parts: List[bytes] = []
        self._have = 0
        self._need = FRAME_HEADER.size
        self._allowed = allowed
        self.completed = 0  # frames parsed so far

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a whole frame."""
        return self._have

    @property
    def incomplete(self) -> int:
        """Bytes the frame under way has in all, header included, once its header is
        here (0 if no frame is under way, 5 while its header is not whole)."""
        return self._need if self._have else 0

    def feed(self, data: bytes) -> List[Frame]:
        if data:
            self._parts.append(data)
            self._have += len(data)
        if self._have < self._need:
            return []
        buf = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        view = memoryview(buf)
        frames: List[Frame] = []
        pos, end = 0, len(buf)
        header = FRAME_HEADER.size
        while end - pos >= header:
            ftype, length = FRAME_HEADER.unpack_from(buf, pos)
            if ftype not in self._allowed:
                raise ProtocolError(f"unexpected frame type {ftype:#04x}")
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame of {length} bytes exceeds {MAX_PAYLOAD}")
            if end - pos < header + length:
                self._need = header + length
                break
            frames.append(Frame(ftype, view[pos + header : pos + header + length]))
            self.completed += 1
            pos += header + length
        else:
            self._need = header
        rest = buf[pos:] if pos < end else b""
        self._parts = [rest] if rest else []
        self._have = len(rest)
        return frames


# ---------------------------------------------------------------------------
# Payload codecs
# ---------------------------------------------------------------------------
def encode_open(path: str, flags: int, version: int = VERSION) -> bytes:
    return frame(OPEN, _OPEN.pack(version, flags) + encode_path(path))


def decode_open(payload: bytes) -> Tuple[int, int, str]:
    """Return (version, flags, path); raises ValueError for a bad path."""
    payload = bytes(payload)
    if len(payload) < _OPEN.size:
        raise ProtocolError("OPEN frame too short")
    version, flags = _OPEN.unpack_from(payload)
    return version, flags, decode_path(payload[_OPEN.size :])


def encode_opened(flags: int = 0, note: str = "", version: int = VERSION) -> bytes:
    """OPENED: u16 version, u16 flags, then a utf-8 note (why no ring was offered)."""
    return frame(OPENED, _OPEN.pack(version, flags) + note.encode("utf-8"))


def decode_opened(payload: bytes) -> Tuple[int, int, str]:
    payload = bytes(payload)
    if len(payload) < _OPEN.size:
        raise ProtocolError("OPENED frame too short")
    version, flags = _OPEN.unpack_from(payload)
    return version, flags, payload[_OPEN.size :].decode("utf-8", "replace")


def encode_offer(capacity: int) -> bytes:
    """SHM_OFFER: the capacity; the sender attaches the ring's descriptor to these bytes."""
    return frame(SHM_OFFER, _U64.pack(capacity))


def decode_offer(payload: bytes, version: int = VERSION) -> int:
    """SHM_OFFER's capacity. A version-2 server's offer goes on with the names of
    its shared-memory objects, which are read past and never used."""
    payload = bytes(payload)
    if len(payload) < _U64.size:
        raise ProtocolError("SHM_OFFER frame too short")
    if version >= SEALED_RINGS and len(payload) != _U64.size:
        raise ProtocolError(f"SHM_OFFER of {len(payload)} bytes, expected 8 (the capacity)")
    return _U64.unpack_from(payload)[0]


def encode_u64(ftype: int, value: int) -> bytes:
    """FLUSH, FLUSHED, DROPPED, WRITTEN: one u64."""
    return frame(ftype, _U64.pack(value))


def decode_u64(payload: bytes) -> int:
    if len(payload) != _U64.size:
        raise ProtocolError("expected an 8-byte payload")
    return _U64.unpack(payload)[0]


def reopened_document(results: Sequence[Tuple[str, Optional[str]]]) -> dict:
    """REOPENED's document from (path, None if reopened else why not), one per open file."""
    return {
        "reopened": [path for path, error in results if error is None],
        "failed": [{"path": path, "error": error} for path, error in results if error is not None],
    }


def decode_reopened(payload: bytes) -> dict:
    """``{"reopened": [path, ...], "failed": [{"path": ..., "error": ...}, ...]}``."""
    try:
        document = json.loads(bytes(payload).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep to parse
        raise ProtocolError(f"REOPENED is not UTF-8 JSON: {exc}") from None
    if not (
        isinstance(document, dict)
        and isinstance(document.get("reopened"), list)
        and isinstance(document.get("failed"), list)
    ):
        raise ProtocolError("REOPENED needs the lists 'reopened' and 'failed'")
    return document


# ---------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------
def encode_path(path: Union[str, bytes]) -> bytes:
    """Validate a path the way the server will, and encode it."""
    raw = path.encode("utf-8", "surrogateescape") if isinstance(path, str) else bytes(path)
    _check_path(raw)
    return raw


def decode_path(raw: bytes) -> str:
    _check_path(raw)
    return raw.decode("utf-8", "surrogateescape")


def _check_path(raw: bytes) -> None:
    if NUL in raw:
        raise ValueError("path contains a NUL byte")
    if not raw.startswith(b"/"):
        raise ValueError(f"path must be absolute, got {raw[:200]!r}")
    if len(raw) >= PATH_MAX:
        raise ValueError(f"path of {len(raw)} bytes is longer than PATH_MAX ({PATH_MAX})")


# ---------------------------------------------------------------------------
# Errors <-> exceptions
# ---------------------------------------------------------------------------
def exception_text(exc: BaseException) -> str:
    """``"<ExceptionClass>: <message>"`` as 0.x puts it on the wire. A
    :class:`ProtocolError` travels as ``ValueError: protocol error: <detail>``."""
    if isinstance(exc, ProtocolError):
        return f"ValueError: protocol error: {exc}"
    return f"{type(exc).__name__}: {exc}"


def encode_error(exc: BaseException, code: Optional[int] = None) -> bytes:
    """An ERROR frame for ``exc`` (its errno, unless ``code`` says otherwise)."""
    if code is None:
        code = getattr(exc, "errno", None) or 0
    return frame(ERROR, _U32.pack(code) + exception_text(exc).encode("utf-8", "replace"))


def encode_legacy_error(exc: BaseException) -> bytes:
    return exception_text(exc).replace("\0", "\\0").encode("utf-8", "replace") + NUL


def decode_error(payload: bytes) -> BaseException:
    payload = bytes(payload)
    if len(payload) < _U32.size:
        raise ProtocolError("ERROR frame too short")
    (code,) = _U32.unpack_from(payload)
    return exception_from_text(payload[_U32.size :].decode("utf-8", "replace"), code or None)


def exception_from_text(text: str, code: Optional[int] = None) -> BaseException:
    """Re-create the exception a peer described as ``"<Class>: <message>"``.

    Only builtin ``Exception`` subclasses are instantiated, and only those
    built from a message alone (not ``UnicodeDecodeError``). ``OSError``
    subclasses get their errno back (from ``code``, or parsed from an
    ``[Errno N]`` prefix in the message, N in ASCII digits) so ``exc.errno``
    works as usual.
    """
    name, sep, message = text.partition(": ")
    cls = getattr(builtins, name, None) if sep else None
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls, message = OSError, text
    if not issubclass(cls, OSError):
        try:
            return cls(message)
        except TypeError:  # its constructor wants more than a message: as if unknown
            cls, message = OSError, text
    if message.startswith("[Errno "):
        number, _, rest = message[len("[Errno ") :].partition("] ")
        if number.isascii() and number.isdigit():
            code, message = code or int(number), rest
    return cls(code, message) if code else cls(message)
