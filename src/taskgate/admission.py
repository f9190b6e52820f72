"""What a caller holds after ``admit``: the slot (a lease), the reserved tokens, and how to give them back.

``Admission`` (sync) and ``AsyncAdmission`` share their state and rules (:class:`_AdmissionState`); only the
calls to the door differ. Inside ``with admission:`` (or a throttled Celery task / RQ job),
:func:`taskgate.current` returns it, so the body can ``taskgate.current().settle(usage)``.

Token rules: with escrow accounting the estimate is reserved at admit; ``settle(actual)`` charges the actual
(refund or extra charge). With debit accounting ``settle(actual)`` debits it. If the holder never settles,
the estimate counts as the actual (escrow: it stays charged; debit: it is debited at release) — usage is
never forgotten, and a crashed holder's reservation stays charged until its window ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from taskgate.errors import TaskgateError
from taskgate.provider import Reported, is_rate_limit_error
from taskgate.types import Decision, Settlement

if TYPE_CHECKING:
    from taskgate.types import AdmitReply, HeartbeatReply

__all__ = [
    "Admission",
    "AsyncAdmission",
    "AsyncReservation",
    "Held",
    "Reservation",
    "current",
    "usage_tokens",
]

log = logging.getLogger("taskgate")


class Held(Protocol):
    """What :func:`current` returns: an :class:`Admission`, or the group of admissions a throttled task holds
    (one per policy). ``settle`` reports the actual token usage; ``release(dropped=True)`` reports an
    overload early; both are idempotent with the task's own release. ``report`` tells the engine what the
    provider said (headers, an SDK exception, or ``status=429, retry_after=N``): a 429 holds the key for the
    whole fleet, and the task that hit it is deferred instead of failed when it raises."""

    @property
    def allowed(self) -> bool: ...

    def settle(self, usage: object) -> object: ...

    def release(self, *, dropped: bool = False) -> object: ...

    def report(
        self, response: object = None, *, status: int | None = None, retry_after: float | None = None
    ) -> object: ...


_current: contextvars.ContextVar[Held | None] = contextvars.ContextVar("taskgate_current", default=None)


def current() -> Held:
    """The admission held by the running task (Celery, RQ) or ``with backend.admit(...)`` block."""
    a = _current.get()
    if a is None:
        raise RuntimeError(
            "taskgate.current(): no admission is held here (call it inside a throttled task or a "
            "`with backend.admit(...)` block)"
        )
    return a


def usage_tokens(usage: object) -> int:
    """Tokens from a plain number or an OpenAI/Anthropic-style usage object or dict (``total_tokens``,
    ``prompt_tokens + completion_tokens`` or ``input_tokens + output_tokens``)."""
    if isinstance(usage, bool):
        raise ValueError(f"not a token count: {usage!r}")
    if isinstance(usage, int):
        if usage < 0:
            raise ValueError(f"token count must be >= 0, got {usage}")
        return usage
    if isinstance(usage, float) and usage.is_integer() and usage >= 0:
        return int(usage)

    def get(name: str) -> Any:
        if isinstance(usage, dict):
            return usage.get(name)
        return getattr(usage, name, None)

    total = get("total_tokens")
    if isinstance(total, int) and not isinstance(total, bool):
        return usage_tokens(total)
    for a, b in (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens")):
        x, y = get(a), get(b)
        if isinstance(x, int) or isinstance(y, int):
            return usage_tokens(int(x or 0)) + usage_tokens(int(y or 0))
    raise ValueError(
        f"cannot read a token count from {type(usage).__name__}: expected an int or a usage with "
        "total_tokens, "
        "prompt_tokens/completion_tokens or input_tokens/output_tokens"
    )


class _AdmissionState:
    """State and rules shared by the sync and async admissions."""

    def __init__(
        self, policy: str, key: str, reply: AdmitReply, tokens: int, accounting: str, now: int | None = None
    ) -> None:
        self.now = now  # an explicit clock given to admit (tests) is used by release/settle too
        self.policy = policy
        self.key = key
        self.decision: Decision = reply.decision
        self.binding_axis = reply.binding_axis
        self.lease_id = reply.lease.id if reply.lease else ""
        self.lease_expires_at = reply.lease_expires_at
        self.reservation_id = reply.reservation_id
        self.reserved_tokens = reply.reserved_tokens
        self.tokens = tokens
        self.accounting = accounting
        self.released = not self.lease_id
        self.settled: Settlement | None = None
        self.reclaimed = False
        self.on_reclaimed: Callable[[], None] | None = None
        self.rate_limited: Reported | None = None  # a 429 reported while held
        self._token: contextvars.Token[Any] | None = None

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    @property
    def held(self) -> bool:
        return bool(self.lease_id) and not self.released

    @property
    def booked(self) -> bool:
        return self.decision.booked

    @property
    def booking_token(self) -> str:
        return self.decision.booking_token

    @property
    def retry_after_ms(self) -> int:
        return self.decision.retry_after_ms

    def _mark_reclaimed(self) -> None:
        self.reclaimed = True
        log.warning(
            "taskgate: lease of policy %r was reclaimed (missed heartbeats); its slot is gone", self.policy
        )
        if self.on_reclaimed is not None:
            try:
                self.on_reclaimed()
            except Exception:
                log.exception("taskgate: on_reclaimed callback failed")

    def _settle_plan(self, usage: object) -> tuple[str, int]:
        """('settle'|'debit'|'none', tokens) for settling ``usage`` now."""
        if not self.allowed:
            raise RuntimeError("settle() on a denied admission: nothing was admitted")
        if self.settled is not None:
            raise RuntimeError("this admission is already settled")
        n = usage_tokens(usage)
        if self.reservation_id:
            return "settle", n
        if self.accounting == "debit" or self.tokens == 0:
            return "debit", n
        return "none", n

    def _unsettled_on_release(self) -> int:
        """Tokens to debit at release when the holder never settled (debit accounting)."""
        if self.allowed and self.settled is None and not self.reservation_id and self.accounting == "debit":
            return self.tokens
        return 0

    def __repr__(self) -> str:
        state = "allowed" if self.allowed else f"denied by {self.binding_axis}"
        return f"<{type(self).__name__} {self.policy}:{self.key!r} {state} lease={self.lease_id!r}>"


class _SyncDoor(Protocol):
    def release(self, lease_id: str, *, dropped: bool = False, now: int | None = None) -> bool: ...
    def debit(self, policy: str, key: str, tokens: int = 1, *, now: int | None = None) -> Decision: ...
    def settle(
        self, policy: str, key: str, reservation_id: str, actual: int, *, now: int | None = None
    ) -> Settlement: ...
    def heartbeat(self, lease_ids: list[str], *, now: int | None = None) -> HeartbeatReply: ...
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


class Admission(_AdmissionState):
    """A sync admission: a context manager that releases its slot on exit (``dropped=True`` if the block
    raised). ``allowed`` tells whether it was admitted, ``binding_axis`` which axis denied it."""

    def __init__(
        self,
        door: _SyncDoor,
        policy: str,
        key: str,
        reply: AdmitReply,
        tokens: int,
        accounting: str,
        now: int | None = None,
    ) -> None:
        super().__init__(policy, key, reply, tokens, accounting, now)
        self._door = door
        self._pump: HeartbeatPump | None = None

    def settle(self, usage: object) -> Settlement | Decision:
        """Charge the actual cost: an int, or a usage object/dict (OpenAI- or Anthropic-style)."""
        how, n = self._settle_plan(usage)
        if how == "settle":
            self.settled = self._door.settle(self.policy, self.key, self.reservation_id, n, now=self.now)
            return self.settled
        d = self._door.debit(self.policy, self.key, n, now=self.now) if n > 0 else self.decision
        self.settled = Settlement(d, n, 0)
        return d

    def release(self, *, dropped: bool = False) -> bool:
        """Give the slot back (idempotent). ``dropped=True`` reports an overload (the adaptive limit shrinks).
        Returns True if the slot was still held, False if it had been released or reclaimed already."""
        extra = self._unsettled_on_release()
        if extra:
            self.settle(extra)
        if self.released:
            return False
        self.released = True
        if self._pump is not None:
            self._pump.unregister(self)
        return self._door.release(self.lease_id, dropped=dropped, now=self.now)

    def report(
        self, response: object = None, *, status: int | None = None, retry_after: float | None = None
    ) -> Reported:
        """What the provider said about this admission's (policy, key): see :meth:`RedisBackend.report`."""
        r = self._door.report(
            self.policy, self.key, response, status=status, retry_after=retry_after, now=self.now
        )
        if r.report.rate_limited:
            self.rate_limited = r
        return r

    def start_heartbeat(self, pump: HeartbeatPump) -> None:
        if self.held:
            self._pump = pump
            pump.register(self)

    def hand_over(self) -> None:
        """The holder is done, and someone else releases the lease (an RQ horse hands it to its worker):
        charge an unsettled estimate as :meth:`release` would and stop renewing the lease, without telling
        the store that the slot is free. A failed charge raises after the lease stopped being renewed."""
        try:
            extra = self._unsettled_on_release()
            if extra:
                self.settle(extra)
        finally:
            if self.held:
                self.released = True
                if self._pump is not None:
                    self._pump.unregister(self)

    def __enter__(self) -> Admission:
        self._token = _current.set(self)
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self.allowed and is_rate_limit_error(e) and self.rate_limited is None:
                try:  # an SDK's rate-limit error raised in the block: the fleet learns it
                    self.report(e)
                except TaskgateError as err:
                    log.warning("taskgate: could not report the provider's 429: %s", err)
            if self.allowed:
                # a 429 already shrank an adaptive limit in the report: not a second time
                self.release(dropped=et is not None and self.rate_limited is None)
        finally:
            if self._token is not None:
                _current.reset(self._token)
                self._token = None


class _AsyncDoor(Protocol):
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


class AsyncAdmission(_AdmissionState):
    """The asyncio twin of :class:`Admission`: ``async with``; ``await release()`` / ``await settle()``."""

    def __init__(
        self,
        door: _AsyncDoor,
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
        extra = self._unsettled_on_release()
        if extra:
            await self.settle(extra)
        if self.released:
            return False
        self.released = True
        if self._pump is not None:
            self._pump.unregister(self)
        return await self._door.release(self.lease_id, dropped=dropped, now=self.now)

    async def report(
        self, response: object = None, *, status: int | None = None, retry_after: float | None = None
    ) -> Reported:
        r = await self._door.report(
            self.policy, self.key, response, status=status, retry_after=retry_after, now=self.now
        )
        if r.report.rate_limited:
            self.rate_limited = r
        return r

    def start_heartbeat(self, pump: AsyncHeartbeatPump) -> None:
        if self.held:
            self._pump = pump
            pump.register(self)

    async def __aenter__(self) -> AsyncAdmission:
        self._token = _current.set(self)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self.allowed and is_rate_limit_error(e) and self.rate_limited is None:
                try:
                    await self.report(e)
                except TaskgateError as err:
                    log.warning("taskgate: could not report the provider's 429: %s", err)
            if self.allowed:
                await self.release(dropped=et is not None and self.rate_limited is None)
        finally:
            if self._token is not None:
                _current.reset(self._token)
                self._token = None


class HeartbeatPump:
    """One daemon thread per backend that renews every registered lease each ``interval`` seconds in batched
    calls, marks admissions whose lease the store reports reclaimed, and survives any error (logs it, keeps
    going). Fork-safe: a child process starts its own thread and never renews its parent's leases."""

    def __init__(self, door: _SyncDoor, interval: float) -> None:
        self._door = door
        self.interval = interval
        self._lock = threading.Lock()
        self._held: dict[str, weakref.ReferenceType[Admission]] = {}
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def register(self, adm: Admission) -> None:
        with self._lock:
            if os.getpid() != self._pid:  # forked: the parent's leases and thread are not ours
                self._pid, self._held, self._thread = os.getpid(), {}, None
                self._stop = threading.Event()
            self._held[adm.lease_id] = weakref.ref(adm)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="taskgate-heartbeat", daemon=True)
                self._thread.start()

    def unregister(self, adm: Admission) -> None:
        with self._lock:
            self._held.pop(adm.lease_id, None)

    def beat(self) -> None:
        with self._lock:
            held = {k: r for k, r in self._held.items() if r() is not None}
            self._held = held
        if not held:
            return
        reply = self._door.heartbeat(list(held))
        for lid in reply.reclaimed:
            adm = held[lid]()
            with self._lock:
                self._held.pop(lid, None)
            if adm is not None and not adm.released:
                adm._mark_reclaimed()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as e:  # never die: the next beat may succeed before the lease expires
                log.warning(
                    "taskgate: heartbeat failed (%s: %s); retrying in %.1fs",
                    type(e).__name__,
                    e,
                    self.interval,
                )

    def stop(self) -> None:
        self._stop.set()


class AsyncHeartbeatPump:
    """The asyncio twin of :class:`HeartbeatPump` (one task per backend and event loop)."""

    def __init__(self, door: _AsyncDoor, interval: float) -> None:
        self._door = door
        self.interval = interval
        self._held: dict[str, weakref.ReferenceType[AsyncAdmission]] = {}
        self._task: asyncio.Task[None] | None = None

    def register(self, adm: AsyncAdmission) -> None:
        self._held[adm.lease_id] = weakref.ref(adm)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def unregister(self, adm: AsyncAdmission) -> None:
        self._held.pop(adm.lease_id, None)

    async def beat(self) -> None:
        self._held = {k: r for k, r in self._held.items() if r() is not None}
        if not self._held:
            return
        held = dict(self._held)
        reply = await self._door.heartbeat(list(held))
        for lid in reply.reclaimed:
            adm = held[lid]()
            self._held.pop(lid, None)
            if adm is not None and not adm.released:
                adm._mark_reclaimed()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.beat()
            except Exception as e:
                log.warning("taskgate: heartbeat failed (%s: %s)", type(e).__name__, e)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class _ReservationState:
    def __init__(
        self,
        policy: str,
        key: str,
        decision: Decision,
        reservation_id: str,
        expires_at: int,
        now: int | None = None,
    ) -> None:
        self.now = now  # an explicit clock given to reserve (tests) is used by settle too
        self.policy = policy
        self.key = key
        self.decision = decision
        self.id = reservation_id
        self.expires_at = expires_at
        self.settlement: Settlement | None = None

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    def _check(self, usage: object) -> int:
        if not self.allowed:
            raise RuntimeError("settle() on a denied reservation: nothing was reserved")
        if self.settlement is not None:
            raise RuntimeError("this reservation is already settled")
        return usage_tokens(usage)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.policy}:{self.key!r} id={self.id!r} allowed={self.allowed}>"


class Reservation(_ReservationState):
    """Tokens held in escrow by ``reserve``; ``settle(actual)`` charges the actual and refunds the rest.
    Unsettled, the estimate stays charged (until its window ends)."""

    def __init__(
        self,
        door: _SyncDoor,
        policy: str,
        key: str,
        d: Decision,
        rid: str,
        expires_at: int,
        now: int | None = None,
    ) -> None:
        super().__init__(policy, key, d, rid, expires_at, now)
        self._door = door

    def settle(self, usage: object, *, now: int | None = None) -> Settlement:
        """Charge the actual (an int or a usage object); ``now`` defaults to the clock given to reserve."""
        n = self._check(usage)
        when = self.now if now is None else now
        self.settlement = self._door.settle(self.policy, self.key, self.id, n, now=when)
        return self.settlement


class AsyncReservation(_ReservationState):
    """The asyncio twin of :class:`Reservation`."""

    def __init__(
        self,
        door: _AsyncDoor,
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
        n = self._check(usage)
        when = self.now if now is None else now
        self.settlement = await self._door.settle(self.policy, self.key, self.id, n, now=when)
        return self.settlement
