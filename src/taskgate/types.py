"""Value types shared by every door and the engine's planner: the Decision, and the replies of the engine's
operations (admission, reservation, window leases, heartbeats)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AdmitReply",
    "Decision",
    "Forecast",
    "HeartbeatReply",
    "LeaseRef",
    "ReserveReply",
    "Settlement",
    "WindowLease",
]


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one decision, as ThrottleKit defines it (times are epoch-ms, durations ms).

    ``limit`` is the effective ceiling (burst for gcra, capacity for tokenBucket, the quota for windows, the
    budget for a token budget, the current concurrency limit for a slot). ``remaining`` is never negative.
    ``reset_at`` is when the limiter is fully replenished. ``retry_after_ms`` is 0 exactly when allowed.
    ``booked`` means the capacity was taken now for a slot that becomes valid after ``retry_after_ms``;
    ``booking_token`` is presented later to use it.
    """

    allowed: bool
    limit: int
    remaining: int
    reset_at: int
    retry_after_ms: int
    booked: bool = False
    booking_token: str = ""

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True, slots=True)
class Forecast:
    """What a key could spend without waiting, when it next gains capacity and when it is full again."""

    spendable_now: int
    next_replenish_at: int
    full_at: int


@dataclass(frozen=True, slots=True)
class Settlement:
    """The result of settling a reservation: the budget afterwards, and what was charged or refunded."""

    decision: Decision
    charged: int
    refunded: int


@dataclass(frozen=True, slots=True)
class LeaseRef:
    """Where a lease lives. ``id`` is the public lease id: it encodes policy and key, so a lease can be
    released or renewed with nothing but its id, as ThrottleKit's Release/Heartbeat RPCs require."""

    id: str
    policy: str
    key: str
    member: str

    @classmethod
    def make(cls, policy: str, key: str, member: str) -> LeaseRef:
        return cls(f"{member}:{len(policy)}:{policy}{key}", policy, key, member)

    @classmethod
    def parse(cls, lease_id: str) -> LeaseRef:
        try:
            holder, acquired, plen, rest = lease_id.split(":", 3)
            n = int(plen)
            int(acquired)
        except ValueError:
            raise ValueError(f"not a taskgate lease id: {lease_id[:80]!r}") from None
        if not holder or n <= 0 or len(rest) <= n:
            raise ValueError(f"not a taskgate lease id: {lease_id[:80]!r}")
        return cls(lease_id, rest[:n], rest[n:], f"{holder}:{acquired}")


@dataclass(frozen=True, slots=True)
class AdmitReply:
    decision: Decision
    binding_axis: str
    lease: LeaseRef | None
    lease_expires_at: int
    reservation_id: str
    reserved_tokens: int


@dataclass(frozen=True, slots=True)
class ReserveReply:
    decision: Decision
    reservation_id: str
    expires_at: int


@dataclass(frozen=True, slots=True)
class WindowLease:
    """A chunk of a fixed window's budget, spent at once (the Fleet door's Reserve): ``granted`` units (0 =
    refused), valid until ``window_end`` (epoch-ms); ``retry_after_ms`` until the window ends when refused."""

    granted: int
    window_end: int
    limit: int
    retry_after_ms: int
    now: int  # the instant the engine decided at (epoch-ms)


@dataclass(frozen=True, slots=True)
class HeartbeatReply:
    live: list[str]
    reclaimed: list[str]
    next_deadline: int
