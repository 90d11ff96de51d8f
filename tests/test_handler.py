"""OfflogHandler against real servers: dictConfig, threads, interpreter exit, handleError."""

from __future__ import annotations

import logging
import re
import threading

import pytest
from support import client_script

import offlog


def shm_option(server) -> bool:
    return server.transport == "shm"


def test_dictconfig_builds_the_handler_and_writes_formatted_records(server, workdir, procs):
    """dictConfig with "class": "offlog.OfflogHandler" passes filepath/sock_path/timeout/shm through,
    applies the handler's level and formatter, writes tracebacks and non-ASCII as UTF-8."""
    target = workdir / "app.log"
    code = f"""
        import logging, logging.config
        logging.config.dictConfig({{
            "version": 1,
            "formatters": {{"plain": {{"format": "%(levelname)s|%(name)s|%(message)s"}}}},
            "handlers": {{"offlog": {{
                "class": "offlog.OfflogHandler",
                "filepath": {str(target)!r},
                "sock_path": {server.sock!r},
                "timeout": 2000,
                "shm": False,
                "level": "INFO",
                "formatter": "plain",
            }}}},
            "root": {{"level": "DEBUG", "handlers": ["offlog"]}},
        }})
        handler = logging.getLogger().handlers[0]
        assert handler._file.transport == "socket" and handler._file.timeout == 2000, handler
        log = logging.getLogger("app.db")
        log.debug("below the handler's level")
        log.info("connected to %s:%d", "db", 5432)
        log.warning("snow \\N{{SNOWMAN}}")
        try:
            1 / 0
        except ZeroDivisionError:
            log.exception("query failed")
        """
    proc = client_script(procs, workdir, code)
    assert proc.returncode == 0 and proc.stderr_text == "", proc.stderr_text
    lines = target.read_text(encoding="utf-8").splitlines()
    assert lines[:4] == [
        "INFO|app.db|connected to db:5432",
        "WARNING|app.db|snow \N{SNOWMAN}",
        "ERROR|app.db|query failed",
        "Traceback (most recent call last):",
    ]
    assert lines[-1] == "ZeroDivisionError: division by zero"


def test_records_from_many_threads_are_all_present_and_whole(transport_server, workdir):
    """One handler shared by 8 threads: sync() returns with every record in the file,
    each on its own line, none torn or interleaved, each thread's in its order."""
    target = workdir / "threads.log"
    handler = offlog.OfflogHandler(str(target), transport_server.sock, shm=shm_option(transport_server))
    handler.setFormatter(logging.Formatter("%(threadName)s %(message)s"))
    log = logging.getLogger(f"offlog.test.threads.{transport_server.transport}")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    log.addHandler(handler)
    threads_n, records_n = 8, 2000

    def work(t: int) -> None:
        for i in range(records_n):
            log.info("%d %06d %s", t, i, "x" * ((t * 31 + i) % 200))

    threads = [threading.Thread(target=work, args=(t,), name=f"T{t}") for t in range(threads_n)]
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        handler.sync()
        lines = target.read_text().splitlines()
    finally:
        log.removeHandler(handler)
        handler.close()
    record = re.compile(r"T(\d) (\d) (\d{6}) (x*)")
    seen = {t: [] for t in range(threads_n)}
    for line in lines:
        m = record.fullmatch(line)
        assert m and m[1] == m[2], f"torn record: {line!r}"
        t, i = int(m[2]), int(m[3])
        assert len(m[4]) == (t * 31 + i) % 200, f"torn record: {line!r}"
        seen[t].append(i)
    assert seen == {t: list(range(records_n)) for t in range(threads_n)}


@pytest.mark.parametrize("first_import", ["offlog", "logging"])
def test_records_logged_right_before_exit_reach_the_file_without_close(transport_server, workdir, procs, first_import):
    """A process that logs and exits without closing anything loses no record, whichever
    exit hook runs first (logging.shutdown, or offlog's own close of open ProxyFiles:
    the import order decides), and neither hook prints anything."""
    target = workdir / "exit.log"
    n = 20000
    imports = "import offlog, logging" if first_import == "offlog" else "import logging, offlog"
    code = f"""
        {imports}
        log = logging.getLogger("app")
        log.setLevel(logging.INFO)
        log.addHandler(offlog.OfflogHandler({str(target)!r}, {transport_server.sock!r},
                                            shm={shm_option(transport_server)}))
        for i in range(n := {n}):
            log.info("record %06d %s", i, "y" * (i % 101))
        """
    proc = client_script(procs, workdir, code)
    assert proc.returncode == 0 and proc.stderr_text == "", proc.stderr_text
    expected = "".join(f"record {i:06d} {'y' * (i % 101)}\n" for i in range(n))
    assert target.read_text() == expected


def failing_script(server, raise_exceptions: bool) -> str:
    """Log to /dev/full (the server's write fails with ENOSPC, it reports and hangs up),
    wait until the server has dropped the client (it logs "Closed" after
    hanging up), then log more: those emits must fail."""
    return f"""
        import logging, sys, time
        import offlog
        logging.raiseExceptions = {raise_exceptions}
        log = logging.getLogger("app")
        log.addHandler(offlog.OfflogHandler("/dev/full", {server.sock!r}, shm={shm_option(server)}))
        log.warning("first record, handed over before the server fails")
        deadline = time.monotonic() + 30
        while "Closed /dev/full" not in open({str(server.log_path)!r}).read():
            assert time.monotonic() < deadline, "the server never dropped the client"
            time.sleep(0.01)
        for i in range(3):
            log.warning("record %d after the failure", i)
        print("still running", flush=True)
        """


def test_server_error_goes_to_handle_error_not_to_the_caller(transport_server, workdir, procs):
    """ENOSPC on the server: emit() does not raise; stdlib handleError prints
    "--- Logging error ---" with the error and the record, once per failed record."""
    proc = client_script(procs, workdir, failing_script(transport_server, True))
    assert proc.returncode == 0, proc.stderr_text
    assert proc.stdout_text == "still running\n"
    err = proc.stderr_text
    assert err.count("--- Logging error ---") == 3, err
    assert "No space left on device" in err
    assert "Message: 'record %d after the failure'" in err and "Arguments: (2,)" in err
    transport_server.wait_log("Failed to write to /dev/full")


def test_server_error_is_silent_when_raise_exceptions_is_false(transport_server, workdir, procs):
    """The same failure with logging.raiseExceptions = False: nothing on stderr, at all
    (not from emit, nor from the exit hooks), and the process carries on."""
    proc = client_script(procs, workdir, failing_script(transport_server, False))
    assert proc.returncode == 0 and proc.stdout_text == "still running\n"
    assert proc.stderr_text == ""


def test_open_errors_raise_at_construction(server, workdir):
    """A file the server cannot open is reported by the constructor (as ProxyFile does),
    and no half-made handler is left registered with logging."""
    before = len(logging._handlerList)
    with pytest.raises(FileNotFoundError):
        offlog.OfflogHandler(str(workdir / "missing-dir" / "a.log"), server.sock)
    assert len(logging._handlerList) == before


def test_close_is_idempotent_and_later_records_go_to_handle_error(server, workdir, monkeypatch):
    """close() twice is fine, flush() after close() is a no-op, and a record emitted after
    close() reaches handleError instead of raising into the caller."""
    target = workdir / "closed.log"
    handler = offlog.OfflogHandler(str(target), server.sock)
    handler.handle(logging.makeLogRecord({"msg": "before close"}))
    handler.close()
    handler.close()
    handler.flush()
    failed = []
    monkeypatch.setattr(handler, "handleError", failed.append)
    late = logging.makeLogRecord({"msg": "after close"})
    handler.handle(late)
    assert failed == [late]
    assert target.read_text() == "before close\n"
