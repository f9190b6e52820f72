"""A Celery app for the integration tests, configured by environment (each test starts real workers on it).

TG_BROKER (amqp:// or redis://), TG_STORE (the taskgate store URL), TG_PREFIX (key prefix for this run),
TG_RECORD (a Redis URL where every body execution is recorded), TG_QUEUE (this run's queue).
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import redis
from celery import Celery

import taskgate
import taskgate.celery
from tests.fleet import GrantLog

BROKER = os.environ.get("TG_BROKER", "memory://")
STORE = os.environ.get("TG_STORE", "memory://")
PREFIX = os.environ.get("TG_PREFIX", "tgcelery")
RECORD = redis.Redis.from_url(os.environ.get("TG_RECORD", "redis://127.0.0.1:6379/9"))

POLICIES: dict[str, Any] = {
    "rate10": {"strategy": "gcra", "limit": 10, "period": "1s", "burst": 1},
    "rate20": {"strategy": "gcra", "limit": 20, "period": "1s", "burst": 1},
    "tenant5": {"strategy": "gcra", "limit": 5, "period": "1s", "burst": 1},
    "conc3": {"concurrency": {"maxLimit": 3, "leaseTtl": "3s"}},
    "random": {"strategy": "gcra", "limit": 100, "period": "1s", "burst": 5},
    "hold1": {"concurrency": {"maxLimit": 1, "leaseTtl": "3s"}},
}

app = Celery(
    "tgapp", broker=BROKER, backend=f"redis://127.0.0.1:6379/{int(os.environ.get('TG_RESULT_DB', '8'))}"
)
app.conf.update(
    task_default_queue=os.environ.get("TG_QUEUE", "celery"),  # one queue per test run: runs never mix
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=4,
    task_acks_late=os.environ.get("TG_ACKS_LATE") == "1",
    task_reject_on_worker_lost=os.environ.get("TG_ACKS_LATE") == "1",
    worker_hijack_root_logger=False,
)
taskgate.celery.install(
    app,
    GrantLog(taskgate.connect(STORE, POLICIES, prefix=PREFIX), RECORD, PREFIX),  # <prefix>:grant
    short_wait_ms=int(os.environ.get("TG_SHORT_WAIT_MS", "250")),
)


def record(kind: str, ident: str, extra: str = "") -> None:
    RECORD.rpush(f"{PREFIX}:{kind}", f"{ident}|{time.time():.6f}|{os.getpid()}|{extra}")


# shared=False on every task: the tests reload this module, and a shared task (Celery's default) would join
# every Celery app made later in the session, each reload's callable colliding with the last under one name.
@app.task(shared=False, bind=True, throttle="rate10")
def paced(self: Any, n: int) -> int:
    record("start", str(self.request.id))
    return n


@app.task(shared=False, bind=True, throttle="rate20")
def paced20(self: Any, n: int) -> int:
    record("start", str(self.request.id))
    return n


@app.task(shared=False, bind=True, throttle="tenant5", key="tenant")
def per_tenant(self: Any, tenant: str, n: int) -> int:
    record("start", str(self.request.id), tenant)
    return n


@app.task(shared=False, bind=True, throttle="conc3")
def slow(self: Any, seconds: float) -> float:
    record("start", str(self.request.id))
    time.sleep(seconds)
    record("end", str(self.request.id))
    return seconds


@app.task(shared=False, bind=True, throttle="random")
def jittery(self: Any, n: int) -> int:
    record("start", str(self.request.id))
    time.sleep(random.random() * 0.01)
    return n


@taskgate.celery.task_throttled.connect
def _on_throttled(sender: Any = None, task_id: str = "", **kw: Any) -> None:
    record("defer", str(task_id), str(kw.get("axis")))


@app.task(shared=False, bind=True, throttle="hold1", max_retries=1)
def flaky(self: Any, n: int) -> int:
    record("start", str(self.request.id), str(self.request.retries))
    if self.request.retries == 0:
        raise self.retry(countdown=0.2)
    return n


@app.task(shared=False)
def add1(x: int) -> int:
    record("add1", str(x))
    return x + 1


@app.task(shared=False)
def total(xs: list[int]) -> int:
    record("total", str(sum(xs)))
    return sum(xs)


@app.task(shared=False)
def noop(n: int) -> int:
    return n
