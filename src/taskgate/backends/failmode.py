"""The answer a door gives when its store or service cannot be reached and a fail mode says to decide anyway:
the same Decision from the gRPC server (a policy's ``fail``) and from its client (``fail=``), as ThrottleKit
gives it."""

from __future__ import annotations

from typing import Literal

from taskgate.policy import Policy
from taskgate.types import Decision

__all__ = ["FailMode", "fail_decision", "policy_limit"]

FailMode = Literal["open", "closed"]


def policy_limit(p: Policy) -> int:
    """The headline limit: the rate limit (a token bucket's capacity), else the concurrency ceiling, else
    the smallest budget."""
    if p.rate is not None:
        return p.rate.capacity if p.rate.strategy == "tokenBucket" else p.rate.limit
    if p.concurrency is not None:
        return p.concurrency.max_limit
    return min(b.budget for b in p.budgets)


def fail_decision(p: Policy | None, now_ms: int, retry_ms: int, mode: FailMode | None = None) -> Decision:
    """The Decision given while the store cannot be reached: ``mode`` (a client's ``fail=``, else the
    policy's own ``fail``) decides — open: allowed; closed: denied, retry after ``retry_ms``. ``limit`` is the
    policy's :func:`policy_limit`, 0 for a policy the caller does not know."""
    fail = mode if mode is not None else (p.fail if p is not None else "closed")
    limit = policy_limit(p) if p is not None else 0
    if fail == "open":
        return Decision(True, limit, 0, now_ms, 0)
    return Decision(False, limit, 0, now_ms + retry_ms, retry_ms)
