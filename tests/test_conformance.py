"""One conformance suite for every door, so their surfaces cannot drift: the direct Redis door on the real
Redis, the embedded ``memory://`` store, and the gRPC door to a real ``taskgate serve`` subprocess (over the
real Redis), each on both sides — the sync door and its asyncio twin (driven from this suite's sync code by
:class:`Blocking`). The service cannot take ``now=``, so this suite runs on the store's clock for every door:
long periods make the outcomes independent of timing, and the one timed test (lease reclaim) polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import taskgate
from taskgate.server.testing import ServerProcess, free_port
from tests.conftest import require

REDIS_URL = "redis://127.0.0.1:6379/10"
DOORS = ["memory", "redis", "service"]
SIDES = ["sync", "async"]
POLICIES = """
version: 1
limiters:
  burst: {strategy: gcra, limit: 5, period: 1h, burst: 5}
  pool: {concurrency: {maxLimit: 1, perKey: true, leaseTtl: 1s}}
  budget: {tokenBudget: {budget: 100, window: 1d}}
  unified:
    strategy: gcra
    limit: 2
    period: 1h
    burst: 2
    concurrency: {maxLimit: 1, perKey: true, leaseTtl: 30s}
    tokenBudget: {budget: 1000, window: 1d}
"""


def _redis_up() -> bool:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
        return True
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def _unlink_prefix(prefix: str) -> None:
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        r.unlink(*keys)
    r.close()


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("conformance") / "policies.yaml"
    path.write_text(POLICIES)
    return path


@pytest.fixture(scope="module")
def server(policy_file: Path) -> Iterator[ServerProcess]:
    require(_redis_up(), f"Redis at {REDIS_URL}", "start redis-server on 127.0.0.1:6379")
    prefix = f"tgc{uuid.uuid4().hex[:10]}"
    with ServerProcess("--config", str(policy_file), "--redis", REDIS_URL, "--prefix", prefix) as srv:
        yield srv
    _unlink_prefix(prefix)


class Blocking:
    """An asyncio door, or an admission or reservation it returned, driven from sync code: each coroutine it
    returns runs to its end on the door's event loop, in one context for the whole test (an ``async with``
    sets and resets ``taskgate.current()`` there: read it with :func:`current`)."""

    def __init__(self, target: Any, runner: Any, ctx: contextvars.Context) -> None:
        self.target, self._runner, self._ctx = target, runner, ctx

    def run(self, value: Any) -> Any:
        if inspect.isawaitable(value):
            value = self._runner.run(value, context=self._ctx)
        if isinstance(value, taskgate.AsyncAdmission | taskgate.AsyncReservation):
            return Blocking(value, self._runner, self._ctx)
        return value

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.target, name)
        if not callable(value):
            return value
        return lambda *args, **kw: self.run(value(*args, **kw))

    def __enter__(self) -> Any:
        return self.run(self.target.__aenter__())

    def __exit__(self, *exc: Any) -> None:
        self.run(self.target.__aexit__(*exc))

    def current(self) -> Any:
        return self._ctx.run(taskgate.current)


def _runner() -> Any:
    """An event loop that runs coroutines in a given context (``asyncio.Runner``, Python 3.11+)."""
    if sys.version_info >= (3, 11):
        return asyncio.Runner()
    require(
        False, "asyncio.Runner (Python 3.11+)", "run the suite on Python 3.11 or later"
    )  # pragma: no cover


def unwrap(x: Any) -> Any:
    return x.target if isinstance(x, Blocking) else x


def current(door: Any) -> Any:
    """``taskgate.current()`` as the door's side sees it."""
    return door.current() if isinstance(door, Blocking) else taskgate.current()


def admission_type(door: Any) -> type:
    return taskgate.AsyncAdmission if isinstance(door, Blocking) else taskgate.Admission


@pytest.fixture(params=[(d, s) for d in DOORS for s in SIDES], ids="-".join)
def door(request: pytest.FixtureRequest, policy_file: Path) -> Iterator[Any]:
    """A fresh door of each kind, on each side; tests isolate themselves with fresh keys."""
    kind, side = request.param
    with _door(request, policy_file, kind, side) as b:
        yield b


@pytest.fixture(params=DOORS)
def twins(request: pytest.FixtureRequest, policy_file: Path) -> Iterator[list[Any]]:
    """Both sides of a door of each kind, for a test that waits on the clock: the sides wait at once."""
    with (
        _door(request, policy_file, request.param, "sync") as b,
        _door(request, policy_file, request.param, "async") as a,
    ):
        yield [b, a]


@contextlib.contextmanager
def _door(request: pytest.FixtureRequest, policy_file: Path, kind: str, side: str) -> Iterator[Any]:
    connect: Any = taskgate.connect if side == "sync" else taskgate.connect_async
    if kind == "memory":
        b: Any = connect(f"memory://{uuid.uuid4().hex}", str(policy_file))
        prefix = ""
    elif kind == "redis":
        require(_redis_up(), f"Redis at {REDIS_URL}", "start redis-server on 127.0.0.1:6379")
        prefix = f"tgr{uuid.uuid4().hex[:10]}"
        b = connect(REDIS_URL, str(policy_file), prefix=prefix)
    else:
        srv: ServerProcess = request.getfixturevalue("server")
        b = connect(srv.url, timeout=5.0)
        prefix = ""
    if side == "sync":
        yield b
        b.close()
    else:
        with _runner() as runner:
            yield Blocking(b, runner, contextvars.copy_context())
            runner.run(b.aclose())
    if prefix:
        _unlink_prefix(prefix)


def fresh() -> str:
    return uuid.uuid4().hex


# --- decisions ---------------------------------------------------------------------------------------------


def test_burst_then_deny(door: Any) -> None:
    k = fresh()
    ds = [door.check("burst", k) for _ in range(6)]
    assert [d.allowed for d in ds] == [True] * 5 + [False]
    assert [d.remaining for d in ds] == [4, 3, 2, 1, 0, 0]
    assert all(d.limit == 5 for d in ds)
    assert all(d.retry_after_ms == 0 for d in ds[:5])
    assert 0 < ds[5].retry_after_ms <= 720_000  # one emission interval of 1h / 5
    assert isinstance(ds[5], taskgate.Decision)
    assert not ds[5]


def test_keys_are_independent(door: Any) -> None:
    a, b = fresh(), fresh()
    for _ in range(5):
        door.check("burst", a)
    assert not door.check("burst", a).allowed
    assert door.check("burst", b).remaining == 4


def test_cost_counts(door: Any) -> None:
    k = fresh()
    assert door.check("burst", k, 3).remaining == 2
    assert not door.check("burst", k, 3).allowed
    assert door.check("burst", k, 2).allowed


def test_peek_does_not_consume(door: Any) -> None:
    k = fresh()
    assert door.peek("burst", k).remaining == 5
    door.check("burst", k)
    for _ in range(3):
        p = door.peek("burst", k)
        assert p.allowed
        assert p.remaining == 4
    assert door.check("burst", k).remaining == 3


def test_forecast(door: Any) -> None:
    k = fresh()
    assert door.forecast("burst", k).spendable_now == 5
    before = int(time.time() * 1000)
    for _ in range(5):
        door.check("burst", k)
    f = door.forecast("burst", k)
    assert isinstance(f, taskgate.Forecast)
    assert f.spendable_now == 0
    assert before < f.next_replenish_at <= f.full_at
    assert f.full_at - before <= 3_600_000 + 5_000


def test_debit_crossing(door: Any) -> None:
    k = fresh()
    first, crossing, after = (
        door.debit("budget", k, 80),
        door.debit("budget", k, 50),
        door.debit("budget", k, 1),
    )
    assert (first.allowed, first.remaining, first.limit) == (True, 20, 100)
    assert (crossing.allowed, crossing.remaining) == (True, 0)  # the crossing debit counts in full
    assert not after.allowed
    assert after.retry_after_ms > 0


def test_check_many_keeps_input_order(door: Any) -> None:
    a, b, c = fresh(), fresh(), fresh()
    for _ in range(5):
        door.check("burst", b)
    ds = door.check_many("burst", [a, b, c, a])
    assert [d.allowed for d in ds] == [True, False, True, True]
    assert [d.remaining for d in ds] == [4, 0, 4, 3]


def test_reset_forgets_the_key(door: Any) -> None:
    k = fresh()
    for _ in range(5):
        door.check("burst", k)
    assert not door.check("burst", k).allowed
    door.reset("burst", k)
    assert door.check("burst", k).remaining == 4


def test_reserve_then_settle_refunds(door: Any) -> None:
    k = fresh()
    r = door.reserve("budget", k, 30)
    assert r.allowed
    assert r.id
    assert door.debit("budget", k, 1).remaining == 69  # 30 held in escrow
    s = r.settle(10)
    assert isinstance(s, taskgate.Settlement)
    assert s.refunded == 20
    assert door.debit("budget", k, 1).remaining == 88


# --- admission ---------------------------------------------------------------------------------------------


def test_admit_release_heartbeat(door: Any) -> None:
    k = fresh()
    a = door.admit("pool", k)
    assert isinstance(unwrap(a), admission_type(door))
    assert a.allowed
    assert a.held
    assert a.lease_id
    assert a.lease_expires_at > 0
    second = door.admit("pool", k)
    assert not second.allowed
    assert second.binding_axis == "concurrency"
    assert not second.held
    assert second.retry_after_ms > 0
    hb = door.heartbeat([a.lease_id])
    assert hb.live == [a.lease_id]
    assert hb.reclaimed == []
    assert hb.next_deadline >= a.lease_expires_at
    assert a.release() is True
    assert a.release() is False  # idempotent
    assert door.release(a.lease_id) is False
    with door.admit("pool", k) as b:
        assert b.allowed
        assert unwrap(current(door)) is unwrap(b)
    assert not b.held
    assert door.admit("pool", k).allowed


def test_abandoned_slot_is_reclaimed_after_its_lease(twins: list[Any]) -> None:
    keys = [fresh() for _ in twins]
    abandoned = [
        door.admit("pool", k) for door, k in zip(twins, keys, strict=True)
    ]  # never released, never renewed
    assert all(a.allowed for a in abandoned)
    assert not any(door.admit("pool", k).allowed for door, k in zip(twins, keys, strict=True))
    deadline = time.monotonic() + 5.0
    again: dict[int, Any] = {}
    while len(again) < len(twins):
        for i, (door, k) in enumerate(zip(twins, keys, strict=True)):
            if i not in again and (a := door.admit("pool", k)).allowed:
                again[i] = a
                assert int(time.time() * 1000) >= abandoned[i].lease_expires_at - 50
        assert time.monotonic() < deadline, "the abandoned slot was never reclaimed"
        time.sleep(0.1)
    for i, door in enumerate(twins):
        hb = door.heartbeat([abandoned[i].lease_id, again[i].lease_id])
        assert hb.reclaimed == [abandoned[i].lease_id]
        assert hb.live == [again[i].lease_id]
        assert door.release(abandoned[i].lease_id) is False  # a late release frees nothing
        assert again[i].release() is True


def test_binding_axis_on_a_unified_policy(door: Any) -> None:
    k = fresh()
    held = door.admit("unified", k, tokens=600)  # rate 1/2, slot 1/1, 600 of 1000 tokens in escrow
    assert held.allowed
    assert held.reserved_tokens == 600
    assert door.admit("unified", k, tokens=1).binding_axis == "concurrency"
    held.release()  # unsettled escrow stays charged: 400 tokens left
    denied = door.admit("unified", k, tokens=600)
    assert not denied.allowed
    assert denied.binding_axis == "cost"
    ok = door.admit("unified", k, tokens=1)  # the cost denial consumed no rate: this is 2/2
    assert ok.allowed
    ok.release()
    limited = door.admit("unified", k, tokens=1)
    assert not limited.allowed
    assert limited.binding_axis == "rate"
    assert limited.retry_after_ms > 0


def test_admission_knows_the_accounting_mode(door: Any) -> None:
    with door.admit("budget", fresh(), tokens=10) as a:
        assert a.accounting == "escrow"
        assert a.reservation_id
        s = a.settle(4)
        assert isinstance(s, taskgate.Settlement)
        assert s.refunded == 6


# --- errors: one mapping per door --------------------------------------------------------------------------


BAD_CALLS: dict[str, tuple[type[Exception], Any]] = {
    "unknown policy": (taskgate.PolicyNotFoundError, lambda b: b.check("nope", "k")),
    "check without a rate axis": (taskgate.OperationNotSupportedError, lambda b: b.check("pool", "k")),
    "admit on a rate limiter": (taskgate.OperationNotSupportedError, lambda b: b.admit("burst", "k")),
    "debit without a budget": (taskgate.OperationNotSupportedError, lambda b: b.debit("burst", "k", 1)),
    "empty key": (ValueError, lambda b: b.check("burst", "")),
    "key over 1 KiB": (ValueError, lambda b: b.check("burst", "x" * 1025)),
    "cost above the burst": (ValueError, lambda b: b.check("burst", "k", 6)),
    "cost 0": (ValueError, lambda b: b.check("burst", "k", 0)),
    "negative cost": (ValueError, lambda b: b.check("burst", "k", -1)),
    "debit 0 tokens": (ValueError, lambda b: b.debit("budget", "k", 0)),
    "1001 keys": (ValueError, lambda b: b.check_many("burst", [str(i) for i in range(1001)])),
    "malformed lease id": (ValueError, lambda b: b.release("not-a-lease")),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_error_mapping(door: Any, case: str) -> None:
    exc, call = BAD_CALLS[case]
    with pytest.raises(exc) as info:
        call(door)
    assert str(info.value)  # says what is wrong
    if exc is ValueError:
        assert not isinstance(info.value, taskgate.TaskgateError)


def test_unknown_policy_is_also_a_key_error(door: Any) -> None:
    with pytest.raises(KeyError, match="nope"):
        door.peek("nope", "k")


def test_a_key_of_exactly_1_kib_is_fine(door: Any) -> None:
    assert door.check("burst", "é" * 512).allowed  # 1024 bytes in UTF-8


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("kind", ["redis", "service"])
def test_unreachable_store_or_service(kind: str, side: str, policy_file: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/10" if kind == "redis" else f"grpc://127.0.0.1:{free_port()}"
    where = f"127.0.0.1:{url.rsplit(':', 1)[1][:4]}"
    if side == "sync":
        b: Any = taskgate.connect(url, str(policy_file))
        try:
            with pytest.raises(taskgate.BackendUnavailableError, match=where):
                b.check("burst", "k")
        finally:
            b.close()
        return

    async def go() -> None:
        a: Any = taskgate.connect_async(url, str(policy_file))
        try:
            with pytest.raises(taskgate.BackendUnavailableError, match=where):
                await a.check("burst", "k")
        finally:
            await a.aclose()

    asyncio.run(go())
