"""The policy model: frozen dataclasses for one policy's axes and behaviour, and :class:`Policies` by name.

Built by :mod:`taskgate.policy_file` from the policy file (or a mapping); imported by everyone as
:mod:`taskgate.policy`. The engine's ARGV for them is marshalled by :mod:`taskgate.engine.plan`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from taskgate.errors import PolicyNotFoundError

__all__ = [
    "STRATEGIES",
    "BudgetSpec",
    "ConcurrencySpec",
    "DeferralSpec",
    "FairnessSpec",
    "Policies",
    "Policy",
    "PolicySource",
    "ProviderSpec",
    "RateSpec",
    "Strategy",
]

Strategy: TypeAlias = Literal["gcra", "tokenBucket", "fixedWindow", "slidingWindow", "slidingWindowLog"]
STRATEGIES: tuple[str, ...] = ("gcra", "tokenBucket", "fixedWindow", "slidingWindow", "slidingWindowLog")


@dataclass(frozen=True, slots=True)
class RateSpec:
    """The rate axis (:func:`taskgate.engine.plan.rate_params` turns it into the engine's ARGV)."""

    strategy: Strategy
    limit: int = 0
    period_ms: int = 0
    burst: int = 1
    capacity: int = 0
    refill_per_sec: float = 0.0
    window_ms: int = 0
    buckets: int = 10
    # `arithmetic: tolerant`: comparisons and roundings forgive a few ulps of float error (see the README);
    # the default is ThrottleKit's plain double arithmetic, bit for bit.
    tolerant: bool = False

    @property
    def max_cost(self) -> int:
        """The largest cost one call can ever be granted."""
        if self.strategy == "gcra":
            return self.burst
        if self.strategy == "tokenBucket":
            return self.capacity
        return self.limit

    def _describe(self) -> str:
        s = self.strategy
        if s == "gcra":
            return f"gcra {self.limit}/{self.period_ms}ms burst {self.burst}"
        if s == "tokenBucket":
            return f"tokenBucket capacity {self.capacity} refill {self.refill_per_sec}/s"
        extra = f" {self.buckets} buckets" if s == "slidingWindow" else ""
        return f"{s} {self.limit}/{self.window_ms}ms{extra}"

    def describe(self) -> str:
        text = self._describe()
        return f"{text}, tolerant arithmetic" if self.tolerant else text


@dataclass(frozen=True, slots=True)
class BudgetSpec:
    """A token budget: ``budget`` units per window of ``window_ms`` (windows aligned to the epoch)."""

    budget: int
    window_ms: int


@dataclass(frozen=True, slots=True)
class ConcurrencySpec:
    """In-flight slots. ``min_limit == max_limit`` pins the ceiling; otherwise the limit adapts."""

    min_limit: int
    max_limit: int
    per_key: bool = False
    lease_ttl_ms: int = 30_000

    @property
    def adaptive(self) -> bool:
        return self.min_limit < self.max_limit


@dataclass(frozen=True, slots=True)
class DeferralSpec:
    """Defaults for deferred tasks (Celery/RQ); task options override them."""

    max_deferrals: int = 1000
    on_exhausted: Literal["fail", "run"] = "fail"
    jitter_ms: int = 50
    # where a task waits: "always" in the engine's waiting room, "never" (re-published to the broker with a
    # countdown), "auto": in the waiting room when the store persists its data (AOF or RDB), else "never"
    park: Literal["auto", "always", "never"] = "auto"


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """What a provider's 429s may do (``provider: {maxHold, maxDeferrals, horizon}``): a reported hold is
    capped at ``max_hold_ms`` (with a warning); a task deferred by its own 429s more than ``max_deferrals``
    times fails with :class:`~taskgate.errors.ThrottledError`; callers denied by the provider's pacing are
    given return slots up to ``horizon_ms`` ahead (beyond it they come back then and ask again: a shorter
    horizon follows a raised limit sooner, at the cost of more re-queues)."""

    max_hold_ms: int = 3_600_000
    max_deferrals: int = 20
    horizon_ms: int = 10_000


@dataclass(frozen=True, slots=True)
class FairnessSpec:
    """Weights of the fair keys (``fair_key=``) in the waiting rooms of a policy: a fair key of weight ``w``
    gets ``w / (sum of the waiting keys' weights)`` of the slots. Runtime weights in the store
    (``taskgate fairness set``) override these."""

    weights: tuple[tuple[str, float], ...] = ()
    default_weight: float = 1.0
    declared: bool = False  # the policy file has a ``fairness:`` section (the Fleet door splits by tenant)

    def weight(self, fair_key: str) -> float:
        return dict(self.weights).get(fair_key, self.default_weight)


@dataclass(frozen=True, slots=True)
class Policy:
    """One named policy: any of the rate, concurrency and cost axes, and how to behave around them."""

    name: str
    rate: RateSpec | None = None
    concurrency: ConcurrencySpec | None = None
    budgets: tuple[BudgetSpec, ...] = ()
    accounting: Literal["escrow", "debit"] = "escrow"
    fail: Literal["open", "closed"] = "closed"
    booking_horizon_ms: int = 0
    booking_grace_ms: int = 100
    deferral: DeferralSpec = field(default_factory=DeferralSpec)
    counters: bool = True
    provider: ProviderSpec = field(default_factory=ProviderSpec)
    fairness: FairnessSpec = field(default_factory=FairnessSpec)

    @property
    def kind(self) -> str:
        axes = [
            a
            for a, on in (("rate", self.rate), ("concurrency", self.concurrency), ("cost", self.budgets))
            if on
        ]
        if len(axes) > 1:
            return "unified"
        return {"rate": "rateLimit", "concurrency": "concurrency", "cost": "tokenBudget"}[axes[0]]

    @property
    def admits(self) -> bool:
        """Admit applies to a policy with a concurrency or a budget axis (not to a plain rate limiter)."""
        return self.concurrency is not None or bool(self.budgets)


class Policies(Mapping[str, Policy]):
    """The loaded policies by name; ``policies[name]`` raises :class:`PolicyNotFoundError` if unknown."""

    def __init__(self, policies: Mapping[str, Policy] | None = None) -> None:
        self._p: dict[str, Policy] = dict(policies or {})

    def __getitem__(self, name: str) -> Policy:
        try:
            return self._p[name]
        except KeyError:
            raise PolicyNotFoundError(name, list(self._p)) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._p)

    def __len__(self) -> int:
        return len(self._p)

    def __repr__(self) -> str:
        return f"Policies({sorted(self._p)})"


PolicySource: TypeAlias = "Policies | Mapping[str, Any] | str | os.PathLike[str] | None"
