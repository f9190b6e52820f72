"""The direct door: RedisBackend and AsyncRedisBackend, one EVALSHA per decision.

The twins differ only in the transport call (:meth:`_run`); planning, validation and decoding are the shared
pure functions of :mod:`taskgate.engine.plan`.

Over a Redis Cluster client the counters of per-key policies are collected by the decisions and sent later
(:mod:`taskgate.engine.keys` says why): the collected counts ride in the same pipeline as a later call once
they have waited :data:`~taskgate.engine.keys.STATS_FLUSH_S`, a background flusher sends them when the process
goes quiet, and ``close()`` sends what is left.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from taskgate.admission import (
    Admission,
    AsyncAdmission,
    AsyncHeartbeatPump,
    AsyncReservation,
    HeartbeatPump,
    Reservation,
)
from taskgate.engine.plan import AxesPlanner, Plan
from taskgate.engine.stats_buffer import StatsBuffer, StatsDelta
from taskgate.errors import BackendUnavailableError, TaskgateError
from taskgate.policy import Policies, Policy
from taskgate.provider import Reported, as_report
from taskgate.types import Decision, Forecast, HeartbeatReply, Settlement, WindowLease

__all__ = ["AsyncRedisBackend", "RedisBackend", "redact"]

T = TypeVar("T")
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)
_FLUSH_EVERY_S = 1.0  # cluster mode: the background flusher's period
log = logging.getLogger("taskgate")


def redact(url: str) -> str:
    """The URL without its password."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + netloc, parts.path, parts.query, parts.fragment))


def _merge(replies: list[HeartbeatReply]) -> HeartbeatReply:
    return HeartbeatReply(
        [x for r in replies for x in r.live],
        [x for r in replies for x in r.reclaimed],
        min((r.next_deadline for r in replies), default=0),
    )


def _script_error(plan: Plan[Any], e: ResponseError) -> TaskgateError:
    return TaskgateError(f"engine script {plan.script.name} failed: {e}")


_Pending = list[tuple[str, int, StatsDelta]]


class _Base:
    def __init__(
        self, policies: Policies, *, prefix: str = "taskgate", url: str = "redis://", cluster: bool = False
    ) -> None:
        self._plan = AxesPlanner(policies, prefix, cluster=cluster)
        self._stats: StatsBuffer | None = StatsBuffer() if cluster else None
        self.url = redact(url)
        ttls = [p.concurrency.lease_ttl_ms for p in policies.values() if p.concurrency is not None]
        self.heartbeat_interval = (min(ttls) / 3000.0) if ttls else 10.0

    @property
    def policies(self) -> Policies:
        return self._plan.policies

    @property
    def prefix(self) -> str:
        return self._plan.prefix

    def policy(self, name: str) -> Policy:
        return self._plan.policy(name)

    def _unavailable(self, e: BaseException) -> BackendUnavailableError:
        return BackendUnavailableError(f"cannot reach the store at {self.url}: {e}")

    def _collected(self, plan: Plan[T], raw: Any) -> Any:
        """The op's reply; in stats mode collect, the counts it carries go to the buffer."""
        if plan.collect and self._stats is not None:
            self._stats.add(plan.collect, raw[1])
            return raw[0]
        return raw

    def _flush_plans(self, items: _Pending) -> list[Plan[None]]:
        return [self._plan.stats_flush(p, sec * 1000, d) for p, sec, d in items]

    def _decision_result(self, plan: Plan[T], raw: Any) -> Any:
        """A pipelined decision's raw result (errors raised as by :meth:`_run`); None: run it again alone."""
        if isinstance(raw, NoScriptError):
            return None
        if isinstance(raw, ResponseError):
            raise _script_error(plan, raw) from raw
        if isinstance(raw, BaseException):
            raise self._unavailable(raw) from raw
        return raw

    def _lease_plan(
        self, policy: str, key: str, wants: int, axis: str, now: int | None, tenant: str | None, weight: float
    ) -> Plan[WindowLease]:
        if axis == "rate":
            return self._plan.lease_window(policy, key, wants, now, tenant=tenant, weight=weight)
        if tenant is not None:
            raise ValueError("a split between tenants is of a fixed window's rate (axis 'rate')")
        if axis == "tokens":
            return self._plan.lease_budget(policy, key, wants, now)
        raise ValueError(f"axis must be 'rate' or 'tokens', got {axis!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, policies={sorted(self.policies)})"


class RedisBackend(_Base):
    """Direct door over a ``redis.Redis`` client (or any client with ``evalsha``/``eval``)."""

    def __init__(
        self, client: redis.Redis, policies: Policies, *, prefix: str = "taskgate", url: str = "redis://"
    ) -> None:
        cluster = isinstance(client, redis.cluster.RedisCluster)
        super().__init__(policies, prefix=prefix, url=url, cluster=cluster)
        self.client = client
        self._pump: HeartbeatPump | None = None
        self._flusher: threading.Thread | None = None
        self._flusher_lock = threading.Lock()
        self._closing = threading.Event()

    def _eval(self, plan: Plan[Any]) -> Any:
        s, keys, args = plan.script, plan.keys, plan.args
        try:
            try:
                return self.client.evalsha(s.sha, len(keys), *keys, *args)
            except NoScriptError:
                return self.client.eval(s.source, len(keys), *keys, *args)
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from e
        except ResponseError as e:
            raise _script_error(plan, e) from e

    def _run(self, plan: Plan[T]) -> T:
        if self._stats is not None and self._stats.due():
            return self._run_with_stats(plan)
        raw = self._collected(plan, self._eval(plan))
        if plan.collect:
            self._start_flusher()
        return plan.decode(raw)

    # -- counters collected on a cluster ------------------------------------------------------------------

    def _run_with_stats(self, plan: Plan[T]) -> T:
        """``plan`` and the collected counts that are due, in one pipeline (one round trip per node)."""
        assert self._stats is not None
        items = self._stats.take()
        flushes: list[Plan[Any]] = list(self._flush_plans(items))
        pipe = self.client.pipeline(transaction=False)
        for f in [*flushes, plan]:  # (redis-py blocks pipe.evalsha on a cluster; the command is routed)
            pipe.execute_command("EVALSHA", f.script.sha, len(f.keys), *f.keys, *f.args)  # type: ignore[no-untyped-call]
        try:
            res = pipe.execute(raise_on_error=False)
        except _UNAVAILABLE as e:
            self._stats.put_back(items)
            raise self._unavailable(e) from e
        again = [it for it, r in zip(items, res, strict=False) if isinstance(r, BaseException)]
        if again:
            self._send(again)
        raw = self._decision_result(plan, res[-1])
        if raw is None:
            raw = self._eval(plan)
        return plan.decode(self._collected(plan, raw))

    def _send(self, items: _Pending) -> None:
        """Send collected counts one script at a time; on an outage keep them for the next try."""
        assert self._stats is not None
        for i, f in enumerate(self._flush_plans(items)):
            try:
                self._eval(f)
            except BackendUnavailableError:
                self._stats.put_back(items[i:])
                return
            except TaskgateError as e:
                log.warning("taskgate: counters of policy %r dropped: %s", items[i][0], e)

    def flush_stats(self) -> None:
        """Send the counters collected on a cluster now (a no-op elsewhere: they are written by each call)."""
        if self._stats:
            self._send(self._stats.take())

    def _start_flusher(self) -> None:
        if self._flusher is not None:
            return
        with self._flusher_lock:
            if self._flusher is None and not self._closing.is_set():
                self._flusher = threading.Thread(target=self._flush_loop, name="taskgate-stats", daemon=True)
                self._flusher.start()

    def _flush_loop(self) -> None:
        while not self._closing.wait(_FLUSH_EVERY_S):
            try:
                self.flush_stats()
            except Exception as e:  # never die: the next round may succeed
                log.debug("taskgate: sending counters failed: %s", e)

    def check(
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
        return self._run(self._plan.check(policy, key, cost, now, book=book, token=token))

    def check_many(
        self, policy: str, keys: Sequence[str], cost: int = 1, *, now: int | None = None
    ) -> list[Decision]:
        """One decision per key, in input order, at one instant, in one round trip."""
        return self._run(self._plan.check_many(policy, keys, cost, now))

    def peek(self, policy: str, key: str, *, now: int | None = None) -> Decision:
        """The state of ``key`` without consuming anything."""
        return self._run(self._plan.peek(policy, key, now))

    def forecast(self, policy: str, key: str, cost: int = 1, *, now: int | None = None) -> Forecast:
        return self._run(self._plan.forecast(policy, key, cost, now))

    def admit(
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
    ) -> Admission:
        """Rate x concurrency x cost in one atomic call; nothing is consumed unless every axis admits.
        ``heartbeat=True`` keeps the lease alive from a background thread while it is held."""
        plan = self._plan.admit(policy, key, cost, tokens, now, holder=holder, book=book, token=booking_token)
        adm = Admission(self, policy, key, self._run(plan), tokens, self._plan.policy(policy).accounting, now)
        if heartbeat:
            adm.start_heartbeat(self._heartbeat_pump())
        return adm

    def _heartbeat_pump(self) -> HeartbeatPump:
        if self._pump is None:
            self._pump = HeartbeatPump(self, self.heartbeat_interval)
        return self._pump

    def release(self, lease_id: str, *, dropped: bool = False, now: int | None = None) -> bool:
        """Release a lease by id (idempotent). False if it was not held (already released or reclaimed)."""
        return self._run(self._plan.release(lease_id, dropped, now))

    def heartbeat(self, lease_ids: list[str], *, now: int | None = None) -> HeartbeatReply:
        """Renew leases; reports which are live and which were reclaimed."""
        return _merge([self._run(p) for p in self._plan.heartbeat(lease_ids, now)])

    def debit(self, policy: str, key: str, tokens: int = 1, *, now: int | None = None) -> Decision:
        """Post-hoc cost against the policy's token budgets (admitted iff budget remains before it)."""
        return self._run(self._plan.debit(policy, key, tokens, now))

    def reserve(self, policy: str, key: str, tokens: int, *, now: int | None = None) -> Reservation:
        """Escrow an estimate now; settle the actual later."""
        r = self._run(self._plan.reserve(policy, key, tokens, now))
        return Reservation(self, policy, key, r.decision, r.reservation_id, r.expires_at, now)

    def settle(
        self, policy: str, key: str, reservation_id: str, actual: int, *, now: int | None = None
    ) -> Settlement:
        return self._run(self._plan.settle(policy, key, reservation_id, actual, now))

    def lease_window(
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
        return self._run(self._lease_plan(policy, key, wants, axis, now, tenant, weight))

    def reset(self, policy: str, key: str) -> None:
        """Forget all state of ``key`` under ``policy``."""
        self._run(self._plan.reset(policy, key))

    def report(
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
        return self._run(self._plan.report(policy, key, r, now))

    def ping(self) -> None:
        try:
            self.client.ping()
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from e

    def close(self) -> None:
        self._closing.set()
        if self._stats:
            try:
                self.flush_stats()
            except Exception as e:
                log.debug("taskgate: sending counters on close failed: %s", e)
        if self._pump is not None:
            self._pump.stop()
        self.client.close()

    def __enter__(self) -> RedisBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRedisBackend(_Base):
    """The asyncio twin of :class:`RedisBackend` over ``redis.asyncio.Redis``."""

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
        self._flusher: asyncio.Task[None] | None = None

    async def _eval(self, plan: Plan[Any]) -> Any:
        s, keys, args = plan.script, plan.keys, plan.args
        try:
            try:
                return await self.client.evalsha(s.sha, len(keys), *keys, *args)
            except NoScriptError:
                return await self.client.eval(s.source, len(keys), *keys, *args)
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from e
        except ResponseError as e:
            raise _script_error(plan, e) from e

    async def _run(self, plan: Plan[T]) -> T:
        if self._stats is not None and self._stats.due():
            return await self._run_with_stats(plan)
        raw = self._collected(plan, await self._eval(plan))
        if plan.collect and self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        return plan.decode(raw)

    # -- counters collected on a cluster ------------------------------------------------------------------

    async def _run_with_stats(self, plan: Plan[T]) -> T:
        assert self._stats is not None
        items = self._stats.take()
        flushes: list[Plan[Any]] = list(self._flush_plans(items))
        pipe = self.client.pipeline()
        for f in [*flushes, plan]:
            pipe.execute_command("EVALSHA", f.script.sha, len(f.keys), *f.keys, *f.args)
        try:
            res = await pipe.execute(raise_on_error=False)
        except _UNAVAILABLE as e:
            self._stats.put_back(items)
            raise self._unavailable(e) from e
        again = [it for it, r in zip(items, res, strict=False) if isinstance(r, BaseException)]
        if again:
            await self._send(again)
        raw = self._decision_result(plan, res[-1])
        if raw is None:
            raw = await self._eval(plan)
        return plan.decode(self._collected(plan, raw))

    async def _send(self, items: _Pending) -> None:
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
        """Send the counters collected on a cluster now (a no-op elsewhere)."""
        if self._stats:
            await self._send(self._stats.take())

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(_FLUSH_EVERY_S)
            try:
                await self.flush_stats()
            except Exception as e:  # never die: the next round may succeed
                log.debug("taskgate: sending counters failed: %s", e)

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
        return await self._run(self._plan.check(policy, key, cost, now, book=book, token=token))

    async def check_many(
        self, policy: str, keys: Sequence[str], cost: int = 1, *, now: int | None = None
    ) -> list[Decision]:
        return await self._run(self._plan.check_many(policy, keys, cost, now))

    async def peek(self, policy: str, key: str, *, now: int | None = None) -> Decision:
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
        plan = self._plan.admit(policy, key, cost, tokens, now, holder=holder, book=book, token=booking_token)
        reply = await self._run(plan)
        adm = AsyncAdmission(self, policy, key, reply, tokens, self._plan.policy(policy).accounting, now)
        if heartbeat:
            if self._pump is None:
                self._pump = AsyncHeartbeatPump(self, self.heartbeat_interval)
            adm.start_heartbeat(self._pump)
        return adm

    async def release(self, lease_id: str, *, dropped: bool = False, now: int | None = None) -> bool:
        return await self._run(self._plan.release(lease_id, dropped, now))

    async def heartbeat(self, lease_ids: list[str], *, now: int | None = None) -> HeartbeatReply:
        return _merge([await self._run(p) for p in self._plan.heartbeat(lease_ids, now)])

    async def debit(self, policy: str, key: str, tokens: int = 1, *, now: int | None = None) -> Decision:
        return await self._run(self._plan.debit(policy, key, tokens, now))

    async def reserve(
        self, policy: str, key: str, tokens: int, *, now: int | None = None
    ) -> AsyncReservation:
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
        """The asyncio twin of :meth:`RedisBackend.lease_window`."""
        return await self._run(self._lease_plan(policy, key, wants, axis, now, tenant, weight))

    async def reset(self, policy: str, key: str) -> None:
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
        r = as_report(response, status=status, retry_after=retry_after)
        return await self._run(self._plan.report(policy, key, r, now))

    async def ping(self) -> None:
        try:
            await self.client.ping()
        except _UNAVAILABLE as e:
            raise self._unavailable(e) from e

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        if self._stats:
            try:
                await self.flush_stats()
            except Exception as e:
                log.debug("taskgate: sending counters on close failed: %s", e)
        if self._pump is not None:
            await self._pump.stop()
        await self.client.aclose()

    async def __aenter__(self) -> AsyncRedisBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
