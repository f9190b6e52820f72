"""Celery on real workers: what taskgate costs a no-op task, and how exactly it holds a global rate compared
with Celery's own ``rate_limit``.

    .venv/bin/python bench/celery.py [--n 2000] [--rounds 7] [--rate-tasks 150] [--rate 10] [--record]

Two fleets run side by side on the same RabbitMQ, each of 2 ``celery worker`` processes x ``-c 2`` (prefork),
on the app in ``bench/celery_app.py``, each consuming its own queue: **plain** (taskgate not installed) and
**taskgate** (``taskgate.celery.install()``, store on the local Redis). Only one fleet has work at a time.

1. Throughput: ``--n`` no-op tasks enqueued at once; timed from the first enqueue to the last completion (the
   last body stamps the time in Redis). Plain Celery vs a task throttled by a non-binding gcra policy
   (100000/s, burst 1000; and the same policy with ``counters: false``), in ``--rounds`` rounds in
   alternating order (the best round of each is kept, as in the other benchmarks; the median is shown too).
   Target: >= 0.85x. Also the CPU each task costs (the fleet's processes, from /proc, and the Redis server,
   from INFO cpu): on a shared machine the wall-clock rates swing with other load, the CPU per task much less.
2. Global rate: ``--rate-tasks`` tasks enqueued at once against a target of ``--rate``/s: taskgate (gcra,
   burst 1) on the taskgate fleet vs ``rate_limit="10/s"`` on the plain fleet. From the bodies' start times:
   the achieved start rate (first to last start), the most starts in any 1-s window, the time from enqueue to
   the last start against the ideal ``rate-tasks / rate``, and re-publishes per task (taskgate's deferrals;
   Celery never re-publishes: it holds rate-limited tasks unacked in the worker's memory).

``--record`` appends the output to ``bench/RESULTS.md``. Every process started here is stopped by its PID;
Redis keys are deleted by this run's prefix (records in db 5, store in db 9), the queues are deleted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

if __package__ in (None, ""):  # run as a script: this file must not shadow the `celery` package
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import importlib

import redis

from bench._common import delete_prefix, machine_info, record, table
from tests.fleet import Fleet, max_in_window

ROOT = Path(__file__).resolve().parent.parent
AMQP = "amqp://guest:guest@127.0.0.1:5672//"
RECORD_URL = "redis://127.0.0.1:6379/5"
STORE_URL = "redis://127.0.0.1:6379/9"


@dataclass
class Throughput:
    per_s: list[float] = field(default_factory=list)
    worker_cpu_us: list[float] = field(default_factory=list)  # per task: worker mains + pool children
    redis_cpu_us: list[float] = field(default_factory=list)  # per task: the whole Redis server

    @property
    def cpu_us(self) -> float:
        """Median worker + Redis CPU per task."""
        return statistics.median(w + r for w, r in zip(self.worker_cpu_us, self.redis_cpu_us, strict=True))

    @property
    def best(self) -> float:
        return max(self.per_s)

    @property
    def median(self) -> float:
        return statistics.median(self.per_s)


@dataclass
class RateRun:
    label: str
    n: int
    target: float
    enqueued_at: float
    starts: list[float]
    republished: int | None

    @property
    def achieved(self) -> float:
        return (len(self.starts) - 1) / (self.starts[-1] - self.starts[0])

    @property
    def max_window(self) -> int:
        return max_in_window(self.starts)

    @property
    def total_s(self) -> float:
        return self.starts[-1] - self.enqueued_at

    @property
    def ideal_s(self) -> float:
        return self.n / self.target

    def per_second(self) -> str:
        """Starts in each second after the enqueue."""
        counts = [0] * (int(self.total_s) + 1)
        for t in self.starts:
            counts[int(t - self.enqueued_at)] += 1
        return " ".join(map(str, counts))


def rounds(t: Throughput) -> str:
    return " ".join(f"{x:.0f}" for x in t.per_s)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prefix = f"tgbc{os.getpid()}{uuid.uuid4().hex[:6]}"
        self.rec = redis.Redis.from_url(args.record_redis)
        self.store = redis.Redis.from_url(args.store)
        self.queues = {"plain": f"{self.prefix}-plain", "taskgate": f"{self.prefix}-tg"}
        base = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TGB_BROKER": args.broker,
            "TGB_STORE": args.store,
            "TGB_PREFIX": self.prefix,
            "TGB_RECORD": args.record_redis,
            "TGB_RATE": str(args.rate),
        }
        self.envs = {
            "plain": {**base, "TGB_TASKGATE": "0", "TGB_QUEUE": self.queues["plain"]},
            "taskgate": {**base, "TGB_TASKGATE": "1", "TGB_QUEUE": self.queues["taskgate"]},
        }
        # the producer: the same app module, configured like the plain fleet (it only sends)
        os.environ.update({k: v for k, v in self.envs["plain"].items() if k.startswith("TGB_")})
        self.mod: ModuleType = importlib.import_module("bench.celery_app")
        self.fleets: dict[str, Fleet] = {}

    def start(self) -> None:
        """The two fleets: ``workers`` x ``celery worker -c concurrency`` (prefork) on the bench app each."""
        logdir = Path(f"/tmp/{self.prefix}")
        for name in ("plain", "taskgate"):
            f = self.fleets[name] = Fleet(self.envs[name], logdir, tag=self.prefix)
            f.celery("bench.celery_app", f"{name}-w", n=self.args.workers, concurrency=self.args.concurrency)
        for f in self.fleets.values():
            f.wait_ready()

    def stop(self) -> None:
        for f in self.fleets.values():
            f.stop()
        try:
            with self.mod.app.connection_for_write() as conn:
                ch = conn.default_channel
                for q in self.queues.values():
                    ch.queue_delete(q)
        except Exception as e:  # a leftover queue is harmless; say so and go on
            print(f"(could not delete the bench queues: {e})", file=sys.stderr)
        delete_prefix(self.rec, self.prefix + ":")
        delete_prefix(self.store, self.prefix + ":")

    # ------------------------------------------------------------------------------------------ throughput

    def throughput_once(self, variant: str, n: int, into: Throughput | None = None) -> float:
        run = uuid.uuid4().hex[:10]
        tasks = {"plain": self.mod.noop, "taskgate": self.mod.noop_tg, "counters off": self.mod.noop_tg_nc}
        task = tasks[variant]
        name = "plain" if variant == "plain" else "taskgate"
        fleet, queue = self.fleets[name], self.queues[name]
        done_key = f"{self.prefix}:{run}:done"
        cpu0, rcpu0 = fleet.cpu_s(), redis_cpu_s(self.rec)
        t0 = time.time()
        for _ in range(n):
            task.apply_async((run, n), queue=queue)
        deadline = time.monotonic() + 300
        while (done := self.rec.get(done_key)) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{variant}: {n} tasks did not complete in 300 s")
            time.sleep(0.05)
        rate = n / (float(done) - t0)
        if into is not None:
            into.per_s.append(rate)
            into.worker_cpu_us.append((fleet.cpu_s() - cpu0) / n * 1e6)
            into.redis_cpu_us.append((redis_cpu_s(self.rec) - rcpu0) / n * 1e6)
        return rate

    def throughput(self) -> dict[str, Throughput]:
        out = {"plain": Throughput(), "taskgate": Throughput(), "counters off": Throughput()}
        for variant in out:  # warm-up: connections, scripts, imports in every pool child
            self.throughput_once(variant, 200)
        for r in range(self.args.rounds):
            order = list(out) if r % 2 == 0 else list(reversed(out))
            for variant in order:
                x = self.throughput_once(variant, self.args.n, out[variant])
                print(f"  round {r + 1}/{self.args.rounds} {variant:12s} {x:8.0f} tasks/s", flush=True)
        return out

    # -------------------------------------------------------------------------------------------- rate

    def rate_once(self, label: str) -> RateRun:
        run = uuid.uuid4().hex[:10]
        n = self.args.rate_tasks
        if label == "taskgate":
            task, queue = self.mod.paced_tg, self.queues["taskgate"]
        else:
            task, queue = self.mod.paced_celery, self.queues["plain"]
        key = f"{self.prefix}:{run}:start"
        deferrals_before = int(self.rec.get(f"{self.prefix}:deferrals") or 0)
        t0 = time.time()
        for _ in range(n):
            task.apply_async((run,), queue=queue)
        deadline = time.monotonic() + 60 + 3 * n / self.args.rate
        while self.rec.llen(key) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: only {self.rec.llen(key)}/{n} tasks started")
            time.sleep(0.1)
        time.sleep(1.0)  # a straggler would show up as an extra start
        starts = sorted(float(x) for x in self.rec.lrange(key, 0, -1))
        deferrals = int(self.rec.get(f"{self.prefix}:deferrals") or 0) - deferrals_before
        return RateRun(
            label, len(starts), float(self.args.rate), t0, starts, deferrals if label == "taskgate" else None
        )


def redis_cpu_s(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def wait_quiet(threshold: float, max_s: float) -> None:
    """Wait (up to ``max_s``) until the 1-minute load average is at most ``threshold``."""
    if threshold <= 0:
        return
    deadline = time.monotonic() + max_s
    while os.getloadavg()[0] > threshold and time.monotonic() < deadline:
        print(f"waiting for the machine to quieten: load {os.getloadavg()[0]:.2f} > {threshold}", flush=True)
        time.sleep(15)


def rabbitmq_version(app: Any) -> str:
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            props: dict[str, Any] = conn.connection.server_properties
            v = props.get("version", "?")
            return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        return "?"


def versions() -> str:
    import celery
    import kombu

    import taskgate

    return f"celery {celery.__version__}, kombu {kombu.__version__}, taskgate {taskgate.__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="no-op tasks per throughput round")
    ap.add_argument("--rounds", type=int, default=7, help="throughput rounds per variant")
    ap.add_argument("--rate-tasks", type=int, default=150)
    ap.add_argument("--rate", type=int, default=10, help="target starts per second")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--broker", default=AMQP)
    ap.add_argument("--record-redis", default=RECORD_URL, help="where task bodies record (db 5)")
    ap.add_argument("--store", default=STORE_URL, help="the taskgate store (db 9)")
    ap.add_argument("--record", action="store_true", help="append the output to bench/RESULTS.md")
    ap.add_argument(
        "--wait-load",
        type=float,
        default=1.0,
        help="first wait until the 1-min load average is at most this (a shared machine); 0: do not wait",
    )
    ap.add_argument("--wait-max", type=float, default=600.0, help="... for at most this many seconds")
    ap.add_argument(
        "--record-max-load",
        type=float,
        default=0.0,
        help="with --record: skip recording when the 1-min load average after the run is above this (0: off)",
    )
    args = ap.parse_args(argv)

    bench = Bench(args)
    meta = machine_info(bench.rec.info())
    meta["rabbitmq"] = rabbitmq_version(bench.mod.app)
    meta["packages"] = versions()
    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    wait_quiet(args.wait_load, args.wait_max)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["load average"] = load_before
    print(f"prefix {bench.prefix}; starting 2 fleets of {args.workers} workers x -c {args.concurrency} ...")
    t_start = time.monotonic()
    try:
        bench.start()
        print(f"throughput: {args.n} no-op tasks per round, {args.rounds} rounds per variant")
        tp = bench.throughput()
        print(f"global rate: {args.rate_tasks} tasks at once, target {args.rate}/s")
        runs = [bench.rate_once("taskgate"), bench.rate_once("celery rate_limit")]
    finally:
        bench.stop()

    out(
        f"Celery, {args.workers} workers x -c {args.concurrency} (prefork) per fleet, RabbitMQ broker, "
        f"taskgate store on Redis ({meta.get('redis', '?')})"
    )
    out()
    out(f"1. No-op task throughput, N={args.n}, enqueue -> last completion ({args.rounds} rounds each)")
    plain, tg, nc = tp["plain"], tp["taskgate"], tp["counters off"]
    variants = [
        ("plain Celery (taskgate not installed)", plain),
        ("taskgate, gcra 100000/s (non-binding)", tg),
        ("  the same, policy counters: false", nc),
    ]
    out(
        table(
            [
                "variant",
                "best tasks/s",
                "median tasks/s",
                "worker CPU/task",
                "Redis CPU/task",
                "rounds (tasks/s)",
            ],
            [
                [
                    name,
                    f"{t.best:,.0f}",
                    f"{t.median:,.0f}",
                    f"{statistics.median(t.worker_cpu_us):.0f} us",
                    f"{statistics.median(t.redis_cpu_us):.0f} us",
                    rounds(t),
                ]
                for name, t in variants
            ],
        )
    )
    ratio_best = tg.best / plain.best
    paired = statistics.median(a / b for a, b in zip(tg.per_s, plain.per_s, strict=True))
    verdict = "PASS" if ratio_best >= 0.85 else "MISS"
    out(
        f"ratio taskgate / plain: {ratio_best:.2f}x best (target >= 0.85x)  {verdict}; "
        f"{tg.median / plain.median:.2f}x median; {paired:.2f}x median of per-round ratios"
    )
    out(
        f"  by CPU per task (worker + Redis, medians; what bounds throughput on a saturated machine): "
        f"{plain.cpu_us / tg.cpu_us:.2f}x; counters: false {plain.cpu_us / nc.cpu_us:.2f}x"
    )
    out(
        f"  load average before/after: {load_before} / {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
        "(the Redis CPU includes the server's other clients)"
    )
    out()
    out(
        f"2. Global rate, {args.rate_tasks} tasks queued at once, target {args.rate}/s "
        f"(ideal {args.rate_tasks / args.rate:.1f} s); {args.workers} workers x -c {args.concurrency}"
    )
    rows = [
        [
            r.label,
            f"{r.achieved:.2f}/s",
            f"{r.achieved / r.target:.2f}x",
            str(r.max_window),
            f"{r.total_s:.1f} s",
            f"{r.total_s / r.ideal_s:.2f}x",
            "0 (held in worker memory)" if r.republished is None else f"{r.republished / r.n:.2f}",
        ]
        for r in runs
    ]
    headers = ["limiter", "achieved", "vs target", "max in 1 s", "enqueue->last start", "vs ideal"]
    out(table([*headers, "re-publishes/task"], rows))
    out("starts in each second after the enqueue:")
    for r in runs:
        out(f"  {r.label:18s} {r.per_second()}")
    tgr, cel = runs
    err = [abs(r.achieved - r.target) / r.target * 100 for r in (tgr, cel)]
    out(
        f"rate error (first to last start): taskgate {err[0]:.1f}%, "
        f"Celery rate_limit {err[1]:.1f}%; Celery's limit is per "
        f"worker ({args.workers} workers may start up to {args.workers}x the rate), and rate-limited tasks "
        "wait in the worker's prefetch"
    )
    print(f"\n(total run {time.monotonic() - t_start:.0f} s)")
    load_after = os.getloadavg()[0]
    if args.record and args.record_max_load and load_after > args.record_max_load:
        print(f"not recorded: load average {load_after:.2f} > {args.record_max_load} (the machine got busy)")
    elif args.record:
        record("bench/celery.py — Celery on real workers", "\n".join(lines), meta)
        print("appended to bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
