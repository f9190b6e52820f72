"""The service door, :class:`AsyncServiceBackend`: a gRPC client (``grpc.aio``) of ``taskgate serve`` or of
a ThrottleKit server. This door and its twin are one source (``scripts/unasync.py`` writes the sync one from
it); :mod:`taskgate.backends.service` is their public home, and its docstring says how they work."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NoReturn, TypeVar

from tenacity import AsyncRetrying

from taskgate.backends._async.admission import AsyncAdmission, AsyncHeartbeatPump, AsyncReservation
from taskgate.backends._grpc_io import AsyncChannels, AsyncPolicyLookup
from taskgate.backends._grpc_wire import Call, Calls, merge_heartbeats
from taskgate.backends._service_base import (
    INHERITED,
    Conn,
    grpc,
    log,
    no_report,
    warn_without_fork_support,
)
from taskgate.errors import TaskgateError
from taskgate.policy import Policies
from taskgate.types import Decision, Forecast, HeartbeatReply, Settlement

__all__ = ["AsyncServiceBackend"]

T = TypeVar("T")


class AsyncServiceBackend(AsyncPolicyLookup):
    """The gRPC door. Fork-safe: one channel per process (and per event loop: see ``AsyncChannels.owner``),
    opened on first use."""

    _conn: Conn | None = None
    _pump: AsyncHeartbeatPump | None = None

    def _channel(self) -> Conn:
        owner = AsyncChannels.owner()
        c = self._conn
        if c is not None and c.pid == os.getpid() and c.loop is owner:
            return c
        if c is not None:  # forked, or another event loop: that channel cannot serve us
            INHERITED.append(c)
            self._pump = None
            if c.pid != os.getpid():
                warn_without_fork_support()
        ch = AsyncChannels.open(self.target, self._credentials(), self._options)
        c = self._conn = self._connect(ch, owner)
        return c

    async def _run(self, call: Call[T]) -> T:
        fn = getattr(self._channel().stub, call.method)

        async def attempt() -> Any:  # (tenacity retries a function call, not the call object gRPC returns)
            return await fn(call.request, timeout=self.timeout, metadata=self._metadata)

        resp: Any
        try:
            if call.idempotent and self.retries > 1:
                resp = await AsyncRetrying(**self._retry_kwargs())(attempt)
            else:
                resp = await attempt()
        except grpc.RpcError as e:
            return self._failed(call, e)
        return call.decode(resp)

    async def refresh_policies(self) -> Policies:
        """Fetch the server's policies (ListPolicies) and cache them."""
        self._policies = await self._run(Calls.list_policies())
        return self._policies

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
        """Consume ``cost`` units for ``key`` if the policy allows it now (``book``: see the Redis door)."""
        return await self._run(Calls.check(policy, key, cost, now, book, token))

    async def check_many(
        self, policy: str, keys: Sequence[str], cost: int = 1, *, now: int | None = None
    ) -> list[Decision]:
        """One decision per key, in input order, at one instant, in one round trip."""
        return await self._run(Calls.check_many(policy, keys, cost, now))

    async def peek(self, policy: str, key: str, *, now: int | None = None) -> Decision:
        """The state of ``key`` without consuming anything."""
        return await self._run(Calls.peek(policy, key, now))

    async def forecast(self, policy: str, key: str, cost: int = 1, *, now: int | None = None) -> Forecast:
        return await self._run(Calls.forecast(policy, key, cost, now))

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
        """Rate x concurrency x cost in one atomic call; ``heartbeat=True`` renews the lease in the
        background while it is held."""
        reply = await self._run(Calls.admit(policy, key, cost, tokens, now, holder, book, booking_token))
        if self._wants_policies(reply, tokens, heartbeat):
            try:
                await self.refresh_policies()
            except TaskgateError as e:  # the admission stands; known policies (or escrow) are used
                log.warning("taskgate: cannot fetch the service's policies (%s)", e)
        adm = AsyncAdmission(self, policy, key, reply, tokens, self._accounting(policy))
        if heartbeat:
            if self._pump is None:
                self._pump = AsyncHeartbeatPump(self, self.heartbeat_interval)
            adm.start_heartbeat(self._pump)
        return adm

    async def release(self, lease_id: str, *, dropped: bool = False, now: int | None = None) -> bool:
        """Release a lease by id (idempotent). False if it was not held (already released or reclaimed)."""
        return await self._run(Calls.release(lease_id, dropped, now))

    async def heartbeat(self, lease_ids: list[str], *, now: int | None = None) -> HeartbeatReply:
        """Renew leases; reports which are live and which were reclaimed."""
        return merge_heartbeats([await self._run(c) for c in Calls.heartbeat(lease_ids, now)])

    async def debit(self, policy: str, key: str, tokens: int = 1, *, now: int | None = None) -> Decision:
        """Post-hoc cost against the policy's token budgets (admitted iff budget remains before it)."""
        return await self._run(Calls.debit(policy, key, tokens, now))

    async def reserve(
        self, policy: str, key: str, tokens: int, *, now: int | None = None
    ) -> AsyncReservation:
        """Escrow an estimate now; settle the actual later."""
        r = await self._run(Calls.reserve(policy, key, tokens, now))
        return AsyncReservation(self, policy, key, r.decision, r.reservation_id, r.expires_at)

    async def settle(
        self, policy: str, key: str, reservation_id: str, actual: int, *, now: int | None = None
    ) -> Settlement:
        return await self._run(Calls.settle(policy, key, reservation_id, actual, now))

    async def reset(self, policy: str, key: str) -> None:
        """Forget all state of ``key`` under ``policy``."""
        await self._run(Calls.reset(policy, key))

    async def report(self, policy: str, key: str, response: object = None, **kw: object) -> NoReturn:
        """Not on the service door (the wire has no such RPC yet): raises OperationNotSupportedError."""
        raise no_report()

    async def ping(self) -> None:
        """Raise BackendUnavailableError unless the service accepts a connection within ``timeout``."""
        await AsyncChannels.wait_ready(self._channel().channel, self.timeout, self.url)

    async def aclose(self) -> None:
        if self._pump is not None:
            await self._pump.stop()
            self._pump = None
        c, self._conn = self._conn, None
        if c is not None and c.pid == os.getpid() and c.loop is AsyncChannels.owner():
            await c.channel.close()

    async def __aenter__(self) -> AsyncServiceBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
