"""RQ integration, fast: no real worker processes, no real Redis.

RQ runs on fakeredis and the store is the embedded ``memory://<uuid>`` (one per test); the worker is a
``taskgate.rq.SimpleWorker`` in burst mode (or in a thread with its in-process scheduler). A deferred job is
brought back on demand (:func:`due_now`), so nothing waits on the wall clock except the one end-to-end pacing
test. The forking worker, SIGKILL and the real scheduler are in ``test_rq_workers.py``.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fakeredis
import pytest
import rq
import rq.job
from rq import Callback, Queue, Retry
from rq.job import JobStatus
from rq.scheduler import RQScheduler

import taskgate
import taskgate.rq
from taskgate.integrations._gate import AdmissionGroup
from taskgate.integrations.rq import horse as tghorse
from taskgate.integrations.rq import worker as tgworker
from tests.apps import rq_jobs as jobs


@dataclass
class Env:
    conn: Any
    q: Queue
    backend: Any
    prefix: str

    def worker(self, **settings: Any) -> taskgate.rq.SimpleWorker:
        return jobs.RecordingSimpleWorker(
            [self.q], connection=self.conn, backend=self.backend, settings={"short_wait_ms": 0, **settings}
        )

    def work(self, **settings: Any) -> taskgate.rq.SimpleWorker:
        """One burst: every job queued now is decided (run or deferred)."""
        w = self.worker(**settings)
        w.work(burst=True, with_scheduler=True)
        return w

    def job(self, job_id: str) -> rq.job.Job:
        job = self.q.fetch_job(job_id)
        assert job is not None
        return job

    def records(self, kind: str) -> list[list[str]]:
        return [x.decode().split("|") for x in self.conn.lrange(f"{self.prefix}:{kind}", 0, -1)]

    def due_now(self, only: list[str] | None = None) -> int:
        """Make every deferred job (or those of ``only``) due, keeping their order, and release them (one
        pass of RQ's own scheduler)."""
        reg = self.q.scheduled_job_registry
        ids = [jid for jid in reg.get_job_ids() if only is None or jid in only]
        for i, jid in enumerate(ids):
            self.conn.zadd(reg.key, {jid: 1 + i})
        s: Any = RQScheduler([self.q], connection=self.conn)
        s._connection = self.conn
        s.acquire_locks()
        s.enqueue_scheduled_jobs()
        s.release_locks()
        return len(ids)


@pytest.fixture(autouse=True)
def _no_configured_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers made here take their store from the test, not from an earlier taskgate.rq.configure()."""
    monkeypatch.setattr(tgworker, "_defaults", {"backend": None, "policies": None, "settings": {}})


@pytest.fixture
def env() -> Iterator[Env]:
    conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    prefix = f"t{uuid.uuid4().hex[:8]}"
    jobs.PREFIX = prefix
    backend = taskgate.connect(f"memory://{uuid.uuid4().hex}", jobs.POLICIES, prefix=prefix)
    yield Env(conn, Queue("q", connection=conn), backend, prefix)
    backend.close()


def failure(job: rq.job.Job) -> str:
    result = job.latest_result()
    assert result is not None
    return str(result.exc_string)


def inflight(env: Env, policy: str) -> int:
    return int(env.backend.client.zcard(f"{env.prefix}:{{{policy}}}:c"))


# ------------------------------------------------------------------------------------------ declaration


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"throtle": "x"}, "did you mean 'throttle'"),
        ({"max_deferral": 3}, "did you mean 'max_deferrals'"),
        ({"colour": "red"}, r"unknown option\(s\) \['colour'\]"),
        ({"cost": 0}, r"cost=0: expected an int >= 1"),
        ({"tokens": -1}, r"tokens=-1: expected an int >= 0"),
        ({"key": "tenantt"}, r"key='tenantt': expected one of the task's parameters \['tenant', 'n'\]"),
        ({"key": 3.5}, "key=3.5"),
        ({"on_exhausted": "drop"}, "on_exhausted='drop': expected 'fail' or 'run'"),
        ({"max_deferrals": -1}, r"max_deferrals=-1: expected an int >= 0"),
        ({"book": "yes"}, "book='yes': expected True or False"),
    ],
)
def test_decorator_validates_options(given: dict[str, Any], message: str) -> None:
    with pytest.raises(TypeError, match=message):

        @taskgate.rq.throttled("llm", **given)
        def f(tenant: str, n: int) -> int:
            return n


def test_decorator_needs_a_policy_name() -> None:
    with pytest.raises(TypeError, match="needs the policy name"):

        @taskgate.rq.throttled  # type: ignore[arg-type]
        def f() -> None: ...

    with pytest.raises(TypeError, match="throttle=3: expected a policy name"):
        taskgate.rq.throttled(3)(jobs.plain)  # type: ignore[arg-type]


def test_decorator_only_tags() -> None:
    assert jobs.per_tenant.__name__ == "per_tenant"
    opts = getattr(jobs.per_tenant, taskgate.rq.ATTR)
    assert opts.policies == ("tenant5",)
    assert opts.key_for(("acme", 1), {}) == "acme"


def test_options_helper() -> None:
    assert taskgate.rq.options("llm", key="acme", tokens=5) == {
        "taskgate": {"throttle": "llm", "key": "acme", "tokens": 5}
    }
    assert taskgate.rq.options(["a", "b"]) == {"taskgate": {"throttle": ["a", "b"]}}
    with pytest.raises(TypeError, match="must be a value for this job"):
        taskgate.rq.options(key=lambda tenant: tenant)
    with pytest.raises(TypeError, match="expected the throttle key"):
        taskgate.rq.options(key="")
    with pytest.raises(TypeError, match="did you mean 'tokens'"):
        taskgate.rq.options(token=5)
    with pytest.raises(TypeError, match="cost=0"):
        taskgate.rq.options(cost=0)


def test_options_of_merges_meta_over_the_decorator(env: Env) -> None:
    job = env.q.enqueue(jobs.per_tenant, "acme", 1, meta=taskgate.rq.options(key="eu", cost=2))
    opts = taskgate.rq.options_of(job)
    assert opts is not None
    assert opts.policies == ("tenant5",)
    assert opts.key_for(job.args, job.kwargs) == "eu"
    assert opts.units_for("cost", job.args, job.kwargs) == 2
    plain = env.q.enqueue(jobs.plain, 1)
    assert taskgate.rq.options_of(plain) is None
    tagged = env.q.enqueue(jobs.plain, 1, meta=taskgate.rq.options("rate5", key=7))
    opts = taskgate.rq.options_of(tagged)
    assert opts is not None
    assert (opts.policies, opts.key_for((1,), {})) == (("rate5",), "7")
    untagged = env.q.enqueue(jobs.plain, 1, meta={"taskgate": {"key": "x"}})
    with pytest.raises(TypeError, match="has no throttle="):
        taskgate.rq.options_of(untagged)


def test_configure_and_settings_are_checked() -> None:
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['short_wait'\]"):
        taskgate.rq.configure(short_wait=3)
    conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    with pytest.raises(TypeError, match="unknown setting"):
        taskgate.rq.SimpleWorker(["q"], connection=conn, settings={"nope": 1})


# ----------------------------------------------------------------------------------------- worker setup


def test_worker_uses_the_taskgate_job_class(env: Env) -> None:
    assert env.worker().job_class is taskgate.rq.Job
    w = taskgate.rq.SimpleWorker([env.q], connection=env.conn, job_class="rq.job.Job")
    assert w.job_class is taskgate.rq.Job

    class Mine(taskgate.rq.Job):
        pass

    assert taskgate.rq.SimpleWorker([env.q], connection=env.conn, job_class=Mine).job_class is Mine

    class Other(rq.job.Job):
        pass

    with pytest.raises(TypeError, match=r"must be taskgate\.rq\.Job or a subclass"):
        taskgate.rq.SimpleWorker([env.q], connection=env.conn, job_class=Other)


def test_missing_scheduler_fails_loudly(env: Env) -> None:
    w = env.worker()
    with pytest.raises(
        RuntimeError, match=r"no RQ scheduler is running for queue\(s\) \['q'\].*--with-scheduler"
    ):
        w.work(burst=True)
    # another process holding RQ's scheduler lock for the queue is enough
    env.conn.set(RQScheduler.get_locking_key("q"), "elsewhere", ex=60)
    assert env.worker().work(burst=True) is False


def test_forking_worker_refuses_the_embedded_store(env: Env) -> None:
    w = taskgate.rq.Worker([env.q], connection=env.conn, backend=env.backend)
    with pytest.raises(RuntimeError, match=r"one per process.*TASKGATE_URL=redis://.*SimpleWorker"):
        w.work(burst=True, with_scheduler=True)


def test_backend_from_the_environment(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKGATE_URL", f"memory://{uuid.uuid4().hex}")
    monkeypatch.setenv(
        "TASKGATE_POLICIES", "version: 1\nlimiters:\n  p: {strategy: gcra, limit: 1, period: 1s}\n"
    )
    w = taskgate.rq.SimpleWorker([env.q], connection=env.conn)
    assert w.taskgate.backend.url.startswith("memory://")
    assert sorted(w.taskgate.backend.policies) == ["p"]


# ------------------------------------------------------------------------------------------- admission


def test_admitted_job_holds_its_slot_and_current(env: Env) -> None:
    seen: dict[str, Any] = {}
    job = env.q.enqueue(jobs.slow, 0.01)
    w = env.worker()

    def admitted(j: Any, out: Any) -> None:
        seen["group"] = out.group
        seen["inflight"] = inflight(env, "conc2")

    w.job_admitted = admitted  # type: ignore[method-assign,assignment]
    w.work(burst=True, with_scheduler=True)
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    assert isinstance(seen["group"], AdmissionGroup)
    assert seen["inflight"] == 1
    assert inflight(env, "conc2") == 0  # released in the job's finally
    assert job.meta == {}


def test_current_inside_the_job_is_the_admission(env: Env) -> None:
    job = env.q.enqueue(jobs.open_job, 1)
    env.work()
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    assert env.records("start")[0][3] == "AdmissionGroup"


def test_failing_job_releases_its_slot(env: Env) -> None:
    job = env.q.enqueue(jobs.boom, 1, on_failure=Callback(jobs.on_fail))
    env.work()
    assert job.get_status(refresh=True) == JobStatus.FAILED
    assert inflight(env, "hold1") == 0
    assert [r[3] for r in env.records("failure_cb")] == ["RuntimeError"]


def test_plain_jobs_are_untouched(env: Env) -> None:
    job = env.q.enqueue(jobs.plain, 5)
    env.work()
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    assert job.return_value() == 5


def test_tokens_are_reserved_and_settled(env: Env) -> None:
    job = env.q.enqueue(jobs.llm_call, "acme", 120)
    env.work()
    assert job.return_value() == [[0, 180]]  # nothing beyond the estimate; the rest of it refunded
    assert env.backend.admit("llm", "acme", tokens=0).decision.remaining == 1000 - 120


# -------------------------------------------------------------------------------------------- deferral


def test_denied_job_is_deferred_as_the_same_job(env: Env) -> None:
    """A denied job goes back to the scheduled registry as itself: same id, meta, retries_left,
    dependents, callbacks; out of the intermediate queue; nothing of it ran."""
    hog = env.backend.admit("hold1", "*")
    job = env.q.enqueue(
        jobs.flaky,
        7,
        retry=Retry(max=1),
        meta={"mine": 1},
        on_success=Callback(jobs.on_ok),
        job_id="fixed-id",
    )
    dep = env.q.enqueue(jobs.add1, 1, depends_on=job)
    for n in (1, 2, 3):
        env.work()
        job = env.job("fixed-id")
        assert job.get_status() == JobStatus.SCHEDULED
        assert job.id in env.q.scheduled_job_registry
        assert env.conn.llen(env.q.intermediate_queue_key) == 0
        assert job.retries_left == 1
        assert job.meta["mine"] == 1
        assert job.meta["taskgate_state"]["deferrals"] == n
        assert env.records("start") == []
        assert env.due_now() == 1
    hog.release()
    env.work()  # runs, raises: its own Retry (retries_left 1 -> 0), back at once
    env.work()  # runs again: success
    job = env.job("fixed-id")
    assert job.get_status() == JobStatus.FINISHED
    assert [r[3] for r in env.records("start")] == ["1", "0"]  # retries_left seen by each run
    assert job.retries_left == 0
    assert len(env.records("defer")) == 3
    assert [r[3] for r in env.records("success_cb")] == ["7"]
    assert dep.get_status(refresh=True) == JobStatus.FINISHED
    assert [r[3] for r in env.records("add1")] == ["1"]


def test_deferred_at_whole_seconds_rounded_up(env: Env) -> None:
    """Not booked: RQ's scheduler keys whole seconds, so the time is rounded up (never back early)."""
    env.q.enqueue(jobs.hourly, 1)
    env.work()
    job = env.q.enqueue(jobs.hourly, 2)
    t0 = time.time()
    env.work()
    score = env.conn.zscore(env.q.scheduled_job_registry.key, job.id)
    assert score == math.ceil(score)
    assert t0 + 3600 - 2 <= score <= t0 + 3600 + 2


def test_booked_job_is_released_before_its_slot_in_slot_order(env: Env) -> None:
    """Booked: scheduled before the slot (one second ahead when the scheduler's tick is unknown), with a
    score in (k - 1, k] that RQ releases with k; released to the front of the queue (ahead of a backlog
    never gated, behind which it would miss its slot), in slot order; its own enqueue_at_front comes back
    once it is admitted."""
    env.q.enqueue(jobs.paced2, 0)
    late = [env.q.enqueue(jobs.paced2, i) for i in (1, 2, 3, 4)]
    t0 = time.time()
    env.conn.set(RQScheduler.get_locking_key("q"), "elsewhere", ex=60)
    env.worker(booked_wait_ms=0).work(burst=True)
    defers = env.records("defer")
    assert len(defers) == 4
    scores = [env.conn.zscore(env.q.scheduled_job_registry.key, j.id) for j in late]
    # batch k (scores in (k - 1, k]) by batch, and within one the earlier slot last: each is pushed at the
    # front of the queue, so the last one pushed is taken first
    assert scores == sorted(scores, key=lambda x: (math.ceil(x), -x))
    for (_, _, _, axis, at, slot), score in zip(defers, scores, strict=True):
        assert axis == "rate"
        assert float(at) == pytest.approx(max(float(slot) - 1.01, t0), abs=0.05)
        assert math.floor(float(at)) - 1 < score <= math.floor(float(at))
    assert all(env.job(j.id).enqueue_at_front for j in late)
    backlog = env.q.enqueue(jobs.plain, 9)
    env.conn.delete(RQScheduler.get_locking_key("q"))
    taken = []
    for k in sorted({math.ceil(x) for x in scores}):  # RQ's scheduler releases one batch per tick
        batch = [j.id for j, x in zip(late, scores, strict=True) if math.ceil(x) == k]
        assert env.due_now(batch) == len(batch)
        assert env.q.job_ids[len(batch) :] == [backlog.id]  # ahead of the backlog
        taken += env.q.job_ids[: len(batch)]
        for jid in env.q.job_ids[: len(batch)]:  # taken by the workers before the next tick
            env.q.remove(jid)
    assert taken == [j.id for j in late]  # in slot order
    for jid in taken:
        env.q.push_job_id(jid)
    env.work(booked_wait_ms=3000)
    assert len(env.records("start")) == 6
    for j in late:
        job = env.job(j.id)
        assert job.get_status() == JobStatus.FINISHED
        assert not job.enqueue_at_front
        assert "taskgate_at_front" not in job.meta


def test_exhausted_job_fails_with_throttled_error(env: Env) -> None:
    hog = env.backend.admit("hold1", "*")  # "few": its own slot; hold it too
    hog2 = env.backend.admit("few", "*")
    job = env.q.enqueue(jobs.few, 1, on_failure=Callback(jobs.on_fail))
    for _ in range(2):
        env.work()
        assert env.due_now() == 1
    env.work()
    job = env.job(job.id)
    assert job.get_status() == JobStatus.FAILED
    assert "ThrottledError" in failure(job)
    assert "was deferred 2 times by policy 'few' (concurrency); max_deferrals=2 reached" in (failure(job))
    assert [r[3] for r in env.records("failure_cb")] == ["ThrottledError"]
    assert env.records("start") == []
    hog.release()
    hog2.release()


def test_exhausted_job_runs_when_on_exhausted_run(env: Env) -> None:
    hog = env.backend.admit("few", "*")
    job = env.q.enqueue(jobs.few_run, 1)
    for _ in range(2):
        env.work()
        env.due_now()
    env.work()
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    assert len(env.records("start")) == 1
    assert inflight(env, "few") == 1  # ran without taking a slot: only the hog holds one
    hog.release()


def test_per_job_max_deferrals_from_meta(env: Env) -> None:
    hog = env.backend.admit("hold1", "*")
    job = env.q.enqueue(jobs.flaky, 1, meta=taskgate.rq.options(max_deferrals=0))
    env.work()
    assert job.get_status(refresh=True) == JobStatus.FAILED
    hog.release()


def test_bad_arguments_fail_the_job_not_the_worker(env: Env) -> None:
    bad = env.q.enqueue(jobs.per_tenant, "", 1)  # key "" is not a key
    ok = env.q.enqueue(jobs.plain, 2)
    env.work()
    assert bad.get_status(refresh=True) == JobStatus.FAILED
    assert "a throttle key must be a non-empty str or an int" in failure(bad)
    assert ok.get_status(refresh=True) == JobStatus.FINISHED


def test_unknown_policy_fails_the_job_naming_it(env: Env) -> None:
    job = env.q.enqueue(jobs.plain, 1, meta=taskgate.rq.options("nosuch"))
    env.work()
    assert job.get_status(refresh=True) == JobStatus.FAILED
    assert "unknown policy 'nosuch'" in failure(job)


# --------------------------------------------------------------------------------------------- outages


def test_store_down_fail_closed_defers(env: Env) -> None:
    env.backend = taskgate.connect("redis://127.0.0.1:1/0", jobs.POLICIES, socket_connect_timeout=0.2)
    job = env.q.enqueue(jobs.flaky, 1)
    t0 = time.time()
    env.work()
    job = env.job(job.id)
    assert job.get_status() == JobStatus.SCHEDULED
    assert job.meta["taskgate_state"] == {"deferrals": 0, "bookings": {}, "outages": 1}
    assert env.records("defer")[0][3] == "unavailable"
    score = env.conn.zscore(env.q.scheduled_job_registry.key, job.id)
    assert t0 + 1 <= score <= t0 + 3


def test_store_down_fail_open_runs(env: Env) -> None:
    env.backend = taskgate.connect("redis://127.0.0.1:1/0", jobs.POLICIES, socket_connect_timeout=0.2)
    job = env.q.enqueue(jobs.open_job, 1)
    env.work()
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    assert env.records("start")[0][3] == "AdmissionGroup"


# ------------------------------------------------------------------------------------ single process


def test_single_process_worker_thread_paces_jobs(env: Env) -> None:
    """SimpleWorker in a thread (no signal handlers, TimerDeathPenalty) with its in-process scheduler: 6 jobs
    at 2/s on the embedded store all run once, paced: the k-th start is no earlier than k slots of 0.5 s
    after the enqueue (the engine's slots, on this process's clock; a start delayed by a busy box only moves
    later, so the bound holds under load where a gap between two starts would not)."""
    w = env.worker(short_wait_ms=250)
    w.scheduler_interval = 0.2
    t0 = time.time()
    batch = [env.q.enqueue(jobs.paced2, i) for i in range(6)]
    t = threading.Thread(target=w.work, kwargs={"with_scheduler": True}, daemon=True)
    t.start()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(
        j.get_status(refresh=True) == JobStatus.FINISHED for j in batch
    ):
        time.sleep(0.05)
    w.stop()
    env.q.enqueue(jobs.plain, 0)  # wakes the blocking dequeue
    t.join(10)
    assert not t.is_alive()
    assert all(j.get_status() == JobStatus.FINISHED for j in batch)
    ids = {j.id for j in batch}
    starts = sorted(float(r[1]) for r in env.records("start") if r[0] in ids)
    assert len({r[0] for r in env.records("start")}) == 7
    assert len(starts) == 6, starts
    early = [(k, round(t - t0 - 0.5 * k, 3)) for k, t in enumerate(starts) if t < t0 + 0.5 * k - 0.01]
    assert not early, (early, [round(t - t0, 3) for t in starts])
    assert w.death_penalty_class is rq.timeouts.TimerDeathPenalty


def test_lease_is_kept_alive_by_the_job(env: Env) -> None:
    """A job that outlives its lease TTL (1 s) keeps its slot: the heartbeat runs where the job runs."""
    env.backend = taskgate.connect(
        f"memory://{uuid.uuid4().hex}",
        {"c1": {"concurrency": {"maxLimit": 1, "leaseTtl": "1s"}}},
        prefix=env.prefix,
    )
    job = env.q.enqueue(jobs.plain, 0, meta=taskgate.rq.options("c1"))
    seen: list[Any] = []

    def admitted(j: Any, out: Any) -> None:
        seen.append(out.group)

    w = env.worker()
    w.job_admitted = admitted  # type: ignore[method-assign,assignment]
    original = jobs.plain

    def long(n: int) -> int:
        time.sleep(1.8)
        return original(n)

    jobs.plain = long
    try:
        w.work(burst=True, with_scheduler=True)
    finally:
        jobs.plain = original
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    (group,) = seen
    assert not group.reclaimed
    assert all(a.released for a in group.admissions)


def test_throttled_job_on_a_plain_worker_warns(
    env: Env, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job class alone does not throttle: a plain RQ worker runs the job unthrottled, and says so."""
    monkeypatch.setattr(tghorse, "_warned", False)
    job = env.q.enqueue(jobs.paced2, 1)
    w = rq.SimpleWorker([env.q], connection=env.conn, job_class=taskgate.rq.Job)
    with caplog.at_level("WARNING", logger="taskgate"):
        w.work(burst=True)
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    assert "ran without a taskgate worker, unthrottled" in caplog.text
