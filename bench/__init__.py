"""offlog's benchmark suite: what a caller pays per write, and what the server pays.

Two entry points:

* ``python -m bench [--quick]`` runs seven scenarios (see :mod:`bench.scenarios`)
  against every system in :data:`bench.worker.SYSTEMS`, prints one markdown
  table per scenario with ratios against offlog 0.3.1 and against a plain
  file, and writes raw figures (JSON) and plots (PNG) into ``bench/results/``.
* ``pytest bench/ --benchmark-only`` runs in-process micro benchmarks with
  pytest-benchmark (:mod:`bench.test_micro`); offlog 0.3.1 is absent there
  because its package is also named ``offlog``.

How: every client loop runs in its own process (:mod:`bench.worker`, run as a
script so the 0.3.1 systems can import the PyPI release from its own
directory); every server is a subprocess on its own socket in a temporary
directory (:mod:`bench.procs`). Runs of different systems are interleaved so
that the noise of a shared machine falls on all of them alike.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
