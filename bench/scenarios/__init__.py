"""The seven scenarios of ``python -m bench``.

Each module measures one thing and has the same three functions:
``run(lab, cfg) -> dict`` (raw, JSON-ready figures), ``table(data) -> str``
(the markdown table printed) and ``plot(data, directory) -> list of paths``
(PNG files; empty when the scenario draws nothing).

1. :mod:`.latency`: per-call latency in the caller.
2. :mod:`.throughput`: records/s end to end, until the bytes are in the file.
3. :mod:`.stall`: the caller's latency while the target stalls.
4. :mod:`.clients`: one server under many clients.
5. :mod:`.restart`: the caller's latency while the server is killed and restarted, or stopped.
6. :mod:`.paced`: what many slow clients (100 records/s each) cost the server.
7. :mod:`.idle`: what many idle clients cost the server, and how long they take to close.
"""

from . import clients, idle, latency, paced, restart, stall, throughput

SCENARIOS = {
    "latency": latency,
    "throughput": throughput,
    "stall": stall,
    "clients": clients,
    "restart": restart,
    "paced": paced,
    "idle": idle,
}
