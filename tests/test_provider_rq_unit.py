"""The provider's 429 on RQ, fast: a :class:`taskgate.rq.SimpleWorker` on fakeredis and the embedded store (as
in ``test_rq_unit.py``). A job whose body raised an SDK rate-limit error is deferred through RQ's scheduler
until the fleet-wide hold ends, not failed; its retries are untouched. Real forking workers and the waiting
room: ``test_provider_rq.py``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from rq import Queue, Retry
from rq.job import JobStatus
from rq.scheduler import RQScheduler

import taskgate
import taskgate.rq
from taskgate.integrations.rq import worker as tgworker
from tests.apps import rq_provider_jobs as jobs


@pytest.fixture(autouse=True)
def _no_configured_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tgworker, "_defaults", {"backend": None, "policies": None, "settings": {}})


@pytest.fixture
def env() -> Iterator[tuple[Any, Queue, taskgate.RedisBackend]]:
    conn = fakeredis.FakeRedis()
    b = taskgate.connect(f"memory://{uuid.uuid4().hex}", jobs.POLICIES, prefix="tgrqp")
    assert isinstance(b, taskgate.RedisBackend)
    yield conn, Queue(f"q{uuid.uuid4().hex[:8]}", connection=conn), b
    b.close()


def _burst(conn: Any, q: Queue, b: Any) -> None:
    w = taskgate.rq.SimpleWorker([q], connection=conn, backend=b, settings={"short_wait_ms": 0})
    w.work(burst=True, with_scheduler=True)


def _due_now(conn: Any, q: Queue) -> None:
    reg = q.scheduled_job_registry
    for jid in reg.get_job_ids():
        conn.zadd(reg.key, {jid: 1})
    s: Any = RQScheduler([q], connection=conn)
    s._connection = conn
    s.acquire_locks()
    s.enqueue_scheduled_jobs()
    s.release_locks()


def test_a_429_defers_the_job_and_holds_the_key(env: tuple[Any, Queue, taskgate.RedisBackend]) -> None:
    conn, q, b = env
    job = q.enqueue(jobs.once_429, 7, retry=Retry(max=2))
    _burst(conn, q, b)
    job.refresh()  # type: ignore[no-untyped-call]
    assert job.get_status() == JobStatus.SCHEDULED  # deferred, not failed
    assert job.id in q.scheduled_job_registry.get_job_ids()
    assert job.id not in q.started_job_registry.get_job_ids()
    assert job.meta["taskgate_state"]["provider"] == 1
    assert job.meta["taskgate_state"]["deferrals"] == 0  # max_deferrals is not used up
    assert job.retries_left == 2
    assert not job.number_of_retries
    adm = b.admit("llm", jobs.KEY)  # the key is held for every worker
    assert (adm.allowed, adm.binding_axis) == (False, "provider")
    assert 0 < adm.retry_after_ms <= 200
    b.reset("llm", jobs.KEY)
    _due_now(conn, q)
    _burst(conn, q, b)
    job.refresh()  # type: ignore[no-untyped-call]
    assert job.get_status() == JobStatus.FINISHED
    assert job.return_value() == 7
    assert conn.llen(f"{jobs.PREFIX}:tries") == 2
