"""Decision throughput and latency: taskgate's direct Redis door against its floor and against `limits`.

    .venv/bin/python bench/decisions.py [--redis URL] [--seconds S] [--slice S] [--pin auto|none|N]
                                        [--record] [--profile] [--server-side] [--only SUBSTR,...]
                                        [--load-note TEXT]

All in one run, on the same Redis, one thread, synchronous calls, one client connection per measurement:

- taskgate ``check`` (gcra) with distinct keys and with one hot key; ``check`` on the four other strategies;
- taskgate ``check_many`` with 100 keys per call;
- the floor: a bare redis-py ``EVALSHA`` loop of a minimal GCRA script (:data:`BARE_GCRA`), distinct keys;
- a bare redis-py pipeline (``transaction=False``) of 100 such ``EVALSHA`` per call;
- the ``limits`` library (``RedisStorage``: fixed window, moving window, sliding window counter), distinct
  keys;

then the ratios against the targets (check >= 0.85x the bare loop with ``counters: false`` and >= 0.75x
with the counters, the default; check_many >= 0.8x the bare pipeline's per-key rate; the operating counters
the engine keeps with every decision: ``check`` and ``check_many`` with them >= 0.9x the same policy with
``counters: false``, see :func:`counters_report`; ``limits``' figures are reported, no longer a target),
each the median over time slices of the two sides'
calls/s in the same slice: the measurements take turns in short slices for the whole run
(:func:`bench._common.run_interleaved`). By default the process pins itself to the local Redis server's CPU
(see ``bench/RESULTS.md`` for why). ``--profile`` adds a cProfile of the ``check`` and ``check_many`` loops to
the breakdown of where taskgate's time goes (pure-Python costs over a stub client, and the check-vs-bare gap
split into the engine script's share and taskgate's Python share), which is also printed whenever a target
is missed; ``--server-side`` adds the scripts' own cost inside Redis (:func:`server_side`). ``--record``
appends the output to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.storage import RedisStorage
from limits.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from redis.exceptions import NoScriptError

import taskgate
from bench._common import (
    Call,
    SlicedResult,
    SliceMeasurement,
    delete_prefix,
    fmt_rate,
    machine_info,
    paired_ratio,
    pin,
    ping_p50_us,
    record,
    redis_cpu,
    run_interleaved,
    table,
)

DEFAULT_URL = "redis://127.0.0.1:6379/11"
N_KEYS = 100_000  # distinct keys cycle through a pool: >= 3 s of calls, longer than any key's TTL (<= 1 s)
MANY = 100  # keys per check_many call / per pipeline

# One rate for everything: 100k/s (a distinct key or the hot key at ~10k calls/s is always allowed, so every
# call writes state, the more expensive path). The bare script and `limits` get the same numbers.
LIMIT, PERIOD_MS, BURST = 100_000, 1000, 1000
POLICIES: dict[str, dict[str, Any]] = {
    "gcra": {"strategy": "gcra", "limit": LIMIT, "period": f"{PERIOD_MS}ms", "burst": BURST},
    "tokenBucket": {"strategy": "tokenBucket", "capacity": BURST, "refillPerSec": LIMIT},
    "fixedWindow": {"strategy": "fixedWindow", "limit": LIMIT, "windowMs": PERIOD_MS},
    "slidingWindow": {"strategy": "slidingWindow", "limit": LIMIT, "windowMs": PERIOD_MS, "buckets": 10},
    "slidingWindowLog": {"strategy": "slidingWindowLog", "limit": LIMIT, "windowMs": PERIOD_MS},
}
OTHER_STRATEGIES = ("tokenBucket", "fixedWindow", "slidingWindow", "slidingWindowLog")
# the same gcra without the operating counters (every other policy here keeps them: the default)
POLICIES["gcra_nocounters"] = {**POLICIES["gcra"], "counters": False}
# the other axes (issue: admit + release and reserve + settle per second next to check), never binding
POLICIES["unified"] = {
    **POLICIES["gcra"],
    "concurrency": {"maxLimit": 100_000, "perKey": True},
    "tokenBudget": {"budget": 10**12, "window": "1h"},
}
POLICIES["budget"] = {"tokenBudget": {"budget": 10**12, "window": "1h"}}

# The floor: the least a GCRA decision can cost through redis-py (Redis TIME, GET, SET PX; ARGV period, limit,
# burst). Same algorithm and state layout as taskgate's rate_gcra.lua, without its options and reply fields.
BARE_GCRA = """\
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local T = tonumber(ARGV[1]) / tonumber(ARGV[2])
local tau = T * tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + T
if new_tat - tau > now then return {0, math.ceil(new_tat - tau - now)} end
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', math.max(1, math.ceil(new_tat - now)))
return {1, 0}
"""

# measurement names (also the keys of the selection)
TG_CHECK = "taskgate check gcra, distinct keys"
TG_HOT = "taskgate check gcra, one hot key"
TG_ADMIT = "taskgate admit + release (rate x concurrency x cost)"
TG_RESERVE = "taskgate reserve + settle (token budget)"
TG_MANY = f"taskgate check_many x{MANY} gcra"
BARE = "bare EVALSHA minimal GCRA (floor)"
BARE_PIPE = f"bare pipeline {MANY}x EVALSHA"
LIM_FIXED = "limits FixedWindow .hit"
LIM_MOVING = "limits MovingWindow .hit"
LIM_SLIDING = "limits SlidingWindowCounter .hit"
TG_CHECK_OFF = "taskgate check gcra, distinct keys, counters off"
TG_MANY_OFF = f"taskgate check_many x{MANY} gcra, counters off"


def tg_strategy_name(strategy: str) -> str:
    return f"taskgate check {strategy}, distinct keys"


Setup = tuple[Call, Callable[[], None]]


class Bench:
    """The measurements of one run: shared key pools, a private key prefix, one client per measurement."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        # one pool for single-key calls, another for the 100-key calls (and their bare twins), so that no two
        # measurements ever touch the same key (each `limits` strategy also gets its own key prefix)
        self.keys = [f"u{i}" for i in range(N_KEYS)]
        self.bare_keys = [f"{prefix}:bare:{k}" for k in self.keys]
        many_keys = [f"m{i}" for i in range(N_KEYS)]
        many_bare = [f"{prefix}:bare:{k}" for k in many_keys]
        n_batches = N_KEYS // MANY
        self.batches = [many_keys[j * MANY : (j + 1) * MANY] for j in range(n_batches)]
        self.bare_batches = [many_bare[j * MANY : (j + 1) * MANY] for j in range(n_batches)]

    # -- taskgate ---------------------------------------------------------------------------------------
    def backend(self) -> taskgate.RedisBackend:
        b = taskgate.connect(self.url, policies=POLICIES, prefix=self.prefix)
        if not isinstance(b, taskgate.RedisBackend):
            raise TypeError(f"{self.url}: expected the direct Redis door, got {type(b).__name__}")
        return b

    def tg_check(self, policy: str, name: str, *, hot: bool = False) -> SliceMeasurement:
        def setup() -> Setup:
            b = self.backend()
            check, keys, n = b.check, self.keys, len(self.keys)
            if hot:
                return (lambda i: check(policy, "hot")), b.close
            return (lambda i: check(policy, keys[i % n])), b.close

        return SliceMeasurement(name, setup)

    def tg_admit(self) -> SliceMeasurement:
        """One admit (rate x concurrency x cost, escrow) and its release per call: two round trips."""

        def setup() -> Setup:
            b = self.backend()
            admit, keys, n = b.admit, self.keys, len(self.keys)

            def one(i: int) -> None:
                admit("unified", keys[i % n], 1, 10).release()

            return one, b.close

        return SliceMeasurement(TG_ADMIT, setup)

    def tg_reserve(self) -> SliceMeasurement:
        """One reserve and its settle per call: two round trips."""

        def setup() -> Setup:
            b = self.backend()
            reserve, keys, n = b.reserve, self.keys, len(self.keys)

            def one(i: int) -> None:
                reserve("budget", keys[i % n], 100).settle(60)

            return one, b.close

        return SliceMeasurement(TG_RESERVE, setup)

    def tg_many(self, policy: str = "gcra", name: str = TG_MANY) -> SliceMeasurement:
        def setup() -> Setup:
            b = self.backend()
            many, batches, n = b.check_many, self.batches, len(self.batches)
            return (lambda i: many(policy, batches[i % n])), b.close

        return SliceMeasurement(name, setup, MANY)

    # -- bare redis-py ----------------------------------------------------------------------------------
    def bare(self) -> SliceMeasurement:
        def setup() -> Setup:
            r = redis.Redis.from_url(self.url)
            sha = r.script_load(BARE_GCRA)
            evalsha, keys, n = r.evalsha, self.bare_keys, len(self.bare_keys)

            def call(i: int) -> object:
                try:
                    return evalsha(sha, 1, keys[i % n], PERIOD_MS, LIMIT, BURST)
                except NoScriptError:  # someone ran SCRIPT FLUSH: what taskgate does too (EVAL)
                    r.script_load(BARE_GCRA)
                    return evalsha(sha, 1, keys[i % n], PERIOD_MS, LIMIT, BURST)

            return call, r.close

        return SliceMeasurement(BARE, setup)

    def bare_pipeline(self) -> SliceMeasurement:
        def setup() -> Setup:
            r = redis.Redis.from_url(self.url)
            sha = r.script_load(BARE_GCRA)
            batches, n = self.bare_batches, len(self.bare_batches)

            def call(i: int) -> object:
                pipe = r.pipeline(transaction=False)
                for k in batches[i % n]:
                    pipe.evalsha(sha, 1, k, PERIOD_MS, LIMIT, BURST)
                try:
                    return pipe.execute()
                except NoScriptError:  # someone ran SCRIPT FLUSH
                    r.script_load(BARE_GCRA)
                    return call(i)

            return call, r.close

        return SliceMeasurement(BARE_PIPE, setup, MANY)

    # -- limits -----------------------------------------------------------------------------------------
    def limits(self, name: str, strategy: Callable[[RedisStorage], RateLimiter]) -> SliceMeasurement:
        def setup() -> Setup:
            storage = RedisStorage(self.url, key_prefix=f"{self.prefix}:limits-{strategy.__name__}")
            hit, item, keys, n = strategy(storage).hit, _limits_item(), self.keys, len(self.keys)
            return (lambda i: hit(item, keys[i % n])), storage.storage.close

        return SliceMeasurement(name, setup)

    def all(self) -> list[SliceMeasurement]:
        """The two sides of a ratio are next to each other, so their slices run back to back."""
        return [
            self.tg_check("gcra_nocounters", TG_CHECK_OFF),
            self.tg_check("gcra", TG_CHECK),
            self.bare(),
            self.limits(LIM_FIXED, FixedWindowRateLimiter),
            self.tg_many("gcra_nocounters", TG_MANY_OFF),
            self.tg_many(),
            self.bare_pipeline(),
            self.tg_check("gcra", TG_HOT, hot=True),
            *(self.tg_check(s, tg_strategy_name(s)) for s in OTHER_STRATEGIES),
            self.tg_admit(),
            self.tg_reserve(),
            self.limits(LIM_MOVING, MovingWindowRateLimiter),
            self.limits(LIM_SLIDING, SlidingWindowCounterRateLimiter),
        ]

    def cleanup(self) -> int:
        r = redis.Redis.from_url(self.url)
        try:
            return delete_prefix(r, self.prefix + ":")
        finally:
            r.close()


def _limits_item() -> RateLimitItem:
    return RateLimitItemPerSecond(LIMIT, PERIOD_MS // 1000)


# -- report ---------------------------------------------------------------------------------------------


TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("check, counters off / bare EVALSHA loop", TG_CHECK_OFF, BARE, 0.85),
    ("check / bare EVALSHA loop", TG_CHECK, BARE, 0.75),
    ("check_many / bare pipeline (keys/s)", TG_MANY, BARE_PIPE, 0.8),
)
# reported for information only (the former ">= 1.0x limits' fixed window" target is retired)
INFO_RATIOS: tuple[tuple[str, str, str], ...] = (
    ("check / limits FixedWindow .hit", TG_CHECK, LIM_FIXED),
    ("check, counters off / limits FixedWindow .hit", TG_CHECK_OFF, LIM_FIXED),
)


def report(res: dict[str, SlicedResult], slices: int, seconds: float) -> tuple[str, bool]:
    """The figures table and the ratios; returns (text, all targets met)."""
    rows: list[list[str]] = []
    for name, r in res.items():
        rows.append(
            [
                name,
                fmt_rate(r.ops),
                fmt_rate(r.item_rate) if r.items > 1 else "",
                f"{r.p50_us:.0f}",
                f"{r.p99_us:.0f}",
                f"{r.calls:,}",
                f"{r.spread * 100:.0f}%",
            ]
        )
    out = [
        table(["measurement", "calls/s", "keys/s", "p50 µs", "p99 µs", "calls", "spread"], rows),
        "",
        f"each measurement: {seconds:g} s in {slices} slices of {seconds / slices:g} s taking turns with the "
        "others (A B C .., .. C B A, ...);",
        "calls/s, p50, p99 over all its slices (p50/p99 per call); spread = (max - min) / median of its "
        "per-slice calls/s;",
        "keys/s = calls/s x keys per call.",
        "",
        "targets: median over the slices of the ratio of the calls/s in the same slice (run back to back):",
    ]
    ok_all = True
    width = max(len(t[0]) for t in TARGETS)
    for label, num, den, target in TARGETS:
        if num not in res or den not in res:
            continue
        ratio = paired_ratio(res[num], res[den])
        ok = ratio >= target
        ok_all &= ok
        out.append(f"  {label:<{width}} : {ratio:.2f}x (target >= {target:.2f}x)  {'PASS' if ok else 'MISS'}")
    cross = [
        f"{label.split(' (')[0]} {res[num].ops / res[den].ops:.2f}x / "
        f"{res[den].p50_us / res[num].p50_us:.2f}x"
        for label, num, den, _ in TARGETS
        if num in res and den in res
    ]
    out.append("  cross-check, ratio of overall calls/s / of p50 latencies: " + "; ".join(cross))
    info = [
        f"{label} {paired_ratio(res[num], res[den]):.2f}x"
        for label, num, den in INFO_RATIOS
        if num in res and den in res
    ]
    if info:
        out.append("  (info, no target) " + "; ".join(info))
    return "\n".join(out), ok_all


COUNTER_TARGETS: tuple[tuple[str, str, str, float], ...] = (
    ("check, counters on / off", TG_CHECK, TG_CHECK_OFF, 0.9),
    ("check_many, counters on / off (keys/s)", TG_MANY, TG_MANY_OFF, 0.9),
)


def counters_report(res: dict[str, SlicedResult]) -> tuple[str, bool]:
    """The cost of the operating counters (engine/lua/stats.lua): decisions/s with them on (the default)
    against the same policy with ``counters: false``, paired slice by slice like the targets above."""
    lines = ["counters (the engine's per-decision operating counters), on vs off:"]
    ok_all = True
    width = max(len(t[0]) for t in COUNTER_TARGETS)
    for label, on, off, target in COUNTER_TARGETS:
        if on not in res or off not in res:
            continue
        ratio = paired_ratio(res[on], res[off])
        ok = ratio >= target
        ok_all &= ok
        per_call = 1e6 / res[on].ops - 1e6 / res[off].ops
        lines.append(
            f"  {label:<{width}} : {ratio:.2f}x (target >= {target:.2f}x)  {'PASS' if ok else 'MISS'}  "
            f"({res[on].ops:,.0f} vs {res[off].ops:,.0f} calls/s: {per_call:+.1f} µs per call)"
        )
    return ("\n".join(lines) if len(lines) > 1 else ""), ok_all


# -- where the time goes ---------------------------------------------------------------------------------


def _per_call_us(fn: Callable[[], object], batches: int = 7, n: int = 2000) -> float:
    """Hot-loop cost of ``fn``: the best of ``batches`` batches of ``n`` calls (the best filters out the
    moments another process had the CPU)."""
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - t0) / n / 1000)
    return best


def decompose(bench: Bench, seconds: float, slices: int, policy: str = "gcra_nocounters") -> str:
    """Split the check-vs-bare gap in the real loop: the bare loop; taskgate's own script run by a raw
    redis-py EVALSHA with pre-planned KEYS/ARGV (adds the engine's Lua, its ARGV and its 7-field reply, no
    taskgate Python); the full ``check`` (adds taskgate's Python). Interleaved slices, p50 of each."""
    n = 50_000
    try:
        with bench.backend() as b:
            planned: list[tuple[str, list[str], Sequence[Any]]] = []
            source = ""
            for k in bench.keys[:n]:
                plan: Any = b._plan.check(policy, k)
                planned.append((plan.script.sha, plan.keys, plan.args))
                source = plan.script.source
            b.check(policy, "decompose-probe")  # loads the script
    except Exception as e:  # internals moved
        return f"decomposition n/a ({type(e).__name__}: {e})"

    def raw_script() -> Setup:
        r = redis.Redis.from_url(bench.url)

        def call(i: int) -> object:
            s, ks, args = planned[i % n]
            try:
                return r.evalsha(s, len(ks), *ks, *args)
            except NoScriptError:  # someone ran SCRIPT FLUSH
                r.script_load(source)
                return r.evalsha(s, len(ks), *ks, *args)

        return call, r.close

    steps = [
        SliceMeasurement("bare loop (floor)", bench.bare().setup),
        SliceMeasurement("taskgate's script, pre-planned KEYS/ARGV, raw redis-py EVALSHA", raw_script),
        SliceMeasurement("taskgate check", bench.tg_check(policy, "taskgate check").setup),
    ]
    res = run_interleaved(steps, seconds, slices, warmup=0.2)
    lines = [
        f"decomposition of the check-vs-bare gap, policy {policy} (real loop, p50 µs, {seconds:g} s each, "
        "interleaved; paired ratio to the bare loop in brackets):"
    ]
    prev: SlicedResult | None = None
    for m in steps:
        r = res[m.name]
        delta = f"  (+{r.p50_us - prev.p50_us:.1f})" if prev is not None else ""
        ratio = paired_ratio(r, res[steps[0].name])
        lines.append(f"  {m.name:<64} {r.p50_us:6.1f} [{ratio:.2f}x]{delta}")
        prev = r
    lines.append(
        "  first step = the engine script's cost (Lua, ARGV, reply) over the minimal GCRA; "
        "second step = taskgate's Python"
    )
    return "\n".join(lines)


def server_side(bench: Bench, rounds: int = 15, n: int = 3000) -> str:
    """Where the script's time goes inside Redis: ``INFO commandstats`` µs per EVALSHA of the bare GCRA
    script and of taskgate's check script (counters off, on), each over ``n`` pipelined calls on distinct
    keys, in ``rounds`` alternating rounds (the median). Counts every EVALSHA the server ran meanwhile: run
    it on a Redis of its own (``--server-side``)."""
    r = redis.Redis.from_url(bench.url)
    try:
        with bench.backend() as b:
            plans: dict[str, list[tuple[str, list[str], Sequence[Any]]]] = {}
            for pol in ("gcra_nocounters", "gcra"):
                ps = [b._plan.check(pol, f"ss{i}") for i in range(n)]
                r.script_load(ps[0].script.source)
                plans[pol] = [(p.script.sha, p.keys, p.args) for p in ps]
        sha = r.script_load(BARE_GCRA)
        plans["bare"] = [(sha, [f"{bench.prefix}:ssbare{i}"], [PERIOD_MS, LIMIT, BURST]) for i in range(n)]
    except Exception as e:  # internals moved
        r.close()
        return f"server side n/a ({type(e).__name__}: {e})"

    def stat() -> tuple[int, int]:
        st = r.info("commandstats").get("cmdstat_evalsha", {})
        return int(st.get("calls", 0)), int(st.get("usec", 0))

    names = {"bare": "bare GCRA script", "gcra_nocounters": "check script, counters off",
             "gcra": "check script, counters on"}  # fmt: skip
    got: dict[str, list[float]] = {k: [] for k in names}
    try:
        for i in range(rounds):
            for k in names if i % 2 == 0 else reversed(names):
                c0, u0 = stat()
                pipe = r.pipeline(transaction=False)
                for j, (s, ks, args) in enumerate(plans[k]):
                    pipe.evalsha(s, len(ks), *ks, *args)
                    if j % 500 == 499:
                        pipe.execute()
                pipe.execute()
                c1, u1 = stat()
                got[k].append((u1 - u0) / max(1, c1 - c0))
                delete_prefix(r, bench.prefix + ":")
    finally:
        r.close()
    med = {k: statistics.median(v) for k, v in got.items()}
    lines = [f"inside Redis (INFO commandstats, µs per EVALSHA, median of {rounds} rounds of {n}):"]
    for k, label in names.items():
        lines.append(f"  {label:<28} {med[k]:6.2f}  ({med[k] - med['bare']:+.2f} over the bare script)")
    return "\n".join(lines)


class _StubClient:
    """Stands in for ``redis.Redis``: answers every EVALSHA with a canned reply, so a backend over it costs
    exactly taskgate's own Python (planning, validation, key building, ``Plan``, decoding) per call."""

    def __init__(self, reply: list[Any]) -> None:
        self.reply = reply

    def evalsha(self, *args: Any) -> list[Any]:
        return self.reply

    def close(self) -> None:
        pass


def breakdown(bench: Bench, res: dict[str, SlicedResult]) -> str:
    """Pure-Python costs of taskgate's path (no round trip), next to the measured per-call times. Reaches into
    taskgate's internals (``_plan``): a part that no longer exists is reported as n/a."""
    raw = [1, BURST, BURST - 1, 1_700_000_000_000, 0, 0, b""]
    raw_many = raw * MANY
    keys = bench.batches[0]
    pols = taskgate.load_policies(POLICIES)
    one = taskgate.RedisBackend(cast(Any, _StubClient(raw)), pols, prefix=bench.prefix)
    many = taskgate.RedisBackend(cast(Any, _StubClient(raw_many)), pols, prefix=bench.prefix)

    def internals() -> list[tuple[str, Callable[[], object]]]:
        from taskgate.engine import keys as keys_mod
        from taskgate.engine import plan as plan_mod

        planner: Any = one._plan
        policy = pols["gcra"]
        script = planner.check("gcra", "u1").script
        return [
            ("  Planner.check (validate, keyset, ARGV, Plan)", lambda: planner.check("gcra", "u1")),
            ("    check_key(key)", lambda: plan_mod.check_key("u1")),
            ("    check_units(cost)", lambda: plan_mod.check_units(1, "cost", "gcra", BURST)),
            (
                "    keyset(prefix, policy, key).rate",
                lambda: keys_mod.keyset(bench.prefix, policy, "u1").rate,
            ),
            ("    rate_params(rate) (+ horizon)", lambda: planner._rate_args(policy, policy.rate)),
            ("    Plan(...) (frozen dataclass)", lambda: plan_mod.Plan(script, [], [], int)),
            ("  decode_decision(reply) -> Decision", lambda: plan_mod.decode_decision(raw)),
            (f"  Planner.check_many ({MANY} keys)", lambda: planner.check_many("gcra", keys)),
            (f"  decode_many ({MANY} decisions)", lambda: plan_mod.decode_many(raw_many)),
        ]

    rows: list[tuple[str, Callable[[], object] | None]] = [
        ("check over a stub client (all of taskgate's Python)", lambda: one.check("gcra", "u1")),
        (f"check_many x{MANY} over a stub client", lambda: many.check_many("gcra", keys)),
    ]
    try:
        rows += internals()
    except Exception as e:  # internals moved: keep the public figures
        rows.append((f"  (internals n/a: {type(e).__name__}: {e})", None))
    lines = ["where taskgate's time goes (µs per call, pure CPU in a hot loop, no I/O; best of 7 batches):"]
    for label, fn in rows:
        try:
            cost = f"{_per_call_us(fn):8.2f}" if fn is not None else ""
        except Exception as e:
            cost = f"n/a ({type(e).__name__})"
        lines.append(f"  {label:<56} {cost}")
    tg, bare = res[TG_CHECK], res[BARE]
    m, pipe = res[TG_MANY], res[BARE_PIPE]
    lines += [
        f"  measured: check {1e6 / tg.ops:.1f} µs/call vs bare loop {1e6 / bare.ops:.1f} µs/call: "
        f"gap {1e6 / tg.ops - 1e6 / bare.ops:+.1f} µs (p50 gap {tg.p50_us - bare.p50_us:+.1f} µs)",
        f"  measured: check_many {1e6 / m.ops:.0f} µs/call vs bare pipeline {1e6 / pipe.ops:.0f} µs/call",
        "  (in the real loop the Python part typically costs 2-3x its hot-loop figure: caches are cold "
        "after each round trip; see the decomposition)",
    ]
    return "\n".join(lines)


def profile(bench: Bench, seconds: float, top: int = 18) -> str:
    """cProfile of the check and check_many loops (tottime: time in the function itself)."""
    out = []
    with bench.backend() as b:
        for label, fn in (
            ("check gcra, distinct keys", lambda i: b.check("gcra", bench.keys[i % N_KEYS])),
            (f"check_many x{MANY}", lambda i: b.check_many("gcra", bench.batches[i % len(bench.batches)])),
        ):
            for i in range(200):
                fn(i)
            prof = cProfile.Profile()
            n, end = 0, time.perf_counter() + seconds
            prof.enable()
            while time.perf_counter() < end:
                fn(n)
                n += 1
            prof.disable()
            buf = io.StringIO()
            st = pstats.Stats(prof, stream=buf)
            st.sort_stats("tottime").print_stats(top)
            body = buf.getvalue()
            start = body.find("   ncalls")
            out.append(f"cProfile: {label}, {n:,} calls, top {top} by tottime\n{body[start:].rstrip()}")
    return "\n\n".join(out)


# -- main -----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--redis", default=DEFAULT_URL, help=f"Redis URL (default {DEFAULT_URL})")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement (default 3)")
    p.add_argument(
        "--slice",
        type=float,
        default=0.1,
        help="seconds per slice; the measurements take turns slice by slice (default 0.1)",
    )
    p.add_argument(
        "--pin",
        default="auto",
        help="CPU to pin this process to: auto (the local Redis server's CPU, default), none, or a number",
    )
    p.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    p.add_argument("--profile", action="store_true", help="also profile taskgate's Python path")
    p.add_argument(
        "--server-side",
        action="store_true",
        help="also time the scripts inside Redis (INFO commandstats: use a Redis of its own)",
    )
    p.add_argument("--only", default="", help="comma-separated substrings: run only matching measurements")
    p.add_argument(
        "--load-note",
        default="",
        help="appended to the load line, e.g. what else shared the machine during the run",
    )
    args = p.parse_args(argv)
    args.slices = max(1, round(args.seconds / args.slice))
    if args.pin not in ("auto", "none") and not args.pin.isdigit():
        p.error(f"--pin: auto, none or a CPU number, got {args.pin!r}")
    return args


def _pin(choice: str, url: str, info: dict[str, Any]) -> str:
    if choice == "none":
        return "not pinned (the scheduler decides whether client and Redis share a core)"
    cpu = redis_cpu(url, info) if choice == "auto" else int(choice)
    if cpu is None:
        return "not pinned (Redis is not a visible local process)"
    if not pin(cpu):
        return f"not pinned (could not pin to CPU {cpu})"
    why = "the Redis server's CPU, re-checked before every slice" if choice == "auto" else "--pin"
    return f"pinned to CPU {cpu} ({why}): client and server share a core"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prefix = f"tgbench-{os.getpid()}"
    bench = Bench(args.redis, prefix)
    probe = redis.Redis.from_url(args.redis)
    try:
        probe.ping()
        info: dict[str, Any] = probe.info("server")
        pinning = _pin(args.pin, args.redis, info)
        ping_before = ping_p50_us(probe.ping)
    finally:
        probe.close()
    meta = machine_info(info)
    meta.update(
        {
            "redis url": args.redis,
            "clients": "taskgate.connect() defaults; redis.Redis.from_url() defaults for bare and limits",
            "redis-py": redis.__version__,
            "hiredis": _hiredis_version(),
            "limits": _limits_version(),
            "taskgate": taskgate.__version__,
        }
    )
    header = (
        f"{args.seconds:g} s per measurement in {args.slices} interleaved slices of {args.slice:g} s; "
        "one thread, sync, one connection each; "
        f"key prefix {prefix}\n{pinning}; PING round trip p50 {ping_before:.1f} µs before the run"
    )
    load_before = _loadavg()
    print("machine: " + "; ".join(f"{k} {v}" for k, v in meta.items()), flush=True)
    print(header, flush=True)

    measurements = bench.all()
    if args.only:
        subs = [s.strip() for s in args.only.split(",") if s.strip()]
        measurements = [m for m in measurements if any(s in m.name for s in subs)]

    def progress(msg: str) -> None:
        print(f"  .. {msg}", file=sys.stderr, flush=True)

    follow = None
    if args.pin == "auto" and pinning.startswith("pinned"):
        # Redis is not pinned and may move: follow it before every slice
        def follow() -> None:
            cpu = redis_cpu(args.redis, info)
            if cpu is not None:
                pin(cpu)

    t0 = time.perf_counter()
    try:
        res = run_interleaved(measurements, args.seconds, args.slices, progress=progress, before_slice=follow)
    finally:
        deleted = bench.cleanup()
    print(f"  .. done in {time.perf_counter() - t0:.0f} s; deleted {deleted} leftover keys", file=sys.stderr)
    probe = redis.Redis.from_url(args.redis)
    try:
        ping_after = ping_p50_us(probe.ping)
    finally:
        probe.close()
    load_after = _loadavg()
    after = (
        f"PING round trip p50 {ping_after:.1f} µs after the run; load average (1 min) {load_before} before, "
        f"{load_after} after (this benchmark with Redis accounts for ~1)"
    )
    if args.load_note:
        after += f"; {args.load_note}"
    # a quiet machine: ~0 before; ~1 after (this benchmark and Redis)
    if _load_value(load_before) > 0.5 or _load_value(load_after) > 1.6:
        after += (
            f"\nWARNING: other processes were busy on the {os.cpu_count()} CPUs during the run: the figures "
            "are noisy; rerun when the machine is idle"
        )
    header += "\n" + after
    print(after)
    needed = {TG_CHECK, BARE, LIM_FIXED, TG_MANY, BARE_PIPE}
    if needed <= set(res):
        text, ok = report(res, args.slices, args.seconds)
    else:
        text = table(
            ["measurement", "calls/s", "p50 µs", "p99 µs"],
            [[n, fmt_rate(r.ops), f"{r.p50_us:.0f}", f"{r.p99_us:.0f}"] for n, r in res.items()],
        )
        ok = True
    counters, _ = counters_report(res)
    if counters:
        text += "\n\n" + counters
    print()
    print(text)
    extra = ""
    if needed <= set(res) and (args.profile or not ok):
        extra = "\n" + breakdown(bench, res) + "\n\n" + decompose(bench, args.seconds / 2, args.slices)
        if args.server_side:
            extra += "\n\n" + server_side(bench)
        if args.profile:
            extra += "\n\n" + profile(bench, min(args.seconds, 3.0))
        bench.cleanup()
        print(extra)
    if args.record:
        record("bench/decisions.py", f"{header}\n\n{text}\n{extra}", meta)
        print(f"\nrecorded in {Path('bench/RESULTS.md')}")
    return 0


def _loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def _load_value(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def _hiredis_version() -> str:
    try:
        import hiredis

        return str(getattr(hiredis, "__version__", "?"))
    except ImportError:
        return "not installed"


def _limits_version() -> str:
    import limits

    return str(getattr(limits, "__version__", "?"))


if __name__ == "__main__":
    raise SystemExit(main())
