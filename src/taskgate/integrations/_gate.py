"""The queue-agnostic gate: one decision per task attempt across all of its policies.

Celery and RQ both call :meth:`Gate.enter` before a task body runs. It returns :class:`Admitted` (run the
body, holding an :class:`AdmissionGroup`) or :class:`Deferred` (re-queue the same task after
``countdown_ms``). Deferral state (count, booked slots, outages) travels with the task (a Celery header,
RQ's ``job.meta``) as a :class:`DeferralState`.

Order of policies: those served by ``admit`` (concurrency / budgets, releasable) are asked first and rate-only
policies last; if a later one denies, the earlier admissions are undone (slots released, reservations
refunded). So all must admit, and a denial holds nothing. Short waits (<= ``short_wait_ms``) are waited out
in place instead of a re-queue round trip.

The provider (``taskgate.provider``): inside the task, ``taskgate.current().report(...)`` tells the engine
what the provider said, for every policy of the task (or one, ``policy=``). When the body raises after a 429
was reported, or raises an SDK rate-limit error (``openai.RateLimitError``, ``anthropic.RateLimitError``:
reported here without user code), :meth:`AdmissionGroup.__exit__` raises :class:`ProviderDeferred` instead
when the integration re-queues such tasks (``Gate(provider_deferral=True)``: Celery, RQ): it re-queues the
task through its deferral path, until the hold ends, without using up its retries nor ``max_deferrals``.
Past the policy's ``provider.maxDeferrals`` such deferrals of one task, it fails with
:class:`~taskgate.errors.ThrottledError` naming them. Without it the 429 is reported (the fleet holds the
key) and the body's error stands.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from taskgate.admission import Admission, held_here, usage_tokens
from taskgate.backends.base import Backend
from taskgate.backends.waiting import WaitingRoom
from taskgate.errors import BackendUnavailableError, TaskgateError, ThrottledError
from taskgate.integrations.options import ThrottleOptions
from taskgate.policy import DeferralSpec, Policy
from taskgate.provider import Reported, as_report, is_rate_limit_error
from taskgate.types import Decision, Settlement

__all__ = [
    "AdmissionGroup", "Admitted", "DeferralState", "Deferred", "Gate", "Parked", "ProviderDeferred"
]  # fmt: skip

log = logging.getLogger("taskgate")
OUTAGE_BACKOFF_MS = (1000, 2000, 5000, 10_000, 30_000, 60_000)


@dataclass
class DeferralState:
    """What travels with a deferred task."""

    deferrals: int = 0
    bookings: dict[str, str] = field(default_factory=dict)
    outages: int = 0
    promoted: str = ""  # the policy whose waiting room promoted this message (it carries that grant)
    provider: int = 0  # deferrals after the task's own 429s (capped by the policy's provider.maxDeferrals)
    # the store went away while this task was being decided in a waiting room: whether its claim or park
    # went through is unknown, so a "duplicate" answer next time cannot be trusted (it is decided afresh)
    unsure: bool = False

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "deferrals": self.deferrals,
            "bookings": dict(self.bookings),
            "outages": self.outages,
        }
        if self.promoted:
            d["promoted"] = self.promoted
        if self.provider:  # only once the provider refused the task: the header stays as it was otherwise
            d["provider"] = self.provider
        if self.unsure:
            d["unsure"] = 1
        return d

    @classmethod
    def from_dict(cls, d: object) -> DeferralState:
        if not isinstance(d, Mapping):
            return cls()
        b = d.get("bookings")
        return cls(
            deferrals=int(d.get("deferrals", 0) or 0),
            bookings={str(k): str(v) for k, v in b.items()} if isinstance(b, Mapping) else {},
            outages=int(d.get("outages", 0) or 0),
            promoted=str(d.get("promoted") or ""),
            unsure=bool(d.get("unsure")),
            provider=int(d.get("provider", 0) or 0),
        )


class AdmissionGroup:
    """The admissions a task holds (one per policy). ``taskgate.current()`` inside the task returns it.
    ``backend``, ``key``, ``policies`` (every policy of the task, rate-only ones too), ``state`` and ``task``
    say where a provider's report goes and how the task is deferred after a 429 (see the module)."""

    def __init__(
        self,
        admissions: Sequence[Admission],
        *,
        fail_open: bool = False,
        backend: Backend | None = None,
        key: str = "",
        policies: Sequence[str] = (),
        state: DeferralState | None = None,
        task: str = "",
        defer_on_429: bool = False,
    ) -> None:
        self.admissions = list(admissions)
        self.fail_open = fail_open  # admitted without asking (store down, fail: open)
        self.settled: list[Settlement | Decision] = []
        self.backend = backend
        self.key = key
        self.policies = list(policies)
        self.state = state or DeferralState()
        self.task = task
        self.defer_on_429 = defer_on_429  # the integration re-queues on ProviderDeferred
        self.reported: list[tuple[str, Reported]] = []  # (policy, what the engine made of a 429)
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

    def report(
        self,
        response: object = None,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        policy: str | None = None,
    ) -> list[Reported]:
        """Tell the engine what the provider said (headers, a response, an SDK exception, or ``status=429,
        retry_after=seconds``) for the task's key under each of its policies (or ``policy`` only)."""
        r = as_report(response, status=status, retry_after=retry_after)
        if policy is not None and policy not in self.policies:
            raise ValueError(f"report(policy={policy!r}): this task holds {self.policies or 'no policy'}")
        targets = [policy] if policy is not None else self.policies
        if self.backend is None or not targets:
            raise RuntimeError(
                "report(): this task was admitted without the store (fail: open, on_exhausted)"
            )
        out = [self.backend.report(name, self.key, r) for name in targets]
        if r.rate_limited:
            self.reported += zip(targets, out, strict=True)
        return out

    def _provider_deferral(self, e: object) -> Deferred | None:
        """After the body raised ``e``: a Deferred if the provider refused it for rate (a 429 reported, or
        an SDK rate-limit error, reported here), None for any other failure. Raises ThrottledError past the
        policy's ``provider.maxDeferrals``."""
        if e is None or self.backend is None or not self.policies:
            return None
        if not self.reported and is_rate_limit_error(e):
            try:
                self.report(e)
            except TaskgateError as err:
                log.warning("taskgate: could not report the provider's 429 for %s: %s", self.task, err)
                return None
        if not self.reported or not self.defer_on_429:
            return None
        ps = [self.backend.policy(n) for n in self.policies]
        cap = min(p.provider.max_deferrals for p in ps)
        name, worst = max(self.reported, key=lambda pr: pr[1].retry_after_ms)
        if self.state.provider >= cap:
            raise ThrottledError(
                f"task {self.task} was refused by the provider (429) {self.state.provider + 1} times under "
                f"policy {name!r}; provider.maxDeferrals={cap} reached",
                None,
            ) from (e if isinstance(e, BaseException) else None)
        jitter = random.randint(0, max(p.deferral.jitter_ms for p in ps))
        wait = worst.retry_after_ms or worst.report.hold_ms
        s = self.state
        nxt = DeferralState(s.deferrals, {}, 0, provider=s.provider + 1)
        spec = self.backend.policy(name).deferral
        return Deferred(wait + jitter, nxt, name, "provider", None, spec, reason="provider")

    def __enter__(self) -> AdmissionGroup:
        self._token = held_here.set(self)
        return self

    def __exit__(self, et: object, e: object, tb: object) -> None:
        deferral: Deferred | None = None
        try:
            deferral = self._provider_deferral(e)
        finally:
            try:
                # a 429 already shrank an adaptive limit in the report: not a second time
                self.release(dropped=et is not None and not self.reported)
            finally:
                if self._token is not None:
                    held_here.reset(self._token)
                    self._token = None
        if deferral is not None:
            raise ProviderDeferred(deferral) from (e if isinstance(e, BaseException) else None)


class ProviderDeferred(TaskgateError):
    """Raised by :meth:`AdmissionGroup.__exit__` when the provider refused the task's call for rate: the
    integration re-queues the task (``deferred``) instead of failing it. ``__cause__`` is the body's error."""

    def __init__(self, deferred: Deferred) -> None:
        super().__init__(
            f"the provider refused the call for rate (policy {deferred.policy!r}): deferred by "
            f"{deferred.countdown_ms} ms"
        )
        self.deferred = deferred


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
    reason: str = "throttled"  # or "unavailable", or "provider" (the task's own 429: ProviderDeferred)


@dataclass
class Parked:
    """The task waits in the waiting room of ``policy`` (``depth`` waiting there); or, ``duplicate``, this
    message is a second copy of a task that waits, was promoted or ran: it must not run."""

    policy: str
    depth: int
    axis: str
    duplicate: bool = False


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
        backend: Callable[[], Backend],
        *,
        short_wait_ms: int = 250,
        sleep: Callable[[float], None] = time.sleep,
        provider_deferral: bool = False,
    ) -> None:
        self._backend = backend
        self.short_wait_ms = short_wait_ms
        self.provider_deferral = provider_deferral  # AdmissionGroup raises ProviderDeferred after a 429
        self.sleep = sleep
        self.stats = Stats()

    @property
    def backend(self) -> Backend:
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
                nxt = DeferralState(state.deferrals, bookings, 0, provider=state.provider)
                return Deferred(d.retry_after_ms + jitter, nxt, p.name, axis, d, p.deferral)
        except BackendUnavailableError as e:
            _undo(held)
            return self._outage(e, opts, ordered, current, state, bookings)
        return Admitted(self._group(held, key, ordered, state, opts))

    def _group(
        self,
        held: list[Admission],
        key: str,
        ordered: Sequence[Policy],
        state: DeferralState,
        opts: ThrottleOptions,
    ) -> AdmissionGroup:
        """What an admitted task holds (and, in the body, reports to: a 429 defers it, see the module)."""
        return AdmissionGroup(
            held, backend=self.backend, key=key, policies=[p.name for p in ordered], state=state,
            task=opts.task, defer_on_429=self.provider_deferral,
        )  # fmt: skip

    def _outage(
        self,
        e: BackendUnavailableError,
        opts: ThrottleOptions,
        ordered: Sequence[Policy],
        current: Policy,
        state: DeferralState,
        bookings: dict[str, str],
    ) -> Admitted | Deferred:
        """The store is down: run (every policy fail=open) or defer with a growing backoff (fail=closed)."""
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
        nxt = dataclasses.replace(state, bookings=bookings, outages=state.outages + 1)
        return Deferred(wait, nxt, current.name, "unavailable", None, current.deferral, reason="unavailable")

    def enter_room(
        self,
        room: WaitingRoom,
        opts: ThrottleOptions,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        state: DeferralState,
        task_id: str,
        payload: bytes,
        *,
        redelivered: bool = False,
    ) -> Admitted | Parked | Deferred:
        """Like :meth:`enter`, with the engine's waiting room: a task that may not run now (after at most
        ``short_wait_ms`` in place) is parked, atomically with its decision, and comes back admitted. A
        message promoted from a room claims its grant there instead of paying again. An original message
        is recognised if its task already waits or ran (a redelivery after a crash between park and ack).
        ``redelivered``: the broker gives this message again after its worker died running it (acks_late):
        its grant was claimed by that run, so it is admitted afresh, like any task, instead of dropped."""
        key = opts.key_for(args, kwargs)
        fair_key = opts.fair_key_for(args, kwargs)
        cost = opts.units_for("cost", args, kwargs)
        tokens = opts.units_for("tokens", args, kwargs)
        b = self.backend
        policies = [b.policy(n) for n in opts.policies]
        ordered = [p for p in policies if p.admits] + [p for p in policies if not p.admits]
        held: list[Admission] = []
        current = ordered[0]
        # a message is a copy of one that ran only when the store says so for certain: not after its
        # worker died running it (acks_late redelivery), nor when the store went away mid-decision
        trusted = not (redelivered or state.unsure)
        try:
            for p in ordered:
                current = p
                units = (cost if p.rate else 1, tokens if p.budgets else 0)
                if p.name == state.promoted:
                    state = dataclasses.replace(state, unsure=True)  # until the claim answers
                    c = room.claim(p.name, key, task_id, units[1])
                    state = dataclasses.replace(state, unsure=False)
                    if c.admission is not None:
                        held.append(c.admission)
                        if c.wait_ms > 0:  # a rate slot booked ahead by the promoter: start at the slot
                            self.sleep(c.wait_ms / 1000.0)
                        continue
                    if c.status == "duplicate" and trusted:
                        _undo(held)
                        self.stats.note("duplicate")
                        return Parked(p.name, 0, "", duplicate=True)
                    # its lease expired on the way, or the room forgot it: admitted like any other
                deadline = time.monotonic() + self.short_wait_ms / 1000.0
                state = dataclasses.replace(state, unsure=True)  # until the room answers
                while True:
                    left = int((deadline - time.monotonic()) * 1000)
                    e = room.enter(
                        p.name, key, task_id, payload, *units, park_over_ms=max(left, -1),
                        dedupe=trusted and not state.promoted, fair_key=fair_key,
                    )  # fmt: skip
                    if e.status != "denied":
                        break
                    self.sleep(e.retry_after_ms / 1000.0)
                state = dataclasses.replace(state, unsure=False)
                if e.admission is not None:
                    held.append(e.admission)
                    continue
                if e.status == "waiting":  # on its way from a room (sent with its grant): take the grant
                    c = room.claim(p.name, key, task_id, units[1])
                    if c.admission is not None:
                        held.append(c.admission)
                        if c.wait_ms > 0:
                            self.sleep(c.wait_ms / 1000.0)
                        continue
                _undo(held)
                dup = e.status != "parked"
                self.stats.note("duplicate" if dup else e.binding_axis or "waiting")
                return Parked(p.name, e.depth, e.binding_axis, duplicate=dup)
        except BackendUnavailableError as e:
            _undo(held)
            return self._outage(e, opts, ordered, current, state, {})
        except TaskgateError as e:
            if "OOM" not in str(e):
                raise
            # the store is full (maxmemory): nothing more can wait in it; as when it is down, the policy's
            # fail mode decides (closed: re-published to the broker with a backoff), and nothing is lost
            _undo(held)
            full = BackendUnavailableError(f"the store is full (maxmemory): {e}")
            return self._outage(full, opts, ordered, current, state, {})
        self.stats.note("admitted")
        return Admitted(self._group(held, key, ordered, state, opts))

    def enter_at_send(
        self,
        room: WaitingRoom,
        opts: ThrottleOptions,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        task_id: str,
        payload: bytes,
    ) -> Literal["handed", "parked", "duplicate"]:
        """Decide a task of one policy when it is sent (so throttled work never queues on the broker):
        ``handed`` -- admitted now, its grant kept for the worker that receives it; ``parked`` -- it waits in
        the room and is sent when promoted (nothing to send now); ``duplicate`` -- a task with this id waits
        or ran already. Raises :class:`BackendUnavailableError` when the store is down."""
        (name,) = opts.policies
        p = self.backend.policy(name)
        key = opts.key_for(args, kwargs)
        cost = opts.units_for("cost", args, kwargs) if p.rate else 1
        tokens = opts.units_for("tokens", args, kwargs) if p.budgets else 0
        fair_key = opts.fair_key_for(args, kwargs)
        e = room.enter(name, key, task_id, payload, cost, tokens, hand_off=True, fair_key=fair_key)
        if e.status in ("handed", "parked"):
            return e.status
        return "duplicate"


def _undo(held: list[Admission]) -> None:
    for a in held:
        try:
            if a.reservation_id and a.settled is None:
                a.settle(0)
            a.release()
        except BackendUnavailableError:
            pass
