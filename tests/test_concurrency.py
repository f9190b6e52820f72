"""Concurrency leases: acquire (admit), release, heartbeat, reaping, the adaptive limit, waiter spreading.

Decisions run with an explicit ``now`` on memory:// and the real Redis; only the crash test (a SIGKILLed
child process) uses real time, and it measures how long the slots take to come back.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest

import taskgate
from taskgate.engine.keys import keyset

N = 1_700_000_040_000
POLICIES: dict[str, Any] = {
    "one": {"concurrency": {"maxLimit": 1, "leaseTtl": "1s"}},
    "two": {"concurrency": {"maxLimit": 2, "leaseTtl": "1s"}},
    "three": {"concurrency": {"maxLimit": 3, "leaseTtl": "1s"}},
    "adapt": {"concurrency": {"minLimit": 2, "maxLimit": 8, "leaseTtl": "10s"}},
    "pinned": {"concurrency": {"minLimit": 3, "maxLimit": 3, "leaseTtl": "10s"}},
    "perkey": {"concurrency": {"maxLimit": 1, "perKey": True, "leaseTtl": "1s"}},
    "slow": {"concurrency": {"maxLimit": 2, "leaseTtl": "10s"}},
    "costly": {
        "concurrency": {"maxLimit": 5, "leaseTtl": "1s"},
        "tokenBudget": {"budget": 10, "windowMs": "1m"},
    },
    "rate": {"strategy": "gcra", "limit": 1, "period": "1s"},
}


@pytest.fixture
def b(connect: Callable[[Any], taskgate.RedisBackend]) -> taskgate.RedisBackend:
    return connect(POLICIES)


def no_key_without_ttl(b: taskgate.RedisBackend) -> list[tuple[str, int]]:
    """Keys under the backend's prefix that would never expire (PTTL -1)."""
    out = []
    for k in b.client.scan_iter(match=f"{b.prefix}:*", count=1000):
        ttl = b.client.pttl(k)
        if ttl == -1:
            out.append((k.decode() if isinstance(k, bytes) else k, ttl))
    return out


def count_scripts(b: taskgate.RedisBackend, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the name of every script the backend runs (one entry per round trip)."""
    calls: list[str] = []
    real = b._run

    def run(plan: Any) -> Any:
        calls.append(plan.script.name)
        return real(plan)

    monkeypatch.setattr(b, "_run", run)
    return calls


# -- acquire / release -------------------------------------------------------------------------------------


def test_slots_up_to_the_limit(b: taskgate.RedisBackend) -> None:
    a1 = b.admit("two", "k", now=N)
    a2 = b.admit("two", "k", now=N + 5)
    assert (a1.allowed, a1.binding_axis, a1.held) == (True, "concurrency", True)
    assert (a1.decision.limit, a1.decision.remaining, a1.decision.reset_at) == (2, 1, N + 1000)
    assert (a2.decision.remaining, a2.lease_expires_at) == (0, N + 1005)
    assert a1.lease_id != a2.lease_id
    a3 = b.admit("two", "k", now=N + 10)
    assert (a3.allowed, a3.binding_axis, a3.held, a3.lease_id) == (False, "concurrency", False, "")
    d = a3.decision
    assert (d.limit, d.remaining, d.reset_at) == (2, 0, N + 1000)  # reset_at: the earliest lease expiry
    assert d.retry_after_ms > 0


def test_release_is_idempotent(b: taskgate.RedisBackend) -> None:
    a = b.admit("one", "k", now=N)
    assert b.release(a.lease_id, now=N + 10) is True
    assert b.release(a.lease_id, now=N + 11) is False
    assert b.release(a.lease_id, dropped=True, now=N + 12) is False
    a2 = b.admit("one", "k", now=N + 20)
    assert a2.allowed
    assert a2.release() is True
    assert a2.release() is False
    assert not a2.held
    assert b.admit("one", "k", now=N + 30).allowed


def test_expired_leases_are_reaped_on_acquire(b: taskgate.RedisBackend) -> None:
    assert b.admit("two", "k", now=N).allowed
    assert b.admit("two", "k", now=N + 100).allowed
    assert not b.admit("two", "k", now=N + 999).allowed
    a = b.admit("two", "k", now=N + 1000)  # the first lease expired at N + 1000: reaped
    assert (a.allowed, a.decision.remaining) == (True, 0)
    a = b.admit("two", "k", now=N + 1100)  # and the second at N + 1100
    assert (a.allowed, a.decision.remaining) == (True, 0)


def test_a_late_release_never_frees_another_holders_slot(b: taskgate.RedisBackend) -> None:
    a = b.admit("one", "k", now=N)
    other = b.admit("one", "k", now=N + 1500)  # a's lease expired and was reaped
    assert other.allowed
    assert a.release() is False  # a's release arrives late: it frees nothing
    assert not b.admit("one", "k", now=N + 1600).allowed  # other still holds the only slot
    assert other.release() is True
    assert b.admit("one", "k", now=N + 1700).allowed


def test_release_of_an_expired_unreaped_lease_is_a_reclaim(b: taskgate.RedisBackend) -> None:
    """Expired but still in the set: release removes it, returns False and does not move the limit."""
    a = b.admit("adapt", "k", now=N)
    assert b.release(a.lease_id, now=N + 10_000) is False
    assert b.admit("adapt", "k", now=N + 10_001).decision.limit == 8  # not grown by a clean release
    meta = keyset(b.prefix, b.policy("adapt"), "k").meta
    assert int(b.client.hget(meta, "rc") or -1) == 1
    assert no_key_without_ttl(b) == []


def test_same_holder_twice_in_one_ms_holds_two_slots(b: taskgate.RedisBackend) -> None:
    """Regression: the lease member was "<holder>:<now>", so a second admit by the same holder in the same ms
    overwrote the first lease: two slots granted, one counted, and a third admit got in over the limit."""
    a1 = b.admit("two", "k", now=N, holder="worker-1")
    a2 = b.admit("two", "k", now=N, holder="worker-1")
    assert a1.allowed
    assert a2.allowed
    assert a1.lease_id != a2.lease_id
    assert not b.admit("two", "k", now=N, holder="worker-1").allowed
    assert not b.admit("two", "k", now=N + 1, holder="worker-2").allowed
    assert a1.release() is True
    assert a2.release() is True


def test_holder_and_lease_id_validation(b: taskgate.RedisBackend) -> None:
    for bad in ("", "a:b", "x" * 201):
        with pytest.raises(ValueError, match="holder"):
            b.admit("one", "k", now=N, holder=bad)
    with pytest.raises(ValueError, match="lease id"):
        b.release("garbage", now=N)
    with pytest.raises(ValueError, match="lease id"):
        b.heartbeat(["garbage"], now=N)
    not_conc = b.admit("costly", "k", now=N).lease_id.replace(":6:costly", ":4:rate")
    with pytest.raises(taskgate.OperationNotSupportedError, match="no concurrency"):
        b.release(not_conc, now=N)
    with pytest.raises(taskgate.OperationNotSupportedError, match="use check"):
        b.admit("rate", "k", now=N)


# -- per policy / per key ------------------------------------------------------------------------------------


def test_policy_wide_limit_is_shared_by_keys(b: taskgate.RedisBackend) -> None:
    assert b.admit("one", "tenant-a", now=N).allowed
    d = b.admit("one", "tenant-b", now=N)
    assert (d.allowed, d.binding_axis) == (False, "concurrency")


def test_per_key_limit(b: taskgate.RedisBackend) -> None:
    a = b.admit("perkey", "tenant-a", now=N)
    assert a.allowed
    assert b.admit("perkey", "tenant-b", now=N).allowed
    assert not b.admit("perkey", "tenant-a", now=N + 1).allowed
    assert a.release() is True
    assert b.admit("perkey", "tenant-a", now=N + 2).allowed
    assert (
        keyset(b.prefix, b.policy("perkey"), "tenant-a").leases
        != keyset(b.prefix, b.policy("perkey"), "tenant-b").leases
    )


# -- heartbeat ---------------------------------------------------------------------------------------------


def test_heartbeat_renews_many_leases_in_one_call(
    b: taskgate.RedisBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, c, d = (b.admit("three", "k", now=N) for _ in range(3))
    assert a.allowed
    assert c.allowed
    assert d.allowed
    assert c.release() is True
    calls = count_scripts(b, monkeypatch)
    r = b.heartbeat([a.lease_id, c.lease_id, d.lease_id], now=N + 900)
    assert calls == ["heartbeat:none"]
    assert r.live == [a.lease_id, d.lease_id]
    assert r.reclaimed == [c.lease_id]  # released: not ours any more
    assert r.next_deadline == N + 1900
    # renewed: past the original TTL the slots are still held
    assert b.admit("three", "k", now=N + 1500).allowed  # c's slot
    assert not b.admit("three", "k", now=N + 1500).allowed  # a and d: renewed past their first TTL
    # at the new deadline they are gone: reported reclaimed, and a release then frees nothing
    r = b.heartbeat([a.lease_id, d.lease_id], now=N + 1900)
    assert (r.live, r.reclaimed) == ([], [a.lease_id, d.lease_id])
    assert a.release() is False
    assert no_key_without_ttl(b) == []


def test_heartbeat_keeps_a_lease_alive_past_its_ttl(b: taskgate.RedisBackend) -> None:
    a = b.admit("one", "k", now=N)
    for t in (800, 1600, 2400):
        r = b.heartbeat([a.lease_id], now=N + t)
        assert (r.live, r.reclaimed, r.next_deadline) == ([a.lease_id], [], N + t + 1000)
    late = b.admit("one", "k", now=N + 3000)  # 3x the TTL after acquiring: still held
    assert (late.allowed, late.decision.reset_at) == (False, N + 3400)
    assert b.release(a.lease_id, now=N + 3300) is True
    assert b.admit("one", "k", now=N + 3300).allowed


def test_heartbeat_groups_lease_sets(b: taskgate.RedisBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """Leases of several lease sets (per-key limits, several policies) renew in one call per set."""
    x = b.admit("perkey", "a", now=N)
    y = b.admit("perkey", "b", now=N)
    z = b.admit("two", "a", now=N)
    calls = count_scripts(b, monkeypatch)
    r = b.heartbeat([x.lease_id, y.lease_id, z.lease_id], now=N + 500)
    assert len(calls) == 3
    assert sorted(r.live) == sorted([x.lease_id, y.lease_id, z.lease_id])
    assert r.reclaimed == []
    r = b.heartbeat([x.lease_id, z.lease_id, y.lease_id], now=N + 1400)  # z was renewed to N + 1500 too
    assert (sorted(r.live), r.reclaimed) == (sorted([x.lease_id, y.lease_id, z.lease_id]), [])
    r = b.heartbeat([x.lease_id, y.lease_id], now=N + 2300)
    assert (r.live, r.reclaimed, r.next_deadline) == ([x.lease_id, y.lease_id], [], N + 3300)
    r = b.heartbeat([z.lease_id, x.lease_id], now=N + 2400)  # z was not renewed at N + 2300
    assert (r.live, r.reclaimed) == ([x.lease_id], [z.lease_id])


def test_reclaim_paths_keep_every_key_expiring(b: taskgate.RedisBackend) -> None:
    """Regression: counting a reclaimed lease (release after expiry, heartbeat after expiry, a reap before a
    cost denial) created the lease-meta hash without a TTL."""
    b.release(b.admit("one", "k", now=N).lease_id, now=N + 5000)
    assert no_key_without_ttl(b) == []
    b.heartbeat([b.admit("two", "k", now=N).lease_id], now=N + 5000)
    assert no_key_without_ttl(b) == []
    b.admit("costly", "k", now=N)
    b.debit("costly", "k", 20, now=N)
    assert b.admit("costly", "k", now=N + 5000).binding_axis == "cost"
    assert no_key_without_ttl(b) == []


# -- adaptive limit ----------------------------------------------------------------------------------------


def test_adaptive_limit_starts_at_max_and_follows_aimd(b: taskgate.RedisBackend) -> None:
    """Starts at maxLimit; a clean release adds 1/floor(lim), a dropped one multiplies by 0.75; clamped."""
    expected_limits = []
    lim = 8.0
    seen = []
    t = N
    for dropped in [True] * 6 + [False] * 12 + [True, False] * 3 + [False] * 40:
        a = b.admit("adapt", "k", now=t)
        assert a.allowed
        seen.append(a.decision.limit)
        expected_limits.append(math.floor(lim))
        assert a.release(dropped=dropped) is True
        lim = lim * 0.75 if dropped else lim + 1 / math.floor(lim)
        lim = min(8.0, max(2.0, lim))
        t += 10
    assert seen == expected_limits
    assert seen[:7] == [8, 6, 4, 3, 2, 2, 2]
    assert min(seen) == 2
    assert seen[-1] == 8


def test_the_adaptive_limit_caps_admission(b: taskgate.RedisBackend) -> None:
    for i in range(3):  # 8 -> 6 -> 4.5 -> 3.375
        b.admit("adapt", "k", now=N + i).release(dropped=True)
    held = [b.admit("adapt", "k", now=N + 10) for _ in range(4)]
    assert [a.allowed for a in held] == [True, True, True, False]
    assert [a.decision.limit for a in held] == [3, 3, 3, 3]


def test_pinned_limit_never_adapts(b: taskgate.RedisBackend) -> None:
    for i in range(5):
        a = b.admit("pinned", "k", now=N + i)
        assert a.decision.limit == 3
        a.release(dropped=True)
    assert [b.admit("pinned", "k", now=N + 10).allowed for _ in range(4)] == [True, True, True, False]


# -- waiters -----------------------------------------------------------------------------------------------


def test_denial_retry_after_spreads_waiters_by_mean_hold(b: taskgate.RedisBackend) -> None:
    """A denial's retry_after estimates when a slot frees: slots free at about ``limit`` per mean hold, so
    successive waiters are told to come back ``mean hold / limit`` apart, in the order they asked."""
    # no history yet: a guess shorter than the lease TTL, at least 10 ms
    b.admit("two", "fresh", now=N)
    b.admit("two", "fresh", now=N)
    guess = b.admit("two", "fresh", now=N).retry_after_ms
    assert 10 <= guess < 1000
    # establish a mean hold of 1000 ms, then 1200 ms (EWMA 0.8 / 0.2)
    b.release(b.admit("slow", "k", now=N).lease_id, now=N + 1000)
    meta = keyset(b.prefix, b.policy("slow"), "k").meta
    assert float(b.client.hget(meta, "hold") or "nan") == 1000
    b.release(b.admit("slow", "k", now=N + 1000).lease_id, now=N + 3000)
    assert float(b.client.hget(meta, "hold") or "nan") == pytest.approx(1200)
    held = [b.admit("slow", "k", now=N + 4000) for _ in range(2)]
    assert all(a.allowed for a in held)
    waits = [b.admit("slow", "k", now=N + 4000, holder=f"w{i}").retry_after_ms for i in range(3)]
    assert waits == [600, 1200, 1800]
    waiters = keyset(b.prefix, b.policy("slow"), "k").waiters
    # each lease holder gets a unique suffix: "<holder>.<random>"
    members = [m.decode() for m in b.client.zrange(waiters, 0, -1) if isinstance(m, bytes)]
    assert [m.split(".")[0] for m in members] == ["w0", "w1", "w2"]
    # the first waiter's time has come; a newcomer still queues behind the two already scheduled
    assert b.admit("slow", "k", now=N + 4600).retry_after_ms == 1800
    # a waiter that is granted leaves the waiters set
    held[0].release()
    assert b.admit("slow", "k", now=N + 5200, holder="w1").allowed
    assert b.client.zscore(waiters, "w1") is None
    assert no_key_without_ttl(b) == []


# -- asyncio twin ------------------------------------------------------------------------------------------


def test_async_admit_release_heartbeat(store_url: str, prefix: str) -> None:
    async def run() -> None:
        b = taskgate.connect_async(store_url, POLICIES, prefix=prefix)
        try:
            a = await b.admit("one", "k")  # real time: the admission's release uses the store's clock
            assert isinstance(a, taskgate.AsyncAdmission)
            assert a.allowed
            assert not (await b.admit("one", "k")).allowed
            r = await b.heartbeat([a.lease_id])
            assert r.live == [a.lease_id]
            async with a:
                assert taskgate.current() is a
            assert a.released
            assert await b.release(a.lease_id) is False
            assert (await b.admit("one", "k")).allowed
        finally:
            await b.aclose()

    asyncio.run(run())


def test_async_admission_releases_on_the_admit_clock(store_url: str, prefix: str) -> None:
    async def run() -> bool:
        b = taskgate.connect_async(store_url, POLICIES, prefix=prefix)
        try:
            a = await b.admit("one", "k", now=N)
            return await a.release()
        finally:
            await b.aclose()

    assert asyncio.run(run()) is True


# -- a holder that crashes ---------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time, taskgate
    url, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    b = taskgate.connect(url, {"crash": {"concurrency": {"maxLimit": n, "leaseTtl": "1s"}}}, prefix=prefix)
    held = [b.admit("crash", "k", heartbeat=True) for _ in range(n)]
    assert all(a.allowed for a in held), held
    print("held", flush=True)
    time.sleep(120)
    """
)


def test_a_killed_holders_slots_come_back_within_the_lease_ttl(redis_url: str, prefix: str) -> None:
    """A child process takes every slot (leaseTtl 1 s, heartbeat on) and is SIGKILLed: its slots are free
    again within the TTL (+ a small margin), and not before its last renewal's TTL has run."""
    n, ttl, margin = 3, 1.0, 0.3
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, redis_url, prefix, str(n)],
        stdout=subprocess.PIPE,
        text=True,
    )
    b = taskgate.connect(
        redis_url, {"crash": {"concurrency": {"maxLimit": n, "leaseTtl": "1s"}}}, prefix=prefix
    )
    got: list[taskgate.Admission] = []
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "held"
        time.sleep(1.5 * ttl)  # past the TTL: the child's heartbeat keeps its leases
        assert not b.admit("crash", "k").allowed
        os.kill(child.pid, signal.SIGKILL)
        killed = time.monotonic()
        child.wait(timeout=10)
        while len(got) < n and time.monotonic() - killed < 10 * ttl:
            a = b.admit("crash", "k")
            if a.allowed:
                got.append(a)
            else:
                time.sleep(0.005)
        freed = time.monotonic() - killed
        assert len(got) == n
        assert freed <= ttl + margin, f"slots came back {freed:.3f}s after the kill"
        assert freed >= ttl / 3, f"slots came back {freed:.3f}s after the kill: before the lease TTL ran"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        for a in got:
            a.release()
        b.close()


def test_a_stale_release_never_frees_the_same_holders_next_lease(b: taskgate.RedisBackend) -> None:
    first = b.admit("one", "tenant-a", now=N, holder="w1")
    assert b.release(first.lease_id, now=N) is True
    second = b.admit("one", "tenant-b", now=N, holder="w1")
    assert second.allowed
    assert b.release(first.lease_id, now=N) is False  # e.g. a retried release RPC
    assert not b.admit("one", "tenant-c", now=N).allowed
