"""What the two sides say to each other, as values.

Every message of docs/protocol.md is one event class here, named after its
frame. A connection machine (:mod:`offlog.protocol.connection`) turns bytes
received into these events and events to send into bytes; the code that
owns the socket only ever handles events.

The transition tables name an event by :func:`key`: its class name, except
an OPENED that announces a ring offer (``"Opened+offer"``), whose next state
differs.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from .wire import SHM_OFFERED, VERSION


def key(event: object) -> str:
    """The name the transition tables know ``event`` by."""
    if type(event) is Opened and event.flags & SHM_OFFERED:  # type: ignore[attr-defined]
        return "Opened+offer"
    return type(event).__name__


# -- client -> server ---------------------------------------------------------
class Preamble(NamedTuple):
    """The framed preamble ``\\0OFFLOG\\0`` arrived (server side only)."""


class Open(NamedTuple):
    """OPEN: open ``path`` (framed dialect)."""

    path: str
    flags: int = 0
    version: int = VERSION


class OpenPath(NamedTuple):
    """A 0.x client's handshake ``<path>\\0``."""

    path: str


class InvalidPath(NamedTuple):
    """An OPEN or a 0.x path that breaks the path rules (4.2): an open error."""

    error: ValueError


class StatusRequest(NamedTuple):
    """STATUS instead of OPEN."""


class ReopenRequest(NamedTuple):
    """REOPEN instead of OPEN."""


class ShmAccept(NamedTuple):
    """SHM_ACCEPT: the client mapped the ring."""


class ShmDecline(NamedTuple):
    """SHM_DECLINE: the client could not use the ring."""

    reason: str = ""


class Data(NamedTuple):
    """DATA (or a 0.x client's raw bytes): bytes to append."""

    payload: memoryview


class Flush(NamedTuple):
    """FLUSH(token)."""

    token: int


class Dropped(NamedTuple):
    """DROPPED: bytes the client has dropped so far."""

    count: int


class EndOfData(NamedTuple):
    """The client's end of data (``shutdown(SHUT_WR)``) at a frame boundary."""


# -- server -> client ---------------------------------------------------------
class Greeting(NamedTuple):
    """The server's preamble ``OFFLOG\\0``."""


class NotFramed(NamedTuple):
    """Instead of the greeting, a 0.x server's reply to the empty path: fall back (5.2)."""

    reply: bytes


class Opened(NamedTuple):
    """OPENED (a 0.x server's ``OK``: version 0, no flags)."""

    flags: int = 0
    note: str = ""
    version: int = VERSION


class ShmOffer(NamedTuple):
    """SHM_OFFER; the server sends it as OPENED(SHM_OFFERED) + SHM_OFFER, with the
    ring's memfd attached to those bytes (its owner's business, not the machine's)."""

    capacity: int


class Flushed(NamedTuple):
    """FLUSHED(token)."""

    token: int


class Written(NamedTuple):
    """WRITTEN: DATA payload bytes of this connection written so far."""

    position: int


class Error(NamedTuple):
    """ERROR (or a 0.x error text): the connection ends with ``exception``."""

    exception: BaseException
    errno: Optional[int] = None  # sending: overrides exception.errno on the wire


class Bye(NamedTuple):
    """BYE: every byte of the client's is written."""


class StatusReply(NamedTuple):
    """STATUS_REPLY: the server's status document."""

    document: dict


class Reopened(NamedTuple):
    """REOPENED: ``{"reopened": [path], "failed": [{"path", "error"}]}``."""

    document: dict


class Closed(NamedTuple):
    """The peer closed its side before the protocol said it may."""
