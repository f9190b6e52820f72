"""Policies: the model and the loader of the policy file (ThrottleKit's format plus additive keys).

A file::

    version: 1
    limiters:
      api:                       # rate only: check / check_many / peek / forecast
        strategy: gcra
        limit: 10
        period: 1s
        burst: 1
      llm:                       # unified: rate x concurrency x cost, served by admit
        strategy: gcra
        limit: 60
        period: 1m
        concurrency: {minLimit: 2, maxLimit: 8, perKey: true, leaseTtl: 30s}
        tokenBudget:
          - {budget: 100000, windowMs: 1m}
          - {budget: 2000000, window: 1d}
        fail: closed

Every mistake is rejected at load with the policy name, the field and the value
(:class:`~taskgate.errors.InvalidPolicyError`).
"""

from __future__ import annotations

from taskgate.policy_file import load_policies, parse_duration, parse_policy
from taskgate.policy_model import (
    STRATEGIES,
    BudgetSpec,
    ConcurrencySpec,
    DeferralSpec,
    FairnessSpec,
    Policies,
    Policy,
    PolicySource,
    ProviderSpec,
    RateSpec,
    Strategy,
)

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
    "load_policies",
    "parse_duration",
    "parse_policy",
]
