"""The shared-memory fast path: ring correctness, negotiation, sealed rings, hostile peers, kills, hygiene."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import gc
import os
import platform
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Tuple

import pytest
import ringcheck
from support import (
    ServerProcess,
    child_env,
    client_script,
    dev_shm_in_use,
    needs_sleeping_rings,
    open_fds,
    ring_mappings,
    shm_objects,
    socket_answers,
    wait_for,
)

import offlog
from offlog import protocol as P
from offlog.shm import ClientRing, layout
from offlog.shm.ring import Producer, RingCorrupt


# -- the ring itself ----------------------------------------------------------------
def test_two_million_records_through_a_small_ring_every_byte_checked():
    verified = ringcheck.run(Producer, 2_000_000, capacity=1 << 16)
    assert verified == sum(len(ringcheck.record(i)) for i in range(2_000_000))


class PackIntoProducer(Producer):
    """A producer that publishes ``head`` with struct.pack_into, as the field notes warn against."""

    def __init__(self, mapping, *args) -> None:
        super().__init__(mapping, *args)
        self._raw = mapping

    def _publish(self) -> None:
        struct.pack_into("<Q", self._raw, layout.HEAD_WORD * 8, self._head)

    def write(self, data) -> None:
        self._write_slow(data)  # every write through the slow path, so through _publish


def test_the_stress_check_catches_positions_published_with_pack_into():
    """pack_into zero-fills before writing: the consumer must see a torn head and fail."""
    for _ in range(20):
        try:
            ringcheck.run(PackIntoProducer, 2_000_000, capacity=1 << 16)
        except (RingCorrupt, AssertionError):
            return
    pytest.fail("twenty runs of two million records never exposed a zero-filled head")


def test_a_write_bigger_than_the_ring_waits_in_the_backlog_and_is_fed_through_in_order(start_server, workdir):
    server = start_server("--shm", "--ring-size", "64K")
    target = workdir / "big.log"
    f = offlog.ProxyFile(str(target), server.sock, shm=True)
    big = bytes(range(256)) * 1024  # 256 KiB, four times the ring
    f.write(b"before\n")
    f.write(big)
    f.write(b"after\n")
    f.close()
    assert target.read_bytes() == b"before\n" + big + b"after\n"


def test_a_million_records_through_the_server_arrive_exactly(shm_server, workdir):
    target = workdir / "million.log"
    f = offlog.ProxyFile(str(target), shm_server.sock, shm=True)
    for i in range(1_000_000):
        f.write(ringcheck.record(i))
    f.close()
    data = target.read_bytes()
    pos = 0
    for i in range(1_000_000):
        rec = ringcheck.record(i)
        assert data[pos : pos + len(rec)] == rec, f"record {i} differs"
        pos += len(rec)
    assert pos == len(data)


# -- negotiation ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "server_args, shm, transport, reason",
    [
        (["--shm"], None, "shm", "transport: shm"),
        (["--shm"], True, "shm", "transport: shm"),
        (["--shm"], False, "socket", "client asked for the socket"),
        ([], None, "socket", "server started without --shm"),
        ([], False, "socket", "server started without --shm"),
    ],
)
def test_transport_negotiation(start_server, workdir, server_args, shm, transport, reason):
    server = start_server(*server_args)
    f = offlog.ProxyFile(str(workdir / "n.log"), server.sock, shm=shm)
    assert f.transport == transport
    f.write(b"x\n")
    f.close()
    assert (workdir / "n.log").read_bytes() == b"x\n"
    server.wait_log(reason)


def test_requiring_shm_from_a_socket_only_server_raises(server, workdir):
    with pytest.raises(offlog.ShmUnavailableError, match="without --shm"):
        offlog.ProxyFile(str(workdir / "n.log"), server.sock, shm=True)


@pytest.fixture
def private_dev_shm():
    """These tests give one process its own /dev/shm with ``unshare -m`` (needs root, as CI has)."""
    probe = ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /dev/shm"]
    result = subprocess.run(probe, capture_output=True, text=True)
    if result.returncode:
        pytest.fail(f"unshare -m with a tmpfs mount is needed for this test (run as root): {result.stderr}")


def _server_in_a_16k_dev_shm(procs, workdir, *options: str) -> Tuple[str, str]:
    """Start a --shm server (with ``options``) whose /dev/shm is a 16 KiB tmpfs,
    let a client write through whatever transport it gets, stop the server;
    return the transport and what the server logged."""
    sock = str(workdir / "small.sock")
    cmd = 'mount -t tmpfs -o size=16k tmpfs /dev/shm && exec "$0" -m offlog --shm "$@"'
    out = open(workdir / "server.out", "wb")
    server = procs.start(
        ["unshare", "-m", "sh", "-c", cmd, sys.executable, *options, "-s", sock],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=str(workdir),
        env=child_env(),
    )
    out.close()
    wait_for(lambda: os.path.exists(sock), what="server socket")
    f = offlog.ProxyFile(str(workdir / "a.log"), sock)
    transport = f.transport
    f.write(b"still written\n")
    f.close()
    assert (workdir / "a.log").read_bytes() == b"still written\n"
    server.send_signal(signal.SIGTERM)
    server.wait(30)
    return transport, (workdir / "server.out").read_text()


def test_a_full_dev_shm_does_not_stop_rings(procs, workdir, private_dev_shm):
    """Rings are memfds, not files in /dev/shm: a 4 MiB ring is made beside a 16 KiB
    /dev/shm (--max-ring-memory is raised past /dev/shm's size, the default's base)."""
    transport, logged = _server_in_a_16k_dev_shm(procs, workdir, "--max-ring-memory", "1G")
    assert transport == "shm", logged


def test_the_default_ring_memory_cap_is_half_of_dev_shm(procs, workdir, private_dev_shm):
    """Without --max-ring-memory the cap is half of /dev/shm (8 KiB here): the server
    offers no ring it could not hold, and says why."""
    transport, logged = _server_in_a_16k_dev_shm(procs, workdir)
    assert transport == "socket"
    assert "ring memory limit reached (0 bytes in rings, --max-ring-memory 8192)" in logged


def test_a_ring_the_server_cannot_allocate_leaves_the_client_on_the_socket(procs, workdir):
    """The server's file size limit (RLIMIT_FSIZE, 1 MiB) is below a 4 MiB ring: sizing
    the memfd fails, the client gets the socket and the note says why."""
    sock = str(workdir / "limited.sock")
    out = open(workdir / "server.out", "wb")
    server = procs.start(
        ["prlimit", "--fsize=1048576", sys.executable, "-m", "offlog", "--shm", "-s", sock],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=str(workdir),
        env=child_env(),
    )
    out.close()
    wait_for(lambda: socket_answers(sock), what="server socket")  # bound is not yet listening
    f = offlog.ProxyFile(str(workdir / "a.log"), sock)
    assert f.transport == "socket"
    f.write(b"via the socket\n")
    f.close()
    assert (workdir / "a.log").read_bytes() == b"via the socket\n"
    server.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0
    logged = (workdir / "server.out").read_text()
    assert "transport: socket (could not create the ring: [Errno 27] File too large)" in logged


# -- sealed rings: nothing named, nothing a client can resize -------------------------------------------
def test_a_ring_session_puts_nothing_in_dev_shm(shm_server, workdir):
    """Rings are memfds passed over the socket: while five ring sessions run, nothing of
    offlog's is in /dev/shm and neither side holds anything there."""
    files = [offlog.ProxyFile(str(workdir / f"{i}.log"), shm_server.sock, shm=True) for i in range(5)]
    for f in files:
        f.write(b"ok\n")
        f.sync()
    assert shm_objects([shm_server.pid]) == set()
    assert dev_shm_in_use(shm_server.pid) == dev_shm_in_use(os.getpid()) == set()
    assert ring_mappings(shm_server.pid) == 5
    for f in files:
        f.close()
    wait_for(lambda: ring_mappings(shm_server.pid) == 0, what="the server to unmap the rings")
    assert all((workdir / f"{i}.log").read_bytes() == b"ok\n" for i in range(5))


def take_offer(sock_path: str, path: Path):
    """A client's handshake by hand up to the offer: (socket, its machine, capacity,
    the descriptors that came with the offer)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(sock_path)
    conn = P.ClientConnection()
    sock.sendall(conn.send(P.Open(str(path), P.WANT_SHM)))
    fds: list = []
    events: list = []
    while conn.state != "MAPPING":
        data, more, _, _ = socket.recv_fds(sock, 65536, 4, socket.MSG_CMSG_CLOEXEC)
        assert data, f"EOF in state {conn.state}"
        fds += more
        conn.receive_data(data)
        while (event := conn.next_event()) is not P.NEED_DATA:
            events.append(event)
    return sock, conn, events[-1].capacity, fds


def test_a_client_that_resizes_its_ring_gets_eperm_and_the_server_serves_on(shm_server, workdir):
    """A client holding its ring's descriptor tries every way to change its size:
    ftruncate (shrink, grow, through its own fd or a reopen of it), fallocate past the
    end, new seals. Each fails with EPERM; the server (which would die of SIGBUS
    on a shrunk ring) goes on, and every record of the vandal and of bystanders arrives."""
    bystanders = [offlog.ProxyFile(str(workdir / f"b{i}.log"), shm_server.sock, shm=True) for i in range(2)]
    for i, f in enumerate(bystanders):
        f.write(b"bystander %d before\n" % i)
    target = workdir / "vandal.log"
    sock, conn, capacity, (fd,) = take_offer(shm_server.sock, target)
    size = 256 + capacity
    ring = ClientRing(capacity, fd, on_failed=lambda code: pytest.fail(f"the ring failed: {code}"))
    sock.sendall(conn.send(P.ShmAccept()))
    ring.producer.write(b"vandal before\n")
    reopened = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    try:
        for victim in (fd, reopened):
            for new_size in (0, 256, size - 4096, size + 4096, 2 * size):
                with pytest.raises(PermissionError):
                    os.ftruncate(victim, new_size)
            with pytest.raises(PermissionError):
                os.posix_fallocate(victim, size, 4096)
            with pytest.raises(PermissionError):
                fcntl.fcntl(victim, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
            assert os.fstat(victim).st_size == size
    finally:
        os.close(reopened)
        os.close(fd)
    ring.producer.write(b"vandal after\n")
    sock.sendall(conn.send(P.Flush(1)))
    for i, f in enumerate(bystanders):
        f.write(b"bystander %d after\n" % i)
        f.close()
        assert (workdir / f"b{i}.log").read_bytes() == b"bystander %d before\nbystander %d after\n" % (i, i)
    conn.send(P.EndOfData())
    sock.shutdown(socket.SHUT_WR)
    heard = b""
    while chunk := sock.recv(65536):
        heard += chunk
    sock.close()
    conn.receive_data(heard)
    conn.receive_data(b"")
    assert [type(e) for e in iter(conn.next_event, P.PAUSED)] == [P.Flushed, P.Bye, P.Closed]
    assert target.read_bytes() == b"vandal before\nvandal after\n"
    assert shm_server.proc.poll() is None
    assert " error" not in shm_server.output()


def test_a_client_of_another_user_gets_its_ring(start_server, workdir, procs):
    """The ring travels as a descriptor: a client running as another uid (nobody) maps
    its ring like any other. (Run as root, as CI is, to start a client as another user;
    the client imports what it needs first, as root may read an interpreter in /root.)"""
    if os.geteuid() != 0:
        pytest.fail("this test starts a client as another user: run it as root, as CI does")
    workdir.chmod(0o755)
    server = start_server("--shm", "--socket-mode", "666")
    target = workdir / "other.log"
    code = f"""
        import os
        from offlog.client import ProxyFile
        from offlog.shm import unsupported_reason
        assert unsupported_reason() is None
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        f = ProxyFile({str(target)!r}, {server.sock!r}, shm=True)
        print(f.transport, os.getuid())
        f.write(b"from uid 65534\\n")
        f.close()
    """
    proc = client_script(procs, workdir, code)
    assert proc.returncode == 0, proc.stderr_text
    assert proc.stdout_text.split() == ["shm", "65534"]
    assert target.read_bytes() == b"from uid 65534\n"
    server.wait_log("uid 65534)")
    server.wait_log("transport: shm")


def test_a_client_in_a_mount_namespace_of_its_own_gets_its_ring(shm_server, workdir, procs, private_dev_shm):
    """A client whose /dev/shm is not the server's (a container, say) maps its ring: a
    ring needs no shared file system."""
    code = (
        "import offlog, sys; f = offlog.ProxyFile(sys.argv[1], sys.argv[2]); print(f.transport); "
        "f.write(b'through the ring\\n'); f.close()"
    )
    cmd = 'mount -t tmpfs tmpfs /dev/shm && exec "$0" -c "$1" "$2" "$3"'
    proc = procs.start(
        ["unshare", "-m", "sh", "-c", cmd, sys.executable, code, str(workdir / "b.log"), shm_server.sock],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        cwd=str(workdir),
        text=True,
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "shm"
    assert (workdir / "b.log").read_bytes() == b"through the ring\n"


# -- a fake server's offers ---------------------------------------------------------------------------
class FakeServer:
    """A server of the test's making, speaking through offlog.protocol's ServerConnection,
    whose ring offer is ``offer(conn)``: (bytes to send, descriptors to attach). It
    serves each connection on the socket after the offer, keeps the client's answers
    and the DATA it received, and closes every descriptor it sent."""

    def __init__(self, path: str, offer) -> None:
        self.offer = offer
        self.answers: list = []
        self.data = bytearray()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return  # closed: the test is over
            with sock:
                try:
                    self._session(sock, P.ServerConnection())
                except OSError:
                    pass  # the client left (after refusing the ring with shm=True, say)

    def _session(self, sock: socket.socket, conn: P.ServerConnection) -> None:
        while True:
            event = conn.next_event()
            if event is P.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif event is P.PAUSED and conn.state == "GREETING":
                sock.sendall(conn.send(P.Greeting()))
            elif event is P.PAUSED and conn.state == "OPENING":
                data, fds = self.offer(conn)
                try:
                    socket.send_fds(sock, [data], fds) if fds else sock.sendall(data)
                finally:
                    for fd in fds:
                        os.close(fd)
            elif event is P.PAUSED and conn.state == "ENDED":
                sock.sendall(conn.send(P.Bye()))
            elif event is P.PAUSED or type(event) is P.Closed:
                return
            elif type(event) in (P.ShmDecline, P.ShmAccept):
                self.answers.append(getattr(event, "reason", "accepted"))
            elif type(event) is P.Data:
                self.data += event.payload
            elif type(event) is P.Flush:
                sock.sendall(conn.send(P.Flushed(event.token)))

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (a close alone would not)
        self.thread.join(30)
        self.listener.close()


def memfd(size: int, seals: int = 0) -> int:
    fd = os.memfd_create("fake-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


CAPACITY = 1 << 16
SIZE = 256 + CAPACITY
SEALED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def sealed_offer(capacity: int = CAPACITY, size: int = SIZE, seals: int = SEALED, count: int = 1):
    return lambda conn: (conn.send(P.ShmOffer(capacity)), [memfd(size, seals) for _ in range(count)])


def named_offer_of_protocol_2(name: str):
    """What a version-2 server said: OPENED version 2, SHM_OFFER with two names."""

    def offer(conn):
        conn.send(P.ShmOffer(CAPACITY))  # moves the machine; the bytes are version 2's instead
        body = struct.pack("<Q", CAPACITY) + name.encode() + b"\0" + name.encode()
        return P.encode_opened(P.SHM_OFFERED, version=2) + P.frame(P.SHM_OFFER, body), []

    return offer


def other_descriptor(workdir: Path):
    def offer(conn):
        (workdir / "plain").write_bytes(bytes(SIZE))
        return conn.send(P.ShmOffer(CAPACITY)), [os.open(workdir / "plain", os.O_RDWR)]

    return offer


FAKE_OFFERS = {
    "unsealed": (lambda workdir: sealed_offer(seals=0), "not sealed against resizing (seals 0x0"),
    "shrinkable": (
        lambda workdir: sealed_offer(seals=fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL),
        "not sealed against resizing (seals 0x5",
    ),
    "resealable": (
        lambda workdir: sealed_offer(seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW),
        "not sealed against resizing (seals 0x6",
    ),
    "too small": (lambda workdir: sealed_offer(size=SIZE - 4096), f"has {SIZE - 4096} bytes, expected {SIZE}"),
    "header only": (lambda workdir: sealed_offer(size=256), f"has 256 bytes, expected {SIZE}"),
    "too big": (lambda workdir: sealed_offer(size=2 * SIZE), f"has {2 * SIZE} bytes, expected {SIZE}"),
    "bad capacity": (lambda workdir: sealed_offer(capacity=1000, size=1256), "must be a power of two"),
    "blank header": (lambda workdir: sealed_offer(), "bad ring magic"),
    "a plain file": (other_descriptor, "not sealable memory"),
    "no descriptor": (lambda workdir: sealed_offer(count=0), "the offer came with 0 descriptors, expected 1"),
    "two descriptors": (lambda workdir: sealed_offer(count=2), "the offer came with 2 descriptors, expected 1"),
    "names (protocol 2)": (
        lambda workdir: named_offer_of_protocol_2("/" + workdir.name),
        "the server speaks protocol 2: its rings have names, not seals",
    ),
}

FAKE_SERVER_CLIENT = """
import os, sys, offlog
fds = lambda: len(os.listdir("/proc/self/fd"))
before = fds()
for round in range(2):
    f = offlog.ProxyFile(sys.argv[1], sys.argv[2])
    print(f.transport, flush=True)
    f.write(b"record %d\\n" % round)
    f.sync()
    f.close()
print(before, fds())
"""


@pytest.mark.parametrize("case", FAKE_OFFERS)
def test_a_fake_servers_unsafe_ring_is_declined_and_the_client_stays_on_the_socket(workdir, procs, case):
    """A client is offered memory it must not map: it checks seals, size, capacity and
    header before trusting any of it, declines with the reason, writes over the socket,
    never crashes, keeps no descriptor, and never touches what a server names."""
    make_offer, reason = FAKE_OFFERS[case]
    named = Path("/dev/shm") / workdir.name  # what the protocol-2 offer names: it must survive
    named.write_bytes(b"not yours")
    fake = FakeServer(str(workdir / "fake.sock"), make_offer(workdir))
    try:
        proc = procs.start(
            [sys.executable, "-c", FAKE_SERVER_CLIENT, str(workdir / "a.log"), str(workdir / "fake.sock")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            cwd=str(workdir),
            text=True,
        )
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        first, second, counts = out.splitlines()
        assert first == second == "socket"
        before, after = counts.split()
        assert before == after, "the client kept descriptors"
        assert len(fake.answers) == 2 and all(reason in answer for answer in fake.answers), fake.answers
        assert bytes(fake.data) == b"record 0\nrecord 1\n"
        assert named.read_bytes() == b"not yours"
    finally:
        fake.close()
        named.unlink()


def test_shm_true_raises_when_the_offered_ring_is_unsafe(workdir):
    fake = FakeServer(str(workdir / "fake.sock"), sealed_offer(seals=0))
    try:
        with pytest.raises(offlog.ShmUnavailableError, match="not sealed against resizing"):
            offlog.ProxyFile(str(workdir / "a.log"), str(workdir / "fake.sock"), shm=True)
    finally:
        fake.close()


# -- descriptors ---------------------------------------------------------------------------------------
def test_ring_sessions_leave_no_descriptor_or_mapping_behind(shm_server, workdir, procs):
    """Accepted, declined, abandoned and killed ring sessions: afterwards the server holds
    as many descriptors as before and maps no ring; the client as many as before."""
    warm = offlog.ProxyFile(str(workdir / "warm.log"), shm_server.sock, shm=True)  # the hang-up watcher starts
    warm.close()
    wait_for(lambda: ring_mappings(shm_server.pid) == 0, what="the warm-up ring unmapped")
    gc.collect()
    server_fds, client_fds = open_fds(shm_server.pid), open_fds(os.getpid())
    for i in range(5):
        f = offlog.ProxyFile(str(workdir / "a.log"), shm_server.sock, shm=True)
        f.write(b"accepted %d\n" % i)
        f.close()
        sock, conn, _, fds = take_offer(shm_server.sock, workdir / "b.log")
        for fd in fds:
            os.close(fd)
        sock.sendall(conn.send(P.ShmDecline("declined by the test")))
        sock.close()
        sock, _, _, fds = take_offer(shm_server.sock, workdir / "c.log")
        for fd in fds:
            os.close(fd)
        sock.close()  # abandoned: no answer to the offer
    killed = procs.start(
        [sys.executable, "-c", KILLED_WRITER, str(workdir / "d.log"), shm_server.sock],
        stdout=subprocess.PIPE,
        env=child_env(),
        cwd=str(workdir),
    )
    assert killed.stdout.readline(), "the writer died on its own"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    killed.stdout.close()
    def every_session_ended() -> bool:
        out = shm_server.output()
        connected = set(re.findall(r"Client (\d+) connected", out))
        return connected == set(re.findall(r"Client (\d+) disconnected$", out, re.M))

    wait_for(every_session_ended, what="every session to end")
    wait_for(lambda: ring_mappings(shm_server.pid) == 0, what="every ring unmapped")
    wait_for(lambda: open_fds(shm_server.pid) == server_fds, what=f"the server back to {server_fds} descriptors")
    gc.collect()
    assert open_fds(os.getpid()) == client_fds
    assert ring_mappings(os.getpid()) == 0



# -- hostile headers -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "word, value",
    [
        (layout.HEAD_WORD, 1 << 40),  # head far beyond tail + capacity
        (layout.MAGIC_WORD, 0x1234),  # identity overwritten
        (layout.CAPACITY_WORD, 1 << 12),
        (layout.VERSION_WORD, 99),
    ],
    ids=["head", "magic", "capacity", "version"],
)
def test_a_client_that_scribbles_over_its_header_is_cut_off_alone(shm_server, workdir, word, value):
    bystander = offlog.ProxyFile(str(workdir / "bystander.log"), shm_server.sock, shm=True)
    bystander.write(b"before\n")
    vandal = offlog.ProxyFile(str(workdir / "vandal.log"), shm_server.sock, shm=True)
    vandal.write(b"fine so far\n")
    producer = vandal._transport._data
    producer._words[word] = value  # what a buggy or hostile client could do
    producer._doorbell()  # and ring the doorbell
    shm_server.wait_log("corrupted its ring")
    with pytest.raises(ValueError, match="ring corrupted"):
        vandal.write(b"x\n")
    vandal.close()
    bystander.write(b"after\n")
    bystander.close()
    assert (workdir / "bystander.log").read_bytes() == b"before\nafter\n"
    assert shm_server.proc.poll() is None


# -- signals --------------------------------------------------------------------------------------
SYS_TGKILL = {"x86_64": 234, "aarch64": 131}.get(platform.machine())  # the machines offered rings


def signal_every_thread(pid: int, signum: int) -> None:
    """Send ``signum`` to each thread of ``pid``: the kernel may hand a signal to any of them."""
    libc = ctypes.CDLL(None, use_errno=True)
    for tid in os.listdir(f"/proc/{pid}/task"):
        if libc.syscall(SYS_TGKILL, pid, int(tid), signum) and ctypes.get_errno() != errno.ESRCH:
            raise OSError(ctypes.get_errno(), f"tgkill of thread {tid} of {pid} failed")


@needs_sleeping_rings
def test_a_signal_on_a_sleeping_ring_session_only_wakes_it(shm_server, workdir):
    """SIGHUP to every server thread while the ring session sleeps on its doorbell
    (its futex wait ends with EINTR): the session sleeps again and loses nothing."""
    target = workdir / "woken.log"
    f = offlog.ProxyFile(str(target), shm_server.sock, shm=True)
    f.write(b"before\n")
    words = f._transport._data._words
    for round_ in range(1, 6):
        wait_for(lambda: words[layout.STATE_WORD] == layout.SLEEPING, what="the ring session asleep")
        signal_every_thread(shm_server.pid, signal.SIGHUP)
        wait_for(lambda n=round_: shm_server.output().count("Received SIGHUP") >= n, what="the SIGHUP handled")
    f.write(b"after\n")
    f.close()
    assert target.read_bytes() == b"before\nafter\n"
    assert " error" not in shm_server.output()


# -- kills ---------------------------------------------------------------------------------------
KILLED_WRITER = """
import sys, offlog
f = offlog.ProxyFile(sys.argv[1], sys.argv[2], shm=True)
i = 0
while True:
    for _ in range(1000):
        f.write(b"record %09d %s\\n" % (i, b"z" * (i % 64)))
        i += 1
    if f.backlog == 0:
        print(i, flush=True)
"""

RECORD = re.compile(rb"record (\d{9}) (z*)")


def test_killed_client_loses_nothing(shm_server, workdir, procs):
    """SIGKILL a client that reported N records written: the file holds all N, none torn."""
    target = workdir / "killed.log"
    writer = procs.start(
        [sys.executable, "-c", KILLED_WRITER, str(target), shm_server.sock],
        stdout=subprocess.PIPE,
        env=child_env(),
        cwd=str(workdir),
    )
    reported = 0
    while reported < 200_000:
        line = writer.stdout.readline()
        assert line, "the writer died on its own"
        reported = int(line)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    shm_server.wait_log("Client 1 disconnected")  # (client 0 was the fixture's probe) all drained by then
    wait_for(lambda: target.stat().st_size > 0, what="data")
    lines = target.read_bytes().split(b"\n")
    assert lines[-1] == b"", "the file must end with a whole record"
    numbers = []
    for line in lines[:-1]:
        m = RECORD.fullmatch(line)
        assert m and len(m.group(2)) == int(m.group(1)) % 64, f"torn record {line[:80]!r}"
        numbers.append(int(m.group(1)))
    assert numbers == list(range(len(numbers))), "records out of order or missing"
    assert len(numbers) >= reported


KILL_TARGET = """
import sys, offlog
try:
    f = offlog.ProxyFile(sys.argv[1], sys.argv[2])
    while True:
        f.write(b"y" * 100)
except Exception:
    pass
"""


def test_kills_of_clients_and_servers_leave_dev_shm_as_it_was(procs, workdir):
    """Rings have no names, so no kill at any moment can leave one behind."""
    rng = random.Random(1234)
    sock = str(workdir / "chaos.sock")
    pids = []
    for _ in range(3):
        server = ServerProcess(procs, workdir, "--shm", sock=sock).start()
        pids.append(server.pid)
        clients = []
        for k in range(8):
            clients.append(
                procs.start(
                    [sys.executable, "-c", KILL_TARGET, str(workdir / f"c{k}.log"), sock],
                    env=child_env(),
                    cwd=str(workdir),
                )
            )
            time.sleep(rng.uniform(0, 0.05))
            if rng.random() < 0.6:
                victim = clients[rng.randrange(len(clients))]
                victim.send_signal(signal.SIGKILL)
        time.sleep(rng.uniform(0.05, 0.3))
        server.kill()  # SIGKILL, mid-traffic
        for c in clients:
            c.send_signal(signal.SIGKILL)
            c.wait()
    final = ServerProcess(procs, workdir, "--shm", sock=sock).start()
    pids.append(final.pid)
    f = offlog.ProxyFile(str(workdir / "last.log"), sock, shm=True)
    f.close()
    assert final.stop() == 0, final.output()
    assert shm_objects(pids) == set()


# -- the doorbell -----------------------------------------------------------------------------------------
SCRIBBLER = """
import sys, time, offlog
from offlog.shm import layout
f = offlog.ProxyFile(sys.argv[1], sys.argv[2], shm=True)
f.write(b"scribbler before\\n")
f.sync()
words = f._transport._data._words
first = layout.DOORBELL_OFFSET // 8
words[first] = (1 << 32) | 0x7FFFFFFF  # the semaphore's value and waiter count
words[first + 1] = 0x5A5A5A5A5A5A5A5A  # its futex flags: what glibc's calls take and abort on
print("scribbled", flush=True)
for _ in range(50):
    time.sleep(0.02)  # the consumer goes back to sleep, so the next write posts
    f.write(b"scribbler goes on\\n")
    words[first + 1] = 0x5A5A5A5A5A5A5A5A
f.close()
"""


def test_a_client_that_scribbles_over_its_doorbell_harms_no_one_else(shm_server, workdir, procs):
    """The semaphore lives in memory the client writes. A client that overwrites its
    value, waiter count and futex flags (with which glibc's sem_timedwait and sem_post
    abort a process) may abort itself at its next sem_post; the server, which never
    calls the C library's semaphore functions on a ring, serves on, and a bystander loses nothing."""
    bystander = offlog.ProxyFile(str(workdir / "bystander.log"), shm_server.sock, shm=True)
    bystander.write(b"before\n")
    scribbler = procs.start(
        [sys.executable, "-c", SCRIBBLER, str(workdir / "scribbler.log"), shm_server.sock],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        cwd=str(workdir),
    )
    assert scribbler.stdout.readline() == b"scribbled\n", scribbler.stderr.read()
    scribbler.wait(60)
    assert scribbler.returncode in (0, -signal.SIGABRT), scribbler.stderr.read()
    shm_server.wait_log("Client 2 disconnected")  # (0: the fixture's probe, 1: the bystander) drained by then
    bystander.write(b"after\n")
    bystander.close()
    assert (workdir / "bystander.log").read_bytes() == b"before\nafter\n"
    assert (workdir / "scribbler.log").read_bytes().startswith(b"scribbler before\n")
    assert shm_server.proc.poll() is None
    assert " error" not in shm_server.output()


NO_CTYPES = "import sys; sys.modules['ctypes'] = None  # as if Python had been built without it\n"


def test_client_without_ctypes_uses_the_socket(shm_server, workdir, procs):
    code = NO_CTYPES + (
        "import offlog\n"
        f"f = offlog.ProxyFile({str(workdir / 'n.log')!r}, {shm_server.sock!r})\n"
        "print(f.transport)\n"
        "f.write(b'over the socket\\n')\n"
        "f.close()\n"
        "try:\n"
        f"    offlog.ProxyFile({str(workdir / 'n.log')!r}, {shm_server.sock!r}, shm=True)\n"
        "except offlog.ShmUnavailableError as exc:\n"
        "    print('required:', exc)\n"
    )
    proc = client_script(procs, workdir, code)
    assert proc.returncode == 0, proc.stderr_text
    transport, required = proc.stdout_text.splitlines()
    assert transport == "socket" and "ctypes is not available" in required
    assert (workdir / "n.log").read_bytes() == b"over the socket\n"
    shm_server.wait_log("transport: socket (client cannot map rings)")
