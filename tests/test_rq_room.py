"""RQ jobs in the waiting room on real ``rq worker`` processes (forking horses, RQ's own scheduler), the real
Redis: ``tests.apps.rq_room_jobs`` (``deferral.park: always``), ``--worker-class`` a plain subclass of
``taskgate.rq.Worker`` (it configures the store when imported), ``--job-class taskgate.rq.Job
--with-scheduler``. Bounds hold on a loaded 2-core box: exact-once strictly, times loosely (the engine's pacing
is measured tightly by the bench)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from rq.job import JobStatus

import taskgate
from taskgate.backends.redis import RedisBackend
from taskgate.backends.waiting import RoomStats, WaitingRoom
from tests.apps import rq_room_jobs as jobs
from tests.conftest import REDIS_URL
from tests.fleet import max_in_window
from tests.test_rq_workers import Fleet, fleets

pytestmark = pytest.mark.slow


class RoomFleet(Fleet):
    worker = "tests.apps.rq_room_jobs.RoomWorker"

    def room(self, policy: str) -> RoomStats:
        b = taskgate.connect(REDIS_URL, jobs.POLICIES, prefix=self.prefix)
        assert isinstance(b, RedisBackend)
        try:
            return WaitingRoom(b).stats(policy, "*")
        finally:
            b.close()


@pytest.fixture
def fleet() -> Iterator[Callable[..., RoomFleet]]:
    yield from fleets(RoomFleet)


def test_a_backlog_drains_at_the_limit_once_each(fleet: Callable[..., RoomFleet]) -> None:
    """300 jobs on 20/s, 2 workers: each runs exactly once, paced by the engine (the room promotes the head
    when its slot comes); nothing left in the room, every promotion claimed once."""
    f = fleet(2, TG_RATE="20")
    t0 = time.time()
    batch = [f.enqueue(jobs.paced, i) for i in range(300)]
    f.wait(300, timeout=120)
    time.sleep(1.0)  # anything doubled would show up by now
    got = f.records("start")
    counts = Counter(i for i, _, _, _ in got)
    assert set(counts) == {j.id for j in batch}
    assert set(counts.values()) == {1}
    times = sorted(t for _, t, _, _ in got)
    span, drained, most = times[-1] - times[0], times[-1] - t0, max_in_window(times)
    print(f"300 jobs at 20/s: span {span:.2f} s (ideal 14.95), drained {drained:.2f} s after the first enqueue, "
          f"most in 1 s {most}, room {f.room('paced')}")  # fmt: skip
    assert span >= 299 / 20 * 0.9  # paced: a busy box starts late, never early
    assert drained <= 299 / 20 * 1.5 + 10
    assert most <= 20 + 5
    room = f.room("paced")
    assert room.parked >= 200  # they waited in the engine, not in RQ's scheduled registry
    assert room.claimed == room.promoted
    assert room.depth == 0
    assert len(f.q.scheduled_job_registry) == 0
    assert {j.get_status(refresh=True) for j in batch[-20:]} == {JobStatus.FINISHED}


def test_concurrency_never_exceeds_the_limit(fleet: Callable[..., RoomFleet]) -> None:
    """A limit of 3 across 4 workers, 40 short jobs: never more than 3 in flight, each once; a freed slot is
    handed on by the worker that frees it."""
    f = fleet(4, TG_CONC="3")
    for _ in range(40):
        f.enqueue(jobs.held, 0.2)
    f.wait(40, "end", timeout=90)
    s = {i: t for i, t, _, _ in f.records("start")}
    e = {i: t for i, t, _, _ in f.records("end")}
    assert len(f.records("start")) == 40
    assert len(e) == 40
    events = sorted([(t, 1) for t in s.values()] + [(t, -1) for t in e.values()])
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    busy = sum(e[i] - s[i] for i in e) / (3 * (max(e.values()) - min(s.values())))
    room = f.room("held")
    print(f"peak in flight {peak}, slot use {busy:.2f}, room {room}")
    assert peak <= 3
    assert room.parked >= 1  # the fourth worker's jobs waited in the room
    assert room.claimed == room.promoted
    assert room.depth == 0


def test_a_job_enqueued_twice_runs_once(fleet: Callable[..., RoomFleet]) -> None:
    """Behind a backlog (so they wait in the room): 10 job ids enqueued twice each run once; a message of a
    job that ran through the room, pushed again, does not run it again."""
    f = fleet(2, TG_RATE="5")
    for i in range(10):
        f.enqueue(jobs.paced, 100 + i)
    for _ in range(2):
        for i in range(10):
            f.enqueue(jobs.paced, i, job_id=f"dup-{f.prefix}-{i}")
    f.wait(20, timeout=60)
    time.sleep(1.5)
    ids = [f"dup-{f.prefix}-{i}" for i in range(10)]
    assert sorted(i for i, _, _, _ in f.records("start") if i.startswith("dup-")) == sorted(ids)
    for ident in ids:  # a second message of a job that ran: recognised by the room (claimed), dropped
        f.r.rpush(f.q.key, ident)
    time.sleep(2.5)
    assert len(f.records("start")) == 20
    assert f.r.llen(f.q.key) == 0
    assert {f.q.fetch_job(ident).get_status() for ident in ids} == {JobStatus.FINISHED}  # type: ignore[union-attr]
