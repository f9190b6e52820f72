"""RQ jobs in the engine's waiting room (policies that park, :mod:`taskgate.integrations.waiting`).

A job whose policy parks is decided in the worker, before its horse, by :meth:`Gate.enter_room`:

- admitted: it runs as any admitted job; a concurrency slot it frees is handed on at once (the worker's
  :class:`~taskgate.integrations.waiting.Promoter` promotes the next waiter as soon as the lease is released);
- parked: it is taken out of RQ's intermediate queue (no failure, no retry used) and its status becomes
  ``scheduled`` (it waits to be put back on its queue, as a deferred job does; it is in no RQ registry);
  the job itself stays in RQ's hash, the room holds its queue name and id (:func:`payload`);
- a duplicate message (the job waits or was promoted, or its promoted run was claimed): dropped unrun;
  but a job whose last run failed, requeued (``job.requeue()``), is a new attempt.

The promoter of any worker puts a promoted job back at the front of its queue (status ``queued``) with
``job.meta["taskgate_state"]["promoted"]`` naming the policy, so the worker that takes it claims the grant
instead of paying again; the claim succeeds once per promotion. The room knows an attempt by
:func:`room_id`: the job id, and for RQ's own retries their count (a retry is a new attempt, not a
duplicate).

Jobs declared with ``fair_key=`` (the decorator, or ``taskgate.rq.options(fair_key=...)`` per job) wait in
their room by fair key: the room serves fair keys by weighted fair queueing (``engine/lua/room.lua``), so
the promoter hands back each tenant's share of the slots, whatever order the jobs reached RQ's queue in.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import rq.job
from rq.job import JobStatus

from taskgate.backends.waiting import Promoted, WaitingRoom
from taskgate.integrations._gate import AdmissionGroup, DeferralState
from taskgate.integrations.rq.jobs import META_STATE
from taskgate.integrations.waiting import Promoter

__all__ = ["RqPromoter", "payload", "quiet", "room_id", "send_promoted"]

log = logging.getLogger("taskgate")
PUSH_AHEAD_MS = 20  # a promoted job is put back this long before its slot
SendAll = Callable[[str, str, Sequence[Promoted]], None]  # (policy, key, a batch promoted, oldest first)


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
        a.stop_heartbeat()


class RqPromoter(Promoter):
    """The worker's promoter. A promoted job goes to the *front* of its queue, so a job promoted later would
    be taken before one promoted earlier and still waiting there. A room of a plain rate is promoted ahead of
    its slots (``LEAD_MS``): each job is put back when its slot is at most ``PUSH_AHEAD_MS`` away (never
    later than the lead after its promotion, whatever the clocks say), those due together in one pipeline,
    the earliest slot at the very front. So the queue's front holds them in slot order, and a worker never
    waits for a late slot while an earlier one waits behind it."""

    def __init__(self, room: Callable[[], WaitingRoom], send_all: SendAll) -> None:
        super().__init__(room, self._one)
        self.send_all = send_all

    def _one(self, policy: str, key: str, t: Promoted) -> None:
        self.send_all(policy, key, [t])

    def hand_off(self, policy: str, key: str) -> int:
        room = self._room()
        res = room.promote(policy, key, self.batch)
        latest = time.time() * 1000 + room.lead_ms + PUSH_AHEAD_MS
        left = sorted(res.tasks, key=lambda t: t.grant.valid_at)
        while left:
            now = time.time() * 1000
            due = [t for t in left if min(t.grant.valid_at - PUSH_AHEAD_MS, latest) <= now]
            if not due and not self._stop.is_set():
                first = min(left[0].grant.valid_at - PUSH_AHEAD_MS, latest)
                self._stop.wait((first - now) / 1000.0)
                continue
            due = due or left
            left = left[len(due) :]
            try:
                self.send_all(policy, key, due)
            except Exception:  # they stay in the hand-off set: handed out again after their deadline
                log.exception(
                    "taskgate: sending %d promoted jobs of policy %r failed; re-sent later", len(due), policy
                )
        room.reschedule(policy, key, res)
        self.promoted += len(res.tasks)
        return len(res.tasks)


def send_promoted(
    connection: Any,
    job_class: type[rq.job.Job],
    queue_class: Any,
    serializer: Any,
    room: WaitingRoom,
    policy: str,
    key: str,
    tasks: Sequence[Promoted],
) -> None:
    """Put promoted jobs back at the front of their queues, oldest first, each marked with the policy whose
    grant it carries. A job whose hash is gone (deleted, or its ``ttl`` ran out while it waited) is
    dropped, and its grant claimed and given back so the slot is not held for nobody."""
    where = []
    for t in tasks:
        d = json.loads(t.payload)
        if not isinstance(d, dict) or d.get("rq") != 1:
            raise ValueError(f"waiting room of policy {policy!r}: {t.task_id} was not parked by an RQ worker")
        where.append((t, str(d["queue"]), str(d["job"])))
    found = job_class.fetch_many([j for _, _, j in where], connection=connection, serializer=serializer)
    with connection.pipeline() as p:
        for (t, qname, ident), job in reversed(list(zip(where, found, strict=True))):
            if job is None:
                log.warning("taskgate: promoted job %s is gone from RQ (deleted or expired): dropped", ident)
                c = room.claim(policy, key, t.task_id)
                if c.admission is not None:
                    c.admission.release()
                continue
            state = DeferralState.from_dict(job.meta.get(META_STATE))
            state.deferrals += 1  # each stay in a room counts as one deferral (max_deferrals)
            state.promoted = policy
            job.meta[META_STATE] = state.as_dict()
            queue = queue_class(qname, connection=connection, job_class=job_class, serializer=serializer)
            p.hset(job.key, "meta", job.serializer.dumps(job.meta))
            job.set_status(JobStatus.QUEUED, pipeline=p)
            p.sadd(queue.redis_queues_keys, queue.key)
            queue.push_job_id(job.id, pipeline=p, at_front=True)
        p.execute()
