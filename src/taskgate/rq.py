"""RQ integration: ``@taskgate.rq.throttled("llm", key=...)`` jobs, admitted by the worker before it forks.

::

    @taskgate.rq.throttled("llm", key="tenant", tokens=lambda tenant, prompt: 800)
    def summarize(tenant, prompt):
        out = call_llm(prompt)
        taskgate.current().settle(out.usage)          # the admission held by this job
        return out.text

    queue.enqueue(summarize, "acme", "...")                                  # the decorator's options
    queue.enqueue(summarize, "acme", "...", meta=taskgate.rq.options(key="acme-eu", tokens=2000))  # per job

    $ TASKGATE_URL=redis://localhost:6379/0 TASKGATE_POLICIES=taskgate.yaml \\
      rq worker llm --worker-class taskgate.rq.Worker --job-class taskgate.rq.Job --with-scheduler

How it works (``shared/research/integration-mechanics.md`` §7-9 has the experiments behind each choice):

- The decorator only tags the function (its options are validated there, with the same meanings as the
  Celery task options: ``throttle``, ``key``, ``cost``, ``tokens``, ``max_deferrals``, ``on_exhausted``,
  ``book``). :func:`options` puts per-job overrides in ``job.meta["taskgate"]``; there they are *values*
  for that one job (``key="acme"`` is the key itself, not a parameter name).
- :class:`Worker` (and :class:`SimpleWorker`) override ``execute_job``: before the horse is forked, one gate
  decision across the job's policies. Short waits (<= ``short_wait_ms``, 250 ms) are waited out in place,
  and so is a *booked* rate slot that comes before the RQ scheduler's next tick (at most
  ``booked_wait_ms``, 1 s): a round trip through the scheduler could only bring it back after its slot.
- Admitted: the admission (concurrency lease, token reservation) is handed to the horse with the job object
  (fork copies it). :class:`Job` ``.perform`` heartbeats the leases while the body runs and makes
  ``taskgate.current()`` return them (settle tokens there). When the body ends it says so, and whether it
  raised, on a page shared with the worker (``mmap``), and the worker releases the leases once the horse
  has exited (``dropped=True`` if the body raised): the horse of a short job never has to open a
  connection to the store. A horse that dies in the body (SIGKILL, RQ's job-monitor kill or stop-job
  command) never says so: nobody releases its slot early, its lease expires by its TTL. Without a fork
  (:class:`SimpleWorker`) the job releases in its ``finally``.
- Denied: the same job (same id, meta, dependents, callbacks, ``retries_left``) is removed from the
  intermediate queue and put in the ``ScheduledJobRegistry`` with ``queue.schedule_job``; the deferral
  count and any booked slot travel in ``job.meta["taskgate_state"]``. RQ's scheduler keys jobs on whole
  seconds and releases the due ones on its tick (every second and a few ms; its phase is read from its
  heartbeat): a job with a booked slot is released at the last tick before the slot, to the front of the
  queue (``enqueue_at_front``, the job's own setting restored once admitted), in slot order, and waits the
  rest (< ~1 s, plus the drift of the scheduler's tick) in the worker, so it starts at its slot even behind
  a backlog of jobs not yet gated; any other is released at the first
  tick after ``now + retry_after`` (+ jitter), never early. Deferrals never consume retries. After
  ``max_deferrals`` the job fails with :class:`~taskgate.ThrottledError` (``on_exhausted="fail"``, through
  RQ's normal failure path, so failure callbacks and the job's own ``Retry`` apply) or runs anyway
  (``"run"``).
- Store outage: the gate applies each policy's ``fail`` mode: ``open`` runs the job unthrottled, ``closed``
  defers it with a growing backoff (1 s ... 60 s). Nothing is dropped.
- A deferred job only comes back through RQ's scheduler: the worker refuses to start without
  ``--with-scheduler`` unless another scheduler holds the scheduler lock of each of its queues.

What to expect (``bench/rq.py`` on real ``rq worker`` fleets, a shared 2-vCPU VM; ``bench/RESULTS.md``): the
rate axis is paid when a slot is taken or booked, so the long-run rate is the limit (measured within 0.1%,
as long as the workers can run that many jobs a second at all). Jobs paced in place start at their slots:
the most starts in any 1-second window is the limit plus the burst (1.05-1.1x). Jobs that go through the
scheduler (~0.9-1.0 re-schedules per job when most do) start ~10 ms after their slot at the median; a
worker that is busy (or starved of CPU) when its returning job is due starts it late, and late starts
bunch: p99 0.02-0.3 s late, up to 1.2-1.45x the limit in a 1-second window before booked jobs went to
the front of the queue, p99 0.09 s and 1.05x in the run since (3 workers, 20/s, 300 jobs). A
concurrency-denied job comes back at the first scheduler tick after its estimated wait: with short jobs, a
slot can stay idle for up to ~1 s. When the throttle never binds it costs one ``check`` (rate only) or one
``admit`` plus one ``release`` round trip per job: 0.89-1.2x (check) and 0.79-0.88x (admit + release) the
jobs/s of an unthrottled worker on no-op jobs in the recorded runs (rounds on this VM vary up to 2x; under
cProfile the two round trips are ~5% of a no-op job), less on real ones. Deferred jobs count towards
``rq worker --max-jobs``; ``--burst`` workers exit while deferred jobs wait in the scheduled registry.
:class:`SpawnWorker` is not supported (the admission travels in the forked memory); a ``grpc://`` store
with the forking :class:`Worker` is untested.

Single process (tests, notebooks): a :class:`SimpleWorker` on the embedded ``memory://`` store, RQ on
fakeredis, run in a thread: the scheduler then runs as a thread of the worker (RQ's own forks a process,
which cannot share fakeredis), signal handlers are skipped off the main thread and job timeouts use
``TimerDeathPenalty``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import logging
import math
import mmap
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import rq
import rq.job
import rq.worker
from rq.scheduler import SCHEDULER_KEY_TEMPLATE, RQScheduler
from rq.timeouts import TimerDeathPenalty, UnixSignalDeathPenalty
from rq.utils import as_text, import_job_class, utcparse

from taskgate.admission import Admission, HeartbeatPump, _current
from taskgate.errors import BackendUnavailableError, ThrottledError
from taskgate.integrations._gate import AdmissionGroup, Admitted, DeferralState, Deferred, Gate
from taskgate.integrations.options import OPTION_NAMES, ThrottleOptions, check_option_names, parse_options
from taskgate.policy import PolicySource

__all__ = [
    "META",
    "META_STATE",
    "Job",
    "SimpleWorker",
    "Worker",
    "configure",
    "options",
    "options_of",
    "throttled",
]

log = logging.getLogger("taskgate")
META = "taskgate"  # job.meta key of the per-job options
META_STATE = "taskgate_state"  # job.meta key of the deferral state (DeferralState.as_dict())
META_AT_FRONT = "taskgate_at_front"  # job.meta key: the job's own enqueue_at_front while a booked deferral
ATTR = "__taskgate_options__"  # attribute the decorator puts on the job function
_VERDICT = "_taskgate_verdict"  # attribute of the Job object handed from the worker to the horse
_RESTORED = "_taskgate_restored"  # attribute: the job's own enqueue_at_front is back, its hash to follow
SETTINGS = {
    "max_deferrals": None,
    "on_exhausted": None,
    "short_wait_ms": 250,
    "booked_wait_ms": 1000,
}
MARGIN_S = 0.01  # a booked job is released this much (at least) before its slot
PHASE_SLACK_S = 0.15  # how far the scheduler's tick may be from its estimated phase

F = TypeVar("F", bound=Callable[..., Any])


# -- declaring throttled jobs -----------------------------------------------------------------------------


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', getattr(fn, '__name__', '?'))}"


def _reject_unknown(task: str, given: Mapping[str, Any]) -> None:
    check_option_names(task, given)  # "did you mean ..." for a near miss
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"task {task!r}: unknown option(s) {unknown}; known: {list(OPTION_NAMES)}")


def throttled(throttle: str | Sequence[str], **opts: Any) -> Callable[[F], F]:
    """Throttle an RQ job function by policy ``throttle`` (a name or a list of names). Options as for Celery
    tasks: ``key`` (a parameter name or a callable of the job's arguments), ``cost``, ``tokens`` (ints or
    callables), ``max_deferrals``, ``on_exhausted`` (``"fail"``/``"run"``), ``book``. Validated here; the
    function itself is returned unchanged (only tagged), so it can still be called directly."""

    def tag(fn: F) -> F:
        name = _name(fn)
        _reject_unknown(name, opts)
        setattr(fn, ATTR, parse_options(name, throttle, func=fn, **opts))
        return fn

    if callable(throttle) and not isinstance(throttle, str):
        raise TypeError("@taskgate.rq.throttled needs the policy name: @taskgate.rq.throttled('llm', ...)")
    return tag


def options(throttle: str | Sequence[str] | None = None, **opts: Any) -> dict[str, Any]:
    """Per-job options, to pass as ``queue.enqueue(f, ..., meta=taskgate.rq.options(...))`` (merge with your
    own meta: ``meta={**taskgate.rq.options(key="acme"), "note": 1}``). They override the decorator's.
    Values only: ``key`` is the throttle key of this job (a str or an int), ``cost``/``tokens`` are ints."""
    given = dict(opts)
    if throttle is not None:
        given["throttle"] = throttle
    return {META: _check_meta("taskgate.rq.options()", given)}


def _check_meta(task: str, given: Mapping[str, Any]) -> dict[str, Any]:
    _reject_unknown(task, given)
    for n in ("key", "cost", "tokens"):
        if callable(given.get(n)):
            raise TypeError(
                f"task {task!r}: {n}= in job.meta must be a value for this job, not a callable "
                "(use a callable in @taskgate.rq.throttled)"
            )
    key = given.get("key")
    if "key" in given and (isinstance(key, bool) or not isinstance(key, (str, int)) or key == ""):
        raise TypeError(f"task {task!r}: key={key!r}: expected the throttle key (a non-empty str or an int)")
    throttle = given.get("throttle", "-")
    if isinstance(throttle, tuple):
        throttle = list(throttle)
    checked = {n: given[n] for n in OPTION_NAMES if n in given and n not in ("throttle", "key")}
    parse_options(task, throttle, **checked)
    out = dict(given)
    if "throttle" in out:
        out["throttle"] = throttle if isinstance(throttle, str) else list(throttle)
    return out


def _fixed(value: object) -> Callable[..., object]:
    def key(**_: Any) -> object:
        return value

    return key


def options_of(job: rq.job.Job) -> ThrottleOptions | None:
    """The options of ``job``: its function's decorator, overridden by ``job.meta["taskgate"]``; None if the
    job is not throttled."""
    func = job.func
    base: ThrottleOptions | None = getattr(func, ATTR, None)
    over = job.meta.get(META) if isinstance(job.meta, dict) else None
    if not over:
        return base
    name = str(job.func_name)
    if not isinstance(over, Mapping):
        raise TypeError(f"task {name!r}: job.meta[{META!r}] must be a dict (use taskgate.rq.options())")
    over = _check_meta(name, over)
    if base is None:
        if "throttle" not in over:
            raise TypeError(
                f"task {name!r}: job.meta[{META!r}] has no throttle= and the function is not decorated "
                "with @taskgate.rq.throttled"
            )
        base = parse_options(name, over["throttle"], func=func if callable(func) else None)
    plain = ("cost", "tokens", "max_deferrals", "on_exhausted", "book")
    changes: dict[str, Any] = {n: over[n] for n in plain if n in over}
    if "throttle" in over:
        t = over["throttle"]
        changes["policies"] = (t,) if isinstance(t, str) else tuple(t)
    if "key" in over:
        changes["key"] = _fixed(over["key"])
    return dataclasses.replace(base, **changes)


# -- configuration ---------------------------------------------------------------------------------------

_defaults: dict[str, Any] = {"backend": None, "policies": None, "settings": {}}


def configure(backend: Any = None, policies: PolicySource = None, **settings: Any) -> None:
    """The store (a URL or a backend object; default ``$TASKGATE_URL``, else ``memory://``) and policies
    (default ``$TASKGATE_POLICIES``) of the workers made after this call, and their settings:
    ``max_deferrals``, ``on_exhausted`` (defaults for jobs that do not say; else the policy's ``deferral``),
    ``short_wait_ms`` (250), ``booked_wait_ms`` (1000). Call it in a module the worker imports (e.g. the
    one holding your jobs, or an ``rq worker -c`` settings module), or pass the same to ``Worker(...)``."""
    _check_settings(settings)
    _defaults.update(backend=backend, policies=policies, settings=dict(settings))


def _check_settings(settings: Mapping[str, Any]) -> None:
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise TypeError(f"taskgate.rq: unknown setting(s) {sorted(unknown)}; known: {sorted(SETTINGS)}")


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


class _Runtime:
    """Per worker: the backend (made on first use), the gate and the settings."""

    def __init__(self, backend: Any, policies: PolicySource, settings: Mapping[str, Any]) -> None:
        _check_settings(settings)
        self._spec = backend
        self._policies = policies
        self._backend: Any = None
        self._door: _WorkerDoor | None = None
        self._lock = threading.Lock()
        self.settings = {**SETTINGS, **settings}
        self.gate = Gate(self.door, short_wait_ms=int(self.settings["short_wait_ms"]))

    @property
    def backend(self) -> Any:
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    if isinstance(self._spec, str) or self._spec is None:
                        from taskgate.backends import connect

                        self._backend = connect(self._spec, self._policies)
                    else:
                        self._backend = self._spec
        return self._backend

    def door(self) -> _WorkerDoor:
        if self._door is None:
            self._door = _WorkerDoor(self.backend)
        return self._door

    def max_deferrals(self, opts: ThrottleOptions, policy: str) -> int:
        if opts.max_deferrals is not None:
            return opts.max_deferrals
        v = self.settings["max_deferrals"]
        return int(v) if v is not None else int(self.backend.policy(policy).deferral.max_deferrals)

    def on_exhausted(self, opts: ThrottleOptions, policy: str) -> str:
        if opts.on_exhausted is not None:
            return opts.on_exhausted
        v = self.settings["on_exhausted"]
        return str(v) if v is not None else str(self.backend.policy(policy).deferral.on_exhausted)


# -- the horse side --------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Verdict:
    """What the worker decided for one attempt, handed to the horse on the job object."""

    group: AdmissionGroup | None = None  # admitted: hold these while the job runs
    error: BaseException | None = None  # fail the job with this instead of running it
    backend: Any = None  # whose heartbeat pump keeps the leases alive
    # Forked: a page shared with the horse, where it says that the job body ended (1) or raised (2); the
    # worker then releases the leases (the horse need not open a connection to the store for that).
    ended: mmap.mmap | None = None

    @property
    def leases(self) -> list[Admission]:
        return [a for a in self.group.admissions if a.held] if self.group is not None else []


_warned = False


class Job(rq.job.Job):
    """``--job-class taskgate.rq.Job``: runs a throttled job holding what the worker admitted it with."""

    def prepare_for_execution(self, worker_name: str, pipeline: Any) -> None:
        super().prepare_for_execution(worker_name, pipeline)
        if self.__dict__.pop(_RESTORED, False):  # see _own_at_front: its hash, in the same pipeline
            if self.enqueue_at_front is None:
                pipeline.hdel(self.key, "enqueue_at_front")
            else:
                pipeline.hset(self.key, "enqueue_at_front", int(bool(self.enqueue_at_front)))
            pipeline.hset(self.key, "meta", self.serializer.dumps(self.meta))

    def perform(self) -> Any:
        verdict: _Verdict | None = self.__dict__.pop(_VERDICT, None)
        if verdict is None:
            _warn_ungated(self)
            return super().perform()
        if verdict.error is not None:
            raise verdict.error
        group = verdict.group
        if group is None:
            return super().perform()
        if verdict.backend is not None and verdict.leases:
            pump = _pump(verdict.backend)
            for a in verdict.leases:
                a.start_heartbeat(pump)
        if verdict.ended is None:  # not forked: release here
            with group:
                return super().perform()
        token = _current.set(group)
        outcome = 2
        try:
            result = super().perform()
            outcome = 1
            return result
        finally:
            _current.reset(token)
            verdict.ended[0] = outcome
            _hand_back(group)


def _hand_back(group: AdmissionGroup) -> None:
    """In a horse whose job ended: charge an unsettled estimate (debit accounting) as release would, and
    stop renewing the leases; the worker releases them when the horse exits."""
    for a in group.admissions:
        try:
            extra = a._unsettled_on_release()
            if extra:
                a.settle(extra)
        except BackendUnavailableError as e:
            log.warning("taskgate: could not charge the unsettled estimate of %r: %s", a.policy, e)
        if a.held:
            a.released = True
            if a._pump is not None:
                a._pump.unregister(a)


_pumps: dict[int, HeartbeatPump] = {}


def _pump(backend: Any) -> HeartbeatPump:
    """One heartbeat thread per backend and process (the pump restarts itself in a forked horse)."""
    pump = _pumps.get(id(backend))
    if pump is None:
        pump = _pumps[id(backend)] = HeartbeatPump(backend, float(backend.heartbeat_interval))
    return pump


def _warn_ungated(job: rq.job.Job) -> None:
    global _warned
    if _warned:
        return
    try:
        throttled_fn = getattr(job.func, ATTR, None) is not None or bool(job.meta.get(META))
    except Exception:
        return
    if throttled_fn:
        _warned = True
        log.warning(
            "taskgate: job %s[%s] is throttled but ran without a taskgate worker, unthrottled: start the "
            "worker with --worker-class taskgate.rq.Worker (or SimpleWorker)",
            job.func_name,
            job.id,
        )


# -- the worker side -------------------------------------------------------------------------------------


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
        self.taskgate = _Runtime(
            backend if backend is not None else _defaults["backend"],
            policies if policies is not None else _defaults["policies"],
            {**_defaults["settings"], **(settings or {})},
        )

    # hooks (no-ops): subclass for metrics
    def job_admitted(self, job: rq.job.Job, out: Admitted) -> None:
        """Called in the worker process when ``job`` was admitted, before its horse starts."""

    def job_deferred(self, job: rq.job.Job, out: Deferred, at: dt.datetime) -> None:
        """Called after ``job`` was put back in the scheduled registry for ``at``."""

    def work(self, *args: Any, **kwargs: Any) -> bool:
        bound = inspect.signature(rq.worker.BaseWorker.work).bind(self, *args, **kwargs)
        bound.apply_defaults()
        self.taskgate_preflight(with_scheduler=bool(bound.arguments["with_scheduler"]))
        return bool(super().work(*args, **kwargs))

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
            out = self._decide(job, queue, opts)
        except Exception as e:  # bad options or arguments, unknown policy: the job fails, naming it
            log.error("taskgate: job %s[%s] cannot be gated: %s", job.func_name, job.id, e)
            return self._run(job, queue, _Verdict(error=e))
        if isinstance(out, Admitted):
            state = job.meta.get(META_STATE)
            if isinstance(state, dict):
                job.meta[META_STATE] = {**state, "bookings": {}, "outages": 0}  # spent; saved with the job
            if META_AT_FRONT in job.meta:
                _own_at_front(job)
            self._hook(self.job_admitted, job, out)
            return self._run(job, queue, _Verdict(group=out.group, backend=rt.backend))
        if out.reason == "throttled":
            limit = rt.max_deferrals(opts, out.policy)
            if out.state.deferrals >= limit:
                if rt.on_exhausted(opts, out.policy) == "run":
                    log.warning(
                        "taskgate: %s[%s] deferred %d times; on_exhausted=run: running",
                        job.func_name,
                        job.id,
                        out.state.deferrals,
                    )
                    return self._run(job, queue, _Verdict())
                err = ThrottledError(
                    f"task {job.func_name}[{job.id}] was deferred {out.state.deferrals} times by policy "
                    f"{out.policy!r} ({out.axis}); max_deferrals={limit} reached",
                    out.decision,
                )
                return self._run(job, queue, _Verdict(error=err))
        self._defer(job, queue, out)
        return None

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

    def _defer(self, job: rq.job.Job, queue: rq.Queue, out: Deferred) -> None:
        counted = out.reason == "throttled"  # waits for the store (fail: closed) are not deferrals
        state = DeferralState(out.state.deferrals + counted, out.state.bookings, out.state.outages)
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
        if isinstance(own, _ThreadScheduler) and queue.name in own.acquired_locks:
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


class _ThreadScheduler(RQScheduler):
    """RQ's scheduler as a thread of the worker (RQ's own forks a process, which cannot share fakeredis)."""

    def __init__(self, queues: Any, connection: Any, tick: float) -> None:
        super().__init__(queues, connection=connection)  # interval stays 1 (whole seconds: the lock TTL)
        self._connection = connection
        self.tick = tick
        self._halt = threading.Event()

    def start(self) -> threading.Thread:
        self._halt = threading.Event()
        t = threading.Thread(target=self._loop, name="rq-scheduler", daemon=True)
        self._process: Any = t
        t.start()
        return t

    def _loop(self) -> None:
        me: Any = self  # RQ's scheduler methods are untyped
        me.register_birth()
        while not self._halt.is_set():
            try:
                if me.should_reacquire_locks:
                    me.acquire_locks()
                me.heartbeat()
                me.enqueue_scheduled_jobs()
            except Exception:
                log.exception("taskgate: in-process RQ scheduler tick failed")
            self._halt.wait(self.tick)
        me.stop()

    def halt(self, timeout: float = 5.0) -> None:
        self._halt.set()
        t = self._process
        if isinstance(t, threading.Thread) and t is not threading.current_thread():
            t.join(timeout)


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
        s: Any = _ThreadScheduler(self.queues, self.connection, self.scheduler_interval)
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
        if isinstance(self.scheduler, _ThreadScheduler):
            self.scheduler.halt()
            return
        base: Any = super()
        base.stop_scheduler()
