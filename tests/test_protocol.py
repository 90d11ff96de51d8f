"""The protocol machines in-process: docs/protocol.md 5.7, 5.9 and 6 against offlog.protocol.

No socket, no server process, no file. A :class:`ClientConnection` and a
:class:`ServerConnection` talk through two byte queues (:class:`Pipe`), each
driven the way the transports and server.py drive theirs (:class:`ClientPart`,
:class:`ServerPart`), or one of them is a fixed byte script (a 0.x peer).

* Every exchange of 5.7 (both dialects, the ring offer, control requests,
  refusals, the 0.x fallback, the shutdown error) is replayed with the bytes of
  each direction cut at every boundary, and long generated sessions at points
  hypothesis picks: the events, the bytes and the final states must be those
  of the uncut run.
* Hypothesis feeds both machines random frames and bytes in random chunks from
  every state they can be read in: only ProtocolError may escape, every state
  move is one its table lists, and after a ProtocolError the machine is in
  ERROR and stays quiet.
* Errors cross as 6.3 and 6.4 say; each input of 5.9 gets its exact detail
  and ERROR frame. Expected frames are built here with struct, not with the
  encoders, so a mistake shared by encoder and decoder cannot hide.
* A send that a table does not list is refused, naming the state and the event.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offlog.protocol import (
    CLIENT_RECEIVES,
    CLIENT_SENDS,
    NEED_DATA,
    PAUSED,
    SERVER_RECEIVES,
    SERVER_SENDS,
    Bye,
    ClientConnection,
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
    ProtocolError,
    Reopened,
    ReopenRequest,
    ServerConnection,
    ShmAccept,
    ShmDecline,
    ShmOffer,
    StatusReply,
    StatusRequest,
    TruncatedFrame,
    Written,
    key,
)
from offlog.protocol import wire as W

PATH = "/var/log/app.log"
PREAMBLE = b"\0OFFLOG\0"
GREETING = b"OFFLOG\0"
#: server.py's SERVER_EXITED, which it sends with errno ESHUTDOWN (6.6).
SHUTDOWN = OSError("offlog server exited")
SHUTDOWN_TEXT = "OSError: offlog server exited"
STATUS_DOCUMENT = {"pid": 4242, "version": "2.0", "clients": [], "files": [], "errors": 0}
REOPENED_DOCUMENT = {"reopened": [PATH], "failed": [{"path": "/ro/x.log", "error": "PermissionError: denied"}]}
#: At most this many events before a machine must wait for bytes or its owner.
PATIENCE = 10_000

QUICK = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# -- frames, by hand (5.3, 5.5) ----------------------------------------------------------
def frame(ftype: bytes, payload: bytes = b"") -> bytes:
    return ftype + struct.pack("<I", len(payload)) + payload


def u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def open_frame(path: bytes, flags: int = 0, version: int = 3) -> bytes:
    return frame(b"O", struct.pack("<HH", version, flags) + path)


def opened_frame(flags: int = 0, note: bytes = b"", version: int = 3) -> bytes:
    return frame(b"K", struct.pack("<HH", version, flags) + note)


def offer_frame(capacity: int = 1 << 20) -> bytes:
    """SHM_OFFER: the capacity only (the ring's memfd travels beside the bytes)."""
    return frame(b"S", u64(capacity))


def error_frame(text: str, code: int = 0) -> bytes:
    return frame(b"E", struct.pack("<I", code) + text.encode())


def protocol_error_frame(detail: str) -> bytes:
    return error_frame(f"ValueError: protocol error: {detail}")


def said(event: Any) -> tuple:
    """An event as plain data: exceptions by class, errno and text, payloads as bytes
    (events are tuples, so ``Flush(1) == Flushed(1)``: the key tells them apart)."""
    if type(event) is Error:
        exc = event.exception
        return ("Error", type(exc), getattr(exc, "errno", None), str(exc))
    if type(event) is InvalidPath:
        return ("InvalidPath", str(event.error))
    return (key(event), *(bytes(field) if isinstance(field, memoryview) else field for field in event))


def transcript(events: Sequence[Any], merge_data: bool = False) -> Tuple[tuple, ...]:
    """``said`` of each event; ``merge_data``: the 0.x dialect, whose Data events are
    whatever each read returned, so only their concatenation is defined (4.3)."""
    out: List[tuple] = []
    for event in map(said, events):
        if merge_data and out and event[0] == out[-1][0] == "Data":
            out[-1] = ("Data", out[-1][1] + event[1])
        else:
            out.append(event)
    return tuple(out)


# -- machines driven with table checks ------------------------------------------------------
def next_event(conn: Any) -> Any:
    """``conn.next_event()``, checking the move against the machine's table."""
    before = conn.state
    try:
        event = conn.next_event()
    except ProtocolError:
        assert conn.state == "ERROR", f"a ProtocolError in {before} left the machine in {conn.state}"
        raise
    if event is NEED_DATA or event is PAUSED:
        assert conn.state == before
    else:
        assert key(event) in conn.RECEIVES[before], f"{key(event)} came out in state {before}"
        assert conn.state == conn.RECEIVES[before][key(event)]
    return event


#: What each side can say in the 0.x dialect; anything else has no form there.
LEGACY_SENDS = {"ServerConnection": {"Opened", "Bye", "Error"}, "ClientConnection": {"OpenPath", "Data", "EndOfData"}}


def can_send(conn: Any, event: Any) -> bool:
    """The machine's table allows ``event`` now, and the dialect has a form for it."""
    return key(event) in conn.SENDS.get(conn.state, {}) and (
        conn.framed is not False or key(event) in LEGACY_SENDS[type(conn).__name__]
    )


def send(conn: Any, event: Any) -> bytes:
    """``conn.send(event)``, checking the move against the machine's table."""
    before = conn.state
    data = conn.send(event)
    assert conn.state == conn.SENDS[before][key(event)]
    return data


def receive(conn: Any, data: bytes) -> None:
    try:
        conn.receive_data(data)
    except ProtocolError:
        assert conn.state == "ERROR"
        raise


def events_until_wait(conn: Any) -> List[Any]:
    """Every event the bytes received so far make, up to NEED_DATA or PAUSED."""
    events = []
    for _ in range(PATIENCE):
        event = next_event(conn)
        if event is NEED_DATA or event is PAUSED:
            return events
        events.append(event)
    raise AssertionError(f"{type(conn).__name__} never waits (state {conn.state})")


# -- an exchange between two parts -------------------------------------------------------------
class Pipe:
    """One direction of the socket: the bytes sent, how far the peer has read, and
    the offsets (into everything sent) at which its reads are cut."""

    def __init__(self, cuts: Sequence[int] = ()) -> None:
        self.sent = bytearray()
        self.shut = False
        self.read = 0
        self.eof_read = False
        self.cuts = sorted(set(cuts))

    def reads(self) -> List[bytes]:
        start, end = self.read, len(self.sent)
        bounds = [start, *(cut for cut in self.cuts if start < cut < end), end]
        self.read = end
        return [bytes(self.sent[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]


class Part:
    """One side of an exchange: a machine, and how its owner answers events."""

    def __init__(self, conn: Any, out: Pipe) -> None:
        self.conn = conn
        self.out = out
        self.events: List[Any] = []

    @property
    def listening(self) -> bool:
        return True

    def start(self) -> None:
        self.say(self.first())

    def first(self) -> List[Any]:
        return []

    def answer(self, event: Any) -> List[Any]:
        raise NotImplementedError

    def say(self, events: Sequence[Any]) -> None:
        for event in events:
            assert not self.out.shut, f"{key(event)} after the end"
            self.out.sent += send(self.conn, event)
            self.out.shut = self.shuts_after(event)

    def shuts_after(self, event: Any) -> bool:
        raise NotImplementedError

    def take(self, data: bytes) -> None:
        receive(self.conn, data)
        for _ in range(PATIENCE):
            if not self.listening:
                return
            event = next_event(self.conn)
            if event is NEED_DATA or event is PAUSED:
                return
            self.events.append(event)
            self.say(self.answer(event))
        raise AssertionError("the machine never waits")


class ClientPart(Part):
    """A client as 5.7 describes it: asks (OPEN, a 0.x path, STATUS or REOPEN), maps
    or declines an offered ring, then follows its plan and ends its data. In a ring
    session its DATA goes into the ring, not through the machine; a 0.x client has
    nothing but data."""

    def __init__(self, out: Pipe, request: Any, plan: Sequence[Any] = (), accept: bool = True) -> None:
        super().__init__(ClientConnection(), out)
        self.request = request
        self.plan = list(plan)
        self.accept = accept

    def first(self) -> List[Any]:
        return [self.request]

    def answer(self, event: Any) -> List[Any]:
        kind = key(event)
        if kind == "ShmOffer" and self.accept:
            return [ShmAccept(), *(e for e in self.plan if type(e) is not Data), EndOfData()]
        if kind == "ShmOffer":
            return [ShmDecline("UnsafeRing: the offered ring is not sealed against resizing"), *self.plan, EndOfData()]
        if kind == "Opened":
            return [*(e for e in self.plan if self.conn.framed or type(e) is Data), EndOfData()]
        return []

    def shuts_after(self, event: Any) -> bool:
        return self.out.shut or type(event) is EndOfData


class ServerPart(Part):
    """A server as server.py answers, minus the file: greets, opens (or refuses, or
    offers a ring), confirms socket DATA with WRITTEN, answers FLUSH and the end of
    data. ``stop_at``: the event (or ``"start"``) at which it is told to stop and
    sends the shutdown error instead of its answer (6.6). It closes when CLOSED."""

    def __init__(
        self,
        out: Pipe,
        offer: bool = False,
        refuse: Optional[BaseException] = None,
        stop_at: Optional[str] = None,
        document: Optional[dict] = None,
    ) -> None:
        super().__init__(ServerConnection(), out)
        self.offer = offer
        self.document = document
        self.refuse = refuse
        self.stop_at = stop_at
        self.ring = False
        self.written = 0

    @property
    def listening(self) -> bool:
        return self.conn.state != "CLOSED"

    def first(self) -> List[Any]:
        return self.stop() if self.stop_at == "start" else []

    def stop(self) -> List[Any]:
        socket_session = self.conn.framed and not self.ring and self.conn.state in ("DATA", "ENDED")
        return [*([Written(self.written)] if socket_session else []), Error(SHUTDOWN, errno.ESHUTDOWN)]

    def answer(self, event: Any) -> List[Any]:
        kind = key(event)
        if kind == self.stop_at:
            return self.stop()
        if kind == "Preamble":
            return [Greeting()]
        if kind in ("Open", "OpenPath"):
            if self.refuse is not None:
                return [Error(self.refuse)]
            if self.offer and kind == "Open" and event.flags & W.WANT_SHM:
                return [ShmOffer(1 << 20)]
            return [Opened(note="client asked for the socket" if kind == "Open" else "")]
        if kind == "InvalidPath":
            return [Error(event.error)]
        if kind == "StatusRequest":
            return [StatusReply(self.document or STATUS_DOCUMENT)]
        if kind == "ReopenRequest":
            return [Reopened(self.document or REOPENED_DOCUMENT)]
        if kind == "ShmAccept":
            self.ring = True
        if kind == "Data" and len(event.payload):
            self.written += len(event.payload)
            return [Written(self.written)] if self.conn.framed else []
        if kind == "Flush":
            return [Flushed(event.token)]
        if kind == "EndOfData":
            return [*([Written(self.written)] if self.conn.framed and not self.ring else []), Bye()]
        return []

    def shuts_after(self, event: Any) -> bool:
        return self.conn.state == "CLOSED"

    def take(self, data: bytes) -> None:
        super().take(data)
        if self.conn.state == "CLOSED":
            self.out.shut = True  # closed without a word (EOF during the handshake)


class Script:
    """A peer that is a fixed byte string and then EOF: a 0.x server or client, or
    one this module's ClientConnection would refuse to be."""

    listening = False

    def __init__(self, out: Pipe, data: bytes) -> None:
        self.out = out
        self.data = data
        self.conn = None
        self.events: List[Any] = []

    def start(self) -> None:
        self.out.sent += self.data
        self.out.shut = True


class Outcome(NamedTuple):
    client: Tuple[tuple, ...]  # transcripts of the events each side received
    server: Tuple[tuple, ...]
    client_state: Optional[str]
    server_state: Optional[str]
    to_server: bytes
    to_client: bytes


class Exchange(NamedTuple):
    client: Callable[[Pipe], Any]
    server: Callable[[Pipe], Any]
    client_hears: str  # event keys, in order
    server_hears: str
    to_client: Optional[bytes] = None  # when given: exactly the bytes the server sends


def deliver(pipe: Pipe, part: Any) -> bool:
    moved = False
    for data in pipe.reads():
        moved = True
        if part.listening:
            part.take(data)
    if pipe.shut and not pipe.eof_read:
        pipe.eof_read = moved = True
        if part.listening:
            part.take(b"")
    return moved


def run(exchange: Exchange, to_server_cuts: Sequence[int] = (), to_client_cuts: Sequence[int] = ()) -> Outcome:
    """Play ``exchange`` to its end; each side reads what has arrived, cut at the given offsets."""
    to_server, to_client = Pipe(to_server_cuts), Pipe(to_client_cuts)
    client_part, server_part = exchange.client(to_server), exchange.server(to_client)
    client_part.start()
    server_part.start()
    while deliver(to_server, server_part) | deliver(to_client, client_part):
        pass
    legacy = server_part.conn is not None and server_part.conn.framed is False
    return Outcome(
        transcript(client_part.events),
        transcript(server_part.events, merge_data=legacy),
        client_part.conn and client_part.conn.state,
        server_part.conn and server_part.conn.state,
        bytes(to_server.sent),
        bytes(to_client.sent),
    )


def framed_client(flags: int = 0, plan: Sequence[Any] = (), accept: bool = True) -> Callable[[Pipe], Any]:
    return lambda pipe: ClientPart(pipe, Open(PATH, flags), plan, accept)


def legacy_client(plan: Sequence[Any] = ()) -> Callable[[Pipe], Any]:
    return lambda pipe: ClientPart(pipe, OpenPath(PATH), plan)


def asking_client(request: Any) -> Callable[[Pipe], Any]:
    return lambda pipe: ClientPart(pipe, request)


def server(**options: Any) -> Callable[[Pipe], Any]:
    return lambda pipe: ServerPart(pipe, **options)


def script(data: bytes) -> Callable[[Pipe], Any]:
    return lambda pipe: Script(pipe, data)


PLAN = (
    Data(memoryview(b"first record\n")),
    Data(memoryview(b"")),
    Dropped(2),
    Flush(1),
    Data(memoryview(b"second record\n")),
    Flush(2),
)
SOCKET_HEARS = "Written Flushed Written Flushed Written Bye Closed"
PLAN_HEARD = "Data Data Dropped Flush Data Flush EndOfData"
NOT_ABSOLUTE = "ValueError: not an absolute path\0"  # a 0.x server's words (5.2)
DENIED = PermissionError(errno.EACCES, os.strerror(errno.EACCES), PATH)

EXCHANGES: Dict[str, Exchange] = {
    # 5.7: the three framed sessions, refusal, control requests
    "socket session": Exchange(
        framed_client(W.FSYNC, PLAN), server(), f"Greeting Opened {SOCKET_HEARS}", f"Preamble Open {PLAN_HEARD}"
    ),
    "ring session": Exchange(
        framed_client(W.WANT_SHM, PLAN),
        server(offer=True),
        "Greeting Opened+offer ShmOffer Flushed Flushed Bye Closed",
        "Preamble Open ShmAccept Dropped Flush Flush EndOfData",
    ),
    "ring declined": Exchange(
        framed_client(W.WANT_SHM, PLAN, accept=False),
        server(offer=True),
        f"Greeting Opened+offer ShmOffer {SOCKET_HEARS}",
        f"Preamble Open ShmDecline {PLAN_HEARD}",
    ),
    "ring not offered": Exchange(
        framed_client(W.WANT_SHM, PLAN), server(), f"Greeting Opened {SOCKET_HEARS}", f"Preamble Open {PLAN_HEARD}"
    ),
    "open refused": Exchange(
        framed_client(0, PLAN),
        server(refuse=DENIED),
        "Greeting Error Closed",
        "Preamble Open",
        GREETING + error_frame(f"PermissionError: [Errno 13] Permission denied: '{PATH}'", errno.EACCES),
    ),
    "status": Exchange(
        asking_client(StatusRequest()),
        server(),
        "Greeting StatusReply Closed",
        "Preamble StatusRequest",
        GREETING + frame(b"J", json.dumps(STATUS_DOCUMENT).encode()),
    ),
    "reopen": Exchange(
        asking_client(ReopenRequest()),
        server(),
        "Greeting Reopened Closed",
        "Preamble ReopenRequest",
        GREETING + frame(b"r", json.dumps(REOPENED_DOCUMENT).encode()),
    ),
    "pipelined after OPEN": Exchange(  # 5.7 rules: processed as data-phase frames when no ring is offered
        script(PREAMBLE + open_frame(PATH.encode()) + frame(b"D", b"abc") + frame(b"F", u64(7))),
        server(),
        "",
        "Preamble Open Data Flush EndOfData",
        GREETING
        + opened_frame(0, b"client asked for the socket")
        + frame(b"W", u64(3))
        + frame(b"f", u64(7))
        + frame(b"W", u64(3))
        + frame(b"B"),
    ),
    "framed bad path": Exchange(  # 5.5: an open error, not a protocol error
        script(PREAMBLE + open_frame(b"tmp/x")),
        server(),
        "",
        "Preamble InvalidPath",
        GREETING + error_frame("ValueError: path must be absolute, got b'tmp/x'"),
    ),
    # 3: EOF before the handshake is whole
    "EOF before any byte": Exchange(script(b""), server(), "", "Closed", b""),
    "EOF after a lone NUL": Exchange(
        script(b"\0"), server(), "", "InvalidPath", b"ValueError: path must be absolute, got b''\0"
    ),
    "EOF inside the preamble": Exchange(
        script(PREAMBLE[:5]), server(), "", "InvalidPath", b"ValueError: path must be absolute, got b''\0"
    ),
    "EOF before the first frame is whole": Exchange(
        script(PREAMBLE + open_frame(PATH.encode())[:9]), server(), "", "Preamble Closed", GREETING
    ),
    "EOF before SHM_ACCEPT": Exchange(
        script(PREAMBLE + open_frame(PATH.encode(), W.WANT_SHM)),
        server(offer=True),
        "",
        "Preamble Open Closed",
        GREETING + opened_frame(W.SHM_OFFERED) + offer_frame(),
    ),
    "0.x EOF before the path's NUL": Exchange(script(PATH.encode()), server(), "", "Closed", b""),
    # 4: the legacy dialect
    "0.x session": Exchange(
        legacy_client(PLAN), server(), "Opened Bye Closed", "OpenPath Data EndOfData", b"OK\0BYE\0"
    ),
    "0.x refused": Exchange(
        legacy_client(PLAN),
        server(refuse=DENIED),
        "Error Closed",
        "OpenPath",
        f"PermissionError: [Errno 13] Permission denied: '{PATH}'\0".encode(),
    ),
    "0.x bad path": Exchange(
        script(b"tmp/x\0"), server(), "", "InvalidPath", b"ValueError: path must be absolute, got b'tmp/x'\0"
    ),
    "0.x data before OK": Exchange(
        script(PATH.encode() + b"\0early bytes, then more"), server(), "", "OpenPath Data EndOfData", b"OK\0BYE\0"
    ),
    # 5.2 and 4.5: a framed client meets a 0.x server
    "0.x server refuses the preamble": Exchange(
        framed_client(0, PLAN), script(NOT_ABSOLUTE.encode()), "NotFramed Closed", ""
    ),
    "0.x server cut short": Exchange(framed_client(0, PLAN), script(b"ValueError: not an abs"), "NotFramed Closed", ""),
    "0.x server says nothing": Exchange(framed_client(0, PLAN), script(b""), "Closed", ""),
    "0.x server after the fallback": Exchange(
        legacy_client(PLAN), script(b"OK\0ROTATED\0OK\0BYE\0"), "Opened Bye Closed", ""
    ),
    "0.x server stops early": Exchange(
        legacy_client(PLAN), script(b"OK\0" + SHUTDOWN_TEXT.encode() + b"\0"), "Opened Error Closed", ""
    ),
    # 6.6: the shutdown error, in every state
    "stop before the dialect is known": Exchange(
        framed_client(0, PLAN), server(stop_at="start"), "NotFramed Closed", "", SHUTDOWN_TEXT.encode() + b"\0"
    ),
    "stop while the greeting is owed": Exchange(
        framed_client(0, PLAN),
        server(stop_at="Preamble"),
        "Greeting Error Closed",
        "Preamble",
        GREETING + error_frame(SHUTDOWN_TEXT, errno.ESHUTDOWN),
    ),
    "stop before OPENED": Exchange(
        framed_client(0, PLAN),
        server(stop_at="Open"),
        "Greeting Error Closed",
        "Preamble Open",
        GREETING + error_frame(SHUTDOWN_TEXT, errno.ESHUTDOWN),
    ),
    "stop in the data phase": Exchange(
        framed_client(0, PLAN),
        server(stop_at="Flush"),
        "Greeting Opened Written Written Error Closed",
        "Preamble Open Data Data Dropped Flush",
    ),
    "stop at the end of data": Exchange(
        framed_client(0, PLAN),
        server(stop_at="EndOfData"),
        "Greeting Opened Written Flushed Written Flushed Written Error Closed",
        f"Preamble Open {PLAN_HEARD}",
    ),
    "stop in a ring session": Exchange(
        framed_client(W.WANT_SHM, PLAN),
        server(offer=True, stop_at="EndOfData"),
        "Greeting Opened+offer ShmOffer Flushed Flushed Error Closed",
        "Preamble Open ShmAccept Dropped Flush Flush EndOfData",
    ),
    "stop during a status request": Exchange(
        asking_client(StatusRequest()),
        server(stop_at="StatusRequest"),
        "Greeting Error Closed",
        "Preamble StatusRequest",
    ),
    "0.x stop before OK": Exchange(
        legacy_client(PLAN), server(stop_at="OpenPath"), "Error Closed", "OpenPath", SHUTDOWN_TEXT.encode() + b"\0"
    ),
    "0.x stop at the end of data": Exchange(
        legacy_client(PLAN),
        server(stop_at="EndOfData"),
        "Opened Error Closed",
        "OpenPath Data EndOfData",
        b"OK\0" + SHUTDOWN_TEXT.encode() + b"\0",
    ),
}


def assert_split_runs_match(
    exchange: Exchange, whole: Outcome, to_server_cuts: Sequence[int], to_client_cuts: Sequence[int]
) -> None:
    split = run(exchange, to_server_cuts, to_client_cuts)
    assert split == whole, f"cut at {sorted(to_server_cuts)} (to server) and {sorted(to_client_cuts)} (to client)"


@pytest.mark.parametrize("name", EXCHANGES)
def test_each_exchange_of_5_7_cut_at_every_byte_boundary_yields_the_same_events(name):
    exchange = EXCHANGES[name]
    whole = run(exchange)
    assert " ".join(event[0] for event in whole.client) == exchange.client_hears
    assert " ".join(event[0] for event in whole.server) == exchange.server_hears
    assert whole.client_state in ("CLOSED", None) and whole.server_state in ("CLOSED", None)
    if exchange.to_client is not None:
        assert whole.to_client == exchange.to_client
    for cut in range(1, len(whole.to_server)):
        assert_split_runs_match(exchange, whole, [cut], [])
    for cut in range(1, len(whole.to_client)):
        assert_split_runs_match(exchange, whole, [], [cut])
    assert_split_runs_match(exchange, whole, range(len(whole.to_server)), range(len(whole.to_client)))


def test_a_framed_client_falls_back_to_0x_and_then_talks_to_the_same_server():
    refused = run(EXCHANGES["0.x server refuses the preamble"])
    assert refused.client[0] == ("NotFramed", NOT_ABSOLUTE.encode())
    again = run(Exchange(legacy_client(PLAN), server(), "", ""))
    assert [event[0] for event in again.client] == ["Opened", "Bye", "Closed"]
    assert again.server[1] == ("Data", b"first record\nsecond record\n")


# -- long sessions, cut where hypothesis likes -------------------------------------------
payloads = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda size, byte: bytes([byte]) * size, st.integers(0, 5000), st.integers(0, 255)),
)
plans = st.lists(
    st.one_of(
        payloads.map(lambda data: Data(memoryview(data))),
        st.integers(0, 2**64 - 1).map(Flush),
        st.integers(0, 2**64 - 1).map(Dropped),
    ),
    max_size=40,
)
documents = st.lists(st.tuples(st.text(min_size=1), st.one_of(st.none(), st.text())), max_size=30).map(
    W.reopened_document
)


@st.composite
def sessions(draw: Any) -> Exchange:
    kind = draw(st.sampled_from(["socket", "ring", "declined", "0.x", "status", "reopen"]))
    if kind in ("status", "reopen"):
        request = StatusRequest() if kind == "status" else ReopenRequest()
        stop = draw(st.sampled_from([None, key(request)]))
        return Exchange(asking_client(request), server(stop_at=stop, document=draw(documents)), "", "")
    plan = draw(plans)
    if kind == "0.x":
        stop = draw(st.sampled_from([None, "OpenPath", "EndOfData"]))  # 0.x Data events depend on the reads
        return Exchange(legacy_client(plan), server(stop_at=stop), "", "")
    stop = draw(st.sampled_from([None, "Open", "Data", "Flush", "Dropped", "EndOfData"]))
    flags = W.WANT_SHM if kind != "socket" else 0
    return Exchange(framed_client(flags, plan, accept=kind == "ring"), server(offer=True, stop_at=stop), "", "")


def cuts(length: int) -> st.SearchStrategy[List[int]]:
    return st.lists(st.integers(1, max(1, length - 1)), max_size=60) if length > 1 else st.just([])


@settings(QUICK, max_examples=120)
@given(exchange=sessions(), data=st.data())
def test_long_sessions_cut_where_hypothesis_likes_yield_the_same_events(exchange, data):
    whole = run(exchange)
    assert whole.client_state == whole.server_state == "CLOSED"
    assert whole.client[-1] == ("Closed",)
    to_server_cuts = data.draw(cuts(len(whole.to_server)))
    assert_split_runs_match(exchange, whole, to_server_cuts, data.draw(cuts(len(whole.to_client))))


# -- machines in each state ---------------------------------------------------------------------
#: How to bring a machine to each state: bytes it receives (events taken until it
#: waits) and events it sends. "<STATE> 0.x" is that state in the 0.x dialect.
SERVER_PATHS: Dict[str, list] = {"PREAMBLE": []}
SERVER_PATHS["GREETING"] = [PREAMBLE]
SERVER_PATHS["OPEN"] = [PREAMBLE, Greeting()]
SERVER_PATHS["OPENING"] = [*SERVER_PATHS["OPEN"], open_frame(PATH.encode(), W.WANT_SHM)]
SERVER_PATHS["OFFERED"] = [*SERVER_PATHS["OPENING"], ShmOffer(1 << 20)]
SERVER_PATHS["DATA"] = [*SERVER_PATHS["OPENING"], Opened()]
SERVER_PATHS["ENDED"] = [*SERVER_PATHS["DATA"], b""]
SERVER_PATHS["REQUESTED"] = [*SERVER_PATHS["OPEN"], frame(b"Q")]
SERVER_PATHS["ERROR"] = [*SERVER_PATHS["OPEN"], frame(b"Z")]
SERVER_PATHS["CLOSED"] = [*SERVER_PATHS["OPEN"], b""]
SERVER_PATHS["OPENING 0.x"] = [PATH.encode() + b"\0"]
SERVER_PATHS["DATA 0.x"] = [*SERVER_PATHS["OPENING 0.x"], Opened()]
SERVER_PATHS["ENDED 0.x"] = [*SERVER_PATHS["DATA 0.x"], b""]

CLIENT_PATHS: Dict[str, list] = {"IDLE": []}
CLIENT_PATHS["GREETING"] = [Open(PATH, W.WANT_SHM)]
CLIENT_PATHS["ASKING"] = [StatusRequest()]
CLIENT_PATHS["OPENING"] = [*CLIENT_PATHS["GREETING"], GREETING]
CLIENT_PATHS["OFFERED"] = [*CLIENT_PATHS["OPENING"], opened_frame(W.SHM_OFFERED)]
CLIENT_PATHS["MAPPING"] = [*CLIENT_PATHS["OFFERED"], offer_frame()]
CLIENT_PATHS["RING"] = [*CLIENT_PATHS["MAPPING"], ShmAccept()]
CLIENT_PATHS["SOCKET"] = [*CLIENT_PATHS["OPENING"], opened_frame()]
CLIENT_PATHS["CLOSING"] = [*CLIENT_PATHS["SOCKET"], EndOfData()]
CLIENT_PATHS["REQUESTED"] = [*CLIENT_PATHS["ASKING"], GREETING]
CLIENT_PATHS["CLOSED"] = [*CLIENT_PATHS["SOCKET"], error_frame("OSError: [Errno 28] No space left on device", 28)]
CLIENT_PATHS["ERROR"] = [*CLIENT_PATHS["SOCKET"], frame(b"Z")]
CLIENT_PATHS["OPENING 0.x"] = [OpenPath(PATH)]
CLIENT_PATHS["SOCKET 0.x"] = [*CLIENT_PATHS["OPENING 0.x"], b"OK\0"]
CLIENT_PATHS["CLOSING 0.x"] = [*CLIENT_PATHS["SOCKET 0.x"], EndOfData()]


def drive(conn: Any, path: Sequence[Any], state: str) -> Any:
    for step in path:
        if isinstance(step, bytes):
            try:
                receive(conn, step)
                events_until_wait(conn)
            except ProtocolError:
                assert state == "ERROR"
        else:
            send(conn, step)
    assert conn.state == state.split()[0]
    if state.endswith("0.x"):
        assert conn.framed is False
    return conn


def server_in(state: str) -> ServerConnection:
    return drive(ServerConnection(), SERVER_PATHS[state], state)


def client_in(state: str) -> ClientConnection:
    return drive(ClientConnection(), CLIENT_PATHS[state], state)


def test_the_state_helpers_reach_every_state_of_the_tables():
    assert {state.split()[0] for state in SERVER_PATHS} == set(SERVER_RECEIVES) == set(SERVER_SENDS)
    assert {state.split()[0] for state in CLIENT_PATHS} == {*CLIENT_RECEIVES, "ERROR"} == {*CLIENT_SENDS, "ERROR"}
    for state in SERVER_PATHS:
        server_in(state)
    for state in CLIENT_PATHS:
        client_in(state)


# -- random input --------------------------------------------------------------------------------
def wire_bytes(payloads: Dict[bytes, st.SearchStrategy[bytes]], texts: Sequence[bytes]) -> st.SearchStrategy:
    """Bytes as a peer might send them: whole frames of the types ``payloads`` maps
    (a payload made for the type, or any bytes), frames of other types, oversize
    lengths, frames cut short, the dialects' texts, and noise."""
    allowed = {letter[0] for letter in payloads}
    whole = st.sampled_from(sorted(payloads)).flatmap(
        lambda letter: st.one_of(payloads[letter], payloads[letter], st.binary(max_size=24)).map(
            lambda payload: frame(letter, payload)
        )
    )
    foreign = st.builds(
        lambda ftype, payload: frame(bytes([ftype]), payload),
        st.integers(0, 255).filter(lambda ftype: ftype not in allowed),
        st.binary(max_size=8),
    )
    oversize = st.builds(
        lambda ftype, length: bytes([ftype]) + struct.pack("<I", length),
        st.integers(0, 255),
        st.integers(W.MAX_PAYLOAD + 1, 2**32 - 1),
    )
    cut_short = whole.flatmap(lambda data: st.integers(0, len(data) - 1).map(lambda end: data[:end]))
    piece = st.one_of(whole, whole, whole, foreign, oversize, cut_short, st.sampled_from(texts), st.binary(max_size=16))
    return st.lists(piece, max_size=10).map(b"".join)


U64S = st.integers(0, 2**64 - 1).map(u64)
NOTHING = st.just(b"")
TO_SERVER_PAYLOADS = {
    b"O": st.builds(
        lambda version, flags, path: struct.pack("<HH", version, flags) + path,
        st.integers(0, 4),
        st.integers(0, 0xFFFF),
        st.sampled_from([PATH.encode(), b"tmp/x", b"", b"/a\0b", b"/\xff\xfe", b"/" + b"a" * 4100]),
    ),
    b"D": st.binary(max_size=64),
    b"F": U64S,
    b"X": U64S,
    b"A": NOTHING,
    b"N": st.binary(max_size=16),
    b"Q": NOTHING,
    b"R": NOTHING,
}
TO_SERVER = wire_bytes(TO_SERVER_PAYLOADS, [PREAMBLE, PREAMBLE[:3], PATH.encode() + b"\0", b"\0", b"/" * 4200])
ERROR_TEXTS = [
    SHUTDOWN_TEXT,
    "FileNotFoundError: [Errno 2] No such file or directory: '/x'",
    "OSError: [Errno 99999999999999999999] far",
    "OSError: [Errno \u00b2] superscript",
    "UnicodeDecodeError: needs five arguments",
    "ExceptionGroup: needs two",
    "RingCorrupt: not a builtin",
    "KeyboardInterrupt: not an Exception",
    "no separator",
    "ValueError: protocol error: x",
]
DOCUMENTS = st.sampled_from(
    [b"{}", b"[]", b"null", b'{"reopened": [], "failed": []}', b'{"reopened": 1}', b"\xff", b"[" * 100_000]
)
TO_CLIENT_PAYLOADS = {
    b"K": st.builds(
        lambda version, flags, note: struct.pack("<HH", version, flags) + note,
        st.integers(0, 4),
        st.integers(0, 0xFFFF),
        st.binary(max_size=8),
    ),
    b"S": st.builds(
        lambda capacity, names: u64(capacity) + names,
        st.integers(0, 2**64 - 1),
        st.sampled_from([b"", b"", b"/r\0/b", b"\0", b"\xff"]),  # protocol 3: nothing after the capacity
    ),
    b"E": st.builds(
        lambda code, text: struct.pack("<I", code) + text.encode(),
        st.integers(0, 2**32 - 1),
        st.sampled_from(ERROR_TEXTS),
    ),
    b"J": DOCUMENTS,
    b"r": DOCUMENTS,
    b"f": U64S,
    b"W": U64S,
    b"B": NOTHING,
}
TO_CLIENT = wire_bytes(
    TO_CLIENT_PAYLOADS,
    [
        GREETING,
        GREETING[:3],
        b"OK\0",
        b"BYE\0",
        b"ROTATED\0",
        NOT_ABSOLUTE.encode(),
        *(text.encode() + b"\0" for text in ERROR_TEXTS),
    ],
)


def test_the_random_frames_cover_every_frame_type_of_each_direction():
    assert {letter[0] for letter in TO_SERVER_PAYLOADS} == W.CLIENT_FRAMES
    assert {letter[0] for letter in TO_CLIENT_PAYLOADS} == W.SERVER_FRAMES


def chunked(data: bytes, offsets: Sequence[int]) -> List[bytes]:
    bounds = [0, *sorted(set(offsets)), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def server_answer(conn: ServerConnection, last: Any, offer: bool) -> Optional[Any]:
    """What server.py says when the machine waits for it, or None if nothing."""
    if conn.state == "GREETING":
        return Greeting()
    if conn.state == "OPENING":
        if type(last) is InvalidPath:
            return Error(last.error)
        return ShmOffer(1 << 20) if offer and conn.framed else Opened()
    return {"ENDED": Bye(), "REQUESTED": StatusReply({})}.get(conn.state)


def serve(conn: ServerConnection, offer: bool) -> None:
    last = None
    for _ in range(PATIENCE):
        event = next_event(conn)
        if event is NEED_DATA:
            return
        if event is PAUSED:
            answer = server_answer(conn, last, offer)
            if answer is None:
                return
            send(conn, answer)
        else:
            last = event
    raise AssertionError("the server machine never waits")


RANDOM_SERVER_STARTS = [
    "PREAMBLE",
    "GREETING",
    "OPEN",
    "OPENING",
    "OFFERED",
    "DATA",
    "REQUESTED",
    "OPENING 0.x",
    "DATA 0.x",
]


@settings(QUICK, max_examples=800)
@given(
    start=st.sampled_from(RANDOM_SERVER_STARTS),
    stream=TO_SERVER,
    offer=st.booleans(),
    eof=st.booleans(),
    data=st.data(),
)
def test_random_bytes_to_a_server_raise_only_protocol_errors_and_move_only_by_its_tables(
    start, stream, offer, eof, data
):
    conn = server_in(start)
    reads = chunked(stream, data.draw(cuts(len(stream))))
    for chunk in reads + [b""] * eof:
        if conn.state == "CLOSED":
            break  # server.py closes the socket: nothing more is read
        try:
            receive(conn, chunk)
            serve(conn, offer)
        except ProtocolError as exc:
            assert conn.next_event() is PAUSED
            answer = send(conn, Error(exc))
            text = f"ValueError: protocol error: {exc}".encode()
            assert answer.endswith(text if conn.framed else text + b"\0")
            assert conn.next_event() is PAUSED
    assert conn.state in SERVER_RECEIVES


def listen(conn: ClientConnection) -> None:
    """Take events until the machine waits; map an offered ring as the transports do."""
    for _ in range(PATIENCE):
        event = next_event(conn)
        if event is NEED_DATA or event is PAUSED:
            return
        if conn.state == "MAPPING":
            send(conn, ShmAccept())
    raise AssertionError("the client machine never waits")


RANDOM_CLIENT_STARTS = [state for state in CLIENT_PATHS if state not in ("IDLE", "ERROR")]
CLIENT_SAMPLES = [Data(memoryview(b"x")), Flush(9), Dropped(1), EndOfData(), ShmAccept(), ShmDecline("no")]


@settings(QUICK, max_examples=800)
@given(
    start=st.sampled_from(RANDOM_CLIENT_STARTS),
    stream=TO_CLIENT,
    eof=st.booleans(),
    sends=st.lists(st.sampled_from(CLIENT_SAMPLES)),
    data=st.data(),
)
def test_random_bytes_to_a_client_raise_only_protocol_errors_and_move_only_by_its_tables(
    start, stream, eof, sends, data
):
    conn = client_in(start)
    reads = chunked(stream, data.draw(cuts(len(stream))))
    for index, chunk in enumerate(reads + [b""] * eof):
        if index < len(sends) and can_send(conn, sends[index]):
            send(conn, sends[index])  # the owner talks between reads
        try:
            receive(conn, chunk)
            listen(conn)
        except ProtocolError:
            assert conn.next_event() is PAUSED
            assert conn.next_event() is PAUSED
    assert conn.state in CLIENT_RECEIVES or conn.state == "ERROR"


# -- errors: 6.3, 6.4 ----------------------------------------------------------------------------
def round_trip(exc: BaseException, dialect: str, phase: str, code: Optional[int] = None) -> Tuple[bytes, Any]:
    """``exc`` sent by a server machine at open or in the data phase, and the
    exception a client machine in the matching state makes of the bytes."""
    suffix = " 0.x" if dialect == "0.x" else ""
    sender = server_in(("OPENING" if phase == "open" else "DATA") + suffix)
    receiver = client_in(("OPENING" if phase == "open" else "SOCKET") + suffix)
    data = send(sender, Error(exc, code))
    assert sender.state == "CLOSED"
    receive(receiver, data)
    receive(receiver, b"")
    events = events_until_wait(receiver)
    assert [key(event) for event in events] == ["Error", "Closed"]
    assert receiver.state == "CLOSED"
    return data, events[0].exception


def oserror(code: int, path: str = PATH) -> OSError:
    return OSError(code, os.strerror(code), path)


OPEN_ERRORS = [
    ValueError("path must be absolute, got b'tmp/x'"),
    ValueError("path must be absolute, got b''"),
    ValueError("path contains a NUL byte"),
    ValueError("path of 5005 bytes is longer than PATH_MAX (4096)"),
    ValueError(f"no NUL within {W.PATH_MAX} bytes: path too long or not a path"),
    oserror(errno.ENOENT, "/nonexist/x"),
    oserror(errno.ENOENT, "/nonexist\udcff/a"),
    oserror(errno.EISDIR, "/tmp"),
    oserror(errno.ENOTDIR, "/etc/passwd/x"),
    oserror(errno.EACCES),
    oserror(errno.EPERM),
    *(
        oserror(code)
        for code in (
            errno.ENAMETOOLONG,
            errno.ELOOP,
            errno.EROFS,
            errno.ENOSPC,
            errno.EDQUOT,
            errno.EMFILE,
            errno.ENXIO,
        )
    ),
    TimeoutError("no handshake within 10 s"),
]


@pytest.mark.parametrize("dialect", ["framed", "0.x"])
@pytest.mark.parametrize("exc", OPEN_ERRORS, ids=lambda exc: f"{type(exc).__name__}-{getattr(exc, 'errno', 0)}")
def test_each_open_error_of_6_4_reaches_the_client_as_the_same_exception(exc, dialect):
    data, received = round_trip(exc, dialect, "open")
    text = f"{type(exc).__name__}: {exc}"
    if dialect == "framed":
        assert data == error_frame(text, getattr(exc, "errno", None) or 0)
    else:
        assert data == text.encode() + b"\0"
    assert (type(received), getattr(received, "errno", None), str(received)) == (
        type(exc),
        getattr(exc, "errno", None),
        str(exc),
    )


#: 6.3's table: every class an error from a system call on the client's file can carry.
CLASS_ERRNOS = {
    FileNotFoundError: ["ENOENT"],
    PermissionError: ["EPERM", "EACCES"],
    IsADirectoryError: ["EISDIR"],
    NotADirectoryError: ["ENOTDIR"],
    BrokenPipeError: ["EPIPE", "ESHUTDOWN"],
    FileExistsError: ["EEXIST"],
    BlockingIOError: ["EAGAIN", "EALREADY", "EINPROGRESS"],
    InterruptedError: ["EINTR"],
    ChildProcessError: ["ECHILD"],
    ProcessLookupError: ["ESRCH"],
    ConnectionAbortedError: ["ECONNABORTED"],
    ConnectionRefusedError: ["ECONNREFUSED"],
    ConnectionResetError: ["ECONNRESET"],
    TimeoutError: ["ETIMEDOUT"],
    OSError: ["EIO", "ENXIO", "EMFILE", "EFBIG", "ENOSPC", "EROFS", "ENAMETOOLONG", "ELOOP", "EDQUOT"],
}
CLASS_ERRNO_CASES = [(cls, name) for cls, names in CLASS_ERRNOS.items() for name in names]


def test_every_errno_python_gives_its_own_class_is_in_the_6_3_table():
    listed = {getattr(errno, name): cls for cls, name in CLASS_ERRNO_CASES}
    for code in range(1, 200):
        cls = type(OSError(code, "x"))
        if cls is not OSError:
            assert listed.get(code) is cls, f"errno {code} ({errno.errorcode.get(code)}) makes {cls.__name__}"


@pytest.mark.parametrize("dialect", ["framed", "0.x"])
@pytest.mark.parametrize("cls,name", CLASS_ERRNO_CASES, ids=[f"{c.__name__}-{n}" for c, n in CLASS_ERRNO_CASES])
def test_each_class_and_errno_of_6_3_reaches_the_client_as_the_same_exception(cls, name, dialect):
    exc = oserror(getattr(errno, name))
    assert type(exc) is cls
    data, received = round_trip(exc, dialect, "data")
    if dialect == "framed":
        assert data[:9] == b"E" + struct.pack("<I", len(data) - 5) + struct.pack("<I", exc.errno)
    assert (type(received), received.errno, str(received)) == (cls, exc.errno, str(exc))


@pytest.mark.parametrize("phase", ["open", "data"])
def test_the_shutdown_error_carries_eshutdown_framed_and_only_its_text_in_0x(phase):
    data, received = round_trip(SHUTDOWN, "framed", phase, errno.ESHUTDOWN)
    assert data == error_frame(SHUTDOWN_TEXT, 108)
    # 6.3 step 3: with an errno the client builds OSError(108, ...), which Python makes a BrokenPipeError
    assert (type(received), received.errno, received.strerror) == (BrokenPipeError, 108, "offlog server exited")
    data, received = round_trip(SHUTDOWN, "0.x", phase, errno.ESHUTDOWN)
    assert data == b"OSError: offlog server exited\0"
    assert (type(received), received.errno, str(received)) == (OSError, None, "offlog server exited")


@pytest.mark.parametrize("dialect", ["framed", "0.x"])
def test_protocol_error_is_no_value_error_but_travels_as_one(dialect):
    assert not issubclass(ProtocolError, ValueError)
    data, received = round_trip(ProtocolError("OPEN frame too short"), dialect, "open")
    text = b"ValueError: protocol error: OPEN frame too short"
    assert data == (frame(b"E", b"\0\0\0\0" + text) if dialect == "framed" else text + b"\0")
    assert type(received) is ValueError and str(received) == "protocol error: OPEN frame too short"


class RingCorrupt(Exception):
    """A class a client cannot look up among the builtins."""


@pytest.mark.parametrize("dialect", ["framed", "0.x"])
def test_a_class_outside_builtins_arrives_as_oserror_with_the_whole_text(dialect):
    _, received = round_trip(RingCorrupt("head past tail"), dialect, "data")
    assert type(received) is OSError and str(received) == "RingCorrupt: head past tail"


#: Builtin exception classes whose constructor needs more than one message.
NOT_FROM_A_MESSAGE = ["UnicodeDecodeError", "UnicodeEncodeError", "UnicodeTranslateError", "ExceptionGroup"]


@pytest.mark.parametrize("dialect", ["framed", "0.x"])
@pytest.mark.parametrize("name", NOT_FROM_A_MESSAGE)
def test_a_builtin_class_that_cannot_be_built_from_a_message_arrives_as_oserror(name, dialect):
    conn = client_in("SOCKET" if dialect == "framed" else "SOCKET 0.x")
    text = f"{name}: 'utf-8' codec can't decode byte 0xff"
    receive(conn, error_frame(text, 5) if dialect == "framed" else text.encode() + b"\0")
    (event,) = events_until_wait(conn)
    assert type(event.exception) is OSError and str(event.exception).endswith(text)
    assert event.exception.errno == (5 if dialect == "framed" else None)


@pytest.mark.parametrize("number", ["\u00b2", "\u0662", "5x", ""])
def test_an_errno_prefix_that_is_not_ascii_digits_stays_in_the_message(number):
    conn = client_in("SOCKET 0.x")
    receive(conn, f"OSError: [Errno {number}] odd\0".encode())
    (event,) = events_until_wait(conn)
    assert type(event.exception) is OSError and str(event.exception) == f"[Errno {number}] odd"


def test_a_0x_error_text_has_its_nuls_escaped_and_ends_in_one():
    data, received = round_trip(ValueError("path contains a NUL byte: '/a\0b'"), "0.x", "open")
    assert data == b"ValueError: path contains a NUL byte: '/a\\0b'\0"
    assert str(received) == "path contains a NUL byte: '/a\\0b'"


@pytest.mark.parametrize(
    "dialect,sent,text",
    [
        ("0.x", b"tmp/x\0", "path must be absolute, got b'tmp/x'"),
        ("0.x", b"rel\xff\0", "path must be absolute, got b'rel\\xff'"),
        ("0.x", b"\0", "path must be absolute, got b''"),
        ("0.x", b"/" + b"a" * 5004 + b"\0", "path of 5005 bytes is longer than PATH_MAX (4096)"),
        ("0.x", b"/" + b"a" * 4095, "no NUL within 4096 bytes: path too long or not a path"),
        ("framed", open_frame(b"tmp/x"), "path must be absolute, got b'tmp/x'"),
        ("framed", open_frame(b""), "path must be absolute, got b''"),
        ("framed", open_frame(b"/a\0b"), "path contains a NUL byte"),
        ("framed", open_frame(b"/" + b"a" * 5004), "path of 5005 bytes is longer than PATH_MAX (4096)"),
        ("framed", open_frame(b"/" + b"a" * 4095), "path of 4096 bytes is longer than PATH_MAX (4096)"),
    ],
)
def test_a_bad_path_is_an_open_error_with_the_6_4_text(dialect, sent, text):
    conn = server_in("OPEN" if dialect == "framed" else "PREAMBLE")
    receive(conn, sent)
    if dialect == "0.x":
        receive(conn, b"")  # a lone NUL is an empty path only once EOF says it is no preamble (3)
    (event,) = [event for event in events_until_wait(conn) if type(event) is not Preamble]
    assert type(event) is InvalidPath and type(event.error) is ValueError and str(event.error) == text
    data = send(conn, Error(event.error))
    assert data == (error_frame(f"ValueError: {text}") if dialect == "framed" else f"ValueError: {text}\0".encode())


def test_a_path_of_4095_bytes_is_opened():
    conn = server_in("OPEN")
    receive(conn, open_frame(b"/" + b"a" * 4094))
    assert [key(event) for event in events_until_wait(conn)] == ["Open"]
    conn = server_in("PREAMBLE")
    receive(conn, b"/" + b"a" * 4094 + b"\0")
    assert [key(event) for event in events_until_wait(conn)] == ["OpenPath"]


# -- 5.9: every protocol error, its detail and its ERROR frame -----------------------------------
def refused(conn: ServerConnection, data: bytes) -> str:
    """Feed ``data`` to a server machine; the ProtocolError's text, checking its ERROR frame."""
    with pytest.raises(ProtocolError) as caught:
        receive(conn, data)
        events_until_wait(conn)
    assert conn.state == "ERROR"
    detail = str(caught.value)
    assert send(conn, Error(caught.value)) == protocol_error_frame(detail)
    assert conn.state == "CLOSED"
    return detail


FRAMED_STATES = ["OPEN", "OFFERED", "DATA"]
CLIENT_TYPES = sorted(W.CLIENT_FRAMES)


@pytest.mark.parametrize("state", FRAMED_STATES)
def test_a_type_that_is_not_a_client_type_is_refused_by_its_header_in_hex(state):
    assert W.CLIENT_FRAMES == frozenset(b"ODFANXQR")
    for ftype in set(range(256)) - W.CLIENT_FRAMES:
        header = bytes([ftype]) + struct.pack("<I", 3)
        assert refused(server_in(state), header) == f"unexpected frame type 0x{ftype:02x}"
    assert refused(server_in(state), frame(b"Z")) == "unexpected frame type 0x5a"
    assert refused(server_in(state), frame(b"W", u64(1))) == "unexpected frame type 0x57"


@pytest.mark.parametrize("state", FRAMED_STATES)
@pytest.mark.parametrize("length", [W.MAX_PAYLOAD + 1, 2**32 - 1])
def test_a_length_above_64_mib_is_refused_by_its_header(state, length):
    assert W.MAX_PAYLOAD == 67_108_864
    for ftype in CLIENT_TYPES:
        header = bytes([ftype]) + struct.pack("<I", length)
        assert refused(server_in(state), header) == f"frame of {length} bytes exceeds 67108864"


#: 5.9: what each framed server state says of a client frame it does not accept.
UNEXPECTED = {
    "OPEN": lambda letter: "the first frame must be OPEN",
    "OFFERED": lambda letter: "expected SHM_ACCEPT or SHM_DECLINE",
    "DATA": lambda letter: f"unexpected frame {letter!r} after the handshake",
}
#: A well-formed payload of each client frame type.
CLIENT_FRAME_SAMPLES = {
    b"O": open_frame(PATH.encode()),
    b"D": frame(b"D", b"bytes"),
    b"F": frame(b"F", u64(1)),
    b"A": frame(b"A"),
    b"N": frame(b"N", b"not sealed"),
    b"X": frame(b"X", u64(1)),
    b"Q": frame(b"Q"),
    b"R": frame(b"R"),
}
EVENT_OF_TYPE = {
    b"O": "Open",
    b"D": "Data",
    b"F": "Flush",
    b"A": "ShmAccept",
    b"N": "ShmDecline",
    b"X": "Dropped",
    b"Q": "StatusRequest",
    b"R": "ReopenRequest",
}
RECEIVE_CASES = [(state, letter) for state in FRAMED_STATES for letter in sorted(CLIENT_FRAME_SAMPLES)]


@pytest.mark.parametrize("state,letter", RECEIVE_CASES, ids=[f"{s}-{t.decode()}" for s, t in RECEIVE_CASES])
def test_a_client_frame_is_taken_as_the_server_table_says_or_refused_with_the_5_9_detail(state, letter):
    assert set(CLIENT_FRAME_SAMPLES) == {bytes([ftype]) for ftype in W.CLIENT_FRAMES}
    conn = server_in(state)
    name = EVENT_OF_TYPE[letter]
    if name in SERVER_RECEIVES[state]:
        receive(conn, CLIENT_FRAME_SAMPLES[letter])
        assert [key(event) for event in events_until_wait(conn)] == [name]
        assert conn.state == SERVER_RECEIVES[state][name]
    else:
        assert refused(conn, CLIENT_FRAME_SAMPLES[letter]) == UNEXPECTED[state](letter.decode())


def test_the_frames_5_9_lists_as_unexpected_are_those_the_server_table_leaves_out():
    left_out = {
        state: {letter for letter, name in EVENT_OF_TYPE.items() if name not in SERVER_RECEIVES[state]}
        for state in FRAMED_STATES
    }
    assert left_out == {
        "OPEN": {b"D", b"F", b"A", b"N", b"X"},
        "OFFERED": {b"O", b"D", b"F", b"X", b"Q", b"R"},
        "DATA": {b"O", b"A", b"N", b"Q", b"R"},
    }


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_an_open_payload_shorter_than_4_bytes_is_too_short(length):
    assert refused(server_in("OPEN"), frame(b"O", b"\2\0\0"[:length])) == "OPEN frame too short"


@pytest.mark.parametrize("version", [0, 1])
def test_an_open_version_below_2_is_not_supported(version):
    detail = refused(server_in("OPEN"), open_frame(PATH.encode(), version=version))
    assert detail == f"protocol version {version} is not supported (need 2)"


def test_an_open_version_above_3_is_taken_and_answered_in_version_3():
    """(5.8) The server speaks the lower of the two versions."""
    conn = server_in("OPEN")
    receive(conn, open_frame(PATH.encode(), W.WANT_SHM, version=4))
    assert said(events_until_wait(conn)[0]) == ("Open", PATH, W.WANT_SHM, 4)
    assert conn.version == 3
    assert send(conn, ShmOffer(1 << 20)) == opened_frame(W.SHM_OFFERED) + offer_frame()


def test_a_version_2_client_is_answered_in_version_2_and_never_offered_a_sealed_ring():
    """(5.8) A version-2 client knew only named rings: the machine refuses to offer it one,
    and to answer it in a version above its own; OPENED version 2 with a note is its answer."""
    conn = server_in("OPEN")
    receive(conn, open_frame(PATH.encode(), W.WANT_SHM, version=2))
    assert said(events_until_wait(conn)[0]) == ("Open", PATH, W.WANT_SHM, 2)
    assert conn.version == 2
    with pytest.raises(ProtocolError, match="^cannot offer a sealed ring to a client of version 2$"):
        conn.send(ShmOffer(1 << 20))
    with pytest.raises(ProtocolError, match="^cannot send OPENED of version 3 to a client of version 2$"):
        conn.send(Opened())
    assert conn.state == "OPENING"
    note = "client too old for sealed rings (protocol 2)"
    assert send(conn, Opened(note=note, version=2)) == opened_frame(0, note.encode(), version=2)


def test_a_version_2_servers_offer_is_read_as_its_capacity_alone():
    """(5.8) A version-3 client takes a version-2 server's OPENED; the names in its
    SHM_OFFER are read past (the client declines such a ring, never opening a name)."""
    conn = client_in("OPENING")
    receive(conn, opened_frame(W.SHM_OFFERED, version=2) + frame(b"S", u64(1 << 20) + b"/r.ring\0/r.bell"))
    assert [said(event) for event in events_until_wait(conn)] == [("Opened+offer", 1, "", 2), ("ShmOffer", 1 << 20)]
    assert (conn.version, conn.state) == (2, "MAPPING")


@pytest.mark.parametrize("letter", [b"F", b"X"])
@pytest.mark.parametrize("length", [0, 1, 4, 7, 9, 16])
def test_a_flush_or_dropped_payload_that_is_not_8_bytes_is_refused(letter, length):
    assert refused(server_in("DATA"), frame(letter, bytes(length))) == "expected an 8-byte payload"


@pytest.mark.parametrize(
    "tail",
    [b"D", b"D\x05\0", b"D\x05\0\0\0", b"D\x05\0\0\0abc", frame(b"F", u64(1))[:12], b"A\0\0\0"],
    ids=["type", "half-length", "header-less-one", "payload-short", "flush-short", "accept-header-short"],
)
def test_end_of_data_inside_a_frame_discards_it_and_counts_its_bytes(tail):
    conn = server_in("DATA")
    receive(conn, frame(b"D", b"whole") + tail)
    events = events_until_wait(conn)
    assert said(events[0]) == ("Data", b"whole")
    assert refused(conn, b"") == f"end of data in the middle of a frame: {len(tail)} bytes discarded"


@pytest.mark.parametrize("state", ["OPEN", "OFFERED"])
def test_end_of_data_inside_a_handshake_frame_closes_without_a_word(state):
    conn = server_in(state)
    receive(conn, b"O\x10\0")
    receive(conn, b"")
    assert [key(event) for event in events_until_wait(conn)] == ["Closed"]
    assert conn.state == "CLOSED"


def answer_reads(reads: Sequence[bytes], read_before_greeting: bool) -> bytes:
    """What a server machine's owner sends for ``reads``: it greets, opens the socket
    session and answers a ProtocolError; ``read_before_greeting``: it reads the next
    bytes after seeing the preamble and before sending the greeting."""
    conn, out, pending = ServerConnection(), bytearray(), list(reads)
    try:
        while pending:
            receive(conn, pending.pop(0))
            for _ in range(PATIENCE):
                event = next_event(conn)
                if event is NEED_DATA or event is PAUSED:
                    break
                if type(event) is Preamble:
                    if read_before_greeting and pending:
                        receive(conn, pending.pop(0))
                    out += send(conn, Greeting())
                elif type(event) is Open:
                    out += send(conn, Opened())
    except ProtocolError as exc:
        assert str(exc) == "unexpected frame type 0x5a"
        out += send(conn, Error(exc))
    return bytes(out)


def test_a_bad_header_pipelined_with_the_preamble_is_answered_after_the_greeting():
    """5.9: the ERROR may follow ``OFFLOG\\0`` directly, with no OPENED; it never comes
    without the greeting, however the bytes arrive and whenever the owner reads them."""
    sent = PREAMBLE + open_frame(PATH.encode()) + frame(b"Z")
    error = protocol_error_frame("unexpected frame type 0x5a")
    assert answer_reads([sent], False) == GREETING + error
    for cut in range(1, len(sent)):
        for read_before_greeting in (False, True):
            answer = answer_reads([sent[:cut], sent[cut:]], read_before_greeting)
            assert answer in (GREETING + error, GREETING + opened_frame() + error), (cut, read_before_greeting)


def test_bytes_after_the_end_of_file_are_the_owners_mistake():
    conn = server_in("DATA")
    receive(conn, b"")
    with pytest.raises(ProtocolError, match="bytes after the end of file in state DATA"):
        conn.receive_data(b"D")


# -- transition tables: sends -------------------------------------------------------------------
#: One event of each key either side can send.
SAMPLES = {
    "Open": Open(PATH),
    "OpenPath": OpenPath(PATH),
    "StatusRequest": StatusRequest(),
    "ReopenRequest": ReopenRequest(),
    "ShmAccept": ShmAccept(),
    "ShmDecline": ShmDecline("UnsafeRing: not sealed"),
    "Data": Data(memoryview(b"bytes")),
    "Flush": Flush(1),
    "Dropped": Dropped(1),
    "EndOfData": EndOfData(),
    "Greeting": Greeting(),
    "Opened": Opened(),
    "Opened+offer": Opened(W.SHM_OFFERED),
    "ShmOffer": ShmOffer(1 << 20),
    "Flushed": Flushed(1),
    "Written": Written(1),
    "Error": Error(OSError(errno.EIO, "Input/output error")),
    "Bye": Bye(),
    "StatusReply": StatusReply(STATUS_DOCUMENT),
    "Reopened": Reopened(REOPENED_DOCUMENT),
    "Preamble": Preamble(),
    "InvalidPath": InvalidPath(ValueError("path must be absolute, got b'x'")),
    "NotFramed": NotFramed(b"x\0"),
    "Closed": Closed(),
}
SIDES = {"server": (SERVER_SENDS, server_in, SERVER_PATHS), "client": (CLIENT_SENDS, client_in, CLIENT_PATHS)}
SEND_CASES = [(side, state) for side, (_, _, paths) in SIDES.items() for state in paths]


def test_the_samples_cover_every_event_the_tables_name():
    named = {
        name
        for table in (SERVER_SENDS, SERVER_RECEIVES, CLIENT_SENDS, CLIENT_RECEIVES)
        for moves in table.values()
        for name in moves
    }
    assert named <= set(SAMPLES)
    assert all(key(event) == name for name, event in SAMPLES.items())


@pytest.mark.parametrize("side,state", SEND_CASES, ids=[f"{side}-{state}" for side, state in SEND_CASES])
def test_a_send_the_table_does_not_list_is_refused_naming_state_and_event(side, state):
    _, machine_in, _ = SIDES[side]
    for name, event in SAMPLES.items():
        conn = machine_in(state)
        if can_send(conn, event):
            send(conn, event)  # checks the move against the table
            continue
        with pytest.raises(ProtocolError) as caught:
            conn.send(event)
        words = str(caught.value).split()
        assert name in words and conn.state in words, str(caught.value)
        assert conn.state == state.split()[0], "a refused send moves nothing"


# -- transition tables: what a client receives ----------------------------------------------------
SERVER_FRAME_SAMPLES = {
    "Opened": opened_frame(),
    "Opened+offer": opened_frame(W.SHM_OFFERED),
    "ShmOffer": offer_frame(),
    "Flushed": frame(b"f", u64(1)),
    "Written": frame(b"W", u64(1)),
    "Error": error_frame("OSError: [Errno 5] Input/output error", 5),
    "Bye": frame(b"B"),
    "StatusReply": frame(b"J", b"{}"),
    "Reopened": frame(b"r", b'{"reopened": [], "failed": []}'),
}
FRAMED_CLIENT_STATES = ["OPENING", "OFFERED", "MAPPING", "SOCKET", "RING", "CLOSING", "REQUESTED", "CLOSED"]


@pytest.mark.parametrize("state", FRAMED_CLIENT_STATES)
def test_a_server_frame_moves_the_client_as_its_table_says_or_is_refused_naming_state_and_event(state):
    for name, data in SERVER_FRAME_SAMPLES.items():
        conn = client_in(state)
        if name in CLIENT_RECEIVES[state]:
            receive(conn, data)
            assert [key(event) for event in events_until_wait(conn)] == [name]
            assert conn.state == CLIENT_RECEIVES[state][name]
            continue
        with pytest.raises(ProtocolError, match=f"^{name.replace('+', '.')} is not allowed in state {state}$"):
            receive(conn, data)
            events_until_wait(conn)
        assert conn.state == "ERROR" and conn.next_event() is PAUSED


@pytest.mark.parametrize("state", ["OPENING", "OFFERED", "MAPPING", "SOCKET", "RING", "CLOSING", "REQUESTED"])
def test_the_servers_eof_moves_a_client_to_closed_and_is_reported_once(state):
    conn = client_in(state)
    receive(conn, b"")
    assert [key(event) for event in events_until_wait(conn)] == ["Closed"]
    assert conn.state == "CLOSED" and conn.next_event() is PAUSED


MALFORMED_SERVER_FRAMES = {
    "OPENED too short": ("OPENING", frame(b"K", b"\2\0\0"), "OPENED frame too short"),
    "OPENED of version 4": ("OPENING", frame(b"K", struct.pack("<HH", 4, 0)), "server speaks protocol version 4"),
    "OPENED of version 1": ("OPENING", frame(b"K", struct.pack("<HH", 1, 0)), "server speaks protocol version 1"),
    "SHM_OFFER too short": ("OFFERED", frame(b"S", b"\0" * 7), "SHM_OFFER frame too short"),
    "SHM_OFFER with names": ("OFFERED", frame(b"S", u64(1) + b"/ring\0/bell"), "SHM_OFFER of 19 bytes, expected 8"),
    "FLUSHED of 4 bytes": ("SOCKET", frame(b"f", b"\0" * 4), "expected an 8-byte payload"),
    "WRITTEN of 9 bytes": ("CLOSING", frame(b"W", b"\0" * 9), "expected an 8-byte payload"),
    "ERROR too short": ("RING", frame(b"E", b"\0" * 3), "ERROR frame too short"),
    "STATUS_REPLY not JSON": ("REQUESTED", frame(b"J", b"{"), "STATUS_REPLY is not UTF-8 JSON"),
    "STATUS_REPLY not UTF-8": ("REQUESTED", frame(b"J", b"\xff"), "STATUS_REPLY is not UTF-8 JSON"),
    "STATUS_REPLY a list": ("REQUESTED", frame(b"J", b"[]"), "STATUS_REPLY is not a JSON object"),
    "STATUS_REPLY nested too deep": ("REQUESTED", frame(b"J", b"[" * 100_000), "STATUS_REPLY is not UTF-8 JSON"),
    "REOPENED nested too deep": ("REQUESTED", frame(b"r", b'{"a": ' * 100_000), "REOPENED is not UTF-8 JSON"),
    "REOPENED without lists": ("REQUESTED", frame(b"r", b'{"reopened": []}'), "REOPENED needs the lists"),
    "a client frame": ("SOCKET", frame(b"D", b"x"), "unexpected frame type 0x44"),
    "an oversize frame": ("SOCKET", b"f" + struct.pack("<I", W.MAX_PAYLOAD + 1), "frame of 67108865 bytes exceeds"),
}


@pytest.mark.parametrize("case", MALFORMED_SERVER_FRAMES)
def test_a_malformed_server_frame_is_a_protocol_error_and_nothing_else(case):
    state, data, detail = MALFORMED_SERVER_FRAMES[case]
    conn = client_in(state)
    with pytest.raises(ProtocolError, match=f"^{detail}"):
        receive(conn, data)
        events_until_wait(conn)
    assert conn.state == "ERROR" and conn.next_event() is PAUSED


def test_a_refused_frame_names_the_state_and_the_event_beside_the_documented_detail():
    """The text stays section 5.9's detail (it goes on the wire); the error also
    carries the state the machine was in and the event it refused."""
    conn = server_in("DATA")
    receive(conn, frame(b"O", struct.pack("<HH", 2, 0) + b"/tmp/x"))
    with pytest.raises(ProtocolError) as caught:
        conn.next_event()
    assert str(caught.value) == "unexpected frame 'O' after the handshake"
    assert (caught.value.state, caught.value.event) == ("DATA", "Open")


def test_end_of_data_inside_a_frame_is_a_truncated_frame_and_only_that_is():
    """The server tells a cut-off frame (answered with the shutdown error during a
    stop) from every other protocol error by its class, not by its state."""
    conn = server_in("DATA")
    receive(conn, frame(b"D", b"cut off")[:-2])
    receive(conn, b"")
    with pytest.raises(TruncatedFrame, match="^end of data in the middle of a frame: 10 bytes discarded$"):
        conn.next_event()
    conn = server_in("DATA")
    receive(conn, frame(b"O", struct.pack("<HH", 2, 0) + b"/tmp/x"))
    with pytest.raises(ProtocolError) as caught:
        conn.next_event()
    assert not isinstance(caught.value, TruncatedFrame)
