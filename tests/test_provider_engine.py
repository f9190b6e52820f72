"""report(): what a provider said, applied by the engine fleet-wide (lua/op_report.lua, lua/provider.lua).

Decisions use an explicit ``now`` on memory://, the real Redis and a Redis Cluster (the ``connect`` fixture).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

import pytest

import taskgate
from taskgate.errors import InvalidPolicyError, OperationNotSupportedError, PolicyNotFoundError
from taskgate.policy import ProviderSpec, parse_policy

N = 1_700_000_040_000
MIN = 60_000
POLICIES: dict[str, Any] = {
    "rate": {"strategy": "gcra", "limit": 100, "period": "1s", "burst": 100, "bookingHorizon": 0},
    "llm": {
        "strategy": "gcra",
        "limit": 100,
        "period": "1s",
        "burst": 100,
        "bookingHorizon": 0,
        "concurrency": {"minLimit": 1, "maxLimit": 8, "perKey": True, "leaseTtl": "30s"},
        "tokenBudget": {"budget": 1000, "windowMs": "1m"},
        "provider": {"maxHold": "10m"},
    },
    "pinned": {"concurrency": {"maxLimit": 4}},
}


@pytest.fixture
def b(connect: Callable[[Any], taskgate.RedisBackend]) -> taskgate.RedisBackend:
    return connect(POLICIES)


def test_a_429_holds_the_key_for_every_worker_until_retry_after(
    b: taskgate.RedisBackend, connect: Callable[[Any], taskgate.RedisBackend]
) -> None:
    other = connect(POLICIES)  # another worker process: its own client, the same store
    r = b.report("rate", "acme", status=429, retry_after=2, now=N)
    assert (r.hold_until, r.retry_after_ms, r.capped, r.rate_limited) == (N + 2000, 2000, False, 1)
    d = other.check("rate", "acme", now=N + 1)
    assert (d.allowed, d.retry_after_ms, d.reset_at, d.remaining) == (False, 1999, N + 2000, 0)
    assert other.peek("rate", "acme", now=N + 1500).retry_after_ms == 500
    assert other.check("rate", "zeta", now=N + 1).allowed  # another key is not held
    many = other.check_many("rate", ["zeta", "acme"], now=N + 3)
    assert [m.allowed for m in many] == [True, False]
    assert many[1].retry_after_ms == 1997
    assert other.check("rate", "acme", now=N + 1999).allowed is False
    assert other.check("rate", "acme", now=N + 2000).allowed


def test_admit_is_denied_by_the_provider_axis_and_touches_nothing(b: taskgate.RedisBackend) -> None:
    b.report("llm", "acme", {"Retry-After": "5"}, status=429, now=N)
    adm = b.admit("llm", "acme", tokens=10, now=N + 1000)
    assert (adm.allowed, adm.binding_axis, adm.retry_after_ms, adm.decision.reset_at) == (
        False,
        "provider",
        4000,
        N + 5000,
    )
    assert not adm.lease_id
    assert b.forecast("llm", "acme", now=N + 1000).spendable_now == 100  # no rate unit consumed
    with b.admit("llm", "acme", tokens=10, now=N + 5000) as ok:
        assert ok.allowed


def test_a_hold_is_capped_by_the_policy_with_a_warning(
    b: taskgate.RedisBackend, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="taskgate"):
        r = b.report("llm", "acme", status=429, retry_after=7200, now=N)
    assert (r.hold_until, r.capped) == (N + 600_000, True)
    assert "capped at provider.maxHold 600s" in caplog.text
    r = b.report("rate", "acme", status=429, retry_after=7200, now=N)  # default maxHold: 1 h
    assert r.hold_until == N + 3_600_000


def test_a_hold_is_never_shortened_by_a_later_report(b: taskgate.RedisBackend) -> None:
    b.report("rate", "acme", status=429, retry_after=10, now=N)
    r = b.report("rate", "acme", status=429, retry_after=1, now=N + 100)
    assert r.hold_until == N + 10_000
    assert r.rate_limited == 2
    assert not b.check("rate", "acme", now=N + 5000).allowed


def test_reported_limits_pace_the_key(b: taskgate.RedisBackend) -> None:
    headers = {
        "x-ratelimit-limit-requests": "60",  # per minute: one a second
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "58s",
    }
    r = b.report("rate", "acme", headers, now=N)
    # burst: the most remaining seen + 1 (a per-minute limit is enforced in smaller buckets)
    assert (r.hold_until, r.provider_limit, r.pacing_interval_ms, r.pacing_burst) == (0, 60, 1000.0, 3)
    assert [b.check("rate", "acme", now=N).allowed for _ in range(3)] == [True, True, False]
    # denied callers are given return times one interval apart (not all at once)
    waits = [b.check("rate", "acme", now=N).retry_after_ms for _ in range(3)]
    assert waits == [2000, 3000, 4000]
    assert b.check("rate", "acme", now=N).limit == 3
    assert b.check("rate", "acme", now=N + 1000).allowed
    assert not b.check("rate", "acme", now=N + 1000).allowed
    # a later, higher remaining (the provider has not counted the calls in flight) never raises ours
    r = b.report("rate", "acme", {**headers, "x-ratelimit-remaining-requests": "50"}, now=N + 1000)
    assert r.pacing_burst == 51
    assert not b.check("rate", "acme", now=N + 1000).allowed
    # the limit halves: the interval doubles
    halved = {**headers, "x-ratelimit-limit-requests": "30", "x-ratelimit-remaining-requests": "0"}
    r = b.report("rate", "acme", halved, now=N + 2000)
    assert (r.provider_limit, r.pacing_interval_ms, r.pacing_burst) == (30, 2000.0, 1)
    assert r.hold_until == N + 4000  # remaining 0: held for one interval (not until the 58 s reset)
    assert not b.check("rate", "acme", now=N + 3999).allowed
    assert b.check("rate", "acme", now=N + 10_000).allowed
    assert not b.check("rate", "acme", now=N + 10_000).allowed
    assert b.check("rate", "acme", now=N + 12_000).allowed


def test_a_raised_limit_gives_return_slots_at_the_new_pace_from_now(b: taskgate.RedisBackend) -> None:
    per_min = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0"}
    b.report("rate", "acme", per_min, now=N)  # one a second, nothing left
    assert [b.check("rate", "acme", now=N).retry_after_ms for _ in range(4)] == [1000, 2000, 3000, 4000]
    # the provider doubles the limit: the next callers denied are not queued behind the slots handed out
    # at the old pace (the fleet would run at the old rate until they are used) but paced at the new one
    b.report("rate", "acme", {**per_min, "x-ratelimit-limit-requests": "120"}, now=N + 100)
    r = b.report(
        "rate",
        "acme",
        {**per_min, "x-ratelimit-limit-requests": "120", "x-ratelimit-remaining-requests": "30"},
        now=N + 100,
    )
    assert r.pacing_burst == 2  # until the old slots are past (N + 4000), no burst is banked
    waits = [b.check("rate", "acme", now=N + 100).retry_after_ms for _ in range(3)]
    assert waits == [500, 1000, 1500]
    # a lowered limit leaves the cursor as it is: the next slot is after those handed out (N + 2100)
    b.report("rate", "acme", {**per_min, "x-ratelimit-limit-requests": "60"}, now=N + 200)
    assert b.check("rate", "acme", now=N + 200).retry_after_ms == 1900
    # once every slot handed out at the lower pace is past, the burst is the most remaining seen + 1
    r = b.report("rate", "acme", {**per_min, "x-ratelimit-remaining-requests": "30"}, now=N + 10_000)
    assert r.pacing_burst == 31


def test_a_waiting_room_is_paced_without_return_slots(b: taskgate.RedisBackend) -> None:
    """A room is one queue: its head is promoted when the pacing next has a call; the return slots that
    spread a broker backlog would only delay it (each parked task would push the room's due time on)."""
    from taskgate.backends.waiting import WaitingRoom

    room = WaitingRoom(b)
    b.report(
        "rate", "acme", {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0"}, now=N
    )
    got = [room.enter("rate", "acme", f"t{i}", b"x", now=N) for i in range(5)]
    assert [e.status for e in got] == ["parked"] * 5
    assert got[0].retry_after_ms == 1000  # due when the pacing has its next call, whatever waits behind
    # promoted one a second (due the room's lead, 250 ms, before the next call of a plain gcra policy)
    p = room.promote("rate", "acme", now=N + 1000)
    assert ([t.task_id for t in p.tasks], p.next_due) == (["t0"], N + 2000 - room.lead_ms)
    p = room.promote("rate", "acme", now=N + 2000)
    assert ([t.task_id for t in p.tasks], p.next_due) == (["t1"], N + 3000 - room.lead_ms)


def test_return_slots_stop_at_the_horizon(b: taskgate.RedisBackend) -> None:
    b.report(
        "llm", "acme", {"x-ratelimit-limit-requests": "6000", "x-ratelimit-remaining-requests": "0"}, now=N
    )
    # 100 a second; the policy's horizon is 10 s by default, so return slots are handed out 10 ms apart up
    # to ~10 s ahead, and the callers after that are told to come back in 10 s and ask again
    waits = [b.admit("llm", "acme", now=N).retry_after_ms for _ in range(1100)]
    assert waits[:3] == [10, 20, 30]
    assert max(waits) == 10_000
    assert waits[998:1002] == [9990, 10_000, 10_000, 10_000]


def test_a_429_with_a_known_pacing_empties_it(b: taskgate.RedisBackend) -> None:
    b.report("rate", "acme", {"x-ratelimit-limit-requests": "600"}, now=N)  # 10 a second, burst 600
    assert b.check("rate", "acme", now=N).allowed
    b.report("rate", "acme", status=429, retry_after=0.5, now=N)
    assert not b.check("rate", "acme", now=N + 499).allowed
    assert b.check("rate", "acme", now=N + 500).allowed  # the hold is over and 5 intervals passed
    assert b.check("rate", "acme", now=N + 500).allowed
    assert b.check("rate", "acme", now=N + 500).allowed  # burst of (500 - 0) / 100 ms + 1 = 5 at most
    assert sum(b.check("rate", "acme", now=N + 500).allowed for _ in range(10)) == 2


def test_reported_tokens_lower_the_budget_never_raise_it(b: taskgate.RedisBackend) -> None:
    r = b.report("llm", "acme", {"anthropic-ratelimit-tokens-remaining": "100"}, now=N)
    assert r.budgets_lowered == 1
    assert not b.admit("llm", "acme", tokens=150, now=N + 1).allowed
    adm = b.admit("llm", "acme", tokens=150, now=N + 1)
    assert adm.binding_axis == "cost"
    with b.admit("llm", "acme", tokens=100, now=N + 2) as ok:
        assert ok.allowed
        ok.settle(100)
    r = b.report("llm", "acme", {"anthropic-ratelimit-tokens-remaining": "900"}, now=N + 3)
    assert r.budgets_lowered == 0
    assert not b.admit("llm", "acme", tokens=1, now=N + 4).allowed
    assert b.admit("llm", "acme", tokens=1, now=N + MIN).allowed  # the next window is whole again


def test_a_429_shrinks_adaptive_concurrency_for_all(b: taskgate.RedisBackend) -> None:
    limits = [b.report("llm", "acme", status=429, retry_after=0, now=N).concurrency_limit for _ in range(9)]
    assert limits == [6, 4, 3, 2, 1, 1, 1, 1, 1]  # 8 x 0.75 ..., floored, never below minLimit
    held = b.admit("llm", "acme", now=N + 1)
    assert held.allowed
    assert (b.admit("llm", "acme", now=N + 2).binding_axis) == "concurrency"
    assert b.release(held.lease_id, now=N + 3)  # a clean release grows it again (additive)
    assert b.report("llm", "acme", {}, now=N + 4).concurrency_limit == 2
    assert b.report("pinned", "acme", status=429, now=N).concurrency_limit == 4  # a pinned limit stays


def test_reset_forgets_the_hold(b: taskgate.RedisBackend) -> None:
    b.report("rate", "acme", status=429, retry_after=60, now=N)
    b.reset("rate", "acme")
    assert b.check("rate", "acme", now=N + 1).allowed


def test_bad_reports_say_what_is_wrong(b: taskgate.RedisBackend) -> None:
    with pytest.raises(ValueError, match="needs something the provider said"):
        b.report("rate", "acme")
    with pytest.raises(ValueError, match="status must be an HTTP status"):
        b.report("rate", "acme", status=42)
    with pytest.raises(ValueError, match="retry_after must be >= 0"):
        b.report("rate", "acme", status=429, retry_after=-3)
    with pytest.raises(PolicyNotFoundError, match="unknown policy 'nope'"):
        b.report("nope", "acme", status=429)
    with pytest.raises(ValueError, match="key must be a non-empty string"):
        b.report("rate", "", status=429)
    # garbage header values are ignored, never raised: nothing to act on, nothing done
    r = b.report("rate", "acme", {"Retry-After": "later", "x-ratelimit-limit-requests": "-4"}, now=N)
    assert (r.hold_until, r.provider_limit) == (0, 0)
    assert b.check("rate", "acme", now=N).allowed


def test_async_twin(store_url: str, prefix: str) -> None:
    async def go() -> None:
        ab = taskgate.connect_async(store_url, POLICIES, prefix=prefix)
        try:
            r = await ab.report("rate", "acme", status=429, retry_after=1, now=N)
            assert r.hold_until == N + 1000
            d = await ab.check("rate", "acme", now=N + 10)
            assert (d.allowed, d.retry_after_ms) == (False, 990)
        finally:
            await ab.aclose()

    asyncio.run(go())


class _Limited(Exception):
    """The shape of an SDK's RateLimitError (status 429, .response.headers)."""

    def __init__(self) -> None:
        super().__init__("429")
        self.status_code = 429
        self.response = type("R", (), {"headers": {"retry-after": "3"}, "status_code": 429})()


def test_async_admission_reports_an_sdk_error_and_report(store_url: str, prefix: str) -> None:
    async def go() -> None:
        ab = taskgate.connect_async(store_url, POLICIES, prefix=prefix)
        try:
            with pytest.raises(_Limited):
                async with await ab.admit("llm", "acme", now=N) as adm:
                    raise _Limited()
            assert adm.rate_limited is not None
            assert adm.rate_limited.hold_until == N + 3000
            d = await ab.admit("llm", "acme", now=N + 1000)
            assert (d.binding_axis, d.retry_after_ms) == ("provider", 2000)
            async with await ab.admit("llm", "other", now=N) as held:
                r = await held.report({"x-ratelimit-limit-requests": "60"})
                assert (r.provider_limit, r.pacing_interval_ms) == (60, 1000.0)
        finally:
            await ab.aclose()

    asyncio.run(go())


def test_the_service_door_says_report_needs_the_direct_door() -> None:
    pytest.importorskip("grpc")
    sb = taskgate.connect("grpc://127.0.0.1:9", POLICIES)
    with pytest.raises(OperationNotSupportedError, match="needs the direct door"):
        sb.report("rate", "acme", status=429)
    sb.close()


def test_policy_provider_options() -> None:
    p = parse_policy("x", {"concurrency": {"maxLimit": 2}})
    assert p.provider == ProviderSpec(3_600_000, 20, 10_000)
    given = {"maxHold": "5m", "maxDeferrals": 3, "horizon": "2s"}
    p = parse_policy("x", {"concurrency": {"maxLimit": 2}, "provider": given})
    assert p.provider == ProviderSpec(300_000, 3, 2000)
    for bad, field in [
        ({"maxHold": "0s"}, "provider.maxHold"),
        ({"maxHold": "2d"}, "provider.maxHold"),
        ({"maxDeferrals": -1}, "provider.maxDeferrals"),
        ({"horizon": "10ms"}, "provider.horizon"),
        ({"maxHOLD": "1m"}, "provider.maxHOLD"),
    ]:
        with pytest.raises(InvalidPolicyError, match=rf"policy 'x'.*{re.escape(field)}") as e:
            parse_policy("x", {"concurrency": {"maxLimit": 2}, "provider": bad})
        assert e.value.field == field
    with pytest.raises(InvalidPolicyError, match=r"'provider'.*a mapping"):
        parse_policy("x", {"concurrency": {"maxLimit": 2}, "provider": 5})


def test_counters_top_and_metrics_show_the_provider(b: taskgate.RedisBackend) -> None:
    from rich.console import Console

    from taskgate.metrics import families
    from taskgate.stats import read_snapshot
    from taskgate.top import render

    # on the store's clock (now=None): the counters are per second of it, and top reads it
    b.report("llm", "acme", {"x-ratelimit-limit-requests": "120"})
    first = b.report("llm", "acme", status=429, retry_after=30)
    assert b.report("llm", "acme", status=429, retry_after=20).hold_until == first.hold_until  # adds nothing
    assert b.admit("llm", "acme").binding_axis == "provider"
    b.flush_stats()  # on a cluster the counters are collected and sent later
    snap = read_snapshot(b.client, b.policies, b.prefix)
    p = snap.policy("llm")
    assert (p.totals.provider_429s, p.totals.provider_hold_ms, p.totals.denied_provider) == (2, 30_000, 1)
    assert p.binding_axis == "provider"
    (k,) = p.keys
    assert k.limit == 4  # 8 x 0.75 x 0.75, floored: the key's adaptive limit, fleet-wide
    assert (k.key, k.held_until, k.provider_limit, k.provider_rate) == ("acme", first.hold_until, 120, 2.0)
    console = Console(width=200, record=True)
    console.print(render(snap, "test"))
    text = console.export_text()
    assert "429s" in text
    assert "held " in text
    assert "2.0/s (reports 120); configured 100 (gcra)" in text
    metrics = {(s.name, s.labels.get("policy")): s.value for m in families(snap) for s in m.samples}
    assert metrics[("taskgate_provider_429s_total", "llm")] == 2
    assert metrics[("taskgate_provider_hold_seconds_total", "llm")] == 30.0
