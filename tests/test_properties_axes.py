"""Property tests of the concurrency and cost axes and of admit, on memory:// and the real Redis, explicit ``now``.

Each example draws a policy and a sequence of operations separated by time steps, replays it against the
engine and against a small reference model of the documented rules, and checks after every operation:

- concurrency: the leases we hold never exceed the limit the admission reported; that limit stays within
  [minLimit, maxLimit] and follows the documented AIMD rule exactly (starts at max, a clean release adds
  1/floor(lim), a dropped one multiplies by 0.75, clamped); heartbeat reports exactly the reclaimed leases;
  a release after a reclaim returns False and frees nothing (the slot count stays right);
- cost: escrow (reserve/settle) never charges over the budget while every settle's actual <= its estimate;
  debits overshoot by less than the largest single debit; mixed, by less than the largest debit; every
  decision matches the model (epoch-aligned windows, tightest budget reported);
- admit: a denied admit (booking off) changes nothing: rate peek and state, budgets, live leases and open
  reservations are the same before and after, and the binding axis is the first axis that denies;
- every key the engine wrote has a TTL (PTTL of the example's keys, then a SCAN of its prefix).

Scripts set TTLs in real milliseconds while ``now`` moves in simulated ones, so the drawn policies keep every
TTL well above the real duration of an example: lease TTLs >= 1 s (the set lives 2x that), gcra emission
intervals >= 1 s, and no operation lands in the last 2 s of a budget window (a budget key expires at its
window's end, in real time).
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import taskgate
from taskgate.engine.keys import keyset
from taskgate.types import LeaseRef

PROPS = settings(
    max_examples=int(os.environ.get("TASKGATE_AXES_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
BASE = 1_700_000_000_000
WINDOWS = [10_000, 60_000, 600_000]  # a chain: each window a multiple of the smaller ones
SAFE_MS = 2_000  # keep operations out of the last SAFE_MS of a budget window (see the module docstring)


@contextmanager
def backend(store_url: str, prefix: str, policies: dict[str, Any]) -> Iterator[taskgate.RedisBackend]:
    b = taskgate.connect(store_url, policies, prefix=f"{prefix}x{uuid.uuid4().hex[:8]}")
    assert isinstance(b, taskgate.RedisBackend)
    try:
        yield b
    finally:
        b.close()


def ttl_missing(b: taskgate.RedisBackend, keys: list[str] | None = None) -> list[str]:
    """Keys (given, or every key under the backend's prefix) that exist without an expiry."""
    names = keys if keys is not None else list(b.client.scan_iter(match=f"{b.prefix}:*", count=1000))
    return [k.decode() if isinstance(k, bytes) else k for k in names if b.client.pttl(k) == -1]


def snap(now: int, smallest_window: int) -> int:
    """``now``, moved to the next window start if it falls in the last SAFE_MS of a window."""
    if now % smallest_window > smallest_window - SAFE_MS:
        return now - now % smallest_window + smallest_window
    return now


# -- concurrency -------------------------------------------------------------------------------------------


@dataclass
class ConcCase:
    min_limit: int
    max_limit: int
    ttl: int
    per_key: bool
    ops: list[tuple[Any, ...]]

    @property
    def policy(self) -> dict[str, Any]:
        c = {
            "minLimit": self.min_limit,
            "maxLimit": self.max_limit,
            "leaseTtl": self.ttl,
            "perKey": self.per_key,
        }
        return {"c": {"concurrency": c}}


@st.composite
def conc_cases(draw: st.DrawFn) -> ConcCase:
    mn = draw(st.integers(1, 4))
    mx = draw(st.integers(mn, mn + 5))
    ttl = draw(st.sampled_from([1000, 2000, 5000]))
    op = st.one_of(
        st.tuples(st.just("admit"), st.sampled_from(["a", "b"]), st.sampled_from([None, "h1", "h1", "h2"])),
        st.tuples(st.just("release"), st.integers(0, 30), st.booleans()),
        st.tuples(st.just("heartbeat"), st.sets(st.integers(0, 30), min_size=1, max_size=4)),
        st.tuples(st.just("step"), st.one_of(st.just(0), st.integers(1, ttl // 2), st.integers(1, 3 * ttl))),
    )
    return ConcCase(mn, mx, ttl, draw(st.booleans()), draw(st.lists(op, min_size=1, max_size=40)))


def member(lease_id: str) -> str:
    """A lease's identity in its lease set, ``<holder>:<acquired_ms>``. With an explicit holder reused by the
    next admission in the same ms, after a release, two grants (even of two keys of a policy-wide limit)
    share it; that limitation is reported (see test_concurrency.py), so the model follows the engine here."""
    return LeaseRef.parse(lease_id).member


@dataclass
class LeaseSet:
    """The model of one lease set: our leases (member -> expiry) and the adaptive limit."""

    lim: float
    leases: dict[str, int] = field(default_factory=dict)


@PROPS
@given(case=conc_cases())
def test_concurrency_properties(store_url: str, prefix: str, case: ConcCase) -> None:
    with backend(store_url, prefix, case.policy) as b:
        sets: dict[str, LeaseSet] = {}
        ever: list[tuple[str, str]] = []  # (lease id, lease set) of every lease granted, in order
        now = BASE

        def lset(key: str) -> str:
            return key if case.per_key else "*"

        def model(key: str) -> LeaseSet:
            return sets.setdefault(lset(key), LeaseSet(float(case.max_limit)))

        written: set[str] = set()
        for i, op in enumerate(case.ops):
            where = f"op {i} {op} at +{now - BASE}"
            if op[0] == "step":
                now += op[1]
            elif op[0] == "admit":
                _, key, holder = op
                m = model(key)
                m.leases = {lid: exp for lid, exp in m.leases.items() if exp > now}  # reaped
                limit = math.floor(m.lim)
                a = b.admit("c", key, now=now, holder=holder)
                d = a.decision
                assert case.min_limit <= d.limit <= case.max_limit, where
                assert d.limit == limit, where
                if len(m.leases) >= limit:
                    assert (a.allowed, a.binding_axis, a.lease_id, d.remaining) == (
                        False,
                        "concurrency",
                        "",
                        0,
                    ), where
                    assert d.retry_after_ms > 0, where
                else:
                    assert (a.allowed, a.binding_axis) == (True, "concurrency"), where
                    assert member(a.lease_id) not in m.leases, where
                    assert a.lease_expires_at == now + case.ttl, where
                    m.leases[member(a.lease_id)] = now + case.ttl
                    ever.append((a.lease_id, lset(key)))
                    assert d.remaining == limit - len(m.leases), where
                    # in-flight never exceeds the limit (a limit that shrank below the holders in flight evicts
                    # no one: it denies until they drop below it)
                    assert len(m.leases) <= d.limit, where
                ks = keyset(b.prefix, b.policy("c"), key)
                written |= {ks.leases, ks.meta, ks.waiters}
            elif op[0] == "release":
                if not ever:
                    continue
                lid, ls = ever[op[1] % len(ever)]
                m = sets[ls]
                held = m.leases.get(member(lid), 0) > now
                assert b.release(lid, dropped=op[2], now=now) is held, where
                m.leases.pop(member(lid), None)
                if held and case.min_limit < case.max_limit:
                    m.lim = m.lim * 0.75 if op[2] else m.lim + 1 / math.floor(m.lim)
                    m.lim = min(float(case.max_limit), max(float(case.min_limit), m.lim))
            else:
                if not ever:
                    continue
                # one id per lease (two ids can name one lease: see ``member``)
                ids = list(
                    {
                        (ls, member(lid)): (lid, ls)
                        for lid, ls in (ever[j % len(ever)] for j in sorted(op[1]))
                    }.values()
                )
                r = b.heartbeat([lid for lid, _ in ids], now=now)
                live = [lid for lid, ls in ids if sets[ls].leases.get(member(lid), 0) > now]
                gone = [lid for lid, _ in ids if lid not in live]
                assert sorted(r.live) == sorted(live), where
                assert sorted(r.reclaimed) == sorted(gone), where  # reported, and never counted again
                for lid, ls in ids:
                    if lid in live:
                        sets[ls].leases[member(lid)] = now + case.ttl
                    else:
                        sets[ls].leases.pop(member(lid), None)
            assert ttl_missing(b, sorted(written)) == [], where
        assert ttl_missing(b) == []


# -- cost --------------------------------------------------------------------------------------------------


@dataclass
class BudgetCase:
    mode: str  # escrow | debit | mixed
    budgets: list[tuple[int, int]]  # (budget, window ms)
    start: int
    ops: list[tuple[Any, ...]]

    @property
    def policy(self) -> dict[str, Any]:
        return {"t": {"tokenBudget": [{"budget": b, "windowMs": w} for b, w in self.budgets]}}


@st.composite
def budget_cases(draw: st.DrawFn) -> BudgetCase:
    mode = draw(st.sampled_from(["escrow", "debit", "mixed"]))
    windows = sorted(draw(st.sets(st.sampled_from(WINDOWS), min_size=1, max_size=2)))
    budgets = [(draw(st.integers(5, 120)), w) for w in windows]
    smallest = min(b for b, _ in budgets)
    steps = st.one_of(
        st.just(0), st.integers(1, 3000), st.integers(1, windows[0]), st.integers(1, 2 * windows[-1])
    )
    reserve: st.SearchStrategy[tuple[Any, ...]] = st.tuples(st.just("reserve"), st.integers(1, smallest))
    settle: st.SearchStrategy[tuple[Any, ...]] = st.tuples(
        st.just("settle"), st.integers(0, 20), st.floats(0, 1)
    )
    debit: st.SearchStrategy[tuple[Any, ...]] = st.tuples(st.just("debit"), st.integers(1, 2 * smallest))
    kinds = {"escrow": [reserve, settle], "debit": [debit], "mixed": [reserve, settle, debit]}[mode]
    op = st.one_of(*kinds, st.tuples(st.just("step"), steps))
    start = draw(st.integers(0, windows[-1]))
    return BudgetCase(mode, budgets, start, draw(st.lists(op, min_size=1, max_size=40)))


@dataclass
class Budget:
    budget: int
    window: int
    start: int = -1
    c: int = 0

    def at(self, now: int) -> Budget:
        """Roll to the window of ``now`` (epoch-aligned)."""
        s = now - now % self.window
        if s != self.start:
            self.start, self.c = s, 0
        return self


def pick(bs: list[Budget], now: int, tokens: int, strict: bool) -> tuple[bool, Budget, int]:
    """The engine's documented choice: denied by any budget (report the one that frees last), else the
    budget with the least remaining (the first on a tie)."""
    denied = [b for b in bs if (b.c + tokens > b.budget if strict else b.c >= b.budget)]
    if denied:
        last = max(denied, key=lambda b: b.start + b.window)  # max keeps the first of equals
        return False, last, last.start + last.window - now
    return True, min(bs, key=lambda b: b.budget - b.c), 0


def decision_of(b: Budget, allowed: bool, retry: int) -> tuple[bool, int, int, int, int]:
    return (allowed, b.budget, max(0, b.budget - b.c), b.start + b.window, retry)


def fields(d: taskgate.Decision) -> tuple[bool, int, int, int, int]:
    return (d.allowed, d.limit, d.remaining, d.reset_at, d.retry_after_ms)


@PROPS
@given(case=budget_cases())
def test_budget_properties(store_url: str, prefix: str, case: BudgetCase) -> None:
    with backend(store_url, prefix, case.policy) as b:
        bs = [Budget(budget, window) for budget, window in case.budgets]
        smallest_window = min(w for _, w in case.budgets)
        now = snap(BASE + case.start, smallest_window)
        open_res: list[
            tuple[taskgate.Reservation, int, list[int]]
        ] = []  # reservation, estimate, window starts
        biggest_debit = 0
        ks = keyset(b.prefix, b.policy("t"), "k")
        for i, op in enumerate(case.ops):
            where = f"op {i} {op} at +{now - BASE}"
            for x in bs:
                x.at(now)
            if op[0] == "step":
                now = snap(now + op[1], smallest_window)
                continue
            if op[0] == "reserve":
                t = op[1]
                r = b.reserve("t", "k", t, now=now)
                ok, _, retry = pick(bs, now, t, True)
                if ok:
                    for x in bs:
                        x.c += t
                    open_res.append((r, t, [x.start for x in bs]))
                    _, tight, _ = pick(bs, now, 0, True)
                    assert fields(r.decision) == decision_of(tight, True, 0), where
                else:
                    _, worst, _ = pick(bs, now, t, True)
                    assert fields(r.decision) == decision_of(worst, False, retry), where
                    assert r.id == "", where
            elif op[0] == "debit":
                t = op[1]
                biggest_debit = max(biggest_debit, t)
                ok, chosen, retry = pick(bs, now, t, False)
                d = b.debit("t", "k", t, now=now)
                if ok:
                    for x in bs:
                        x.c += t
                assert fields(d) == decision_of(chosen, ok, retry), where
            else:
                if not open_res:
                    continue
                r, est, starts = open_res.pop(op[1] % len(open_res))
                actual = int(est * op[2])  # actual <= estimate
                s = r.settle(actual, now=now)
                first = True
                for x, st0 in zip(bs, starts, strict=True):
                    before = x.c
                    delta = actual - est if st0 == x.start else max(0, actual - est)
                    x.c = max(0, x.c + delta)
                    if first:
                        assert (s.charged, s.refunded) == ((delta, 0) if delta >= 0 else (0, before - x.c)), (
                            where
                        )
                        first = False
                _, chosen, _ = pick(bs, now, 0, True)
                assert fields(s.decision) == decision_of(chosen, True, 0), where
            # the engine holds what the model says, and stays within the mode's bound
            for j, x in enumerate(bs):
                raw_s, raw_c = b.client.hmget(ks.budget(j), "s", "c")
                held = int(raw_c or 0) if raw_s is not None and int(raw_s) == x.start else 0
                assert held == x.c, f"{where}: budget {j}"
                if case.mode == "escrow":
                    assert x.c <= x.budget, where
                else:
                    assert x.c - x.budget < max(biggest_debit, 1), where
            keys = [ks.budget(j) for j in range(len(bs))] + [ks.reservation(r.id) for r, _, _ in open_res]
            assert ttl_missing(b, keys) == [], where
        assert ttl_missing(b) == []


# -- admit -------------------------------------------------------------------------------------------------


@dataclass
class AdmitCase:
    limit: int
    period: int
    burst: int
    max_limit: int
    min_limit: int
    ttl: int
    budget: int
    window: int
    accounting: str
    ops: list[tuple[Any, ...]]

    @property
    def policy(self) -> dict[str, Any]:
        return {
            "u": {
                "strategy": "gcra",
                "limit": self.limit,
                "period": self.period,
                "burst": self.burst,
                "bookingHorizon": 0,
                "concurrency": {"minLimit": self.min_limit, "maxLimit": self.max_limit, "leaseTtl": self.ttl},
                "tokenBudget": {"budget": self.budget, "windowMs": self.window},
                "accounting": self.accounting,
            }
        }


@st.composite
def admit_cases(draw: st.DrawFn) -> AdmitCase:
    limit = draw(st.integers(1, 3))
    period = limit * draw(st.sampled_from([1000, 2000, 5000]))  # emission interval >= 1 s
    burst = draw(st.integers(1, 3))
    mx = draw(st.integers(1, 4))
    mn = draw(st.integers(1, mx))
    budget = draw(st.integers(5, 60))
    op = st.one_of(
        st.tuples(
            st.just("admit"), st.sampled_from(["a", "b"]), st.integers(1, burst), st.integers(0, budget)
        ),
        st.tuples(st.just("release"), st.integers(0, 20), st.booleans()),
        st.tuples(st.just("debit"), st.sampled_from(["a", "b"]), st.integers(1, budget)),
        st.tuples(st.just("step"), st.one_of(st.just(0), st.integers(1, 3000), st.integers(1, 30_000))),
    )
    return AdmitCase(
        limit,
        period,
        burst,
        mx,
        mn,
        draw(st.sampled_from([2000, 5000])),
        budget,
        draw(st.sampled_from(WINDOWS[:2])),
        draw(st.sampled_from(["escrow", "debit"])),
        draw(st.lists(op, min_size=1, max_size=40)),
    )


def admit_state(b: taskgate.RedisBackend, key: str, now: int) -> dict[str, Any]:
    """All that an admit of ``key`` could consume, read without consuming anything."""
    p = b.policy("u")
    ks = keyset(b.prefix, p, key)
    return {
        "rate": b.peek("u", key, now=now),
        "rate_raw": b.client.get(ks.rate),
        "budget": b.client.hgetall(ks.budget(0)),
        "live_leases": b.client.zrangebyscore(ks.leases, f"({now}", "+inf", withscores=True),
        "reservations": sorted(b.client.scan_iter(match=f"{b.prefix}:*:rv:*", count=1000)),
    }


@PROPS
@given(case=admit_cases())
def test_admit_consumes_nothing_on_a_denial(store_url: str, prefix: str, case: AdmitCase) -> None:
    with backend(store_url, prefix, case.policy) as b:
        now = snap(BASE, case.window)
        held: list[taskgate.Admission] = []
        written: set[str] = set()
        for i, op in enumerate(case.ops):
            where = f"op {i} {op} at +{now - BASE}"
            assert ttl_missing(b, sorted(written)) == [], where
            if op[0] == "step":
                now = snap(now + op[1], case.window)
            elif op[0] == "debit":
                b.debit("u", op[1], op[2], now=now)
            elif op[0] == "release":
                if held:
                    a = held.pop(op[1] % len(held))
                    a.now = now  # release at the current simulated time
                    a.release(dropped=op[2])
            else:
                _, key, cost, tokens = op
                ks = keyset(b.prefix, b.policy("u"), key)
                written |= {ks.rate, ks.budget(0), ks.leases, ks.meta, ks.waiters, ks.bookings}
                before = admit_state(b, key, now)
                a = b.admit("u", key, cost, tokens, now=now)
                if a.allowed:
                    held.append(a)
                    assert a.held, where
                    assert a.binding_axis == "concurrency", where
                    continue
                assert (a.booked, a.booking_token, a.lease_id, a.reserved_tokens) == (False, "", "", 0), where
                assert a.retry_after_ms > 0, where
                assert admit_state(b, key, now) == before, where
                # the binding axis is the first one (rate, concurrency, cost) that denies
                rate_ok = b.forecast("u", key, now=now).spendable_now >= cost
                in_flight = len(before["live_leases"])
                lim = b.client.hget(keyset(b.prefix, b.policy("u"), key).meta, "lim")
                limit = math.floor(min(case.max_limit, max(case.min_limit, float(lim or case.max_limit))))
                c = before["budget"]
                window_start = now - now % case.window
                charged = int(c.get(b"c", 0)) if int(c.get(b"s", -1)) == window_start else 0
                if not rate_ok:
                    assert a.binding_axis == "rate", where
                elif in_flight >= limit:
                    assert (a.binding_axis, a.decision.limit) == ("concurrency", limit), where
                else:
                    assert a.binding_axis == "cost", where
                    strict = case.accounting == "escrow" and tokens > 0
                    assert (charged + tokens > case.budget) if strict else (charged >= case.budget), where
        assert ttl_missing(b) == []
