"""RQ integration on real ``rq worker`` processes (forking horses, RQ's own scheduler) on the real Redis.

Each test starts its own workers (``tests.apps.rq_jobs.RecordingWorker``, ``--job-class taskgate.rq.Job``) on
a queue of its own (RQ in db 6, the taskgate store in db 9 under a unique prefix), drives a workload and reads
what the job bodies recorded. Real time is used here; the assertions measure rather than sleep-and-hope.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from rq import Callback, Queue, Retry
from rq.job import Job, JobStatus

import taskgate
from tests.apps import rq_jobs as jobs
from tests.conftest import REDIS_URL, redis_up, require
from tests.fleet import Fleet as WorkerFleet
from tests.fleet import Record, check_paced, read_records

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
F = TypeVar("F", bound="Fleet")
RQ_URL = os.environ.get("TASKGATE_TEST_RQ_URL", "redis://127.0.0.1:6379/6")


class Fleet:
    worker = "tests.apps.rq_jobs.RecordingWorker"  # --worker-class

    def __init__(self, extra_env: dict[str, str]) -> None:
        self.prefix = f"tgq{uuid.uuid4().hex[:10]}"
        self.env = {
            **os.environ,
            "TG_STORE": REDIS_URL,
            "TG_PREFIX": self.prefix,
            "PYTHONPATH": str(HERE.parent),
            **extra_env,
        }
        self.workers = WorkerFleet(self.env, Path(f"/tmp/tg-{self.prefix}"), tag=self.prefix)
        self.procs, self.logs = self.workers.procs, self.workers.logs
        self.r = redis.Redis.from_url(RQ_URL)
        self.q = Queue(self.prefix, connection=self.r)
        self.enqueued: list[Job] = []

    def spawn(self, *, scheduler: bool = True, worker: str | None = None) -> Path:
        """One more worker (not waited for); its log."""
        name = f"w{len(self.procs)}"
        self.workers.rq(self.prefix, RQ_URL, name, worker_class=worker or self.worker, scheduler=scheduler)
        return self.logs[-1]

    def start(self, n: int) -> None:
        for _ in range(n):
            self.spawn()
        self.workers.wait_ready(30)

    def enqueue(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Job:
        job = self.q.enqueue(f, *args, **kwargs)
        self.enqueued.append(job)
        return job

    def wait(self, n: int, kind: str = "start", timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.r.llen(f"{self.prefix}:{kind}") < n:
            assert time.monotonic() < deadline, f"only {self.r.llen(f'{self.prefix}:{kind}')}/{n} {kind}"
            time.sleep(0.05)

    def records(self, kind: str) -> list[Record]:
        return read_records(self.r, self.prefix, kind)

    def stop(self) -> None:
        self.workers.stop(15)

    def cleanup(self) -> None:
        for db in (self.r, redis.Redis.from_url(REDIS_URL)):
            keys = [k for pat in (f"*{self.prefix}*",) for k in db.scan_iter(match=pat, count=1000)]
            keys += [j.key for j in self.enqueued] + [j.dependents_key for j in self.enqueued]
            for i in range(0, len(keys), 500):
                db.unlink(*keys[i : i + 500])


def fleets(cls: type[F]) -> Iterator[Callable[..., F]]:
    """The body of a fixture making fleets of ``cls``, each stopped and cleaned up at the end."""
    require(
        redis_up(REDIS_URL) and redis_up(RQ_URL), f"Redis at {RQ_URL}", "start redis-server on 127.0.0.1:6379"
    )
    made: list[F] = []

    def make(n: int = 2, **env: str) -> F:
        f = cls(env)
        made.append(f)
        if n:
            f.start(n)
        return f

    yield make
    for f in made:
        f.stop()
        f.cleanup()


@pytest.fixture
def fleet() -> Iterator[Callable[..., Fleet]]:
    yield from fleets(Fleet)


def test_global_rate(fleet: Callable[..., Fleet]) -> None:
    """2 workers, gcra 10/s burst 1, 80 jobs at once: paced at 10/s as :func:`tests.fleet.check_paced` says,
    measured on the slots the engine handed out (its own clock), the starts following them (start times
    include a fork and the box's load; tight start-time ratios are measured by bench/rq.py). (10/s, not
    more: a forking worker on a small, busy CI box may not reach 20 jobs/s by itself.)"""
    f = fleet(2)
    for i in range(80):
        f.enqueue(jobs.paced10, i)
    f.wait(80)
    slots = [float(x) for _, _, _, x in read_records(redis.Redis.from_url(REDIS_URL), f.prefix, "grant")]
    line = check_paced(slots, [t for _, t, _, _ in f.records("start")], 80, 10)
    print(f"{line}, deferrals {len(f.records('defer'))}")


def test_rate_through_the_scheduler(fleet: Callable[..., Fleet]) -> None:
    """4 workers against 5/s, no in-place short waits: jobs booked beyond the scheduler's next tick go
    through RQ's scheduler and come back for their slot: <= 1.5 re-schedules per job (a job the busy box
    releases after its slot's grace goes twice), paced at 5/s as :func:`tests.fleet.check_paced` says
    (bench/rq.py measures how close to its slot a returning job starts)."""
    f = fleet(4, TG_SHORT_WAIT_MS="0")
    for i in range(40):
        f.enqueue(jobs.paced5, i)
    f.wait(40)
    per_job = len(f.records("defer")) / 40
    print(f"re-schedules per job {per_job:.2f}")
    assert per_job >= 0.3, "the workload was meant to go through the scheduler"
    assert per_job <= 1.5
    slots = [float(x) for _, _, _, x in read_records(redis.Redis.from_url(REDIS_URL), f.prefix, "grant")]
    check_paced(slots, [t for _, t, _, _ in f.records("start")], 40, 5)


def test_nothing_lost_nothing_doubled(fleet: Callable[..., Fleet]) -> None:
    """300 jobs against 20/s on 3 workers, no in-place short waits: each job runs exactly once, each
    on_success callback and each dependent once; <= 1.2 re-schedules per job."""
    f = fleet(3, TG_SHORT_WAIT_MS="0")
    batch = [f.enqueue(jobs.paced, i, on_success=Callback(jobs.on_ok)) for i in range(300)]
    deps = [f.enqueue(jobs.add1, i, depends_on=batch[i * 10]) for i in range(30)]
    f.wait(300)
    f.wait(30, "add1", timeout=20)
    f.wait(300, "success_cb", timeout=20)
    time.sleep(1.0)  # anything doubled would show up by now
    counts = Counter(ident for ident, _, _, _ in f.records("start"))
    assert set(counts) == {j.id for j in batch}
    assert set(counts.values()) == {1}
    assert Counter(i for i, _, _, _ in f.records("success_cb")) == Counter(counts)
    assert sorted(int(x) for _, _, _, x in f.records("add1")) == list(range(30))
    assert {d.get_status(refresh=True) for d in deps} == {JobStatus.FINISHED}
    per_job = len(f.records("defer")) / 300
    print(f"re-schedules per job {per_job:.3f}")
    assert per_job <= 1.2


def test_concurrency_limit_and_killed_horse(fleet: Callable[..., Fleet]) -> None:
    """Limit 2 across 3 workers: in-flight max is exactly 2. A horse keeps its lease alive past the TTL; once
    SIGKILLed, its slot is freed by the lease TTL (3 s), not earlier: the worker does not release it."""
    f = fleet(3)
    for _ in range(10):
        f.enqueue(jobs.slow, 0.3)
    f.wait(10, "end")
    events = sorted(
        [(t, 1) for _, t, _, _ in f.records("start")] + [(t, -1) for _, t, _, _ in f.records("end")]
    )
    cur = peak = 0
    for _, d in events:
        cur += d
        peak = max(peak, cur)
    assert peak == 2
    leases = f"{f.prefix}:{{conc2}}:c"
    store = redis.Redis.from_url(REDIS_URL)
    deadline = time.monotonic() + 2.0  # the worker releases once the horse has exited, after the body ended
    while store.zcard(leases) and time.monotonic() < deadline:  # (a lease that expired stays until reaped)
        time.sleep(0.02)
    assert store.zcard(leases) == 0
    victim = f.enqueue(jobs.slow, 30)
    f.wait(11)
    ident, _, pid, _ = f.records("start")[-1]
    assert ident == victim.id
    time.sleep(3.5)  # longer than the lease TTL: the horse's heartbeats keep it
    assert store.zcount(leases, int(time.time() * 1000), "+inf") == 1
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    # In the engine: the lease's expiry (its score, the engine's clock) is at most a TTL after the kill
    # (nothing renews it since), and the lease stays, unchanged, until then: nobody releases it early.
    found: Any = store.zrange(leases, 0, -1, withscores=True)
    [(lease, expires_ms)] = found
    freed_after = expires_ms / 1000 - killed
    print(f"slot frees {freed_after:.2f} s after SIGKILL (lease TTL 3 s, heartbeat every 1 s)")
    assert 0 < freed_after <= 3.0 + 0.05, freed_after
    while time.time() < expires_ms / 1000 - 0.05:
        assert store.zscore(leases, lease) == expires_ms, "the lease was released or renewed after the kill"
        time.sleep(0.05)
    time.sleep(0.1)
    assert store.zcount(leases, int(time.time() * 1000), "+inf") == 0
    deadline = time.monotonic() + 10
    while victim.get_status(refresh=True) != JobStatus.FAILED and time.monotonic() < deadline:
        time.sleep(0.1)
    assert victim.get_status() == JobStatus.FAILED  # RQ's own verdict on a killed horse
    logs = "".join(log.read_text(errors="replace") for log in f.logs)
    assert "the horse exited before its job ended; its leases expire by their TTL" in logs


def test_own_retries_untouched(fleet: Callable[..., Fleet]) -> None:
    """A job with Retry(max=1), deferred >= 3 times while another holder keeps the only slot, still gets its
    own retry: deferrals never touch retries_left."""
    f = fleet(1)
    b = taskgate.connect(REDIS_URL, jobs.POLICIES, prefix=f.prefix)
    hog = b.admit("hold1", "*", heartbeat=True)
    assert hog.allowed
    job = f.enqueue(jobs.flaky, 7, retry=Retry(max=1))
    f.wait(3, "defer", timeout=20)
    assert job.get_status(refresh=True) == JobStatus.SCHEDULED
    assert Job.fetch(job.id, connection=f.r).retries_left == 1
    hog.release()
    f.wait(2, timeout=20)
    deadline = time.monotonic() + 10
    while job.get_status(refresh=True) != JobStatus.FINISHED and time.monotonic() < deadline:
        time.sleep(0.1)
    assert job.return_value() == 7
    assert [x for _, _, _, x in f.records("start")] == ["1", "0"]
    b.close()


def test_missing_scheduler_fails_loudly(fleet: Callable[..., Fleet]) -> None:
    f = fleet(0)
    log = f.spawn(scheduler=False)
    assert f.procs[0].wait(30) != 0
    text = log.read_text()
    assert "no RQ scheduler is running" in text
    assert "add --with-scheduler" in text
