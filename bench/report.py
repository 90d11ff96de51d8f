"""Presentation: markdown tables, ratios against the references, JSON, machine facts.

Ratios read "how many times better than the reference": for latencies
``reference / system``, for throughputs ``system / reference``; above 1 means
the system does better. The references are offlog 0.3.1 of the same kind
(its ProxyFile for file-like systems, its Logger for loggers) and the plain
file (write + flush).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from . import REPO
from .worker import SYSTEMS

PLAIN = "plain-file"
PEER_OF_KIND = {"bytes": "offlog-0.3.1", "log": "offlog-0.3.1-logger"}
RATIO_NOTE = "Ratios: times better than the reference (lower latency or higher throughput); above 1 is better."


def peer_of(system: str) -> str:
    """The 0.3.1 system a system is compared with: ProxyFile or Logger."""
    return PEER_OF_KIND[SYSTEMS[system].kind]


def label(system: str) -> str:
    return SYSTEMS[system].label


def times_better(value: Optional[float], reference: Optional[float], lower_is_better: bool) -> str:
    if not value or not reference:
        return "-"
    ratio = reference / value if lower_is_better else value / reference
    return f"{ratio:.2f}x"


def us(ns: float) -> str:
    """Nanoseconds as microseconds, three significant figures or so."""
    value = ns / 1000
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def si(value: float) -> str:
    """A rate with k/M/G suffix."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.2f} {suffix}"
    return f"{value:.0f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    """A padded markdown table; the first ``left`` columns are left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        padded = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * (w - 1) + ":" if i >= left else "-" * w for i, w in enumerate(widths)]
    return "\n".join([line(cells[0]), "| " + " | ".join(rule) + " |"] + [line(r) for r in cells[1:]])


def check(ok: bool) -> str:
    return "ok" if ok else "MISS"


def machine() -> Dict[str, Any]:
    """What the figures were measured on."""
    model = "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
    }


def code_state(snapshot: Path) -> Dict[str, Any]:
    """The offlog under test: the repository's git HEAD and whether its offlog/ had uncommitted changes
    (what ``--offlog`` measures unless pointed elsewhere), and a digest of the snapshot actually run."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    digest = hashlib.sha1()
    for path in sorted(snapshot.rglob("*.py")):
        digest.update(str(path.relative_to(snapshot)).encode() + b"\0" + path.read_bytes())
    return {
        "head": git("rev-parse", "--short", "HEAD") or None,
        "uncommitted": bool(git("status", "--porcelain", "--", "offlog")),
        "snapshot_sha1": digest.hexdigest()[:12],
    }


def code_line(state: Dict[str, Any]) -> str:
    changes = " + uncommitted changes" if state["uncommitted"] else ""
    return f"offlog {state['head']}{changes} (snapshot sha1 {state['snapshot_sha1']})"


def machine_line(facts: Dict[str, Any]) -> str:
    return (
        f"{facts['cpu']}, {facts['cores']} cores, {facts['implementation']} {facts['python']}, Linux {facts['kernel']}"
    )


def write_json(path: Path, data: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def verified_versions(results: List[Dict[str, Any]]) -> Dict[str, str]:
    """offlog version each worker actually imported, by version -> file (a check that 0.3.1 is 0.3.1)."""
    return {r["offlog"]["version"]: r["offlog"]["file"] for r in results if r.get("offlog")}
