"""Token budgets (the cost axis): ``debit`` with ThrottleKit's crossing semantics, ``reserve`` / ``settle``.

The golden vectors' ``tokenBudget`` suites start at ``now = 0``. taskgate aligns budget windows to the epoch
(``start = now - now % window``), so the replay offset must be a positive multiple of every window of the
suite: then ``OFFSET + op.now`` falls at the same place in its window as ``op.now`` does in ``[0, window)``.
We replay with ``now = OFFSET + op.now`` where ``OFFSET`` is the first multiple of the least common multiple
of the suite's windows at or after a realistic epoch (1.7e12 ms, i.e. ``60000 * 28_333_334`` for the
vectors' 60 s and 1 s windows), and expect ``resetAt + OFFSET``. (Upstream's ``1000 + op.now`` would not
hold for a 60 s window: ``1000`` is not window-aligned there.)
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

import taskgate
from taskgate.engine.keys import is_stats_key, keyset

EPOCH = 1_700_000_000_000
MIN = 60_000
N = MIN * 28_333_334  # 1_700_000_040_000: aligned to 1 s, 1 min (not to 1 h)

Fields = tuple[bool, int, int, int, int]


def budget_suites(vectors: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in vectors["suites"] if s["primitive"] == "tokenBudget"]


def offset_for(suite: dict[str, Any]) -> int:
    """The first multiple of every window of ``suite`` at or after EPOCH (see the module docstring)."""
    opts = suite["options"]
    windows = [b["windowMs"] for b in (opts if isinstance(opts, list) else [opts])]
    step = math.lcm(*windows)
    off = -(-EPOCH // step) * step
    assert off > 0
    assert all(off % w == 0 for w in windows)
    return off


def fields(d: taskgate.Decision) -> Fields:
    return (d.allowed, d.limit, d.remaining, d.reset_at, d.retry_after_ms)


def expect(op: dict[str, Any], offset: int) -> Fields:
    e = op["expect"]
    return (e["allowed"], e["limit"], e["remaining"], e["resetAt"] + offset, e["retryAfterMs"])


def charged(b: taskgate.RedisBackend, policy: str, key: str, now: int, i: int = 0) -> int:
    """White-box: what budget ``i`` of ``key`` holds charged in the window of ``now`` (0 if another window)."""
    p = b.policy(policy)
    window = p.budgets[i].window_ms
    start, c = b.client.hmget(keyset(b.prefix, p, key).budget(i), "s", "c")
    if start is None or int(start) != now - now % window:
        return 0
    return int(c or 0)


# -- golden vectors ---------------------------------------------------------------------------------------


def test_vectors_have_budget_suites(vectors: dict[str, Any]) -> None:
    names = {s["name"] for s in budget_suites(vectors)}
    assert {"tokenBudget/per-token-to-L", "tokenBudget/crossing-debit", "tokenBudget/window-roll"} <= names
    assert offset_for(budget_suites(vectors)[0]) == N


def test_budget_vectors_sync(vectors: dict[str, Any], connect: Any) -> None:
    """Every tokenBudget suite, field for field, through ``debit`` (memory:// and the real Redis)."""
    for n, suite in enumerate(budget_suites(vectors)):
        off = offset_for(suite)
        b = connect({f"b{n}": {"tokenBudget": suite["options"]}})
        for i, op in enumerate(suite["ops"]):
            d = b.debit(f"b{n}", suite.get("key", "k"), op["tokens"], now=off + op["now"])
            assert fields(d) == expect(op, off), f"{suite['name']} op {i}"
            assert not d.booked
            assert d.booking_token == ""


def test_budget_vectors_async(vectors: dict[str, Any], store_url: str, prefix: str) -> None:
    """The same suites through the asyncio door (connect_async)."""

    async def replay() -> None:
        for n, suite in enumerate(budget_suites(vectors)):
            off = offset_for(suite)
            b = taskgate.connect_async(
                store_url, {"b": {"tokenBudget": suite["options"]}}, prefix=f"{prefix}{n}"
            )
            try:
                for i, op in enumerate(suite["ops"]):
                    d = await b.debit("b", suite.get("key", "k"), op["tokens"], now=off + op["now"])
                    assert fields(d) == expect(op, off), f"{suite['name']} op {i}"
            finally:
                await b.aclose()

    asyncio.run(replay())


# -- debit -------------------------------------------------------------------------------------------------


def test_windows_are_epoch_aligned(connect: Any) -> None:
    b = connect({"t": {"tokenBudget": {"budget": 10, "windowMs": "1m"}}})
    d = b.debit("t", "k", 4, now=N + 12_345)
    assert fields(d) == (True, 10, 6, N + MIN, 0)
    # a debit 59 s later is in the same window (aligned to the epoch, not to the first debit)
    assert fields(b.debit("t", "k", 6, now=N + 59_999)) == (True, 10, 0, N + MIN, 0)
    assert fields(b.debit("t", "k", 1, now=N + 59_999)) == (False, 10, 0, N + MIN, 1)
    # the next window starts at the boundary
    assert fields(b.debit("t", "k", 1, now=N + MIN)) == (True, 10, 9, N + 2 * MIN, 0)


def test_denied_debit_charges_nothing(connect: Any) -> None:
    b = connect({"t": {"tokenBudget": {"budget": 10, "windowMs": "1m"}}})
    assert b.debit("t", "k", 15, now=N).allowed  # the crossing debit counts in full
    assert charged(b, "t", "k", N) == 15
    d = b.debit("t", "k", 3, now=N + 1000)
    assert fields(d) == (False, 10, 0, N + MIN, MIN - 1000)
    assert charged(b, "t", "k", N) == 15


def test_keys_are_independent(connect: Any) -> None:
    b = connect({"t": {"tokenBudget": {"budget": 5, "windowMs": "1m"}}})
    assert b.debit("t", "a", 5, now=N).remaining == 0
    assert not b.debit("t", "a", 1, now=N).allowed
    assert b.debit("t", "b", 1, now=N).remaining == 4


def test_several_budgets_each_charged_tightest_reported(connect: Any) -> None:
    b = connect({"t": {"tokenBudget": [{"budget": 10, "windowMs": "1s"}, {"budget": 25, "windowMs": "1m"}]}})
    # the per-second budget is the tighter one
    assert fields(b.debit("t", "k", 8, now=N)) == (True, 10, 2, N + 1000, 0)
    # crossing the per-second budget: denied later in that second, with the time to that second's end
    assert fields(b.debit("t", "k", 5, now=N + 100)) == (True, 10, 0, N + 1000, 0)
    assert fields(b.debit("t", "k", 1, now=N + 200)) == (False, 10, 0, N + 1000, 800)
    assert charged(b, "t", "k", N, 0) == 13
    assert charged(b, "t", "k", N, 1) == 13
    # next second: 1 left per second, 3 left per minute: still the per-second budget
    assert fields(b.debit("t", "k", 9, now=N + 1000)) == (True, 10, 1, N + 2000, 0)
    # a debit that crosses both: the one overshot most (the minute) is reported
    assert fields(b.debit("t", "k", 12, now=N + 2000)) == (True, 25, 0, N + MIN, 0)
    assert charged(b, "t", "k", N + 2000, 0) == 12
    assert charged(b, "t", "k", N + 2000, 1) == 34
    # both exhausted: the denial waits for the budget that frees last (the minute)
    assert fields(b.debit("t", "k", 1, now=N + 2500)) == (False, 25, 0, N + MIN, MIN - 2500)
    # the per-second budget rolls over, the minute still denies
    assert fields(b.debit("t", "k", 1, now=N + 3000)) == (False, 25, 0, N + MIN, MIN - 3000)


def test_debit_validation(connect: Any) -> None:
    b = connect(
        {
            "t": {"tokenBudget": {"budget": 5, "windowMs": "1m"}},
            "r": {"strategy": "gcra", "limit": 1, "period": "1s"},
        }
    )
    for bad in (0, -1, True, 1.5, "3"):
        with pytest.raises(ValueError, match="tokens"):
            b.debit("t", "k", bad, now=N)
    with pytest.raises(taskgate.OperationNotSupportedError, match="tokenBudget"):
        b.debit("r", "k", 1, now=N)
    with pytest.raises(taskgate.OperationNotSupportedError, match="tokenBudget"):
        b.reserve("r", "k", 1, now=N)
    with pytest.raises(taskgate.PolicyNotFoundError):
        b.debit("nope", "k", 1, now=N)
    with pytest.raises(ValueError, match="key"):
        b.debit("t", "", 1, now=N)


# -- reserve / settle --------------------------------------------------------------------------------------


def test_reserve_is_escrow_strict(connect: Any) -> None:
    b = connect({"t": {"tokenBudget": {"budget": 100, "windowMs": "1m"}}})
    r = b.reserve("t", "k", 60, now=N)
    assert isinstance(r, taskgate.Reservation)
    assert r.allowed
    assert r.id
    assert fields(r.decision) == (True, 100, 40, N + MIN, 0)
    assert r.expires_at == N + 2 * MIN  # the longest window, plus as much again (>= 1 min) for a late settle
    # a reservation that would overshoot is denied (unlike a debit), and charges nothing
    r2 = b.reserve("t", "k", 41, now=N + 5)
    assert fields(r2.decision) == (False, 100, 40, N + MIN, MIN - 5)
    assert r2.id == ""
    assert charged(b, "t", "k", N) == 60
    assert b.reserve("t", "k", 40, now=N + 6).decision.remaining == 0
    with pytest.raises(ValueError, match="smallest budget"):
        b.reserve("t", "k", 101, now=N)
    with pytest.raises(RuntimeError, match="denied"):
        r2.settle(1)


def test_settle_refunds_the_difference(connect: Any) -> None:
    b = connect({"t": {"tokenBudget": {"budget": 100, "windowMs": "1m"}}})
    r = b.reserve("t", "k", 50, now=N)
    s = r.settle(20, now=N + 10)
    assert (s.charged, s.refunded) == (0, 30)
    assert fields(s.decision) == (True, 100, 80, N + MIN, 0)
    assert charged(b, "t", "k", N) == 20
    assert r.settlement == s
    with pytest.raises(RuntimeError, match="already settled"):
        r.settle(20, now=N + 10)


def test_settle_charges_the_excess(connect: Any) -> None:
    b = connect({"t": {"tokenBudget": {"budget": 100, "windowMs": "1m"}}})
    r = b.reserve("t", "k", 30, now=N)
    s = b.settle("t", "k", r.id, 45, now=N + 10)
    assert (s.charged, s.refunded) == (15, 0)
    assert s.decision.remaining == 55
    assert charged(b, "t", "k", N) == 45


def test_settle_reads_usage_objects(connect: Any) -> None:
    b = connect({"t": {"tokenBudget": {"budget": 100, "windowMs": "1m"}}})
    r = b.reserve("t", "k", 30, now=N)
    s = r.settle({"prompt_tokens": 7, "completion_tokens": 5}, now=N)
    assert (s.charged, s.refunded) == (0, 18)
    assert charged(b, "t", "k", N) == 12


def test_unsettled_reservation_stays_charged(connect: Any) -> None:
    b = connect({"t": {"tokenBudget": {"budget": 100, "windowMs": "1m"}}})
    r = b.reserve("t", "k", 70, now=N)
    assert r.allowed
    # never settled: the estimate counts for the rest of the window
    assert fields(b.debit("t", "k", 30, now=N + 30_000)) == (True, 100, 0, N + MIN, 0)
    assert not b.debit("t", "k", 1, now=N + 59_999).allowed
    # and is gone with the window
    assert fields(b.debit("t", "k", 1, now=N + MIN)) == (True, 100, 99, N + 2 * MIN, 0)


def test_settle_after_the_window_rolled(connect: Any) -> None:
    """A refund into an ended window is moot; an excess is charged to the current window."""
    b = connect({"t": {"tokenBudget": {"budget": 100, "windowMs": "1m"}}})
    r1 = b.reserve("t", "k", 50, now=N)
    r2 = b.reserve("t", "k", 30, now=N)
    assert b.debit("t", "k", 30, now=N + MIN).remaining == 70  # the new window's own usage
    s1 = b.settle("t", "k", r1.id, 10, now=N + MIN + 5)
    assert (s1.charged, s1.refunded) == (0, 0)
    assert charged(b, "t", "k", N + MIN) == 30  # not refunded into the new window
    s2 = b.settle("t", "k", r2.id, 50, now=N + MIN + 6)
    assert (s2.charged, s2.refunded) == (20, 0)
    assert fields(s2.decision) == (True, 100, 50, N + 2 * MIN, 0)


def test_settle_several_budgets(connect: Any) -> None:
    """Each budget is settled against its own window: per-second rolled (refund moot), per-minute refunded."""
    b = connect({"t": {"tokenBudget": [{"budget": 50, "windowMs": "1s"}, {"budget": 200, "windowMs": "1m"}]}})
    r = b.reserve("t", "k", 40, now=N)
    assert fields(r.decision) == (True, 50, 10, N + 1000, 0)
    s = r.settle(25, now=N + 1500)
    assert charged(b, "t", "k", N + 1500, 0) == 0
    assert charged(b, "t", "k", N + 1500, 1) == 25
    assert fields(s.decision) == (True, 50, 50, N + 2000, 0)


def test_settle_unknown_reservation_is_a_plain_debit(connect: Any) -> None:
    """No usage is ever forgotten: an unknown (expired, or already settled) reservation charges the actual."""
    b = connect({"t": {"tokenBudget": {"budget": 100, "windowMs": "1m"}}})
    s = b.settle("t", "k", "0123abcd", 12, now=N)
    assert (s.charged, s.refunded) == (12, 0)
    assert charged(b, "t", "k", N) == 12
    r = b.reserve("t", "k", 10, now=N)
    b.settle("t", "k", r.id, 10, now=N)
    assert charged(b, "t", "k", N) == 22
    b.settle("t", "k", r.id, 10, now=N)  # a second settle of the same id is a debit again
    assert charged(b, "t", "k", N) == 32
    with pytest.raises(ValueError, match="reservation id"):
        b.settle("t", "k", "../x", 1, now=N)
    with pytest.raises(ValueError, match="tokens"):
        b.settle("t", "k", r.id, -1, now=N)


def test_budget_keys_expire(connect: Any) -> None:
    """Every key written has a TTL: budgets to their window's end, a reservation to the longest window."""
    b = connect({"t": {"tokenBudget": [{"budget": 50, "windowMs": "1s"}, {"budget": 200, "windowMs": "1m"}]}})
    b.debit("t", "k", 3, now=N + 250)
    r = b.reserve("t", "k", 5, now=N + 250)
    b.settle("t", "k", b.reserve("t", "k", 5, now=N + 250).id, 1, now=N + 250)
    ks = keyset(b.prefix, b.policy("t"), "k")
    ttl = {k: b.client.pttl(k) for k in (ks.budget(0), ks.budget(1), ks.reservation(r.id))}
    assert 0 < ttl[ks.budget(0)] <= 1000  # the window ends in 750 ms; expiries have a 1 s floor
    assert 750 < ttl[ks.budget(1)] <= MIN - 250
    assert 2 * MIN - 1000 < ttl[ks.reservation(r.id)] <= 2 * MIN
    keys = list(b.client.scan_iter(match=f"{b.prefix}:*", count=1000))
    assert len([k for k in keys if not is_stats_key(b.prefix, k)]) == 3  # the settled reservation is gone
    assert all(b.client.pttl(k) > 0 for k in keys)  # the counters' keys too


def test_reservation_settles_on_the_reserve_clock(connect: Any) -> None:
    b = connect({"t": {"tokenBudget": {"budget": 100, "windowMs": "1m"}}})
    r = b.reserve("t", "k", 50, now=N)
    s = r.settle(20)
    assert (s.charged, s.refunded) == (0, 30)


def test_async_reserve_settle(store_url: str, prefix: str) -> None:
    async def run() -> None:
        b = taskgate.connect_async(
            store_url, {"t": {"tokenBudget": {"budget": 100, "windowMs": "1m"}}}, prefix=prefix
        )
        try:
            r = await b.reserve("t", "k", 60, now=N)
            assert isinstance(r, taskgate.AsyncReservation)
            assert (r.allowed, r.decision.remaining) == (True, 40)
            assert not (await b.reserve("t", "k", 41, now=N)).allowed
            s = await r.settle(25, now=N + 1)
            assert (s.charged, s.refunded, s.decision.remaining) == (0, 35, 75)
            d = await b.debit("t", "k", 80, now=N + 2)
            assert fields(d) == (True, 100, 0, N + MIN, 0)
        finally:
            await b.aclose()

    asyncio.run(run())
