"""Per-tenant LLM token budgets end to end, through the Celery integration (4 worker threads)."""

from __future__ import annotations

import pytest

from taskgate.llm import estimate, usage_tokens
from tests.apps.llm_workload import run_workload


@pytest.mark.slow
def test_escrow_never_overshoots_and_uses_the_budget(redis_url: str) -> None:
    """Escrow: the tokens charged in any window never exceed the budget; >= 90% of each full window used."""
    run = run_workload(redis_url, "escrow")
    assert run.tasks > 0
    assert run.overshoot == 0, run.peak
    assert run.utilisation >= 0.9, {w: c / run.budget for w, c in run.charged.items()}


@pytest.mark.slow
def test_debit_overshoot_within_concurrency_times_max_cost(redis_url: str) -> None:
    run = run_workload(redis_url, "debit")
    assert run.overshoot <= run.workers * run.max_cost, run.peak
    assert run.utilisation >= 0.9


def test_tenants_isolated() -> None:
    import taskgate

    b = taskgate.connect("memory://iso", {"llm": {"tokenBudget": {"budget": 100, "window": "1m"}}})
    assert b.reserve("llm", "A", 100, now=60_000).allowed
    assert not b.reserve("llm", "A", 1, now=60_001).allowed
    assert b.reserve("llm", "B", 100, now=60_001).allowed


def test_estimate_and_usage() -> None:
    assert estimate("x" * 400, 100) == 200
    msgs = [
        {"role": "user", "content": "y" * 40},
        {"role": "user", "content": [{"type": "text", "text": "z" * 8}]},
    ]
    assert estimate(msgs, 10) == 12 + 2 * 4 + 10
    assert usage_tokens({"prompt_tokens": 5, "completion_tokens": 7}) == 12
    assert usage_tokens({"input_tokens": 5, "output_tokens": 7}) == 12
    assert usage_tokens(type("U", (), {"total_tokens": 9})()) == 9
    with pytest.raises(ValueError, match="usage"):
        usage_tokens({"nothing": 1})
    with pytest.raises(ValueError, match="max_tokens"):
        estimate("x", -1)
