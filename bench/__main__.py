"""``python -m bench``: run the scenarios, print their tables, save JSON and PNG.

Run from the repository root (so ``bench`` and ``offlog`` are importable)::

    python -m bench            # everything, about twelve minutes on 2 cores
    python -m bench --quick    # everything, small: under two minutes
    python -m bench --only latency,stall --calls 1000000

The offlog under test is a copy of ``offlog/`` taken when the run starts (its
git HEAD and a digest are printed and saved), so edits to the repository
during a run do not mix versions. Progress lines go to stdout as the run goes;
each scenario's markdown table is printed when it ends and all of them again
at the end (also saved as ``results/tables.md``). Raw figures:
``results/<scenario>.json``; plots: ``results/latency_cdf.png`` and
``results/stall_timeline.png``. Exit status 1 if the run left offlog objects in /dev/shm.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import List, Optional

from . import REPO, RESULTS_DIR, report
from .config import FULL, QUICK, Config
from .procs import Lab, shm_objects
from .scenarios import SCENARIOS
from .scenarios.common import progress


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="offlog benchmark suite")
    p.add_argument("--quick", action="store_true", help="every scenario, small (under two minutes)")
    p.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated subset of: {', '.join(SCENARIOS)}")
    p.add_argument("--calls", type=int, help="scenario 1: calls per system (all rounds together)")
    p.add_argument("--rounds", type=int, help="scenario 1: interleaved rounds")
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help=f"output directory (default {RESULTS_DIR})")
    p.add_argument(
        "--offlog",
        type=Path,
        default=REPO / "offlog",
        help="the offlog package directory to measure, e.g. a patched copy (default: this repository's)",
    )
    return p


def config(args: argparse.Namespace) -> Config:
    cfg = QUICK if args.quick else FULL
    if args.calls:
        cfg = replace(cfg, latency_calls=args.calls)
    if args.rounds:
        cfg = replace(cfg, latency_rounds=args.rounds)
    return cfg


def selected(only: str) -> List[str]:
    names = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    return names


def run_scenario(name: str, lab: Lab, cfg: Config, results: Path, header: dict) -> str:
    """Run one scenario; save its JSON and plots; return its table."""
    module = SCENARIOS[name]
    started = time.monotonic()
    data = module.run(lab, cfg)
    report.write_json(results / f"{name}.json", dict(header, scenario=name, data=data))
    written = [path.name for path in module.plot(data, results)]
    table = module.table(data)
    print(f"\n{table}\n", flush=True)
    extra = f"; plots: {', '.join(written)}" if written else ""
    progress(f"{name} done in {time.monotonic() - started:.0f} s; figures: {results / (name + '.json')}{extra}")
    return table


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    cfg, names = config(args), selected(args.only)
    facts = report.machine()
    progress(f"machine: {report.machine_line(facts)}")
    progress(f"scenarios: {', '.join(names)}{' (quick)' if args.quick else ''}")
    shm_before = shm_objects()
    with Lab(args.offlog.resolve()) as lab:
        code = report.code_state(lab.src / "offlog")
        progress(f"code under test: {report.code_line(code)}, copied to {lab.src}")
        header = {"machine": facts, "code": code, "quick": args.quick, "config": asdict(cfg)}
        tables = [run_scenario(name, lab, cfg, args.results, header) for name in names]
    machine = f"Machine: {report.machine_line(facts)}. Code: {report.code_line(code)}."
    summary = f"## offlog benchmarks\n\n{machine}\n\n" + "\n\n".join(tables) + "\n"
    (args.results / "tables.md").write_text(summary)
    print("\n" + summary, flush=True)
    left = shm_objects() - shm_before
    if left:
        print(f"the run left objects in /dev/shm: {sorted(left)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
