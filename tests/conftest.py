from __future__ import annotations

import shutil

import pytest
from support import Processes, peer_path, pid_alive, shm_objects, short_tempdir, started_servers


@pytest.fixture
def workdir():
    path = short_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def procs():
    tracker = Processes()
    yield tracker
    tracker.end_all()


@pytest.fixture
def start_server(procs, workdir):
    """Factory: start_server("--shm", ...) -> a running ServerProcess."""
    yield from started_servers(procs, workdir)


@pytest.fixture
def server(start_server):
    return start_server()


@pytest.fixture
def shm_server(start_server):
    return start_server("--shm")


@pytest.fixture(params=["socket", "shm"])
def transport_server(request, start_server):
    """A server and the transport its clients will use; the test runs for both."""
    server = start_server("--shm") if request.param == "shm" else start_server()
    server.transport = request.param
    return server


@pytest.fixture(scope="session")
def peers():
    """{version: PYTHONPATH} of the 0.x releases from PyPI."""
    return {v: peer_path(v) for v in ("0.1.0", "0.3.1")}


@pytest.fixture(autouse=True, scope="session")
def no_shm_leftovers():
    """Nothing of ours may appear in /dev/shm: rings have no names. Named objects that
    appeared during the suite and whose creator is dead would be leaked by us (servers
    of other versions that other programs run on this machine keep their live rings)."""
    before = shm_objects()
    yield
    left = {n for n in shm_objects() - before if not pid_alive(int(n.split("offlog.", 1)[1].split(".")[0]))}
    assert not left, f"the suite left objects in /dev/shm: {sorted(left)}"
