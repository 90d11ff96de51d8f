"""The event loop and its bounds: idle clients cost no thread, large frames share a memory
limit, floods of empty frames are cut off. Real server processes, real sockets and rings."""

from __future__ import annotations

import errno
import socket
import threading
from pathlib import Path

from support import needs_sleeping_rings, wait_for

import offlog
from offlog import protocol as P
from offlog.client import server_status

MIB = 1024 * 1024


def server_threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count")


class RawClient:
    """A framed client spoken by hand (P.ClientConnection) over a blocking socket."""

    def __init__(self, sock_path: str, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(sock_path)
        self.conn = P.ClientConnection()
        self.sock.sendall(self.conn.send(P.Open(path, 0)))
        assert isinstance(self.next_event(), P.Opened)

    def next_event(self):
        while True:
            event = self.conn.next_event()
            if event is not P.NEED_DATA and not isinstance(event, (P.Greeting, P.Written)):
                return event
            if event is P.NEED_DATA:
                try:
                    self.conn.receive_data(self.sock.recv(65536))
                except ConnectionResetError:
                    self.conn.receive_data(b"")

    def end(self):
        """End of data; the server's last word (BYE, or the error it sent)."""
        self.conn.send(P.EndOfData())
        self.sock.shutdown(socket.SHUT_WR)
        return self.next_event()

    def close(self) -> None:
        self.sock.close()


@needs_sleeping_rings
def test_idle_ring_clients_cost_no_thread_each_and_their_rings_sleep(start_server, workdir):
    """300 ring clients that wrote once and went quiet: their rings sleep (the doorbell
    waiters hold them, 127 to a thread), the server has a handful of threads, not 300,
    and each client's next write wakes its ring and reaches the file."""
    server = start_server("--shm", "--ring-size", "64K", "--max-ring-memory", "64M")
    before = server_threads(server.pid)
    files = [offlog.ProxyFile(str(workdir / f"idle{i}.log"), server.sock, shm=True) for i in range(300)]
    try:
        for i, f in enumerate(files):
            f.write(b"first %d\n" % i)
        asleep = lambda: (lambda s: s if s["writers"]["sleeping_rings"] == 300 else None)(  # noqa: E731
            server_status(server.sock, 30_000)
        )
        status = wait_for(asleep, what="every idle ring to sleep")
        assert sum(c["transport"] == "shm" for c in status["clients"]) == 300
        assert status["writers"]["doorbell_threads"] == 3
        # A writer thread may come and go with a stalled file (a loaded machine), never one per client:
        assert server_threads(server.pid) <= before + 3 + 2 < 300
        for i, f in enumerate(files):
            f.write(b"second %d\n" % i)
        for f in files:
            f.sync()
    finally:
        for f in files:
            f.close()
    for i in range(300):
        assert (workdir / f"idle{i}.log").read_bytes() == b"first %d\nsecond %d\n" % (i, i)


@needs_sleeping_rings
def test_a_client_spamming_its_doorbell_wakes_the_server_about_once_per_sleep(start_server, workdir):
    """A ring client posting its doorbell 300,000 times (the semaphore is in its own
    memory) wakes the server once for the sleeping ring; while the ring is awake its
    posts wake nobody. Before, every post woke the ring's own server thread."""
    server = start_server("--shm", "--ring-size", "64K")
    f = offlog.ProxyFile(str(workdir / "spam.log"), server.sock, shm=True)
    post = f._transport._data._doorbell  # ClientRing.post: sem_post on the ring's doorbell
    f.write(b"before\n")
    wait_for(lambda: server_status(server.sock, 30_000)["writers"]["sleeping_rings"] == 1, what="the ring to sleep")
    before = server_status(server.sock, 30_000)["writers"]["doorbell_wakes"]
    for _ in range(300_000):
        post()
    after = server_status(server.sock, 30_000)["writers"]["doorbell_wakes"]
    # One wake, plus at most one per SLEEP_AFTER (50 ms) the spam lasted, if it outlasted an awake spell.
    assert 1 <= after - before <= 1 + 100, (before, after)
    f.write(b"after\n")
    f.close()
    assert (workdir / "spam.log").read_bytes() == b"before\nafter\n"


def send_in_background(client: RawClient, data: bytes) -> threading.Thread:
    thread = threading.Thread(target=client.sock.sendall, args=(data,), daemon=True)
    thread.start()
    return thread


def frame_status(server) -> dict:
    return server_status(server.sock, 30_000)["frames"]


def test_large_frames_take_turns_under_max_frame_memory_and_all_arrive_whole(start_server, workdir):
    """With --max-frame-memory 4M, three clients each sending a 3 MiB record at once get
    it admitted one at a time (the others are not read meanwhile); all three land whole."""
    server = start_server("--max-frame-memory", "4M")
    records = [bytes([65 + i]) * (3 * MIB) for i in range(3)]
    clients = [RawClient(server.sock, str(workdir / f"big{i}.log")) for i in range(3)]
    senders = [send_in_background(c, c.conn.send(P.Data(r))) for c, r in zip(clients, records)]
    for sender in senders:
        sender.join(60)
        assert not sender.is_alive()
    for client in clients:
        assert isinstance(client.end(), P.Bye)
        client.close()
    for i, record in enumerate(records):
        assert (workdir / f"big{i}.log").read_bytes() == record
    assert frame_status(server)["memory"] == 0


def test_a_client_stalled_inside_a_large_frame_is_cut_off_and_the_waiting_client_goes_on(start_server, workdir):
    """A client that sends 1 MiB of a 3 MiB frame and stops holds the frame memory
    only until the handshake timeout: it is cut off (ENOBUFS) and the client waiting
    behind it is admitted and written. Its half frame reaches no file."""
    server = start_server("--max-frame-memory", "4M", "--handshake-timeout", "2")
    staller = RawClient(server.sock, str(workdir / "stalled.log"))
    frame = staller.conn.send(P.Data(b"s" * (3 * MIB)))
    staller.sock.sendall(frame[: MIB])
    wait_for(lambda: frame_status(server)["memory"] > 0, what="the stalled frame to be admitted")
    waiting = RawClient(server.sock, str(workdir / "waiting.log"))
    sender = send_in_background(waiting, waiting.conn.send(P.Data(b"w" * (3 * MIB))))
    wait_for(lambda: frame_status(server)["waiting"] == 1, what="the second frame to wait")
    error = staller.next_event()
    assert isinstance(error, P.Error) and error.exception.errno == errno.ENOBUFS, error
    assert "not completed within 2 s" in str(error.exception)
    sender.join(60)
    assert isinstance(waiting.end(), P.Bye)
    assert (workdir / "waiting.log").read_bytes() == b"w" * (3 * MIB)
    assert (workdir / "stalled.log").read_bytes() == b""
    staller.close()
    waiting.close()
    server.wait_log("cut off: a frame of")


def test_a_flood_of_empty_data_frames_is_cut_off_and_costs_no_one_else(start_server, workdir):
    server = start_server()
    flooder = RawClient(server.sock, str(workdir / "flood.log"))
    other = offlog.ProxyFile(str(workdir / "other.log"), server.sock, shm=False)
    empty = flooder.conn.send(P.Data(b""))
    try:
        flooder.sock.sendall(empty * 5000)
    except (BrokenPipeError, ConnectionResetError):
        pass  # cut off while it was still sending
    error = flooder.next_event()
    assert isinstance(error, P.Error), error
    assert "more than 4096 empty DATA frames in a row" in str(error.exception)
    flooder.close()
    other.write(b"unaffected\n")
    other.close()
    assert (workdir / "other.log").read_bytes() == b"unaffected\n"
    assert server.proc.poll() is None


def test_clients_that_never_read_their_answers_are_not_read_either(start_server, workdir):
    """A client sending FLUSH after FLUSH and never reading the FLUSHED answers: once its
    unread answers pass the server's bound, the server stops reading it, so what it can
    push into the server is bounded, and another client is served meanwhile."""
    server = start_server()
    flusher = RawClient(server.sock, str(workdir / "flush.log"))
    flusher.sock.setblocking(False)
    chunk = b"".join(flusher.conn.send(P.Flush(i)) for i in range(5000))
    pushed, refused, rest = 0, 0, memoryview(chunk)
    while refused < 200 and pushed < 256 * MIB:
        try:
            sent = flusher.sock.send(rest)
        except BlockingIOError:
            refused += 1
            threading.Event().wait(0.01)
            continue
        pushed, refused = pushed + sent, 0
        rest = rest[sent:] or memoryview(chunk)  # whole frames only, back to back
    assert pushed < 32 * MIB, f"the server took {pushed} bytes of FLUSH frames whose answers nobody read"
    with offlog.ProxyFile(str(workdir / "other.log"), server.sock, shm=False) as other:
        other.write(b"served\n")
    assert (workdir / "other.log").read_bytes() == b"served\n"
    flusher.close()
    assert server.proc.poll() is None


