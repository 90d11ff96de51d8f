"""Server restarts are a non-event: clients keep writing, nothing is lost."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time

import pytest
from support import ServerProcess, child_env

import offlog

WRITER = """
import sys, time, offlog
path, sock, seconds, shm = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] == "shm"
f = offlog.ProxyFile(path, sock, shm=shm)
end = time.monotonic() + seconds
i = 0
while time.monotonic() < end:
    f.write(b"record %09d %s\\n" % (i, b"p" * (i % 50)))
    i += 1
    if i % 100 == 0:
        time.sleep(0.001)
f.close()
print(i)
"""

RECORD = re.compile(rb"record (\d{9}) (p*)")
RECORD_START = re.compile(rb"r|re|rec|reco|recor|record|record \d{0,9}")


def record(number: int) -> bytes:
    return b"record %09d %s" % (number, b"p" * (number % 50))


def whole(line: bytes) -> int:
    """The number of a whole record, or AssertionError."""
    m = RECORD.fullmatch(line)
    assert m and line == record(int(m.group(1))), f"torn record {line[:80]!r}"
    return int(m.group(1))


def after_cut(line: bytes) -> bytes:
    """A line that starts with a record cut short and goes on with a whole earlier one
    is what a server SIGKILLed in the middle of a multi-page write leaves before the
    batch the client re-sends (the kernel stops such a write at a page boundary:
    docs/protocol.md 8.5). Returns the whole record after the cut, or ``line``."""
    cut = line.rfind(b"record ", 1)
    if cut <= 0 or not RECORD.fullmatch(line[cut:]):
        return line
    head, rest = line[:cut], whole(line[cut:])
    if len(head) >= 16:
        assert record(int(head[7:16])).startswith(head) and rest <= int(head[7:16]), f"torn record {line[:80]!r}"
    else:
        assert RECORD_START.fullmatch(head), f"torn record {line[:80]!r}"
    return line[cut:]


def check_file(data: bytes, written: int) -> dict:
    """Every record present and whole, except copies a killed server's short write
    cut (each right before a re-sent batch); returns counts of what else happened."""
    lines = data.split(b"\n")
    assert lines[-1] == b"", "the file must end with a whole record"
    numbers = [whole(after_cut(line)) for line in lines[:-1]]
    cuts = sum(1 for line in lines[:-1] if after_cut(line) is not line)
    assert set(numbers) == set(range(written)), "records were lost"
    rewinds = sum(1 for a, b in zip(numbers, numbers[1:]) if b <= a)
    return {"records": len(numbers), "duplicates": len(numbers) - written, "rewinds": rewinds, "cuts": cuts}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["socket", "shm"])
def test_clients_survive_repeated_server_kills(procs, workdir, transport):
    """SIGKILL and restart the server every 1-3 s while three clients write for ~10 s."""
    sock = str(workdir / "chaos.sock")
    rng = random.Random(20261124)
    server = ServerProcess(procs, workdir, "--shm", sock=sock).start()
    seconds = 10.0
    writers = [
        procs.start(
            [sys.executable, "-c", WRITER, str(workdir / f"w{k}.log"), sock, str(seconds), transport],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            cwd=str(workdir),
            text=True,
        )
        for k in range(3)
    ]
    kills = 0
    end = time.monotonic() + seconds - 1.0
    while time.monotonic() < end:
        time.sleep(rng.uniform(1.0, 3.0))
        server.kill()
        kills += 1
        server = ServerProcess(procs, workdir, "--shm", sock=sock).start()
    results = []
    for k, w in enumerate(writers):
        out, err = w.communicate(timeout=60)
        assert w.returncode == 0 and not err, f"client {k} raised:\n{err}"
        results.append(check_file((workdir / f"w{k}.log").read_bytes(), int(out)))
    server.stop()
    assert kills >= 3
    for r in results:
        assert r["rewinds"] <= kills, f"duplicates away from the restarts: {r}"
        assert r["cuts"] <= r["rewinds"], f"a cut-off record not followed by a re-sent batch: {r}"
    print(f"{transport}: kills={kills} " + " ".join(f"{r}" for r in results))


@pytest.mark.parametrize("shm", [False, True], ids=["socket", "shm"])
def test_graceful_restart_loses_and_repeats_nothing(start_server, procs, workdir, shm):
    server = start_server("--shm")
    target = workdir / "g.log"
    f = offlog.ProxyFile(str(target), server.sock, shm=shm)
    for i in range(5000):
        f.write(b"%06d\n" % i)
    server.stop()  # SIGTERM: writes everything received, then says so
    for i in range(5000, 10000):
        f.write(b"%06d\n" % i)
    again = ServerProcess(procs, workdir, "--shm", sock=server.sock).start()
    for i in range(10000, 15000):
        f.write(b"%06d\n" % i)
    f.close()
    assert target.read_bytes() == b"".join(b"%06d\n" % i for i in range(15000))
    again.stop()


def test_file_errors_after_a_reconnect_still_raise(start_server, procs, workdir):
    """Only a lost server is retried: a file that became a directory raises."""
    server = start_server()
    target = workdir / "becomes-a-dir.log"
    f = offlog.ProxyFile(str(target), server.sock)
    f.write(b"one\n")
    f.sync()
    server.kill()
    target.unlink()
    target.mkdir()
    ServerProcess(procs, workdir, sock=server.sock).start()
    with pytest.raises(IsADirectoryError):
        for _ in range(500):
            f.write(b"two\n")
            time.sleep(0.01)
        f.close()
