"""The direct door, :class:`AsyncRedisBackend`: one EVALSHA per decision over a ``redis.asyncio`` client.
This door and its twin are one source (``scripts/unasync.py`` writes the sync one from it), and
:mod:`taskgate.backends.redis` is their public home.

Planning, validation and decoding are the shared pure functions of :mod:`taskgate.engine.plan`; what else
both sides share (configuration, error mapping) is :class:`~taskgate.backends._redis_base.RedisBase`.

Over a Redis Cluster client the counters of per-key policies are collected by the decisions and sent later
(:mod:`taskgate.engine.keys` says why): the collected counts ride in the same pipeline as a later call once
they have waited :data:`~taskgate.engine.keys.STATS_FLUSH_S`, a background flusher (an
:class:`~taskgate.backends._concurrency.AsyncTicker`) sends them when the process goes quiet, and ``aclose()``
sends what is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, TypeVar

import redis.asyncio
import redis.asyncio.cluster
from redis.exceptions import NoScriptError, ResponseError

from taskgate.backends._async.admission import AsyncAdmission, AsyncHeartbeatPump, AsyncReservation
from taskgate.backends._concurrency import AsyncTicker
from taskgate.backends._redis_base import (
    FLUSH_EVERY_S,
    UNAVAILABLE,
    Pending,
    RedisBase,
    log,
    merge_heartbeats,
    script_error,
)
from taskgate.engine.plan import Plan
from taskgate.errors import BackendUnavailableError, TaskgateError
from taskgate.policy import Policies
from taskgate.provider import Reported, as_report
from taskgate.types import Decision, Forecast, HeartbeatReply, Settlement, WindowLease

__all__ = ["AsyncRedisBackend"]

T = TypeVar("T")


class AsyncRedisBackend(RedisBase):
    """Direct door over a ``redis.asyncio.Redis`` client (or any client with ``evalsha``/``eval``)."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        policies: Policies,
        *,
        prefix: str = "taskgate",
        url: str = "redis://",
    ) -> None:
        cluster = isinstance(client, redis.asyncio.cluster.RedisCluster)
        super().__init__(policies, prefix=prefix, url=url, cluster=cluster)
        self.client = client
        self._pump: AsyncHeartbeatPump | None = None
        self._flusher = AsyncTicker(FLUSH_EVERY_S, self._flush_logged, "taskgate-stats")

    async def _eval(self, plan: Plan[Any]) -> Any:
        s, keys, args = plan.script, plan.keys, plan.args
        try:
            try:
                return await self.client.evalsha(s.sha, len(keys), *keys, *args)
            except NoScriptError:
                return await self.client.eval(s.source, len(keys), *keys, *args)
        except UNAVAILABLE as e:
            raise self._unavailable(e) from e
        except ResponseError as e:
            raise script_error(plan, e) from e

    async def _run(self, plan: Plan[T]) -> T:
        if self._stats is not None and self._stats.due():
            return await self._run_with_stats(plan)
        raw = self._collected(plan, await self._eval(plan))
        if plan.collect:
            self._flusher.start()
        return plan.decode(raw)

    # -- counters collected on a cluster ------------------------------------------------------------------

    async def _run_with_stats(self, plan: Plan[T]) -> T:
        """``plan`` and the collected counts that are due, in one pipeline (one round trip per node)."""
        assert self._stats is not None
        items = self._stats.take()
        flushes: list[Plan[Any]] = list(self._flush_plans(items))
        pipe: Any = self.client.pipeline(transaction=False)
        for f in [*flushes, plan]:  # (redis-py blocks pipe.evalsha on a cluster; the command is routed)
            pipe.execute_command("EVALSHA", f.script.sha, len(f.keys), *f.keys, *f.args)
        try:
            res = await pipe.execute(raise_on_error=False)
        except UNAVAILABLE as e:
            self._stats.put_back(items)
            raise self._unavailable(e) from e
        again = [it for it, r in zip(items, res, strict=False) if isinstance(r, BaseException)]
        if again:
            await self._send(again)
        raw = self._decision_result(plan, res[-1])
        if raw is None:
            raw = await self._eval(plan)
        return plan.decode(self._collected(plan, raw))

    async def _send(self, items: Pending) -> None:
        """Send collected counts one script at a time; on an outage keep them for the next try."""
        assert self._stats is not None
        for i, f in enumerate(self._flush_plans(items)):
            try:
                await self._eval(f)
            except BackendUnavailableError:
                self._stats.put_back(items[i:])
                return
            except TaskgateError as e:
                log.warning("taskgate: counters of policy %r dropped: %s", items[i][0], e)

    async def flush_stats(self) -> None:
        """Send the counters collected on a cluster now (a no-op elsewhere: they are written by each call)."""
        if self._stats:
            await self._send(self._stats.take())

    async def _flush_logged(self) -> None:
        try:
            await self.flush_stats()
        except Exception as e:  # never die: the next round may succeed
            log.debug("taskgate: sending counters failed: %s", e)

    # -- the operations -----------------------------------------------------------------------------------

    async def check(
        self,
        policy: str,
        key: str,
        cost: int = 1,
        *,
        now: int | None = None,
        book: bool = False,
        token: str = "",
    ) -> Decision:
        """Consume ``cost`` units for ``key`` if the policy allows it now. With ``book=True`` a denial within
        the policy's booking horizon takes the earliest future slot instead (``decision.booked``)."""
        return await self._run(self._plan.check(policy, key, cost, now, book=book, token=token))

    async def check_many(
        self, policy: str, keys: Sequence[str], cost: int = 1, *, now: int | None = None
    ) -> list[Decision]:
        """One decision per key, in input order, at one instant, in one round trip."""
        return await self._run(self._plan.check_many(policy, keys, cost, now))

    async def peek(self, policy: str, key: str, *, now: int | None = None) -> Decision:
        """The state of ``key`` without consuming anything."""
        return await self._run(self._plan.peek(policy, key, now))

    async def forecast(self, policy: str, key: str, cost: int = 1, *, now: int | None = None) -> Forecast:
        return await self._run(self._plan.forecast(policy, key, cost, now))

    async def admit(
        self,
        policy: str,
        key: str,
        cost: int = 1,
        tokens: int = 0,
        *,
        now: int | None = None,
        holder: str | None = None,
        book: bool = False,
        booking_token: str = "",
        heartbeat: bool = False,
    ) -> AsyncAdmission:
        """Rate x concurrency x cost in one atomic call; nothing is consumed unless every axis admits.
        ``heartbeat=True`` keeps the lease alive in the background while it is held."""
        plan = self._plan.admit(policy, key, cost, tokens, now, holder=holder, book=book, token=booking_token)
        reply = await self._run(plan)
        adm = AsyncAdmission(self, policy, key, reply, tokens, self._plan.policy(policy).accounting, now)
        if heartbeat:
            adm.start_heartbeat(self._heartbeat_pump())
        return adm

    def _heartbeat_pump(self) -> AsyncHeartbeatPump:
        if self._pump is None:
            self._pump = AsyncHeartbeatPump(self, self.heartbeat_interval)
        return self._pump

    async def release(self, lease_id: str, *, dropped: bool = False, now: int | None = None) -> bool:
        """Release a lease by id (idempotent). False if it was not held (already released or reclaimed)."""
        return await self._run(self._plan.release(lease_id, dropped, now))

    async def heartbeat(self, lease_ids: list[str], *, now: int | None = None) -> HeartbeatReply:
        """Renew leases; reports which are live and which were reclaimed."""
        return merge_heartbeats([await self._run(p) for p in self._plan.heartbeat(lease_ids, now)])

    async def debit(self, policy: str, key: str, tokens: int = 1, *, now: int | None = None) -> Decision:
        """Post-hoc cost against the policy's token budgets (admitted iff budget remains before it)."""
        return await self._run(self._plan.debit(policy, key, tokens, now))

    async def reserve(
        self, policy: str, key: str, tokens: int, *, now: int | None = None
    ) -> AsyncReservation:
        """Escrow an estimate now; settle the actual later."""
        r = await self._run(self._plan.reserve(policy, key, tokens, now))
        return AsyncReservation(self, policy, key, r.decision, r.reservation_id, r.expires_at, now)

    async def settle(
        self, policy: str, key: str, reservation_id: str, actual: int, *, now: int | None = None
    ) -> Settlement:
        return await self._run(self._plan.settle(policy, key, reservation_id, actual, now))

    async def lease_window(
        self,
        policy: str,
        key: str = "",
        wants: int = 1,
        *,
        axis: Literal["rate", "tokens"] = "rate",
        now: int | None = None,
        tenant: str | None = None,
        weight: float = 1.0,
    ) -> WindowLease:
        """Take up to ``wants`` units of the current window's budget at once (what the Fleet door grants a
        client to spend locally): of a fixedWindow policy's rate (``axis="rate"``, the units ``check``
        spends) or of its token budgets (``axis="tokens"``, charged like a debit); ``key`` "" is one
        policy-wide budget. With a ``tenant`` (rate only), the tenants leasing the window split it by
        ``weight`` (``engine/lua/op_lease.lua``)."""
        return await self._run(self._lease_plan(policy, key, wants, axis, now, tenant, weight))

    async def reset(self, policy: str, key: str) -> None:
        """Forget all state of ``key`` under ``policy``."""
        await self._run(self._plan.reset(policy, key))

    async def report(
        self,
        policy: str,
        key: str,
        response: object = None,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        now: int | None = None,
    ) -> Reported:
        """Tell the engine what the provider said about ``key`` (headers, a response, an SDK exception, or
        ``status=429, retry_after=seconds``): a 429 holds the key for the whole fleet until its Retry-After,
        reported limits pace it, a lower reported token remaining lowers its budgets, and a 429 shrinks an
        adaptive concurrency limit. See :mod:`taskgate.provider`."""
        r = as_report(response, status=status, retry_after=retry_after)
        return await self._run(self._plan.report(policy, key, r, now))

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except UNAVAILABLE as e:
            raise self._unavailable(e) from e

    async def aclose(self) -> None:
        """Send the counters still collected (on a cluster), stop the background jobs, close the client."""
        await self._flusher.stop()
        if self._stats:
            try:
                await self.flush_stats()
            except Exception as e:
                log.debug("taskgate: sending counters on close failed: %s", e)
        if self._pump is not None:
            await self._pump.stop()
            self._pump = None
        await self.client.aclose()

    async def __aenter__(self) -> AsyncRedisBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
