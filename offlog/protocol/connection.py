"""One connection of either side, as a state machine over bytes and events.

Theory of operation
-------------------
A connection object never touches a socket. Its owner feeds it what it
received (:meth:`receive_data`, ``b""`` for end of file), takes events out
(:meth:`next_event`) and turns events it wants to say into bytes
(:meth:`send`), which it writes wherever it likes. ``next_event`` returns
:data:`NEED_DATA` when it needs more bytes and :data:`PAUSED` when it is the
owner's turn to speak (the server must answer an OPEN before the frames
after it can be judged: they depend on whether it offers a ring).

Rules
-----
1. Transitions are data: :data:`SERVER_RECEIVES`, :data:`SERVER_SENDS`,
   :data:`CLIENT_RECEIVES` and :data:`CLIENT_SENDS` map a state and an event
   (by :func:`~offlog.protocol.events.key`) to the next state. They are the
   tables of docs/protocol.md section 5.7, line for line. Nothing else moves
   a connection's state.
2. An event the state does not allow, received or sent, is a
   :class:`~offlog.protocol.wire.ProtocolError` naming the state and the
   event; for what a client sends, the detail is the one section 5.9 lists.
   After a ProtocolError the connection is unusable (state ``ERROR``).
3. Both dialects: a 0.x path handshake (``OpenPath``, then raw bytes as
   ``Data``) and the framed dialect. Which one is spoken shows in
   :attr:`framed`; the states and tables are the same, the bytes differ.
4. Messages that the 0.x dialect has no form for (FLUSH, WRITTEN, a ring
   offer, ...) are a ProtocolError to send on a 0.x connection; so is a ring
   offer to a framed client of version 2 (it knew only named rings), and an
   OPENED of a version above the client's (5.8).
5. The ring's memory travels beside the bytes (SCM_RIGHTS, attached to the
   bytes of SHM_OFFER): a machine says and reads the offer's bytes only; its
   owner sends and receives the descriptor.
6. Hot paths may bypass :meth:`send` for DATA (the client's socket write
   packs its header with :func:`~offlog.protocol.wire.data_header`): a DATA
   sent in SOCKET keeps the state SOCKET, so skipping the table changes
   nothing but the cost (about 0.3 us a call).
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, Deque, Dict, Optional, Tuple

from . import events as E
from . import wire as W
from .wire import ProtocolError


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: ``next_event``: more bytes are needed.
NEED_DATA: Any = _Sentinel("NEED_DATA")
#: ``next_event``: nothing can be judged until this side sends its answer.
PAUSED: Any = _Sentinel("PAUSED")

Table = Dict[str, Dict[str, str]]

# ---------------------------------------------------------------------------
# Server (docs/protocol.md 5.7, "Server states")
# ---------------------------------------------------------------------------
#: state -> {event received: next state}
SERVER_RECEIVES: Table = {
    "PREAMBLE": {"Preamble": "GREETING", "OpenPath": "OPENING", "InvalidPath": "OPENING", "Closed": "CLOSED"},
    "GREETING": {},
    "OPEN": {
        "Open": "OPENING",
        "InvalidPath": "OPENING",
        "StatusRequest": "REQUESTED",
        "ReopenRequest": "REQUESTED",
        "Closed": "CLOSED",
    },
    "OPENING": {},
    "OFFERED": {"ShmAccept": "DATA", "ShmDecline": "DATA", "Closed": "CLOSED"},
    "DATA": {"Data": "DATA", "Flush": "DATA", "Dropped": "DATA", "EndOfData": "ENDED"},
    "ENDED": {},
    "REQUESTED": {},
    "ERROR": {},
    "CLOSED": {},
}
#: state -> {event sent: next state}
SERVER_SENDS: Table = {
    "PREAMBLE": {"Error": "CLOSED"},
    "GREETING": {"Greeting": "OPEN", "Error": "CLOSED"},
    "OPEN": {"Error": "CLOSED"},
    "OPENING": {"Opened": "DATA", "ShmOffer": "OFFERED", "Error": "CLOSED"},
    "OFFERED": {"Error": "CLOSED"},
    "DATA": {"Flushed": "DATA", "Written": "DATA", "Error": "CLOSED"},
    "ENDED": {"Written": "ENDED", "Bye": "CLOSED", "Error": "CLOSED"},
    "REQUESTED": {"StatusReply": "CLOSED", "Reopened": "CLOSED", "Error": "CLOSED"},
    "ERROR": {"Written": "ERROR", "Error": "CLOSED"},
    "CLOSED": {},
}
#: What a client is told when its frame does not fit the state (5.9).
_SERVER_UNEXPECTED = {
    "OPEN": "the first frame must be OPEN",
    "OFFERED": "expected SHM_ACCEPT or SHM_DECLINE",
    "DATA": "unexpected frame {letter!r} after the handshake",
}

# ---------------------------------------------------------------------------
# Client (docs/protocol.md 5.7, "Client states")
# ---------------------------------------------------------------------------
#: state -> {event received: next state}
CLIENT_RECEIVES: Table = {
    "IDLE": {},
    "GREETING": {"Greeting": "OPENING", "NotFramed": "CLOSED", "Closed": "CLOSED"},
    "ASKING": {"Greeting": "REQUESTED", "NotFramed": "CLOSED", "Closed": "CLOSED"},
    "OPENING": {"Opened": "SOCKET", "Opened+offer": "OFFERED", "Error": "CLOSED", "Closed": "CLOSED"},
    "OFFERED": {"ShmOffer": "MAPPING", "Error": "CLOSED", "Closed": "CLOSED"},
    "MAPPING": {"Error": "CLOSED", "Closed": "CLOSED"},
    "SOCKET": {"Flushed": "SOCKET", "Written": "SOCKET", "Error": "CLOSED", "Closed": "CLOSED"},
    "RING": {"Flushed": "RING", "Error": "CLOSED", "Closed": "CLOSED"},
    "CLOSING": {"Flushed": "CLOSING", "Written": "CLOSING", "Bye": "CLOSED", "Error": "CLOSED", "Closed": "CLOSED"},
    "REQUESTED": {"StatusReply": "CLOSED", "Reopened": "CLOSED", "Error": "CLOSED", "Closed": "CLOSED"},
    "CLOSED": {"Closed": "CLOSED"},
    "ERROR": {},
}
#: state -> {event sent: next state}
CLIENT_SENDS: Table = {
    "IDLE": {"Open": "GREETING", "OpenPath": "OPENING", "StatusRequest": "ASKING", "ReopenRequest": "ASKING"},
    "GREETING": {},
    "ASKING": {},
    "OPENING": {},
    "OFFERED": {},
    "MAPPING": {"ShmAccept": "RING", "ShmDecline": "SOCKET"},
    "SOCKET": {"Data": "SOCKET", "Flush": "SOCKET", "Dropped": "SOCKET", "EndOfData": "CLOSING"},
    "RING": {"Flush": "RING", "Dropped": "RING", "EndOfData": "CLOSING"},
    "CLOSING": {},
    "REQUESTED": {},
    # The server ended the connection while this side still talks (another
    # thread read its ERROR): what is sent now goes nowhere, and the owner
    # learns of the end from the events it reads.
    "CLOSED": {"Data": "CLOSED", "Flush": "CLOSED", "Dropped": "CLOSED", "EndOfData": "CLOSED"},
    "ERROR": {},
}

# Frame type -> the event it carries (each side receives only its peer's frames).
_FROM_CLIENT = {
    W.OPEN: "Open",
    W.STATUS: "StatusRequest",
    W.REOPEN: "ReopenRequest",
    W.SHM_ACCEPT: "ShmAccept",
    W.SHM_DECLINE: "ShmDecline",
    W.DATA: "Data",
    W.FLUSH: "Flush",
    W.DROPPED: "Dropped",
}
_FROM_SERVER = {
    W.OPENED: "Opened",
    W.SHM_OFFER: "ShmOffer",
    W.FLUSHED: "Flushed",
    W.WRITTEN: "Written",
    W.ERROR: "Error",
    W.BYE: "Bye",
    W.STATUS_REPLY: "StatusReply",
    W.REOPENED: "Reopened",
}


class _Connection:
    """What both sides share: the state, the receive buffer, the table checks."""

    RECEIVES: Table
    SENDS: Table

    def __init__(self, state: str, peer_frames: frozenset) -> None:
        self.state = state
        #: True: framed dialect; False: 0.x; None: not known yet.
        self.framed: Optional[bool] = None
        #: The framed version both sides speak: the client's (server side, from OPEN;
        #: at most VERSION) or the server's (client side, from OPENED); None until known.
        self.version: Optional[int] = None
        self._raw = b""  # bytes before the frames start (preamble, 0.x path or replies)
        self._frames = W.FrameReader(peer_frames)
        self._ready: Deque[W.Frame] = deque()
        self._eof = False
        self._eof_reported = False

    @property
    def pending(self) -> int:
        """Bytes received that are not part of a whole message yet."""
        return len(self._raw) + self._frames.pending

    @property
    def frame_under_way(self) -> Tuple[int, int]:
        """(size in all, number) of the frame whose bytes are arriving; size 0 if none."""
        frames = self._frames
        return (frames.incomplete, frames.completed) if self.framed and not self._raw else (0, frames.completed)

    def receive_data(self, data: bytes) -> None:
        """Take bytes received from the peer; ``b""`` means end of file."""
        if self._eof and data:
            raise ProtocolError(f"bytes after the end of file in state {self.state}")
        if not data:
            self._eof = True
        elif self.framed and not self._raw and self.state != "GREETING":
            self._ready.extend(self._feed_frames(data))
        else:
            self._raw += data

    def _next_frame(self) -> Optional[W.Frame]:
        """The next whole frame, or None. Bytes that came with the preamble, or
        while the server owed its greeting, are parsed only now, so their error
        comes out after the greeting (5.9)."""
        if self._raw:
            raw, self._raw = self._raw, b""
            self._ready.extend(self._feed_frames(raw))
        return self._ready.popleft() if self._ready else None

    def _feed_frames(self, data: bytes) -> list:
        try:
            return self._frames.feed(data)
        except ProtocolError:
            self.state = "ERROR"
            raise

    def _received(self, event: Any, name: Optional[str] = None) -> Any:
        """Move the state for ``event`` received, or raise the ProtocolError."""
        following = self.RECEIVES.get(self.state, {}).get(name or E.key(event))
        if following is None:
            raise self._broken(f"{name or E.key(event)} is not allowed in state {self.state}", name or E.key(event))
        self.state = following
        return event

    def _match(self, preamble: bytes, event: Any) -> Any:
        """The peer's first bytes: ``event`` once they are ``preamble`` (what
        follows it is framed), NEED_DATA while they may still become it, None
        when they cannot (the other dialect)."""
        if self._raw.startswith(preamble):
            self.framed = True
            self._raw = self._raw[len(preamble) :]
            return self._received(event)
        if preamble.startswith(self._raw) and not self._eof:
            return NEED_DATA
        return None

    def _broken(self, detail: str, event: Optional[str] = None, kind: type = ProtocolError) -> ProtocolError:
        """The peer sent what this state refuses: the machine is done (ERROR)."""
        error = kind(detail, self.state, event)
        self.state = "ERROR"
        return error

    def _no_legacy_form(self, event: Any) -> ProtocolError:
        name = E.key(event)
        return ProtocolError(f"cannot send {name} in state {self.state} of the 0.x dialect, which has no form for it")

    def _sending(self, event: Any) -> None:
        """Move the state for ``event`` sent (a local mistake raises ProtocolError)."""
        following = self.SENDS.get(self.state, {}).get(E.key(event))
        if following is None:
            raise ProtocolError(f"cannot send {E.key(event)} in state {self.state}")
        self.state = following


class ServerConnection(_Connection):
    """The server's side of one connection (either dialect)."""

    RECEIVES = SERVER_RECEIVES
    SENDS = SERVER_SENDS

    def __init__(self) -> None:
        super().__init__("PREAMBLE", W.CLIENT_FRAMES)

    # -- receiving ------------------------------------------------------------
    def next_event(self) -> Any:
        """The next event from the client, NEED_DATA or PAUSED."""
        state = self.state
        if state == "PREAMBLE":
            return self._preamble()
        if state in ("GREETING", "OPENING", "ENDED", "REQUESTED", "CLOSED", "ERROR"):
            return PAUSED
        if not self.framed:
            return self._raw_data()
        frame = self._next_frame()
        if frame is not None:
            return self._frame_event(frame)
        if not self._eof:
            return NEED_DATA
        if state == "DATA":
            if self._frames.pending:
                detail = f"end of data in the middle of a frame: {self._frames.pending} bytes discarded"
                raise self._broken(detail, kind=W.TruncatedFrame)
            return self._received(E.EndOfData())
        return self._received(E.Closed())  # OPEN, OFFERED: the handshake was never finished

    def _preamble(self) -> Any:
        matched = self._match(W.CLIENT_PREAMBLE, E.Preamble())
        if matched is not None:
            return matched
        raw = self._raw
        # 0.x: the bytes so far start a path (an EOF inside the preamble ends an empty one)
        self.framed = False
        end = raw.find(W.NUL)
        if end < 0:
            if len(raw) >= W.PATH_MAX:
                self._raw = b""
                return self._received(
                    E.InvalidPath(ValueError(f"no NUL within {W.PATH_MAX} bytes: path too long or not a path"))
                )
            return self._received(E.Closed()) if self._eof else NEED_DATA
        self._raw = raw[end + 1 :]
        try:
            return self._received(E.OpenPath(W.decode_path(raw[:end])))
        except ValueError as exc:
            return self._received(E.InvalidPath(exc))

    def _raw_data(self) -> Any:
        """0.x data phase: whatever arrived is one Data; EOF ends it."""
        if self._raw:
            data, self._raw = self._raw, b""
            return self._received(E.Data(memoryview(data)))
        if self._eof:
            return self._received(E.EndOfData())
        return NEED_DATA

    def _frame_event(self, frame: W.Frame) -> Any:
        name = _FROM_CLIENT[frame.type]
        if name not in self.RECEIVES[self.state]:
            raise self._broken(_SERVER_UNEXPECTED[self.state].format(letter=chr(frame.type)), name)
        payload = frame.payload
        try:
            if name == "Data":
                event: Any = E.Data(payload)
            elif name == "Flush":
                event = E.Flush(W.decode_u64(payload))
            elif name == "Dropped":
                event = E.Dropped(W.decode_u64(payload))
            elif name == "Open":
                event = self._open(payload)
            elif name == "ShmDecline":
                event = E.ShmDecline(bytes(payload).decode("utf-8", "replace"))
            else:
                event = getattr(E, name)()
        except ProtocolError:
            self.state = "ERROR"
            raise
        return self._received(event)

    def _open(self, payload: memoryview) -> Any:
        if len(payload) < 4:
            raise ProtocolError("OPEN frame too short")
        try:
            version, flags, path = W.decode_open(payload)
        except ValueError as exc:  # a bad path: an open error, answered as such
            return E.InvalidPath(exc)
        if version < W.OLDEST_VERSION:
            raise ProtocolError(f"protocol version {version} is not supported (need {W.OLDEST_VERSION})")
        self.version = min(version, W.VERSION)
        return E.Open(path, flags, version)

    # -- sending ----------------------------------------------------------------
    def send(self, event: Any) -> bytes:
        """The bytes that say ``event`` to the client."""
        owed_greeting = self.state == "GREETING" and type(event) is E.Error
        if self.framed is False and type(event) not in _LEGACY_REPLIES:
            raise self._no_legacy_form(event)
        if self.framed:
            self._check_version(event)
        self._sending(event)
        if self.framed:
            data = _server_frames(event, self.version)
            return W.SERVER_PREAMBLE + data if owed_greeting else data
        return _legacy_reply(event)

    def _check_version(self, event: Any) -> None:
        """5.8: no OPENED above the client's version, no sealed ring to a version-2 client."""
        kind = type(event)
        if E.key(event) not in self.SENDS.get(self.state, {}) or self.version is None:
            return  # the table's refusal (or nothing to check yet) comes first
        if kind is E.Opened and event.version > self.version:
            raise ProtocolError(f"cannot send OPENED of version {event.version} to a client of version {self.version}")
        if kind is E.ShmOffer and self.version < W.SEALED_RINGS:
            raise ProtocolError(f"cannot offer a sealed ring to a client of version {self.version}")


def _server_frames(event: Any, version: Optional[int]) -> bytes:
    kind = type(event)
    if kind is E.Greeting:
        return W.SERVER_PREAMBLE
    if kind is E.Opened:
        return W.encode_opened(event.flags, event.note, event.version)
    if kind is E.ShmOffer:
        return W.encode_opened(W.SHM_OFFERED, version=version or W.VERSION) + W.encode_offer(event.capacity)
    if kind is E.Flushed:
        return W.encode_u64(W.FLUSHED, event.token)
    if kind is E.Written:
        return W.encode_u64(W.WRITTEN, event.position)
    if kind is E.Error:
        return W.encode_error(event.exception, event.errno)
    if kind is E.Bye:
        return W.frame(W.BYE)
    if kind is E.StatusReply:
        return W.frame(W.STATUS_REPLY, json.dumps(event.document).encode("utf-8"))
    return W.frame(W.REOPENED, json.dumps(event.document).encode("utf-8"))  # Reopened


#: What a server can say to a 0.x client (it confirms nothing, offers no ring).
_LEGACY_REPLIES = (E.Opened, E.Bye, E.Error)
#: What a client can say to a 0.x server (raw bytes and their end).
_LEGACY_REQUESTS = (E.OpenPath, E.Data, E.EndOfData)


def _legacy_reply(event: Any) -> bytes:
    kind = type(event)
    if kind is E.Opened:
        return W.LEGACY_OK
    if kind is E.Bye:
        return W.LEGACY_BYE
    return W.encode_legacy_error(event.exception)


class ClientConnection(_Connection):
    """The client's side of one connection: framed unless it opens with ``OpenPath``."""

    RECEIVES = CLIENT_RECEIVES
    SENDS = CLIENT_SENDS

    def __init__(self) -> None:
        super().__init__("IDLE", W.SERVER_FRAMES)

    # -- sending ----------------------------------------------------------------
    def send(self, event: Any) -> bytes:
        """The bytes that say ``event`` to the server (``EndOfData``: none; shut
        the socket's write side)."""
        kind = type(event)
        if self.framed is False and kind not in _LEGACY_REQUESTS:
            raise self._no_legacy_form(event)
        self._sending(event)
        if kind is E.Data:
            return W.data_header(len(event.payload)) + bytes(event.payload) if self.framed else bytes(event.payload)
        if kind is E.Flush:
            return W.encode_u64(W.FLUSH, event.token)
        if kind is E.Dropped:
            return W.encode_u64(W.DROPPED, event.count)
        if kind is E.EndOfData:
            return b""
        if kind is E.Open:
            return W.CLIENT_PREAMBLE + W.encode_open(event.path, event.flags, event.version)
        if kind is E.OpenPath:
            self.framed = False
            return W.encode_path(event.path) + W.NUL
        if kind is E.ShmAccept:
            return W.frame(W.SHM_ACCEPT)
        if kind is E.ShmDecline:
            return W.frame(W.SHM_DECLINE, event.reason.encode("utf-8", "replace"))
        request = W.STATUS if kind is E.StatusRequest else W.REOPEN
        return W.CLIENT_PREAMBLE + W.frame(request)

    # -- receiving ------------------------------------------------------------
    def next_event(self) -> Any:
        """The next event from the server, NEED_DATA, or PAUSED (nothing more
        will come: before the first send, after a ProtocolError, after the
        server's end of file was reported as Closed)."""
        state = self.state
        if state in ("IDLE", "ERROR") or self._eof_reported:
            return PAUSED
        if state in ("GREETING", "ASKING"):
            return self._greeting()
        if self.framed is False:
            return self._legacy_message()
        frame = self._next_frame()
        if frame is not None:
            return self._frame_event(frame)
        return self._closed() if self._eof else NEED_DATA

    def _closed(self) -> Any:
        """The server's end of file, reported once (an incomplete frame before it is dropped)."""
        self._eof_reported = True
        return self._received(E.Closed())

    def _greeting(self) -> Any:
        matched = self._match(W.SERVER_PREAMBLE, E.Greeting())
        if matched is not None:
            return matched
        raw = self._raw
        if not raw:
            return self._closed()
        # A 0.x server refusing the empty path (5.2): its error text ends in NUL.
        if W.NUL not in raw and not self._eof:
            return NEED_DATA
        self._raw = b""
        self.framed = False
        return self._received(E.NotFramed(raw))

    def _legacy_message(self) -> Any:
        """0.x replies: ``OK``, ``BYE`` or an error text, each ending in NUL."""
        while True:
            message, sep, rest = self._raw.partition(W.NUL)
            if not sep:
                return self._closed() if self._eof else NEED_DATA
            self._raw = rest
            if message == b"OK" and self.state == "OPENING":
                return self._received(E.Opened(version=0))
            if message == b"BYE" and self.state == "CLOSING":
                return self._received(E.Bye())
            if message in LEGACY_NOT_ERRORS:
                continue  # 0.3.1 says ROTATED after a rotation, and OK again: nothing to act on (4.5)
            return self._received(E.Error(W.exception_from_text(message.decode("utf-8", "replace"))))

    def _frame_event(self, frame: W.Frame) -> Any:
        name = _FROM_SERVER[frame.type]
        payload = frame.payload
        try:
            if name == "Flushed":
                event: Any = E.Flushed(W.decode_u64(payload))
            elif name == "Written":
                event = E.Written(W.decode_u64(payload))
            elif name == "Error":
                event = E.Error(W.decode_error(payload))
            elif name == "Opened":
                version, flags, note = W.decode_opened(payload)
                if not W.OLDEST_VERSION <= version <= W.VERSION:
                    raise ProtocolError(
                        f"server speaks protocol version {version}, this client {W.OLDEST_VERSION} to {W.VERSION}"
                    )
                self.version = version
                event = E.Opened(flags, note, version)
            elif name == "ShmOffer":
                event = E.ShmOffer(W.decode_offer(payload, self.version or W.VERSION))
            elif name == "StatusReply":
                event = E.StatusReply(_json_object(payload, "STATUS_REPLY"))
            elif name == "Reopened":
                event = E.Reopened(W.decode_reopened(payload))
            else:
                event = E.Bye()
        except ProtocolError:
            self.state = "ERROR"
            raise
        return self._received(event)


#: What a 0.x server may say that is neither an answer nor an error (4.5).
LEGACY_NOT_ERRORS = (b"OK", b"ROTATED")


def _json_object(payload: memoryview, what: str) -> dict:
    try:
        document = json.loads(bytes(payload).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep to parse
        raise ProtocolError(f"{what} is not UTF-8 JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return document
