"""Bounds the server keeps whatever its clients do: ring memory, the handshake's length."""

from __future__ import annotations

import select
import socket
import struct

import offlog
from offlog.client import server_status


def test_rings_past_max_ring_memory_get_the_socket_and_the_log_says_why(start_server, workdir):
    """--max-ring-memory caps the rings of all clients together: a client past it is
    served on the socket (its OPENED note and the server's log say why), and the
    memory a closed ring held is offered again."""
    server = start_server("--shm", "--ring-size", "64K", "--max-ring-memory", "128K")
    first, second, third = (
        offlog.ProxyFile(str(workdir / f"{name}.log"), server.sock) for name in ("first", "second", "third")
    )
    try:
        assert [f.transport for f in (first, second, third)] == ["shm", "shm", "socket"]
        shm = server_status(server.sock)["shm"]
        assert (shm["ring_memory"], shm["max_ring_memory"]) == (128 * 1024, 128 * 1024)
        server.wait_log(
            "transport: socket (ring memory limit reached (131072 bytes in rings, --max-ring-memory 131072))"
        )
        for f in (first, second, third):
            f.write(b"written\n")
        first.close()
        fourth = offlog.ProxyFile(str(workdir / "fourth.log"), server.sock)
        assert fourth.transport == "shm"
        fourth.write(b"written\n")
        fourth.close()
    finally:
        for f in (first, second, third):
            f.close()
    for name in ("first", "second", "third", "fourth"):
        assert (workdir / f"{name}.log").read_bytes() == b"written\n"
    assert server_status(server.sock)["shm"]["ring_memory"] == 0


def test_a_handshake_trickled_a_byte_at_a_time_is_cut_at_its_total_deadline(start_server, workdir):
    """The handshake timeout bounds the whole handshake, not each read: a peer that
    sends one byte every 0.2 s is refused once --handshake-timeout has passed."""
    server = start_server("--handshake-timeout", "1")
    path = str(workdir / "slow.log").encode()
    request = b"\0OFFLOG\0" + b"O" + struct.pack("<IHH", 4 + len(path), 2, 0) + path
    sent, reply = 0, b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(server.sock)
        while sent < len(request):
            try:
                sock.send(request[sent : sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            if select.select([sock], [], [], 0.2)[0]:
                chunk = sock.recv(4096)
                reply += chunk
                if not chunk or b"within" in reply:
                    break
        sock.settimeout(30)
        while b"within" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert sent < len(request), "the server waited for the whole trickled handshake"
    assert b"TimeoutError: no handshake within 1 s" in reply
    server.wait_log("no handshake within 1 s")
