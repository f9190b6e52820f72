"""Weighted fair queueing across fair keys inside one waiting room (``engine/lua/room.lua``), on the embedded
store, the real Redis and a Redis Cluster, with an explicit ``now``: a late tenant is served at its share, not
after the flood; weights split the slots; a tenant alone gets them all; without fair keys the room is FIFO.
The weights: policy file, store (``set_weight``), validation."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import taskgate
from taskgate.backends.fairness import Weights, clear_weight, read_fair, set_weight, stored_weights
from taskgate.backends.waiting import WaitingRoom
from taskgate.engine.keys import keyset
from taskgate.errors import InvalidPolicyError, PolicyNotFoundError
from taskgate.integrations.options import parse_options
from taskgate.policy import parse_policy
from tests.conftest import REDIS_URL

NOW = 1_800_000_000_000
SLOT = 100  # gcra 10/s burst 1: one promotion per 100 ms
POLICIES = {
    "r": {"strategy": "gcra", "limit": 10, "period": "1s", "burst": 1, "deferral": {"park": "always"}},
    "w": {
        "strategy": "gcra", "limit": 10, "period": "1s", "burst": 1,
        "fairness": {"weights": {"acme": 3}, "defaultWeight": 1},
    },
    "c": {"concurrency": {"maxLimit": 1, "perKey": True, "leaseTtl": "10s"}},
}  # fmt: skip


@pytest.fixture
def room(connect: Callable[[Any], taskgate.RedisBackend]) -> WaitingRoom:
    r = WaitingRoom(connect(POLICIES), lead_ms=0)
    r.weights.ttl_s = 0.0  # read the stored weights on every enter
    return r


def flood(
    room: WaitingRoom, policy: str, fair_key: str | None, n: int, at: int | None, tag: str = ""
) -> None:
    for i in range(n):
        room.enter(policy, "k", f"{tag or fair_key}{i}", b"", fair_key=fair_key, now=at)


def serve(room: WaitingRoom, policy: str, slots: int, start: int) -> list[str]:
    """Promote one slot at a time from ``start``: the ids in the order the engine promoted them."""
    out: list[str] = []
    for i in range(slots):
        out += [t.task_id for t in room.promote(policy, "k", 16, now=start + i * SLOT).tasks]
    return out


def tenant(task_id: str) -> str:
    return task_id.rstrip("0123456789")


def test_a_late_tenant_is_served_at_its_share_not_after_the_flood(room: WaitingRoom) -> None:
    flood(room, "r", "a", 200, NOW)  # a0 admitted, a1..a199 wait
    first = serve(room, "r", 10, NOW + SLOT)
    assert first == [f"a{i}" for i in range(1, 11)]
    flood(room, "r", "b", 10, NOW + 11 * SLOT)  # B arrives behind 189 of A's tasks
    nxt = serve(room, "r", 20, NOW + 11 * SLOT)
    # equal weights: B's tasks alternate with A's (ties by arrival: A's waited longer) -- all 10 in 20 slots
    assert nxt[:4] == ["b0", "a11", "b1", "a12"]
    assert [x for x in nxt if tenant(x) == "b"] == [f"b{i}" for i in range(10)]  # FIFO within a fair key
    assert Counter(map(tenant, nxt)) == {"a": 10, "b": 10}
    # B gone: A alone gets every slot again (work-conserving)
    assert serve(room, "r", 10, NOW + 31 * SLOT) == [f"a{i}" for i in range(21, 31)]


def test_weights_split_the_slots(room: WaitingRoom) -> None:
    flood(room, "w", "acme", 300, NOW)  # weight 3 (policy file)
    flood(room, "w", "beta", 300, NOW)  # weight 1 (defaultWeight)
    got = Counter(map(tenant, serve(room, "w", 200, NOW + SLOT)))
    assert got["acme"] + got["beta"] == 200
    assert abs(got["acme"] - 150) <= 2  # 75 / 25


def test_stored_weights_override_the_policy_file(room: WaitingRoom) -> None:
    b = room.backend
    assert set_weight(b, "w", "beta", 3) == 3.0
    assert set_weight(b, "w", "acme", "1") == 1.0
    assert stored_weights(b, "w") == {"beta": 3.0, "acme": 1.0}
    flood(room, "w", "acme", 200, NOW)
    flood(room, "w", "beta", 200, NOW)
    got = Counter(map(tenant, serve(room, "w", 100, NOW + SLOT)))
    assert abs(got["beta"] - 75) <= 2
    assert clear_weight(b, "w", "beta") is True
    assert clear_weight(b, "w", "beta") is False
    assert stored_weights(b, "w") == {"acme": 1.0}


def test_a_changed_weight_applies_to_work_already_waiting(room: WaitingRoom) -> None:
    flood(room, "w", "acme", 200, NOW)  # 3
    flood(room, "w", "beta", 200, NOW)  # 1
    got = Counter(map(tenant, serve(room, "w", 40, NOW + SLOT)))
    assert abs(got["acme"] - 30) <= 1
    set_weight(room.backend, "w", "beta", 3)  # beta's queued tasks: from its next head on
    got = Counter(map(tenant, serve(room, "w", 40, NOW + 41 * SLOT)))
    assert abs(got["acme"] - 20) <= 2


def test_the_fair_queues_expire_and_purge_with_the_room(room: WaitingRoom) -> None:
    flood(room, "w", "acme", 5, NOW)
    flood(room, "w", "beta", 5, NOW)
    c = room.backend.client
    ks = keyset(room.backend.prefix, room.backend.policy("w"), "k")
    assert all(0 < c.pttl(k) <= room.room_ttl_ms for k in [*ks.room()[:2], *ks.fair()[:2]])
    assert room.purge("w", "k") == 9
    assert not any(c.exists(k) for k in [ks.room()[0], *ks.fair()[:2]])
    flood(room, "w", "beta", 3, NOW + 10, tag="b")  # a fresh start: FIFO for one fair key
    assert serve(room, "w", 3, NOW + 10 * SLOT) == ["b0", "b1", "b2"]


def test_a_tenant_alone_gets_everything(room: WaitingRoom) -> None:
    flood(room, "w", "beta", 30, NOW)  # weight 1 of (3 + 1): alone, it still gets every slot
    assert serve(room, "w", 20, NOW + SLOT) == [f"beta{i}" for i in range(1, 21)]


def test_without_a_fair_key_the_room_is_fifo(room: WaitingRoom) -> None:
    order = [f"t{i}" for i in range(30)]
    for i, t in enumerate(order):  # arrivals spread over time and promotions in between
        room.enter("r", "k", t, b"", now=NOW + i * 37)
    assert room.list("r", "k") == order[1:]
    assert serve(room, "r", 40, NOW + SLOT) == order[1:]


def test_fair_keys_under_a_concurrency_limit(room: WaitingRoom) -> None:
    """A freed slot goes to the head in fair order too (event, not time)."""
    first = room.enter("c", "k", "a0", b"", fair_key="a", now=NOW)
    assert first.admission is not None
    for i in range(1, 5):  # a0 runs; a1..a4 wait
        room.enter("c", "k", f"a{i}", b"", fair_key="a", now=NOW)
    flood(room, "c", "b", 2, NOW + 10)
    got = []
    adm = first.admission
    for i in range(6):
        adm.release()
        (t,) = room.promote("c", "k", 4, now=NOW + 20 + i).tasks
        got.append(t.task_id)
        c = room.claim("c", "k", t.task_id, now=NOW + 20 + i)
        assert c.admission is not None
        adm = c.admission
    assert got == ["a1", "b0", "a2", "b1", "a3", "a4"]


def test_an_empty_room_owes_nothing(room: WaitingRoom) -> None:
    flood(room, "r", "a", 20, NOW)
    assert len(serve(room, "r", 19, NOW + SLOT)) == 19  # A served a lot, alone; the room is empty again
    assert room.depth("r", "k") == 0
    at = NOW + 100 * SLOT
    room.enter("r", "k", "x", b"", fair_key="x", now=at)  # admitted (nobody waits)
    flood(room, "r", "b", 3, at, tag="b")
    flood(room, "r", "a", 3, at, tag="A")  # A's past counts for nothing now: it alternates with B
    assert serve(room, "r", 6, at + SLOT) == ["b0", "A0", "b1", "A1", "b2", "A2"]


def test_weights_are_validated(room: WaitingRoom) -> None:
    b = room.backend
    for bad in (0, -1, "x", float("nan"), float("inf"), True, None):
        with pytest.raises(ValueError, match="fairness weight of fair key 'acme'"):
            set_weight(b, "w", "acme", bad)  # type: ignore[arg-type]
    with pytest.raises(PolicyNotFoundError):
        set_weight(b, "nope", "acme", 2)
    with pytest.raises(ValueError, match="fair key"):
        set_weight(b, "w", "", 2)
    with pytest.raises(ValueError, match="fairness weight"):
        room.enter("w", "k", "t", b"", fair_key="acme", weight=0, now=NOW)


def test_weights_are_cached_for_at_most_the_ttl(connect: Callable[[Any], taskgate.RedisBackend]) -> None:
    b = connect(POLICIES)
    w = Weights(b, ttl_s=3600)
    p = b.policy("w")
    assert w.weight(p, "acme") == 3.0  # policy file
    assert w.weight(p, "zed") == 1.0  # defaultWeight
    assert w.weight(p, "") == 1.0  # no fair key
    set_weight(b, "w", "acme", 5)
    assert w.weight(p, "acme") == 3.0  # cached
    w.ttl_s = 0.0
    w._cache.clear()
    assert w.weight(p, "acme") == 5.0


@pytest.mark.parametrize(
    ("fairness", "field"),
    [
        ({"weights": {"acme": 0}}, "fairness.weights.acme"),
        ({"weights": {"acme": "three"}}, "fairness.weights.acme"),
        ({"defaultWeight": -2}, "fairness.defaultWeight"),
        ({"weights": ["acme"]}, "fairness.weights"),
        ({"weigths": {}}, "fairness.weigths"),
    ],
)
def test_the_policy_file_rejects_bad_weights(fairness: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidPolicyError, match=f"policy 'p'.*{field}") as e:
        parse_policy("p", {"strategy": "gcra", "limit": 1, "period": "1s", "fairness": fairness})
    assert e.value.field == field


# -------------------------------------------------------------------- seeing it: starts per fair key


def test_top_and_the_exporter_show_each_fair_keys_share(room: WaitingRoom) -> None:
    """The rooms' scripts count the grants per fair key; top and the exporter show the top N fair keys' share
    of the starts against their weight's share, and what waits, the rest summed as ``other``."""
    from prometheus_client.core import Metric
    from rich.console import Console

    from taskgate import top
    from taskgate.backends.fairness import read_fair
    from taskgate.stats import Snapshot
    from taskgate.waiting_view import families, read_waiting

    flood(room, "w", "acme", 60, NOW)  # acme0 admitted at once; weight 3
    flood(room, "w", "beta", 60, NOW)  # weight 1
    for i in range(6):
        room.enter("w", "k", f"solo{i}", b"", fair_key=f"t{i}", now=NOW)  # six tenants of one task each
    got = Counter(map(tenant, serve(room, "w", 46, NOW + SLOT)))
    (f,) = read_fair(room.backend, [("w", "k")])
    assert f.total() == {"acme": 1 + got["acme"], "beta": got["beta"], **{f"t{i}": 1 for i in range(6)}}
    assert f.waiting == {"acme": 60 - 1 - got["acme"], "beta": 60 - got["beta"]}
    now = NOW + 50 * SLOT
    (v,) = [x for x in read_waiting(room.backend, now, top=3) if x.policy == "w"]  # (on a cluster too)
    assert [x.fair_key for x in v.fair] == ["acme", "beta", "t0", "other"]
    acme, beta, t0, other = v.fair
    assert (acme.starts, beta.starts, t0.starts, other.starts) == (1 + got["acme"], got["beta"], 1, 5)
    assert (acme.weight, beta.weight, other.weight) == (3, 1, 0)
    assert acme.weight_share == pytest.approx(3 / 10)  # acme, beta and six tenants that started: 3+1+6
    assert other.weight_share == pytest.approx(5 / 10)
    assert sum(x.start_share for x in v.fair) == pytest.approx(1.0)
    assert acme.start_share == pytest.approx(acme.starts / 47)
    assert (acme.waiting, beta.waiting, other.waiting) == (f.waiting["acme"], f.waiting["beta"], 0)
    # backlogged acme and beta split what the singles left 3:1
    assert abs(got["acme"] - 3 * got["beta"]) <= 4
    # the JSON of top --once --json round-trips; the view renders
    snap = Snapshot(now, 60, 5, room.backend.prefix, (), (v,))
    assert Snapshot.from_json(snap.to_json()) == snap
    con = Console(width=200, record=True)
    con.print(top.render(snap, "test"))
    text = con.export_text()
    assert "fair share: w" in text
    assert "weight share" in text
    # the metrics: one series per top fair key and "other", per family
    fams: dict[str, Metric] = {m.name: m for m in families((v,), now)}
    shares = {x.labels["fair_key"]: x.value for x in fams["taskgate_fair_start_share"].samples}
    assert set(shares) == {"acme", "beta", "t0", "other"}
    waits = {x.labels["fair_key"]: x.value for x in fams["taskgate_fair_waiting"].samples}
    assert waits["acme"] == acme.waiting
    assert {x.labels["policy"] for x in fams["taskgate_fair_weight_share"].samples} == {"w"}


def test_the_starts_per_fair_key_are_bounded(connect: Callable[[Any], taskgate.RedisBackend]) -> None:
    """At most 1,000 fair keys per window are counted by name (the rest together); two windows of a minute
    are kept, and they expire two minutes after the last start."""
    from taskgate.backends.fairness import OTHER, read_fair

    b = connect({"big": {"strategy": "gcra", "limit": 100000, "period": "1s", "burst": 100000}})
    room = WaitingRoom(b, lead_ms=0)
    for i in range(1010):  # each admitted at once (nobody waits): a start of its fair key
        assert room.enter("big", "k", f"x{i}", b"", fair_key=f"f{i}", now=NOW).status == "admitted"
    (f,) = read_fair(b, [("big", "k")])
    assert len(f.current) == 1001
    assert f.current[OTHER] == 10
    assert sum(f.current.values()) == 1010
    ks = keyset(b.prefix, b.policy("big"), "k")
    assert 0 < b.client.pttl(ks.fair()[2]) <= 120_000
    later = NOW - NOW % 60_000 + 60_000  # the next window
    room.enter("big", "k", "y", b"", fair_key="f1", now=later)
    (f,) = read_fair(b, [("big", "k")])
    assert (f.window_start, f.current, len(f.previous)) == (later, {"f1": 1}, 1001)
    assert f.recent(later + 30_000)["f2"] == pytest.approx(0.5)  # half of the window before is in the minute
    assert f.recent(later + 30_000)["f1"] == pytest.approx(1.5)
    assert f.recent(later + 150_000) == {}
    room.enter("big", "k", "z", b"", fair_key="f3", now=later + 180_000)  # two windows on: the old ones go
    (f,) = read_fair(b, [("big", "k")])
    assert (f.current, f.previous) == ({"f3": 1}, {})


# ------------------------------------------------------------------------------- the task option fair_key


def _gate_room() -> tuple[Any, WaitingRoom]:
    from taskgate.integrations._gate import Gate

    b = taskgate.connect(f"memory://{uuid.uuid4().hex}", POLICIES)
    assert isinstance(b, taskgate.RedisBackend)
    return Gate(lambda: b, short_wait_ms=0), WaitingRoom(b, lead_ms=0)


def test_fair_key_option_by_parameter_name_or_callable() -> None:
    from taskgate.integrations._gate import DeferralState, Parked

    def job(tenant: str, n: int) -> None: ...

    gate, room = _gate_room()
    by_name = parse_options("t.job", "r", fair_key="tenant", func=job)
    by_call = parse_options("t.job", "r", fair_key=lambda tenant: tenant.upper(), func=job)
    assert by_name.fair_key_for(("acme", 1), {}) == "acme"
    assert by_call.fair_key_for((), {"tenant": "acme", "n": 1}) == "ACME"
    assert parse_options("t.job", "r", func=job).fair_key_for(("acme", 1), {}) is None
    for i in range(3):  # a0 admitted, a1, a2 wait
        gate.enter_room(room, by_name, ("a", i), {}, DeferralState(), f"a{i}", b"")
    out = gate.enter_room(room, by_name, ("b", 0), {}, DeferralState(), "b0", b"")
    assert isinstance(out, Parked)
    # b0 (fair key "b") is to be served before a2 (same start tag as a1, which arrived first): the option
    # reached the engine
    assert room.list("r", "*") == ["a1", "b0", "a2"]


def test_a_fair_key_that_raises_fails_the_task_at_admission_naming_it() -> None:
    from taskgate.integrations._gate import DeferralState

    def job(tenant: str) -> None: ...

    def tenant_of(tenant: str) -> str:
        raise KeyError(tenant)

    gate, room = _gate_room()
    opts = parse_options("t.job", "r", fair_key=tenant_of, func=job)
    with pytest.raises(ValueError, match=r"task 't.job': fair_key= callable 'tenant_of' raised KeyError"):
        gate.enter_room(room, opts, ("acme",), {}, DeferralState(), "x1", b"")
    with pytest.raises(ValueError, match=r"task 't.job': fair_key= gave None; a fair key must be"):
        parse_options("t.job", "r", fair_key=lambda tenant: None, func=job).fair_key_for(("a",), {})
    assert room.depth("r", "*") == 0  # nothing parked, nothing admitted


# ------------------------------------------------------------------------------------ RQ: the same option

RQ_POLICIES: dict[str, Any] = {  # one slot an hour: the first job runs, the others wait in the room
    "shared": {
        "strategy": "gcra", "limit": 1, "period": "1h", "burst": 1, "deferral": {"park": "always"},
        "fairness": {"weights": {"acme": 3}},
    },
}  # fmt: skip


class RqEnv:
    """A ``taskgate.rq.SimpleWorker`` in burst mode on fakeredis and the embedded store."""

    def __init__(self) -> None:
        import fakeredis
        from rq import Queue

        from tests.apps import rq_room_jobs as jobs

        self.conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        self.prefix = jobs.PREFIX = f"t{uuid.uuid4().hex[:8]}"
        self.backend = taskgate.connect(f"memory://{uuid.uuid4().hex}", RQ_POLICIES, prefix=self.prefix)
        self.q = Queue("q", connection=self.conn)
        self.w = jobs.RoomSimpleWorker(
            [self.q], connection=self.conn, backend=self.backend, settings={"short_wait_ms": 0}
        )
        self.room = self.w.taskgate.room()

    def work(self) -> None:
        self.w.work(burst=True, with_scheduler=True)

    def starts(self) -> list[str]:
        raw: Any = self.conn.lrange(f"{self.prefix}:start", 0, -1)
        return [x.decode().split("|")[0] for x in raw]


@pytest.fixture
def rq_env(monkeypatch: pytest.MonkeyPatch) -> Any:
    from taskgate.integrations.rq import worker as tgworker

    monkeypatch.setattr(tgworker, "_defaults", {"backend": None, "policies": None, "settings": {}})
    e = RqEnv()
    yield e
    e.backend.close()


def test_rq_fair_key_option_is_declared_like_key() -> None:
    import taskgate.rq
    from taskgate.integrations.rq.jobs import ATTR

    @taskgate.rq.throttled("shared", fair_key="tenant")
    def job(tenant: str, n: int) -> None: ...

    @taskgate.rq.throttled("shared", fair_key=lambda tenant, n: f"{tenant}-{n % 2}")
    def job2(tenant: str, n: int) -> None: ...

    assert getattr(job, ATTR).fair_key_for(("acme", 1), {}) == "acme"
    assert getattr(job2, ATTR).fair_key_for(("acme", 3), {}) == "acme-1"
    assert taskgate.rq.options(fair_key="acme") == {"taskgate": {"fair_key": "acme"}}
    assert taskgate.rq.options(fair_key=7) == {"taskgate": {"fair_key": 7}}
    with pytest.raises(TypeError, match=r"fair_key='nope': expected one of the task's parameters"):
        taskgate.rq.throttled("shared", fair_key="nope")(job)
    with pytest.raises(TypeError, match="did you mean 'fair_key'"):
        taskgate.rq.throttled("shared", fairkey="tenant")(job)
    with pytest.raises(TypeError, match=r"fair_key= in job.meta must be a value"):
        taskgate.rq.options(fair_key=lambda tenant: tenant)
    for bad in ("", None, True, 1.5):
        with pytest.raises(TypeError, match=r"fair_key=.*: expected the fair key"):
            taskgate.rq.options(fair_key=bad)


def test_rq_jobs_are_served_by_fair_key(rq_env: RqEnv) -> None:
    """The decorator's fair key (a parameter) and a per-job one (``options(fair_key=...)``) reach the room."""
    import taskgate.rq
    from tests.apps import rq_room_jobs as jobs

    e = rq_env
    for i in range(4):  # a0 admitted (runs), a1..a3 wait
        e.q.enqueue(jobs.fair, "a", i, job_id=f"a{i}")
    e.q.enqueue(jobs.fair, "b", 0, job_id="b0")
    e.q.enqueue(jobs.fair, "a", 9, job_id="x0", meta=taskgate.rq.options(fair_key="b"))  # b's, per job
    e.work()
    assert e.starts() == ["a0"]
    assert e.room.fair_keys("shared", "*") == {"a": 3, "b": 2}
    # b0 has the same start tag as a1 (which arrived first); x0 is b's second: served before a3
    t = e.room.backend_time()
    served = [e.room.promote("shared", "*", 8, now=t + i * 3_600_000).tasks for i in range(1, 6)]
    order = list(dict.fromkeys(x.task_id for batch in served for x in batch))  # hand-offs re-sent: once
    assert order == ["a1", "b0", "a2", "x0", "a3"]


def test_rq_fair_key_that_raises_fails_the_job_naming_it(rq_env: RqEnv) -> None:
    from rq.job import JobStatus

    import taskgate.rq
    from tests.apps import rq_room_jobs as jobs

    e = rq_env
    broken = e.q.enqueue(jobs.fair_broken, "acme")
    nope = e.q.enqueue(jobs.fair, "acme", 1, meta=taskgate.rq.options(throttle="nope", fair_key="acme"))
    e.work()
    assert e.starts() == []
    assert broken.get_status(refresh=True) == JobStatus.FAILED
    assert (
        "task 'tests.apps.rq_room_jobs.fair_broken': fair_key= callable 'tenant_of' raised LookupError"
        in str(broken.latest_result().exc_string)  # type: ignore[union-attr]
    )
    assert nope.get_status(refresh=True) == JobStatus.FAILED
    assert "'nope'" in str(nope.latest_result().exc_string)  # type: ignore[union-attr]
    assert e.room.depth("shared", "*") == 0  # nothing parked


@pytest.fixture
def rq_fleet() -> Any:
    from tests.test_rq_room import RoomFleet
    from tests.test_rq_workers import fleets

    yield from fleets(RoomFleet)


@pytest.mark.slow
def test_rq_workers_share_a_limit_by_fair_key(rq_fleet: Callable[..., Any]) -> None:
    """Real ``rq worker`` processes (2, forking), one limit of 20/s for every tenant, ``fair_key="tenant"``,
    nothing waited out in place. Judged on the order of the starts (not their times, so a loaded box cannot
    fail it) and on the grants the rooms counted: tenant B's 10 jobs queued behind 100 of tenant A's start
    among the next ~20 (FIFO: after every one of A's); acme (weight 3) and beta (1) queued together split
    3:1; every job runs once, and the engine's starts per fair key are the jobs' own."""
    from tests.apps import rq_room_jobs as jobs

    f = rq_fleet(2, TG_RATE="20", TG_SHORT_WAIT_MS="0")
    t0 = time.time()
    for i in range(100):
        f.enqueue(jobs.fair, "A", i)
    deadline = time.monotonic() + 30
    while f.q.count or f.room("shared").depth < 40:  # every A job taken and parked: a backlog waits
        assert time.monotonic() < deadline, f"A's jobs were not parked: {f.room('shared')}"
        time.sleep(0.05)
    tb = time.time()
    for i in range(10):
        f.enqueue(jobs.fair, "B", i)
    f.wait(110, timeout=90)
    got = sorted(f.records("start"), key=lambda r: r[1])
    a_before = sum(1 for _, t, _, x in got if x == "A" and t < tb)
    last_b = max(i for i, (_, _, _, x) in enumerate(got) if x == "B")
    a_between = sum(1 for _, t, _, x in got[: last_b + 1] if x == "A" and t >= tb)
    print(f"A started {a_before} before B was queued; B's 10 started among {a_between + 10} starts")
    assert 100 - a_before >= 40  # FIFO would have started every one of these before B's last
    assert a_between <= 10 + 6  # fair: about one of A's per one of B's

    for i in range(40):  # both backlogged from the start: 3:1
        f.enqueue(jobs.fair, "acme", i)
        f.enqueue(jobs.fair, "beta", i)
    f.wait(190, timeout=90)
    time.sleep(1.0)  # anything doubled would show up by now
    recs = f.records("start")
    late = sorted((r for r in recs if r[3] in ("acme", "beta")), key=lambda r: r[1])
    first = Counter(x for _, _, _, x in late[:40])
    print(f"first 40 starts of acme (3) and beta (1): {dict(first)}")
    assert abs(first["acme"] - 30) <= 5
    # every job once; every grant claimed once; the engine counted each tenant's starts
    assert len(recs) == 190
    assert set(Counter(i for i, _, _, _ in recs).values()) == {1}
    room = f.room("shared")
    assert (room.depth, room.claimed) == (0, room.promoted)
    b = taskgate.connect(REDIS_URL, jobs.POLICIES, prefix=f.prefix)
    assert isinstance(b, taskgate.RedisBackend)
    try:
        (fs,) = read_fair(b, [("shared", "*")])
    finally:
        b.close()
    mine = Counter(x for _, _, _, x in recs)
    if time.time() - t0 < 60:  # both windows of the engine's count cover the run
        assert fs.total() == mine
    assert all(fs.total().get(k, 0) <= n for k, n in mine.items())


def test_the_fairness_command(redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from taskgate import cli

    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"version": 1, "limiters": POLICIES}))
    base = ["--redis", redis_url, "--config", str(cfg), "--prefix", f"tgfair{uuid.uuid4().hex[:8]}"]
    assert cli.main(["fairness", *base, "set", "w", "beta", "2.5"]) == 0
    assert cli.main(["fairness", *base, "show", "w"]) == 0
    out = capsys.readouterr().out
    assert "default weight 1" in out
    assert [line.split() for line in out.splitlines()[-2:]] == [
        ["acme", "3", "policy", "file"],
        ["beta", "2.5", "store"],
    ]
    assert cli.main(["fairness", *base, "set", "w", "beta", "-1"]) == 2
    assert "fairness weight of fair key 'beta' = '-1': expected a number > 0" in capsys.readouterr().err
    assert cli.main(["fairness", *base, "set", "nope", "beta", "1"]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
    assert cli.main(["fairness", *base, "unset", "w", "beta"]) == 0
    assert "removed" in capsys.readouterr().out


def test_operators_see_the_fair_keys(
    redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from taskgate import cli

    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"version": 1, "limiters": POLICIES}))
    prefix = f"tgfair{uuid.uuid4().hex[:8]}"
    b = taskgate.connect(redis_url, str(cfg), prefix=prefix)
    assert isinstance(b, taskgate.RedisBackend)
    room = WaitingRoom(b, lead_ms=0)
    flood(room, "w", "acme", 4, None)  # acme0 admitted (the store's clock: top reads the last minute)
    flood(room, "w", "beta", 2, None)
    assert room.fair_keys("w", "k") == {"acme": 3, "beta": 2}
    base = ["--redis", redis_url, "--config", str(cfg), "--prefix", prefix]
    assert cli.main(["rooms", *base, "show", "w", "k"]) == 0
    out = capsys.readouterr().out
    assert "fair key 'acme': 3 waiting" in out
    assert "fair key 'beta': 2 waiting" in out
    assert cli.main(["top", *base, "--once"]) == 0  # the store's own count of starts per fair key
    out = capsys.readouterr().out
    assert "fair share: w" in out
    rows = [r.split() for r in out.splitlines() if r.strip().startswith(("acme", "beta"))]
    # fair key, starts/min, share, weight, weight share, waiting: acme0 started; both wait, 3:1 by weight
    assert rows == [["acme", "1", "100%", "3", "75%", "3"], ["beta", "0", "0%", "1", "25%", "2"]]
    serve(room, "w", 5, NOW + SLOT)
    assert room.fair_keys("w", "k") == {}
    b.close()
