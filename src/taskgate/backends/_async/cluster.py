"""The direct door on Redis Cluster, :class:`AsyncClusterRedisBackend`: see :mod:`taskgate.backends.cluster`
(the public home of it and of its sync twin, generated from this file by ``scripts/unasync.py``)."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio.cluster

from taskgate.backends._async.redis import AsyncRedisBackend
from taskgate.backends._redis_base import UNAVAILABLE, slot_groups, time_ms
from taskgate.types import Decision

__all__ = ["AsyncClusterRedisBackend"]


class AsyncClusterRedisBackend(AsyncRedisBackend):
    """:class:`AsyncRedisBackend` over ``redis.asyncio.cluster.RedisCluster``."""

    client: redis.asyncio.cluster.RedisCluster  # type: ignore[assignment]

    async def check_many(
        self, policy: str, keys: Sequence[str], cost: int = 1, *, now: int | None = None
    ) -> list[Decision]:
        """One decision per key, in input order, at one instant: one script per hash slot of the keys."""
        plan = self._plan.check_many(policy, keys, cost, now)  # validates everything first
        groups = slot_groups(self.client, plan.keys[: len(keys)])  # the rate keys (provider keys follow)
        if len(groups) <= 1:
            return await self._run(plan)
        if now is None:
            try:
                now = time_ms(await self.client.time())
            except UNAVAILABLE as e:
                raise self._unavailable(e) from e
        out: list[Decision | None] = [None] * len(keys)
        for idx in groups:
            sub = await self._run(self._plan.check_many(policy, [keys[i] for i in idx], cost, now))
            for i, d in zip(idx, sub, strict=True):
                out[i] = d
        return [d for d in out if d is not None]
