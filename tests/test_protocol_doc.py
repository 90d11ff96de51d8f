"""docs/protocol.md, byte for byte: what a client written from the document meets.

Every test here drives a real server over a raw Unix socket, as a C client
would, and asserts the exact bytes the document promises. Frames are built
and parsed by hand (struct), not with offlog.protocol, so a mistake shared by
the code and its encoders cannot hide. A ring's memfd is received with
recvmsg (SCM_RIGHTS) and mapped with mmap directly, its doorbell posted with
the C library's sem_post, without offlog's Producer.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import fcntl
import json
import mmap
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import textwrap
from pathlib import Path

import pytest
from support import REPO, wait_for

from offlog import protocol as P

PREAMBLE = b"\0OFFLOG\0"
GREETING = b"OFFLOG\0"
WANT_SHM = 1
NO_RING_NOTE = b"server started without --shm"
PROTOCOL_MD = REPO / "docs" / "protocol.md"


# -- bytes, by hand ------------------------------------------------------------------
def frame(ftype: bytes, payload: bytes = b"") -> bytes:
    return ftype + struct.pack("<I", len(payload)) + payload


def open_frame(path: bytes, flags: int = 0, version: int = 3) -> bytes:
    return frame(b"O", struct.pack("<HH", version, flags) + path)


def u64(ftype: bytes, value: int) -> bytes:
    return frame(ftype, struct.pack("<Q", value))


def error_frame(code: int, text: str) -> bytes:
    return frame(b"E", struct.pack("<I", code) + text.encode())


def opened(note: bytes = NO_RING_NOTE, flags: int = 0, version: int = 3) -> bytes:
    return frame(b"K", struct.pack("<HH", version, flags) + note)


def protocol_error(detail: str) -> bytes:
    return error_frame(0, f"ValueError: protocol error: {detail}")


SERVER_EXITED_FRAMED = error_frame(errno.ESHUTDOWN, "OSError: offlog server exited")
SERVER_EXITED_LEGACY = b"OSError: offlog server exited\0"


def connect(sock_path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(sock_path)
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything until the server closes (a reset counts as the end, 6.7)."""
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def read_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        assert chunk, f"EOF after {data!r}, expected {n} bytes"
        data += chunk
    return data


def exchange(sock_path: str, data: bytes) -> bytes:
    """Send ``data``, end it with SHUT_WR, return everything the server says."""
    with connect(sock_path) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return read_all(s)


def opened_session(sock_path: str, path: Path, then: bytes = b"") -> socket.socket:
    """A framed socket session on ``path`` whose OPENED has been read."""
    s = connect(sock_path)
    s.sendall(PREAMBLE + open_frame(bytes(path)) + then)
    assert read_exactly(s, len(GREETING + opened())) == GREETING + opened()
    return s


# -- section 3: EOF and the dialects ----------------------------------------------------
@pytest.mark.parametrize("sent", [b"\0", b"\0OFF", b"\0OFFLOG"], ids=["nul", "half-preamble", "seven-bytes"])
def test_eof_inside_the_preamble_is_an_empty_legacy_path(server, sent):
    """(3) A connection that ends while undecided is legacy: its NUL ended an empty path."""
    assert exchange(server.sock, sent) == b"ValueError: path must be absolute, got b''\0"


def test_eof_inside_a_legacy_path_is_closed_without_an_answer(server, workdir):
    assert exchange(server.sock, bytes(workdir / "half")) == b""
    assert not (workdir / "half").exists()


def test_eof_after_the_preamble_is_closed_after_the_greeting(server):
    assert exchange(server.sock, PREAMBLE) == GREETING


def test_eof_inside_the_open_frame_is_closed_after_the_greeting(server, workdir):
    whole = open_frame(bytes(workdir / "a.log"))
    assert exchange(server.sock, PREAMBLE + whole[:-3]) == GREETING
    assert not (workdir / "a.log").exists()


def test_eof_before_the_answer_to_an_offer_closes_without_a_frame(shm_server, workdir):
    with connect(shm_server.sock) as s:
        s.sendall(PREAMBLE + open_frame(bytes(workdir / "a.log"), WANT_SHM))
        read_offer(s)
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == b""


# -- section 4.5: ROTATED from a 0.3.1 server ---------------------------------------------
def test_a_0_3_1_server_says_rotated_and_writes_on_into_the_renamed_file(peers, start_server, workdir):
    """(4.5) After ROTATED the connection still writes to the renamed file; a new one gets the path."""
    # 0.3.1 hands the interval to epoll as seconds: 1 means a check after each idle second.
    server = start_server("--rotate-check-interval", "1", pythonpath=peers["0.3.1"])
    path, renamed = workdir / "app.log", workdir / "app.log.1"
    with connect(server.sock) as s:
        s.sendall(bytes(path) + b"\0" + b"old\n")
        assert read_exactly(s, 3) == b"OK\0"
        wait_for(lambda: path.read_bytes() == b"old\n", what="the first line")
        os.rename(path, renamed)
        assert read_exactly(s, 8) == b"ROTATED\0"
        s.sendall(b"still old\n")
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == b"BYE\0"
    assert exchange(server.sock, bytes(path) + b"\0" + b"new\n") == b"OK\0BYE\0"
    assert renamed.read_bytes() == b"old\nstill old\n"
    assert path.read_bytes() == b"new\n"


# -- section 5: frames the server accepts and refuses ------------------------------------
def test_eof_inside_a_frame_is_a_protocol_error_never_bye(server, workdir):
    """(5.5, 5.7) BYE says every byte is written, so a cut-off frame gets an ERROR instead."""
    target = workdir / "a.log"
    whole = frame(b"D", b"whole\n")
    cut = frame(b"D", b"cut off\n")[:-3]
    reply = exchange(server.sock, PREAMBLE + open_frame(bytes(target)) + whole + cut)
    assert reply == GREETING + opened() + protocol_error(
        f"end of data in the middle of a frame: {len(cut)} bytes discarded"
    )
    assert target.read_bytes() == b"whole\n"


def test_eof_inside_a_frame_header_is_a_protocol_error(server, workdir):
    reply = exchange(server.sock, PREAMBLE + open_frame(bytes(workdir / "a.log")) + b"D\x05")
    assert reply == GREETING + opened() + protocol_error("end of data in the middle of a frame: 2 bytes discarded")


def test_dropped_and_empty_data_in_the_data_phase(server, workdir):
    """(5.5, 5.7) DROPPED is a data-phase frame; a zero-length DATA appends nothing."""
    target = workdir / "a.log"
    with opened_session(server.sock, target, frame(b"D") + u64(b"X", 5) + u64(b"F", 1)) as s:
        assert read_exactly(s, 13) == u64(b"f", 1)
        status = json.loads(exchange(server.sock, PREAMBLE + frame(b"Q"))[len(GREETING) + 5 :])
        (client,) = [c for c in status["clients"] if c["file"] == str(target)]
        assert client["dropped_bytes"] == 5 and client["bytes_written"] == 0
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == frame(b"B")
    assert target.read_bytes() == b""


@pytest.mark.parametrize(
    "after_open, detail",
    [
        (frame(b"X", b"abc"), "expected an 8-byte payload"),
        (frame(b"F", b"\1"), "expected an 8-byte payload"),
        (frame(b"Q"), "unexpected frame 'Q' after the handshake"),
        (frame(b"R"), "unexpected frame 'R' after the handshake"),
        (open_frame(b"/tmp/x"), "unexpected frame 'O' after the handshake"),
        (frame(b"A"), "unexpected frame 'A' after the handshake"),
        (frame(b"Z"), "unexpected frame type 0x5a"),
        (u64(b"W", 0), "unexpected frame type 0x57"),
        (b"D" + struct.pack("<I", 64 * 1024 * 1024 + 1), "frame of 67108865 bytes exceeds 67108864"),
    ],
    ids=["dropped-3-bytes", "flush-1-byte", "status", "reopen", "open", "shm-accept", "unknown", "written", "64MiB+1"],
)
def test_protocol_errors_in_the_data_phase(server, workdir, after_open, detail):
    """(5.9) The detail texts, exactly; errno 0."""
    with opened_session(server.sock, workdir / "a.log") as s:
        s.sendall(after_open)
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == protocol_error(detail)


@pytest.mark.parametrize(
    "first, detail",
    [
        (u64(b"X", 0), "the first frame must be OPEN"),
        (frame(b"D", b"x"), "the first frame must be OPEN"),
        (frame(b"O", b"\2\0"), "OPEN frame too short"),
        (frame(b"O", struct.pack("<HH", 1, 0) + b"/tmp/x"), "protocol version 1 is not supported (need 2)"),
    ],
    ids=["dropped", "data", "short-open", "version-1"],
)
def test_protocol_errors_in_the_first_frame(server, first, detail):
    assert exchange(server.sock, PREAMBLE + first) == GREETING + protocol_error(detail)


def test_anything_but_an_answer_after_an_offer_is_a_protocol_error(shm_server, workdir):
    with connect(shm_server.sock) as s:
        s.sendall(PREAMBLE + open_frame(bytes(workdir / "a.log"), WANT_SHM))
        read_offer(s)
        s.sendall(u64(b"F", 1))
        assert read_all(s) == protocol_error("expected SHM_ACCEPT or SHM_DECLINE")


# -- section 6: error texts, classes, errnos --------------------------------------------------
def test_non_utf8_path_bytes_come_back_as_surrogate_escapes(server, workdir):
    """(6.1) Python's repr of the path: byte 0xff is the six characters \\udcff."""
    missing = bytes(workdir) + b"/missing\xff/a.log"
    shown = str(workdir) + "/missing\\udcff/a.log"
    text = f"FileNotFoundError: [Errno 2] No such file or directory: '{shown}'"
    assert exchange(server.sock, PREAMBLE + open_frame(missing)) == GREETING + error_frame(2, text)
    assert exchange(server.sock, missing + b"\0") == text.encode() + b"\0"
    relative = b"rel\xff/a.log"
    assert exchange(server.sock, relative + b"\0") == b"ValueError: path must be absolute, got b'rel\\xff/a.log'\0"


def error_cases(workdir: Path, sock_path: str):
    """(path, text after the class name's colon, class, errno) for open errors a test can cause."""
    (workdir / "dir").mkdir()
    (workdir / "file").write_bytes(b"")
    os.symlink(workdir / "loop", workdir / "loop")
    long_name = workdir / ("x" * 300)
    return [
        (workdir / "none" / "a.log", "No such file or directory", "FileNotFoundError", errno.ENOENT),
        (workdir / "dir", "Is a directory", "IsADirectoryError", errno.EISDIR),
        (workdir / "file" / "a.log", "Not a directory", "NotADirectoryError", errno.ENOTDIR),
        (long_name, "File name too long", "OSError", errno.ENAMETOOLONG),
        (workdir / "loop", "Too many levels of symbolic links", "OSError", errno.ELOOP),
        (Path(sock_path), "No such device or address", "OSError", errno.ENXIO),
    ]


def test_open_errors_carry_the_class_of_their_errno(server, workdir):
    """(6.3, 6.4) Class name and errno, in both dialects."""
    for path, strerror, name, code in error_cases(workdir, server.sock):
        text = f"{name}: [Errno {code}] {strerror}: '{path}'"
        assert exchange(server.sock, PREAMBLE + open_frame(bytes(path))) == GREETING + error_frame(code, text)
        assert exchange(server.sock, bytes(path) + b"\0") == text.encode() + b"\0"


def test_permission_error_has_errno_eacces_or_eperm(server, workdir):
    target = workdir / "readonly.log"
    target.write_bytes(b"")
    root = os.geteuid() == 0
    if root:  # root ignores modes: an immutable file refuses it (EPERM)
        subprocess.run(["chattr", "+i", str(target)], check=True)
    else:
        target.chmod(0o444)
    try:
        code = errno.EPERM if root else errno.EACCES
        text = f"PermissionError: [Errno {code}] {os.strerror(code)}: '{target}'"
        assert exchange(server.sock, PREAMBLE + open_frame(bytes(target))) == GREETING + error_frame(code, text)
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(target)], check=True)


def test_a_write_error_carries_its_errno(server):
    """(6.5) /dev/full fails the append with ENOSPC; the connection is closed."""
    with opened_session(server.sock, Path("/dev/full"), frame(b"D", b"x\n")) as s:
        assert read_all(s) == error_frame(28, "OSError: [Errno 28] No space left on device: '/dev/full'")


def test_a_fifo_whose_reader_left_is_a_broken_pipe(server, workdir):
    fifo = workdir / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    with opened_session(server.sock, fifo) as s:
        os.close(reader)
        s.sendall(frame(b"D", b"x\n"))
        assert read_all(s) == error_frame(errno.EPIPE, f"BrokenPipeError: [Errno 32] Broken pipe: '{fifo}'")


def test_server_exited_carries_eshutdown_in_every_framed_state(server, workdir):
    """(6.2, 6.6, 8.5) errno 108 in an ERROR frame; the legacy text has no number."""
    target = workdir / "a.log"
    data = opened_session(server.sock, target, frame(b"D", b"x\n") + u64(b"F", 1))
    assert read_exactly(data, 13) == u64(b"f", 1)
    greeted = connect(server.sock)
    greeted.sendall(PREAMBLE)
    assert read_exactly(greeted, 7) == GREETING
    legacy = connect(server.sock)
    legacy.sendall(bytes(target) + b"\0")
    assert read_exactly(legacy, 3) == b"OK\0"
    sessions = connected(server)
    undecided = connect(server.sock)
    undecided.sendall(b"\0OF")
    wait_for(lambda: connected(server) > sessions, what="the undecided client's session")
    server.signal(signal.SIGTERM)
    with data, greeted, legacy, undecided:
        assert read_all(data) == u64(b"W", 2) + SERVER_EXITED_FRAMED
        assert read_all(greeted) == SERVER_EXITED_FRAMED
        assert read_all(legacy) == SERVER_EXITED_LEGACY
        assert read_all(undecided) == SERVER_EXITED_LEGACY
    assert server.proc.wait(30) == 0
    assert target.read_bytes() == b"x\n"


def connected(server) -> int:
    return len(re.findall(r"Client \d+ connected", server.output()))


def doc_section(number: str) -> str:
    text = PROTOCOL_MD.read_text()
    start = text.index(f"\n### {number} ")
    return text[start : text.index("\n### ", start + 1)]


def test_the_class_table_is_pythons_errno_mapping_complete():
    """(6.3) Every OSError subclass Python can make from an errno is listed, with every errno
    that makes it, and nothing else: the server's class names are exactly these."""
    listed = {}
    for line in doc_section("6.3").splitlines():
        row = re.match(r"\| `(\w+Error)` \| ([^|]*) \|", line)
        if row and re.search(r"\d+ `E[A-Z]+`", row.group(2)):
            listed[row.group(1)] = {int(n) for n, _ in re.findall(r"(\d+) `(E[A-Z]+)`", row.group(2))}
            for n, name in re.findall(r"(\d+) `(E[A-Z]+)`", row.group(2)):
                assert errno.errorcode[int(n)] == name or getattr(errno, name) == int(n), (n, name)
    made = {}
    for code in errno.errorcode:
        made.setdefault(type(OSError(code, "x")).__name__, set()).add(code)
    made.pop("OSError")
    assert listed.pop("OSError") <= {code for code in errno.errorcode if type(OSError(code, "x")) is OSError}
    assert listed == made
    assert all(isinstance(getattr(builtins, name), type) for name in listed)


# -- section 7: the ring, as a C client maps it ---------------------------------------------------
SEALS = 0x1 | 0x2 | 0x4  # F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW (7.2)
F_GET_SEALS, F_ADD_SEALS = 1034, 1033
LIBC = ctypes.CDLL(None, use_errno=True)


def read_exactly_with_fds(s: socket.socket, n: int):
    """``n`` bytes read with recvmsg, as a client reads the answer to OPEN (7.2), and
    the descriptors that came with them."""
    data, fds = b"", []
    while len(data) < n:
        chunk, more, _, _ = socket.recv_fds(s, n - len(data), 4, socket.MSG_CMSG_CLOEXEC)
        assert chunk, f"EOF after {data!r}"
        data, fds = data + chunk, fds + more
    return data, fds


def read_offer(s: socket.socket):
    """(5.5, 7.2) The greeting, OPENED(SHM_OFFERED) and SHM_OFFER: (capacity, the
    descriptors that came with them)."""
    data, fds = read_exactly_with_fds(s, len(GREETING) + 9 + 13)
    assert data[:16] == GREETING + opened(b"", flags=1)
    assert data[16:21] == b"S" + struct.pack("<I", 8)
    return struct.unpack_from("<Q", data, 21)[0], fds


class RawRing:
    """A ring session set up by hand (7.2): receive the memfd, check it, map it, SHM_ACCEPT."""

    def __init__(self, sock_path: str, path: Path) -> None:
        self.sock = connect(sock_path)
        self.sock.sendall(PREAMBLE + open_frame(bytes(path), WANT_SHM))
        self.capacity, (fd,) = read_offer(self.sock)
        try:
            assert fcntl.fcntl(fd, F_GET_SEALS) & SEALS == SEALS
            assert os.fstat(fd).st_size == 256 + self.capacity
            self.map = mmap.mmap(fd, 256 + self.capacity)
        finally:
            os.close(fd)
        self.words = memoryview(self.map)[:256].cast("Q")
        self.head = 0
        self.sock.sendall(frame(b"A"))

    def publish(self, data: bytes) -> None:
        pos = 256 + (self.head & (self.capacity - 1))
        self.map[pos : pos + len(data)] = data
        self.head += len(data)
        self.words[8] = self.head
        self.post()  # whatever STATE says: an extra post is only a spurious wakeup (7.7)

    def post(self) -> None:
        doorbell = ctypes.c_char.from_buffer(self.map, 192)
        assert LIBC.sem_post(ctypes.byref(doorbell)) == 0
        del doorbell

    def close(self) -> None:
        self.words.release()
        self.map.close()
        self.sock.close()


def test_the_offer_carries_one_sealed_memfd_that_nobody_can_resize(shm_server, workdir):
    """(7.2, 7.3) One descriptor with the offer: a memfd of exactly 256 + capacity bytes,
    sealed; shrinking, growing and new seals fail with EPERM; its header is written."""
    with connect(shm_server.sock) as s:
        s.sendall(PREAMBLE + open_frame(bytes(workdir / "a.log"), WANT_SHM))
        capacity, fds = read_offer(s)
        assert capacity == 4 * 1024 * 1024 and len(fds) == 1
        (fd,) = fds
        try:
            assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:offlog-ring")
            assert fcntl.fcntl(fd, F_GET_SEALS) == SEALS
            assert os.fstat(fd).st_size == 256 + capacity
            for size in (0, 256, 256 + capacity + 4096):
                with pytest.raises(PermissionError):
                    os.ftruncate(fd, size)
            with pytest.raises(PermissionError):
                fcntl.fcntl(fd, F_ADD_SEALS, 0x8)  # F_SEAL_WRITE
            with mmap.mmap(fd, 256) as header:
                words = memoryview(header).cast("Q")
                assert words[:4].tolist() == [int.from_bytes(b"OFFLOGR2", "little"), 2, capacity, 256]
                assert words[8] == words[16] == words[17] == 0
                words.release()
        finally:
            os.close(fd)
        s.sendall(frame(b"N", b"only looking"))
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == frame(b"B")
    shm_server.wait_log("client could not use the ring: only looking")


def test_a_version_2_client_gets_no_ring_and_a_socket_session(shm_server, workdir):
    """(5.8) OPEN version 2 with WANT_SHM: OPENED version 2, no offer, the note says why."""
    target = workdir / "a.log"
    note = b"client too old for sealed rings (protocol 2)"
    with connect(shm_server.sock) as s:
        s.sendall(PREAMBLE + open_frame(bytes(target), WANT_SHM, version=2))
        answer = GREETING + opened(note, version=2)
        assert read_exactly_with_fds(s, len(answer)) == (answer, [])
        s.sendall(frame(b"D", b"old\n") + u64(b"F", 1))
        assert read_exactly(s, 13) == u64(b"f", 1)
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == frame(b"B")
    assert target.read_bytes() == b"old\n"
    shm_server.wait_log(f"transport: socket ({note.decode()})")


def test_a_ring_write_error_fails_state_before_the_bytes_tail(shm_server):
    """(7.5, 7.8) TAIL stays before the failed bytes; ERRNO, then FAILED, then the ERROR frame."""
    ring = RawRing(shm_server.sock, Path("/dev/full"))
    try:
        ring.publish(b"lost\n")
        assert read_all(ring.sock) == error_frame(28, "OSError: [Errno 28] No space left on device: '/dev/full'")
        assert (ring.words[16], ring.words[17], ring.words[18]) == (0, 2, errno.ENOSPC)
    finally:
        ring.close()


def test_a_ring_at_server_stop_is_drained_then_failed_with_eshutdown(shm_server, workdir):
    """(6.6, 7.8, 8.5) The final TAIL covers every published byte; no WRITTEN on a ring."""
    target = workdir / "a.log"
    ring = RawRing(shm_server.sock, target)
    try:
        shm_server.wait_log("transport: shm")
        ring.publish(b"published\n")
        shm_server.signal(signal.SIGTERM)
        assert read_all(ring.sock) == SERVER_EXITED_FRAMED
        assert (ring.words[16], ring.words[17], ring.words[18]) == (10, 2, errno.ESHUTDOWN)
    finally:
        ring.close()
    assert shm_server.proc.wait(30) == 0
    assert target.read_bytes() == b"published\n"


def test_the_c_header_in_the_document_has_the_offsets_of_the_table(tmp_path):
    """(7.3) The struct and its static asserts, compiled as a C client would."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    code = re.search(r"```c\n(.*?)```", doc_section("7.3"), re.S).group(1)
    source = tmp_path / "header.c"
    source.write_text(code + "\nint main(void) { return 0; }\n")
    argv = ["cc", "-std=c11", "-Wall", "-Werror", "-c", "-o", str(tmp_path / "header.o"), str(source)]
    cc = subprocess.run(argv, capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr + textwrap.indent(code, "    ")
    assert "_Static_assert(offsetof(struct offlog_ring_header, head) == 64" in code


# -- section 8.4: where confirmed bytes land -----------------------------------------------------
def test_a_new_open_moves_the_path_to_the_file_now_there(server, workdir):
    """(8.4) FLUSHED bytes of a deleted file are gone with it; an OPEN of the path makes the
    server reopen it before OPENED, so bytes FLUSHED after that are in the file at the path."""
    target = workdir / "a.log"
    with opened_session(server.sock, target, frame(b"D", b"before\n") + u64(b"F", 1)) as s:
        assert read_exactly(s, 13) == u64(b"f", 1)
        kept = os.open(target, os.O_RDONLY)
        try:
            os.unlink(target)
            with opened_session(server.sock, target):
                s.sendall(frame(b"D", b"after\n") + u64(b"F", 2))
                assert read_exactly(s, 13) == u64(b"f", 2)
                assert target.read_bytes() == b"after\n"
            assert os.pread(kept, 100, 0) == b"before\n"
        finally:
            os.close(kept)


def _doc_states(heading: str) -> list:
    """The state names of one table of docs/protocol.md 5.7, in order."""
    text = PROTOCOL_MD.read_text().split("### 5.7", 1)[1].split(heading, 1)[1]
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| State")) + 2  # header, |---|
    rows = []
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        rows.append(line.split("|")[1].strip())
    return rows


def test_the_state_tables_of_the_document_are_the_machines_tables():
    """(5.7) Each table lists exactly the states of its machine, in the machine's order,
    and every state named as a next state is one of them."""
    for heading, receives, sends in (
        ("Client states:", P.CLIENT_RECEIVES, P.CLIENT_SENDS),
        ("Server states:", P.SERVER_RECEIVES, P.SERVER_SENDS),
    ):
        machine = list(receives)
        assert _doc_states(heading) == machine
        assert list(sends) == machine
        targets = {state for table in (receives, sends) for row in table.values() for state in row.values()}
        assert targets <= set(machine)


def _worked_example_streams() -> dict:
    """(9) The two byte streams of the worked example's 'whole conversation' block."""
    text = PROTOCOL_MD.read_text().split("The whole conversation, as one stream per direction:", 1)[1]
    block = text.split("```", 2)[1]
    streams: dict = {}
    for line in block.splitlines():
        if line.endswith(":"):
            direction = line[:-1]
            streams[direction] = b""
        elif line.strip():
            streams[direction] += bytes.fromhex(re.match(r"((?:[0-9a-f]{2} ?)+)", line).group(1))
    return streams


def test_the_worked_example_is_what_the_connection_machines_say():
    """(9) The documented session, byte for byte, is what a ClientConnection and a
    ServerConnection produce, and each side reads the other's bytes as the events sent."""
    client, server = P.ClientConnection(), P.ServerConnection()
    to_server = client.send(P.Open("/tmp/app.log", 0))
    server.receive_data(to_server)
    assert server.next_event() == P.Preamble()
    to_client = server.send(P.Greeting())
    assert server.next_event() == P.Open("/tmp/app.log", 0, 3)
    to_client += server.send(P.Opened(note="server started without --shm"))
    client.receive_data(to_client)
    assert client.next_event() == P.Greeting()
    assert client.next_event() == P.Opened(0, "server started without --shm", 3)
    more = client.send(P.Data(memoryview(b"hello\n"))) + client.send(P.Flush(1))
    client.send(P.EndOfData())
    to_server += more
    server.receive_data(more)
    server.receive_data(b"")
    assert [bytes(server.next_event().payload), server.next_event()] == [b"hello\n", P.Flush(1)]
    answer = server.send(P.Flushed(1))
    assert server.next_event() == P.EndOfData()
    answer += server.send(P.Bye())
    to_client += answer
    client.receive_data(answer)
    client.receive_data(b"")
    assert [client.next_event(), client.next_event(), client.next_event()] == [P.Flushed(1), P.Bye(), P.Closed()]
    assert (client.state, server.state) == ("CLOSED", "CLOSED")
    assert _worked_example_streams() == {"client -> server": to_server, "server -> client": to_client}
