"""Differential test: taskgate's ``check`` against ThrottleKit's own Lua, decision for decision.

ThrottleKit's check scripts come from the installed reference package, throttlekit-py (see
``tests/reference-requirements.txt``), and run unchanged on the real Redis. taskgate runs through its public
``check`` on the direct door (the real Redis, and a Redis Cluster) and on the embedded store (``memory://``).
Random timelines, seeded, for all five strategies: non-integer emission intervals and refill rates, costs up
to the policy's maximum, equal instants, huge gaps, a worker clock stepping back a little, always with an
explicit ``now=``. Every field of every decision must be equal.

The reference runs one timeline in one script call (:data:`DRIVER`): Redis samples its clock once per script,
so no reference key expires in wall-clock time while the simulated clock (``now=``) stands still. A key
expires upstream only once it no longer changes a decision, so this is ThrottleKit's decision, not a weaker
one.
taskgate's keys live at least 1 s (``TG_MIN_TTL``), longer than a timeline takes (:func:`replay` makes sure).
"""

from __future__ import annotations

import itertools
import json
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

import taskgate

Row = tuple[bool, int, int, int, int]
SEEDS = tuple(range(1, 9))
OPS = 150  # per timeline: 8 seeds x 150 = 1,200 decisions per strategy and door
WALL_BUDGET_S = 0.8  # a timeline runs well within taskgate's shortest key TTL (1 s), see replay()
ATTEMPTS = 3
EPOCH = 1_764_000_000_000


@dataclass(frozen=True)
class Case:
    """One limiter: ThrottleKit's params (camelCase, its ARGV names), taskgate's policy, the time scale."""

    strategy: str
    tk: dict[str, int]
    spec: dict[str, Any]
    max_cost: int
    scale_ms: float  # the emission interval / refill time of one unit / window: where decisions change


def _pick(rng: random.Random, *options: int) -> int:
    return rng.choice(options)


def gcra(rng: random.Random) -> Case:
    limit = _pick(rng, 1, 3, 7, 10, 60, 97, 1000, rng.randint(1, 500))
    period = _pick(rng, 1000, 60_000, 3_600_000, 7, 333, 1001, rng.randint(1, 100_000))
    burst = _pick(rng, 1, min(limit, 500), rng.randint(1, 50))
    tk = {"periodMs": period, "limit": limit, "burst": burst}
    spec = {"strategy": "gcra", "limit": limit, "period": period, "burst": burst}
    return Case("gcra", tk, spec, burst, period / limit)


def token_bucket(rng: random.Random) -> Case:
    capacity = _pick(rng, 1, 5, 7, 10, 100, rng.randint(1, 300))
    rps = _pick(rng, 1, 3, 7, 60, 1000, 7919, rng.randint(1, 5000))
    tk = {"capacity": capacity, "refillPerSec": rps}
    spec = {"strategy": "tokenBucket", "capacity": capacity, "refillPerSec": rps}
    return Case("tokenBucket", tk, spec, capacity, 1000 / rps)


def fixed_window(rng: random.Random) -> Case:
    limit = _pick(rng, 1, 5, 10, 100, rng.randint(1, 300))
    window = _pick(rng, 1000, 60_000, 7, 333, rng.randint(1, 100_000))
    tk = {"limit": limit, "windowMs": window}
    spec = {"strategy": "fixedWindow", "limit": limit, "windowMs": window}
    return Case("fixedWindow", tk, spec, limit, window / limit)


def sliding_window(rng: random.Random) -> Case:
    limit = _pick(rng, 1, 5, 10, 100, rng.randint(1, 300))
    buckets = _pick(rng, 1, 2, 3, 7, 10, 60, rng.randint(1, 100))
    width = _pick(rng, 1, 3, 100, 333, 1000, rng.randint(1, 5000))  # taskgate: buckets divide the window
    window = buckets * width
    tk = {"windowMs": window, "limit": limit, "buckets": buckets}
    spec = {"strategy": "slidingWindow", "limit": limit, "windowMs": window, "buckets": buckets}
    return Case("slidingWindow", tk, spec, limit, window / limit)


def sliding_window_log(rng: random.Random) -> Case:
    limit = _pick(rng, 1, 3, 5, 10, 40, rng.randint(1, 60))  # one ZADD per unit: kept small
    window = _pick(rng, 1000, 60_000, 7, 333, rng.randint(1, 100_000))
    tk = {"windowMs": window, "limit": limit}
    spec = {"strategy": "slidingWindowLog", "limit": limit, "windowMs": window}
    return Case("slidingWindowLog", tk, spec, limit, window / limit)


CASES: dict[str, Callable[[random.Random], Case]] = {
    "gcra": gcra,
    "tokenBucket": token_bucket,
    "fixedWindow": fixed_window,
    "slidingWindow": sliding_window,
    "slidingWindowLog": sliding_window_log,
}


def timeline(rng: random.Random, case: Case, n: int) -> Iterator[tuple[str, int, int]]:
    """(key, now, cost) x n: bursts at one instant, dense and sparse steps around the case's time scale,
    huge gaps, and now and then a clock a little behind the previous call's."""
    scale = max(1.0, case.scale_ms)
    now = rng.choice((1000, EPOCH + rng.randrange(10**9), rng.randrange(1, 10**13)))
    for _ in range(n):
        r = rng.random()
        if r < 0.2:
            gap = 0
        elif r < 0.6:
            gap = int(rng.random() * scale * 1.5)
        elif r < 0.9:
            gap = int(rng.random() * scale * 20)
        elif r < 0.97:
            gap = rng.randrange(1, 7)
        elif r < 0.99:
            gap = rng.choice((3_600_000, 86_400_000, 10**10)) + rng.randrange(1000)
        else:
            gap = -rng.randrange(1, 50)  # a worker whose clock is a little behind
        now = max(1, now + gap)
        cost = 1 if rng.random() < 0.6 else rng.randint(1, case.max_cost)
        yield rng.choice(("a", "b")), now, cost


# One timeline of ThrottleKit's check script in ONE script call: Redis samples its clock once per script, so no
# key of the timeline expires in wall-clock time while the simulated clock (``now=``) stands still. The script's
# text is ThrottleKit's, unchanged, as the body of a function of (KEYS, ARGV), called once per operation with
# the ARGV strings EVALSHA would pass. Driver ARGV: ops, argc, then per op: key index (into KEYS), argc values.
DRIVER = """
local function tk_check(KEYS, ARGV)
%s
end
local n, argc, out, i = tonumber(ARGV[1]), tonumber(ARGV[2]), {}, 3
for op = 1, n do
  local argv = {}
  for j = 1, argc do argv[j] = ARGV[i + j] end
  out[op] = tk_check({ KEYS[tonumber(ARGV[i])] }, argv)
  i = i + argc + 1
end
return out
"""


class Reference:
    """ThrottleKit's check scripts, as shipped by throttlekit-py, run on the real Redis (see DRIVER)."""

    def __init__(self, package: Path, client: redis.Redis) -> None:
        scripts = package / "_scripts"
        manifest = json.loads((scripts / "manifest.json").read_text(encoding="utf-8"))
        self.client = client
        self.scripts: dict[str, tuple[str, list[str]]] = {}
        for s in manifest["scripts"]:
            if s["role"] == "check":
                source = (scripts / s["file"]).read_text(encoding="utf-8")
                assert s["keys"] == ["key"], s
                self.scripts[s["strategy"]] = (str(client.script_load(DRIVER % source)), list(s["argv"]))

    def run(self, case: Case, key_prefix: str, ops: list[tuple[str, int, int]]) -> list[Row]:
        sha, argv_names = self.scripts[case.strategy]
        keys = sorted({key for key, _, _ in ops})
        args: list[str] = [str(len(ops)), str(len(argv_names))]
        for key, now, cost in ops:
            values = {"now": now, "cost": cost, **case.tk}
            args += [str(keys.index(key) + 1), *(str(values[a]) for a in argv_names)]
        replies = self.client.evalsha(sha, len(keys), *[f"{key_prefix}:{k}" for k in keys], *args)
        return [(bool(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in replies]


@pytest.fixture(scope="module")
def reference(throttlekit_py: Path, redis_url: str) -> Reference:
    return Reference(throttlekit_py, redis.Redis.from_url(redis_url))


def run_taskgate(
    store_url: str, case: Case, prefix: str, ops: list[tuple[str, int, int]]
) -> tuple[list[Row], float]:
    """taskgate's decisions for ``ops`` (one ``check`` each) and the wall-clock seconds they took."""
    b = taskgate.connect(store_url, {"p": case.spec}, prefix=prefix)
    rows: list[Row] = []
    t0 = time.monotonic()
    try:
        for key, now, cost in ops:
            d = b.check("p", key, cost, now=now)
            rows.append((d.allowed, d.limit, d.remaining, d.reset_at, d.retry_after_ms))
    finally:
        b.close()
    return rows, time.monotonic() - t0


def replay(store_url: str, reference: Reference, strategy: str, prefix: str) -> tuple[int, list[str]]:
    """Every seed's timeline on both sides. taskgate's keys live >= TG_MIN_TTL (1 s) of wall time while the
    simulated clock may stand still, so a timeline is judged only when it ran in less than that: one that took
    longer (a stalled machine) is replayed on fresh keys, up to ATTEMPTS times."""
    decisions, mismatches = 0, []
    for seed in SEEDS:
        rng = random.Random(f"{strategy}-{seed}")
        case = CASES[strategy](rng)
        ops = list(timeline(rng, case, OPS))
        want = reference.run(case, f"{prefix}:tk:{strategy}:{seed}", ops)
        for attempt in range(ATTEMPTS):
            got, took = run_taskgate(store_url, case, f"{prefix}:{seed}:{attempt}", ops)
            if took < WALL_BUDGET_S:
                break
        else:
            pytest.fail(
                f"seed {seed}: every replay took >= {WALL_BUDGET_S} s of wall time (last {took:.2f} s)"
            )
        decisions += len(got)
        for i, ((key, now, cost), g, w) in enumerate(zip(ops, got, want, strict=True)):
            if g != w:
                mismatches.append(f"seed {seed} {case.tk} op {i} key={key} now={now} cost={cost}: {g} != {w}")
    return decisions, mismatches


@pytest.mark.parametrize("door", ["redis", "memory", "cluster"])
@pytest.mark.parametrize("strategy", sorted(CASES))
def test_check_is_throttlekit(
    strategy: str,
    door: str,
    reference: Reference,
    redis_url: str,
    prefix: str,
    request: pytest.FixtureRequest,
) -> None:
    if door == "memory":
        store_url = f"memory://{uuid.uuid4().hex}"
    else:
        store_url = redis_url if door == "redis" else str(request.getfixturevalue("cluster_url"))
    decisions, mismatches = replay(store_url, reference, strategy, prefix)
    assert decisions == len(SEEDS) * OPS
    assert mismatches == [], f"{len(mismatches)} of {decisions} decisions differ; first: " + "\n".join(
        mismatches[:10]
    )


def test_timelines_cover_the_edges() -> None:
    """The generated timelines do hold what the docstring promises, for every strategy."""
    for strategy, make in CASES.items():
        gaps: list[int] = []
        costs: list[int] = []
        fractional = False
        for seed in SEEDS:
            rng = random.Random(f"{strategy}-{seed}")
            case = make(rng)
            fractional |= case.scale_ms != int(case.scale_ms)
            ops = list(timeline(rng, case, OPS))
            gaps += [b[1] - a[1] for a, b in itertools.pairwise(ops)]
            costs += [c for _, _, c in ops if c == case.max_cost and c > 1]
        assert gaps.count(0) > 50, strategy
        assert max(gaps) >= 3_600_000, strategy
        assert min(gaps) < 0, strategy
        assert costs, f"{strategy}: no call at the maximum cost"
        if strategy in ("gcra", "tokenBucket"):
            assert fractional, f"{strategy}: no non-integer interval or rate"
