"""RQ jobs and workers of ``tests/test_rq_room.py`` and ``bench/rq_backlog.py``: policies that park in the
waiting room (``deferral.park: always``). Configured by environment, read at import (each worker process
imports it through its worker class):

TG_STORE (taskgate store URL; default ``memory://``), TG_PREFIX (key prefix of this run, for the store and the
records), TG_RATE (the gcra limit per second of ``paced`` and ``shared``), TG_CONC (the concurrency limit of
``held``). ``shared``: one limit for every tenant (no key), shared out by ``fair_key`` (acme weight 3).
Executions are recorded in the job's own RQ Redis (``<prefix>:<kind>`` lists of ``ident|time|pid|extra``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from rq import get_current_job

import taskgate
import taskgate.rq

STORE = os.environ.get("TG_STORE", "memory://")
PREFIX = os.environ.get("TG_PREFIX", "tgrqroom")

POLICIES: dict[str, Any] = {
    "paced": {
        "strategy": "gcra",
        "limit": int(os.environ.get("TG_RATE", "20")),
        "period": "1s",
        "burst": 1,
        "deferral": {"park": "always"},
    },
    "held": {
        "concurrency": {"maxLimit": int(os.environ.get("TG_CONC", "3")), "leaseTtl": "10s"},
        "deferral": {"park": "always"},
    },
}
POLICIES["shared"] = {**POLICIES["paced"], "fairness": {"weights": {"acme": 3}, "defaultWeight": 1}}

if os.environ.get("TG_STORE"):
    taskgate.rq.configure(
        taskgate.connect(STORE, POLICIES, prefix=PREFIX),
        short_wait_ms=int(os.environ.get("TG_SHORT_WAIT_MS", "250")),
    )


def record(kind: str, extra: str = "") -> None:
    job = get_current_job()
    assert job is not None
    job.connection.rpush(f"{PREFIX}:{kind}", f"{job.id}|{time.time():.6f}|{os.getpid()}|{extra}")


@taskgate.rq.throttled("paced")
def paced(n: int) -> int:
    record("start", str(n))
    return n


@taskgate.rq.throttled("shared", fair_key="tenant")
def fair(tenant: str, n: int) -> int:
    record("start", tenant)
    return n


def tenant_of(tenant: str) -> str:
    raise LookupError(f"no tenant {tenant!r}")


@taskgate.rq.throttled("shared", fair_key=tenant_of)
def fair_broken(tenant: str) -> None:
    record("start", "broken")


@taskgate.rq.throttled("held")
def held(seconds: float) -> float:
    record("start")
    time.sleep(seconds)
    record("end")
    return seconds


class RoomWorker(taskgate.rq.Worker):
    pass


class RoomSimpleWorker(taskgate.rq.SimpleWorker):
    pass


@taskgate.rq.throttled("held")
def flaky(n: int) -> int:
    job = get_current_job()
    assert job is not None
    record("start", str(job.retries_left))
    if job.retries_left:
        raise RuntimeError("the first attempt fails on purpose")
    return n


@taskgate.rq.throttled("held")
def boom(n: int) -> int:
    record("start")
    raise RuntimeError("fails on purpose")
