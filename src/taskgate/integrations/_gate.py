"""The queue-agnostic gate: one decision per task attempt across all of its policies.

Celery and RQ both call :meth:`Gate.enter` before a task body runs. It returns :class:`Admitted` (run the
body, holding an :class:`AdmissionGroup`) or :class:`Deferred` (re-queue the same task after
``countdown_ms``). Deferral state (count, booked slots, outages) travels with the task (a Celery header,
RQ's ``job.meta``) as a :class:`DeferralState`.

Order of policies: those served by ``admit`` (concurrency / budgets, releasable) are asked first and rate-only
policies last; if a later one denies, the earlier admissions are undone (slots released, reservations
refunded). So all must admit, and a denial holds nothing. Short waits (<= ``short_wait_ms``) are waited out
in place instead of a re-queue round trip.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from taskgate.admission import Admission, _current, usage_tokens
from taskgate.errors import BackendUnavailableError
from taskgate.integrations.options import ThrottleOptions
from taskgate.policy import DeferralSpec
from taskgate.types import Decision, Settlement

__all__ = ["AdmissionGroup", "Admitted", "Deferred", "DeferralState", "Gate"]

log = logging.getLogger("taskgate")
OUTAGE_BACKOFF_MS = (1000, 2000, 5000, 10_000, 30_000, 60_000)


@dataclass
class DeferralState:
    """What travels with a deferred task."""

    deferrals: int = 0
    bookings: dict[str, str] = field(default_factory=dict)
    outages: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"deferrals": self.deferrals, "bookings": dict(self.bookings), "outages": self.outages}

    @classmethod
    def from_dict(cls, d: object) -> DeferralState:
        if not isinstance(d, Mapping):
            return cls()
        b = d.get("bookings")
        return cls(
            deferrals=int(d.get("deferrals", 0) or 0),
            bookings={str(k): str(v) for k, v in b.items()} if isinstance(b, Mapping) else {},
            outages=int(d.get("outages", 0) or 0),
        )


class AdmissionGroup:
    """The admissions a task holds (one per policy). ``taskgate.current()`` inside the task returns it."""

    def __init__(self, admissions: Sequence[Admission], *, fail_open: bool = False) -> None:
        self.admissions = list(admissions)
        self.fail_open = fail_open  # admitted without asking (store down, fail: open)
        self.settled: list[Settlement | Decision] = []
        self._token: Any = None

    @property
    def allowed(self) -> bool:
        return True

    @property
    def reclaimed(self) -> bool:
        return any(a.reclaimed for a in self.admissions)

    def settle(self, usage: object) -> list[Settlement | Decision]:
        """Report the actual token usage (an int or an OpenAI/Anthropic-style usage) to every budget held."""
        n = usage_tokens(usage)
        targets = [a for a in self.admissions if a.reservation_id or a.tokens or a.accounting == "debit"]
        targets = [a for a in targets if a.settled is None]
        if not targets and not self.fail_open:
            budgeted = [a for a in self.admissions if a.tokens or a.reservation_id]
            if not budgeted:
                raise ValueError("settle(): this task holds no policy with a tokenBudget")
            raise RuntimeError("settle(): already settled")
        self.settled = [a.settle(n) for a in targets]
        return self.settled

    def release(self, *, dropped: bool = False) -> None:
        for a in self.admissions:
            try:
                a.release(dropped=dropped)
            except BackendUnavailableError as e:  # the lease expires by its TTL
                log.warning("taskgate: release failed (%s); the slot frees when its lease expires", e)

    def __enter__(self) -> AdmissionGroup:
        self._token = _current.set(self)
        return self

    def __exit__(self, et: object, e: object, tb: object) -> None:
        try:
            self.release(dropped=et is not None)
        finally:
            if self._token is not None:
                _current.reset(self._token)
                self._token = None


@dataclass
class Admitted:
    group: AdmissionGroup


@dataclass
class Deferred:
    countdown_ms: int
    state: DeferralState
    policy: str
    axis: str
    decision: Decision | None
    deferral: DeferralSpec  # the deferral defaults of ``policy`` (max_deferrals, on_exhausted)
    reason: str = "throttled"  # or "unavailable"


class Stats:
    """Per-process counters for the periodic INFO summary."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self.lock = threading.Lock()
        self.admitted = 0
        self.deferred: dict[str, int] = {}
        self.last = time.monotonic()

    def note(self, what: str) -> None:
        with self.lock:
            if what == "admitted":
                self.admitted += 1
            else:
                self.deferred[what] = self.deferred.get(what, 0) + 1
            now = time.monotonic()
            if now - self.last < self.every_s:
                return
            admitted, deferred, span = self.admitted, self.deferred, now - self.last
            self.admitted, self.deferred, self.last = 0, {}, now
        log.info(
            "taskgate: %d admitted, %d deferred (%s) in the last %.0fs",
            admitted,
            sum(deferred.values()),
            ", ".join(f"{k} {v}" for k, v in sorted(deferred.items())) or "none",
            span,
        )


class Gate:
    """Asks the engine for one task attempt. ``backend`` is a callable returning this process's backend."""

    def __init__(
        self,
        backend: Callable[[], Any],
        *,
        short_wait_ms: int = 250,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._backend = backend
        self.short_wait_ms = short_wait_ms
        self.sleep = sleep
        self.stats = Stats()

    @property
    def backend(self) -> Any:
        return self._backend()

    def enter(
        self,
        opts: ThrottleOptions,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        state: DeferralState,
        holder: str,
    ) -> Admitted | Deferred:
        key = opts.key_for(args, kwargs)
        cost = opts.units_for("cost", args, kwargs)
        tokens = opts.units_for("tokens", args, kwargs)
        deadline = time.monotonic() + self.short_wait_ms / 1000.0
        while True:
            out = self._once(opts, key, cost, tokens, state, holder.replace(":", "_"))
            if isinstance(out, Deferred) and out.reason == "throttled":
                wait = out.countdown_ms / 1000.0
                if time.monotonic() + wait <= deadline:
                    state = out.state  # keep any booking made, and wait it out here
                    self.sleep(wait)
                    continue
            self.stats.note("admitted" if isinstance(out, Admitted) else out.axis)
            return out

    def _once(
        self, opts: ThrottleOptions, key: str, cost: int, tokens: int, state: DeferralState, holder: str
    ) -> Admitted | Deferred:
        b = self.backend
        policies = [b.policy(n) for n in opts.policies]
        ordered = [p for p in policies if p.admits] + [p for p in policies if not p.admits]
        bookings = dict(state.bookings)
        held: list[Admission] = []
        current = ordered[0]
        try:
            for p in ordered:
                current = p
                token = bookings.get(p.name, "")
                book = opts.book and p.booking_horizon_ms > 0
                if p.admits:
                    adm = b.admit(
                        p.name,
                        key,
                        cost if p.rate else 1,
                        tokens if p.budgets else 0,
                        holder=holder,
                        book=book,
                        booking_token=token,
                        heartbeat=p.concurrency is not None,
                    )
                    d, axis = adm.decision, adm.binding_axis
                    if adm.allowed:
                        held.append(adm)
                        bookings.pop(p.name, None)
                        continue
                else:
                    d, axis = b.check(p.name, key, cost, book=book, token=token), "rate"
                    if d.allowed:
                        bookings.pop(p.name, None)
                        continue
                _undo(held)
                if d.booked:
                    bookings[p.name] = d.booking_token
                jitter = 0 if d.booked else random.randint(0, p.deferral.jitter_ms)
                nxt = DeferralState(state.deferrals, bookings, 0)
                return Deferred(d.retry_after_ms + jitter, nxt, p.name, axis, d, p.deferral)
        except BackendUnavailableError as e:
            _undo(held)
            if all(p.fail == "open" for p in ordered):
                log.warning("taskgate: store unavailable (%s); policy fail=open: running %s", e, opts.task)
                return Admitted(AdmissionGroup([], fail_open=True))
            wait = OUTAGE_BACKOFF_MS[min(state.outages, len(OUTAGE_BACKOFF_MS) - 1)]
            log.warning(
                "taskgate: store unavailable (%s); policy %r fail=closed: deferring %s by %.1fs",
                e,
                current.name,
                opts.task,
                wait / 1000,
            )
            nxt = DeferralState(state.deferrals, bookings, state.outages + 1)
            return Deferred(
                wait, nxt, current.name, "unavailable", None, current.deferral, reason="unavailable"
            )
        return Admitted(AdmissionGroup(held))


def _undo(held: list[Admission]) -> None:
    for a in held:
        try:
            if a.reservation_id and a.settled is None:
                a.settle(0)
            a.release()
        except BackendUnavailableError:
            pass
