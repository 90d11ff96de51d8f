"""A lost server costs no record: what write() accepted arrives at least once.

The client under test runs in a child interpreter (:class:`driver.Driver`):
the test stops (SIGSTOP), kills (SIGKILL) and restarts servers around it and
gives every step a deadline. A small ring (64 KiB) makes "ring full plus a
local backlog" happen after a few dozen records. Delivery across a kill is
at least once: a record appears twice when the server died after writing it
and before confirming it, and a killed server may leave a fragment of what it
was writing; every accepted record must still be somewhere in the file whole.
"""

from __future__ import annotations

import signal
import time

import pytest
from driver import Driver, proxy_file
from records import assert_at_least_once, keys
from support import ServerProcess

SMALL_RING = ("--shm", "--ring-size", "64K")


@pytest.fixture
def start_again(procs, workdir):
    """start_again(server) -> a new server on the same socket with the same options."""
    started = []

    def start(server: ServerProcess) -> ServerProcess:
        server.kill()
        again = ServerProcess(procs, workdir, *server.args, sock=server.sock).start()
        started.append(again)
        return again

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.signal(signal.SIGCONT)
            server.stop()


def test_ring_backlog_survives_a_server_kill(start_server, start_again, procs, workdir):
    """Ring full and a local backlog while the server is stopped; it is killed and replaced, and
    the next call is sync(): no write in between tells the client that its server changed."""
    server = start_server(*SMALL_RING)
    target = workdir / "backlog.log"
    client = Driver(procs, workdir, proxy_file(target, server.sock, shm=True, timeout=10000))
    assert client.state()["transport"] == "shm"
    client.write("A", 0, 20, 1000)
    server.signal(signal.SIGSTOP)
    try:
        stalled = client.write("B", 0, 400, 1000)
        backlog = client.state()["backlog"]
    finally:
        server = start_again(server)  # SIGKILL (a stopped process dies too), then a new server
    assert backlog > 0, "precondition: 400 KiB into a stopped 64 KiB ring leaves a local backlog"
    assert not stalled["raised"], f"writes raised while the server was stopped: {stalled['raised']}"
    client.run("f.sync()")
    client.write("C", 0, 20, 1000)
    client.run("f.close()")
    written = keys("A", range(20)) | keys("B", range(400)) | keys("C", range(20))
    assert_at_least_once(target.read_bytes(), written, written)


@pytest.mark.parametrize("shm", [True, False], ids=["shm", "socket"])
def test_large_writes_survive_three_server_kills(start_server, start_again, procs, workdir, shm):
    """60 distinct 2 MiB records in four rounds of 15; the first three rounds end in a sync()
    during which the server is killed and replaced, mid-way through 30 MB of backlog."""
    server = start_server(*SMALL_RING)
    target = workdir / "large.log"
    client = Driver(procs, workdir, proxy_file(target, server.sock, shm=shm, timeout=30000))
    for first in (0, 15, 30, 45):
        result = client.write("L", first, first + 15, 2 << 20, timeout=60)
        assert not result["raised"], f"writes raised: {result['raised']}"
        if first == 45:
            break
        client.send("f.sync()")
        time.sleep(0.1)  # let the drain begin (if it has finished, the round proves less, never fails)
        server = start_again(server)
        answer = client.reply(timeout=45)
        assert answer["ok"], f"sync() across a kill raised {answer['error']}: {answer['message']}"
    client.run("f.sync()", timeout=60)
    client.run("f.close()", timeout=60)
    written = keys("L", range(60))
    assert_at_least_once(target.read_bytes(), written, written)


@pytest.mark.parametrize("wait", ["sync", "close", "block"])
@pytest.mark.parametrize("shm", [True, False], ids=["shm", "socket"])
def test_every_wait_notices_a_lost_server(start_server, start_again, procs, workdir, shm, wait):
    """A wait on a stopped server (sync, close, the block policy waiting for room) that is then
    killed and replaced goes on with the new server instead of running out its 60 s timeout."""
    server = start_server(*SMALL_RING)
    target = workdir / "wait.log"
    limit = {"max_queue": 256 * 1024, "on_full": "block"} if wait == "block" else {}
    client = Driver(procs, workdir, proxy_file(target, server.sock, shm=shm, timeout=60000, **limit))
    client.write("A", 0, 20, 1000)
    server.signal(signal.SIGSTOP)
    try:
        if wait == "block":
            client.send("result = write('B', 0, 2000, 1000)")  # 2 MB: blocks once the backlog is full
        else:
            client.write("B", 0, 600, 1000)
            client.send(f"f.{wait}()")
        time.sleep(0.5)  # let the wait begin (if it has not, the test proves a little less, never fails)
    finally:
        server = start_again(server)
    answer = client.reply(timeout=40)
    assert answer["ok"], f"{wait} raised {answer.get('error')}: {answer.get('message')}"
    if wait == "block":
        assert not answer["result"]["raised"], f"writes raised: {answer['result']['raised']}"
    if wait != "close":
        client.run("f.close()", timeout=40)
    written = keys("A", range(20)) | keys("B", range(2000 if wait == "block" else 600))
    assert_at_least_once(target.read_bytes(), written, written)


def test_records_written_while_the_server_is_stopped_or_restarting_all_arrive(
    transport_server, start_again, procs, workdir
):
    """Writes go on while the server is stopped for a second, and while it is dead and restarting."""
    server = transport_server
    target = workdir / "outages.log"
    client = Driver(procs, workdir, proxy_file(target, server.sock, shm=server.transport == "shm", timeout=10000))
    results = [client.write("A", 0, 200, 200)]
    server.signal(signal.SIGSTOP)
    try:
        results.append(client.write("B", 0, 200, 200, pause=0.005))  # about a second
    finally:
        server.signal(signal.SIGCONT)
    server.kill()
    results.append(client.write("C", 0, 200, 200, pause=0.002))  # the server is dead
    server = start_again(server)
    results.append(client.write("D", 0, 200, 200))
    client.run("f.sync()")
    client.run("f.close()")
    raised = [r["raised"] for r in results if r["raised"]]
    assert not raised, f"writes raised during the outages: {raised}"
    written = set().union(*(keys(tag, range(200)) for tag in "ABCD"))
    assert_at_least_once(target.read_bytes(), written, written)


def bounded_backlog_recovers(server, start_again, procs, workdir, shm: bool, on_full: str, outage: str) -> None:
    """max_queue overflows while the server is away; once it is back and the backlog is drained,
    10,000 further writes are all accepted and delivered, and ``dropped`` stays where it was."""
    target = workdir / "bounded.log"
    client = Driver(
        procs, workdir, proxy_file(target, server.sock, shm=shm, timeout=10000, max_queue=64 * 1024, on_full=on_full)
    )
    before = client.write("A", 0, 100, 100)
    client.run("f.sync()")
    server.signal(signal.SIGSTOP)
    try:
        stalled = client.write("B", 0, 2000, 1000)
    finally:
        if outage == "killed":
            server = start_again(server)
        else:
            server.signal(signal.SIGCONT)
    refused = set(range(2000)) - set(stalled["accepted"])
    assert refused, "precondition: 2 MB into a stopped server overflows a 64 KiB backlog"
    if on_full == "raise":
        assert set(stalled["raised"]) == refused and set(stalled["raised"].values()) == {"BlockingIOError"}
    else:
        assert not stalled["raised"], f"on_full='drop' raised: {stalled['raised']}"
    client.run("f.sync()")
    dropped = client.state()["dropped"]
    after = client.write("C", 0, 10000, sync_every=100)  # never more than ~5 KiB outstanding
    refused_after = 10000 - len(after["accepted"])
    assert refused_after == 0, f"{refused_after} of 10,000 writes refused after the server came back"
    assert client.state()["dropped"] == dropped
    client.run("f.close()")
    accepted = keys("A", before["accepted"]) | keys("B", stalled["accepted"]) | keys("C", range(10000))
    written = keys("A", range(100)) | keys("B", range(2000)) | keys("C", range(10000))
    assert_at_least_once(target.read_bytes(), accepted, written)


@pytest.mark.parametrize("outage", ["stopped", "killed"])
@pytest.mark.parametrize("shm", [True, False], ids=["shm", "socket"])
def test_drop_policy_recovers_after_the_server_returns(start_server, start_again, procs, workdir, shm, outage):
    bounded_backlog_recovers(start_server(*SMALL_RING), start_again, procs, workdir, shm, "drop", outage)


@pytest.mark.parametrize("outage", ["stopped", "killed"])
@pytest.mark.parametrize("shm", [True, False], ids=["shm", "socket"])
def test_raise_policy_recovers_after_the_server_returns(start_server, start_again, procs, workdir, shm, outage):
    bounded_backlog_recovers(start_server(*SMALL_RING), start_again, procs, workdir, shm, "raise", outage)


@pytest.mark.parametrize("shm", [True, False], ids=["shm", "socket"])
def test_block_policy_while_reconnecting_delivers_the_record(start_server, start_again, procs, workdir, shm):
    """on_full="block" with the server dead: the blocked write waits for the new server, whose
    reconnect must not need a lock the blocked write holds, and then its record is delivered."""
    server = start_server(*SMALL_RING)
    target = workdir / "block.log"
    client = Driver(
        procs, workdir, proxy_file(target, server.sock, shm=shm, timeout=10000, max_queue=4096, on_full="block")
    )
    client.write("A", 0, 10, 100)
    client.run("f.sync()")
    server.kill()
    client.send("result = write('B', 0, 40, 1000)")  # 40 KB into a 4 KiB backlog with no server
    time.sleep(0.5)  # let a write block (if none has yet, the test proves a little less, never fails)
    server = start_again(server)
    answer = client.reply(timeout=30)
    assert answer["ok"], f"the blocked write step raised {answer.get('error')}: {answer.get('message')}"
    assert not answer["result"]["raised"], f"blocked writes raised: {answer['result']['raised']}"
    client.run("f.close()")
    written = keys("A", range(10)) | keys("B", range(40))
    assert_at_least_once(target.read_bytes(), written, written)


def test_a_write_never_waits_for_a_stopping_server_to_say_why(procs, workdir):
    """A stopping server shuts every client's read side at once, but says "server exited"
    only after writing what it holds, which can take as long as its file is slow (here a
    FIFO nobody reads yet). A write that meets the shut socket returns at once: it does
    not wait for that word (the ProxyFile's timeout is 10 minutes). Nothing is lost."""
    import os
    import threading

    from offlog import ProxyFile
    from offlog.server import STOP_GRACE

    fifo = workdir / "slow.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # there, but not reading yet
    server = ServerProcess(procs, workdir).start()
    f = ProxyFile(str(fifo), server.sock, 600_000, shm=False)
    record = lambda i: b"%06d " % i + b"r" * 1016 + b"\n"  # noqa: E731
    try:
        for i in range(200):  # 200 KiB: the server's write blocks on the full pipe
            f.write(record(i))
        server.proc.send_signal(signal.SIGTERM)
        server.wait_log("shutting down")
        writer = threading.Thread(target=lambda: [f.write(record(i)) for i in range(200, 210)])
        writer.start()
        # Ten writes take microseconds. Waiting for the server's word would take until
        # it gives up on the FIFO (STOP_GRACE, 10 s): half of that tells the two apart.
        writer.join(STOP_GRACE / 2)
        assert not writer.is_alive(), "write() waited for the stopping server"
        assert server.proc.poll() is None, "the server has not said anything yet"
        collected = bytearray()
        done = threading.Event()

        def drain() -> None:
            while not done.is_set():
                try:
                    chunk = os.read(reader, 1 << 16)
                except BlockingIOError:
                    chunk = b""
                if chunk:
                    collected.extend(chunk)
                else:
                    time.sleep(0.01)

        draining = threading.Thread(target=drain)
        draining.start()
        try:
            assert server.proc.wait(60) == 0
            ServerProcess(procs, workdir, sock=server.sock).start()
            f.close()
            wanted = {record(i) for i in range(210)}
            deadline = time.monotonic() + 60
            while not wanted <= set(bytes(collected).splitlines(keepends=True)) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            done.set()
            draining.join(30)
        lines = bytes(collected).splitlines(keepends=True)
        assert wanted <= set(lines), "records were lost"
        assert set(lines) <= wanted, "a record was torn"
    finally:
        f.close()
        os.close(reader)
