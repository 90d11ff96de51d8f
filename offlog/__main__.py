"""``python -m offlog``: run the server."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .client import DEFAULT_SOCK_PATH
from .logger import DEBUG, INFO, WARNING, Logger
from .shm.layout import DEFAULT_CAPACITY


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().rstrip("ib")
    scale = units.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m offlog", description="offlog file-append service")
    p.add_argument(
        "-n",
        "--notify",
        action="store_true",
        help="Notify systemd when the server has started up and is listening.",
    )
    p.add_argument(
        "-s",
        "--socket-file",
        default=DEFAULT_SOCK_PATH,
        help=f"Path of the Unix socket the server binds to. Default: {DEFAULT_SOCK_PATH}",
    )
    p.add_argument("-l", "--logfile", help="Path of the (optional) log file for the offlog server itself.")
    p.add_argument(
        "--shm",
        action="store_true",
        help="Offer clients a shared-memory ring (the socket stays for control and fallback).",
    )
    p.add_argument(
        "--ring-size",
        type=_size,
        default=DEFAULT_CAPACITY,
        help="Bytes per client ring, a power of two such as 4M (default 4 MiB).",
    )
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
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
