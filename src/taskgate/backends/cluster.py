"""The direct door on Redis Cluster (``redis+cluster://host:port``): the same scripts and the same backends.

Every multi-key script already keeps its keys in one hash slot (see :mod:`taskgate.engine.keys`), so
check, admit, debit, reserve/settle, release and heartbeat run unchanged through redis-py's cluster client.
Only ``check_many`` spans slots: its keys are grouped by slot, one script per group, all at one instant (the
server's ``TIME`` read once, then passed as ``now``), and the decisions come back in input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio.cluster
import redis.cluster

from taskgate.backends._redis_base import UNAVAILABLE as _UNAVAILABLE
from taskgate.backends.redis import AsyncRedisBackend, RedisBackend
from taskgate.types import Decision

__all__ = ["AsyncClusterRedisBackend", "ClusterRedisBackend", "cluster_url"]


def cluster_url(url: str) -> str:
    """``redis+cluster://h:p/...`` -> ``redis://h:p`` (and ``rediss+cluster://`` -> ``rediss://``)."""
    scheme, rest = url.split("://", 1)
    return f"{scheme.replace('+cluster', '')}://{rest.split('/', 1)[0]}"


def _ms(t: Any) -> int:
    sec, usec = t
    return int(sec) * 1000 + int(usec) // 1000


def _groups(client: Any, rate_keys: Sequence[str]) -> list[list[int]]:
    by_slot: dict[int, list[int]] = {}
    for i, k in enumerate(rate_keys):
        by_slot.setdefault(client.keyslot(k), []).append(i)
    return list(by_slot.values())


class ClusterRedisBackend(RedisBackend):
    """:class:`RedisBackend` over ``redis.cluster.RedisCluster``."""

    client: redis.cluster.RedisCluster  # type: ignore[assignment]

    def check_many(
        self, policy: str, keys: Sequence[str], cost: int = 1, *, now: int | None = None
    ) -> list[Decision]:
        plan = self._plan.check_many(policy, keys, cost, now)  # validates everything first
        groups = _groups(self.client, plan.keys[: len(keys)])  # the rate keys (provider keys follow)
        if len(groups) <= 1:
            return self._run(plan)
        if now is None:
            try:
                now = _ms(self.client.time())
            except _UNAVAILABLE as e:
                raise self._unavailable(e) from e
        out: list[Decision | None] = [None] * len(keys)
        for idx in groups:
            sub = self._run(self._plan.check_many(policy, [keys[i] for i in idx], cost, now))
            for i, d in zip(idx, sub, strict=True):
                out[i] = d
        return [d for d in out if d is not None]


class AsyncClusterRedisBackend(AsyncRedisBackend):
    """:class:`AsyncRedisBackend` over ``redis.asyncio.cluster.RedisCluster``."""

    client: redis.asyncio.cluster.RedisCluster  # type: ignore[assignment]

    async def check_many(
        self, policy: str, keys: Sequence[str], cost: int = 1, *, now: int | None = None
    ) -> list[Decision]:
        plan = self._plan.check_many(policy, keys, cost, now)
        groups = _groups(self.client, plan.keys[: len(keys)])  # the rate keys (provider keys follow)
        if len(groups) <= 1:
            return await self._run(plan)
        if now is None:
            try:
                now = _ms(await self.client.time())
            except _UNAVAILABLE as e:
                raise self._unavailable(e) from e
        out: list[Decision | None] = [None] * len(keys)
        for idx in groups:
            sub = await self._run(self._plan.check_many(policy, [keys[i] for i in idx], cost, now))
            for i, d in zip(idx, sub, strict=True):
                out[i] = d
        return [d for d in out if d is not None]
