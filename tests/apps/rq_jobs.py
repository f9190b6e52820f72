"""RQ job functions and worker classes for the RQ integration tests (an importable module: RQ refuses jobs from
``__main__``). Configured by environment, read at import (each real worker process imports it):

TG_STORE (the taskgate store URL), TG_PREFIX (key prefix of this run, for the store and the records),
TG_SHORT_WAIT_MS / TG_BOOKED_WAIT_MS (worker settings). Executions are recorded in the job's own RQ Redis
(``<prefix>:<kind>`` lists of ``ident|time|pid|extra``), so the in-process tests record into fakeredis. With
TG_STORE set, the rate slots the engine hands out are recorded in the store's Redis (``<prefix>:grant``, see
:class:`tests.fleet.GrantLog`).
"""

from __future__ import annotations

import datetime as dt
import os
import random
import time
from typing import Any

import redis
from rq import get_current_job

import taskgate
import taskgate.rq
from taskgate.integrations._gate import Deferred
from tests.fleet import GrantLog

STORE = os.environ.get("TG_STORE", "memory://")
PREFIX = os.environ.get("TG_PREFIX", "tgrq")

POLICIES: dict[str, Any] = {
    "rate20": {"strategy": "gcra", "limit": 20, "period": "1s", "burst": 1},
    "rate10": {"strategy": "gcra", "limit": 10, "period": "1s", "burst": 1},
    "rate5": {"strategy": "gcra", "limit": 5, "period": "1s", "burst": 1},
    "rate2": {"strategy": "gcra", "limit": 2, "period": "1s", "burst": 1},
    "slow1h": {"strategy": "gcra", "limit": 1, "period": "1h", "burst": 1, "bookingHorizon": 0},
    "tenant5": {"strategy": "gcra", "limit": 5, "period": "1s", "burst": 1},
    "conc2": {"concurrency": {"maxLimit": 2, "leaseTtl": "3s"}},
    "hold1": {"concurrency": {"maxLimit": 1, "leaseTtl": "3s"}},
    "random": {"strategy": "gcra", "limit": 100, "period": "1s", "burst": 5},
    "open1": {"concurrency": {"maxLimit": 1, "leaseTtl": "3s"}, "fail": "open"},
    "llm": {"tokenBudget": {"budget": 1000, "windowMs": "1h"}},
    "few": {"concurrency": {"maxLimit": 1, "leaseTtl": "3s"}, "deferral": {"maxDeferrals": 2}},
}

if os.environ.get("TG_STORE"):
    taskgate.rq.configure(  # the grants go to the store's Redis (<prefix>:grant)
        GrantLog(taskgate.connect(STORE, POLICIES, prefix=PREFIX), redis.Redis.from_url(STORE), PREFIX),
        short_wait_ms=int(os.environ.get("TG_SHORT_WAIT_MS", "250")),
        booked_wait_ms=int(os.environ.get("TG_BOOKED_WAIT_MS", "1000")),
    )


def _job() -> Any:
    job = get_current_job()
    assert job is not None
    return job


def record(kind: str, ident: str, extra: str = "", connection: Any = None) -> None:
    conn = connection if connection is not None else _job().connection
    conn.rpush(f"{PREFIX}:{kind}", f"{ident}|{time.time():.6f}|{os.getpid()}|{extra}")


def _me() -> str:
    return str(_job().id)


@taskgate.rq.throttled("rate20")
def paced(n: int) -> int:
    record("start", _me())
    return n


@taskgate.rq.throttled("rate10")
def paced10(n: int) -> int:
    record("start", _me())
    return n


@taskgate.rq.throttled("rate5")
def paced5(n: int) -> int:
    record("start", _me())
    return n


@taskgate.rq.throttled("slow1h")
def hourly(n: int) -> int:
    record("start", _me())
    return n


@taskgate.rq.throttled("tenant5", key="tenant")
def per_tenant(tenant: str, n: int) -> int:
    record("start", _me(), tenant)
    return n


@taskgate.rq.throttled("conc2")
def slow(seconds: float) -> float:
    record("start", _me())
    time.sleep(seconds)
    record("end", _me())
    return seconds


@taskgate.rq.throttled("random")
def jittery(n: int) -> int:
    record("start", _me())
    time.sleep(random.random() * 0.01)
    return n


@taskgate.rq.throttled("hold1")
def flaky(n: int) -> int:
    job = _job()
    record("start", str(job.id), str(job.retries_left))
    if job.retries_left:
        raise RuntimeError("first attempt fails on purpose")
    return n


@taskgate.rq.throttled("hold1")
def boom(n: int) -> int:
    record("start", _me())
    raise RuntimeError("boom")


@taskgate.rq.throttled("open1")
def open_job(n: int) -> int:
    record("start", _me(), str(type(taskgate.current()).__name__))
    return n


@taskgate.rq.throttled("llm", key="tenant", tokens=lambda tenant, used: 300)
def llm_call(tenant: str, used: int) -> list[list[int]]:
    record("start", _me(), tenant)
    out: Any = taskgate.current().settle(used)
    return [[getattr(s, "charged", -1), getattr(s, "refunded", -1)] for s in out]


@taskgate.rq.throttled("few")
def few(n: int) -> int:
    record("start", _me())
    return n


@taskgate.rq.throttled("few", on_exhausted="run")
def few_run(n: int) -> int:
    record("start", _me())
    return n


def plain(n: int) -> int:
    record("start", _me())
    return n


def add1(x: int) -> int:
    record("add1", _me(), str(x))
    return x + 1


def on_ok(job: Any, connection: Any, result: Any, *args: Any, **kwargs: Any) -> None:
    record("success_cb", str(job.id), str(result), connection=connection)


def on_fail(job: Any, connection: Any, typ: Any, value: Any, tb: Any) -> None:
    record("failure_cb", str(job.id), type(value).__name__, connection=connection)


class _Recording:
    """Records every deferral (``<prefix>:defer``)."""

    def job_deferred(self, job: Any, out: Deferred, at: dt.datetime) -> None:
        slot = time.time() + out.countdown_ms / 1000.0
        record("defer", str(job.id), f"{out.axis}|{at.timestamp():.3f}|{slot:.3f}", connection=job.connection)


class RecordingWorker(_Recording, taskgate.rq.Worker):
    pass


class RecordingSimpleWorker(_Recording, taskgate.rq.SimpleWorker):
    pass


@taskgate.rq.throttled("rate2")
def paced2(n: int) -> int:
    record("start", _me())
    return n
