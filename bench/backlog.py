"""The waiting room at the scale users have: a backlog on one key, head-of-line, the concurrency hand-off.

    .venv/bin/python bench/backlog.py backlog [--tasks 20000] [--rate 10] [--pool threads -c 16]
                                              [--workers 1] [--duration 90] [--park always|never]
    .venv/bin/python bench/backlog.py drain   [--tasks 100000] [--rate 200]      # until every task started
    .venv/bin/python bench/backlog.py hol     [--tasks 20000]                    # tenant B behind tenant A
    .venv/bin/python bench/backlog.py handoff [--tasks 500] [--limit 3] [--hold 0.2]
    ... --record                                                                 # append to bench/RESULTS.md

Real ``celery worker`` processes on RabbitMQ (``tests/apps/room_app.py``), the store on the local Redis
(db 9), every body start recorded in db 5. Workers start on an empty queue and are warmed up (their idle RSS
is read then), then the tasks are published as fast as one process can; the clock starts at the first
publish.

- backlog: ``--tasks`` tasks on one key of a gcra ``--rate``/s burst 1 policy. Printed: starts/s from t+30 s
  to the end of ``--duration``, the most starts in any 1-second window (target: <= limit + burst + 1), worker
  RSS over idle (target <= +50 MiB), broker messages per started task.
- drain: the same until every task has started: drain time against the ideal ``tasks / rate`` (target within
  2%), broker messages per task (originals + promotions; target <= 2), Redis bytes per parked task (the
  room's keys at their deepest, from MEMORY USAGE).
- hol: ``--tasks`` tasks of tenant A on a per-tenant policy, then 5 of tenant B and one unthrottled task:
  how long after they were sent each of those started (target: all within 2 s).
- handoff: ``--tasks`` tasks of ``--hold`` s on a concurrency limit of ``--limit``: the most in flight at once
  (target: exactly the limit) and the utilisation of the slots over the run (target >= 95%).

Every process started here is stopped by its PID; keys are deleted by this run's prefix; queues are deleted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: this file must not shadow the `celery` package
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import redis

from bench._common import delete_prefix, machine_info, record
from tests.fleet import Fleet, delete_queues, max_in_window, read_records

ROOT = Path(__file__).resolve().parent.parent
AMQP = "amqp://guest:guest@127.0.0.1:5672//"
RECORD_URL = "redis://127.0.0.1:6379/5"
STORE_URL = "redis://127.0.0.1:6379/9"


def starts(rec: redis.Redis, prefix: str, kind: str = "start") -> list[tuple[str, float, str]]:
    return [(ident, t, extra) for ident, t, _, extra in read_records(rec, prefix, kind)]


def room_totals(store: redis.Redis, prefix: str) -> dict[str, int]:
    """Summed counters of every waiting room of this run (parked, promoted, claimed) and depth/handoff."""
    out = {"np": 0, "nsp": 0, "npr": 0, "ncl": 0, "depth": 0, "handoff": 0, "bytes": 0}
    for k in store.scan_iter(match=f"{prefix}:*:wm", count=1000):
        for f, v in store.hgetall(k).items():
            if f.decode() in out:
                out[f.decode()] += int(v)
    for k in store.scan_iter(match=f"{prefix}:*:wq", count=1000):
        out["depth"] += int(store.zcard(k))
    for k in store.scan_iter(match=f"{prefix}:*:wh", count=1000):
        out["handoff"] += int(store.zcard(k))
    return out


def room_bytes(store: redis.Redis, prefix: str) -> tuple[int, int]:
    """(bytes used by the rooms' order, payload and fair-queue keys, tasks waiting)."""
    total, depth = 0, 0
    for suffix in ("wq", "wd", "wp", "wf"):
        for k in store.scan_iter(match=f"{prefix}:*:{suffix}", count=1000):
            total += int(store.memory_usage(k, samples=0) or 0)
            if suffix == "wq":
                depth += int(store.zcard(k))
    return total, depth


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", choices=("backlog", "drain", "hol", "handoff"))
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--rate", type=int, default=None)
    ap.add_argument("--pool", default="threads")
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--duration", type=float, default=90.0)
    ap.add_argument("--park", default="always", choices=("always", "never", "auto"))
    ap.add_argument("--limit", type=int, default=3)
    ap.add_argument("--hold", type=float, default=0.2)
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args(argv)
    tasks = a.tasks or {"backlog": 20_000, "drain": 100_000, "hol": 20_000, "handoff": 500}[a.scenario]
    rate = a.rate or {"drain": 200}.get(a.scenario, 10)
    prefix = f"tgbl{uuid.uuid4().hex[:8]}"
    queue = f"backlog-{prefix}"
    env = {
        **os.environ,
        "TG_PREFIX": prefix,
        "TG_QUEUE": queue,
        "TG_RATE": str(rate),
        "TG_PARK": a.park,
        "TG_CONC": str(a.limit),
        "TG_STORE": STORE_URL,
        "TG_RECORD": RECORD_URL,
        "TG_BROKER": AMQP,
        "PYTHONPATH": str(ROOT),
    }
    os.environ.update({k: v for k, v in env.items() if k.startswith("TG_")})
    sys.path.insert(0, str(ROOT))
    from tests.apps import room_app as appmod

    rec = redis.Redis.from_url(RECORD_URL)
    store = redis.Redis.from_url(STORE_URL)
    logdir = ROOT / "integration" / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    w = Fleet(env, logdir, tag=prefix)
    w.celery("tests.apps.room_app", "backlog-w", n=a.workers, concurrency=a.concurrency, pool=a.pool)
    lines: list[str] = []

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    try:
        w.wait_ready()
        time.sleep(2)
        cold = w.rss_mib()
        # warm up: every pool thread/process busy at once (unthrottled tasks of 50 ms), then idle again
        warm_n = a.workers * a.concurrency * 20
        for i in range(warm_n):
            appmod.free.apply_async((i, 0.05))
        while rec.llen(f"{prefix}:warm") < warm_n:
            time.sleep(0.5)
        time.sleep(2)
        idle = w.rss_mib()
        say(
            f"scenario {a.scenario}: {tasks} tasks, {a.workers} worker(s) "
            f"--pool {a.pool} -c {a.concurrency}, "
            f"park={a.park}, rate {rate}/s; worker RSS {cold:.0f} MiB started, {idle:.0f} MiB idle after a "
            f"warm-up of {warm_n} unthrottled tasks"
        )
        result = run(a, appmod, rec, store, w, prefix, tasks, rate, idle, say)
    finally:
        w.stop()
        delete_queues(appmod.app, queue)
        delete_prefix(store, prefix)
        delete_prefix(rec, prefix)
    if a.record:
        meta = machine_info()
        record(f"bench/backlog.py {' '.join(sys.argv[1:])}", "\n".join(lines), meta)
    return 0 if result else 1


def run(
    a: argparse.Namespace,
    appmod: Any,
    rec: redis.Redis,
    store: redis.Redis,
    w: Fleet,
    prefix: str,
    tasks: int,
    rate: int,
    idle: float,
    say: Any,
) -> bool:
    t0 = time.time()
    if a.scenario in ("backlog", "drain"):
        for i in range(tasks):
            appmod.paced.apply_async((i,))
    elif a.scenario == "hol":
        for i in range(tasks):
            appmod.per_tenant.apply_async(("A", i))
    else:
        for _ in range(tasks):
            appmod.held.apply_async((a.hold,))
    sent = time.time() - t0
    say(f"published {tasks} in {sent:.1f}s ({tasks / sent:.0f}/s)")
    if a.scenario == "backlog":
        peak_rss = idle
        while time.time() - t0 < a.duration:
            time.sleep(2)
            peak_rss = max(peak_rss, w.rss_mib())
        ts = sorted(t for _, t, _ in starts(rec, prefix))
        late = [t for t in ts if t >= t0 + 30]
        span = min(time.time(), (ts[-1] if ts else t0)) - (t0 + 30)
        r30 = len(late) / span if span > 0 else 0.0
        top = max_in_window(late)
        tot = room_totals(store, prefix)
        # broker messages so far: the tasks sent as they are (not parked when sent) + the promotions
        msgs = (tasks - tot["nsp"] + tot["npr"]) / tasks
        ok = r30 >= 0.95 * rate and top <= rate + 2 and peak_rss - idle <= 50
        say(
            f"started {len(ts)} in {a.duration:.0f}s; from t+30s: {r30:.2f}/s (target >= {0.95 * rate:.2f}); "
            f"most in 1s from t+30s: {top} (target <= {rate + 2}; from t: {max_in_window(ts)}); "
            f"worker RSS peak {peak_rss:.0f} MiB "
            f"(+{peak_rss - idle:.0f} over idle, target <= +50); parked {tot['np']}, promoted {tot['npr']}, "
            f"waiting {tot['depth']}; broker messages per task so far {msgs:.3f}: "
            + ("PASS" if ok else "MISS")
        )
        return ok
    if a.scenario == "drain":
        deepest, at_deepest = 0, 0
        peak_rss = idle
        last = 0
        while True:
            time.sleep(2)
            n = rec.llen(f"{prefix}:start")
            b, depth = room_bytes(store, prefix)
            if depth > deepest:
                deepest, at_deepest = depth, b
            peak_rss = max(peak_rss, w.rss_mib())
            if n >= tasks:
                break
            if n == last and time.time() - t0 > tasks / rate * 1.5 + 60:
                say(f"stalled at {n}/{tasks}")
                return False
            last = n
        ts = sorted(t for _, t, _ in starts(rec, prefix))
        ids = [i for i, _, _ in starts(rec, prefix)]
        drain = ts[-1] - t0
        ideal = (tasks - 1) / rate  # burst 1: the first starts at once
        tot = room_totals(store, prefix)
        msgs = (tasks - tot["nsp"] + tot["npr"]) / tasks
        per = at_deepest / deepest if deepest else 0.0
        dup = len(ids) - len(set(ids))
        ok = abs(drain / ideal - 1) <= 0.02 and msgs <= 2 and dup == 0
        say(
            f"drained {len(ts)} in {drain:.1f}s, ideal {ideal:.1f}s: {drain / ideal:.4f}x "
            "(target within 2%); "
            f"broker messages per task {msgs:.3f} (target <= 2); deepest room {deepest} tasks, "
            f"{per:.0f} Redis bytes per parked task; ran twice: {dup}; most in 1s: {max_in_window(ts)}; "
            f"worker RSS +{peak_rss - idle:.0f} MiB: " + ("PASS" if ok else "MISS")
        )
        return ok
    if a.scenario == "hol":
        t1 = time.time()
        for i in range(5):
            appmod.per_tenant.apply_async(("B", i))
        appmod.free.apply_async((0,))
        deadline = time.time() + 60
        while time.time() < deadline:
            got = [(x, t) for _, t, x in starts(rec, prefix) if x in ("B", "free")]
            if len(got) >= 6:
                break
            time.sleep(0.2)
        waits = sorted(t - t1 for _, t in got)
        ok = len(waits) == 6 and waits[-1] <= 2.0
        say(
            f"5 tasks of tenant B and 1 unthrottled sent {t1 - t0:.1f}s after the first of A's: started "
            f"{len(waits)}/6, after "
            + ", ".join(f"{x:.2f}s" for x in waits)
            + " (target: all within 2s): "
            + ("PASS" if ok else "MISS")
        )
        return ok
    # handoff
    deadline = time.time() + tasks * a.hold / a.limit * 2 + 60
    while time.time() < deadline and rec.llen(f"{prefix}:end") < tasks:
        time.sleep(1)
    s = {i: t for i, t, _ in starts(rec, prefix)}
    e = {i: t for i, t, _ in starts(rec, prefix, "end")}
    events = sorted([(t, 1) for t in s.values()] + [(t, -1) for t in e.values()])
    cur = most = 0
    for _, d in events:
        cur += d
        most = max(most, cur)
    first, last = min(s.values()), max(e.values())
    busy = sum(e[i] - s[i] for i in e if i in s)
    util = busy / (a.limit * (last - first))
    ok = len(e) == tasks and most == a.limit and util >= 0.95
    say(
        f"{len(e)}/{tasks} ran; most in flight {most} (limit {a.limit}); slot utilisation {util:.3f} over "
        f"{last - first:.1f}s (ideal {tasks * a.hold / a.limit:.1f}s; target >= 0.95): "
        + ("PASS" if ok else "MISS")
    )
    return ok


if __name__ == "__main__":
    raise SystemExit(main())
