"""The admission objects, written once: :class:`AsyncAdmission`, :class:`AsyncReservation` and the
:class:`AsyncHeartbeatPump` that keeps leases alive. ``scripts/unasync.py`` generates their sync twins
(``Admission``, ``Reservation``, ``HeartbeatPump``); their state and rules are
:mod:`taskgate.backends._admission_base`, and :mod:`taskgate.admission` is their public home."""

from __future__ import annotations

import logging
import os
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from taskgate.backends._admission_base import AdmissionState, ReservationState, held_here
from taskgate.backends._concurrency import AsyncLock, AsyncTicker
from taskgate.errors import TaskgateError
from taskgate.provider import Reported, is_rate_limit_error
from taskgate.types import Decision, Settlement

if TYPE_CHECKING:
    from taskgate.types import AdmitReply, HeartbeatReply

__all__ = ["AsyncAdmission", "AsyncAdmissionDoor", "AsyncHeartbeatPump", "AsyncReservation"]

log = logging.getLogger("taskgate")


class AsyncAdmissionDoor(Protocol):
    """What an admission, a reservation and a heartbeat pump call on their door."""

    async def release(self, lease_id: str, *, dropped: bool = False, now: int | None = None) -> bool: ...
    async def debit(self, policy: str, key: str, tokens: int = 1, *, now: int | None = None) -> Decision: ...
    async def settle(
        self, policy: str, key: str, reservation_id: str, actual: int, *, now: int | None = None
    ) -> Settlement: ...
    async def heartbeat(self, lease_ids: list[str], *, now: int | None = None) -> HeartbeatReply: ...
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


class AsyncAdmission(AdmissionState):
    """An admission: a context manager that releases its slot on exit (``dropped=True`` if the block raised).
    ``allowed`` tells whether it was admitted, ``binding_axis`` which axis denied it."""

    def __init__(
        self,
        door: AsyncAdmissionDoor,
        policy: str,
        key: str,
        reply: AdmitReply,
        tokens: int,
        accounting: str,
        now: int | None = None,
    ) -> None:
        super().__init__(policy, key, reply, tokens, accounting, now)
        self._door = door
        self._pump: AsyncHeartbeatPump | None = None

    async def settle(self, usage: object) -> Settlement | Decision:
        """Charge the actual cost: an int, or a usage object/dict (OpenAI- or Anthropic-style)."""
        how, n = self._settle_plan(usage)
        if how == "settle":
            self.settled = await self._door.settle(
                self.policy, self.key, self.reservation_id, n, now=self.now
            )
            return self.settled
        d = await self._door.debit(self.policy, self.key, n, now=self.now) if n > 0 else self.decision
        self.settled = Settlement(d, n, 0)
        return d

    async def release(self, *, dropped: bool = False) -> bool:
        """Give the slot back (idempotent). ``dropped=True`` reports an overload (the adaptive limit shrinks).
        Returns True if the slot was still held, False if it had been released or reclaimed already."""
        extra = self._unsettled_on_release()
        if extra:
            await self.settle(extra)
        if self.released:
            return False
        self.released = True
        self.stop_heartbeat()
        return await self._door.release(self.lease_id, dropped=dropped, now=self.now)

    async def report(
        self, response: object = None, *, status: int | None = None, retry_after: float | None = None
    ) -> Reported:
        """What the provider said about this admission's (policy, key): see :meth:`RedisBackend.report`."""
        r = await self._door.report(
            self.policy, self.key, response, status=status, retry_after=retry_after, now=self.now
        )
        if r.report.rate_limited:
            self.rate_limited = r
        return r

    def start_heartbeat(self, pump: AsyncHeartbeatPump) -> None:
        """Have ``pump`` renew the lease while it is held."""
        if self.held:
            self._pump = pump
            pump.register(self)

    def stop_heartbeat(self) -> None:
        """Stop renewing the lease from here, and keep it held: another process keeps it alive (an RQ horse
        for its worker), or lets it expire by its TTL."""
        if self._pump is not None:
            self._pump.unregister(self)
            self._pump = None

    async def hand_over(self) -> None:
        """The holder is done, and someone else releases the lease (an RQ horse hands it to its worker):
        charge an unsettled estimate as :meth:`release` would and stop renewing the lease, without telling
        the store that the slot is free. A failed charge raises after the lease stopped being renewed."""
        try:
            extra = self._unsettled_on_release()
            if extra:
                await self.settle(extra)
        finally:
            if self.held:
                self.released = True
                self.stop_heartbeat()

    async def __aenter__(self) -> AsyncAdmission:
        self._token = held_here.set(self)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self.allowed and is_rate_limit_error(e) and self.rate_limited is None:
                try:  # an SDK's rate-limit error raised in the block: the fleet learns it
                    await self.report(e)
                except TaskgateError as err:
                    log.warning("taskgate: could not report the provider's 429: %s", err)
            if self.allowed:
                # a 429 already shrank an adaptive limit in the report: not a second time
                await self.release(dropped=et is not None and self.rate_limited is None)
        finally:
            if self._token is not None:
                held_here.reset(self._token)
                self._token = None


class AsyncHeartbeatPump:
    """Renews every registered lease each ``interval`` seconds in batched calls, from one
    :class:`~taskgate.backends._concurrency.AsyncTicker` per backend; marks admissions whose lease the store
    reports reclaimed, and survives any error (logs it, keeps going). Fork-safe: a forked child renews only
    its own leases, never its parent's."""

    def __init__(self, door: AsyncAdmissionDoor, interval: float) -> None:
        self._door = door
        self.interval = interval
        self._lock = AsyncLock()
        self._held: dict[str, weakref.ReferenceType[AsyncAdmission]] = {}
        self._pid = os.getpid()
        self._ticker = AsyncTicker(interval, self._beat_logged, "taskgate-heartbeat")

    def register(self, adm: AsyncAdmission) -> None:
        with self._lock:
            if os.getpid() != self._pid:  # forked: the parent's leases are not ours
                self._pid, self._held = os.getpid(), {}
            self._held[adm.lease_id] = weakref.ref(adm)
        self._ticker.start()

    def unregister(self, adm: AsyncAdmission) -> None:
        with self._lock:
            self._held.pop(adm.lease_id, None)

    async def beat(self) -> None:
        """Renew the registered leases now (one batched call)."""
        with self._lock:
            held = {k: r for k, r in self._held.items() if r() is not None}
            self._held = dict(held)
        if not held:
            return
        reply = await self._door.heartbeat(list(held))
        for lid in reply.reclaimed:
            adm = held[lid]()
            with self._lock:
                self._held.pop(lid, None)
            if adm is not None and not adm.released:
                adm._mark_reclaimed()

    async def _beat_logged(self) -> None:
        try:
            await self.beat()
        except Exception as e:  # never die: the next beat may succeed before the lease expires
            log.warning(
                "taskgate: heartbeat failed (%s: %s); retrying in %.1fs", type(e).__name__, e, self.interval
            )

    async def stop(self) -> None:
        await self._ticker.stop()


class AsyncReservation(ReservationState):
    """Tokens held in escrow by ``reserve``; ``settle(actual)`` charges the actual and refunds the rest.
    Unsettled, the estimate stays charged (until its window ends)."""

    def __init__(
        self,
        door: AsyncAdmissionDoor,
        policy: str,
        key: str,
        d: Decision,
        rid: str,
        expires_at: int,
        now: int | None = None,
    ) -> None:
        super().__init__(policy, key, d, rid, expires_at, now)
        self._door = door

    async def settle(self, usage: object, *, now: int | None = None) -> Settlement:
        """Charge the actual (an int or a usage object); ``now`` defaults to the clock given to reserve."""
        n = self._check(usage)
        when = self.now if now is None else now
        self.settlement = await self._door.settle(self.policy, self.key, self.id, n, now=when)
        return self.settlement
