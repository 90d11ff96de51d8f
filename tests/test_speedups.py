"""The C hot paths (offlog._speedups) and the pure-Python ones behave alike; CI runs the C ones.

Every test that takes the ``implementation`` fixture runs twice: with ``Producer.write`` and
``Consumer.drain`` in C (``offlog/_speedups.c``) and with the Python references
(``offlog.shm.ring.python_write``, ``python_drain``), in this process (the fixture puts them
into the classes) and in every child interpreter, servers included (``OFFLOG_PUREPYTHON``).
Where the extension is not built the C runs are skipped, except in CI (``CI=true``), where
that is a failure. A test that needs rings offered (``require_rings``) skips the Python run on
a machine where only the C core gets rings (aarch64).
"""

from __future__ import annotations

import array
import errno
import fcntl
import gc
import importlib.util
import mmap
import os
import resource
import subprocess
import sys
import weakref

import pytest
import ringcheck
import test_files
import test_interrupts
import test_shm
from driver import run_script
from records import TESTS, record
from support import REPO, child_env

import offlog
from offlog.shm import layout
from offlog.shm.objects import unsupported_reason
from offlog.shm.ring import Consumer, Producer, RingCorrupt, python_drain, python_write

BUILT = importlib.util.find_spec("offlog._speedups") is not None
IN_CI = os.environ.get("CI") == "true"
PURE_FORCED = os.environ.get("OFFLOG_PUREPYTHON", "") not in ("", "0")


def require_built() -> None:
    if not BUILT:
        if IN_CI:
            pytest.fail("CI must build offlog._speedups (pip install -e '.[test]' with a C compiler)")
        pytest.skip("offlog._speedups is not built here (pip install -e . builds it where a C compiler exists)")


@pytest.fixture(params=["c", "python"])
def implementation(request, monkeypatch):
    """Producer.write and Consumer.drain in C or in Python, here and in every child interpreter started."""
    if request.param == "c":
        require_built()
        from offlog._speedups import consumer_drain, producer_write

        monkeypatch.setattr(Producer, "write", producer_write(Producer))
        monkeypatch.setattr(Consumer, "drain", consumer_drain(Consumer, RingCorrupt))
        monkeypatch.delenv("OFFLOG_PUREPYTHON", raising=False)
    else:
        monkeypatch.setattr(Producer, "write", python_write)
        monkeypatch.setattr(Consumer, "drain", python_drain)
        monkeypatch.setenv("OFFLOG_PUREPYTHON", "1")
    return request.param


def require_rings(implementation: str) -> None:
    """Skip unless processes running ``implementation`` are offered rings here."""
    reason = unsupported_reason(speedups=implementation == "c")
    if reason is not None:
        pytest.skip(f"no rings here for the {implementation} implementation: {reason}")


def runs_c_drain(pid: int) -> bool:
    """The server ``pid`` loaded offlog._speedups (so its Consumer.drain is the C one)."""
    with open(f"/proc/{pid}/maps") as maps:
        return "_speedups" in maps.read()


# -- which implementation runs -------------------------------------------------------------------
def test_ci_runs_the_c_write():
    if not IN_CI:
        pytest.skip(f"not CI; here offlog.__with_speedups__ is {offlog.__with_speedups__}")
    assert BUILT, "CI must build offlog._speedups"
    assert offlog.__with_speedups__ is not PURE_FORCED


@pytest.mark.parametrize("pure", [False, True], ids=["default", "OFFLOG_PUREPYTHON=1"])
def test_the_hot_paths_are_the_c_ones_unless_pure_python_is_forced(pure):
    if not pure:
        require_built()
    env = child_env()
    env.pop("OFFLOG_PUREPYTHON", None)
    if pure:
        env["OFFLOG_PUREPYTHON"] = "1"
    code = (
        "import offlog\nfrom offlog.shm.ring import Consumer, Producer, python_drain, python_write\n"
        "print(offlog.__with_speedups__, Producer.write is python_write, type(Producer.__dict__['write']).__name__,"
        " Consumer.drain is python_drain, type(Consumer.__dict__['drain']).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    if pure:
        assert out.split() == ["False", "True", "function", "True", "function"]
    else:
        assert out.split() == ["True", "False", "method_descriptor", "False", "method_descriptor"]


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


def test_a_million_records_through_a_small_ring_every_byte_checked(implementation):
    require_rings(implementation)  # the Python producer's ordering argument holds only there
    verified = ringcheck.run(Producer, 1_000_000, capacity=1 << 16)
    assert verified == sum(len(ringcheck.record(i)) for i in range(1_000_000))


# -- through a real server ---------------------------------------------------------------------
WRITER = f"""
import array, json, sys
sys.path.insert(0, {TESTS!r})
from records import record
import offlog

target, sock, count, tag, big = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] == "big"
f = offlog.ProxyFile(target, sock, shm=True)
assert f.transport == "shm", f.transport
for n in range(count):
    rec = record(tag, n, 70000 if big and n % 5000 == 4999 else 0)  # now and then more than the ring
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


def start_writers(implementation: str, procs, server, target, count: int, tags: str, big: bool) -> None:
    """One WRITER process per letter of ``tags``, all at once; wait for them all (each ran
    ``implementation``'s write)."""
    started = [
        procs.start(
            [sys.executable, "-c", WRITER, str(target), server.sock, str(count), tag, "big" if big else "small"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            cwd=str(target.parent),
            text=True,
        )
        for tag in tags
    ]
    for proc in started:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        assert out.strip() == '{"speedups": %s}' % ("true" if implementation == "c" else "false")


def test_every_byte_arrives_in_order_through_a_server(implementation, start_server, workdir, procs):
    """One client: every pass drains its ring alone (``Consumer.drain``, in C or in Python)."""
    require_rings(implementation)
    server = start_server("--shm", "--ring-size", "64K")
    assert runs_c_drain(server.pid) is (implementation == "c")
    target = workdir / "ordered.log"
    count = 200_000
    start_writers(implementation, procs, server, target, count, "S", big=True)
    expected = b"".join(record("S", n, 70000 if n % 5000 == 4999 else 0) for n in range(count))
    data = target.read_bytes()
    assert len(data) == len(expected)
    assert data == expected, "bytes differ or out of order"


def test_three_rings_into_one_file_arrive_whole_and_each_in_order(implementation, start_server, workdir, procs):
    """Three clients of one file: a pass drains one ring alone or several rings into one
    append (``available``, ``views``, ``release``); either way each client's records arrive
    whole and in its order."""
    require_rings(implementation)
    server = start_server("--shm", "--ring-size", "64K")
    target = workdir / "shared.log"
    count = 60_000
    start_writers(implementation, procs, server, target, count, "ABC", big=False)
    seen = {tag: 0 for tag in "ABC"}
    for line in target.read_bytes().splitlines(keepends=True):
        tag = line[:1].decode()
        assert line == record(tag, seen[tag]), f"record {seen[tag]} of {tag} is not next: {line[:40]!r}"
        seen[tag] += 1
    assert seen == {tag: count for tag in "ABC"}


def test_a_failed_file_reaches_the_writer_as_its_error(implementation, shm_server, workdir, procs):
    """The server cannot write /dev/full (ENOSPC): FAILED in the ring, and the writer's
    write() or close() raises the server's error."""
    require_rings(implementation)
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


@pytest.mark.parametrize(
    "interrupts",
    [
        test_interrupts.test_keyboard_interrupts_never_wedge_a_proxyfile,
        test_interrupts.test_signal_handler_writing_to_the_proxyfile_it_interrupted,
    ],
    ids=["keyboard-interrupts", "handler-writes"],
)
def test_interrupts_inside_write(implementation, interrupts, shm_server, workdir, procs):
    require_rings(implementation)
    shm_server.transport = "shm"
    interrupts(shm_server, workdir, procs)


def test_killed_client_loses_nothing(implementation, shm_server, workdir, procs):
    require_rings(implementation)
    test_shm.test_killed_client_loses_nothing(shm_server, workdir, procs)


def test_a_file_size_limit_cuts_a_ring_append_back_to_whole_records(implementation, shm_server, workdir):
    """RLIMIT_FSIZE makes the drain's writev short and the next one fail with EFBIG: the
    append is cut back to where it began (nothing half-written), the client gets EFBIG."""
    require_rings(implementation)
    assert runs_c_drain(shm_server.pid) is (implementation == "c")
    path = workdir / "app.log"
    f = offlog.ProxyFile(str(path), shm_server.sock, shm=True)  # its ring's memory counts too: made first
    assert f.transport == "shm"
    limit = 20 * test_files.RECORD + test_files.RECORD // 2
    resource.prlimit(shm_server.pid, resource.RLIMIT_FSIZE, (limit, limit))
    error = test_files.write_until_error(f, test_files.record)
    assert isinstance(error, OSError) and error.errno == errno.EFBIG, repr(error)
    assert str(path) in str(error)
    assert test_files.whole_records(path.read_bytes()) <= 20


@pytest.mark.parametrize(
    "word, value", [(layout.HEAD_WORD, 1 << 40), (layout.MAGIC_WORD, 0x1234)], ids=["head", "magic"]
)
def test_a_corrupt_header_is_reported_as_ring_corrupted(implementation, shm_server, workdir, word, value):
    require_rings(implementation)
    assert runs_c_drain(shm_server.pid) is (implementation == "c")
    test_shm.test_a_client_that_scribbles_over_its_header_is_cut_off_alone(shm_server, workdir, word, value)


# -- the drain, in this process ----------------------------------------------------------------
def test_the_drain_writes_every_byte_in_order_across_the_wrap(implementation, workdir):
    ring = Ring()
    expected = bytearray()
    with open(workdir / "drained.log", "wb") as out:
        for n in range(3000):
            rec = record("D", n, n % 700)
            ring.producer.write(rec)
            expected += rec
            if n % 7 == 6:
                published = len(expected) - ring.consumer.tail
                assert ring.consumer.drain(out.fileno()) == published
        ring.consumer.drain(out.fileno())
    assert (workdir / "drained.log").read_bytes() == expected
    assert ring.consumer.tail == ring.words[layout.TAIL_WORD] == ring.words[layout.HEAD_WORD] == len(expected)
    assert ring.consumer.drain(1) == 0  # nothing published: no write at all


CORRUPTIONS = [
    (layout.HEAD_WORD, lambda tail, capacity: tail + capacity + 1),
    (layout.HEAD_WORD, lambda tail, capacity: tail - 1),
    (layout.MAGIC_WORD, lambda tail, capacity: 0x1234),
    (layout.CAPACITY_WORD, lambda tail, capacity: capacity * 2),
    (layout.VERSION_WORD, lambda tail, capacity: 99),
    (layout.DATA_OFFSET_WORD, lambda tail, capacity: 0),
]


@pytest.mark.parametrize(
    "word, value", CORRUPTIONS, ids=["head-ahead", "head-behind", "magic", "capacity", "version", "data-offset"]
)
def test_both_drains_refuse_a_corrupt_header_in_the_same_words_and_write_nothing(workdir, word, value):
    require_built()
    from offlog._speedups import consumer_drain

    c_drain = consumer_drain(Consumer, RingCorrupt)
    ring = Ring()
    ring.producer.write(b"a record\n")
    path = workdir / "corrupt.log"
    with open(path, "wb") as out:
        python_drain(ring.consumer, out.fileno())
        ring.producer.write(b"another\n")
        ring.words[word] = value(ring.consumer.tail, layout.MIN_CAPACITY)
        raised = []
        for drain in (python_drain, c_drain):
            with pytest.raises(RingCorrupt) as corrupt:
                drain(ring.consumer, out.fileno())
            raised.append(str(corrupt.value))
    assert raised[0] == raised[1]
    assert path.read_bytes() == b"a record\n"
    assert ring.consumer.tail == ring.words[layout.TAIL_WORD] == len(b"a record\n")


def test_a_short_then_failed_write_leaves_the_ring_and_says_how_much_got_out(implementation):
    """A non-blocking pipe takes part of the bytes, then EAGAIN: the drain raises that
    OSError with ``characters_written`` (what the caller cuts off from a regular file),
    TAIL stays; once the pipe has room, the next drain writes everything again."""
    ring = Ring()
    reader, writer = os.pipe()
    try:
        os.set_blocking(writer, False)
        room = fcntl.fcntl(writer, fcntl.F_SETPIPE_SZ, 4096)
        data = bytes(range(256)) * 24  # more than the pipe takes
        ring.producer.write(data)
        with pytest.raises(OSError) as failed:
            ring.consumer.drain(writer)
        assert failed.value.errno == errno.EAGAIN
        assert failed.value.characters_written == room
        assert ring.consumer.tail == ring.words[layout.TAIL_WORD] == 0
        assert os.read(reader, 1 << 16) == data[:room]
        fcntl.fcntl(writer, fcntl.F_SETPIPE_SZ, 2 * len(data))
        assert ring.consumer.drain(writer) == len(data)
        assert ring.consumer.tail == ring.words[layout.TAIL_WORD] == len(data)
        assert os.read(reader, 1 << 16) == data
    finally:
        os.close(reader)
        os.close(writer)
