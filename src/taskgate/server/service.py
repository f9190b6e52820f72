"""The RateLimiter servicer: each RPC is one call on a door (:class:`~taskgate.backends.base.AsyncBackend`).

Wire rules (ThrottleKit's): ``cost`` 0 means 1 (Check, CheckMany, Forecast, Admit), ``tokens`` 0 means 1 for
Debit. ``Admit.hold`` and ``Admit.value`` (ThrottleKit's experimental joint-LP bid terms) are accepted and
ignored; ``policy_denied`` is always false. Validation is the backend's own (a ``ValueError`` becomes
``INVALID_ARGUMENT``: :func:`taskgate.server.errors.map_errors` maps every error of every RPC).

When the store is unreachable, a decision call (Check, CheckMany, Peek, Debit, Admit) is answered by the
policy's ``fail`` mode inside the Decision: ``open`` allows (nothing held), ``closed`` denies with
``retry_after_ms`` = the configured retry (1000 ms by default). Every other call fails with ``UNAVAILABLE``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from taskgate._proto import throttlekit_pb2 as pb
from taskgate._proto import throttlekit_pb2_grpc as pbg
from taskgate.backends.base import AsyncBackend
from taskgate.engine.plan import MAX_MANY
from taskgate.errors import BackendUnavailableError
from taskgate.server.errors import map_errors
from taskgate.server.hooks import DecisionEvent, DecisionListener
from taskgate.server.wire import encode_decision, fail_decision, policy_info, put_decision
from taskgate.types import Decision

__all__ = ["RateLimiterService"]

T = TypeVar("T")
log = logging.getLogger("taskgate.server")
_Ctx = Any  # grpc.aio.ServicerContext (grpc ships no type hints)


class _OutageLog:
    """Logs an unreachable store once, then at most every ``every_s`` seconds with a count."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._last = 0.0
        self._count = 0

    def note(self, e: BaseException) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._last >= self.every_s:
            log.warning("taskgate serve: store unavailable (%s); %d decisions by fail mode", e, self._count)
            self._last, self._count = now, 0


@map_errors
class RateLimiterService(pbg.RateLimiterServicer):
    """``throttlekit.v1.RateLimiter`` over one store door (stateless: any replica can serve any call)."""

    def __init__(
        self,
        backend: AsyncBackend,
        *,
        fail_retry_ms: int = 1000,
        listeners: list[DecisionListener] | None = None,
    ) -> None:
        self._b = backend
        self._retry_ms = fail_retry_ms
        self._listeners = listeners if listeners is not None else []
        self._outage = _OutageLog()
        self._catalog = pb.ListPoliciesResponse(policies=[policy_info(p) for p in backend.policies.values()])

    async def _decide(
        self, op: str, policy: str, key: str, call: Awaitable[T], fallback: Callable[[Decision], T]
    ) -> T:
        t0 = time.perf_counter_ns()
        try:
            out, failed = await call, False
        except BackendUnavailableError as e:
            self._outage.note(e)
            d = fail_decision(self._b.policy(policy), int(time.time() * 1000), self._retry_ms)
            out, failed = fallback(d), True
        if self._listeners:
            self._emit(op, policy, key, out, time.perf_counter_ns() - t0, failed)
        return out

    def _emit(self, op: str, policy: str, key: str, out: object, elapsed: int, failed: bool) -> None:
        if isinstance(out, Decision):
            events = [DecisionEvent(op, policy, key, out, "", elapsed, failed)]
        elif isinstance(out, list):
            events = [DecisionEvent(op, policy, "", d, "", elapsed, failed) for d in out]
        else:
            axis = getattr(out, "binding_axis", "")
            events = [DecisionEvent(op, policy, key, out.decision, axis, elapsed, failed)]  # type: ignore[attr-defined]
        for listener in self._listeners:
            for ev in events:
                try:
                    listener(ev)
                except Exception:
                    log.exception("taskgate serve: decision listener failed")

    async def Check(self, request: pb.CheckRequest, context: _Ctx) -> pb.CheckResponse:
        p, k = request.policy, request.key
        call = self._b.check(p, k, request.cost or 1, book=request.book, token=request.booking_token)
        d = await self._decide("Check", p, k, call, _same)
        r = pb.CheckResponse()
        put_decision(r.decision, d)
        return r

    async def CheckMany(self, request: pb.CheckManyRequest, context: _Ctx) -> pb.CheckManyResponse:
        p, keys = request.policy, list(request.keys)
        call = self._b.check_many(p, keys, request.cost or 1)
        ds = await self._decide("CheckMany", p, "", call, lambda d: [d] * len(keys))
        return pb.CheckManyResponse(decisions=[encode_decision(d) for d in ds])

    async def Peek(self, request: pb.PeekRequest, context: _Ctx) -> pb.PeekResponse:
        p, k = request.policy, request.key
        d = await self._decide("Peek", p, k, self._b.peek(p, k), _same)
        return pb.PeekResponse(decision=encode_decision(d))

    async def Forecast(self, request: pb.ForecastRequest, context: _Ctx) -> pb.ForecastResponse:
        f = await self._b.forecast(request.policy, request.key, request.cost or 1)
        return pb.ForecastResponse(
            forecast=pb.Forecast(
                spendable_now=f.spendable_now, next_replenish_at=f.next_replenish_at, full_at=f.full_at
            )
        )

    async def Debit(self, request: pb.DebitRequest, context: _Ctx) -> pb.DebitResponse:
        p, k = request.policy, request.key
        d = await self._decide("Debit", p, k, self._b.debit(p, k, request.tokens or 1), _same)
        return pb.DebitResponse(decision=encode_decision(d))

    async def Admit(self, request: pb.AdmitRequest, context: _Ctx) -> pb.AdmitResponse:
        p, k = request.policy, request.key
        call = self._b.admit(
            p,
            k,
            request.cost or 1,
            request.tokens,
            holder=request.holder or None,
            book=request.book,
            booking_token=request.booking_token,
        )
        adm: _Admitted = await self._decide("Admit", p, k, call, _FailedAdmission)
        return pb.AdmitResponse(
            decision=encode_decision(adm.decision),
            lease_id=adm.lease_id,
            lease_expires_at=adm.lease_expires_at,
            binding_axis=adm.binding_axis,
            reservation_id=adm.reservation_id,
            reserved_tokens=adm.reserved_tokens,
        )

    async def Release(self, request: pb.ReleaseRequest, context: _Ctx) -> pb.ReleaseResponse:
        released = await self._b.release(request.lease_id, dropped=request.dropped)
        return pb.ReleaseResponse(released=released)

    async def Heartbeat(self, request: pb.HeartbeatRequest, context: _Ctx) -> pb.HeartbeatResponse:
        ids = list(request.lease_ids)
        if len(ids) > MAX_MANY:
            raise ValueError(f"Heartbeat takes at most {MAX_MANY} lease ids, got {len(ids)}")
        r = await self._b.heartbeat(ids)
        return pb.HeartbeatResponse(live_ids=r.live, reclaimed_ids=r.reclaimed, next_deadline=r.next_deadline)

    async def Reserve(self, request: pb.ReserveTokensRequest, context: _Ctx) -> pb.ReserveTokensResponse:
        r = await self._b.reserve(request.policy, request.key, request.tokens)
        return pb.ReserveTokensResponse(
            decision=encode_decision(r.decision),
            reservation_id=r.id,
            expires_at=r.expires_at,
            reserved=request.tokens if r.allowed else 0,
        )

    async def Settle(self, request: pb.SettleRequest, context: _Ctx) -> pb.SettleResponse:
        s = await self._b.settle(request.policy, request.key, request.reservation_id, request.actual)
        return pb.SettleResponse(decision=encode_decision(s.decision), charged=s.charged, refunded=s.refunded)

    async def Reset(self, request: pb.ResetRequest, context: _Ctx) -> pb.ResetResponse:
        await self._b.reset(request.policy, request.key)
        return pb.ResetResponse()

    async def ListPolicies(self, request: pb.ListPoliciesRequest, context: _Ctx) -> pb.ListPoliciesResponse:
        return self._catalog


class _Admitted(Protocol):
    @property
    def decision(self) -> Decision: ...
    @property
    def lease_id(self) -> str: ...
    @property
    def lease_expires_at(self) -> int: ...
    @property
    def binding_axis(self) -> str: ...
    @property
    def reservation_id(self) -> str: ...
    @property
    def reserved_tokens(self) -> int: ...


def _same(d: Decision) -> Decision:
    return d


class _FailedAdmission:
    """The shape of an admission answered by the fail mode: nothing held, no axis."""

    lease_id = ""
    lease_expires_at = 0
    binding_axis = ""
    reservation_id = ""
    reserved_tokens = 0

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
