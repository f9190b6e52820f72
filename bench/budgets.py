"""Token budgets: overshoot and utilisation, escrow vs debit, on the same workload.

    .venv/bin/python bench/budgets.py [--redis URL] [--windows N] [--record]

The workload of ``tests/test_llm_budgets.py`` (``tests/apps/llm_workload.py``): a Celery worker with
4 threads (Redis broker) runs LLM-like tasks for one tenant against a per-tenant budget with a 3 s window;
each task's actual usage is random up to its 400-token estimate, and demand is well above the budget. A
sampler reads the engine's own budget counter. Reported per mode: the most tokens charged in any window
(overshoot = above the budget), the bound the mode documents, and the least-used full window (utilisation).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `import celery` must not find bench/celery.py
    if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

from bench._common import machine_info, record, table
from tests.apps.llm_workload import BudgetRun, run_workload


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/11", help="the store (default: %(default)s)")
    ap.add_argument("--windows", type=float, default=5.0, help="workload size in windows' worth of budget")
    ap.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = ap.parse_args(argv)
    runs: dict[str, BudgetRun] = {
        m: run_workload(args.redis, m, windows=args.windows) for m in ("escrow", "debit")
    }
    rows = []
    for mode, r in runs.items():
        bound = 0 if mode == "escrow" else r.workers * r.max_cost
        rows.append([
            mode, str(r.tasks), f"{r.elapsed_s:.1f}", str(r.budget), str(max(r.peak.values(), default=0)),
            str(r.overshoot), str(bound), "PASS" if r.overshoot <= bound else "MISS",
            f"{r.utilisation:.0%}", "PASS" if r.utilisation >= 0.9 else "MISS",
        ])  # fmt: skip
    text = table(
        [
            "mode",
            "tasks",
            "s",
            "budget/window",
            "most charged",
            "overshoot",
            "bound",
            "",
            "utilisation",
            ">=90%",
        ],
        rows,
    )
    print(text)
    if args.record:
        info = machine_info(redis.Redis.from_url(args.redis).info())
        record("bench/budgets.py", text, info)
        print("\nrecorded in bench/RESULTS.md")
    return 0 if all("MISS" not in row for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
