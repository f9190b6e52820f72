"""The Backend protocol: the surface every door offers, so callers type against it and not against a door.

:class:`Backend` is what :func:`taskgate.connect` returns (``RedisBackend`` over Redis, a Redis Cluster or the
embedded ``memory://`` store; ``ServiceBackend`` over gRPC); :class:`AsyncBackend` is its asyncio twin
(:func:`taskgate.connect_async`). The gate of the Celery and RQ integrations and the gRPC server's servicer
take one of these, so mypy checks every call they make into a door against one list of signatures.

Every door offers these operations with these signatures (``now=`` is epoch-ms for tests; the service door
refuses it). What a door offers beyond them is its own: the direct door's ``client``, ``prefix`` and
``lease_window``; the service door's ``refresh_policies``. ``report`` on the service door raises
:class:`~taskgate.errors.OperationNotSupportedError` (its wire has no such RPC yet).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from taskgate.backends._async.admission import AsyncAdmission, AsyncReservation
    from taskgate.backends._sync.admission import Admission, Reservation
    from taskgate.policy import Policies, Policy
    from taskgate.provider import Reported
    from taskgate.types import Decision, Forecast, HeartbeatReply, Settlement

__all__ = ["AsyncBackend", "Backend"]


class Backend(Protocol):
    """A door to the engine (sync): see the module."""

    @property
    def url(self) -> str:
        """Where it decides (the password left out)."""
        ...

    @property
    def policies(self) -> Policies: ...

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between heartbeats of the leases it holds (a third of the shortest lease TTL)."""
        ...

    def policy(self, name: str) -> Policy: ...

    def check(
        self,
        policy: str,
        key: str,
        cost: int = 1,
        *,
        now: int | None = None,
        book: bool = False,
        token: str = "",
    ) -> Decision: ...

    def check_many(
        self, policy: str, keys: Sequence[str], cost: int = 1, *, now: int | None = None
    ) -> list[Decision]: ...

    def peek(self, policy: str, key: str, *, now: int | None = None) -> Decision: ...

    def forecast(self, policy: str, key: str, cost: int = 1, *, now: int | None = None) -> Forecast: ...

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
    ) -> Admission: ...

    def release(self, lease_id: str, *, dropped: bool = False, now: int | None = None) -> bool: ...

    def heartbeat(self, lease_ids: list[str], *, now: int | None = None) -> HeartbeatReply: ...

    def debit(self, policy: str, key: str, tokens: int = 1, *, now: int | None = None) -> Decision: ...

    def reserve(self, policy: str, key: str, tokens: int, *, now: int | None = None) -> Reservation: ...

    def settle(
        self, policy: str, key: str, reservation_id: str, actual: int, *, now: int | None = None
    ) -> Settlement: ...

    def reset(self, policy: str, key: str) -> None: ...

    def report(
        self,
        policy: str,
        key: str,
        response: object = None,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        now: int | None = None,
    ) -> Reported: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


class AsyncBackend(Protocol):
    """The asyncio twin of :class:`Backend`: the same operations, awaited (``aclose`` for ``close``)."""

    @property
    def url(self) -> str: ...

    @property
    def policies(self) -> Policies: ...

    @property
    def heartbeat_interval(self) -> float: ...

    def policy(self, name: str) -> Policy: ...

    async def check(
        self,
        policy: str,
        key: str,
        cost: int = 1,
        *,
        now: int | None = None,
        book: bool = False,
        token: str = "",
    ) -> Decision: ...

    async def check_many(
        self, policy: str, keys: Sequence[str], cost: int = 1, *, now: int | None = None
    ) -> list[Decision]: ...

    async def peek(self, policy: str, key: str, *, now: int | None = None) -> Decision: ...

    async def forecast(self, policy: str, key: str, cost: int = 1, *, now: int | None = None) -> Forecast: ...

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
    ) -> AsyncAdmission: ...

    async def release(self, lease_id: str, *, dropped: bool = False, now: int | None = None) -> bool: ...

    async def heartbeat(self, lease_ids: list[str], *, now: int | None = None) -> HeartbeatReply: ...

    async def debit(self, policy: str, key: str, tokens: int = 1, *, now: int | None = None) -> Decision: ...

    async def reserve(
        self, policy: str, key: str, tokens: int, *, now: int | None = None
    ) -> AsyncReservation: ...

    async def settle(
        self, policy: str, key: str, reservation_id: str, actual: int, *, now: int | None = None
    ) -> Settlement: ...

    async def reset(self, policy: str, key: str) -> None: ...

    async def report(
        self,
        policy: str,
        key: str,
        response: object = None,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        now: int | None = None,
    ) -> Reported: ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...
