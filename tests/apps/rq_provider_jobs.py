"""RQ jobs calling the mock provider (``bench/mock_provider.py``) for ``tests/test_provider_rq.py``: real
``rq worker --worker-class taskgate.rq.Worker`` processes import this module. Configured by environment, read
at import: TG_STORE (the taskgate store URL), TG_PREFIX (key prefix of the run, for the store and the
records), TG_PROVIDER (the mock's base URL). Each 200 is recorded in the job's RQ Redis (``<prefix>:ok``)."""

from __future__ import annotations

import os
from typing import Any, ClassVar

from rq import get_current_job

import taskgate
import taskgate.rq
from bench.mock_provider import call_provider

STORE = os.environ.get("TG_STORE", "memory://")
PREFIX = os.environ.get("TG_PREFIX", "tgrqp")
PROVIDER = os.environ.get("TG_PROVIDER", "http://127.0.0.1:1")
KEY = "org-1"  # one provider key shared by every worker

_LLM: dict[str, Any] = {
    "concurrency": {"minLimit": 2, "maxLimit": 8, "leaseTtl": "30s"},
    "provider": {"maxDeferrals": 50},
    "deferral": {"maxDeferrals": 1000, "park": "never"},
}
POLICIES: dict[str, Any] = {
    "llm": _LLM,  # deferred through RQ's scheduler
    "llm_room": {**_LLM, "deferral": {"maxDeferrals": 1000, "park": "always"}},  # parked in the waiting room
    "capped": {"concurrency": {"maxLimit": 4, "leaseTtl": "30s"}, "provider": {"maxDeferrals": 1}},
}

if os.environ.get("TG_STORE"):
    taskgate.rq.configure(taskgate.connect(STORE, POLICIES, prefix=PREFIX))


def _call(i: int) -> int:
    job = get_current_job()
    assert job is not None
    status = call_provider(PROVIDER, str(i))
    job.connection.rpush(f"{PREFIX}:ok", str(i))
    return status


@taskgate.rq.throttled("llm", key=lambda i: KEY)
def call(i: int) -> int:
    return _call(i)


@taskgate.rq.throttled("llm_room", key=lambda i: KEY)
def call_room(i: int) -> int:
    return _call(i)


class _Resp:
    status_code = 429
    headers: ClassVar[dict[str, str]] = {"retry-after": "0.2"}


class RateLimitError(Exception):
    """The shape of ``openai.RateLimitError`` (duck-typed: no SDK needed)."""

    status_code = 429
    response = _Resp()


@taskgate.rq.throttled("capped", key=lambda i: KEY)
def always_429(i: int) -> None:
    job = get_current_job()
    assert job is not None
    job.connection.rpush(f"{PREFIX}:tries", str(i))
    raise RateLimitError("Error code: 429 - rate limit reached")


@taskgate.rq.throttled("llm", key=lambda i: KEY)
def once_429(i: int) -> int:
    """Refused for rate on its first try (an SDK error), fine once deferred by the provider."""
    job = get_current_job()
    assert job is not None
    job.connection.rpush(f"{PREFIX}:tries", str(i))
    if not (job.meta.get("taskgate_state") or {}).get("provider"):
        raise RateLimitError("Error code: 429 - rate limit reached")
    return i


class Worker(taskgate.rq.Worker):
    """``--worker-class tests.apps.rq_provider_jobs.Worker``: importing it configures the store above."""
