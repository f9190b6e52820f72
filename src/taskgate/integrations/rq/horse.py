"""The horse side of an RQ job: :class:`Job` runs a throttled job holding what the worker admitted it
with (handed over on the job object, a :class:`_Verdict`; a forked horse gets it in its copy of the worker's
memory). It heartbeats the leases while the body runs and makes ``taskgate.current()`` return them. A forked
horse says on a shared page (``mmap``) that the body ended, and whether it raised; the worker then releases
the leases, so the horse of a short job never opens a connection to the store. Without a fork the job
releases them itself. A body that met the provider's 429 (reported with ``taskgate.current().report``, or
an SDK rate-limit error) raises :class:`~taskgate.integrations._gate.ProviderDeferred` out of
:meth:`Job.perform` (forked or not), and the worker defers the job instead of failing it
(:meth:`~taskgate.integrations.rq.worker._GatedWorker._finalize_failure`)."""

from __future__ import annotations

import dataclasses
import logging
import mmap
from typing import Any

import rq.job

from taskgate.admission import Admission, HeartbeatPump, held_here
from taskgate.errors import BackendUnavailableError
from taskgate.integrations._gate import AdmissionGroup, ProviderDeferred
from taskgate.integrations.rq.jobs import ATTR, META

__all__ = ["Job"]

log = logging.getLogger("taskgate")
_VERDICT = "_taskgate_verdict"  # attribute of the Job object handed from the worker to the horse
_RESTORED = "_taskgate_restored"  # attribute: the job's own enqueue_at_front is back, its hash to follow


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
        token = held_here.set(group)
        outcome = 2
        try:
            result = super().perform()
            outcome = 1
            return result
        except Exception as e:
            try:
                deferral = group._provider_deferral(e)  # a 429: raises past provider.maxDeferrals
            finally:
                if group.reported:
                    outcome = 1  # a 429 already shrank an adaptive limit in the report: not a second time
            if deferral is not None:
                raise ProviderDeferred(deferral) from e  # the worker defers the job (worker.py)
            raise
        finally:
            held_here.reset(token)
            verdict.ended[0] = outcome
            _hand_back(group)


def _hand_back(group: AdmissionGroup) -> None:
    """In a horse whose job ended: charge an unsettled estimate (debit accounting) as release would, and
    stop renewing the leases; the worker releases them when the horse exits."""
    for a in group.admissions:
        try:
            a.hand_over()
        except BackendUnavailableError as e:
            log.warning("taskgate: could not charge the unsettled estimate of %r: %s", a.policy, e)


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
