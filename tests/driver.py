"""A ProxyFile in a child interpreter, driven step by step from the test.

The test keeps its own process free of the client under test: a write that
blocks, a wait that never ends or a wedged lock stays in the child, and every
step the test asks for has a deadline. The child runs each step's code in one
namespace (``f`` is the ProxyFile, ``record`` and ``offlog`` are imported)
and answers with one JSON line: whether the step raised, and ``result`` if
the step set it.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, Optional

import pytest
from records import TESTS
from support import Processes, child_env, client_script

CHILD = """
import json, sys, traceback
sys.path.insert(0, sys.argv[1])
import offlog
from records import record
ns = {"offlog": offlog, "record": record}

def write(tag, first, stop, size=0, pause=0.0, sync_every=0):
    # Write records [first, stop); the numbers whose write() returned and was not dropped.
    import time
    f = ns["f"]
    accepted, raised = [], {}
    for n in range(first, stop):
        before = f.dropped
        try:
            f.write(record(tag, n, size))
        except Exception as exc:
            raised[n] = type(exc).__name__
        else:
            if f.dropped == before:
                accepted.append(n)
        if sync_every and (n + 1 - first) % sync_every == 0:
            f.sync()
        if pause:
            time.sleep(pause)
    return {"accepted": accepted, "raised": raised}

ns["write"] = write
for line in sys.stdin:
    step = json.loads(line)
    ns["result"] = None
    try:
        exec(step, ns)
        reply = {"ok": True, "result": ns["result"]}
    except BaseException as exc:
        reply = {"ok": False, "error": type(exc).__name__, "message": str(exc), "trace": traceback.format_exc()}
    print(json.dumps(reply), flush=True)
"""


class StepFailed(AssertionError):
    pass


def proxy_file(target: Path, sock: str, **options: Any) -> str:
    """The step that opens ``f``: ``ProxyFile(target, sock, **options)``."""
    args = "".join(f", {k}={v!r}" for k, v in options.items())
    return f"f = offlog.ProxyFile({str(target)!r}, {sock!r}{args})"


def run_script(procs: Processes, workdir: Path, code: str, what: str, timeout: float = 60.0) -> Any:
    """Run ``code`` in a fresh interpreter; it must exit 0 within ``timeout`` s (else the test
    fails, saying ``what`` hung); returns the JSON it printed last."""
    try:
        proc = client_script(procs, workdir, code, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the client did not finish within {timeout} s: {what}")
    assert proc.returncode == 0, f"the client failed:\n{proc.stderr_text}"
    return json.loads(proc.stdout_text.strip().splitlines()[-1])


class Driver:
    """``Driver(procs, workdir, "f = offlog.ProxyFile(...)")``; then ``run(code)`` step by step."""

    def __init__(self, procs: Processes, workdir: Path, setup: str, timeout: float = 30.0) -> None:
        self.stderr_path = workdir / f"driver-{len(procs.procs)}.err"
        with open(self.stderr_path, "wb") as err:
            self.proc = procs.start(
                [sys.executable, "-c", CHILD, TESTS],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=str(workdir),
                env=child_env(),
                bufsize=0,
            )
        self._buffer = b""
        self.run(setup, timeout)

    def send(self, code: str) -> None:
        """Start a step without waiting for it (then :meth:`reply`)."""
        self.proc.stdin.write(json.dumps(textwrap.dedent(code)).encode() + b"\n")

    def reply(self, timeout: float = 30.0) -> Dict[str, Any]:
        """The answer to the step sent last; AssertionError if none comes within ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StepFailed(f"the client step did not return within {timeout} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise StepFailed(f"the client process exited (status {self.proc.wait()})")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def attempt(self, code: str, timeout: float = 30.0) -> Dict[str, Any]:
        """Run a step; its reply, whether it raised or not."""
        self.send(code)
        return self.reply(timeout)

    def run(self, code: str, timeout: float = 30.0) -> Any:
        """Run a step that must not raise; its ``result``."""
        answer = self.attempt(code, timeout)
        if not answer["ok"]:
            raise StepFailed(f"the client step raised {answer['error']}: {answer['message']}\n{answer['trace']}")
        return answer["result"]

    def write(self, tag: str, first: int, stop: int, size: int = 0, timeout: float = 30.0, **options: Any) -> dict:
        """Write records [first, stop) of ``tag``: {"accepted": [...], "raised": {n: class name}}."""
        args = ", ".join(f"{k}={v!r}" for k, v in options.items())
        result = self.run(f"result = write({tag!r}, {first}, {stop}, {size}, {args})", timeout)
        result["raised"] = {int(n): name for n, name in result["raised"].items()}
        return result

    def state(self) -> Dict[str, Any]:
        return self.run("result = {k: getattr(f, k) for k in ('transport', 'backlog', 'dropped', 'closed')}")

    def finish(self, timeout: float = 30.0) -> Optional[int]:
        """End the child by closing its stdin: the interpreter exits normally."""
        self.proc.stdin.close()
        return self.proc.wait(timeout)
