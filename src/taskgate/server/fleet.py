"""The Fleet service of ``taskgate serve`` (``throttlekit.v1.Fleet``): client-held leases.

``Reserve`` hands a client a chunk of a window's budget to spend locally (ThrottleKit's "Tier-2":
throttlekit-py's ``FleetBackend`` / ``LeasedLimiter``). The grant is computed in Lua, atomically, from the
very counters the other calls spend, so all leases and calls of a window together never exceed its budget:

- ``AXIS_RATE`` (or unspecified): the rate of a ``fixedWindow`` policy, from the counter ``Check`` spends
  (``engine/lua/op_lease.lua``);
- ``AXIS_TOKEN_BUDGET``: a policy's token budgets, charged like a debit (``op_lease_budget.lua``); with
  several budgets the grant is the least any has left, and the lease ends with the earliest window.

The budget is the key ``caller.domain`` (the same budget as ``Check(policy, key=domain)``), or one
policy-wide budget when the domain is empty. A lease expires at the window's end (``expiry_ms``); a refused
one (``capacity`` 0) carries the time to that end as ``retry_after_ms``. ``wants`` 0 means 1; ``has``,
``used`` and the caller's ``client_id``/``region``/``priority`` are advisory and ignored. Other strategies
and ``AXIS_CONCURRENCY`` answer ``UNIMPLEMENTED``.

Tenants (ThrottleKit's weighted fair split): a policy with a ``fairness:`` section shares its rate window
between tenants. ``caller.domain`` then names the *tenant*, every tenant leases from the one policy-wide
budget, and under contention the tenants split it by their fair-share weights, the very weights of the
waiting rooms' fair keys (the policy file's ``fairness.weights`` / ``defaultWeight``, overridden by
``taskgate.set_weight`` in the store, read at most once a second per policy): a tenant of weight ``w``
gets ``w / (sum of the active tenants' weights)`` of the window, a tenant alone gets all of it, and what an
active tenant leaves unclaimed goes to the others (the split itself is computed in Lua, atomically, in
``engine/lua/op_lease.lua``). Token-budget leases are not split.

Access, like the Monitor's: a server with a secret (``--secret-file``) requires it on every call
(ThrottleKit's clients send it as ``x-fleet-secret``, which opens the Fleet service too); without a secret
the Fleet answers loopback peers only (and Unix sockets), ``PERMISSION_DENIED`` otherwise.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import grpc
from redis.exceptions import RedisError

from taskgate._proto import throttlekit_pb2 as pb
from taskgate._proto import throttlekit_pb2_grpc as pbg
from taskgate.engine.keys import weights_key
from taskgate.engine.plan import text
from taskgate.errors import OperationNotSupportedError
from taskgate.server.errors import map_errors
from taskgate.server.hooks import ServiceContext, register_service
from taskgate.server.monitor import is_loopback_peer

__all__ = ["FLEET", "FleetService"]

FLEET = pb.DESCRIPTOR.services_by_name["Fleet"].full_name
_Ctx = Any  # grpc.aio.ServicerContext
_RATE_AXES = (pb.AXIS_UNSPECIFIED, pb.AXIS_RATE)
WEIGHTS_TTL_S = 1.0  # the stored weights of a policy are read at most this often


@map_errors
class FleetService(pbg.FleetServicer):
    def __init__(self, ctx: ServiceContext) -> None:
        self._b = ctx.backend
        self._open = ctx.config.secret_file is not None  # the secret interceptor guards every call
        self._weights: dict[str, tuple[float, dict[str, float]]] = {}  # policy -> (until, stored weights)

    async def _weight(self, policy: str, tenant: str) -> float:
        """The tenant's weight in force: stored (``taskgate.set_weight``), else the policy file's."""
        p = self._b.policy(policy)
        now = time.monotonic()
        hit = self._weights.get(p.name)
        if hit is None or hit[0] <= now:
            try:
                raw = await self._b.client.hgetall(weights_key(self._b.prefix, p.name))
                stored = {text(k): float(text(v)) for k, v in (raw or {}).items()}
            except (RedisError, ValueError):  # the lease itself reports an outage; a bad value is skipped
                stored = hit[1] if hit is not None else {}
            hit = self._weights[p.name] = (now + WEIGHTS_TTL_S, stored)
        w = hit[1].get(tenant) if tenant else None
        return w if w is not None and w > 0 else p.fairness.weight(tenant)

    async def _guard(self, context: _Ctx) -> None:
        if self._open or is_loopback_peer(context.peer() or ""):
            return
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            "the Fleet answers loopback peers only, unless the server has a secret (--secret-file)",
        )

    async def Reserve(self, request: pb.ReserveRequest, context: _Ctx) -> pb.ReserveResponse:
        await self._guard(context)
        if request.axis in _RATE_AXES:
            axis: Literal["rate", "tokens"] = "rate"
        elif request.axis == pb.AXIS_TOKEN_BUDGET:
            axis = "tokens"
        else:
            raise OperationNotSupportedError(
                "Fleet.Reserve: taskgate leases a fixedWindow policy's rate or a policy's token budget, not "
                + pb.Axis.Name(request.axis)
            )
        domain, wants = request.caller.domain, request.wants or 1
        if axis == "rate" and self._b.policy(request.policy).fairness.declared:  # the domain is a tenant
            w = await self._weight(request.policy, domain)
            g = await self._b.lease_window(request.policy, "", wants, tenant=domain, weight=w)
        else:
            g = await self._b.lease_window(request.policy, domain, wants, axis=axis)
        return pb.ReserveResponse(
            lease=pb.Lease(
                capacity=g.granted,
                expiry_ms=g.window_end,
                refresh_interval_ms=max(0, g.window_end - g.now),
                safe_capacity=g.granted,
                retry_after_ms=g.retry_after_ms,
                limit=g.limit,
            )
        )


@register_service
def _register(server: Any, ctx: ServiceContext) -> str:
    pbg.add_FleetServicer_to_server(FleetService(ctx), server)
    return FLEET
