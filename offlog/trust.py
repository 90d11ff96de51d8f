"""Who is at the other end of a Unix socket, and whether a client trusts it.

Theory of operation
-------------------
A socket path is only a name in a directory, and the default one is in /tmp:
any local user can bind it before the real server does (or while the real
server restarts), then receive what clients send and answer them as it likes.
So a client believes the path only once the kernel has said who listens on
it. Right after ``connect()``, before its first byte goes out, the client
asks the connected socket for the server's credentials (:func:`peer_credentials`:
``SO_PEERCRED`` on Linux, ``getpeereid()`` through ctypes on the BSDs and
macOS) and goes on only if the server runs as the client's own effective uid,
as root, or as a uid the caller allows (``server_uid=``, see
:func:`allowed_uids`). Any other server is closed unused and refused with
:class:`UntrustedServerError`, a ``PermissionError`` that names the socket,
the server's uid and pid, and how to allow it. Every connection a client makes
goes through :func:`offlog.transports.connect`, which does the check: the
open, each reconnect after a lost server, the 0.x fallback, and the status
and reopen requests. A reconnect that meets an untrusted server keeps the
client's bytes and retries, as it does while no server listens.

The credentials are the kernel's, taken when the server called ``listen()``:
a process cannot claim another uid. A Unix that offers neither
``SO_PEERCRED`` nor ``getpeereid()`` cannot say who the server is, and then
every server is refused (with a message that says so): not knowing is not
trusting.

The server uses :func:`peer_credentials` too: for the pid and uid it logs of
each client, and to name whoever already listens on the socket path it was
asked to take. This module imports no other part of offlog.
"""

from __future__ import annotations

import errno
import functools
import os
import pwd
import socket
import struct
import sys
from typing import Any, Callable, FrozenSet, Iterable, Optional, Tuple, Union

#: What ``server_uid=`` takes: one uid, several, or None (only the own uid and root).
ServerUid = Union[int, Iterable[int], None]
#: The uids ``server_uid=`` allows, as :func:`allowed_uids` makes them.
Allowed = FrozenSet[int]

# Linux's struct ucred is (pid, uid, gid); OpenBSD's struct sockpeercred is (uid, gid, pid).
_UCRED = struct.Struct("=iII")
_SOCKPEERCRED = struct.Struct("=IIi")


class UntrustedServerError(PermissionError):
    """The process listening on the socket runs as a user this client does not trust.

    ``sock_path``, ``uid`` and ``pid`` say who it was (``uid`` and ``pid`` are
    None where the operating system does not tell); ``refusal`` is the message
    without the advice on how to allow the server.
    """

    def __init__(self, sock_path: str, uid: Optional[int], pid: Optional[int]) -> None:
        self.sock_path = sock_path
        self.uid = uid
        self.pid = pid
        if uid is None:
            self.refusal = (
                f"refusing the offlog server at {sock_path}: this operating system does not say "
                "which user runs it (no SO_PEERCRED, no getpeereid), so it cannot be trusted"
            )
            advice = ""
        else:
            euid = os.geteuid()
            trusted = "root" if euid == 0 else f"this process's user ({describe_uid(euid)}) or root"
            self.refusal = (
                f"refusing the offlog server at {sock_path}: it runs as {describe_uid(uid)}, "
                f"pid {'unknown' if pid is None else pid}, not as {trusted}; nothing was sent to it"
            )
            advice = f"; if you trust it, allow it with server_uid={uid}"
        super().__init__(errno.EACCES, self.refusal + advice)

    def __reduce__(self) -> Tuple[Any, ...]:
        return type(self), (self.sock_path, self.uid, self.pid)


def describe_uid(uid: int) -> str:
    """``uid 1000 (alice)``, or ``uid 1000`` for a uid without a user name."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def allowed_uids(server_uid: ServerUid) -> Allowed:
    """The uids ``server_uid=`` allows besides the client's own and root's: an
    int, a collection of ints, or None (none). User names are not taken (resolve
    one with ``pwd.getpwnam(name).pw_uid``): a name could mean another uid by the
    time of a reconnect; a number cannot."""
    if server_uid is None:
        return frozenset()
    uids = [server_uid] if isinstance(server_uid, int) else server_uid
    if isinstance(uids, (str, bytes)):
        raise TypeError(
            f"server_uid takes uids (int), not a user name like {server_uid!r}: use pwd.getpwnam(name).pw_uid"
        )
    allowed = set()
    for uid in uids:
        if not isinstance(uid, int) or isinstance(uid, bool):
            raise TypeError(f"server_uid takes uids (int), not {uid!r}")
        if uid < 0:
            raise ValueError(f"server_uid: a uid is not negative, got {uid}")
        allowed.add(uid)
    return frozenset(allowed)


def check_server(sock: socket.socket, sock_path: str, allowed: Allowed) -> None:
    """Raise :class:`UntrustedServerError` unless the server at the other end of
    the connected ``sock`` runs as this process's effective uid, as root, or as
    one of ``allowed``."""
    pid, uid = peer_credentials(sock)
    if uid is None or not (uid == os.geteuid() or uid == 0 or uid in allowed):
        raise UntrustedServerError(sock_path, uid, pid)


def peer_credentials(sock: socket.socket) -> Tuple[Optional[int], Optional[int]]:
    """(pid, uid) of the process at the other end of a connected Unix socket,
    None for what the operating system does not tell (``getpeereid()`` has no
    pid)."""
    so_peercred = getattr(socket, "SO_PEERCRED", None)
    if so_peercred is not None:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, so_peercred, _UCRED.size)
        except OSError:
            return None, None
        if sys.platform.startswith("openbsd"):
            uid, _, pid = _SOCKPEERCRED.unpack(raw)
        else:
            pid, uid, _ = _UCRED.unpack(raw)
        return pid, uid
    getpeereid = _getpeereid()
    return (None, None) if getpeereid is None else (None, getpeereid(sock.fileno()))


@functools.cache
def _getpeereid() -> Optional[Callable[[int], Optional[int]]]:
    """libc's ``getpeereid(fd, &uid, &gid)`` as a function of the descriptor
    (None where libc has none, as glibc on Linux, which has SO_PEERCRED)."""
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).getpeereid
    except (ImportError, OSError, AttributeError):
        return None
    uid_t = ctypes.c_uint32  # uid_t and gid_t are 32-bit unsigned on every Unix that has getpeereid
    function.argtypes = [ctypes.c_int, ctypes.POINTER(uid_t), ctypes.POINTER(uid_t)]
    function.restype = ctypes.c_int

    def getpeereid(fd: int) -> Optional[int]:
        uid, gid = uid_t(), uid_t()
        return None if function(fd, ctypes.byref(uid), ctypes.byref(gid)) != 0 else uid.value

    return getpeereid
