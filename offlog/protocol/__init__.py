"""The offlog wire protocol, as pure code over bytes (docs/protocol.md).

Theory of operation
-------------------
Nothing in this package touches a socket, a file, a clock or a thread. The
server, the client transports and the tests all drive it, so every byte
sequence the protocol allows (or forbids) can be exercised in-process.

* :mod:`.wire`: constants, the frame format, payload codecs, paths, and
  errors <-> exceptions. Every byte of every message is built and parsed
  there.
* :mod:`.events`: each message as a value.
* :mod:`.connection`: :class:`ServerConnection` and
  :class:`ClientConnection`, one state machine per side (bytes and events in,
  events and bytes out), whose transitions are the tables of section 5.7.
"""

from .connection import (
    CLIENT_RECEIVES,
    CLIENT_SENDS,
    NEED_DATA,
    PAUSED,
    SERVER_RECEIVES,
    SERVER_SENDS,
    ClientConnection,
    ServerConnection,
)
from .events import (
    Bye,
    Closed,
    Data,
    Dropped,
    EndOfData,
    Error,
    Flush,
    Flushed,
    Greeting,
    InvalidPath,
    NotFramed,
    Open,
    Opened,
    OpenPath,
    Preamble,
    Reopened,
    ReopenRequest,
    ShmAccept,
    ShmDecline,
    ShmOffer,
    StatusReply,
    StatusRequest,
    Written,
    key,
)
from .wire import *  # noqa: F403
from .wire import ProtocolError, TruncatedFrame, exception_text

__all__ = [
    "CLIENT_RECEIVES", "CLIENT_SENDS", "NEED_DATA", "PAUSED", "SERVER_RECEIVES", "SERVER_SENDS",
    "ClientConnection", "ServerConnection", "Bye", "Closed", "Data", "Dropped", "EndOfData", "Error",
    "Flush", "Flushed", "Greeting", "InvalidPath", "NotFramed", "Open", "Opened", "OpenPath", "Preamble",
    "Reopened", "ReopenRequest", "ShmAccept", "ShmDecline", "ShmOffer", "StatusReply", "StatusRequest",
    "Written", "key", "ProtocolError", "TruncatedFrame", "exception_text",
]
