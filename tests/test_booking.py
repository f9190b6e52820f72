"""Booking on a gcra rate axis: ``check(book=True)`` / ``admit(book=True)`` take the earliest future slot within
the policy's ``bookingHorizon`` and hand back a token; the token, presented at or after its slot, is admitted
once without paying rate again.

Explicit ``now`` on memory:// and the real Redis; one test books from many threads on the store's clock.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

import pytest

import taskgate
from taskgate.engine.keys import keyset
from taskgate.policy import load_policies

N = 1_700_000_040_000
T = 10  # the emission interval of 100/s, ms
HORIZON = 10_000
G = {"strategy": "gcra", "limit": 100, "period": "1s", "burst": 1, "bookingHorizon": "10s"}
POLICIES: dict[str, Any] = {
    "g": G,
    "ug": {**G, "concurrency": {"maxLimit": 2, "leaseTtl": "10s"}},
    "off": {**G, "bookingHorizon": 0},
    # slow enough that its keys' real-time TTLs outlive a loaded machine's scheduling hiccups
    "slow": {"strategy": "gcra", "limit": 1, "period": "10s", "burst": 1, "bookingHorizon": "1m"},
}


@pytest.fixture
def b(connect: Callable[[Any], taskgate.RedisBackend]) -> taskgate.RedisBackend:
    return connect(POLICIES)


def rate_state(b: taskgate.RedisBackend, policy: str, key: str) -> Any:
    """White-box: the raw gcra state (the TAT) of the key."""
    return b.client.get(keyset(b.prefix, b.policy(policy), key).rate)


def bookings(b: taskgate.RedisBackend, policy: str, key: str) -> Any:
    return b.client.zrange(keyset(b.prefix, b.policy(policy), key).bookings, 0, -1, withscores=True)


def book_one(b: taskgate.RedisBackend, policy: str = "g", key: str = "k") -> tuple[taskgate.Decision, int]:
    """Use the burst at N, then book at N: the slot is N + T."""
    assert b.check(policy, key, now=N).allowed
    d = b.check(policy, key, now=N, book=True)
    assert (d.allowed, d.booked, d.retry_after_ms) == (False, True, T)
    return d, N + d.retry_after_ms


def test_booking_horizon_defaults() -> None:
    p = load_policies({"a": {"strategy": "gcra", "limit": 1, "period": "1s"}, **POLICIES})
    assert p["a"].booking_horizon_ms == 60_000
    assert p["g"].booking_horizon_ms == HORIZON
    assert p["off"].booking_horizon_ms == 0


def test_a_thousand_callers_get_distinct_spaced_slots(b: taskgate.RedisBackend) -> None:
    """1,000 callers against 100/s (burst 1, horizon 10 s): each books its own slot, 10 ms after the last,
    none earlier than the limit allows; the 1,002nd would wait past the horizon and books nothing."""
    assert b.check("g", "k", now=N).allowed  # the burst
    slots, tokens = [], set()
    for i in range(1000):  # all at the same instant
        d = b.check("g", "k", now=N, book=True)
        assert (d.allowed, d.booked) == (False, True), i
        assert d.retry_after_ms > 0
        assert d.reset_at == N + T * (i + 2)
        slots.append(N + d.retry_after_ms)
        tokens.add(d.booking_token)
    assert len(tokens) == 1000
    assert "" not in tokens
    assert slots == [N + T * (i + 1) for i in range(1000)]
    # the next slot is past the horizon: nothing is booked, nothing consumed
    before = rate_state(b, "g", "k")
    late = b.check("g", "k", now=N, book=True)
    assert (late.allowed, late.booked, late.booking_token, late.retry_after_ms) == (
        False,
        False,
        "",
        1001 * T,
    )
    assert rate_state(b, "g", "k") == before
    assert len(bookings(b, "g", "k")) == 1000


def test_threaded_callers_on_the_store_clock(redis_url: str, prefix: str) -> None:
    """1,000 bookings from 8 threads on Redis TIME: distinct slots, at least the emission interval apart."""
    b = taskgate.connect(redis_url, POLICIES, prefix=prefix)
    out: list[taskgate.Decision] = []
    lock = threading.Lock()

    def caller() -> None:
        mine = [b.check("g", "k", book=True) for _ in range(125)]
        with lock:
            out.extend(mine)

    try:
        b.check("g", "k")
        threads = [threading.Thread(target=caller) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        booked = [d for d in out if d.booked]
        assert len(booked) >= 990  # (a caller may land on a free slot if the first ones ran slowly)
        slots = sorted(int(d.booking_token.split(".")[0]) for d in booked)
        assert len(set(slots)) == len(slots)
        assert all(y - x >= T for x, y in itertools.pairwise(slots))
    finally:
        b.close()


def test_presenting_the_token_at_its_slot_admits_without_paying(b: taskgate.RedisBackend) -> None:
    d, slot = book_one(b)
    before = (rate_state(b, "g", "k"), b.peek("g", "k", now=slot))
    ok = b.check("g", "k", now=slot, token=d.booking_token)
    assert (ok.allowed, ok.retry_after_ms, ok.booked, ok.booking_token) == (True, 0, False, "")
    assert (rate_state(b, "g", "k"), b.peek("g", "k", now=slot)) == before  # rate did not move
    assert bookings(b, "g", "k") == []
    # a second presentation is not free: at the slot the rate is full, so it is denied
    again = b.check("g", "k", now=slot, token=d.booking_token)
    assert not again.allowed


def test_a_used_token_pays_like_any_check(b: taskgate.RedisBackend) -> None:
    d, slot = book_one(b)
    assert b.check("g", "k", now=slot, token=d.booking_token).allowed
    later = N + 5000  # the rate has room again: the used token is admitted only by paying for it
    before = rate_state(b, "g", "k")
    assert b.check("g", "k", now=later, token=d.booking_token).allowed
    assert rate_state(b, "g", "k") != before


def test_presenting_early_is_denied_with_the_remaining_wait(b: taskgate.RedisBackend) -> None:
    d, slot = book_one(b)
    before = rate_state(b, "g", "k")
    early = b.check("g", "k", now=slot - 7, token=d.booking_token)
    assert (early.allowed, early.retry_after_ms, early.booked, early.booking_token) == (
        False,
        7,
        True,
        d.booking_token,
    )
    assert rate_state(b, "g", "k") == before
    assert b.check("g", "k", now=slot + 5, token=d.booking_token).allowed  # still valid, late is fine


def test_without_book_a_denial_books_nothing(b: taskgate.RedisBackend) -> None:
    assert b.check("g", "k", now=N).allowed
    before = rate_state(b, "g", "k")
    d = b.check("g", "k", now=N)
    assert (d.allowed, d.booked, d.booking_token, d.retry_after_ms) == (False, False, "", T)
    assert rate_state(b, "g", "k") == before
    assert bookings(b, "g", "k") == []
    off = [b.check("off", "k", now=N, book=True) for _ in range(2)]
    assert [(x.allowed, x.booked) for x in off] == [(True, False), (False, False)]


def test_an_unknown_token_is_a_plain_check(b: taskgate.RedisBackend) -> None:
    d = b.check("g", "k", now=N, token="1700000040010.1.1700000040000")
    assert (d.allowed, d.booked) == (True, False)


def test_booking_keys_expire(b: taskgate.RedisBackend) -> None:
    assert b.check("slow", "k", now=N).allowed
    d = b.check("slow", "k", now=N, book=True)
    assert (d.booked, d.retry_after_ms) == (True, 10_000)
    ks = keyset(b.prefix, b.policy("slow"), "k")
    assert 0 < b.client.pttl(ks.bookings) <= 10_000 + b.policy("slow").booking_grace_ms
    assert 0 < b.client.pttl(ks.rate) <= 2 * 10_000
    assert all(b.client.pttl(k) > 0 for k in b.client.scan_iter(match=f"{b.prefix}:*"))


def test_a_spent_token_without_book_books_nothing(b: taskgate.RedisBackend) -> None:
    d, slot = book_one(b)
    assert b.check("g", "k", now=slot, token=d.booking_token).allowed
    again = b.check("g", "k", now=slot, token=d.booking_token)
    assert (again.allowed, again.booked) == (False, False)


def test_check_refuses_a_token_past_its_grace(b: taskgate.RedisBackend) -> None:
    d, slot = book_one(b)
    late = slot + b.policy("g").booking_grace_ms + 1
    assert b.check("g", "k", now=late - 1).allowed  # the rate had room: a paid check at that time
    before = rate_state(b, "g", "k")
    assert not b.check("g", "k", now=late, token=d.booking_token).allowed
    assert rate_state(b, "g", "k") == before


# -- booking through admit ---------------------------------------------------------------------------------


def test_admit_books_and_redeems(b: taskgate.RedisBackend) -> None:
    first = b.admit("ug", "k", now=N)
    assert first.allowed
    bk = b.admit("ug", "k", now=N, book=True)
    assert (bk.allowed, bk.booked, bk.binding_axis, bk.retry_after_ms, bk.held) == (
        False,
        True,
        "rate",
        T,
        False,
    )
    assert bk.booking_token
    assert not b.admit("ug", "k", now=N + 5, booking_token=bk.booking_token).allowed  # early
    before = rate_state(b, "ug", "k")
    ok = b.admit("ug", "k", now=N + T, booking_token=bk.booking_token)
    assert (ok.allowed, ok.binding_axis, ok.held) == (True, "concurrency", True)
    assert rate_state(b, "ug", "k") == before  # not charged again
    again = b.admit("ug", "k", now=N + T, booking_token=bk.booking_token)
    assert (again.allowed, again.binding_axis, again.booked) == (False, "rate", False)


def test_admit_keeps_the_token_when_another_axis_denies(b: taskgate.RedisBackend) -> None:
    """A valid token that meets a full concurrency limit is not spent: nothing is consumed on a denial."""
    first = b.admit("ug", "k", now=N)
    bk = b.admit("ug", "k", now=N, book=True)
    other = b.admit("ug", "other", now=N)
    assert first.allowed
    assert other.allowed  # both slots taken
    d = b.admit("ug", "k", now=N + T, booking_token=bk.booking_token)
    assert (d.allowed, d.binding_axis) == (False, "concurrency")
    assert len(bookings(b, "ug", "k")) == 1
    assert other.release()
    assert b.admit("ug", "k", now=N + T + 1, booking_token=bk.booking_token).allowed
    assert bookings(b, "ug", "k") == []


def test_admit_refuses_a_token_past_its_grace(b: taskgate.RedisBackend) -> None:
    """Regression: op_admit pruned tokens older than valid_at + bookingGrace only when a new booking was
    made, so a token presented long after its slot was redeemed for free whenever no one had booked since."""
    b.admit("ug", "k", now=N)
    bk = b.admit("ug", "k", now=N, book=True)
    late = N + T + b.policy("ug").booking_grace_ms + 1
    assert b.admit("ug", "k", now=late - 1).release()  # the rate had room: a paid admission then
    d = b.admit("ug", "k", now=late, booking_token=bk.booking_token)
    assert (d.allowed, d.binding_axis) == (False, "rate")
    ok = b.admit("ug", "k", now=late + T, booking_token=bk.booking_token)
    assert ok.allowed  # ... and paid for
    assert not b.admit("ug", "k", now=late + T).allowed
