"""Helpers for LLM token budgets: estimate before the call, settle the actual usage after.

A policy with per-tenant budgets, a request rate and an in-flight cap, used from one task declaration::

    limiters:
      llm:
        strategy: gcra
        limit: 600              # requests per minute, per tenant
        period: 1m
        burst: 10
        concurrency: {maxLimit: 8, perKey: true}
        tokenBudget: [{budget: 100000, window: 1m}, {budget: 2000000, window: 1d}]
        accounting: escrow      # or debit

    est = lambda messages, max_tokens: estimate(messages, max_tokens)

    @app.task(throttle="llm", key="tenant", tokens=est)
    def chat(tenant, messages, max_tokens=512):
        resp = client.chat.completions.create(model=..., messages=messages, max_tokens=max_tokens)
        taskgate.current().settle(resp.usage)
        return resp.choices[0].message.content

Accounting modes (per policy), and what they guarantee:

- **escrow** (default): admit reserves the estimate in every budget (admitted only if it fits entirely), and
  ``settle(actual)`` charges the difference: a refund when the call used less, an extra charge when it used
  more. If every actual is at most its estimate, the tokens charged in a window **never exceed the budget**.
  An actual above its estimate is charged in full (overshoot at most the sum of the excesses in flight).
  A task that fails settles what it reports; one that never settles (crash, or no ``settle`` call) keeps the
  estimate charged until its window ends.
- **debit** (ThrottleKit's semantics): admit only checks that budget remains; the actual is debited after
  the call, and a debit is admitted iff budget remains before it, the crossing debit counting in full. The
  overshoot of a window is therefore bounded by **in-flight calls x the largest single cost** (with a
  concurrency cap C and calls of at most M tokens: at most C x M over the budget).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from taskgate.admission import current, usage_tokens

__all__ = ["CHARS_PER_TOKEN", "current", "estimate", "usage_tokens"]

CHARS_PER_TOKEN = 4.0
MESSAGE_OVERHEAD = 4  # role and separators per chat message, roughly


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable) and not isinstance(content, (bytes, Mapping)):
        return "".join(_text_of(c) for c in content)
    if isinstance(content, Mapping):
        for k in ("text", "content"):
            if isinstance(content.get(k), (str, list)):
                return _text_of(content[k])
    return ""


def estimate(
    messages: str | Iterable[Any] | None = None,
    max_tokens: int = 0,
    *,
    prompt: str | None = None,
    chars_per_token: float = CHARS_PER_TOKEN,
) -> int:
    """A cheap upper-bound-ish token estimate: input characters / ``chars_per_token`` (+ a small overhead per
    chat message) + ``max_tokens`` for the output. ``messages`` is a prompt string or chat messages (dicts or
    objects with ``content``, OpenAI/Anthropic style, text parts included). Pass your own callable (a real
    tokenizer) as the task's ``tokens=`` to replace it."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"max_tokens must be an int >= 0, got {max_tokens!r}")
    if not chars_per_token > 0:
        raise ValueError(f"chars_per_token must be > 0, got {chars_per_token!r}")
    chars, overhead = 0, 0
    for part in (messages, prompt):
        if part is None:
            continue
        if isinstance(part, str):
            chars += len(part)
            continue
        for m in part:
            content = m.get("content") if isinstance(m, Mapping) else getattr(m, "content", m)
            chars += len(_text_of(content))
            overhead += MESSAGE_OVERHEAD
    return math.ceil(chars / chars_per_token) + overhead + max_tokens
