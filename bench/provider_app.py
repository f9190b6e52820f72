"""The Celery app ``bench/provider.py`` runs real workers on, and the task body it (and
``tests/test_provider.py``) uses: one call to the mock provider, its headers reported to the engine.

Configured by environment: TGB_BROKER, TGB_QUEUE, TGB_STORE (the taskgate store), TGB_PREFIX (its key prefix),
TGB_RECORD (a Redis URL where completions are counted), TGB_PROVIDER (the mock's base URL).
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from typing import Any, cast

import redis
from celery import Celery

import taskgate
import taskgate.celery
from taskgate.provider import Reported

#  no rate of its own: the provider sets it. An adaptive concurrency limit shared by the fleet.
POLICIES: dict[str, Any] = {
    "llm": {
        "concurrency": {"minLimit": 4, "maxLimit": 32, "leaseTtl": "30s"},
        "provider": {"maxDeferrals": 50},
        "deferral": {"maxDeferrals": 1000},
    },
}
KEY = "org-1"  # one provider key (API key / organisation) shared by every worker


def admitted_at() -> float:
    """When the engine admitted the running task (epoch s, the engine's clock): its lease's expiry minus the
    lease TTL. Body start would be later by the admit's reply and the task's startup, so a task admitted
    just before a hold was written could look as if it started after it."""
    held = taskgate.current()
    backend = getattr(held, "backend", None)
    for a in getattr(held, "admissions", ()):
        c = backend.policy(a.policy).concurrency if backend is not None else None
        if a.lease_expires_at and c is not None:
            return float(a.lease_expires_at - c.lease_ttl_ms) / 1000.0
    return time.time()


def call_provider(url: str, call_id: str, tokens: int = 100) -> int:
    """One provider call from a throttled task: report what it said; on a 429 tell the mock when the engine's
    hold was written (for its check) and raise (the gate defers the task)."""
    started = admitted_at()
    req = urllib.request.Request(
        url + "/v1/call",
        data=b"",
        method="POST",
        headers={"X-Call": call_id, "X-Started": repr(started), "X-Tokens": str(tokens)},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            taskgate.current().report(resp.headers)
            return int(resp.status)
    except urllib.error.HTTPError as e:
        if e.code != 429:
            raise
        got = cast("list[Reported]", taskgate.current().report(e))
        hold = max(got, key=lambda r: r.hold_until)
        if hold.hold_until:
            written = (hold.hold_until - hold.retry_after_ms) / 1000.0  # the engine's clock at the write
            q = f"{url}/held?written={written!r}&until={hold.hold_until / 1000.0!r}"
            urllib.request.urlopen(urllib.request.Request(q, data=b"", method="POST"), timeout=10).close()
        raise


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
