"""The shared-memory fast path: ring correctness, negotiation, hostile headers, kills, hygiene."""

from __future__ import annotations

import ctypes
import errno
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time

import pytest
import ringcheck
from support import ServerProcess, child_env, client_script, shm_objects, wait_for

import offlog
from offlog.shm import layout
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
    assert reason in server.output()


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


def _socket_only_in_a_16k_dev_shm(procs, workdir, *options: str) -> str:
    """Start a --shm server (with ``options``) whose /dev/shm is a 16 KiB tmpfs,
    check that a client gets the socket and loses nothing, stop the server;
    return what it logged."""
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
    assert f.transport == "socket"
    f.write(b"still written\n")
    f.close()
    assert (workdir / "a.log").read_bytes() == b"still written\n"
    server.send_signal(signal.SIGTERM)
    server.wait(30)
    return (workdir / "server.out").read_text()


def test_full_dev_shm_falls_back_to_the_socket(procs, workdir, private_dev_shm):
    """No 4 MiB ring fits in a 16 KiB /dev/shm: creating it fails, clients get the socket.
    (--max-ring-memory is raised past /dev/shm's size so that the creation is tried.)"""
    assert "could not create the ring" in _socket_only_in_a_16k_dev_shm(procs, workdir, "--max-ring-memory", "1G")


def test_the_default_ring_memory_cap_is_half_of_dev_shm(procs, workdir, private_dev_shm):
    """Without --max-ring-memory the cap is half of /dev/shm (8 KiB here): the server
    offers no ring it could not hold, and says why."""
    logged = _socket_only_in_a_16k_dev_shm(procs, workdir)
    assert "ring memory limit reached (0 bytes in rings, --max-ring-memory 8192)" in logged


def test_client_that_cannot_open_the_objects_falls_back(shm_server, workdir, procs, private_dev_shm):
    """A client with its own /dev/shm (as if another user) cannot open the ring: socket it is."""
    code = (
        "import offlog, sys; f = offlog.ProxyFile(sys.argv[1], sys.argv[2]); print(f.transport); "
        "f.write(b'via the socket\\n'); f.close()"
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
    assert out.strip() == "socket"
    assert (workdir / "b.log").read_bytes() == b"via the socket\n"
    assert "client could not use the ring" in shm_server.output()


def test_nothing_is_left_in_dev_shm_after_the_handshake(shm_server, workdir):
    files = [offlog.ProxyFile(str(workdir / f"{i}.log"), shm_server.sock, shm=True) for i in range(5)]
    assert shm_objects([shm_server.pid]) == set(), "ring objects must be unlinked once both sides hold them"
    for f in files:
        f.write(b"ok\n")
        f.close()


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
SYS_TGKILL = 234  # x86-64, the only machine that is offered rings


def signal_every_thread(pid: int, signum: int) -> None:
    """Send ``signum`` to each thread of ``pid``: the kernel may hand a signal to any of them."""
    libc = ctypes.CDLL(None, use_errno=True)
    for tid in os.listdir(f"/proc/{pid}/task"):
        if libc.syscall(SYS_TGKILL, pid, int(tid), signum) and ctypes.get_errno() != errno.ESRCH:
            raise OSError(ctypes.get_errno(), f"tgkill of thread {tid} of {pid} failed")


def test_a_signal_on_a_sleeping_ring_session_only_wakes_it(shm_server, workdir):
    """SIGHUP to every server thread while the ring session sleeps on its doorbell
    (its wait ends with a SignalError): the session sleeps again and loses nothing."""
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
    shm_server.wait_log("disconnected")
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
    # The next server start sweeps whatever a killed server left behind.
    final = ServerProcess(procs, workdir, "--shm", sock=sock).start()
    pids.append(final.pid)
    f = offlog.ProxyFile(str(workdir / "last.log"), sock, shm=True)
    f.close()
    assert final.stop() == 0, final.output()
    assert shm_objects(pids) == set()


NO_POSIX_IPC = "import sys; sys.modules['posix_ipc'] = None  # as if it were not installed\n"


def test_client_without_posix_ipc_uses_the_socket(shm_server, workdir, procs):
    code = NO_POSIX_IPC + (
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
    assert transport == "socket" and "posix_ipc is not installed" in required
    assert (workdir / "n.log").read_bytes() == b"over the socket\n"
    assert "transport: socket (client has no posix_ipc)" in shm_server.output()


def test_server_without_posix_ipc_offers_no_ring(procs, workdir):
    sock = str(workdir / "plain.sock")
    code = NO_POSIX_IPC + f"from offlog.__main__ import main; sys.exit(main(['-s', {sock!r}, '--shm']))"
    out = open(workdir / "server.out", "wb")
    server = procs.start(
        [sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT, cwd=str(workdir), env=child_env()
    )
    out.close()
    wait_for(lambda: os.path.exists(sock), what="server socket")
    f = offlog.ProxyFile(str(workdir / "p.log"), sock)
    assert f.transport == "socket"
    f.write(b"fine\n")
    f.close()
    server.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0
    log = (workdir / "server.out").read_text()
    assert "Shared memory disabled: posix_ipc is not installed" in log
    assert "transport: socket (posix_ipc is not installed)" in log
