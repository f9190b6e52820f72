"""Pure conversions between taskgate's types and the ``throttlekit.v1`` messages, server side."""

from __future__ import annotations

from typing import Any

import yaml

from taskgate._proto import throttlekit_pb2 as pb
from taskgate.backends.failmode import fail_decision, policy_limit
from taskgate.policy import Policy
from taskgate.types import Decision

__all__ = ["encode_decision", "fail_decision", "put_decision", "policy_info", "policy_limit", "policy_spec"]


def put_decision(m: pb.Decision, d: Decision) -> None:
    """Write ``d`` into the message field ``m`` in place (cheaper than building a Decision and copying it)."""
    m.allowed = d.allowed
    m.limit = d.limit
    m.remaining = d.remaining
    m.reset_at = d.reset_at
    m.retry_after_ms = d.retry_after_ms
    if d.booked:
        m.booked = True
    if d.booking_token:
        m.booking_token = d.booking_token


def encode_decision(d: Decision) -> pb.Decision:
    m = pb.Decision()
    put_decision(m, d)
    return m


def policy_spec(p: Policy) -> dict[str, Any]:
    """The policy as a mapping in the policy-file format (``load_policies({name: spec})`` gives it back)."""
    spec: dict[str, Any] = {}
    r = p.rate
    if r is not None:
        spec["strategy"] = r.strategy
        if r.strategy == "gcra":
            spec.update(limit=r.limit, periodMs=r.period_ms, burst=r.burst)
        elif r.strategy == "tokenBucket":
            spec.update(capacity=r.capacity, refillPerSec=r.refill_per_sec)
        else:
            spec.update(limit=r.limit, windowMs=r.window_ms)
            if r.strategy == "slidingWindow":
                spec["buckets"] = r.buckets
        if r.tolerant:
            spec["arithmetic"] = "tolerant"
    if p.budgets:
        spec["tokenBudget"] = [{"budget": b.budget, "windowMs": b.window_ms} for b in p.budgets]
    c = p.concurrency
    if c is not None:
        spec["concurrency"] = {
            "minLimit": c.min_limit,
            "maxLimit": c.max_limit,
            "perKey": c.per_key,
            "leaseTtl": c.lease_ttl_ms,
        }
    d = p.deferral
    spec.update(
        accounting=p.accounting,
        fail=p.fail,
        bookingHorizon=p.booking_horizon_ms,
        bookingGrace=p.booking_grace_ms,
        deferral={"maxDeferrals": d.max_deferrals, "onExhausted": d.on_exhausted, "jitter": d.jitter_ms},
        counters=p.counters,
    )
    return spec


def policy_info(p: Policy) -> pb.PolicyInfo:
    strategy = p.rate.strategy if p.rate is not None else ""
    text = yaml.safe_dump(policy_spec(p), sort_keys=False, default_flow_style=None)
    return pb.PolicyInfo(name=p.name, kind=p.kind, strategy=strategy, limit=policy_limit(p), yaml=text)
