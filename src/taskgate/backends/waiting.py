"""The waiting room: throttled work waits in the engine, in order, and leaves it admitted.

One room per (policy, key), in the hash slot of the decisions it waits for (``engine/lua/room.lua`` has the
layout). The life of a task that may not run yet:

1. ``enter`` -- one script: admitted if nobody waits before it and the policy admits it now; otherwise parked
   (its payload, cost and tokens stored), unless the wait is short enough to wait out in place. Parking is
   idempotent by task id: a second message for a task that waits, was promoted or already ran is recognised.
2. ``promote`` -- one script, run by any worker's promoter when the room is due: the head is admitted by the
   very admit of ``op_admit.lua`` (rate slot consumed, lease taken, tokens reserved) and moved to the
   hand-off set with its grant, in the room's order, while the policy admits. The order is arrival (FIFO),
   or, across tasks declared with a fair key, weighted fair queueing (start-time fair queueing in
   ``room.lua``: each waiting fair key gets its weight's share of the slots; one alone gets them all).
   The promoter sends the payload back to the queue; a hand-off nobody claimed by its deadline (the
   promoter died) is handed out again with the same grant.
3. ``claim`` -- the worker that receives a promoted task takes its grant (exactly one claim succeeds) and
   runs it holding the grant's lease and reservation: it does not pay again.

Which rooms are due is kept in an index (sorted set room -> due time, :func:`~taskgate.engine.keys.
rooms_index`), a hint in its own slot: the rooms are the truth. ``due_rooms`` leases due rooms to one
promoter at a time; ``reschedule`` puts a room back at its next due time, or removes it once empty (and
re-checks, so a task parked meanwhile is never forgotten).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from taskgate.backends._sync.admission import Admission
from taskgate.backends.fairness import Weights, check_weight
from taskgate.backends.redis import RedisBackend
from taskgate.engine import script
from taskgate.engine.keys import ROOM_SEP, keyset, rooms_index
from taskgate.engine.plan import AxesPlanner, Plan, decode_decision
from taskgate.engine.plan import text as _s
from taskgate.policy import Policy
from taskgate.types import AdmitReply, Decision, LeaseRef

__all__ = ["Claim", "Entered", "Grant", "Promoted", "WaitingRoom"]

HANDOFF_MS = 30_000  # a promoted task not claimed by then is handed out again (same grant)
ROOM_TTL_MS = 7 * 86_400_000  # a room untouched this long expires (nothing waits a week)
ROOM_LEASE_MS = 5_000  # a promoter owns a due room this long (then another may take it)
WAIT_BUCKETS_S = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)  # as room.lua's, in seconds
LEAD_MS = 250  # a plain gcra room is promoted this far ahead of its slots (the worker waits out the rest)

EnterStatus = Literal["admitted", "handed", "denied", "parked", "waiting", "done"]
_ENTER = {1: "admitted", 3: "handed", 0: "denied", 2: "parked", -1: "waiting", -2: "done"}


@dataclass(frozen=True, slots=True)
class Grant:
    """What a promotion granted: a lease (concurrency) and a reservation (escrowed tokens), if any."""

    lease: str
    lease_expires_at: int
    reservation_id: str
    reserved_tokens: int
    valid_at: int  # epoch-ms from which it may start (a rate slot booked ahead by the promoter)

    @classmethod
    def parse(cls, raw: object) -> Grant:
        lease, exp, rid, reserved, valid_at = _s(raw).rsplit("|", 4)
        return cls(lease, int(exp or 0), rid, int(reserved or 0), int(valid_at or 0))

    def reply(self, policy: str, key: str) -> AdmitReply:
        lease = LeaseRef.make(policy, key, self.lease) if self.lease else None
        d = Decision(True, 0, 0, self.lease_expires_at, 0)
        axis = "concurrency" if lease else ("cost" if self.reservation_id else "rate")
        return AdmitReply(d, axis, lease, self.lease_expires_at, self.reservation_id, self.reserved_tokens)


@dataclass(frozen=True, slots=True)
class Entered:
    """The outcome of :meth:`WaitingRoom.enter`: ``admitted`` (``admission`` holds it), ``handed`` (admitted
    and handed off: whoever receives the task claims the grant), ``denied`` (a short
    wait: ``retry_after_ms``), ``parked`` (``depth`` waiting), ``waiting`` (already parked or promoted:
    a duplicate message) or ``done`` (already ran: a duplicate)."""

    status: EnterStatus
    depth: int
    retry_after_ms: int
    admission: Admission | None
    binding_axis: str


@dataclass(frozen=True, slots=True)
class Promoted:
    task_id: str
    grant: Grant
    payload: bytes


@dataclass(frozen=True, slots=True)
class Claim:
    """``claimed`` (``admission`` holds the grant), ``expired`` (its lease ran out on the way: admit
    again), ``duplicate`` (claimed before: do not run) or ``unknown`` (not promoted, or purged)."""

    status: Literal["claimed", "expired", "duplicate", "unknown"]
    admission: Admission | None
    wait_ms: int = 0  # a grant booked ahead: start no earlier than this much later


def room_name(policy: str, key: str) -> str:
    return f"{policy}{ROOM_SEP}{key}"


def split_room(name: str | bytes) -> tuple[str, str]:
    policy, _, key = _s(name).partition(ROOM_SEP)
    return policy, key


class WaitingRoom:
    """The waiting rooms of one direct door (``RedisBackend``, or ``memory://``). Sync; thread-safe as the
    backend is. ``planner`` marshals the admit that enter and promote run (default: one over the door's
    policies and key prefix)."""

    def __init__(
        self,
        backend: RedisBackend,
        *,
        handoff_ms: int = HANDOFF_MS,
        room_ttl_ms: int = ROOM_TTL_MS,
        lead_ms: int = LEAD_MS,
        planner: AxesPlanner | None = None,
    ) -> None:
        self.backend = backend
        self.handoff_ms = handoff_ms
        self.lead_ms = lead_ms
        self.room_ttl_ms = room_ttl_ms
        self.index = rooms_index(backend.prefix)
        self._admit = planner if planner is not None else AxesPlanner(backend.policies, backend.prefix)
        self.weights = Weights(backend)  # fairness weights (store, then policy file), cached <= 1 s

    def _policy(self, name: str) -> Policy:
        p = self.backend.policy(name)
        if ROOM_SEP in p.name:
            raise ValueError(f"policy name {p.name!r} holds a \\x1f: it cannot have a waiting room")
        return p

    def _strategy(self, p: Policy) -> str | None:
        return p.rate.strategy if p.rate else None

    def _adm(self, p: Policy, key: str, reply: AdmitReply, tokens: int, now: int | None) -> Admission:
        adm = Admission(self.backend, p.name, key, reply, tokens, p.accounting, now)
        if p.concurrency is not None:
            adm.start_heartbeat(self.backend._heartbeat_pump())
        return adm

    # -- the three steps ----------------------------------------------------------------------------------

    def enter(
        self,
        policy: str,
        key: str,
        task_id: str,
        payload: bytes,
        cost: int = 1,
        tokens: int = 0,
        *,
        park_over_ms: int = -1,
        dedupe: bool = True,
        hand_off: bool = False,
        fair_key: str | None = None,
        weight: float | None = None,
        now: int | None = None,
    ) -> Entered:
        """Admit ``task_id`` now, or park it (``payload`` is what sends it again). A denial whose wait is at
        most ``park_over_ms`` is returned instead of parked (-1: always park). ``hand_off=True`` (a task
        not sent yet): an admitted task's grant is kept for its worker to claim, like a promoted one's.
        ``fair_key``: the room serves fair keys by weighted fair queueing (``lua/room.lua``), each at its
        ``weight`` (default: the one in force, :class:`~taskgate.backends.fairness.Weights`); without
        one the task waits in arrival order."""
        p = self._policy(policy)
        _check_id(task_id)
        fk = fair_key or ""
        if not isinstance(fk, str) or "\n" in fk or "\x1f" in fk or len(fk) > 200:
            raise ValueError(
                f"a fair key must be a str without newline or \\x1f of at most 200 chars, got {fair_key!r}"
            )
        w = self.weights.weight(p, fk) if weight is None else check_weight(weight, policy=p.name, fair_key=fk)
        escrow = self._admit.admit_units(p, key, cost, tokens)
        rid = uuid.uuid4().hex if escrow else ""
        hold = f"{task_id}.{uuid.uuid4().hex[:12]}" if p.concurrency else ""
        akeys, aargs = self._admit.admit_parts(p, key, cost, tokens, now, hold=hold, rid=rid)
        ks = keyset(self.backend.prefix, p, key)
        room = [*ks.room(), *ks.fair()]
        handoff = self.handoff_ms if hand_off else 0
        args: list[Any] = [task_id, payload, park_over_ms, self.room_ttl_ms, "1" if dedupe else "0", handoff]
        args += [fk, repr(w), *aargs]
        raw = self.backend._run(Plan(script("enter", self._strategy(p)), room + akeys, args, _raw))
        status: EnterStatus = _ENTER[int(raw[0])]  # type: ignore[assignment]
        depth = int(raw[1])
        reply = raw[2:]
        if status == "admitted":
            lease = LeaseRef.make(policy, key, _s(reply[8])) if _s(reply[8]) else None
            reserved = int(reply[10])
            ar = AdmitReply(
                decode_decision(reply), _s(reply[7]), lease, int(reply[9]), rid if reserved else "", reserved
            )
            return Entered(status, 0, 0, self._adm(p, key, ar, tokens, now), ar.binding_axis)
        retry = int(reply[4]) if len(reply) > 4 else 0
        axis = _s(reply[7]) if len(reply) > 7 else ""
        if status == "parked" and len(reply) > 4:  # it was the first: the room is due when its head is
            self._schedule_first(room_name(policy, key), retry, now)
        elif status == "handed":  # if its message is never claimed, the room sends it again then
            due = (now or int(time.time() * 1000)) + self.handoff_ms
            self.backend.client.zadd(self.index, {room_name(policy, key): due}, lt=True)
        return Entered(status, depth, retry, None, axis)

    def promote(self, policy: str, key: str, most: int = 64, *, now: int | None = None) -> PromoteResult:
        """Admit up to ``most`` tasks from the head of the room, in its order (and re-issue stale
        hand-offs)."""
        p = self._policy(policy)
        nr = most if p.accounting == "escrow" and p.budgets else 0
        plain_gcra = p.rate is not None and p.rate.strategy == "gcra" and not p.admits
        lead = self.lead_ms if plain_gcra else 0
        rids = [uuid.uuid4().hex for _ in range(nr)]
        ks = keyset(self.backend.prefix, p, key)
        akeys, aargs = self._admit.admit_parts(p, key, 1, 0, now, hold="-" if p.concurrency else "")
        r = ks.room()
        keys = [r[0], r[1], r[2], r[3], r[5], *ks.fair(), *(ks.reservation(x) for x in rids), *akeys]
        default, table = self.weights.table(p)
        pairs = [x for fk, w in table.items() if w != default for x in (fk, repr(w))]
        args: list[Any] = [aargs[0], most, self.handoff_ms, self.room_ttl_ms, lead, nr, repr(default)]
        args += [len(pairs) // 2, *rids, *pairs, *aargs]
        raw = self.backend._run(Plan(script("promote", self._strategy(p)), keys, args, _raw))
        n = int(raw[2])
        tasks = [
            Promoted(_s(raw[3 + 3 * i]), Grant.parse(raw[4 + 3 * i]), _b(raw[5 + 3 * i])) for i in range(n)
        ]
        return PromoteResult(int(raw[0]), int(raw[1]), tasks)

    def claim(self, policy: str, key: str, task_id: str, tokens: int = 0, *, now: int | None = None) -> Claim:
        """Take the grant of a promoted task (exactly one claim per promotion succeeds)."""
        p = self._policy(policy)
        ks = keyset(self.backend.prefix, p, key)
        keys = [*ks.room(), ks.leases]
        raw = self.backend._run(Plan(script("claim"), keys, [_now(now), task_id], _raw))
        status = int(raw[0])
        if status == 0:
            return Claim("duplicate", None)
        if status == -1:
            return Claim("unknown", None)
        grant = Grant.parse(raw[1])
        if status == 2:
            return Claim("expired", None)
        adm = self._adm(p, key, grant.reply(policy, key), tokens, now)
        return Claim("claimed", adm, max(0, grant.valid_at - int(raw[2])))

    # -- the index of due rooms ---------------------------------------------------------------------------

    def _schedule_first(self, room: str, retry_after_ms: int, now: int | None) -> None:
        due = (now or self.backend_time()) + max(0, retry_after_ms)
        self.backend.client.zadd(self.index, {room: due}, lt=True)

    def backend_time(self) -> int:
        sec, usec = self.backend.client.time()
        return int(sec) * 1000 + int(usec) // 1000

    def due_rooms(
        self, most: int = 16, lease_ms: int = ROOM_LEASE_MS, *, now: int | None = None
    ) -> tuple[int, int, list[tuple[str, str]]]:
        """(now, the earliest due time of any room (0: none), the due rooms now leased to the caller)."""
        keys = [self.index]
        raw = self.backend._run(Plan(script("rooms_due"), keys, [_now(now), most, lease_ms], _raw))
        return int(raw[0]), int(raw[1]), [split_room(x) for x in raw[2:]]

    def reschedule(self, policy: str, key: str, result: PromoteResult) -> None:
        """Put the room back in the index at its next due time, or take it out once empty."""
        name = room_name(policy, key)
        c = self.backend.client
        if result.next_due > 0:  # work waits, or a hand-off may have to go out again
            c.zadd(self.index, {name: result.next_due})
            return
        c.zrem(self.index, name)
        if self.depth(policy, key) > 0:  # parked between the promote and the removal: keep it due
            c.zadd(self.index, {name: self.backend_time()}, lt=True)

    def kick(self, policy: str, key: str) -> None:
        """Make a room due now (a freed concurrency slot), if it has work."""
        self.backend.client.zadd(self.index, {room_name(policy, key): 0}, xx=True)

    # -- operators --------------------------------------------------------------------------------------

    def depth(self, policy: str, key: str) -> int:
        q = keyset(self.backend.prefix, self._policy(policy), key).room()[0]
        return int(self.backend.client.zcard(q))

    def rooms(self) -> list[tuple[str, str, int]]:
        """Every room in the index: (policy, key, due epoch-ms)."""
        out: Any = self.backend.client.zrange(self.index, 0, -1, withscores=True)
        return [(*split_room(name), int(score)) for name, score in out]

    def stats(self, policy: str, key: str) -> RoomStats:
        return self.overview([(policy, key)])[0]

    def overview(self, rooms: Sequence[tuple[str, str]] | None = None) -> list[RoomStats]:
        """The state of ``rooms`` (default: every room in the index), read in one pipeline."""
        if rooms is None:
            rooms = [(p, k) for p, k, _ in self.rooms()]
        c = self.backend.client
        pipe = c.pipeline(transaction=False)
        head = script("room_head")
        for policy, key in rooms:
            q, d, h, _, _, m = keyset(self.backend.prefix, self._policy(policy), key).room()
            pipe.zcard(q)
            pipe.zcard(h)
            pipe.hgetall(m)
            pipe.execute_command("EVAL", head.source, 2, q, d)  # type: ignore[no-untyped-call]  # (no .eval on a cluster pipeline)
        raw = pipe.execute()
        out = []
        for i, (policy, key) in enumerate(rooms):
            depth, handoff, meta, head_at = raw[4 * i : 4 * i + 4]
            counts = {_s(k): int(v) for k, v in (meta or {}).items()}
            buckets = [counts.get(f"h{j + 1}", 0) for j in range(len(WAIT_BUCKETS_S) + 1)]
            out.append(
                RoomStats(
                    policy, key, int(depth), int(handoff), int(head_at or 0), counts.get("np", 0),
                    counts.get("npr", 0), counts.get("ncl", 0), buckets, counts.get("hs", 0),
                )
            )  # fmt: skip
        return out

    def list(self, policy: str, key: str, most: int = 100) -> list[str]:
        """The ids of the first ``most`` tasks waiting: the next of each fair key in the order they will be
        served, then the others by arrival (without fair keys: oldest first)."""
        q = keyset(self.backend.prefix, self._policy(policy), key).room()[0]
        return [_s(x) for x in self.backend.client.zrange(q, 0, most - 1)]

    def fair_keys(self, policy: str, key: str) -> dict[str, int]:
        """Tasks waiting per fair key in the room ("" for work without one); empty when nothing waits."""
        f = keyset(self.backend.prefix, self._policy(policy), key).fair()[1]
        raw: Any = self.backend.client.hgetall(f)
        return {_s(k)[2:]: int(v) for k, v in (raw or {}).items() if _s(k).startswith("n:") and int(v) > 0}

    def purge(self, policy: str, key: str) -> int:
        """Remove every task waiting in the room (promoted ones keep their grants). Returns how many."""
        ks = keyset(self.backend.prefix, self._policy(policy), key)
        r = ks.room()
        n = int(self.backend._run(Plan(script("room_purge"), [r[0], r[1], *ks.fair()], [], _raw)))
        self.backend.client.zrem(self.index, room_name(policy, key))
        return n


@dataclass(frozen=True, slots=True)
class PromoteResult:
    next_due: int  # when the head may be admitted, or an unclaimed hand-off re-sent (0: nothing to do)
    depth: int  # still waiting
    tasks: list[Promoted]


@dataclass(frozen=True, slots=True)
class RoomStats:
    policy: str
    key: str
    depth: int  # waiting
    handoff: int  # promoted, not yet claimed
    oldest_parked_at: int  # epoch-ms the head was parked (0: empty)
    parked: int  # totals since the room was made
    promoted: int
    claimed: int
    wait_buckets: list[int]  # claimed tasks per bucket of WAIT_BUCKETS_S (the last: longer)
    wait_sum_ms: int


def _raw(raw: Any) -> Any:
    return raw


def _b(v: object) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


def _now(now: int | None) -> int:
    return 0 if now is None else int(now)


def _check_id(task_id: str) -> None:
    if not isinstance(task_id, str) or not task_id or ":" in task_id or len(task_id) > 200:
        raise ValueError(f"task id must be a non-empty str without ':' of at most 200 chars, got {task_id!r}")
