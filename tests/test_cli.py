"""The command line a newcomer meets: every bad option is one line, nothing is left behind."""

from __future__ import annotations

import grp
import os
import shlex
import subprocess
import sys

import pytest
from support import child_env, run_offlog, shm_objects, socket_answers, wait_for

import offlog

NO_GROUP = "offlog-no-such-group"


def assert_one_usage_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """argparse's verdict: exit 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("python -m offlog: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_bad_ring_size_is_one_line_and_leaves_nothing(procs, workdir):
    sock, logfile = workdir / "offlog.sock", workdir / "server.log"
    result = run_offlog(procs, workdir, "-s", str(sock), "-l", str(logfile), "--shm", "--ring-size", "3M")
    line = assert_one_usage_error(result, "--ring-size", "3M", "power of two")
    assert "64K" in line and "1G" in line
    assert not sock.exists() and not logfile.exists()
    assert not shm_objects([procs.procs[-1].pid])


def test_unknown_socket_group_is_one_line_and_leaves_no_socket(procs, workdir):
    with pytest.raises(KeyError):
        grp.getgrnam(NO_GROUP)
    sock, logfile = workdir / "offlog.sock", workdir / "server.log"
    result = run_offlog(procs, workdir, "-s", str(sock), "-l", str(logfile), "--socket-group", NO_GROUP)
    assert_one_usage_error(result, "--socket-group", f"no group named {NO_GROUP!r}")
    assert not sock.exists() and not logfile.exists()


def test_logfile_in_missing_directory_is_one_line(procs, workdir):
    sock, missing = workdir / "offlog.sock", workdir / "missing"
    result = run_offlog(procs, workdir, "-s", str(sock), "-l", str(missing / "x.log"))
    assert_one_usage_error(result, "-l/--logfile", f"directory {missing} does not exist")
    assert not sock.exists() and not missing.exists()


def test_logfile_that_is_a_directory_is_one_line(procs, workdir):
    sock = workdir / "offlog.sock"
    result = run_offlog(procs, workdir, "-s", str(sock), "-l", str(workdir))
    assert_one_usage_error(result, "-l/--logfile", f"cannot open {workdir}: Is a directory")
    assert not sock.exists()


@pytest.mark.parametrize(
    "option, value, says",
    [
        ("--ring-size", "abc", "'abc' is not a size"),
        ("--ring-size", "4T", "'4T' is not a size"),
        ("--socket-mode", "999", "'999' is not an octal file mode"),
    ],
)
def test_size_type_error_reads_well(procs, workdir, option, value, says):
    sock = workdir / "offlog.sock"
    line = assert_one_usage_error(run_offlog(procs, workdir, "-s", str(sock), option, value), option, says)
    assert "invalid" not in line and "_size" not in line and "<lambda>" not in line
    assert not sock.exists()


def test_ring_size_without_shm_warns_and_starts(procs, workdir):
    sock = str(workdir / "offlog.sock")
    out_path, err_path = workdir / "server.out", workdir / "server.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        server = procs.start(
            [sys.executable, "-m", "offlog", "-s", sock, "--ring-size", "64K"],
            stdout=out,
            stderr=err,
            cwd=str(workdir),
            env=child_env(),
        )
    wait_for(lambda: socket_answers(sock) or server.poll() is not None, what="server socket")
    assert server.poll() is None, err_path.read_text()
    f = offlog.ProxyFile(str(workdir / "app.log"), sock)
    f.write(b"served\n")
    f.close()
    assert (workdir / "app.log").read_bytes() == b"served\n"
    server.terminate()
    assert server.wait(30) == 0
    warnings = err_path.read_text().splitlines()
    assert len(warnings) == 1 and warnings[0].endswith("offlog WARNING] --ring-size has no effect without --shm")
    assert "Traceback" not in out_path.read_text()


def test_version(procs, workdir):
    result = run_offlog(procs, workdir, "--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"offlog {offlog.__version__}\n", "")


def test_status_into_closed_pipe_exits_quietly(server, procs, workdir):
    status = [sys.executable, "-m", "offlog", "status", "-s", server.sock]
    pipeline = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"{shlex.join(status)} | head -1"],
        capture_output=True,
        text=True,
        cwd=str(workdir),
        env=child_env(),
        timeout=60,
    )
    assert (pipeline.returncode, pipeline.stderr) == (0, "")
    assert pipeline.stdout.startswith(f"offlog {offlog.__version__} pid {server.pid} on {server.sock}")
    assert len(pipeline.stdout.splitlines()) == 1
    # A reader gone before the first byte: the write itself fails with EPIPE, every time.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        closed = procs.start(status, stdout=write_end, stderr=subprocess.PIPE, env=child_env(), text=True)
    finally:
        os.close(write_end)
    _, err = closed.communicate(timeout=60)
    assert (closed.returncode, err) == (0, "")


def test_refuses_to_start_over_a_live_server_in_one_line(server, procs, workdir):
    logfile = workdir / "second.log"
    result = run_offlog(procs, workdir, "-s", server.sock, "-l", str(logfile))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert f"offlog ERROR] Cannot listen on {server.sock}: another offlog server is already listening" in lines[0]
    assert "Traceback" not in result.stdout + logfile.read_text()
    assert socket_answers(server.sock), "the first server must keep its socket"


def test_refuses_to_replace_a_file_that_is_not_a_socket_in_one_line(procs, workdir):
    path = workdir / "not-a-socket"
    path.write_text("precious")
    result = run_offlog(procs, workdir, "-s", str(path))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert f"offlog ERROR] Cannot listen on {path}: the path exists and is not a socket" in lines[0]
    assert "Traceback" not in result.stdout
    assert path.read_text() == "precious"
