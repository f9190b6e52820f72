"""The Celery app ``bench/provider.py`` runs real workers on, and the task body it (and
``tests/test_provider.py``) uses: one call to the mock provider, its headers reported to the engine.

Configured by environment: TGB_BROKER, TGB_QUEUE, TGB_STORE (the taskgate store), TGB_PREFIX (its key prefix),
TGB_RECORD (a Redis URL where completions are counted), TGB_PROVIDER (the mock's base URL).
"""

from __future__ import annotations

import os
from typing import Any

import redis
from celery import Celery

import taskgate
import taskgate.celery
from bench.mock_provider import call_provider

__all__ = ["KEY", "POLICIES", "app", "call", "call_provider"]

#  no rate of its own: the provider sets it. An adaptive concurrency limit shared by the fleet. TGB_PARK:
#  the policy's deferral.park (auto: the waiting room only on a store that persists); TGB_HORIZON: its
#  provider.horizon (how far ahead callers paced by the provider get return slots).
POLICIES: dict[str, Any] = {
    "llm": {
        "concurrency": {"minLimit": 4, "maxLimit": 32, "leaseTtl": "30s"},
        "provider": {"maxDeferrals": 50, "horizon": os.environ.get("TGB_HORIZON", "10s")},
        "deferral": {"maxDeferrals": 1000, "park": os.environ.get("TGB_PARK", "auto")},
    },
}
KEY = "org-1"  # one provider key (API key / organisation) shared by every worker


BROKER = os.environ.get("TGB_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
QUEUE = os.environ.get("TGB_QUEUE", "tgprovider")
STORE = os.environ.get("TGB_STORE", "redis://127.0.0.1:6379/9")
PREFIX = os.environ.get("TGB_PREFIX", "tgprov")
PROVIDER = os.environ.get("TGB_PROVIDER", "http://127.0.0.1:1")
RECORD = redis.Redis.from_url(os.environ.get("TGB_RECORD", "redis://127.0.0.1:6379/5"))

app = Celery("tgprovider", broker=BROKER, set_as_current=True)
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
taskgate.celery.install(app, taskgate.connect(STORE, POLICIES, prefix=PREFIX))


def _call(i: int) -> None:
    call_provider(PROVIDER, str(i))
    RECORD.incr(f"{PREFIX}:done")


def _deferred(sender: Any = None, **kw: Any) -> None:
    RECORD.incr(f"{PREFIX}:deferred:{kw.get('axis')}")


taskgate.celery.task_throttled.connect(_deferred)
call = app.task(name="bench.provider_call", throttle="llm", key=lambda i: KEY)(_call)
