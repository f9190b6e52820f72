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

How it works:

- The decorator only tags the function (its options are validated there, with the same meanings as the
  Celery task options: ``throttle``, ``key``, ``cost``, ``tokens``, ``max_deferrals``, ``on_exhausted``,
  ``book``, ``fair_key``: the job's tenant in the weighted fair share of a policy that parks).
  :func:`options` puts per-job overrides in ``job.meta["taskgate"]``; there they are *values* for that one
  job (``key="acme"`` is the key itself, not a parameter name).
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
- A policy that parks (``deferral.park``, :mod:`taskgate.integrations.waiting`) keeps a denied job in the
  engine's waiting room instead of RQ's scheduled registry, and the worker's promoter puts it back at the
  front of its queue once admitted (:mod:`.room`).
- The provider's 429: a job whose body reported a 429 (``taskgate.current().report(...)``) or raised an SDK
  rate-limit error is deferred until the fleet-wide hold ends (through the scheduler, or parked again in
  the waiting room), not failed: no RQ retry or failure callback, no ``max_deferrals`` used; past the
  policy's ``provider.maxDeferrals`` it fails with :class:`~taskgate.ThrottledError` naming them.
- A deferred job only comes back through RQ's scheduler: the worker refuses to start without
  ``--with-scheduler`` unless another scheduler holds the scheduler lock of each of its queues.


Costs and limits: the rate axis is paid when a slot is taken or booked. A concurrency-denied job comes
back at the first scheduler tick after its estimated wait: with short jobs, a slot can stay idle for up to
~1 s. When the throttle never binds, a job costs one ``check`` (rate only) or one ``admit`` plus one
``release`` round trip. Deferred jobs count towards ``rq worker --max-jobs``; ``--burst`` workers exit while
deferred jobs wait in the scheduled registry. :class:`SpawnWorker` is not supported (the admission travels
in the forked memory); a ``grpc://`` store with the forking :class:`Worker` is untested. What to expect in
timing and throughput, measured with ``bench/rq.py``: ``bench/RESULTS.md``.

Single process (tests, notebooks): a :class:`SimpleWorker` on the embedded ``memory://`` store, RQ on
fakeredis, run in a thread: the scheduler then runs as a thread of the worker (RQ's own forks a process,
which cannot share fakeredis), signal handlers are skipped off the main thread and job timeouts use
``TimerDeathPenalty``.

Modules: :mod:`.jobs` (declaring throttled jobs), :mod:`.worker` (the decision before the horse, deferral
through RQ's scheduler), :mod:`.room` (jobs in the waiting room: parking, the promoter's hand-back),
:mod:`.horse` (the job holding its admission), :mod:`.scheduler` (RQ's scheduler as a thread, for
:class:`SimpleWorker`).
"""

from __future__ import annotations

from taskgate.integrations.rq.horse import Job
from taskgate.integrations.rq.jobs import ATTR, META, META_STATE, options, options_of, throttled
from taskgate.integrations.rq.worker import SimpleWorker, Worker, configure

__all__ = [
    "ATTR",
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
