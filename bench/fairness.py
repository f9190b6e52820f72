"""Weighted fair share across tenants inside one shared limit (the waiting room's fair keys, issue #15).

    .venv/bin/python bench/fairness.py late    [--a 1000] [--b 20] [--after 2] [--rate 20]
    .venv/bin/python bench/fairness.py weights [--seconds 60] [--rate 20] [--switch 20]
    .venv/bin/python bench/fairness.py many    [--a 1000] [--tenants 1000] [--after 2] [--spread 0]
    ... [--pool threads -c 16] [--record]                            # --record: append to bench/RESULTS.md

One real ``celery worker --pool threads -c 16`` on RabbitMQ (``tests/apps/room_app.py``, task ``fair``:
policy ``shared`` = gcra ``--rate``/s burst 1, ``deferral: {park: always}``, no ``key=`` so one limit key for
every tenant, ``fair_key="tenant"``); the store on the local Redis (db 9), every body start recorded in db 5.

- late: tenant A queues ``--a`` tasks, tenant B queues ``--b`` tasks ``--after`` s later. Targets: every one
  of B's tasks starts within 4 s of B's enqueue (FIFO would start B's last ~``a / rate`` s later), and A keeps
  >= 8/s meanwhile (from B's enqueue to B's last start).
- weights: tenants acme (weight 3, policy file) and beta (weight 1) both keep more work queued than the limit
  can start for the whole run. Target: starts split 75/25 within +-5 points over ``--seconds`` s (counted
  from t+5 s). Then ``--switch`` s more after ``taskgate.set_weight(..., "beta", 3)``: 50/50 expected from
  about a second after the change (the weights are cached <= 1 s per process).
- many: tenant A queues ``--a`` tasks, then ``--tenants`` tenants one task each ``--after`` s later, all at
  once (``--spread 0``: they are ``tenants / rate`` s of work, the last can start no earlier) or evenly over
  ``--spread`` s (each then waits about one slot). Printed: their waits from their own enqueue (p50 / p99 /
  max) and A's starts meanwhile (its fair share among the fair keys waiting).

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
from bench.backlog import AMQP, RECORD_URL, ROOT, STORE_URL, starts
from tests.fleet import Fleet, delete_queues


def share(xs: Sequence[str], who: str) -> float:
    return 100.0 * sum(x == who for x in xs) / len(xs) if xs else 0.0


def late(a: argparse.Namespace, appmod: Any, rec: redis.Redis, prefix: str, say: Any) -> bool:
    t0 = time.time()
    for i in range(a.a):
        appmod.fair.apply_async(("A", i))
    ta = time.time() - t0
    time.sleep(max(0.0, a.after))
    tb = time.time()
    for i in range(a.b):
        appmod.fair.apply_async(("B", i))
    sent_b = time.time() - tb
    deadline = tb + 60
    while time.time() < deadline and sum(x == "B" for _, _, x in starts(rec, prefix)) < a.b:
        time.sleep(0.2)
    got = sorted(starts(rec, prefix), key=lambda s: s[1])
    b = [t - tb for _, t, x in got if x == "B"]
    last_b = tb + max(b) if b else time.time()
    a_during = [t for _, t, x in got if x == "A" and tb <= t <= last_b]
    a_rate = len(a_during) / (last_b - tb) if last_b > tb else 0.0
    a_before = [t for _, t, x in got if x == "A" and t < tb]
    a_rate_before = len(a_before) / (tb - min(a_before)) if len(a_before) > 1 else 0.0
    ok = len(b) == a.b and max(b) <= 4.0 and a_rate >= 8.0
    say(
        f"A queued {a.a} in {ta:.2f}s; B queued {a.b} {tb - t0:.2f}s after A's first "
        f"({sent_b:.2f}s to send); A started {a_rate_before:.1f}/s before B"
    )
    say(
        f"B's {len(b)}/{a.b} started {min(b, default=0):.2f}s .. {max(b, default=0):.2f}s after B's enqueue "
        f"(target: all within 4s; FIFO behind A's backlog: ~{(a.a - len(a_before)) / a.rate:.0f}s); "
        f"A meanwhile {len(a_during)} starts = {a_rate:.1f}/s (target >= 8/s): " + ("PASS" if ok else "MISS")
    )
    return ok


def many(a: argparse.Namespace, appmod: Any, rec: redis.Redis, prefix: str, say: Any) -> bool:
    for i in range(a.a):
        appmod.fair.apply_async(("A", i))
    time.sleep(max(0.0, a.after))
    tb = time.time()
    queued: dict[str, float] = {}
    for i in range(a.tenants):
        if a.spread > 0:
            time.sleep(max(0.0, tb + i * a.spread / a.tenants - time.time()))
        queued[f"t{i}"] = time.time()
        appmod.fair.apply_async((f"t{i}", 0))
    sent = time.time() - tb
    deadline = tb + a.tenants / a.rate * 2 + a.spread + 30
    while time.time() < deadline and sum(x.startswith("t") for _, _, x in starts(rec, prefix)) < a.tenants:
        time.sleep(0.5)
    got = starts(rec, prefix)
    waits = sorted(t - queued[x] for _, t, x in got if x in queued)
    last = max((t for _, t, x in got if x in queued), default=time.time())
    a_during = sum(1 for _, t, x in got if x == "A" and tb <= t <= last)
    ideal = (a.tenants - 1) / a.rate if a.spread <= 0 else 1 / a.rate

    def pct(q: float) -> float:
        return waits[min(len(waits) - 1, int(q / 100 * len(waits)))] if waits else 0.0

    bound = ideal * 1.1 + 2
    ok = len(waits) == a.tenants and pct(99) <= bound
    say(
        f"{a.tenants} tenants of one task each, queued from {a.after:.0f}s after A's {a.a} over {sent:.1f}s: "
        f"{len(waits)} started; waits p50 {pct(50):.1f}s p99 {pct(99):.1f}s max {max(waits, default=0):.1f}s"
    )
    say(
        f"(ideal: {ideal:.2f}s at {a.rate}/s; bound p99 <= {bound:.1f}s; FIFO behind A: "
        f"+ ~{a.a / a.rate:.0f}s); A meanwhile {a_during} starts: " + ("PASS" if ok else "MISS")
    )
    return ok


def weights(a: argparse.Namespace, appmod: Any, rec: redis.Redis, prefix: str, say: Any) -> bool:
    import taskgate

    per = int(a.rate * (a.seconds + a.switch + 15))  # more than the limit can start in the run, each
    t0 = time.time()
    for i in range(per):
        appmod.fair.apply_async(("acme", i))
        appmod.fair.apply_async(("beta", i))
    say(f"queued {per} of acme (weight 3) and {per} of beta (weight 1) in {time.time() - t0:.1f}s")
    start, end = t0 + 5, t0 + 5 + a.seconds
    time.sleep(max(0.0, end - time.time()))
    got = [(t, x) for _, t, x in starts(rec, prefix)]
    window = [x for t, x in got if start <= t < end]
    acme = share(window, "acme")
    tens = [
        share([x for t, x in got if s <= t < s + 10], "acme") for s in range(int(start), int(end) - 9, 10)
    ]
    ok = abs(acme - 75.0) <= 5.0
    say(
        f"{a.seconds:.0f}s from t+5s: {len(window)} starts ({len(window) / a.seconds:.2f}/s), acme "
        f"{acme:.1f}% / beta {100 - acme:.1f}% (target 75/25 +-5 points): " + ("PASS" if ok else "MISS")
    )
    say("acme's share per 10 s: " + ", ".join(f"{x:.0f}%" for x in tens))
    if a.switch > 0:
        b = taskgate.connect(STORE_URL, appmod.POLICIES, prefix=prefix)
        assert isinstance(b, taskgate.RedisBackend)
        ts = time.time()
        taskgate.set_weight(b, "shared", "beta", 3)
        b.close()
        time.sleep(a.switch + 0.5)
        got = [(t, x) for _, t, x in starts(rec, prefix)]
        after = [x for t, x in got if ts + 2 <= t < ts + a.switch]
        first = [x for t, x in got if ts <= t < ts + 2]
        s = share(after, "acme")
        ok2 = abs(s - 50.0) <= 10.0
        say(
            f"set_weight(shared, beta, 3) at t+{ts - t0:.1f}s: acme {share(first, 'acme'):.0f}% in the first "
            f"2 s, then {s:.1f}% over {a.switch - 2:.0f}s ({len(after)} starts; expected 50% +-10): "
            + ("PASS" if ok2 else "MISS")
        )
        ok = ok and ok2
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", choices=("late", "weights", "many"))
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=0.0)
    ap.add_argument("--a", type=int, default=1000)
    ap.add_argument("--b", type=int, default=20)
    ap.add_argument("--after", type=float, default=2.0)
    ap.add_argument("--rate", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--switch", type=float, default=20.0)
    ap.add_argument("--pool", default="threads")
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args(argv)
    prefix = f"tgfq{uuid.uuid4().hex[:8]}"
    queue = f"fair-{prefix}"
    env = {
        **os.environ,
        "TG_PREFIX": prefix,
        "TG_QUEUE": queue,
        "TG_RATE": str(a.rate),
        "TG_PARK": "always",
        "TG_WEIGHTS": "acme=3",
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
    w.celery("tests.apps.room_app", "fairness-w", n=1, concurrency=a.concurrency, pool=a.pool)
    lines: list[str] = []

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    try:
        w.wait_ready()
        time.sleep(2)
        say(
            f"scenario {a.scenario}: 1 worker --pool {a.pool} -c {a.concurrency}, policy gcra {a.rate}/s "
            "burst 1, park always, one limit key, fair_key=tenant"
        )
        ok = {"late": late, "weights": weights, "many": many}[a.scenario](a, appmod, rec, prefix, say)
    finally:
        w.stop()
        delete_queues(appmod.app, queue)
        delete_prefix(store, prefix)
        delete_prefix(rec, prefix)
    if a.record:
        record(f"bench/fairness.py {' '.join(sys.argv[1:])}", "\n".join(lines), machine_info())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
