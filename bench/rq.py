"""RQ integration: what the throttle costs a worker, and how accurately it paces real ``rq worker`` fleets.

    .venv/bin/python bench/rq.py [--redis URL] [--jobs N] [--rounds N] [--record] [--only throughput|accuracy]

Everything runs on real ``rq worker`` processes (RQ's CLI) on one Redis (db 11; RQ keys and the store's keys
carry ``tgbench-<pid>`` and are deleted at the end):

- throughput: ``--jobs`` no-op jobs (each one pipelined INCR/SET to time itself) through 2 forking workers and
  through 1 ``SimpleWorker``: RQ's own worker running a plain function against ``taskgate.rq.Worker`` running
  the same function throttled by a policy that never binds (rate only: one ``check``; rate + concurrency: one
  ``admit`` and a ``release``). Rounds alternate the order; the best round of each is kept. Target: >= 0.85x.
- accuracy: paced workloads, the achieved rate, the most starts in any 1-second window, re-schedules per job
  (trips through RQ's scheduler) and how late jobs start after their booked slot:
  2 workers at 20/s (the workers outpace nothing: paced in place), 4 workers at 2/s (most jobs are booked
  seconds ahead and come back through the scheduler), 3 workers at 20/s without in-place short waits.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: `import rq` must not find this file; `bench` importable
    if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
import rq
import yaml
from rq import Queue

import taskgate
import taskgate.rq
from taskgate.integrations._gate import Deferred
from tests.fleet import Fleet, max_in_window

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URL = "redis://127.0.0.1:6379/11"
TAG = os.environ.get("TG_BENCH_TAG", f"tgbench-{os.getpid()}")
URL = os.environ.get("TG_BENCH_URL", DEFAULT_URL)
POLICIES: dict[str, Any] = {
    "free_rate": {"strategy": "gcra", "limit": 1_000_000, "period": "1s", "burst": 1000},
    "free_admit": {
        "strategy": "gcra",
        "limit": 1_000_000,
        "period": "1s",
        "burst": 1000,
        "concurrency": {"maxLimit": 1000, "leaseTtl": "30s"},
    },
    "r20": {"strategy": "gcra", "limit": 20, "period": "1s", "burst": 1},
    "r10": {"strategy": "gcra", "limit": 10, "period": "1s", "burst": 1},
    "r5": {"strategy": "gcra", "limit": 5, "period": "1s", "burst": 1},
}


def _conn() -> Any:
    return redis.Redis.from_url(URL)


# -- the jobs and the worker (imported by the worker processes as bench.rq) -------------------------------


def noop(run: str) -> None:
    """Times itself: the first and last start of run ``run``, and a count."""
    p = _conn_cached().pipeline(transaction=False)
    now = time.time()
    p.incr(f"{TAG}:{run}:n")
    p.set(f"{TAG}:{run}:first", now, nx=True)
    p.set(f"{TAG}:{run}:last", now)
    p.execute()


@taskgate.rq.throttled("free_rate")
def noop_rate(run: str) -> None:
    noop(run)


@taskgate.rq.throttled("free_admit")
def noop_admit(run: str) -> None:
    noop(run)


@taskgate.rq.throttled("r20")
def paced20(run: str) -> None:
    _conn_cached().rpush(f"{TAG}:{run}:start", f"{_job_id()}|{time.time():.6f}")


@taskgate.rq.throttled("r10")
def paced10(run: str) -> None:
    paced20(run)


@taskgate.rq.throttled("r5")
def paced5(run: str) -> None:
    paced20(run)


_client: Any = None


def _conn_cached() -> Any:
    global _client
    if _client is None:
        _client = _conn()
    return _client


def _job_id() -> str:
    from rq import get_current_job

    job = get_current_job()
    return job.id if job is not None else "?"


# The worker classes live here, so that every worker process imports this module (and the jobs) once, in the
# parent: a plain `rq worker` would import it again in every forked horse.


class PlainWorker(rq.Worker):
    pass


class PlainSimpleWorker(rq.SimpleWorker):
    pass


class TgSimpleWorker(taskgate.rq.SimpleWorker):
    pass


class BenchWorker(taskgate.rq.Worker):
    """Records each deferral's booked slot (``<tag>:<queue>:slots``) and counts them.
    ``TG_BENCH_SHORT_WAIT_MS`` sets ``short_wait_ms``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        wait = int(os.environ.get("TG_BENCH_SHORT_WAIT_MS", "250"))
        super().__init__(*args, settings={"short_wait_ms": wait}, **kwargs)

    def job_deferred(self, job: Any, out: Deferred, at: Any) -> None:
        slot = time.time() + out.countdown_ms / 1000.0
        p = _conn_cached().pipeline(transaction=False)
        p.incr(f"{TAG}:{job.origin}:defers")
        if out.decision is not None and out.decision.booked:
            p.hset(f"{TAG}:{job.origin}:slots", job.id, slot)
        p.execute()


# -- running fleets -------------------------------------------------------------------------------------


def start_fleet(queue: str, n: int, worker: str, env: dict[str, str] | None = None) -> Fleet:
    """``n`` x ``rq worker --with-scheduler`` on ``queue`` (:class:`tests.fleet.Fleet`), ready."""
    full_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TG_BENCH_TAG": TAG,
        "TG_BENCH_URL": URL,
        "TASKGATE_URL": URL,
        "TASKGATE_POLICIES": yaml.safe_dump({"version": 1, "limiters": POLICIES}),
        **(env or {}),
    }
    job_class = "rq.job.Job" if "Plain" in worker else "taskgate.rq.Job"
    quiet = not os.environ.get("TG_BENCH_VERBOSE")
    fleet = Fleet(full_env, Path(f"/tmp/{queue}"), tag=queue)
    fleet.rq(queue, URL, "w", n=n, worker_class=worker, job_class=job_class, quiet=quiet)
    try:
        fleet.wait_ready(30)
    except RuntimeError:
        fleet.stop()
        raise
    return fleet


def enqueue(queue: str, fn: Any, run: str, n: int) -> None:
    q = Queue(queue, connection=_conn())
    datas = [Queue.prepare_data(fn, (run,), job_id=f"{queue}-{run}-{i}", result_ttl=60) for i in range(n)]
    for i in range(0, n, 500):
        q.enqueue_many(datas[i : i + 500])


def wait_count(key: str, n: int, timeout: float) -> None:
    r = _conn()
    deadline = time.monotonic() + timeout
    while int(r.get(key) or 0) < n and time.monotonic() < deadline:
        time.sleep(0.02)


def throughput(worker: str, fn: Any, n: int, label: str, workers: int) -> float:
    queue = f"{TAG}-{label}"
    fleet = start_fleet(queue, workers, worker)
    try:
        run = f"r{time.monotonic_ns()}"
        enqueue(queue, fn, run, n)
        wait_count(f"{TAG}:{run}:n", n, timeout=120)
        r = _conn()
        first, last = float(r.get(f"{TAG}:{run}:first") or 0), float(r.get(f"{TAG}:{run}:last") or 0)
        done = int(r.get(f"{TAG}:{run}:n") or 0)
        if done < n:
            raise RuntimeError(f"{label}: only {done}/{n} jobs ran")
        return (n - 1) / (last - first)
    finally:
        fleet.stop()


_serial = itertools.count()


def accuracy(label: str, fn: Any, limit: float, workers: int, n: int, env: dict[str, str]) -> list[str]:
    queue = f"{TAG}-acc{next(_serial)}"
    fleet = start_fleet(queue, workers, "bench.rq.BenchWorker", env)
    r = _conn()
    try:
        run = queue
        enqueue(queue, fn, run, n)
        deadline = time.monotonic() + n / limit * 3 + 30
        while r.llen(f"{TAG}:{run}:start") < n and time.monotonic() < deadline:
            time.sleep(0.05)
        rows = [x.decode().split("|") for x in r.lrange(f"{TAG}:{run}:start", 0, -1)]
        time.sleep(0.5)
    finally:
        fleet.stop()
    starts = sorted(float(t) for _, t in rows)
    by_id = {i: float(t) for i, t in rows}
    slots = {k.decode(): float(v) for k, v in r.hgetall(f"{TAG}:{queue}:slots").items()}
    late = sorted(by_id[i] - s for i, s in slots.items() if i in by_id)
    defers = int(r.get(f"{TAG}:{queue}:defers") or 0)
    rate = (len(starts) - 1) / (starts[-1] - starts[0])

    def pct(q: float) -> float:
        return late[min(len(late) - 1, int(q * len(late)))] * 1000 if late else 0.0

    return [
        label,
        f"{len(starts)}/{n}",
        f"{rate:.3f} ({(rate - limit) / limit * 100:+.1f}%)",
        f"{max_in_window(starts)} ({max_in_window(starts) / limit:.2f}x)",
        f"{defers / n:.2f}",
        f"{pct(0.5):.0f} / {pct(0.99):.0f} / {late[-1] * 1000 if late else 0:.0f}",
    ]


def cleanup() -> int:
    r = _conn()
    keys = list(r.scan_iter(match=f"*{TAG}*", count=1000))
    for i in range(0, len(keys), 500):
        r.unlink(*keys[i : i + 500])
    return len(keys)


def main(argv: Sequence[str] | None = None) -> int:
    global URL
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--redis", default=DEFAULT_URL, help=f"Redis URL for RQ and the store (default {DEFAULT_URL})"
    )
    p.add_argument("--jobs", type=int, default=400, help="jobs per forking-worker throughput run")
    p.add_argument("--rounds", type=int, default=5, help="throughput rounds, in alternating order")
    p.add_argument("--only", choices=("throughput", "accuracy"), default=None)
    p.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = p.parse_args(argv)
    URL = os.environ["TG_BENCH_URL"] = args.redis
    from bench import rq as jobs  # the job functions as the workers import them (not __main__'s)
    from bench._common import machine_info, ratio_line, record, table

    out: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        out.append(line)

    ok = True
    try:
        if args.only in (None, "throughput"):
            fork, simple = args.jobs, args.jobs * 4  # a SimpleWorker run is ~4x faster: as long a run
            groups = [
                [
                    ("rq.Worker, plain job", "bench.rq.PlainWorker", jobs.noop, 2, fork),
                    ("taskgate.rq.Worker, rate check", "bench.rq.BenchWorker", jobs.noop_rate, 2, fork),
                    ("taskgate.rq.Worker, admit+release", "bench.rq.BenchWorker", jobs.noop_admit, 2, fork),
                ],
                [
                    ("rq.SimpleWorker, plain job", "bench.rq.PlainSimpleWorker", jobs.noop, 1, simple),
                    (
                        "taskgate.rq.SimpleWorker, rate check",
                        "bench.rq.TgSimpleWorker",
                        jobs.noop_rate,
                        1,
                        simple,
                    ),
                    (
                        "taskgate.rq.SimpleWorker, admit+release",
                        "bench.rq.TgSimpleWorker",
                        jobs.noop_admit,
                        1,
                        simple,
                    ),
                ],
            ]
            runs: dict[str, list[float]] = {v[0]: [] for g in groups for v in g}
            serial = itertools.count()
            for rnd in range(args.rounds):  # each group back to back, its order reversed every other round
                for group in groups:
                    for name, worker, fn, w, n in group if rnd % 2 == 0 else group[::-1]:
                        runs[name].append(throughput(worker, fn, n, f"t{next(serial)}", w))
                        print(f"  round {rnd + 1}: {name}: {runs[name][-1]:,.0f} jobs/s", flush=True)
            say(
                f"throughput: no-op jobs ({fork} per forking run, {simple} per SimpleWorker run), "
                f"{args.rounds} rounds in alternating order; ratio = median of the per-round ratios"
            )
            rows = []
            verdicts = []
            for group in groups:
                base = group[0][0]
                for name, _, _, w, _ in group:
                    ratio = statistics.median(x / y for x, y in zip(runs[name], runs[base], strict=True))
                    if name != base:
                        verdicts.append(ratio_line(f"{name} vs {base}", ratio, 1.0, 0.85))
                    per_round = " ".join(f"{x:,.0f}" for x in runs[name])
                    rows.append([name, str(w), f"{max(runs[name]):,.0f}", per_round, f"{ratio:.2f}x"])
            say(table(["worker", "workers", "best jobs/s", "jobs/s per round", "ratio"], rows))
            for line, good in verdicts:
                ok &= good
                say(line)
        if args.only in (None, "accuracy"):
            short0 = {"TG_BENCH_SHORT_WAIT_MS": "0"}
            rows = [
                accuracy("2 workers, 10/s, 150 jobs", jobs.paced10, 10, 2, 150, {}),
                accuracy("2 workers, 20/s, 300 jobs", jobs.paced20, 20, 2, 300, {}),
                accuracy("4 workers, 5/s, 60 jobs, no short waits", jobs.paced5, 5, 4, 60, short0),
                accuracy("3 workers, 20/s, 300 jobs, no short waits", jobs.paced20, 20, 3, 300, short0),
            ]
            say("")
            say("accuracy (gcra, burst 1; starts as recorded by the job bodies):")
            say(
                table(
                    ["workload", "ran", "rate/s", "max in 1 s", "re-sched/job", "late ms p50/p99/max"],
                    rows,
                )
            )
            say("late = start - booked slot, for the jobs that went through the scheduler")
    finally:
        n = cleanup()
        print(f"(deleted {n} keys)")
    if args.record:
        r = _conn()
        meta = {**machine_info(r.info()), "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}
        record("bench/rq.py", "\n".join(out), meta)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
