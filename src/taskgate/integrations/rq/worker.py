"""The worker side of RQ: :class:`Worker` (forking) and :class:`SimpleWorker` decide each throttled job
before it runs: admitted (the admission goes to the horse with the job, see
:mod:`~taskgate.integrations.rq.horse`), or deferred through RQ's scheduled registry, or failed / run once
its deferrals are used up. :func:`configure` sets the store and settings of the workers made after it."""

from __future__ import annotations

import datetime as dt
import inspect
import logging
import math
import mmap
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import rq
import rq.job
import rq.worker
from redis.exceptions import RedisError
from rq.job import JobStatus
from rq.results import Result
from rq.scheduler import SCHEDULER_KEY_TEMPLATE, RQScheduler
from rq.timeouts import TimerDeathPenalty, UnixSignalDeathPenalty
from rq.utils import as_text, import_job_class, now, utcparse

from taskgate.backends.waiting import Promoted
from taskgate.errors import BackendUnavailableError
from taskgate.integrations._gate import Admitted, DeferralState, Deferred, Parked, ProviderDeferred, _undo
from taskgate.integrations._runtime import Runtime
from taskgate.integrations.options import ThrottleOptions
from taskgate.integrations.rq.horse import _RESTORED, _VERDICT, Job, _Verdict
from taskgate.integrations.rq.jobs import META_AT_FRONT, META_STATE, options_of
from taskgate.integrations.rq.room import RqPromoter, payload, quiet, room_id, send_promoted
from taskgate.integrations.rq.scheduler import ThreadScheduler
from taskgate.policy import PolicySource

__all__ = ["RqRuntime", "SimpleWorker", "Worker", "configure"]

log = logging.getLogger("taskgate")
MARGIN_S = 0.01  # a booked job is released this much (at least) before its slot
PHASE_SLACK_S = 0.15  # how far the scheduler's tick may be from its estimated phase


class _WorkerDoor:
    """The backend as the worker process uses it: admissions it makes are handed to the horse, which keeps
    their leases alive. The worker never heartbeats them, so a SIGKILLed horse's lease expires by its TTL."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def admit(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["heartbeat"] = False
        return self._backend.admit(*args, **kwargs)


class RqRuntime(Runtime):
    """Per worker: the shared :class:`Runtime`; the gate asks through a :class:`_WorkerDoor`."""

    SETTINGS: ClassVar[Mapping[str, Any]] = {
        "max_deferrals": None,
        "on_exhausted": None,
        "short_wait_ms": 250,
        "booked_wait_ms": 1000,
    }
    where = "taskgate.rq"
    PROVIDER_DEFERRAL = True  # a job whose body met the provider's 429 is deferred, not failed

    def wrap_door(self, backend: Any) -> Any:
        return _WorkerDoor(backend)


_defaults: dict[str, Any] = {"backend": None, "policies": None, "settings": {}}


def configure(backend: Any = None, policies: PolicySource = None, **settings: Any) -> None:
    """The store (a URL or a backend object; default ``$TASKGATE_URL``, else ``memory://``) and policies
    (default ``$TASKGATE_POLICIES``) of the workers made after this call, and their settings:
    ``max_deferrals``, ``on_exhausted`` (defaults for jobs that do not say; else the policy's ``deferral``),
    ``short_wait_ms`` (250), ``booked_wait_ms`` (1000). Call it in a module the worker imports (e.g. the
    one holding your jobs, or an ``rq worker -c`` settings module), or pass the same to ``Worker(...)``."""
    RqRuntime.check_settings(settings)
    _defaults.update(backend=backend, policies=policies, settings=dict(settings))


def _job_class(given: object) -> type[Job]:
    jc = import_job_class(given) if isinstance(given, str) else given
    if jc is None or jc is rq.job.Job:
        return Job
    if not (isinstance(jc, type) and issubclass(jc, Job)):
        raise TypeError(
            f"taskgate.rq: the job class must be taskgate.rq.Job or a subclass of it, got {jc!r} "
            "(rq worker --job-class taskgate.rq.Job)"
        )
    return jc


class _GatedWorker(rq.worker.BaseWorker):
    """The decision before the horse; shared by :class:`Worker` and :class:`SimpleWorker`."""

    job_class = Job
    forks = True
    require_scheduler = True  # refuse to start when nothing would bring deferred jobs back

    def __init__(
        self,
        queues: Any,
        *args: Any,
        backend: Any = None,
        policies: PolicySource = None,
        settings: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs["job_class"] = _job_class(kwargs.get("job_class"))
        super().__init__(queues, *args, **kwargs)
        self._phases: dict[str, tuple[float | None, float]] = {}
        self.taskgate = RqRuntime(
            backend if backend is not None else _defaults["backend"],
            policies if policies is not None else _defaults["policies"],
            {**_defaults["settings"], **(settings or {})},
        )
        self._warned_rate_limit = False
        self.promoter = RqPromoter(self.taskgate.room, self._send_promoted)

    # hooks (no-ops): subclass for metrics
    def job_admitted(self, job: rq.job.Job, out: Admitted) -> None:
        """Called in the worker process when ``job`` was admitted, before its horse starts."""

    def job_deferred(self, job: rq.job.Job, out: Deferred, at: dt.datetime) -> None:
        """Called after ``job`` was put back in the scheduled registry for ``at``."""

    def job_parked(self, job: rq.job.Job, out: Parked) -> None:
        """Called after ``job`` was parked in a waiting room, or dropped as a duplicate message
        (``out.duplicate``)."""

    def work(self, *args: Any, **kwargs: Any) -> bool:
        bound = inspect.signature(rq.worker.BaseWorker.work).bind(self, *args, **kwargs)
        bound.apply_defaults()
        self.taskgate_preflight(with_scheduler=bool(bound.arguments["with_scheduler"]))
        try:
            rooms = self.taskgate.parks_any()
        except (RedisError, BackendUnavailableError) as e:  # the store is down: the promoter waits for it
            log.warning("taskgate: cannot read the store's persistence settings (%s): promoter started", e)
            rooms = True
        if rooms:  # parked jobs of any worker come back through the promoters of all of them
            self.promoter.start()
        try:
            return bool(super().work(*args, **kwargs))
        finally:
            if rooms:
                self.promoter.stop()

    def taskgate_preflight(self, *, with_scheduler: bool) -> None:
        """Fail loudly, before any job is taken, on a setup that would lose or strand deferred jobs."""
        backend = self.taskgate.backend
        url = str(getattr(backend, "url", ""))
        if self.forks and url.startswith("memory://"):
            raise RuntimeError(
                f"taskgate.rq: {type(self).__name__} forks a horse per job, and the embedded store {url} is "
                "one per process: point it at a shared store (TASKGATE_URL=redis://...) or use "
                "taskgate.rq.SimpleWorker"
            )
        if not with_scheduler and self.require_scheduler:
            locks = {q.name: RQScheduler.get_locking_key(q.name) for q in self.queues}
            missing = [name for name, lock in locks.items() if not self.connection.exists(lock)]
            if missing:
                raise RuntimeError(
                    f"taskgate.rq: no RQ scheduler is running for queue(s) {missing}, so a deferred job "
                    "would wait forever: add --with-scheduler to `rq worker` (or work(with_scheduler=True))"
                )
        log.info("taskgate: %s gating jobs through %r", self.name, backend)

    def execute_job(self, job: rq.job.Job, queue: rq.Queue) -> None:
        rt = self.taskgate
        try:
            opts = options_of(job)
            if opts is None:
                return self._run(job, queue, _Verdict())
            if getattr(job, "has_rate_limit", False) and not self._warned_rate_limit:
                self._warned_rate_limit = True
                log.warning(
                    "taskgate: job %s[%s] has RQ's own rate_limit= as well as a taskgate policy: the two "
                    "limits count each other's waiting jobs: drop rate_limit=",
                    job.func_name,
                    job.id,
                )
            roomed = self._parks(opts, job)
            out = self._enter_room(job, queue, opts) if roomed else self._decide(job, queue, opts)
        except Exception as e:  # bad options or arguments, unknown policy: the job fails, naming it
            log.error("taskgate: job %s[%s] cannot be gated: %s", job.func_name, job.id, e)
            return self._run(job, queue, _Verdict(error=e))
        if isinstance(out, Parked):
            self._park(job, queue, out)
            return None
        if isinstance(out, Admitted):
            state = job.meta.get(META_STATE)
            if isinstance(state, dict):
                spent = {k: v for k, v in state.items() if k != "promoted"}
                job.meta[META_STATE] = {**spent, "bookings": {}, "outages": 0}  # saved with the job
                if "promoted" in state:  # its grant is claimed: a retry of the job must not claim again
                    job.__dict__[_RESTORED] = True
            if META_AT_FRONT in job.meta:
                _own_at_front(job)
            self._hook(self.job_admitted, job, out)
            freed = [(a.policy, a.key) for a in out.group.admissions if a.lease_id] if roomed else []
            try:
                return self._run(job, queue, _Verdict(group=out.group, backend=rt.backend))
            finally:
                self._hand_on(freed)
        exhausted = rt.exhausted(opts, out, f"{job.func_name}[{job.id}]")
        if exhausted == "run":
            return self._run(job, queue, _Verdict())
        if exhausted is not None:
            return self._run(job, queue, _Verdict(error=exhausted))
        self._defer(job, queue, out)
        return None

    # -- the waiting room (room.py) -----------------------------------------------------------------------

    def _parks(self, opts: ThrottleOptions, job: rq.job.Job) -> bool:
        rt = self.taskgate
        try:
            if not rt.parks(opts):
                return False
        except (RedisError, BackendUnavailableError):  # the store is down: the gate's fail mode decides
            return False
        return DeferralState.from_dict(job.meta.get(META_STATE)).deferrals < rt.deferral_limit(opts)

    def _enter_room(
        self, job: rq.job.Job, queue: rq.Queue, opts: ThrottleOptions
    ) -> Admitted | Deferred | Parked:
        rt = self.taskgate
        state = DeferralState.from_dict(job.meta.get(META_STATE))
        args = (rt.room(), opts, job.args, job.kwargs, state, room_id(job), payload(job, queue.name))
        out = rt.gate.enter_room(*args)
        if isinstance(out, Parked) and out.duplicate and _requeued(job, state):
            out = rt.gate.enter_room(*args, redelivered=True)  # a new attempt, like any job
        if isinstance(out, Admitted):
            quiet(out.group)  # the horse heartbeats its leases, not the worker
        return out

    def _park(self, job: rq.job.Job, queue: rq.Queue, out: Parked) -> None:
        """Take a parked job (or a duplicate message) out of RQ's intermediate queue; a parked job's status
        becomes ``scheduled``: it waits to be put back on its queue."""
        with self.connection.pipeline() as p:
            p.lrem(queue.intermediate_queue_key, 1, job.id)  # else maintenance fails it as "stuck"
            if not out.duplicate:
                p.hset(job.key, "status", JobStatus.SCHEDULED.value)
            p.execute()
        if out.duplicate:
            log.info(
                "taskgate: job %s[%s] is a duplicate message (it waits, is on its way or ran through a "
                "waiting room): dropped",
                job.func_name,
                job.id,
            )
        else:
            log.debug(
                "taskgate: parked %s[%s] (policy %r, %d waiting)",
                job.func_name,
                job.id,
                out.policy,
                out.depth,
            )
            if out.depth == 1:  # the first waiter: its room is due soon, wake this worker's promoter
                self.promoter.wake()
        self._hook(self.job_parked, job, out)

    def _hand_on(self, freed: list[tuple[str, str]]) -> None:
        """A released concurrency slot goes to the oldest waiter of its room now, not at the next round."""
        for policy, key in freed:
            try:
                self.promoter.hand_off(policy, key)
            except Exception as e:
                log.warning(
                    "taskgate: handing on the slot of policy %r failed (%s); the promoter will", policy, e
                )

    def _send_promoted(self, policy: str, key: str, tasks: Sequence[Promoted]) -> None:
        send_promoted(
            self.connection,
            self.job_class,
            self.queue_class,
            self.serializer,
            self.taskgate.room(),
            policy,
            key,
            tasks,
        )

    def _decide(self, job: rq.job.Job, queue: rq.Queue, opts: ThrottleOptions) -> Admitted | Deferred:
        """The gate (which waits out waits <= short_wait_ms), and a booked slot waited out in place when the
        scheduler could not bring the job back before it (up to booked_wait_ms)."""
        rt = self.taskgate
        state = DeferralState.from_dict(job.meta.get(META_STATE))
        returning = bool(state.bookings)  # back from the scheduler for a booked slot
        while True:
            out = rt.gate.enter(opts, job.args, job.kwargs, state, holder=str(job.id))
            if isinstance(out, Admitted) or out.decision is None or not out.decision.booked:
                return out
            if out.countdown_ms / 1000.0 > self._wait_cap(queue, returning):
                return out
            state = out.state
            rt.gate.sleep(out.countdown_ms / 1000.0)

    def _wait_cap(self, queue: rq.Queue, returning: bool) -> float:
        """How long a booked job may wait here: up to booked_wait_ms, and no longer than until the
        scheduler's next release (a round trip through the scheduler then brings it back before its slot)."""
        cap = int(self.taskgate.settings["booked_wait_ms"]) / 1000.0
        if returning:
            # Released at the last tick before its slot: up to a second before it, plus the error of the
            # phase estimate (the ticks drift under load). Another round trip could only bring it back late.
            return cap + PHASE_SLACK_S
        phase = self._phase(queue)
        if phase is not None:
            now = time.time()
            nxt = math.floor(now) + phase
            nxt += 1.0 if nxt <= now else 0.0
            cap = min(cap, nxt - now + 0.05)
        return cap

    def _run(self, job: rq.job.Job, queue: rq.Queue, verdict: _Verdict) -> None:
        if self.forks and verdict.leases:
            verdict.ended = mmap.mmap(-1, 1)
        setattr(job, _VERDICT, verdict)
        try:
            super().execute_job(job, queue)
        finally:
            job.__dict__.pop(_VERDICT, None)
            if not self.forks:  # released by the job, unless RQ failed before performing it
                if verdict.group is not None and not all(a.released for a in verdict.group.admissions):
                    verdict.group.release()
            elif verdict.ended is not None:
                self._release_after_horse(verdict, verdict.ended[0])
                verdict.ended.close()

    def _release_after_horse(self, verdict: _Verdict, ended: int) -> None:
        """Release a horse's leases once its job body has ended. A horse that died in the body (SIGKILL, the
        job-monitor's kill, a stop command) never said so: its leases expire by their TTL."""
        if not ended:
            log.warning(
                "taskgate: the horse exited before its job ended; its leases expire by their TTL: %s",
                ", ".join(a.lease_id for a in verdict.leases),
            )
            return
        for a in verdict.leases:
            try:
                verdict.backend.release(a.lease_id, dropped=ended == 2)
            except BackendUnavailableError as e:
                log.warning("taskgate: release failed (%s); the slot frees when its lease expires", e)

    # -- the provider's 429 (horse.py raises ProviderDeferred out of the job body) -----------------------

    def _finalize_failure(self, job: rq.job.Job, queue: rq.Queue, execution: Any, exc_info: Any) -> None:
        """A job whose body met the provider's 429 is deferred until the provider's hold ends (parked again
        in its waiting room, or through RQ's scheduler), not failed: no RQ retry, no failure callback, no
        ``max_deferrals`` used; ``provider.maxDeferrals`` caps such deferrals (the gate raises
        ThrottledError past it, which fails the job here like any error). Runs in the horse (forked) or in
        the worker (:class:`SimpleWorker`)."""
        pd = exc_info[1]
        if isinstance(pd, ProviderDeferred):
            try:
                self._provider_defer(job, queue, execution, pd.deferred)
                return
            except Exception:
                log.exception(
                    "taskgate: could not defer %s[%s] after the provider's 429", job.func_name, job.id
                )
        base: Any = super()
        base._finalize_failure(job, queue, execution, exc_info)

    def _provider_defer(self, job: rq.job.Job, queue: rq.Queue, execution: Any, out: Deferred) -> None:
        job.ended_at = now()
        job.meta[META_STATE] = out.state.as_dict()
        opts = options_of(job)
        if (
            opts is None
            or not self._parks(opts, job)
            or not self._park_again(job, queue, opts, out, execution)
        ):
            self._defer(job, queue, out, execution)
        self._release_slot_safely(job)  # RQ's own rate_limit=, if the job has one

    def _park_again(
        self, job: rq.job.Job, queue: rq.Queue, opts: ThrottleOptions, out: Deferred, execution: Any
    ) -> bool:
        """Park a job that met the provider's 429 in the waiting room of the policy refused (the provider's
        hold now denies its key; promoted when it ends). False if it was admitted at once (the hold ended
        already): the caller defers it through RQ's scheduler instead."""
        rt = self.taskgate
        p = rt.backend.policy(out.policy)
        cost = opts.units_for("cost", job.args, job.kwargs) if p.rate else 1
        tokens = opts.units_for("tokens", job.args, job.kwargs) if p.budgets else 0
        key = opts.key_for(job.args, job.kwargs)
        e = rt.room().enter(p.name, key, room_id(job), payload(job, queue.name), cost, tokens, dedupe=False)
        if e.status != "parked":
            if e.admission is not None:
                _undo([e.admission])
            return False
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipeline=pipe, execution=execution)
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            pipe.hset(
                job.key, mapping={"status": JobStatus.SCHEDULED.value, "meta": job.serializer.dumps(job.meta)}
            )
            pipe.execute()
        job._status = JobStatus.SCHEDULED
        log.info(
            "taskgate: %s[%s] met the provider's 429: parked again (policy %r, provider deferral #%d)",
            job.func_name,
            job.id,
            out.policy,
            out.state.provider,
        )
        self._hook(self.job_parked, job, Parked(out.policy, e.depth, "provider"))
        return True

    def _defer(self, job: rq.job.Job, queue: rq.Queue, out: Deferred, execution: Any = None) -> None:
        counted = out.reason == "throttled"  # waits for the store (fail: closed) are not deferrals
        state = DeferralState(
            out.state.deferrals + counted, out.state.bookings, out.state.outages, provider=out.state.provider
        )
        job.meta[META_STATE] = state.as_dict()
        now = time.time()
        target = now + out.countdown_ms / 1000.0
        phase = self._phase(queue)
        booked = out.decision is not None and out.decision.booked
        if booked:
            # Released at the scheduler's last tick before the slot: it comes back early (by up to ~1 s)
            # and waits for its slot here; ordered by slot among the jobs released at that tick.
            at = max(target - (1.0 if phase is None else phase) - MARGIN_S, now)
        else:  # at the first tick after the target (never early: that would only cost another deferral)
            at = float(math.ceil(target) if phase is None else math.ceil(target - phase))
        when = dt.datetime.fromtimestamp(at, tz=dt.timezone.utc)
        if booked:
            # A booked job goes to the front of the queue when released, ahead of work that was never
            # gated (behind a backlog it would miss its slot and be booked again, at the back of the line).
            job.meta.setdefault(META_AT_FRONT, job.enqueue_at_front)
            job.enqueue_at_front = True
        elif META_AT_FRONT in job.meta:
            job.enqueue_at_front = job.meta.pop(META_AT_FRONT)  # saved with the job below
        with self.connection.pipeline() as p:
            if execution is not None:  # deferred by the provider after its body ran (the horse's execution)
                self.cleanup_execution(job, pipeline=p, execution=execution)
            p.lrem(queue.intermediate_queue_key, 1, job.id)  # else maintenance fails it as "stuck"
            queue.schedule_job(job, when, pipeline=p)
            if booked:
                # RQ scores whole seconds (floored) and releases a score <= floor(now) in score order: a
                # score in (k - 1, k] is released with k. The scheduler pushes each at the front, so the
                # last one pushed is taken first: within its batch, the earlier its slot the higher its score.
                k = math.floor(when.timestamp())
                p.zadd(queue.scheduled_job_registry.key, {job.id: k - min(max(target - k, 0.0), 1.998) / 2})
            p.execute()
        log.debug(
            "taskgate: deferred %s[%s] to %s (policy %r, %s, deferral #%d)",
            job.func_name,
            job.id,
            when.isoformat(),
            out.policy,
            out.axis,
            state.deferrals,
        )
        self._hook(self.job_deferred, job, out, when)

    def _hook(self, hook: Callable[..., None], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:
            log.exception("taskgate: %s hook failed", getattr(hook, "__name__", hook))

    def _phase(self, queue: rq.Queue) -> float | None:
        """When in each second the scheduler of ``queue`` releases due jobs (those scheduled up to the last
        whole second): RQ's ticks every second and a few ms, read from its heartbeat; an in-process one by
        ``tick`` s after each whole second. None when unknown."""
        own = self.scheduler
        if isinstance(own, ThreadScheduler) and queue.name in own.acquired_locks:
            return min(own.tick, 0.99)
        hit = self._phases.get(queue.name)
        if hit is not None and time.monotonic() - hit[1] < 5.0:
            return hit[0]
        found: float | None = None
        try:
            name = self.connection.get(RQScheduler.get_locking_key(queue.name))
            beat = (
                self.connection.hget(SCHEDULER_KEY_TEMPLATE % as_text(name), "last_heartbeat")
                if name
                else None
            )
            if beat:
                found = utcparse(as_text(beat)).timestamp() % 1.0
        except Exception as e:  # unknown: a one-second lead
            log.debug("taskgate: cannot read the tick of RQ's scheduler: %s", e)
        self._phases[queue.name] = (found, time.monotonic())
        return found


def _requeued(job: rq.job.Job, state: DeferralState) -> bool:
    """A job whose last run failed, put back on its queue (``job.requeue()``, ``rq requeue``, or its id
    enqueued again): queued, not a promoted message. Not a second message of a job that waits (it never
    ran), nor of one that ran and succeeded (a duplicate: it runs once), nor a stray copy of a failed job's
    message (its status is still ``failed``)."""
    if state.promoted or job.get_status(refresh=False) != JobStatus.QUEUED:
        return False
    try:
        last = job.latest_result()
    except Exception:  # results unreadable: keep the conservative answer (a duplicate)
        return False
    return last is not None and last.type == Result.Type.FAILED


def _own_at_front(job: rq.job.Job) -> None:
    """Give an admitted job back its own ``enqueue_at_front`` (for its own Retry and a later re-enqueue),
    which a booked deferral had set; its hash follows in RQ's own pipeline as the job starts
    (:meth:`Job.prepare_for_execution`), not in a round trip of its own."""
    job.enqueue_at_front = job.meta.pop(META_AT_FRONT)
    job.__dict__[_RESTORED] = True


class Worker(_GatedWorker, rq.worker.Worker):
    """``rq worker --worker-class taskgate.rq.Worker --job-class taskgate.rq.Job --with-scheduler``: a forking
    worker that admits or defers each throttled job before forking its horse."""

    forks = True


class SimpleWorker(_GatedWorker, rq.worker.SimpleWorker):
    """No fork: the job runs in the worker process. Runs in any thread: off the main thread it installs no
    signal handlers and times jobs out with ``TimerDeathPenalty``; on fakeredis (or with
    ``in_process_scheduler = True``) ``with_scheduler`` runs RQ's scheduler as a thread."""

    forks = False
    in_process_scheduler: bool | None = None  # None: when the RQ connection is fakeredis
    scheduler_interval = 1.0

    def work(self, *args: Any, **kwargs: Any) -> bool:
        off_main = threading.current_thread() is not threading.main_thread()
        if off_main and self.death_penalty_class is UnixSignalDeathPenalty:
            self.death_penalty_class = TimerDeathPenalty
        return super().work(*args, **kwargs)

    def stop(self) -> None:
        """Stop a worker that runs in another thread (signals cannot reach it) after its current job. It
        notices when its blocking dequeue returns: with the next job, or after ``dequeue_timeout``."""
        self._stop_requested = True

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():
            base: Any = super()
            base._install_signal_handlers()

    def _scheduler_in_process(self) -> bool:
        if self.in_process_scheduler is not None:
            return self.in_process_scheduler
        return type(self.connection).__module__.split(".")[0] == "fakeredis"

    def _start_scheduler(self, burst: bool = False, *args: Any, **kwargs: Any) -> None:
        if not self._scheduler_in_process():
            super()._start_scheduler(burst, *args, **kwargs)
            return
        s: Any = ThreadScheduler(self.queues, self.connection, self.scheduler_interval)
        self.scheduler = s
        s.acquire_locks()
        if not s.acquired_locks:
            return
        if burst:  # one pass, as RQ does in burst mode
            try:
                s.register_birth()
                s.enqueue_scheduled_jobs()
            finally:
                s.release_locks()
                s.register_death()
        else:
            s.start()

    def stop_scheduler(self) -> None:
        if isinstance(self.scheduler, ThreadScheduler):
            self.scheduler.halt()
            return
        base: Any = super()
        base.stop_scheduler()
