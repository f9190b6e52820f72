"""What the admission objects of both sides share: their state and rules (no I/O), :func:`current` and
:func:`usage_tokens`. The objects themselves are in ``backends/_async/admission.py`` (written once) and its
generated sync twin; :mod:`taskgate.admission` is their public home."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from taskgate.provider import Reported
from taskgate.types import Decision, Settlement

if TYPE_CHECKING:
    from taskgate.types import AdmitReply

__all__ = ["AdmissionState", "Held", "ReservationState", "current", "usage_tokens"]

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


held_here: contextvars.ContextVar[Held | None] = contextvars.ContextVar("taskgate_current", default=None)
"""What :func:`current` returns: set by ``with admission:`` and by the integrations around a task body."""


def current() -> Held:
    """The admission held by the running task (Celery, RQ) or ``with backend.admit(...)`` block."""
    a = held_here.get()
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


class AdmissionState:
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


class ReservationState:
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
