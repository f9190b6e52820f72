"""ThrottleKit's golden vectors replayed field for field through every door of the engine.

The harness upstream replays each suite with now = 1000 + op.now and shifts resetAt by the same 1000.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import taskgate

BASE = 1000
STRATEGIES = {"gcra", "tokenBucket", "fixedWindow", "slidingWindow", "slidingWindowLog"}


def policy_of(suite: dict[str, Any]) -> dict[str, Any]:
    kind, opts = suite["strategy"]["kind"], dict(suite["strategy"]["options"])
    spec: dict[str, Any] = {"strategy": kind, **opts}
    if "periodMs" in spec:
        spec["period"] = spec.pop("periodMs")
    return spec


def rate_suites(vectors: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in vectors["suites"] if s["primitive"] == "rateLimit"]


def expected(op: dict[str, Any]) -> tuple[bool, int, int, int, int]:
    e = op["expect"]
    return (e["allowed"], e["limit"], e["remaining"], e["resetAt"] + BASE, e["retryAfterMs"])


def got(d: taskgate.Decision) -> tuple[bool, int, int, int, int]:
    return (d.allowed, d.limit, d.remaining, d.reset_at, d.retry_after_ms)


def test_vectors_cover_every_strategy(vectors: dict[str, Any]) -> None:
    assert vectors["contractVersion"] == "1"
    assert vectors["decisionFields"] == ["allowed", "limit", "remaining", "resetAt", "retryAfterMs"]
    assert {s["strategy"]["kind"] for s in rate_suites(vectors)} == STRATEGIES


def test_rate_vectors_sync(vectors: dict[str, Any], connect: Any) -> None:
    for n, suite in enumerate(rate_suites(vectors)):
        b = connect({f"p{n}": policy_of(suite)})
        for i, op in enumerate(suite["ops"]):
            d = b.check(f"p{n}", suite["key"], op["cost"], now=BASE + op["now"])
            assert got(d) == expected(op), f"{suite['name']} op {i}"


def test_rate_vectors_async(vectors: dict[str, Any], store_url: str, prefix: str) -> None:
    async def replay() -> None:
        for suite in rate_suites(vectors):
            b = taskgate.connect_async(store_url, {"p": policy_of(suite)}, prefix=prefix + suite["name"])
            try:
                for i, op in enumerate(suite["ops"]):
                    d = await b.check("p", suite["key"], op["cost"], now=BASE + op["now"])
                    assert got(d) == expected(op), f"{suite['name']} op {i}"
            finally:
                await b.aclose()

    asyncio.run(replay())


def test_noscript_fallback(redis_url: str, prefix: str) -> None:
    """After SCRIPT FLUSH (a restarted Redis) the first EVALSHA misses and EVAL recovers."""
    b = taskgate.connect(redis_url, {"p": {"strategy": "gcra", "limit": 10, "period": "1s"}}, prefix=prefix)
    assert isinstance(b, taskgate.RedisBackend)
    b.client.script_flush()
    assert b.check("p", "k", now=BASE).allowed
    assert b.client.script_exists(b._plan.check("p", "k").script.sha) == [True]


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_peek_matches_check_after_the_fact(strategy: str, connect: Any) -> None:
    """peek reports the state a check leaves, and consumes nothing."""
    spec: dict[str, Any] = {"strategy": strategy}
    spec |= {"capacity": 3, "refillPerSec": 1} if strategy == "tokenBucket" else {"limit": 3, "period": "1s"}
    if strategy == "gcra":
        spec["burst"] = 3
    b = connect({"p": spec})
    for _ in range(3):
        assert b.check("p", "k", now=5000).allowed
    before = b.peek("p", "k", now=5000)
    assert not before.allowed
    assert before.remaining == 0
    assert before.retry_after_ms > 0
    assert b.peek("p", "k", now=5000) == before
    assert not b.check("p", "k", now=5000).allowed
