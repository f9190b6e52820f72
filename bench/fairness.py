"""Weighted fair share across tenants inside one shared limit (the waiting room's fair keys, issue #15).

    .venv/bin/python bench/fairness.py late    [--a 1000] [--b 20] [--after 2] [--rate 20]
    .venv/bin/python bench/fairness.py weights [--seconds 60] [--rate 20] [--switch 20]
    .venv/bin/python bench/fairness.py many    [--a 10000] [--tenants 1000] [--after 2] [--spread 0]
    .venv/bin/python bench/fairness.py alone   [--tasks 20000] [--rate 100]
    ... [--pool threads -c 16] [--record]                            # --record: append to bench/RESULTS.md
    ... [--store URL] [--record-redis URL] [--broker URL]            # default: the local Redis, RabbitMQ

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
- many: first without contention, ``--tenants`` tenants of one task each queued all at once (``--spread 0``:
  they are ``tenants / rate`` s of work, the last can start no earlier) or evenly over ``--spread`` s; then
  tenant A queues ``--a`` tasks (10,000) and ``--after`` s later the same number of single-task tenants
  arrive the same way. Printed: the singles' waits from their own enqueue (p50 / p99 / max) in both runs,
  the ratio of the p99s (target <= 2) and A's starts meanwhile (its fair share among the fair keys waiting).
  The ratio means something only when the singles queue among themselves (``--spread 0``: their own
  ``tenants / rate`` s of work). Spread thinner than the limit, an uncontended single is admitted when sent
  (a few ms), while behind A's backlog it waits for the slots the promoter has already booked for A (a plain
  gcra room is promoted ``LEAD_MS``, 250 ms, ahead of its slots so that a late promoter loses none) plus
  part of a slot: the bound there is absolute, about the lead plus one slot, not a ratio.
- alone: tenant A alone queues ``--tasks`` (20,000) at once. Targets: >= 98% of the limit (starts over the
  run, and the engine's own count of A's grants in each whole minute of the run: ``read_fair``), every task
  started exactly once, no minute over the limit (+ burst); the rooms' parked/promoted/claimed counters.

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
from bench.backlog import AMQP, RECORD_URL, ROOT, STORE_URL, room_totals, starts
from tests.fleet import Fleet, delete_queues, max_in_window


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


def singles(a: argparse.Namespace, appmod: Any, rec: redis.Redis, prefix: str, tag: str) -> list[float]:
    """Queue ``--tenants`` tenants of one task each (``<tag><i>``), all at once or evenly over ``--spread``
    s; once all started, their waits (start - own enqueue), sorted."""
    t0 = time.time()
    queued: dict[str, float] = {}
    for i in range(a.tenants):
        if a.spread > 0:
            time.sleep(max(0.0, t0 + i * a.spread / a.tenants - time.time()))
        queued[f"{tag}{i}"] = time.time()
        appmod.fair.apply_async((f"{tag}{i}", 0))
    deadline = t0 + a.tenants / a.rate * 2 + a.spread + 60
    while time.time() < deadline and sum(x in queued for _, _, x in starts(rec, prefix)) < a.tenants:
        time.sleep(0.5)
    return sorted(t - queued[x] for _, t, x in starts(rec, prefix) if x in queued)


def pct(waits: Sequence[float], q: float) -> float:
    return waits[min(len(waits) - 1, int(q / 100 * len(waits)))] if waits else float("nan")


def many(a: argparse.Namespace, appmod: Any, rec: redis.Redis, prefix: str, say: Any) -> bool:
    what = "all at once" if a.spread <= 0 else f"evenly over {a.spread:.0f}s"
    base = singles(a, appmod, rec, prefix, "u")
    say(
        f"no contention: {a.tenants} tenants of one task each, queued {what}: {len(base)} started; waits "
        f"p50 {pct(base, 50):.2f}s p99 {pct(base, 99):.2f}s max {max(base, default=0):.2f}s"
    )
    t0 = time.time()
    for i in range(a.a):
        appmod.fair.apply_async(("A", i))
    time.sleep(max(0.0, a.after))
    tb = time.time()
    waits = singles(a, appmod, rec, prefix, "t")
    got = starts(rec, prefix)
    last = max((t for _, t, x in got if x.startswith("t")), default=time.time())
    a_during = sum(1 for _, t, x in got if x == "A" and tb <= t <= last)
    a_left = a.a - sum(1 for _, t, x in got if x == "A" and t < tb)
    ratio = pct(waits, 99) / pct(base, 99) if base and pct(base, 99) > 0 else float("inf")
    ok = len(waits) == a.tenants and ratio <= 2.0
    say(
        f"contention: tenant A queued {a.a} in {tb - t0 - a.after:.1f}s ({a_left} still waiting "
        f"{a.after:.0f}s later), then the same {a.tenants} tenants {what}: {len(waits)} started; waits p50 "
        f"{pct(waits, 50):.2f}s p99 {pct(waits, 99):.2f}s max {max(waits, default=0):.2f}s; A meanwhile "
        f"{a_during} starts ({a_during / max(last - tb, 1e-9):.1f}/s)"
    )
    say(
        f"p99 with contention / without: {ratio:.2f}x (target <= 2x; FIFO behind A: "
        f"+ ~{a_left / a.rate:.0f}s each): " + ("PASS" if ok else "MISS")
    )
    return ok


def alone(a: argparse.Namespace, appmod: Any, rec: redis.Redis, prefix: str, say: Any) -> bool:
    """One tenant, ``--tasks`` tasks at once: how much of the limit it gets (starts and the engine's own count
    of grants per fair key, per whole minute), each task once, never over the limit."""
    import taskgate
    from taskgate.backends.fairness import STARTS_WINDOW_MS, read_fair

    b = taskgate.connect(a.store, appmod.POLICIES, prefix=prefix)
    assert isinstance(b, taskgate.RedisBackend)
    t0 = time.time()
    for i in range(a.tasks):
        appmod.fair.apply_async(("A", i))
    sent = time.time() - t0
    minutes: dict[int, int] = {}  # the engine's grants of fair key A per window (a full one once rolled)

    def sample() -> None:
        (fs,) = read_fair(b, [("shared", "*")])
        if fs.window_start:
            minutes[fs.window_start] = fs.current.get("A", 0)
            if fs.previous:
                minutes[fs.window_start - STARTS_WINDOW_MS] = fs.previous.get("A", 0)

    deadline = t0 + a.tasks / a.rate * 1.5 + 60
    while time.time() < deadline and rec.llen(f"{prefix}:start") < a.tasks:
        sample()
        time.sleep(2.0)
    time.sleep(2.0)  # anything doubled would show up by now
    sample()
    got = starts(rec, prefix)
    times = sorted(t for _, t, _ in got)
    ids = [i for i, _, _ in got]
    once = len(ids) == len(set(ids)) == a.tasks
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    rate = (len(times) - 1) / span if span else 0.0
    t10 = [t for t in times if t >= times[0] + 10] if times else []
    rate10 = (len(t10) - 1) / (t10[-1] - t10[0]) if len(t10) > 1 and t10[-1] > t10[0] else 0.0
    lo, hi = times[0] * 1000, times[-1] * 1000
    full = sorted((w, n) for w, n in minutes.items() if w >= lo and w + STARTS_WINDOW_MS <= hi)
    per_min = a.rate * STARTS_WINDOW_MS / 1000
    over = [n for _, n in full if n > per_min + 1]
    used = min((n / per_min for _, n in full), default=float("nan"))
    room = room_totals(redis.Redis.from_url(a.store), prefix)
    b.close()
    per_s = [sum(1 for t in times if times[0] + i <= t < times[0] + i + 1) for i in range(5)] if times else []
    say(
        f"first start {times[0] - t0 if times else 0:.2f}s after the first send; starts in its first 5 s: "
        f"{per_s}"
    )
    ok = once and rate / a.rate >= 0.98 and not over and (not full or used >= 0.98)
    say(
        f"tenant A alone, {a.tasks} tasks queued in {sent:.1f}s: {len(ids)} started "
        f"({len(set(ids))} distinct) over {span:.1f}s = {rate:.2f}/s = {100 * rate / a.rate:.1f}% of "
        f"{a.rate}/s (from t+10s: {100 * rate10 / a.rate:.1f}%); most starts in 1 s {max_in_window(times)} "
        f"(limit {a.rate} + burst 1)"
    )
    say(
        "the engine's grants to fair key A per whole minute: "
        + (", ".join(f"{n}" for _, n in full) or "(none: run shorter than a whole minute)")
        + f" of {per_min:.0f} (min {100 * used:.1f}%; over the limit: {len(over)}); rooms: parked "
        f"{room['np']}, promoted {room['npr']}, claimed {room['ncl']}, left {room['depth']}: "
        + ("PASS" if ok else "MISS")
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
        b = taskgate.connect(a.store, appmod.POLICIES, prefix=prefix)
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
    ap.add_argument("scenario", choices=("late", "weights", "many", "alone"))
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--tenants", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=0.0)
    ap.add_argument("--a", type=int, default=None)
    ap.add_argument("--b", type=int, default=20)
    ap.add_argument("--after", type=float, default=2.0)
    ap.add_argument("--rate", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--switch", type=float, default=20.0)
    ap.add_argument("--pool", default="threads")
    ap.add_argument("-c", "--concurrency", type=int, default=16)
    ap.add_argument("--store", default=STORE_URL, help="the taskgate store (Redis URL)")
    ap.add_argument("--record-redis", default=RECORD_URL, help="where the task bodies record their starts")
    ap.add_argument("--broker", default=AMQP, help="the Celery broker (RabbitMQ URL)")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args(argv)
    if a.a is None:
        a.a = 10_000 if a.scenario == "many" else 1000
    prefix = f"tgfq{uuid.uuid4().hex[:8]}"
    queue = f"fair-{prefix}"
    env = {
        **os.environ,
        "TG_PREFIX": prefix,
        "TG_QUEUE": queue,
        "TG_RATE": str(a.rate),
        "TG_PARK": "always",
        "TG_WEIGHTS": "acme=3",
        "TG_STORE": a.store,
        "TG_RECORD": a.record_redis,
        "TG_BROKER": a.broker,
        "PYTHONPATH": str(ROOT),
    }
    os.environ.update({k: v for k, v in env.items() if k.startswith("TG_")})
    sys.path.insert(0, str(ROOT))
    from tests.apps import room_app as appmod

    rec = redis.Redis.from_url(a.record_redis)
    store = redis.Redis.from_url(a.store)
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
        run = {"late": late, "weights": weights, "many": many, "alone": alone}[a.scenario]
        ok = run(a, appmod, rec, prefix, say)
    finally:
        w.stop()
        delete_queues(appmod.app, queue)
        delete_prefix(store, prefix)
        delete_prefix(rec, prefix)
    if a.record:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        meta = {**machine_info(), "load (1/5/15 min) at the end": load}
        record(f"bench/fairness.py {' '.join(sys.argv[1:])}", "\n".join(lines), meta)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
