"""The battle's workload: the policies, the two Celery apps, the RQ jobs, and the body every task runs.

- App A: RabbitMQ broker, the direct Redis door (``TGB_STORE``).
- App B: the private Redis broker, the service door (``TGB_SERVICE``: ``grpc://`` to one ``taskgate serve``).
- RQ: jobs on the private Redis, the direct door (``TASKGATE_URL``/``TASKGATE_POLICIES`` for the workers).

Every task body records its execution in the private Redis (``TGB_RECORD``): a ``start`` record (execution
id, task id, door, policy, tenant, time, pid, token estimate, lease ids, budget window of its reservation,
deferrals so far) and an ``end`` record (time, whether its lease was reclaimed, tokens refunded). The
workers import this module; configuration comes from the environment the battle sets (``TGB_*``).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from typing import Any

import redis
from celery import Celery
from celery.signals import task_failure
from rq import get_current_job

import taskgate
import taskgate.celery
import taskgate.rq
from taskgate.engine.keys import keyset
from taskgate.errors import TaskgateError
from taskgate.policy import load_policies

RUN = os.environ.get("TGB_RUN", "dev")
RECORD_URL = os.environ.get("TGB_RECORD", "")
STORE_URL = os.environ.get("TGB_STORE", "memory://")  # the direct door (with short socket timeouts)
SERVICE_URL = os.environ.get("TGB_SERVICE", "memory://")  # the service door of this B worker
BROKER_A = os.environ.get("TGB_BROKER_A", "memory://")
BROKER_B = os.environ.get("TGB_BROKER_B", "memory://")
PREFIX = "taskgate"  # the store is a private Redis per run: the default prefix everywhere
QUEUE_A = f"battle-{RUN}-a"
QUEUE_B = f"battle-{RUN}-b"
QUEUE_R = f"battle-{RUN}-rq"
TENANTS = ("t1", "t2", "t3")
LEASE_TTL_S = 3.0

# The policies: every axis, each shared by the three doors (one engine decides for all of them).
POLICIES: dict[str, Any] = {
    # per-tenant rate
    "rate": {"strategy": "gcra", "limit": 5, "period": "1s", "burst": 2},
    # fleet-wide concurrency, bodies 0.2-1 s
    "conc": {"concurrency": {"maxLimit": 3, "leaseTtl": "3s"}},
    # per-tenant token budget, escrow (the default accounting), a short window
    "budget": {"tokenBudget": {"budget": 1500, "windowMs": "2s"}},
    # rate x concurrency x budget in one atomic admit, per tenant
    "unified": {
        "strategy": "gcra",
        "limit": 3,
        "period": "1s",
        "burst": 1,
        "concurrency": {"maxLimit": 2, "perKey": True, "leaseTtl": "3s"},
        "tokenBudget": {"budget": 1200, "windowMs": "3s"},
    },
    # the fail modes, on a per-tenant rate
    "open_rate": {"strategy": "gcra", "limit": 3, "period": "1s", "burst": 1, "fail": "open"},
    "closed_rate": {"strategy": "gcra", "limit": 3, "period": "1s", "burst": 1, "fail": "closed"},
    # the harness's own: a state that must survive the store's restart, and the servers' liveness probe
    "sentinel": {"strategy": "gcra", "limit": 1, "period": "1h", "burst": 1, "bookingHorizon": 0},
    "probe": {"strategy": "gcra", "limit": 100000, "period": "1s", "burst": 1000},
}
RATE_POLICIES = ("rate", "unified", "open_rate", "closed_rate")
# How late a booked rate slot may still be redeemed (taskgate's default: one emission interval, at least
# 100 ms). See README.md, "Battle test".
BOOKING_GRACE = os.environ.get("TGB_BOOKING_GRACE", "default")
if BOOKING_GRACE != "default":
    for _name in RATE_POLICIES:
        POLICIES[_name]["bookingGrace"] = BOOKING_GRACE
LOADED = load_policies(POLICIES)

# -- recording ----------------------------------------------------------------------------------------------

_clients: dict[tuple[int, str], redis.Redis] = {}
_lock = threading.Lock()


def _client(url: str, timeout: float) -> redis.Redis:
    key = (os.getpid(), url)
    with _lock:
        c = _clients.get(key)
        if c is None:
            c = _clients[key] = redis.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
    return c


def record(kind: str, data: dict[str, Any]) -> None:
    _client(RECORD_URL, 10.0).rpush(f"battle:{kind}", json.dumps(data))


def plain_store_url() -> str:
    return STORE_URL.split("?", 1)[0]


def _reservation_window(policy: str, tenant: str, admissions: list[Any]) -> int | None:
    """The budget window (epoch-ms start) the reservation of this execution was charged to, read from the
    reservation itself; None if it cannot be read (the store is down: the checker then uses the start)."""
    for a in admissions:
        rid = getattr(a, "reservation_id", "")
        if rid and getattr(a, "policy", "") == policy:
            try:
                ks = keyset(PREFIX, LOADED[policy], tenant)
                w = _client(plain_store_url(), 0.5).hget(ks.reservation(rid), "w1")
            except (redis.RedisError, OSError):
                return None
            return int(w) if w is not None else None
    return None


def execute(
    door: str,
    ident: str,
    policy: str,
    tenant: str,
    secs: float,
    *,
    est: int = 0,
    actual: int = 0,
    deferrals: int = 0,
    booked: bool | None = None,
    stepped: bool = False,
    release_early: bool = False,
) -> None:
    """One task body: record the start, work ``secs``, settle ``actual`` tokens (estimate ``est``), record
    the end. ``stepped`` sleeps in 0.1 s steps (a paused process resumes with the rest of its work still to
    do); ``release_early`` releases the slot explicitly and records what the store said."""
    held: Any = taskgate.current()
    admissions = list(getattr(held, "admissions", []))
    ex = uuid.uuid4().hex[:12]
    record(
        "start",
        {
            "ex": ex,
            "id": ident,
            "door": door,
            "policy": policy,
            "tenant": tenant,
            "t": time.time(),
            "pid": os.getpid(),
            "est": est,
            "leases": [a.lease_id for a in admissions if getattr(a, "lease_id", "")],
            "window": _reservation_window(policy, tenant, admissions) if est else None,
            "deferrals": deferrals,
            "booked": booked,
            "fail_open": bool(getattr(held, "fail_open", False)),
            "secs": secs,
        },
    )
    if stepped:
        for _ in range(round(secs / 0.1)):
            time.sleep(0.1)
    else:
        time.sleep(secs)
    refunded, charged, error = 0, 0, ""
    settle_t = time.time()
    if est:
        try:
            for s in held.settle(actual):
                refunded += int(getattr(s, "refunded", 0))
                charged += int(getattr(s, "charged", 0))
        except TaskgateError as e:  # the store is down: the estimate stays charged
            error = f"{type(e).__name__}: {e}"
    reclaimed = bool(getattr(held, "reclaimed", False))
    released: list[bool] = []
    if release_early:
        for a in admissions:
            try:
                released.append(bool(a.release()))
            except TaskgateError as e:
                error = f"release: {e}"
    record(
        "end",
        {
            "ex": ex,
            "id": ident,
            "t": time.time(),
            "pid": os.getpid(),
            "reclaimed": reclaimed,
            "actual": actual,
            "refunded": refunded,
            "charged": charged,
            "settle_t": settle_t,
            "released": released,
            "error": error,
        },
    )


def short_body() -> float:
    return 0.02


# -- Celery: app A (RabbitMQ, direct door) and app B (private Redis broker, service door) ------------------


def _make_app(door: str, broker: str, store: str, queue: str) -> Celery:
    app = Celery(f"battle_{door.lower()}", broker=broker)
    app.conf.update(
        task_default_queue=queue,
        task_acks_late=True,  # a task whose child is killed is redelivered ...
        task_reject_on_worker_lost=True,  # ... not failed
        task_ignore_result=True,
        worker_prefetch_multiplier=4,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 3600},
    )
    taskgate.celery.install(app, store, policies=POLICIES)
    return app


app_a = _make_app("A", BROKER_A, STORE_URL, QUEUE_A)
app_b = _make_app("B", BROKER_B, SERVICE_URL, QUEUE_B)


def _deferrals(task: Any) -> int:
    return int(_state(task).get("deferrals", 0))


def _booked(task: Any) -> bool:
    """True if this attempt came back with a booked rate slot (it redeems it at admission)."""
    return bool(_state(task).get("bookings"))


def _state(task: Any) -> dict[str, Any]:
    req = task.request
    state = (req.headers or {}).get(taskgate.celery.HEADER) or getattr(req, taskgate.celery.HEADER, None)
    return state if isinstance(state, dict) else {}


def _declare(app: Celery, door: str) -> dict[str, Any]:
    p = f"battle.{door.lower()}"

    @app.task(bind=True, name=f"{p}.rate", throttle="rate", key="tenant")
    def rate(self: Any, tenant: str, n: int) -> None:
        execute(
            door,
            self.request.id,
            "rate",
            tenant,
            short_body(),
            deferrals=_deferrals(self),
            booked=_booked(self),
        )

    @app.task(bind=True, name=f"{p}.conc", throttle="conc")
    def conc(self: Any, tenant: str, secs: float) -> None:
        execute(door, self.request.id, "conc", tenant, secs, deferrals=_deferrals(self), booked=_booked(self))

    @app.task(bind=True, name=f"{p}.budget", throttle="budget", key="tenant", tokens=lambda est: est)
    def budget(self: Any, tenant: str, est: int, actual: int) -> None:
        execute(
            door,
            self.request.id,
            "budget",
            tenant,
            0.05,
            est=est,
            actual=actual,
            deferrals=_deferrals(self),
            booked=_booked(self),
        )

    @app.task(bind=True, name=f"{p}.unified", throttle="unified", key="tenant", tokens=lambda est: est)
    def unified(self: Any, tenant: str, secs: float, est: int, actual: int) -> None:
        execute(
            door,
            self.request.id,
            "unified",
            tenant,
            secs,
            est=est,
            actual=actual,
            deferrals=_deferrals(self),
            booked=_booked(self),
        )

    @app.task(bind=True, name=f"{p}.open_rate", throttle="open_rate", key="tenant")
    def open_rate(self: Any, tenant: str, n: int) -> None:
        execute(
            door,
            self.request.id,
            "open_rate",
            tenant,
            short_body(),
            deferrals=_deferrals(self),
            booked=_booked(self),
        )

    @app.task(bind=True, name=f"{p}.closed_rate", throttle="closed_rate", key="tenant")
    def closed_rate(self: Any, tenant: str, n: int) -> None:
        execute(
            door,
            self.request.id,
            "closed_rate",
            tenant,
            short_body(),
            deferrals=_deferrals(self),
            booked=_booked(self),
        )

    @app.task(bind=True, name=f"{p}.victim", throttle="conc")
    def victim(self: Any, tenant: str, secs: float, release_early: bool) -> None:
        execute(
            door,
            self.request.id,
            "conc",
            tenant,
            secs,
            deferrals=_deferrals(self),
            booked=_booked(self),
            stepped=True,
            release_early=release_early,
        )

    return {
        "rate": rate,
        "conc": conc,
        "budget": budget,
        "unified": unified,
        "open_rate": open_rate,
        "closed_rate": closed_rate,
        "victim": victim,
    }


TASKS_A = _declare(app_a, "A")
TASKS_B = _declare(app_b, "B")


@task_failure.connect
def _on_failure(
    sender: Any = None, task_id: str = "", exception: BaseException | None = None, **kw: Any
) -> None:
    record("failure", {"id": task_id, "t": time.time(), "error": repr(exception)[:300]})


# -- RQ (private Redis, direct door) -----------------------------------------------------------------------


def _job() -> tuple[str, int]:
    job = get_current_job()
    assert job is not None
    state = job.meta.get(taskgate.rq.META_STATE)
    return str(job.id), int(state.get("deferrals", 0)) if isinstance(state, dict) else 0


@taskgate.rq.throttled("rate", key="tenant")
def rq_rate(tenant: str, n: int) -> None:
    ident, d = _job()
    execute("R", ident, "rate", tenant, short_body(), deferrals=d)


@taskgate.rq.throttled("conc")
def rq_conc(tenant: str, secs: float) -> None:
    ident, d = _job()
    execute("R", ident, "conc", tenant, secs, deferrals=d)


@taskgate.rq.throttled("budget", key="tenant", tokens=lambda est: est)
def rq_budget(tenant: str, est: int, actual: int) -> None:
    ident, d = _job()
    execute("R", ident, "budget", tenant, 0.05, est=est, actual=actual, deferrals=d)


@taskgate.rq.throttled("unified", key="tenant", tokens=lambda est: est)
def rq_unified(tenant: str, secs: float, est: int, actual: int) -> None:
    ident, d = _job()
    execute("R", ident, "unified", tenant, secs, est=est, actual=actual, deferrals=d)


@taskgate.rq.throttled("open_rate", key="tenant")
def rq_open_rate(tenant: str, n: int) -> None:
    ident, d = _job()
    execute("R", ident, "open_rate", tenant, short_body(), deferrals=d)


@taskgate.rq.throttled("closed_rate", key="tenant")
def rq_closed_rate(tenant: str, n: int) -> None:
    ident, d = _job()
    execute("R", ident, "closed_rate", tenant, short_body(), deferrals=d)


@taskgate.rq.throttled("conc")
def rq_victim(tenant: str, secs: float, release_early: bool) -> None:
    ident, d = _job()
    execute("R", ident, "conc", tenant, secs, deferrals=d, stepped=True, release_early=release_early)


RQ_JOBS: dict[str, Any] = {
    "rate": rq_rate,
    "conc": rq_conc,
    "budget": rq_budget,
    "unified": rq_unified,
    "open_rate": rq_open_rate,
    "closed_rate": rq_closed_rate,
    "victim": rq_victim,
}
