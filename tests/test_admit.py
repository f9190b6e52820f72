"""admit: rate x concurrency x cost in one atomic script; the Admission it returns; the heartbeat pump.

Decisions use an explicit ``now`` on memory:// and the real Redis. The heartbeat pump works on the store's
clock by design (production), so its tests use real time and leases of the smallest TTL (1 s), and wait on
events or measure rather than sleep-and-hope where they can.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import taskgate
from taskgate.engine.keys import keyset
from taskgate.types import HeartbeatReply, LeaseRef

N = 1_700_000_040_000
MIN = 60_000
RATE = {"strategy": "gcra", "limit": 1, "period": "1s", "burst": 2, "bookingHorizon": 0}
POLICIES: dict[str, Any] = {
    # unified: rate (2 at once, then 1/s per key) x concurrency (3 policy-wide) x cost (100 per minute per key)
    "u": {
        **RATE,
        "concurrency": {"maxLimit": 3, "leaseTtl": "10s"},
        "tokenBudget": {"budget": 100, "windowMs": "1m"},
    },
    "ud": {
        **RATE,
        "concurrency": {"maxLimit": 3, "leaseTtl": "10s"},
        "tokenBudget": {"budget": 100, "windowMs": "1m"},
        "accounting": "debit",
    },
    "rc": {**RATE, "tokenBudget": {"budget": 100, "windowMs": "1m"}},
    "cost": {"tokenBudget": {"budget": 100, "windowMs": "1m"}},
    "adapt": {"concurrency": {"minLimit": 1, "maxLimit": 4, "leaseTtl": "10s"}},
    "rate": {"strategy": "gcra", "limit": 1, "period": "1s"},
    "hb": {"concurrency": {"maxLimit": 1, "leaseTtl": "1s"}},
}


@pytest.fixture
def b(connect: Callable[[Any], taskgate.RedisBackend]) -> taskgate.RedisBackend:
    return connect(POLICIES)


def state(b: taskgate.RedisBackend, policy: str, key: str, now: int) -> dict[str, Any]:
    """Everything a decision on (policy, key) could consume, read without consuming anything."""
    p = b.policy(policy)
    ks = keyset(b.prefix, p, key)
    out: dict[str, Any] = {
        "budgets": [b.client.hgetall(ks.budget(i)) for i in range(len(p.budgets))],
        "reservations": sorted(b.client.scan_iter(match=ks.reservation("*"), count=1000)),
    }
    if p.rate is not None:
        out["rate"] = b.peek(policy, key, now=now)
        out["rate_raw"] = b.client.get(ks.rate)
    if p.concurrency is not None:
        out["in_flight"] = b.client.zcount(ks.leases, f"({now}", "+inf")
    return out


def charged(b: taskgate.RedisBackend, policy: str, key: str) -> int:
    raw = b.client.hget(keyset(b.prefix, b.policy(policy), key).budget(0), "c")
    return int(raw or 0)


# -- one atomic decision over every axis -------------------------------------------------------------------


def test_admit_takes_every_axis(b: taskgate.RedisBackend) -> None:
    a = b.admit("u", "k", tokens=30, now=N)
    assert (a.allowed, a.binding_axis, a.held) == (True, "concurrency", True)
    assert (a.decision.limit, a.decision.remaining, a.decision.reset_at) == (3, 2, N + 10_000)
    assert (a.reserved_tokens, len(a.reservation_id)) == (30, 32)
    assert a.lease_expires_at == N + 10_000
    assert b.peek("u", "k", now=N).remaining == 1  # one of the burst of 2 taken
    assert charged(b, "u", "k") == 30


def test_binding_axis_of_an_admission(b: taskgate.RedisBackend) -> None:
    """On success: "concurrency" if the policy has it, else "cost" (the Decision reports that axis)."""
    a = b.admit("rc", "k", tokens=10, now=N)
    assert (a.allowed, a.binding_axis, a.held, a.lease_id) == (True, "cost", False, "")
    assert (a.decision.limit, a.decision.remaining, a.decision.reset_at) == (100, 90, N + MIN)
    c = b.admit("cost", "k", tokens=100, now=N)
    assert (c.binding_axis, c.decision.remaining) == ("cost", 0)
    assert not c.release()  # nothing held: nothing to release


def test_rate_denial_consumes_nothing(b: taskgate.RedisBackend) -> None:
    assert b.admit("u", "k", tokens=10, now=N).allowed
    assert b.admit("u", "k", tokens=10, now=N).allowed
    before = state(b, "u", "k", N + 100)
    d = b.admit("u", "k", tokens=10, now=N + 100)
    assert (d.allowed, d.binding_axis, d.held, d.reserved_tokens) == (False, "rate", False, 0)
    assert (d.decision.limit, d.decision.retry_after_ms) == (2, 900)
    assert not d.booked
    assert state(b, "u", "k", N + 100) == before


def test_concurrency_denial_consumes_nothing(b: taskgate.RedisBackend) -> None:
    held = [b.admit("u", f"k{i}", tokens=10, now=N) for i in range(3)]  # 3 keys, one policy-wide limit
    assert all(a.allowed for a in held)
    before = state(b, "u", "k3", N + 1)
    d = b.admit("u", "k3", tokens=10, now=N + 1)
    assert (d.allowed, d.binding_axis, d.decision.limit, d.decision.remaining) == (False, "concurrency", 3, 0)
    assert d.retry_after_ms > 0
    assert state(b, "u", "k3", N + 1) == before
    assert b.peek("u", "k3", now=N + 1).remaining == 2


def test_cost_denial_consumes_nothing(b: taskgate.RedisBackend) -> None:
    assert b.debit("u", "k", 100, now=N).remaining == 0
    before = state(b, "u", "k", N + 1)
    d = b.admit("u", "k", tokens=1, now=N + 1)
    assert (d.allowed, d.binding_axis) == (False, "cost")
    assert (d.decision.limit, d.decision.remaining, d.decision.retry_after_ms) == (100, 0, MIN - 1)
    assert state(b, "u", "k", N + 1) == before


def test_escrow_admit_is_strict_and_settles(b: taskgate.RedisBackend) -> None:
    a = b.admit("u", "k", tokens=60, now=N)
    assert a.allowed
    # 40 left: an estimate of 50 would overshoot, so it is denied although budget remains
    d = b.admit("u", "k", tokens=50, now=N + 1)
    assert (d.allowed, d.binding_axis) == (False, "cost")
    s = a.settle(45)
    assert isinstance(s, taskgate.Settlement)
    assert (s.charged, s.refunded, s.decision.remaining) == (0, 15, 55)
    with pytest.raises(RuntimeError, match="already settled"):
        a.settle(1)
    assert a.release() is True
    assert charged(b, "u", "k") == 45


def test_escrow_unsettled_stays_charged(b: taskgate.RedisBackend) -> None:
    a = b.admit("u", "k", tokens=60, now=N)
    assert a.release() is True
    assert charged(b, "u", "k") == 60


def test_debit_accounting(b: taskgate.RedisBackend) -> None:
    """Debit accounting charges nothing at admit (crossing semantics: admitted while budget remains);
    settle debits the actual, and an unsettled admission is debited its estimate at release."""
    a = b.admit("ud", "k", tokens=70, now=N)
    assert (a.allowed, a.reserved_tokens, a.reservation_id) == (True, 0, "")
    assert charged(b, "ud", "k") == 0
    d = a.settle(80)
    assert isinstance(d, taskgate.Decision)
    assert (d.allowed, d.remaining) == (True, 20)
    a.release()
    assert charged(b, "ud", "k") == 80
    u = b.admit("ud", "k", tokens=50, now=N + 1)  # 20 remain: admitted (crossing)
    assert u.allowed
    assert u.release() is True
    assert charged(b, "ud", "k") == 130
    assert b.admit("ud", "k", tokens=1, now=N + 2000).binding_axis == "cost"  # (rate has room again)


def test_admit_validation(b: taskgate.RedisBackend) -> None:
    with pytest.raises(taskgate.OperationNotSupportedError, match="use check"):
        b.admit("rate", "k", now=N)
    with pytest.raises(ValueError, match="no tokenBudget"):
        b.admit("adapt", "k", tokens=5, now=N)
    with pytest.raises(ValueError, match="smallest budget"):
        b.admit("u", "k", tokens=101, now=N)
    with pytest.raises(ValueError, match="tokens"):
        b.admit("u", "k", tokens=-1, now=N)
    with pytest.raises(ValueError, match="cost"):
        b.admit("u", "k", cost=3, now=N)  # more than the burst: could never be admitted
    with pytest.raises(ValueError, match="now"):
        b.admit("u", "k", now=0)
    assert b.admit("ud", "k", tokens=101, now=N).allowed  # debit accounting: crossing is fine


# -- the Admission as a context manager --------------------------------------------------------------------


def test_context_manager_releases_dropped_and_reraises(b: taskgate.RedisBackend) -> None:
    seen: list[object] = []

    def body() -> None:
        with b.admit("adapt", "k", now=N) as a:
            seen.append(a)
            seen.append(taskgate.current())
            _ = 1 / 0

    with pytest.raises(ZeroDivisionError):
        body()
    a = seen[0]
    assert isinstance(a, taskgate.Admission)
    assert seen[1] is a
    assert a.released
    assert not a.held
    # released as dropped: the adaptive limit shrank 4 -> 3 (and the slot is free again)
    nxt = b.admit("adapt", "k", now=N + 1)
    assert (nxt.allowed, nxt.decision.limit) == (True, 3)
    with pytest.raises(RuntimeError, match="no admission is held"):
        taskgate.current()


def test_context_manager_clean_exit(b: taskgate.RedisBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, bool]] = []
    real = b.release

    def release(lease_id: str, *, dropped: bool = False, now: int | None = None) -> bool:
        seen.append((lease_id, dropped))
        return real(lease_id, dropped=dropped, now=now)

    monkeypatch.setattr(b, "release", release)
    with b.admit("u", "k", tokens=50, now=N) as a:
        assert a.allowed
        s = taskgate.current().settle({"input_tokens": 10, "output_tokens": 5})
        assert isinstance(s, taskgate.Settlement)
        assert s.refunded == 35
    assert seen == [(a.lease_id, False)]
    with pytest.raises(KeyError), b.admit("u", "k2", now=N) as a2:
        raise KeyError("boom")
    assert seen[-1] == (a2.lease_id, True)


def test_current_is_the_innermost_admission(b: taskgate.RedisBackend) -> None:
    with b.admit("u", "outer", now=N) as outer:
        with b.admit("cost", "inner", tokens=1, now=N) as inner:
            assert taskgate.current() is inner
        assert taskgate.current() is outer
    with pytest.raises(RuntimeError):
        taskgate.current()


def test_a_denied_admission_in_a_with_block_releases_nothing(
    b: taskgate.RedisBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(2):
        b.admit("u", "k", now=N)
    calls: list[str] = []
    monkeypatch.setattr(b, "release", lambda *a, **k: calls.append("release"))
    with b.admit("u", "k", now=N) as d:
        assert not d.allowed
        assert taskgate.current() is d
        with pytest.raises(RuntimeError, match="denied"):
            d.settle(1)
    assert calls == []


def test_async_context_manager(store_url: str, prefix: str) -> None:
    async def run() -> None:
        b = taskgate.connect_async(store_url, POLICIES, prefix=prefix)
        try:
            seen: list[object] = []

            async def body() -> None:
                async with await b.admit("adapt", "k") as a:
                    seen.extend([a, taskgate.current()])
                    raise ValueError("inside")

            with pytest.raises(ValueError, match="inside"):
                await body()
            a = seen[0]
            assert isinstance(a, taskgate.AsyncAdmission)
            assert seen[1] is a
            assert a.released
            nxt = await b.admit("adapt", "k")
            assert (nxt.allowed, nxt.decision.limit) == (True, 3)  # released as dropped
            await nxt.release()
            with pytest.raises(RuntimeError):
                taskgate.current()
        finally:
            await b.aclose()

    asyncio.run(run())


# -- the background heartbeat pump (real time) -------------------------------------------------------------


def lease_live(b: taskgate.RedisBackend, lease_id: str) -> bool:
    """White-box: the lease is in its set with an expiry after the store's clock."""
    ref = LeaseRef.parse(lease_id)
    exp = b.client.zscore(keyset(b.prefix, b.policy(ref.policy), ref.key).leases, ref.member)
    sec, usec = b.client.time()
    return exp is not None and exp > sec * 1000 + usec // 1000


def test_heartbeat_pump_keeps_a_lease_alive(b: taskgate.RedisBackend) -> None:
    assert b.heartbeat_interval == pytest.approx(1 / 3)
    a = b.admit("hb", "k", heartbeat=True)
    assert a.allowed
    time.sleep(2.5)  # 2.5x the lease TTL
    assert lease_live(b, a.lease_id)
    assert not b.admit("hb", "k").allowed
    assert not a.reclaimed
    assert a.release() is True
    assert b.admit("hb", "k").allowed


def test_heartbeat_pump_reports_a_reclaimed_lease(b: taskgate.RedisBackend) -> None:
    a = b.admit("hb", "k", heartbeat=True)
    fired = threading.Event()
    a.on_reclaimed = fired.set
    ref = LeaseRef.parse(a.lease_id)
    assert b.client.zrem(keyset(b.prefix, b.policy("hb"), "k").leases, ref.member) == 1  # behind its back
    assert fired.wait(5 * b.heartbeat_interval)
    assert a.reclaimed
    assert a.release() is False


def test_heartbeat_pump_survives_a_failing_door(
    b: taskgate.RedisBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    beats: list[float] = []
    real = b.heartbeat

    def flaky(lease_ids: list[str], *, now: int | None = None) -> HeartbeatReply:
        beats.append(time.monotonic())
        if len(beats) == 1:
            raise taskgate.BackendUnavailableError("the store blinked")
        return real(lease_ids, now=now)

    monkeypatch.setattr(b, "heartbeat", flaky)
    a = b.admit("hb", "k", heartbeat=True)
    failed_at = time.monotonic()
    deadline = failed_at + 10
    while not beats and time.monotonic() < deadline:
        time.sleep(0.01)
    assert beats, "the pump never beat"
    time.sleep(1.5)  # well past the TTL after the failed beat
    assert len(beats) >= 4
    assert lease_live(b, a.lease_id)
    assert not a.reclaimed
    assert a.release() is True


def test_async_heartbeat_pump_keeps_a_lease_alive(store_url: str, prefix: str) -> None:
    async def run() -> None:
        b = taskgate.connect_async(store_url, POLICIES, prefix=prefix)
        try:
            a = await b.admit("hb", "k", heartbeat=True)
            assert a.allowed
            await asyncio.sleep(1.8)
            assert not (await b.admit("hb", "k")).allowed
            assert not a.reclaimed
            assert await a.release() is True
        finally:
            await b.aclose()

    asyncio.run(run())
