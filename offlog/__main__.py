"""``python -m offlog``: run the server; ``python -m offlog status``: ask one."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .client import DEFAULT_SOCK_PATH, DEFAULT_TIMEOUT, server_status
from .logger import DEBUG, INFO, WARNING, Logger
from .shm.layout import DEFAULT_CAPACITY


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().rstrip("ib")
    scale = units.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def server_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m offlog",
        description="offlog file-append service",
        epilog="'python -m offlog status [-s SOCKET_FILE] [--json]' reports on a running server.",
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
        type=_size,
        default=DEFAULT_CAPACITY,
        help="Bytes per client ring, a power of two such as 4M (default 4M, at least 64K).",
    )
    p.add_argument(
        "--socket-mode",
        type=lambda text: int(text, 8),
        help="Permissions of the socket file, in octal (e.g. 660). Default: the umask's.",
    )
    p.add_argument("--socket-group", help="Group (name or id) to give the socket file, e.g. with --socket-mode 660.")
    return p


def status_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m offlog status", description="Report on a running offlog server.")
    p.add_argument("-s", "--socket-file", default=DEFAULT_SOCK_PATH, help="The server's socket.")
    p.add_argument("--json", action="store_true", help="Print the status as JSON.")
    p.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT, help="Milliseconds to wait for the server.")
    return p


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
    clients = [["ID", "PID", "UID", "TRANSPORT", "WRITTEN", "BACKLOG", "DROPPED", "FILE"]]
    for c in status["clients"]:
        clients.append(
            [
                str(c["id"]),
                str(c["pid"]),
                str(c["uid"]),
                c["transport"] + ("" if c["dialect"] == "framed" else " (0.x)"),
                _bytes(c["bytes_written"]),
                _bytes(c["backlog"]),
                _bytes(c["dropped_bytes"]),
                c["file"],
            ]
        )
    files = [["FILE", "CLIENTS", "WRITTEN", "ERRORS"]]
    for f in status["files"]:
        files.append([f["path"], str(f["clients"]), _bytes(f["bytes_written"]), str(f["errors"])])
    lines += [_table(clients), "", _table(files)]
    if status["recent_errors"]:
        lines += ["", "recent errors:"] + [f"  {e}" for e in status["recent_errors"]]
    return "\n".join(lines)


def status_main(argv: List[str]) -> int:
    args = status_parser().parse_args(argv)
    try:
        status = server_status(args.socket_file, args.timeout)
    except (OSError, ValueError) as exc:
        print(f"offlog status: no answer from {args.socket_file}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        return status_main(argv[1:])
    args = server_parser().parse_args(argv)
    from .server import main_server

    log = Logger(
        "offlog",
        args.logfile,
        file_level=DEBUG if args.logfile else None,
        stdout_level=INFO,
        stderr_level=WARNING,
        local_file=True,
    )
    try:
        return main_server(args, log)
    finally:
        log.close()


if __name__ == "__main__":
    sys.exit(main())
