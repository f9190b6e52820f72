"""The key obeys the provider: real Celery workers against a mock provider saying 429 and rate-limit headers.

    .venv/bin/python bench/provider.py [--n 2000] [--rpm 1200] [--phase-s 40] [--record]

A mock provider (``bench/mock_provider.py``) on 127.0.0.1: a hidden limit of ``--rpm`` requests per minute
(and a non-binding token limit), enforced in buckets of ``--burst-s`` seconds' worth, answering 200 or 429
with OpenAI-style ``x-ratelimit-*`` headers (and ``retry-after`` on a 429). ``--workers`` ``celery worker -P
--pool -c --concurrency`` processes (``bench/provider_app.py``) run ``--n`` tasks queued at once; each task
makes one call and reports the answer (``taskgate.current().report``). The policy has no rate of its own:
the provider's headers set it. The hidden limit halves after ``--phase-s`` seconds and doubles back after
twice that. Then, from the mock's log of every call:

- after a 429 no call reaches the provider before its Retry-After: a call *admitted after the engine's hold
  was written* (both instants on the engine's clock) that arrived before the hold's end is a violation
  (calls already in flight are counted apart);
- in steady state (each phase after its first ``2 x burst`` seconds) at most 1% of calls get a 429;
- goodput (200s per second) in steady state >= 95% of the hidden limit;
- after the limit halves, then doubles, the achieved rate per ``burst`` window is within 10% of it within two
  windows;
- nothing lost or run twice: one 200 per task, one completion per task.

``--record`` appends the output to ``bench/RESULTS.md``. Workers are stopped by PID; the run's Redis keys are
deleted by prefix; the queue is deleted.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import math
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

if __package__ in (None, ""):  # run as a script: bench/celery.py must not shadow the `celery` package
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import redis

from bench._common import delete_prefix, machine_info, record, table
from bench.mock_provider import Call, MockProvider
from tests.fleet import Fleet

ROOT = Path(__file__).resolve().parent.parent
AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def start_workers(env: dict[str, str], n: int, c: int, logdir: Path, pool: str = "threads") -> Fleet:
    """``n`` x ``celery worker -P pool -c c`` on the provider app (:class:`tests.fleet.Fleet`), ready."""
    fleet = Fleet(env, logdir, tag=env["TGB_PREFIX"])
    fleet.celery("bench.provider_app", "provider-w", n=n, concurrency=c, pool=pool)
    try:
        fleet.wait_ready(90)
    except RuntimeError:
        fleet.stop(30)
        raise
    return fleet


def bins(times: Sequence[float], start: float, end: float, width: float) -> list[float]:
    """Events per second in consecutive windows of ``width`` s from ``start`` (whole ones before ``end``)."""
    k = int((end - start) // width)
    counts = [0] * k
    for t in times:
        i = int((t - start) // width)
        if 0 <= i < k:
            counts[i] += 1
    return [c / width for c in counts]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="tasks (one provider call each)")
    ap.add_argument("--rpm", type=float, default=1200, help="the hidden request limit per minute")
    ap.add_argument(
        "--burst-s", type=float, default=2.0, help="the hidden bucket holds this many seconds' worth"
    )
    ap.add_argument(
        "--phase-s", type=float, default=40.0, help="the limit halves after this, doubles after 2x"
    )
    ap.add_argument(
        "--spend-s",
        type=float,
        default=2.0,
        help="halfway through the first phase someone outside the fleet spends the bucket and this many "
        "seconds' worth more of the key (the next calls get 429s with a Retry-After); 0: never",
    )
    ap.add_argument(
        "--park", choices=["auto", "always", "never"], default="auto", help="the policy's deferral.park"
    )
    ap.add_argument("--horizon", default="10s", help="the policy's provider.horizon")
    ap.add_argument("--pool", choices=["threads", "prefork"], default="threads")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--broker", default=AMQP)
    ap.add_argument("--store", default="redis://127.0.0.1:6379/9")
    ap.add_argument("--record-redis", default="redis://127.0.0.1:6379/5")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--record", action="store_true", help="append the output to bench/RESULTS.md")
    args = ap.parse_args(argv)

    prefix = f"tgprov{uuid.uuid4().hex[:8]}"
    mock = MockProvider(rpm=args.rpm, tpm=args.rpm * 1000, burst_s=args.burst_s)
    url = mock.serve()
    env = {
        **os.environ,
        "TGB_BROKER": args.broker,
        "TGB_QUEUE": f"{prefix}-q",
        "TGB_STORE": args.store,
        "TGB_PREFIX": prefix,
        "TGB_RECORD": args.record_redis,
        "TGB_PROVIDER": url,
        "TGB_PARK": args.park,
        "TGB_HORIZON": args.horizon,
        "PYTHONPATH": str(ROOT),
    }
    os.environ.update({k: v for k, v in env.items() if k.startswith("TGB_")})
    mod: ModuleType = importlib.import_module("bench.provider_app")
    rec = redis.Redis.from_url(args.record_redis)
    store = redis.Redis.from_url(args.store)
    meta = machine_info(store.info())
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["load average"] = load_before
    logdir = Path("/tmp") / prefix
    logdir.mkdir(parents=True, exist_ok=True)
    print(f"mock provider at {url}; prefix {prefix}; logs in {logdir}; starting workers ...", flush=True)
    fleet = start_workers(env, args.workers, args.concurrency, logdir, args.pool)
    changes: list[tuple[float, float]] = []
    try:
        t0 = time.time()
        for i in range(args.n):
            mod.call.delay(i)
        phase = 0
        spent = args.spend_s <= 0
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            done = int(rec.get(f"{prefix}:done") or 0)
            if done >= args.n:
                break
            el = time.time() - t0
            if not spent and el >= args.phase_s / 2:
                mock.spend(args.rpm / 60 * (args.burst_s + args.spend_s))  # the bucket, then spend_s in debt
                changes.append((time.time(), -args.rpm))  # (same limit: marks the event)
                spent = True
            if phase == 0 and el >= args.phase_s:
                mock.set_limit(args.rpm / 2)
                changes.append((time.time(), args.rpm / 2))
                phase = 1
            elif phase == 1 and el >= 2 * args.phase_s:
                mock.set_limit(args.rpm)
                changes.append((time.time(), args.rpm))
                phase = 2
            print(f"  {el:6.1f} s: {done} done, {len(mock.calls)} calls", flush=True)
            time.sleep(2.0)
        t_end = time.time()
    finally:
        fleet.stop(30)
        mock.close()
    done = int(rec.get(f"{prefix}:done") or 0)
    deferred = {
        k.decode().rsplit(":", 1)[1]: int(rec.get(k) or 0) for k in rec.scan_iter(f"{prefix}:deferred:*")
    }
    calls: list[Call] = list(mock.calls)
    ok = collections.Counter(c.call for c in calls if c.status == 200)
    n429 = sum(c.status == 429 for c in calls)
    first429 = min((c.at for c in calls if c.status == 429), default=None)
    violations, during = mock.early_calls()
    w = args.burst_s
    # phases: (start, end, hidden per second)
    edges = [t0, *(t for t, _ in changes), t_end]
    rates = [args.rpm / 60, *(abs(r) / 60 for _, r in changes)]
    spend_ix = [i + 1 for i, (_, r) in enumerate(changes) if r < 0]
    oks = sorted(c.at for c in calls if c.status == 200)
    rows = []
    steady_calls = steady_429 = 0
    conv: list[str] = []
    for k, rate in enumerate(rates):
        a, b = edges[k], edges[k + 1]
        s = a + 2 * w + (args.spend_s if k in spend_ix else 0.0)  # after a spending: its debt, then 2 windows
        if b - s < 2 * w:
            continue
        in_steady = [c for c in calls if s <= c.at < b]
        # the backlog ran out before the phase's end: count goodput only while work was left
        last_ok = max((t for t in oks if t < b), default=s)
        end = min(b, last_ok)
        good = sum(1 for t in oks if s <= t < end) / max(1e-9, end - s)
        q = sum(c.status == 429 for c in in_steady)
        steady_calls += len(in_steady)
        steady_429 += q
        per_w = bins(oks, a, end, w)
        if k > 0 and k not in spend_ix:
            two = sum(per_w[:2]) / 2 if len(per_w) >= 2 else math.nan
            stays = next(
                (i for i in range(len(per_w)) if all(abs(x - rate) <= 0.1 * rate for x in per_w[i:])), None
            )
            conv.append(
                f"after the change to {rate * 60:.0f}/min: mean of the first two {w:.0f}-s windows "
                f"{two:.2f}/s ({two / rate - 1:+.1%}); every window within 10% from "
                f"#{'-' if stays is None else stays + 1} (target: from #2 at the latest, i.e. within two "
                f"windows): {'PASS' if stays is not None and stays <= 1 else 'MISS'}"
            )
        label = f"{rate * 60:.0f}/min ({rate:.1f}/s)" + (", after the spending" if k in spend_ix else "")
        rows.append(
            [
                f"{k + 1}: {label}",
                f"{b - a:.0f} s",
                f"{good:.2f}/s",
                f"{good / rate:.3f}",
                f"{q} / {len(in_steady)}",
                " ".join(f"{x:.1f}" for x in per_w[:12]) + (" ..." if len(per_w) > 12 else ""),
            ]
        )
    lost = [i for i in range(args.n) if ok.get(str(i), 0) == 0]
    twice = [k for k, v in ok.items() if v > 1]
    lines: list[str] = []

    def out(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    out(
        f"{args.n} tasks, {args.workers} Celery workers x -P {args.pool} -c {args.concurrency}, RabbitMQ, "
        f"store on Redis (deferral.park {args.park}, provider.horizon {args.horizon}); mock provider: "
        f"{args.rpm:.0f} req/min hidden (buckets of {w:.0f} s), halved at {args.phase_s:.0f} s, doubled back "
        f"at {2 * args.phase_s:.0f} s; at {args.phase_s / 2:.0f} s another "
        f"client spends the key's bucket and {args.spend_s:.0f} s more"
    )
    out(f"run: {t_end - t0:.1f} s; {len(calls)} provider calls, {len(ok)} distinct 200s, {n429} 429s")
    out()
    out(
        table(
            ["phase (hidden limit)", "length", "goodput", "vs hidden", "429s/calls (steady)",
             f"200s/s per {w:.0f}-s window"],
            rows,
        )
    )  # fmt: skip
    out()
    out(f"first 429 at {first429 - t0:.1f} s" if first429 is not None else "no 429 at all")
    out(
        f"calls admitted after a hold was written that reached the provider before it ended: {violations} "
        f"(target 0); calls that arrived during a hold at all (in flight when it was written): {during}; "
        f"holds written: {len(mock.holds)}"
    )
    share = steady_429 / steady_calls if steady_calls else math.nan
    out(f"429s in steady state: {steady_429} / {steady_calls} = {share:.2%} (target <= 1%)")
    for line in conv:
        out(line)
    out(
        f"completions: {done} / {args.n}; tasks without a 200: {len(lost)}; tasks with more than one 200: "
        f"{len(twice)}"
    )
    out(f"deferrals by axis (task_throttled): {dict(sorted(deferred.items()))}")
    out(f"load average before/after: {load_before} / {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    delete_prefix(rec, prefix)
    delete_prefix(store, prefix)
    try:
        with mod.app.connection_for_write() as conn:
            conn.default_channel.queue_delete(f"{prefix}-q")
    except Exception as e:  # the queue is auto-named per run; a leftover one is harmless
        print(f"(could not delete the queue: {e})")
    if args.record:
        record("bench/provider.py — the key obeys the provider", "\n".join(lines), meta)
        print("appended to bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
