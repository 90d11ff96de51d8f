"""``python -m offlog``: run the server; ``python -m offlog status``: ask one;
``python -m offlog reopen``: have one reopen every file (logrotate's postrotate)."""

from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import sys
from typing import List, NoReturn, Optional

from . import __version__
from .defaults import DEFAULT_SOCK_PATH, DEFAULT_TIMEOUT, HANDSHAKE_TIMEOUT, MAX_FRAME_MEMORY, REOPEN_TIMEOUT
from .loglines import DEBUG, INFO, WARNING, LineLogger, LineSink
from .protocol import ProtocolError
from .shm import layout
from .trust import UntrustedServerError


def size(text: str) -> int:
    """Bytes: a number, or one with a K, M or G suffix (powers of 1024), e.g. 4M, 64K, 4MiB."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    number = text.strip().lower()
    for suffix in ("ib", "b"):
        if number.endswith(suffix):
            number = number[: -len(suffix)]
            break
    scale = units.get(number[-1:], 1)
    if scale > 1:
        number = number[:-1]
    if not (number.isascii() and number.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (a number of bytes, or with K, M or G such as 4M)")
    return int(number) * scale


def ring_size(text: str) -> int:
    """A ``size`` the ring layout accepts (see offlog.shm.layout.check_capacity)."""
    value = size(text)
    try:
        return layout.check_capacity(value)
    except layout.LayoutError:
        raise argparse.ArgumentTypeError(
            f"{text} ({value} bytes) is not a power of two from {layout.MIN_CAPACITY >> 10}K"
            f" to {layout.MAX_CAPACITY >> 30}G, such as 4M"
        ) from None


def seconds(text: str) -> float:
    """A positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def file_mode(text: str) -> int:
    """Permission bits in octal, e.g. 660."""
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal file mode such as 660")
    return mode


def user_id(text: str) -> int:
    """A uid: a number, or the name of a user on this host."""
    if text.isascii() and text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no user named {text!r} on this host") from None


def group(text: str) -> str:
    """A group name that exists on this host, or a numeric group id."""
    if not text.isdigit():
        try:
            grp.getgrnam(text)
        except KeyError:
            raise argparse.ArgumentTypeError(f"no group named {text!r} on this host") from None
    return text


class _Parser(argparse.ArgumentParser):
    """A bad option is one line (``prog: error: ...``, exit 2); the usage is a ``-h`` away."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def server_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m offlog",
        description="offlog file-append service",
        epilog="'python -m offlog status [-s SOCKET_FILE] [--json] [--timeout MS] [--server-uid UID]' reports on"
        " a running server; 'python -m offlog reopen [-s SOCKET_FILE] [--timeout MS] [--server-uid UID]' has it"
        " reopen every file.",
    )
    p.add_argument(
        "-n", "--notify", action="store_true", help="Notify systemd when the server has started up and is listening."
    )
    p.add_argument(
        "-s",
        "--socket-file",
        default=DEFAULT_SOCK_PATH,
        help=f"Path of the Unix socket the server binds to. Default: {DEFAULT_SOCK_PATH}",
    )
    p.add_argument("-l", "--logfile", help="Path of the (optional) log file for the offlog server itself.")
    p.add_argument(
        "--shm", action="store_true", help="Offer clients a shared-memory ring (the socket stays for control)."
    )
    p.add_argument(
        "--ring-size",
        type=ring_size,
        help="Bytes per client ring with --shm, a power of two from 64K to 1G (default 4M).",
    )
    p.add_argument(
        "--max-ring-memory",
        type=size,
        metavar="BYTES",
        help="Ring bytes of all clients together at most (e.g. 512M); past it clients get the socket. "
        "Default: 1G, or half of /dev/shm if smaller.",
    )
    p.add_argument(
        "--max-frame-memory",
        type=size,
        default=MAX_FRAME_MEMORY,
        metavar="BYTES",
        help="Bytes of incomplete frames held for all clients together (e.g. 64M); past it, clients "
        "with a large frame on the way wait, and one that cannot finish within the handshake "
        "timeout is cut off. Default: 256M.",
    )
    p.add_argument(
        "--handshake-timeout",
        type=seconds,
        default=HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help="Seconds a new connection has, in all, to complete its handshake. Default: 10.",
    )
    p.add_argument(
        "--socket-mode",
        type=file_mode,
        help="Permissions of the socket file, in octal (e.g. 660). Default: the umask's.",
    )
    p.add_argument(
        "--socket-group",
        type=group,
        help="Group (name or id) to give the socket file, e.g. with --socket-mode 660.",
    )
    p.add_argument("--version", action="version", version=f"offlog {__version__}")
    return p


def status_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m offlog status", description="Report on a running offlog server.")
    p.add_argument("-s", "--socket-file", default=DEFAULT_SOCK_PATH, help="The server's socket.")
    p.add_argument("--json", action="store_true", help="Print the status as JSON.")
    p.add_argument(
        "--timeout", type=int, default=DEFAULT_TIMEOUT, metavar="MS", help="Milliseconds to wait for the server."
    )
    _server_uid_option(p)
    return p


def _server_uid_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server-uid",
        type=user_id,
        action="append",
        metavar="UID",
        help="Also trust a server running as this user (a uid or a user name; may be repeated). "
        "Without it, only a server running as your own user or root is asked.",
    )


def _refused(command: str, exc: UntrustedServerError) -> str:
    """The one line for a server the command would not talk to, with the option that allows it."""
    advice = "" if exc.uid is None else f"; if you trust it, pass --server-uid {exc.uid}"
    return f"offlog {command}: {exc.refusal}{advice}"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: List[List[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def render_status(status: dict) -> str:
    up = int(status["uptime"])
    shm = status["shm"]
    ring = f"on, rings of {_bytes(shm['ring_size'])}" if shm["offered"] else f"off ({shm['why_not']})"
    lines = [
        f"offlog {status['version']} pid {status['pid']} on {status['socket']}, "
        f"up {up // 3600}h{up % 3600 // 60:02d}m{up % 60:02d}s, shm {ring}",
        f"clients: {len(status['clients'])}  files: {len(status['files'])}  errors: {status['errors']}  "
        f"dropped: {_bytes(status['dropped_bytes'])}",
        "",
    ]
    clients = [["ID", "PID", "UID", "TRANSPORT", "WRITTEN", "UNCONFIRMED", "DROPPED", "FILE"]]
    for c in status["clients"]:
        clients.append(
            [
                str(c["id"]),
                str(c["pid"]),
                str(c["uid"]),
                c["transport"] + ("" if c["dialect"] == "framed" else " (0.x)"),
                _bytes(c["bytes_written"]),
                _bytes(c["unconfirmed"]),
                _bytes(c["dropped_bytes"]),
                c["file"],
            ]
        )
    files = [["FILE", "CLIENTS", "WRITTEN", "ERRORS"]]
    for f in status["files"]:
        files.append([f["path"], str(f["clients"]), _bytes(f["bytes_written"]), str(f["errors"])])
    lines += [_table(clients), "", _table(files)]
    unreopened = [f for f in status["files"] if f.get("reopen_error")]
    if unreopened:
        lines += ["", "could not reopen (see the log):"] + [f"  {f['path']}: {f['reopen_error']}" for f in unreopened]
    if status["recent_errors"]:
        lines += ["", "recent errors:"] + [f"  {e}" for e in status["recent_errors"]]
    return "\n".join(lines)


def status_main(argv: List[str]) -> int:
    from .transports import server_status  # a client's work: the server process never loads it

    args = status_parser().parse_args(argv)
    status = _ask("status", server_status, args)
    if status is None:
        return 1
    try:
        print(json.dumps(status, indent=2) if args.json else render_status(status))
        sys.stdout.flush()
    except BrokenPipeError:  # `offlog status | head -1`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
    return 0


def reopen_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m offlog reopen",
        description="Have a running offlog server reopen every file; return when it has (for logrotate's postrotate).",
    )
    p.add_argument("-s", "--socket-file", default=DEFAULT_SOCK_PATH, help="The server's socket.")
    p.add_argument(
        "--timeout", type=int, default=REOPEN_TIMEOUT, metavar="MS", help="Milliseconds to wait for the server."
    )
    _server_uid_option(p)
    return p


def reopen_main(argv: List[str]) -> int:
    """Exit 0 once every file is reopened; 1 with the reasons on stderr otherwise."""
    from .control import request_reopen  # a client's work: the server process never loads it

    args = reopen_parser().parse_args(argv)
    result = _ask("reopen", request_reopen, args)
    if result is None:
        return 1
    for failure in result["failed"]:
        print(f"offlog reopen: could not reopen {failure['path']}: {failure['error']}", file=sys.stderr)
    return 1 if result["failed"] else 0


def _ask(command: str, request, args) -> Optional[dict]:
    """A control request's answer, or None after saying in one line why there is none."""
    try:
        return request(args.socket_file, args.timeout, server_uid=args.server_uid)
    except UntrustedServerError as exc:
        print(_refused(command, exc), file=sys.stderr)
    except (OSError, ValueError, EOFError, ProtocolError) as exc:
        print(f"offlog {command}: no answer from {args.socket_file}: {exc}", file=sys.stderr)
    return None


def _unwritable(path: str, exc: OSError) -> str:
    """Why the server's log file cannot be opened, in the words an operator acts on."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"cannot create {path}: directory {directory} does not exist"
    if isinstance(exc, PermissionError) and not os.path.exists(path):
        return f"cannot create {path}: directory {directory} is not writable"
    return f"cannot open {path}: {exc.strerror or exc}"


def standard_descriptors() -> None:
    """Make sure descriptors 0, 1 and 2 are open (on /dev/null where they are
    not): a server started with one closed would otherwise get a client's file
    or socket there, and write its own log lines into it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)


def server_log(logfile: Optional[str]) -> LineLogger:
    """The server's own log: INFO to stdout, WARNING and up to stderr, every
    line to ``logfile``. Each goes through a :class:`LineSink` (stdout and
    stderr share one, so they keep their order when they go to one place):
    logging never waits for an output (a stdout nobody reads, a full disk) and
    never fails with one; trouble with an output is said on the others."""
    log: LineLogger

    def trouble(text: str) -> None:
        log.warning(text)

    console = LineSink("offlog", on_trouble=trouble)
    file = None
    if logfile:
        fd = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        file = LineSink("offlog", on_trouble=trouble).output(fd, logfile, close_fd=True)
    log = LineLogger(
        "offlog", file, DEBUG, INFO, WARNING, stdout=console.output(1, "stdout"), stderr=console.output(2, "stderr")
    )
    return log


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        return status_main(argv[1:])
    if argv[:1] == ["reopen"]:
        return reopen_main(argv[1:])
    parser = server_parser()
    args = parser.parse_args(argv)
    from .server import main_server

    standard_descriptors()
    try:
        log = server_log(args.logfile)
    except OSError as exc:
        parser.error(f"argument -l/--logfile: {_unwritable(args.logfile, exc)}")
    try:
        return main_server(args, log)
    finally:
        log.close()


if __name__ == "__main__":
    sys.exit(main())
