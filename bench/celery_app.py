"""The Celery app ``bench/celery.py`` runs real ``celery worker`` processes on, configured by environment:

TGB_BROKER    broker URL (default: the local RabbitMQ)
TGB_QUEUE     the queue this fleet consumes (each fleet has its own)
TGB_TASKGATE  "1": ``taskgate.celery.install()`` on the app; "0": plain Celery (the baseline)
TGB_STORE     the taskgate store (Redis URL); TGB_PREFIX its key prefix for this run
TGB_RECORD    a Redis URL where the task bodies count completions and record start times

Every body is a no-op apart from one Redis call that lets the benchmark see it run (the same call in the
throttled and the unthrottled variant).
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

import taskgate
import taskgate.celery

BROKER = os.environ.get("TGB_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
QUEUE = os.environ.get("TGB_QUEUE", "tgbench")
TASKGATE = os.environ.get("TGB_TASKGATE", "1") == "1"
STORE = os.environ.get("TGB_STORE", "redis://127.0.0.1:6379/9")
PREFIX = os.environ.get("TGB_PREFIX", "tgbench")
RECORD = redis.Redis.from_url(os.environ.get("TGB_RECORD", "redis://127.0.0.1:6379/5"))
RATE = int(os.environ.get("TGB_RATE", "10"))

POLICIES: dict[str, Any] = {
    # never binding for a no-op workload on a few processes: measures the gate's cost, not its waits
    "wide": {"strategy": "gcra", "limit": 100_000, "period": "1s", "burst": 1000},
    # the same without the policy's operating counters (one stats write less per decision, in the script)
    "wide_nc": {"strategy": "gcra", "limit": 100_000, "period": "1s", "burst": 1000, "counters": False},
    "paced": {"strategy": "gcra", "limit": RATE, "period": "1s", "burst": 1},
}

app = Celery("tgbench", broker=BROKER, set_as_current=True)
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=4,
    worker_hijack_root_logger=False,
)


def _count_deferral(sender: Any = None, **kw: Any) -> None:
    RECORD.incr(f"{PREFIX}:deferrals")


if TASKGATE:
    taskgate.celery.install(app, taskgate.connect(STORE, POLICIES, prefix=PREFIX))
    taskgate.celery.task_throttled.connect(_count_deferral)


def _done(run: str, total: int) -> None:
    """Count one completion of ``run``; the last one stamps the time."""
    if RECORD.incr(f"{PREFIX}:{run}:n") == total:
        RECORD.set(f"{PREFIX}:{run}:done", repr(time.time()))


def _noop(run: str, total: int) -> None:
    _done(run, total)


def _paced(run: str) -> None:
    RECORD.rpush(f"{PREFIX}:{run}:start", repr(time.time()))


# (registered without decorator syntax: Celery's decorators are untyped)
noop = app.task(name="bench.noop")(_noop)
noop_tg = app.task(name="bench.noop_tg", throttle="wide")(_noop)
noop_tg_nc = app.task(name="bench.noop_tg_nc", throttle="wide_nc")(_noop)
paced_tg = app.task(name="bench.paced_tg", throttle="paced")(_paced)
paced_celery = app.task(name="bench.paced_celery", rate_limit=f"{RATE}/s")(_paced)
