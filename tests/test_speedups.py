"""The C hot path (offlog._speedups) and the pure-Python one behave alike; CI runs the C one.

Every test that takes the ``implementation`` fixture runs twice: with ``Producer.write`` in C
(``offlog/_speedups.c``) and with the Python reference (``offlog.shm.ring.python_write``), in
this process (the fixture puts that write into ``Producer``) and in every child interpreter
(``OFFLOG_PUREPYTHON``). Where the extension is not built the C runs are skipped, except in
CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import array
import errno
import gc
import importlib.util
import mmap
import os
import subprocess
import sys
import weakref

import pytest
import ringcheck
import test_interrupts
import test_shm
from driver import run_script
from records import TESTS, record
from support import REPO, child_env

import offlog
from offlog.shm import layout
from offlog.shm.objects import unsupported_reason
from offlog.shm.ring import Consumer, Producer, python_write

BUILT = importlib.util.find_spec("offlog._speedups") is not None
IN_CI = os.environ.get("CI") == "true"
PURE_FORCED = os.environ.get("OFFLOG_PUREPYTHON", "") not in ("", "0")

needs_rings = pytest.mark.skipif(unsupported_reason() is not None, reason=f"no rings here: {unsupported_reason()}")


def require_built() -> None:
    if not BUILT:
        if IN_CI:
            pytest.fail("CI must build offlog._speedups (pip install -e '.[test]' with a C compiler)")
        pytest.skip("offlog._speedups is not built here (pip install -e . builds it where a C compiler exists)")


@pytest.fixture(params=["c", "python"])
def implementation(request, monkeypatch):
    """Producer.write in C or in Python, here and in every child interpreter started."""
    if request.param == "c":
        require_built()
        from offlog._speedups import producer_write

        monkeypatch.setattr(Producer, "write", producer_write(Producer))
        monkeypatch.delenv("OFFLOG_PUREPYTHON", raising=False)
    else:
        monkeypatch.setattr(Producer, "write", python_write)
        monkeypatch.setenv("OFFLOG_PUREPYTHON", "1")
    return request.param


# -- which implementation runs -------------------------------------------------------------------
def test_ci_runs_the_c_write():
    if not IN_CI:
        pytest.skip(f"not CI; here offlog.__with_speedups__ is {offlog.__with_speedups__}")
    assert BUILT, "CI must build offlog._speedups"
    assert offlog.__with_speedups__ is not PURE_FORCED


@pytest.mark.parametrize("pure", [False, True], ids=["default", "OFFLOG_PUREPYTHON=1"])
def test_producer_write_is_the_c_one_unless_pure_python_is_forced(pure):
    if not pure:
        require_built()
    env = child_env()
    env.pop("OFFLOG_PUREPYTHON", None)
    if pure:
        env["OFFLOG_PUREPYTHON"] = "1"
    code = (
        "import offlog\nfrom offlog.shm.ring import Producer, python_write\n"
        "print(offlog.__with_speedups__, Producer.write is python_write, type(Producer.__dict__['write']).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == (["False", "True", "function"] if pure else ["True", "False", "method_descriptor"])


def test_the_c_cores_layout_is_layout_py():
    require_built()
    from offlog._speedups import LAYOUT

    assert {name: getattr(layout, name) for name in LAYOUT} == LAYOUT
    assert {"HEAD_WORD", "TAIL_WORD", "STATE_WORD", "ERRNO_WORD", "HEADER_SIZE", "SLEEPING", "FAILED"} <= set(LAYOUT)


def test_a_build_without_a_compiler_installs_pure_python_with_a_one_line_note(workdir):
    pytest.importorskip("setuptools", minversion="61")  # what pyproject.toml builds with
    if not (REPO / "setup.py").exists():
        pytest.skip("tests run beside an installed wheel, without the source tree")
    build = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "-q",
            "build_ext",
            "--build-lib",
            str(workdir / "lib"),
            "--build-temp",
            str(workdir / "temp"),
        ],
        cwd=str(REPO),
        env=dict(os.environ, CC="false"),
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    notes = [line for line in build.stderr.splitlines() if line.startswith("offlog:")]
    assert len(notes) == 1 and "offlog runs in pure Python" in notes[0], build.stderr
    assert not list(workdir.rglob("_speedups*.so"))


# -- the hot path, in this process ------------------------------------------------------------
class Ring:
    """One ring in this process: its consumer, and a producer whose doorbell and
    on_failed calls are recorded with whether the write token was held."""

    def __init__(self, capacity: int = layout.MIN_CAPACITY, doorbell=None, on_failed=None) -> None:
        self.mapping = mmap.mmap(-1, layout.mapping_size(capacity))
        self.consumer = Consumer(self.mapping, capacity)
        self.words = memoryview(self.mapping)[: layout.HEADER_SIZE].cast("Q")
        self.calls = []
        self.producer = Producer(self.mapping, capacity, self._doorbell, self._on_failed)
        self.on_doorbell, self.on_failed = doorbell, on_failed

    def _doorbell(self) -> None:
        self.calls.append(("doorbell", self.token_held()))
        if self.on_doorbell:
            self.on_doorbell()

    def _on_failed(self, code: int) -> None:
        self.calls.append(("failed", code, self.token_held()))
        if self.on_failed:
            self.on_failed(code)

    def token_held(self) -> bool:
        return len(self.producer._token) == 0

    def drain(self) -> bytes:
        head = self.consumer.available()
        data = b"".join(bytes(view) for view in self.consumer.views(head))
        self.consumer.release(head)
        return data

    def published_consistently(self) -> bool:
        return self.producer._head == self.words[layout.HEAD_WORD] and len(self.producer._token) == 1


def test_every_kind_of_buffer_arrives_as_its_bytes(implementation):
    """The C write takes bytes, bytearray and byte memoryviews; every other buffer (and str)
    goes to the slow path, as in Python: either way the ring gets the same bytes, in order."""
    ring = Ring()
    chunk = b"0123456789abcdef"
    doubled = bytes(b for c in chunk for b in (c, 0))
    writes = [
        (chunk, chunk),
        (bytearray(chunk), chunk),
        (memoryview(chunk), chunk),
        (memoryview(b"xx" + chunk)[2:], chunk),
        (memoryview(doubled)[::2], chunk),  # not contiguous
        (memoryview(chunk).cast("c"), chunk),
        (array.array("B", chunk), chunk),
        (array.array("I", [1, 2]), array.array("I", [1, 2]).tobytes()),
        ("ünïcode\n", "ünïcode\n".encode()),
        (b"", b""),
    ]
    for data, _ in writes:
        ring.producer.write(data)
    assert ring.drain() == b"".join(expected for _, expected in writes)
    assert ring.published_consistently() and ring.calls == []


def test_a_write_that_finds_the_consumer_asleep_posts_the_doorbell_once_holding_the_token(implementation):
    ring = Ring()
    ring.producer.write(b"awake\n")
    assert ring.calls == []
    ring.words[layout.STATE_WORD] = layout.SLEEPING
    ring.producer.write(b"asleep\n")
    assert ring.calls == [("doorbell", True)]
    ring.words[layout.STATE_WORD] = layout.AWAKE
    ring.producer.write(b"awake again\n")
    assert ring.calls == [("doorbell", True)]
    assert ring.drain() == b"awake\nasleep\nawake again\n"
    assert ring.published_consistently()


def test_a_write_that_finds_the_ring_failed_calls_on_failed_with_its_errno(implementation):
    """The bytes are published first (TAIL tells whether they reached the file); on_failed
    runs with the token held and its exception is the write's; the hot path is left."""

    def raise_it(code):
        raise OSError(code, os.strerror(code))

    ring = Ring(on_failed=raise_it)
    ring.consumer.fail(errno.ENOSPC)
    with pytest.raises(OSError) as raised:
        ring.producer.write(b"published\n")
    assert raised.value.errno == errno.ENOSPC
    assert ring.calls == [("failed", errno.ENOSPC, True)]
    assert ring.published_consistently() and ring.producer._limit == -1
    assert ring.drain() == b"published\n"


def test_a_write_from_inside_the_doorbell_is_set_aside_and_follows_in_order(implementation):
    """A signal handler landing in the doorbell call (the only Python code the C write
    runs with the token held) writes: its record waits, nothing deadlocks or doubles the token."""
    ring = Ring()
    ring.on_doorbell = lambda: (setattr(ring, "on_doorbell", None), ring.producer.write(b"handler\n"))
    ring.words[layout.STATE_WORD] = layout.SLEEPING
    ring.producer.write(b"interrupted\n")
    assert ring.producer.backlog_bytes == len(b"handler\n")
    ring.words[layout.STATE_WORD] = layout.AWAKE
    ring.producer.write(b"next\n")
    assert ring.drain() == b"interrupted\nhandler\nnext\n"
    assert ring.published_consistently()


def test_an_interrupt_in_the_doorbell_leaves_the_bytes_once_and_the_token_free(implementation):
    def interrupt():
        ring.on_doorbell = None
        raise KeyboardInterrupt

    ring = Ring(doorbell=interrupt)
    ring.words[layout.STATE_WORD] = layout.SLEEPING
    with pytest.raises(KeyboardInterrupt):
        ring.producer.write(b"published\n")
    assert ring.published_consistently()
    ring.words[layout.STATE_WORD] = layout.AWAKE
    ring.producer.write(b"next\n")
    assert ring.drain() == b"published\nnext\n"


def test_a_leaked_token_is_put_back_and_the_write_goes_through(implementation):
    """A token whose holder vanished (an interrupt right after its pop): the write finds it
    taken, takes the slow path, which finds no holder and puts it back."""
    ring = Ring()
    ring.producer._token.pop()
    ring.producer.write(b"after the leak\n")
    ring.producer.write(b"hot again\n")
    assert ring.drain() == b"after the leak\nhot again\n"
    assert ring.published_consistently()


def test_a_producer_goes_with_its_last_reference(implementation):
    """No reference cycle: a dropped producer (and the mapping its views hold) goes at once,
    without the garbage collector, as the hang-up watcher's weak reference expects."""
    ring = Ring()
    gc.disable()
    try:
        write = ring.producer.write
        write(b"x")
        gone = weakref.ref(ring.producer)
        del ring.producer
        assert gone() is not None  # the bound write keeps it, as a bound Python method does
        del write
        assert gone() is None
    finally:
        gc.enable()


@needs_rings  # the Python consumer's ordering argument holds where rings are offered
def test_a_million_records_through_a_small_ring_every_byte_checked(implementation):
    verified = ringcheck.run(Producer, 1_000_000, capacity=1 << 16)
    assert verified == sum(len(ringcheck.record(i)) for i in range(1_000_000))


# -- through a real server ---------------------------------------------------------------------
WRITER = f"""
import array, json, sys
sys.path.insert(0, {TESTS!r})
from records import record
import offlog

target, sock, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
f = offlog.ProxyFile(target, sock, shm=True)
assert f.transport == "shm", f.transport
for n in range(count):
    rec = record("S", n, 70000 if n % 5000 == 4999 else 0)  # now and then more than the ring
    kind = n % 6
    if kind == 1:
        rec = bytearray(rec)
    elif kind == 2:
        rec = memoryview(b"--" + rec)[2:]
    elif kind == 3:
        rec = rec.decode()
    elif kind == 4:
        rec = array.array("B", rec)
    f.write(rec)
f.close()
print(json.dumps({{"speedups": offlog.__with_speedups__}}))
"""


@needs_rings
def test_every_byte_arrives_in_order_through_a_server(implementation, start_server, workdir, procs):
    server = start_server("--shm", "--ring-size", "64K")
    target = workdir / "ordered.log"
    count = 200_000
    proc = procs.start(
        [sys.executable, "-c", WRITER, str(target), server.sock, str(count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        cwd=str(workdir),
        text=True,
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == '{"speedups": %s}' % ("true" if implementation == "c" else "false")
    expected = b"".join(record("S", n, 70000 if n % 5000 == 4999 else 0) for n in range(count))
    data = target.read_bytes()
    assert len(data) == len(expected)
    assert data == expected, "bytes differ or out of order"


@needs_rings
def test_a_failed_file_reaches_the_writer_as_its_error(implementation, shm_server, workdir, procs):
    """The server cannot write /dev/full (ENOSPC): FAILED in the ring, and the writer's
    write() or close() raises the server's error."""
    code = f"""
import errno, json, offlog
f = offlog.ProxyFile("/dev/full", {shm_server.sock!r}, shm=True)
try:
    for _ in range(1_000_000):
        f.write(b"x" * 100)
    f.close()
except OSError as exc:
    print(json.dumps({{"errno": exc.errno, "speedups": offlog.__with_speedups__}}))
try:
    f.close()
except OSError:
    pass
"""
    result = run_script(procs, workdir, code, "a writer to a failed file hung")
    assert result == {"errno": errno.ENOSPC, "speedups": implementation == "c"}


@needs_rings
@pytest.mark.parametrize(
    "interrupts",
    [
        test_interrupts.test_keyboard_interrupts_never_wedge_a_proxyfile,
        test_interrupts.test_signal_handler_writing_to_the_proxyfile_it_interrupted,
    ],
    ids=["keyboard-interrupts", "handler-writes"],
)
def test_interrupts_inside_write(implementation, interrupts, shm_server, workdir, procs):
    shm_server.transport = "shm"
    interrupts(shm_server, workdir, procs)


@needs_rings
def test_killed_client_loses_nothing(implementation, shm_server, workdir, procs):
    test_shm.test_killed_client_loses_nothing(shm_server, workdir, procs)
