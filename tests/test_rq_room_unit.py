"""RQ jobs in the waiting room, fast: a ``taskgate.rq.SimpleWorker`` in burst mode on fakeredis and the
embedded ``memory://`` store (``deferral.park: always``). The real forking workers are in
``tests/test_rq_room.py``."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from rq import Queue, Retry
from rq.job import JobStatus

import taskgate
import taskgate.rq
from taskgate.integrations.rq import worker as tgworker
from tests.apps import rq_room_jobs as jobs
from tests.fleet import max_in_window

POLICIES: dict[str, Any] = {
    "held": {"concurrency": {"maxLimit": 1, "leaseTtl": "10s"}, "deferral": {"park": "always"}},
    "paced": {"strategy": "gcra", "limit": 1, "period": "1h", "burst": 1, "deferral": {"park": "always"}},
}
FAST: dict[str, Any] = {  # the same names, for the test in real time
    "held": POLICIES["held"],
    "paced": {"strategy": "gcra", "limit": 10, "period": "1s", "burst": 1, "deferral": {"park": "always"}},
}


class Env:
    def __init__(self, policies: dict[str, Any] = POLICIES) -> None:
        self.conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        self.prefix = f"t{uuid.uuid4().hex[:8]}"
        jobs.PREFIX = self.prefix
        self.backend = taskgate.connect(f"memory://{uuid.uuid4().hex}", policies, prefix=self.prefix)
        self.q = Queue("q", connection=self.conn)
        self.w = jobs.RoomSimpleWorker(
            [self.q], connection=self.conn, backend=self.backend, settings={"short_wait_ms": 0}
        )

    def work(self) -> None:
        self.w.work(burst=True, with_scheduler=True)

    def records(self) -> list[list[str]]:
        raw: Any = self.conn.lrange(f"{self.prefix}:start", 0, -1)
        return [x.decode().split("|") for x in raw]

    def starts(self) -> list[str]:
        return [r[0] for r in self.records()]

    def depth(self, policy: str = "held") -> int:
        return self.w.taskgate.room().depth(policy, "*")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setattr(tgworker, "_defaults", {"backend": None, "policies": None, "settings": {}})
    e = Env()
    yield e
    e.backend.close()


def test_parked_jobs_wait_in_the_room_and_run_once_each_in_order(env: Env) -> None:
    hog = env.backend.admit("held", "*")
    assert hog.allowed
    batch = [env.q.enqueue(jobs.held, 0, job_id=f"j{i}") for i in range(5)]
    env.work()
    assert env.starts() == []
    assert env.depth() == 5
    assert env.conn.llen(env.q.intermediate_queue_key) == 0  # no "stuck" job for RQ's maintenance
    assert {j.get_status(refresh=True) for j in batch} == {JobStatus.SCHEDULED}
    assert len(env.q.scheduled_job_registry) == 0
    assert len(env.q.failed_job_registry) == 0
    env.q.enqueue(jobs.held, 0, job_id="j0")  # the same job id again while it waits: a duplicate
    env.work()
    assert env.starts() == []
    assert env.depth() == 5
    hog.release()
    assert env.w.promoter.hand_off("held", "*") == 1  # the freed slot goes to the head of the room
    assert batch[0].get_status(refresh=True) == JobStatus.QUEUED
    assert env.q.get_job_ids()[0] == "j0"
    env.work()  # each job hands its slot on to the next as it ends
    assert env.starts() == [f"j{i}" for i in range(5)]
    assert env.depth() == 0
    assert {j.get_status(refresh=True) for j in batch} == {JobStatus.FINISHED}
    assert all("promoted" not in j.meta.get("taskgate_state", {}) for j in batch)
    env.q.enqueue(jobs.held, 0, job_id="j3")  # a message of a job that ran through the room: not run again
    env.work()
    assert env.starts() == [f"j{i}" for i in range(5)]


def test_rqs_own_retry_is_a_new_attempt_not_a_duplicate(env: Env) -> None:
    hog = env.backend.admit("held", "*")
    job = env.q.enqueue(jobs.flaky, 7, retry=Retry(max=1))
    env.work()
    assert env.depth() == 1
    hog.release()
    env.w.promoter.hand_off("held", "*")
    env.work()  # fails, RQ retries it at once (same id), the retry is admitted and runs
    assert [r[3] for r in env.records()] == ["1", "0"]
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    assert job.return_value() == 7


def test_a_rate_room_is_promoted_when_due(env: Env) -> None:
    first = env.q.enqueue(jobs.paced, 1)
    second = env.q.enqueue(jobs.paced, 2)
    env.work()
    assert env.starts() == [first.id]
    assert env.depth("paced") == 1
    assert second.get_status(refresh=True) == JobStatus.SCHEDULED
    room = env.w.taskgate.room()
    now = room.backend_time()
    _, due, rooms = room.due_rooms(now=now)
    assert rooms == []
    assert due >= now + 3_500_000


def test_a_promoted_job_that_is_gone_gives_its_grant_back(env: Env) -> None:
    """A job deleted from RQ while it waits: when promoted, its grant is claimed and released (the slot is
    not held for nobody), and nothing is queued."""
    hog = env.backend.admit("held", "*")
    job = env.q.enqueue(jobs.held, 0)
    env.work()
    assert env.depth() == 1
    env.conn.delete(job.key)
    hog.release()
    assert env.w.promoter.hand_off("held", "*") == 1
    assert env.q.count == 0
    assert env.w.taskgate.room().stats("held", "*").handoff == 0
    assert env.backend.admit("held", "*").allowed  # the slot is free


def test_the_promoter_thread_drains_a_room_at_its_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """SimpleWorker in a thread, its promoter a thread of its own: 12 jobs at 10/s (park always, no wait in
    place) all run once, in order, paced."""
    monkeypatch.setattr(tgworker, "_defaults", {"backend": None, "policies": None, "settings": {}})
    env = Env(FAST)
    w = env.w
    w.scheduler_interval = 0.2
    batch = [env.q.enqueue(jobs.paced, i) for i in range(12)]
    t = threading.Thread(target=w.work, kwargs={"with_scheduler": True}, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(env.starts()) < 12:
        time.sleep(0.05)
    w.stop()
    env.q.enqueue(jobs.paced, 99, job_id="wake")  # wakes the blocking dequeue
    t.join(10)
    assert not t.is_alive()
    assert w.promoter._thread is None  # stopped with the worker
    got = [r for r in env.records() if r[0] != "wake"]
    assert [int(r[3]) for r in got] == list(range(12))
    times = [float(r[1]) for r in got]
    assert times[-1] - times[0] >= 11 * 0.1 * 0.9  # paced (a start may be late, never early)
    assert max_in_window(times, 0.5) <= 5 + 2
    assert {j.get_status(refresh=True) for j in batch} == {JobStatus.FINISHED}
    env.backend.close()


def test_a_failed_job_requeued_after_it_ran_through_the_room_runs_again(env: Env) -> None:
    """``job.requeue()`` of a failed job whose run was claimed from the room is a new attempt; a copy of its
    message pushed while it has not been requeued (status failed) is still a duplicate."""
    hog = env.backend.admit("held", "*")
    job = env.q.enqueue(jobs.boom, 7)
    env.work()
    hog.release()
    env.w.promoter.hand_off("held", "*")
    env.work()
    assert job.get_status(refresh=True) == JobStatus.FAILED
    env.conn.rpush(env.q.key, job.id)  # a stray copy of its message: dropped
    env.work()
    assert job.get_status(refresh=True) == JobStatus.FAILED
    assert [r[0] for r in env.records()].count(job.id) == 1
    job.requeue()
    env.work()
    assert [r[0] for r in env.records()].count(job.id) == 2
    assert job.get_status(refresh=True) == JobStatus.FAILED  # it ran (and failed) again
