"""The public surface: what ``taskgate`` exports, how bad arguments fail, the error tree at its edges, key
isolation, which store ``connect()`` picks, and the asyncio twin deciding exactly like the sync door."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis

import taskgate
import taskgate.admission
import taskgate.backends
import taskgate.errors
import taskgate.types

POLICIES: dict[str, Any] = {
    "gcra": {"strategy": "gcra", "limit": 10, "period": "1s", "burst": 3},
    "bucket": {"strategy": "tokenBucket", "capacity": 4, "refillPerSec": 2},
    "fixed": {"strategy": "fixedWindow", "limit": 5, "window": "1s"},
    "sliding": {"strategy": "slidingWindow", "limit": 6, "window": "1s", "buckets": 4},
    "log": {"strategy": "slidingWindowLog", "limit": 2, "window": "1s"},
    "slots": {"concurrency": {"maxLimit": 3}},
    "tokens": {"tokenBudget": {"budget": 100, "windowMs": 60_000}},
}
RATE = ["gcra", "bucket", "fixed", "sliding", "log"]
MAX_COST = {"gcra": 3, "bucket": 4, "fixed": 5, "sliding": 6, "log": 2}
NOW = 1_700_000_000_000
UNREACHABLE = "redis://:secretpw@127.0.0.1:1/0"  # nothing listens on port 1


@pytest.fixture
def mem(prefix: str) -> Iterator[taskgate.RedisBackend]:
    b = taskgate.connect(f"memory://{uuid.uuid4().hex}", POLICIES, prefix=prefix)
    assert isinstance(b, taskgate.RedisBackend)
    yield b
    b.close()


# --- the exported surface ------------------------------------------------------------------------------------


def test_all_is_complete_and_resolvable() -> None:
    assert len(set(taskgate.__all__)) == len(taskgate.__all__)
    for name in taskgate.__all__:
        assert getattr(taskgate, name) is not None, name
    defined_here = {
        name
        for name, obj in vars(taskgate).items()
        if not name.startswith("_")
        and not isinstance(obj, ModuleType)
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and (getattr(obj, "__module__", "") or "").startswith("taskgate")
    }
    assert defined_here <= set(taskgate.__all__), defined_here - set(taskgate.__all__)
    assert {"Decision", "Forecast", "Settlement", "Policy", "Policies", "__version__"} <= set(
        taskgate.__all__
    )
    namespace: dict[str, Any] = {}
    exec("from taskgate import *", namespace)
    assert set(taskgate.__all__) <= set(namespace)


@pytest.mark.parametrize(
    "module",
    [
        taskgate.errors,
        taskgate.backends,
        taskgate.admission,
    ],
    ids=lambda m: m.__name__,
)
def test_submodule_api_is_reexported(module: ModuleType) -> None:
    """What a user catches, gets back or annotates with is importable from ``taskgate`` itself."""
    missing = set(module.__all__) - set(taskgate.__all__)
    assert not missing, f"{module.__name__} exports {sorted(missing)}, taskgate does not"


def test_public_types_live_in_taskgate() -> None:
    types = [getattr(taskgate, n) for n in taskgate.__all__ if inspect.isclass(getattr(taskgate, n))]
    assert len(types) >= 10
    for cls in types:
        assert cls.__module__ == "taskgate", cls


def test_error_tree() -> None:
    assert issubclass(taskgate.InvalidPolicyError, ValueError)
    assert issubclass(taskgate.PolicyNotFoundError, KeyError)
    for err in (
        taskgate.InvalidPolicyError,
        taskgate.PolicyNotFoundError,
        taskgate.OperationNotSupportedError,
        taskgate.BackendUnavailableError,
        taskgate.ThrottledError,
    ):
        assert issubclass(err, taskgate.TaskgateError)


def test_decision_is_a_frozen_value(mem: taskgate.RedisBackend) -> None:
    d = mem.check("gcra", "k", now=NOW)
    assert bool(d) is d.allowed is True
    with pytest.raises(AttributeError):
        d.allowed = False  # type: ignore[misc]
    assert all(isinstance(getattr(d, f), int) for f in ("limit", "remaining", "reset_at", "retry_after_ms"))


# --- bad arguments: plain ValueError with a clear message, before any round trip -----------------------------


@pytest.mark.parametrize(
    ("cost", "says"),
    [(0, ">= 1"), (-1, ">= 1"), (True, "int"), (1.5, "int"), ("1", "int"), (None, "int")],
)
def test_bad_cost(mem: taskgate.RedisBackend, cost: Any, says: str) -> None:
    for call in (
        lambda: mem.check("gcra", "k", cost, now=NOW),
        lambda: mem.check_many("gcra", ["k"], cost, now=NOW),
        lambda: mem.forecast("gcra", "k", cost, now=NOW),
    ):
        with pytest.raises(ValueError, match="cost") as info:
            call()
        assert says in str(info.value)
        assert repr(cost) in str(info.value) or str(cost) in str(info.value)
    assert mem.peek("gcra", "k", now=NOW).remaining == 3  # nothing was consumed


@pytest.mark.parametrize("policy", RATE)
def test_cost_above_what_the_policy_can_ever_admit(mem: taskgate.RedisBackend, policy: str) -> None:
    top = MAX_COST[policy]
    assert mem.check(policy, "k", top, now=NOW).allowed  # the maximum itself is fine
    with pytest.raises(ValueError, match="never") as info:
        mem.check(policy, "k2", top + 1, now=NOW)
    assert_in(str(info.value), repr(policy), str(top + 1), f"at most {top}")
    with pytest.raises(ValueError, match="never"):
        mem.check_many(policy, ["k2"], top + 1, now=NOW)
    with pytest.raises(ValueError, match="never"):
        mem.forecast(policy, "k2", top + 1, now=NOW)


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("", "non-empty"),
        (None, "None"),
        (123, "123"),
        (b"bytes", "bytes"),
        ("x" * 1025, "1024 bytes"),
        ("é" * 513, "1024 bytes"),  # 513 characters, 1026 bytes of UTF-8
    ],
)
def test_bad_key(mem: taskgate.RedisBackend, key: Any, says: str) -> None:
    calls: list[Callable[[], object]] = [
        lambda: mem.check("gcra", key, now=NOW),
        lambda: mem.peek("gcra", key, now=NOW),
        lambda: mem.forecast("gcra", key, now=NOW),
        lambda: mem.check_many("gcra", ["ok", key], now=NOW),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="key") as info:
            call()
        assert says in str(info.value)
    assert mem.peek("gcra", "ok", now=NOW).remaining == 3  # check_many consumed nothing for the good key


def test_key_that_is_not_valid_unicode(mem: taskgate.RedisBackend) -> None:
    with pytest.raises(ValueError, match="key"):
        mem.check("gcra", "a\udcff", now=NOW)


def test_longest_key_is_fine(mem: taskgate.RedisBackend) -> None:
    assert mem.check("gcra", "x" * 1024, now=NOW).allowed
    assert mem.check("gcra", "€" * 341, now=NOW).allowed  # 1023 bytes


@pytest.mark.parametrize("now", [0, -5, "x", 1.5, True, float(NOW)])
def test_bad_now(mem: taskgate.RedisBackend, now: Any) -> None:
    for call in (
        lambda: mem.check("gcra", "k", now=now),
        lambda: mem.peek("gcra", "k", now=now),
        lambda: mem.forecast("gcra", "k", now=now),
        lambda: mem.check_many("gcra", ["k"], now=now),
    ):
        with pytest.raises(ValueError, match="now") as info:
            call()
        assert repr(now) in str(info.value)


def test_check_many_bounds(mem: taskgate.RedisBackend) -> None:
    with pytest.raises(ValueError, match="at most 1000 keys, got 1001"):
        mem.check_many("gcra", [f"k{i}" for i in range(1001)], now=NOW)
    with pytest.raises(ValueError, match="sequence of strings, got str"):
        mem.check_many("gcra", "abc", now=NOW)
    with pytest.raises(ValueError, match="sequence"):
        mem.check_many("gcra", {"a", "b"}, now=NOW)  # type: ignore[arg-type]
    assert mem.check_many("gcra", [], now=NOW) == []
    ds = mem.check_many("gcra", [f"k{i}" for i in range(1000)], now=NOW)
    assert len(ds) == 1000
    assert all(d.allowed and d.remaining == 2 for d in ds)


def test_bad_policy_argument(mem: taskgate.RedisBackend) -> None:
    with pytest.raises(ValueError, match="policy"):
        mem.check(None, "k", now=NOW)  # type: ignore[arg-type]


def test_bad_connect_arguments() -> None:
    with pytest.raises(ValueError, match="unsupported URL") as info:
        taskgate.connect("ftp://user:secretpw@host/", POLICIES)
    assert "secretpw" not in str(info.value)
    with pytest.raises(ValueError, match="url must be a string"):
        taskgate.connect(6379, POLICIES)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefix"):
        taskgate.connect("memory://", POLICIES, prefix="{x}")
    with pytest.raises(ValueError, match="prefix"):
        taskgate.connect("memory://", POLICIES, prefix="")


def test_unknown_policy_names_it_and_the_loaded_ones(mem: taskgate.RedisBackend) -> None:
    for call in (
        lambda: mem.check("nope", "k", now=NOW),
        lambda: mem.peek("nope", "k", now=NOW),
        lambda: mem.check_many("nope", ["k"], now=NOW),
        lambda: mem.forecast("nope", "k", now=NOW),
    ):
        with pytest.raises(taskgate.PolicyNotFoundError) as info:
            call()
        assert_in(str(info.value), "'nope'", *POLICIES)
        assert info.value.name == "nope"
    empty = taskgate.connect("memory://", None)
    with pytest.raises(taskgate.PolicyNotFoundError, match="loaded: none"):
        empty.check("nope", "k", now=NOW)


@pytest.mark.parametrize("policy", ["slots", "tokens"])
def test_rate_operations_on_a_policy_without_a_rate_axis(mem: taskgate.RedisBackend, policy: str) -> None:
    for op, call in (
        ("check", lambda: mem.check(policy, "k", now=NOW)),
        ("check_many", lambda: mem.check_many(policy, ["k"], now=NOW)),
        ("peek", lambda: mem.peek(policy, "k", now=NOW)),
        ("forecast", lambda: mem.forecast(policy, "k", now=NOW)),
    ):
        with pytest.raises(taskgate.OperationNotSupportedError) as info:
            call()
        assert_in(str(info.value), op, repr(policy), "admit")


# --- the store cannot be reached ------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [UNREACHABLE, "redis://alice:secretpw@127.0.0.1:1/0"])
def test_backend_unavailable_names_the_url_without_the_password(url: str) -> None:
    b = taskgate.connect(url, POLICIES, socket_connect_timeout=2)
    assert isinstance(b, taskgate.RedisBackend)
    assert "secretpw" not in repr(b)
    assert "secretpw" not in b.url
    for call in (
        lambda: b.check("gcra", "k", now=NOW),
        lambda: b.check_many("gcra", ["k"], now=NOW),
        lambda: b.peek("gcra", "k"),
        lambda: b.forecast("gcra", "k"),
        b.ping,
    ):
        with pytest.raises(taskgate.BackendUnavailableError) as info:
            call()
        msg = str(info.value)
        assert "secretpw" not in msg
        assert "127.0.0.1:1/0" in msg
        assert url.replace("secretpw", "***") in msg
        assert isinstance(info.value.__cause__, (redis.ConnectionError, OSError))
    with pytest.raises(ValueError, match="cost"):  # arguments are checked before any round trip
        b.check("gcra", "k", 0)
    b.close()


def test_backend_unavailable_async() -> None:
    async def go() -> str:
        b = taskgate.connect_async(UNREACHABLE, POLICIES, socket_connect_timeout=2)
        assert isinstance(b, taskgate.AsyncRedisBackend)
        try:
            with pytest.raises(taskgate.BackendUnavailableError) as info:
                await b.check("gcra", "k", now=NOW)
            return str(info.value)
        finally:
            await b.aclose()

    msg = asyncio.run(go())
    assert "redis://:***@127.0.0.1:1/0" in msg
    assert "secretpw" not in msg


# --- keys and policies are isolated ---------------------------------------------------------------------------

AWKWARD_KEYS = [
    "a",
    "a:x",
    "a:r",
    "x:a",
    "{a}",
    "{a",
    "a}",
    "a}:r",
    "}{",
    "%7Ba%7D",  # what '{a}' would become if braces were escaped without escaping '%'
    "%",
    "a%",
    "a\n",
    "a\nb",
    "\n",
    "a ",
    " a",
    "A",
    "*",
    "a*",
    "[a]",
    "a\x00",
    "é" * 512,  # 1 KiB of UTF-8
    "日本" * 170 + "a",  # 1021 bytes
    "🙂" * 256,  # 1 KiB of 4-byte characters
]


def test_awkward_keys_are_isolated_from_each_other(connect: Any) -> None:
    b = connect({"one": {"strategy": "fixedWindow", "limit": 1, "window": "1h"}})
    assert len(set(AWKWARD_KEYS)) == len(AWKWARD_KEYS)
    for key in AWKWARD_KEYS:  # if a key shared state with an earlier one, its first check would be denied
        assert b.check("one", key, now=NOW).allowed, key
        assert not b.check("one", key, now=NOW).allowed, key
    assert [d.allowed for d in b.check_many("one", AWKWARD_KEYS, now=NOW)] == [False] * len(AWKWARD_KEYS)
    fresh = sorted({k[:-1] + "~" for k in AWKWARD_KEYS} - set(AWKWARD_KEYS))
    assert all(d.allowed for d in b.check_many("one", fresh, now=NOW))


def test_policies_with_the_same_key_do_not_share_state(connect: Any) -> None:
    spec = {"strategy": "fixedWindow", "limit": 1, "window": "1h"}
    b = connect({"p": spec, "q": spec, "p.q": spec, "p-q": spec, "P": spec})
    for policy in ("p", "q", "p.q", "p-q", "P"):
        assert b.check(policy, "k", now=NOW).allowed, policy
        assert not b.check(policy, "k", now=NOW).allowed, policy


def test_prefixes_do_not_share_state(store_url: str, prefix: str) -> None:
    spec = {"one": {"strategy": "fixedWindow", "limit": 1, "window": "1h"}}
    with (
        taskgate.connect(store_url, spec, prefix=prefix) as a,
        taskgate.connect(store_url, spec, prefix=prefix + "b") as b,
    ):
        assert a.check("one", "k", now=NOW).allowed
        assert b.check("one", "k", now=NOW).allowed


# --- which store connect() picks ------------------------------------------------------------------------------


def exhaust(b: Any, key: str) -> None:
    assert b.check("one", key, now=NOW).allowed
    assert not b.check("one", key, now=NOW).allowed


ONE = {"one": {"strategy": "fixedWindow", "limit": 1, "window": "1h"}}


def test_memory_is_one_store_per_process_and_named_stores_are_separate(prefix: str) -> None:
    name = uuid.uuid4().hex
    a = taskgate.connect("memory://", ONE, prefix=prefix)
    exhaust(a, "k")
    for same in ("memory://", "memory:///"):
        assert not taskgate.connect(same, ONE, prefix=prefix).check("one", "k", now=NOW).allowed, same
    named = taskgate.connect(f"memory://{name}", ONE, prefix=prefix)
    exhaust(named, "k")
    assert not taskgate.connect(f"memory://{name}", ONE, prefix=prefix).check("one", "k", now=NOW).allowed
    assert taskgate.connect(f"memory://{name}x", ONE, prefix=prefix).check("one", "k", now=NOW).allowed


def test_connect_without_url_uses_memory(monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    monkeypatch.delenv("TASKGATE_URL", raising=False)
    b = taskgate.connect(policies=ONE, prefix=prefix)
    assert isinstance(b, taskgate.RedisBackend)
    assert b.url == "memory://"
    exhaust(b, "k")
    assert not taskgate.connect("memory://", ONE, prefix=prefix).check("one", "k", now=NOW).allowed
    monkeypatch.setenv("TASKGATE_URL", "")
    assert taskgate.connect(policies=ONE).url == "memory://"


def test_connect_without_url_uses_taskgate_url(monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    url = f"memory://{uuid.uuid4().hex}"
    monkeypatch.setenv("TASKGATE_URL", url)
    b = taskgate.connect(policies=ONE, prefix=prefix)
    assert b.url == url
    exhaust(b, "k")
    assert not taskgate.connect(url, ONE, prefix=prefix).check("one", "k", now=NOW).allowed
    assert taskgate.connect("memory://", ONE, prefix=prefix).check("one", "k", now=NOW).allowed
    assert taskgate.connect_async(policies=ONE).url == url
    monkeypatch.setenv("TASKGATE_URL", UNREACHABLE)
    unreachable = taskgate.connect(policies=ONE)
    assert unreachable.url == "redis://:***@127.0.0.1:1/0"
    with pytest.raises(taskgate.BackendUnavailableError):
        unreachable.check("one", "k")


def test_connect_to_redis_from_taskgate_url(
    monkeypatch: pytest.MonkeyPatch, redis_url: str, prefix: str
) -> None:
    monkeypatch.setenv("TASKGATE_URL", redis_url)
    with taskgate.connect(policies=ONE, prefix=prefix) as b:
        assert isinstance(b, taskgate.RedisBackend)
        assert b.url == redis_url
        exhaust(b, "k")
        assert b.client.exists(f"{prefix}:{{one:k}}:r") == 1


def test_connect_without_policies_uses_taskgate_policies(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text(
        "version: 1\nlimiters:\n  api: {strategy: gcra, limit: 5, period: 1s}\n", encoding="utf-8"
    )
    monkeypatch.setenv("TASKGATE_POLICIES", str(path))
    assert list(taskgate.connect("memory://").policies) == ["api"]
    assert list(taskgate.connect("memory://", ONE).policies) == ["one"]  # explicit policies win


# --- the asyncio twin -----------------------------------------------------------------------------------------


def script(b: Any, now: int) -> list[tuple[str, Any]]:
    """The same sequence, as (name, callable returning a result or an awaitable)."""
    ops: list[tuple[str, Any]] = []
    for policy in RATE:
        top = MAX_COST[policy]
        for i in range(6):
            t = now + i * 137
            ops.append((f"{policy} check {i}", lambda p=policy, t=t: b.check(p, "k", 1, now=t)))
            ops.append((f"{policy} peek {i}", lambda p=policy, t=t: b.peek(p, "k", now=t)))
            ops.append((f"{policy} forecast {i}", lambda p=policy, t=t, c=top: b.forecast(p, "k", c, now=t)))
            ops.append(
                (f"{policy} many {i}", lambda p=policy, t=t: b.check_many(p, ["k", "j", "k"], 1, now=t))
            )
            ops.append((f"{policy} big {i}", lambda p=policy, t=t, c=top: b.check(p, "j", c, now=t)))
    return ops


def test_async_twin_decides_like_the_sync_door(store_url: str, prefix: str) -> None:
    sync = taskgate.connect(store_url, POLICIES, prefix=prefix + "s")
    sync_results = [(name, call()) for name, call in script(sync, NOW)]
    sync.close()

    async def replay() -> list[tuple[str, Any]]:
        b = taskgate.connect_async(store_url, POLICIES, prefix=prefix + "a")
        try:
            return [(name, await call()) for name, call in script(b, NOW)]
        finally:
            await b.aclose()

    async_results = asyncio.run(replay())
    assert async_results == sync_results
    assert any(isinstance(r, taskgate.Decision) and not r.allowed for _, r in sync_results)


def test_async_twin_validates_the_same_way() -> None:
    async def go() -> None:
        b = taskgate.connect_async(f"memory://{uuid.uuid4().hex}", POLICIES)
        with pytest.raises(ValueError, match="cost"):
            await b.check("gcra", "k", 0, now=NOW)
        with pytest.raises(ValueError, match="key"):
            await b.peek("gcra", "", now=NOW)
        with pytest.raises(ValueError, match="now"):
            await b.forecast("gcra", "k", now=-5)
        with pytest.raises(ValueError, match="1000"):
            await b.check_many("gcra", ["k"] * 1001, now=NOW)
        with pytest.raises(taskgate.PolicyNotFoundError, match="nope"):
            await b.check("nope", "k", now=NOW)
        with pytest.raises(taskgate.OperationNotSupportedError):
            await b.check("slots", "k", now=NOW)
        await b.aclose()

    asyncio.run(go())


def test_sync_and_async_share_the_memory_store(prefix: str) -> None:
    url = f"memory://{uuid.uuid4().hex}"
    exhaust(taskgate.connect(url, ONE, prefix=prefix), "k")

    async def go() -> bool:
        b = taskgate.connect_async(url, ONE, prefix=prefix)
        d = await b.check("one", "k", now=NOW)
        await b.aclose()
        return d.allowed

    assert asyncio.run(go()) is False


def assert_in(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


PLAN_POLICIES = {
    "version": 1,
    "limiters": {
        "gcra": {"strategy": "gcra", "limit": 10, "period": "1s", "burst": 3},
        "gcra_nobook": {"strategy": "gcra", "limit": 10, "period": "1s", "bookingHorizon": 0},
        "tb": {"strategy": "tokenBucket", "capacity": 5, "refillPerSec": 2},
        "fw": {"strategy": "fixedWindow", "limit": 4, "windowMs": 1000, "counters": False},
        "sw": {"strategy": "slidingWindow", "limit": 4, "windowMs": 1000},
        "swl": {"strategy": "slidingWindowLog", "limit": 4, "windowMs": 1000},
        "shared": {"strategy": "gcra", "limit": 5, "period": "1s", "concurrency": {"maxLimit": 2}},
        "perkey": {
            "strategy": "gcra",
            "limit": 5,
            "period": "1s",
            "concurrency": {"maxLimit": 2, "perKey": True},
        },
        "spends": {
            "strategy": "gcra",
            "limit": 5,
            "period": "1s",
            "tokenBudget": {"budget": 100, "window": "1m"},
        },
    },
}


@pytest.mark.parametrize("cluster", [False, True])
def test_check_plans_are_the_general_composition(cluster: bool) -> None:
    """check's plan (per-policy parts worked out once) is exactly the general one: the keyset of the key, the
    op's ARGV, the policy's constants in the script, then the counters' KEYS and argument; for every kind of
    policy and key."""
    from taskgate.engine.keys import keyset
    from taskgate.engine.plan import Planner, check_now, rate_params

    pols = taskgate.load_policies(PLAN_POLICIES)
    planner = Planner(pols, prefix="pp", cluster=cluster)

    def wire(args: Sequence[str | int | float | bytes]) -> list[bytes]:  # check sends its usual ARGV encoded
        return [a if isinstance(a, bytes) else str(a).encode() for a in args]

    for name in pols:
        p = pols[name]
        assert p.rate is not None
        for key in ("a", "tenant-42", "we{ir}d%key", "ключ", "x" * 1024):
            for cost, now, book, token in ((1, None, False, ""), (2, 1_700_000_000_000, True, ""),
                                            (1, None, False, "tok"), (1, None, True, "tok")):  # fmt: skip
                if cost > p.rate.max_cost:
                    continue
                got = planner.check(name, key, cost, now, book=book, token=token)
                ks = keyset("pp", p, key)
                mode = "b" if book and p.booking_horizon_ms > 0 else ("t" if token else "c")
                keys = [ks.rate, ks.bookings, ks.provider] if mode != "c" else [ks.rate, ks.provider]
                args: list[str | int | float] = [check_now(now), mode, cost]
                if mode != "c":
                    args.append(token)
                consts = (p.booking_grace_ms, *rate_params(p.rate), p.booking_horizon_ms)
                want = planner._counted(p, "check", p.rate.strategy, keys, args, got.decode, None, consts)
                assert (got.script, got.keys, wire(got.args), got.collect) == (
                    want.script, want.keys, wire(want.args), want.collect,
                ), (name, key, cost, now, book, token)  # fmt: skip
