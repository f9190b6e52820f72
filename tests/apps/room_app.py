"""The Celery app of ``tests/test_room_workers.py`` and ``bench/backlog.py``, configured by environment.

TG_BROKER, TG_STORE (taskgate store URL), TG_PREFIX (key prefix), TG_QUEUE (this run's queue), TG_RATE (the
gcra limit per second), TG_PARK (deferral.park: always|never|auto), TG_CONC (a concurrency limit for
``held``), TG_RECORD (Redis URL where every body start is recorded), TG_WEIGHTS (the fairness weights of
``shared``: ``acme=3,beta=1``).
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery

import taskgate
import taskgate.celery

PREFIX = os.environ.get("TG_PREFIX", "tgroom")
RECORD = redis.Redis.from_url(os.environ.get("TG_RECORD", "redis://127.0.0.1:6379/5"))
PARK = os.environ.get("TG_PARK", "always")
PACED: dict[str, Any] = {
    "strategy": "gcra",
    "limit": int(os.environ.get("TG_RATE", "10")),
    "period": "1s",
    "burst": 1,
    "deferral": {"park": PARK},
}
WEIGHTS = {
    k: float(v) for k, _, v in (w.partition("=") for w in os.environ.get("TG_WEIGHTS", "").split(",") if w)
}
POLICIES: dict[str, Any] = {
    "paced": PACED,
    "tenant": PACED,
    "shared": {**PACED, "fairness": {"weights": WEIGHTS}},  # one limit for all (no key), shared by fair key
    "held": {
        "concurrency": {"maxLimit": int(os.environ.get("TG_CONC", "3")), "leaseTtl": "10s"},
        "deferral": {"park": PARK},
    },
}

app = Celery("tgroom", broker=os.environ.get("TG_BROKER", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(
    task_default_queue=os.environ.get("TG_QUEUE", "backlog"),
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=4,
    worker_hijack_root_logger=False,
    task_ignore_result=True,
    task_acks_late=os.environ.get("TG_ACKS_LATE") == "1",
    task_reject_on_worker_lost=os.environ.get("TG_ACKS_LATE") == "1",
)
taskgate.celery.install(
    app, taskgate.connect(os.environ.get("TG_STORE", "redis://127.0.0.1:6379/9"), POLICIES, prefix=PREFIX)
)


def _record(kind: str, ident: str, extra: str = "") -> None:
    RECORD.rpush(f"{PREFIX}:{kind}", f"{ident}|{time.time():.6f}|{os.getpid()}|{extra}")


@app.task(shared=False, bind=True, throttle="paced")
def paced(self: Any, n: int) -> int:
    _record("start", str(self.request.id))
    return n


@app.task(shared=False, bind=True, throttle="tenant", key="tenant")
def per_tenant(self: Any, tenant: str, n: int) -> int:
    _record("start", str(self.request.id), tenant)
    return n


@app.task(shared=False, bind=True, throttle="shared", fair_key="tenant")
def fair(self: Any, tenant: str, n: int) -> int:
    _record("start", str(self.request.id), tenant)
    return n


def _tenant_of(tenant: str) -> str:
    raise LookupError(f"no tenant {tenant!r}")


@app.task(shared=False, bind=True, throttle="shared", fair_key=_tenant_of)
def fair_broken(self: Any, tenant: str) -> None:
    _record("start", str(self.request.id), "broken")


@app.task(shared=False, bind=True, throttle="held")
def held(self: Any, seconds: float) -> float:
    _record("start", str(self.request.id))
    time.sleep(seconds)
    _record("end", str(self.request.id))
    return seconds


@app.task(shared=False, bind=True)
def free(self: Any, n: int, seconds: float = 0.0) -> int:
    _record("start" if not seconds else "warm", str(self.request.id), "free")
    time.sleep(seconds)
    return n
