"""Redis Cluster specifics (the engine suites also run on the cluster through the ``store_url`` fixture)."""

from __future__ import annotations

import asyncio

import taskgate
from taskgate.backends.cluster import ClusterRedisBackend

POLICIES = {"api": {"strategy": "gcra", "limit": 10, "period": "1s", "burst": 3}}


def test_check_many_spans_slots_in_input_order(cluster_url: str, prefix: str) -> None:
    b = taskgate.connect(cluster_url, POLICIES, prefix=prefix)
    assert isinstance(b, ClusterRedisBackend)
    keys = [f"tenant-{i}" for i in range(40)]
    slots = {b.client.keyslot(b._plan.check("api", k).keys[0]) for k in keys}  # type: ignore[no-untyped-call]
    assert len(slots) > 1, "the keys should land on several slots"
    assert b.check("api", "tenant-7", 3, now=10_000).allowed  # exhaust one key first
    out = b.check_many("api", keys, now=10_000)
    assert [d.allowed for d in out] == [k != "tenant-7" for k in keys]
    assert all(d.remaining == 2 for d in out if d.allowed)
    # without an explicit clock, one server TIME is read and shared by every slot group: one instant
    fresh = b.check_many("api", [f"x{i}" for i in range(40)])
    assert len({d.reset_at for d in fresh}) == 1
    b.close()


def test_async_check_many_on_cluster(cluster_url: str, prefix: str) -> None:
    async def go() -> list[bool]:
        b = taskgate.connect_async(cluster_url, POLICIES, prefix=prefix)
        try:
            return [d.allowed for d in await b.check_many("api", [f"k{i}" for i in range(20)], now=5_000)]
        finally:
            await b.aclose()

    assert asyncio.run(go()) == [True] * 20


def test_unified_admit_on_cluster(cluster_url: str, prefix: str) -> None:
    pol = {"llm": {"strategy": "gcra", "limit": 5, "period": "1s", "burst": 5,
                   "concurrency": {"maxLimit": 2}, "tokenBudget": {"budget": 100, "window": "1m"}}}  # fmt: skip
    b = taskgate.connect(cluster_url, pol, prefix=prefix)
    a = [b.admit("llm", f"t{i}", tokens=10, now=60_000) for i in range(3)]
    assert [x.allowed for x in a] == [True, True, False]
    assert a[2].binding_axis == "concurrency"
    assert a[0].release()
    b.close()
