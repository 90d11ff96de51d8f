"""Regressions found reviewing issue 10 (protocol machines, composed transports).

Each test names the bug it pins. They drive real servers (ours and a 0.x
peer), real sockets and threads in a child interpreter, as the rest of the
suite does.
"""

from __future__ import annotations

import pytest
from driver import run_script
from support import run_offlog


# Bug: ProtocolError stopped being a ValueError, but `offlog status` and
# `offlog reopen` still catch only (OSError, ValueError[, EOFError]); against a
# 0.x server transports.request raises ProtocolError and the command dies with
# a traceback instead of its one line (offlog 1.0 before issue 10 printed it).
@pytest.mark.parametrize("command", ["status", "reopen"])
def test_control_commands_against_a_0x_server_answer_in_one_line(command, peers, start_server, procs, workdir):
    server = start_server(pythonpath=peers["0.3.1"])
    result = run_offlog(procs, workdir, command, "-s", server.sock)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"offlog {command}: "), result.stderr


# Bug: two threads closing one ProxyFile. The second close() reaches
# Control.end_data while the connection machine is already CLOSING, so
# ClientConnection.send raises ProtocolError ("cannot send EndOfData in state
# CLOSING"); its finally then releases the socket (and the ring's semaphore)
# under the first close(), which fails with ValueError (fd -1) or
# posix_ipc.ExistentialError although the server answered BYE.
def test_two_threads_closing_one_proxyfile_both_return(transport_server, procs, workdir):
    shm = transport_server.transport == "shm"
    code = f"""
import json, threading
import offlog
outcomes = {{}}
lines = 0
for r in range(30):
    f = offlog.ProxyFile({str(workdir / "closed-twice.log")!r}, {transport_server.sock!r}, shm={shm!r})
    for i in range(200):
        f.write(b"%02d %06d\\n" % (r, i))
    lines += 200
    barrier = threading.Barrier(2)

    def closer():
        barrier.wait()
        try:
            f.close()
            outcome = "returned"
        except Exception as exc:
            outcome = type(exc).__module__ + "." + type(exc).__qualname__ + ": " + str(exc)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    threads = [threading.Thread(target=closer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
print(json.dumps({{"outcomes": outcomes, "lines": lines}}))
"""
    result = run_script(procs, workdir, code, "two close() calls on one ProxyFile hung")
    assert result["outcomes"] == {"returned": 60}
    assert (workdir / "closed-twice.log").read_bytes().count(b"\n") == result["lines"]


# Bug: sync() racing close() in another thread.
# (a) Once close() has half-closed the connection (machine state CLOSING),
#     sync's Control.flush_locked asks the machine to send FLUSH and gets
#     ProtocolError ("cannot send Flush in state CLOSING"): an exception class
#     no caller expects (neither the ValueError of a closed file nor an OSError).
# (b) A FLUSH left part-way out when close() shut the write side keeps
#     Transport._drain spinning for sync's whole timeout: every step re-sends
#     on the dead socket (EPIPE -> Transport.failed -> server_error) and
#     Transport.idle() runs check_control, both under the write token, with no
#     wait in between (idle() lost the "not closed" guard the old transport
#     had). close() waiting for BYE cannot get the token: a thread that keeps
#     calling sync() until the file is closed starves close() forever.
def test_sync_racing_close_never_raises_a_protocol_error_nor_starves_close(transport_server, procs, workdir):
    shm = transport_server.transport == "shm"
    code = f"""
import json, threading, time
import offlog
raised = {{}}
for r in range(20):
    f = offlog.ProxyFile({str(workdir / "synced.log")!r}, {transport_server.sock!r}, 1000, shm={shm!r})
    for i in range(100):
        f.write(b"%02d %06d\\n" % (r, i))

    def syncer():
        while not f.closed:
            try:
                f.sync()
            except Exception as exc:
                name = type(exc).__module__ + "." + type(exc).__qualname__
                raised[name] = raised.get(name, 0) + 1

    t = threading.Thread(target=syncer)
    t.start()
    time.sleep(0.02)
    f.close()
    t.join()
print(json.dumps(raised))
"""
    raised = run_script(procs, workdir, code, "close() starved by a thread calling sync()", timeout=50)
    assert not [name for name in raised if "ProtocolError" in name], raised


# Bug: close() while other threads wait for room in a full backlog
# (on_full="block"). Transport.idle() runs check_control whenever the
# connection is ending, also once close() owns that end (the old transport
# skipped it when closed): a waiting writer's step reads the server's BYE and
# EOF, Transport.failed -> Control.server_error pops the BYE that close()
# waits for, and without a reconnect fail_locked marks the transport broken.
# close() then raises BrokenPipeError although the server wrote everything and
# said BYE, and the writers racing close() get BrokenPipeError, not the
# ValueError of a closed file.
def test_close_with_writers_waiting_for_room_returns_and_they_get_value_error(transport_server, procs, workdir):
    shm = transport_server.transport == "shm"
    code = f"""
import json, threading, time
import offlog
outcomes, writers_raised, missing = {{}}, {{}}, []
record = b"y" * 65535 + b"\\n"
for r in range(150):
    target = {str(workdir)!r} + "/blocked-%d.log" % r
    f = offlog.ProxyFile(target, {transport_server.sock!r}, 10000, shm={shm!r}, max_queue=1, on_full="block",
                         reconnect=False)
    accepted = [0, 0, 0]

    def writer(w):
        while True:
            try:
                f.write(record)
            except Exception as exc:
                name = type(exc).__qualname__
                writers_raised[name] = writers_raised.get(name, 0) + 1
                return
            accepted[w] += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    try:
        f.close()
        outcome = "returned"
    except Exception as exc:
        outcome = type(exc).__qualname__ + ": " + str(exc)
    outcomes[outcome] = outcomes.get(outcome, 0) + 1
    for t in threads:
        t.join()
    if open(target, "rb").read().count(b"\\n") != sum(accepted):
        missing.append(r)
print(json.dumps({{"outcomes": outcomes, "writers": writers_raised, "missing": missing}}))
"""
    result = run_script(procs, workdir, code, "close() with writers waiting for room hung", timeout=100)
    assert result["missing"] == []
    assert result["outcomes"] == {"returned": 150}
    assert set(result["writers"]) == {"ValueError"}, result["writers"]


# Same bug, with a reconnect (the default): the writer that consumed the BYE
# makes close() see an end without BYE while payloads since the last WRITTEN
# are unconfirmed, so close() hands them to a reconnect, which sends them
# again: records appear twice although no server died.
def test_close_with_writers_waiting_for_room_repeats_nothing(server, procs, workdir):
    code = f"""
import json, threading, time
import offlog
repeated = []
record = b"y" * 16383 + b"\\n"
for r in range(300):
    target = {str(workdir)!r} + "/blocked-%d.log" % r
    f = offlog.ProxyFile(target, {server.sock!r}, 10000, shm=False, max_queue=1, on_full="block")
    accepted = [0, 0, 0]

    def writer(w):
        while True:
            try:
                f.write(record)
            except ValueError:
                return
            accepted[w] += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    f.close()
    for t in threads:
        t.join()
    lines = open(target, "rb").read().count(b"\\n")
    if lines != sum(accepted):
        repeated.append((r, lines, sum(accepted)))
print(json.dumps(repeated))
"""
    repeated = run_script(procs, workdir, code, "close() with writers waiting for room hung", timeout=110)
    assert repeated == [], "(round, lines in the file, writes accepted)"


# Bug (still there after the fixes above): a thread calling sync() while
# close() waits for BYE, ring transport without a reconnect. The channel keeps
# one queue of answers for every waiter (_Channel._events), so the sync()'s
# Transport._next_event can take the BYE close() waits for (and drop it: it is
# not its FLUSHED); close() then meets an EOF without BYE, and
# Transport._nothing_unconfirmed asks Producer.unconfirmed_bytes(), which
# counts from the producer's cached tail, not the ring's TAIL, so it finds
# bytes "unconfirmed" that the server has written: close() raises
# BrokenPipeError although every record is in the file and the server said BYE.
def test_close_of_a_ring_racing_sync_returns_once_the_server_said_bye(shm_server, procs, workdir):
    code = f"""
import json, threading, time
import offlog
outcomes, short = {{}}, []
for r in range(150):
    target = {str(workdir)!r} + "/ring-%d.log" % r
    f = offlog.ProxyFile(target, {shm_server.sock!r}, 5000, shm=True, reconnect=False)
    for i in range(1000):
        f.write(b"%06d\\n" % i)

    def syncer():
        while not f.closed:
            try:
                f.sync()
            except Exception:
                pass

    t = threading.Thread(target=syncer)
    t.start()
    time.sleep(0.02)
    try:
        f.close()
        outcome = "returned"
    except Exception as exc:
        outcome = type(exc).__qualname__ + ": " + str(exc)
    outcomes[outcome] = outcomes.get(outcome, 0) + 1
    t.join()
    if open(target, "rb").read().count(b"\\n") != 1000:
        short.append(r)
print(json.dumps({{"outcomes": outcomes, "short": short}}))
"""
    result = run_script(procs, workdir, code, "close() of a ring racing sync() hung", timeout=100)
    assert result["short"] == []
    assert result["outcomes"] == {"returned": 150}
