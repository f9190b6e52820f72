"""RQ jobs in the engine's waiting room (policies that park, :mod:`taskgate.integrations.waiting`).

A job whose policy parks is decided in the worker, before its horse, by :meth:`Gate.enter_room`:

- admitted: it runs as any admitted job; a concurrency slot it frees is handed on at once (the worker's
  :class:`~taskgate.integrations.waiting.Promoter` promotes the next waiter as soon as the lease is released);
- parked: it is taken out of RQ's intermediate queue (no failure, no retry used) and its status becomes
  ``scheduled`` (it waits to be put back on its queue, as a deferred job does; it is in no RQ registry);
  the job itself stays in RQ's hash, the room holds its queue name and id (:func:`payload`);
- a duplicate message (the job waits or was promoted, or its promoted run was claimed): dropped unrun.

The promoter of any worker puts a promoted job back at the front of its queue (status ``queued``) with
``job.meta["taskgate_state"]["promoted"]`` naming the policy, so the worker that takes it claims the grant
instead of paying again; the claim succeeds once per promotion. The room knows an attempt by
:func:`room_id`: the job id, and for RQ's own retries their count (a retry is a new attempt, not a
duplicate).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import rq.job
from rq.exceptions import NoSuchJobError
from rq.job import JobStatus

from taskgate.backends.waiting import Promoted, WaitingRoom
from taskgate.integrations._gate import AdmissionGroup, DeferralState
from taskgate.integrations.rq.jobs import META_STATE

__all__ = ["payload", "quiet", "room_id", "send_promoted"]

log = logging.getLogger("taskgate")


def room_id(job: rq.job.Job) -> str:
    """The id of this attempt of ``job`` in the waiting room: its id, and where RQ retries it, how many tries
    are left (a failure retried by ``Retry(max=...)``) and how many it returned ``Retry`` (RQ job ids hold
    no ``.``)."""
    left, n = job.retries_left, job.number_of_retries or 0
    return str(job.id) if left is None and not n else f"{job.id}.r{left}.{n}"


def payload(job: rq.job.Job, queue_name: str) -> bytes:
    """What the promoter needs to put the job back: its queue and id (the job stays in RQ's hash)."""
    return json.dumps({"rq": 1, "queue": queue_name, "job": str(job.id)}).encode()


def quiet(group: AdmissionGroup) -> None:
    """Stop the worker's own heartbeat of leases admitted through the room: the horse keeps them alive (a
    SIGKILLed horse's lease must expire by its TTL, as a directly admitted one's does)."""
    for a in group.admissions:
        pump = getattr(a, "_pump", None)
        if pump is not None:
            pump.unregister(a)
            a._pump = None


def send_promoted(
    connection: Any,
    job_class: type[rq.job.Job],
    queue_class: Any,
    serializer: Any,
    room: WaitingRoom,
    policy: str,
    key: str,
    t: Promoted,
) -> None:
    """Put a promoted job back at the front of its queue, marked with the policy whose grant it carries.
    A job whose hash is gone (deleted, or its ``ttl`` ran out while it waited) is dropped, and its grant
    claimed and given back so the slot is not held for nobody."""
    d = json.loads(t.payload)
    if not isinstance(d, dict) or d.get("rq") != 1:
        raise ValueError(
            f"waiting room of policy {policy!r}: task {t.task_id} was not parked by an RQ worker"
        )
    try:
        job = job_class.fetch(str(d["job"]), connection=connection, serializer=serializer)
    except NoSuchJobError:
        log.warning("taskgate: promoted job %s is gone from RQ (deleted or expired): dropped", d["job"])
        c = room.claim(policy, key, t.task_id)
        if c.admission is not None:
            c.admission.release()
        return
    state = DeferralState.from_dict(job.meta.get(META_STATE))
    state.deferrals += 1  # each stay in a room counts as one deferral (max_deferrals)
    state.promoted = policy
    job.meta[META_STATE] = state.as_dict()
    queue = queue_class(str(d["queue"]), connection=connection, job_class=job_class, serializer=serializer)
    with connection.pipeline() as p:
        p.hset(job.key, "meta", job.serializer.dumps(job.meta))
        job.set_status(JobStatus.QUEUED, pipeline=p)
        p.sadd(queue.redis_queues_keys, queue.key)
        queue.push_job_id(job.id, pipeline=p, at_front=True)
        p.execute()
