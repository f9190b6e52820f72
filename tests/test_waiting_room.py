"""The waiting room in the engine (``backends/waiting.py``, ``engine/lua/op_{enter,promote,claim}.lua``), on the
embedded store, the real Redis and a Redis Cluster: order, promotion by time / event / window, exactly-once
claims, duplicates, stale hand-offs, and the index of due rooms. Decisions take an explicit ``now``."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import taskgate
from taskgate.backends.waiting import WaitingRoom
from taskgate.integrations.waiting import parks, persistence
from tests.conftest import require

NOW = 1_800_000_000_000
RATE: dict[str, Any] = {
    "strategy": "gcra", "limit": 10, "period": "1s", "burst": 1, "deferral": {"park": "always"}
}  # fmt: skip
POLICIES = {
    "r": RATE,
    "c": {"concurrency": {"maxLimit": 2, "perKey": True, "leaseTtl": "10s"}},
    "cw": {"concurrency": {"maxLimit": 1, "leaseTtl": "10s"}},
    "b": {"tokenBudget": {"budget": 1000, "window": "1m"}},
    "sw": {"strategy": "slidingWindow", "limit": 2, "window": "1s"},
}


@pytest.fixture
def room(connect: Callable[[Any], taskgate.RedisBackend]) -> WaitingRoom:
    return WaitingRoom(connect(POLICIES), lead_ms=0)


def ids(tasks: list[Any]) -> list[str]:
    return [t.task_id for t in tasks]


def test_first_is_admitted_the_rest_wait_in_order(room: WaitingRoom) -> None:
    out = [room.enter("r", "k", f"t{i}", b"p%d" % i, now=NOW) for i in range(5)]
    assert [e.status for e in out] == ["admitted", "parked", "parked", "parked", "parked"]
    assert [e.depth for e in out[1:]] == [1, 2, 3, 4]
    assert out[1].retry_after_ms == 100  # the first parked: the room is due at the next slot
    assert room.list("r", "k") == ["t1", "t2", "t3", "t4"]
    # nothing due yet: nothing promoted, and the room says when
    r = room.promote("r", "k", 10, now=NOW + 50)
    assert r.tasks == []
    assert r.next_due == NOW + 100
    assert r.depth == 4
    # by time, oldest first, one per slot
    r = room.promote("r", "k", 10, now=NOW + 100)
    assert ids(r.tasks) == ["t1"]
    assert r.tasks[0].payload == b"p1"
    assert r.next_due == NOW + 200
    r = room.promote("r", "k", 10, now=NOW + 320)
    assert ids(r.tasks) == ["t2"]
    assert r.depth == 2


def test_arrivals_never_overtake_parked_work(room: WaitingRoom) -> None:
    room.enter("r", "k", "a", b"", now=NOW)
    room.enter("r", "k", "b", b"", now=NOW)  # parked behind a
    # long after, the policy would admit a newcomer, but b waits before it
    late = room.enter("r", "k", "c", b"", now=NOW + 5000)
    assert late.status == "parked"
    assert late.depth == 2
    assert ids(room.promote("r", "k", 10, now=NOW + 5000).tasks) == ["b"]


def test_short_waits_are_returned_not_parked(room: WaitingRoom) -> None:
    room.enter("r", "k", "a", b"", now=NOW)
    e = room.enter("r", "k", "b", b"", park_over_ms=100, now=NOW)
    assert e.status == "denied"
    assert e.retry_after_ms == 100
    assert room.depth("r", "k") == 0
    assert room.enter("r", "k", "b", b"", park_over_ms=99, now=NOW).status == "parked"


def test_lead_books_slots_ahead(connect: Callable[[Any], taskgate.RedisBackend]) -> None:
    room = WaitingRoom(connect(POLICIES), lead_ms=250)
    for i in range(6):
        room.enter("r", "k", f"t{i}", b"", now=NOW)
    r = room.promote("r", "k", 10, now=NOW + 10)
    # slots at +100, +200 are within 250 ms: promoted now, each valid from its slot
    assert ids(r.tasks) == ["t1", "t2"]
    assert [t.grant.valid_at for t in r.tasks] == [NOW + 100, NOW + 200]
    assert r.next_due == NOW + 300 - 250
    c = room.claim("r", "k", "t2", now=NOW + 50)
    assert c.status == "claimed"
    assert c.wait_ms == 150


def test_duplicates_are_recognised(room: WaitingRoom) -> None:
    room.enter("r", "k", "a", b"", now=NOW)
    room.enter("r", "k", "b", b"", now=NOW)
    assert room.enter("r", "k", "b", b"", now=NOW).status == "waiting"  # redelivered while parked
    (_t,) = room.promote("r", "k", 1, now=NOW + 100).tasks
    assert room.enter("r", "k", "b", b"", now=NOW + 100).status == "waiting"  # while handed off
    assert room.claim("r", "k", "b", now=NOW + 110).status == "claimed"
    assert room.claim("r", "k", "b", now=NOW + 120).status == "duplicate"  # a second copy of the hand-off
    assert room.enter("r", "k", "b", b"", now=NOW + 130).status == "done"  # the original, redelivered
    assert room.claim("r", "k", "never", now=NOW).status == "unknown"
    # a promoted message entering another policy's room is not a duplicate there
    assert room.enter("r", "k", "b", b"", dedupe=False, now=NOW + 10_000).status == "admitted"


def test_stale_hand_off_goes_out_again_with_the_same_grant(
    connect: Callable[[Any], taskgate.RedisBackend],
) -> None:
    room = WaitingRoom(connect(POLICIES), handoff_ms=1000, lead_ms=0)
    a = room.enter("c", "k", "a", b"", now=NOW)
    room.enter("c", "k", "b", b"", now=NOW)
    assert room.enter("c", "k", "x", b"px", now=NOW).status == "parked"  # limit 2
    assert a.admission is not None
    a.admission.release()
    (t,) = room.promote("c", "k", 5, now=NOW + 20).tasks
    assert t.task_id == "x"
    assert t.grant.lease
    # the promoter dies before sending it: nothing happens until the hand-off deadline...
    assert room.promote("c", "k", 5, now=NOW + 500).tasks == []
    # ...then it is handed out again, with the same grant (its lease still counts against the limit)
    (again,) = room.promote("c", "k", 5, now=NOW + 1100).tasks
    assert again.task_id == "x"
    assert again.grant == t.grant
    assert again.payload == b"px"
    assert room.claim("c", "k", "x", now=NOW + 1200).status == "claimed"
    assert room.claim("c", "k", "x", now=NOW + 1200).status == "duplicate"


def test_a_freed_slot_goes_to_the_oldest_waiter(room: WaitingRoom) -> None:
    a = room.enter("c", "k", "a", b"", now=NOW)
    room.enter("c", "k", "b", b"", now=NOW)
    assert [room.enter("c", "k", f"w{i}", b"", now=NOW).status for i in range(3)] == ["parked"] * 3
    assert room.promote("c", "k", 5, now=NOW + 1).tasks == []
    assert a.admission is not None
    a.admission.release()
    r = room.promote("c", "k", 5, now=NOW + 2)
    assert ids(r.tasks) == ["w0"]
    assert r.depth == 2
    c = room.claim("c", "k", "w0", now=NOW + 3)
    assert c.admission is not None
    assert c.admission.held
    assert c.admission.release()  # the lease it claimed is the one it releases
    assert ids(room.promote("c", "k", 5, now=NOW + 4).tasks) == ["w1"]


def test_a_lease_that_expired_on_the_way_is_not_claimed(room: WaitingRoom) -> None:
    a = room.enter("cw", "k", "a", b"", now=NOW)
    room.enter("cw", "k", "b", b"", now=NOW)
    assert a.admission is not None
    a.admission.release()
    (t,) = room.promote("cw", "k", 1, now=NOW + 1).tasks
    assert t.grant.lease_expires_at == NOW + 1 + 10_000
    assert room.claim("cw", "k", "b", now=NOW + 20_000).status == "expired"


def test_budgets_promote_by_window(room: WaitingRoom) -> None:
    room.enter("b", "k", "a", b"", tokens=600, now=NOW)
    e = room.enter("b", "k", "b", b"", tokens=600, now=NOW)
    assert e.status == "parked"
    assert e.binding_axis == "cost"
    assert e.retry_after_ms == 60_000
    room.enter("b", "k", "c", b"", tokens=300, now=NOW)  # would fit, but waits behind b
    assert room.promote("b", "k", 5, now=NOW + 59_999).tasks == []
    r = room.promote("b", "k", 5, now=NOW + 60_000)
    assert ids(r.tasks) == ["b", "c"]
    assert [t.grant.reserved_tokens for t in r.tasks] == [600, 300]
    c = room.claim("b", "k", "b", tokens=600, now=NOW + 60_001)
    assert c.admission is not None
    s = c.admission.settle(100)
    assert s.refunded == 500  # type: ignore[union-attr]


def test_other_strategies_wait_too(room: WaitingRoom) -> None:
    got = [room.enter("sw", "k", f"t{i}", b"", now=NOW).status for i in range(4)]
    assert got == ["admitted", "admitted", "parked", "parked"]
    assert ids(room.promote("sw", "k", 5, now=NOW + 2000).tasks) == ["t2", "t3"]


def test_the_index_of_due_rooms(room: WaitingRoom) -> None:
    room.enter("r", "k1", "a", b"", now=NOW)
    room.enter("r", "k1", "b", b"", now=NOW)
    room.enter("r", "k2", "c", b"", now=NOW)
    room.enter("r", "k2", "d", b"", now=NOW)
    _, nxt, due = room.due_rooms(now=NOW + 50)
    assert due == []
    assert nxt == NOW + 100
    _now, nxt, due = room.due_rooms(now=NOW + 100, lease_ms=5000)
    assert sorted(due) == [("r", "k1"), ("r", "k2")]
    assert room.due_rooms(now=NOW + 200)[2] == []  # leased to the first promoter
    res = room.promote("r", "k1", 5, now=NOW + 100)
    room.reschedule("r", "k1", res)  # nothing waits, but b is on its way: due when its hand-off lapses
    assert ("r", "k1", NOW + 100 + room.handoff_ms) in room.rooms()
    assert room.claim("r", "k1", "b", now=NOW + 110).status == "claimed"
    room.reschedule("r", "k1", room.promote("r", "k1", 5, now=NOW + 120))  # empty: out of the index
    assert [(p, k) for p, k, _ in room.rooms()] == [("r", "k2")]
    assert room.purge("r", "k2") == 1
    assert room.rooms() == []


def test_bad_input_names_what_is_wrong(room: WaitingRoom) -> None:
    with pytest.raises(ValueError, match="task id"):
        room.enter("r", "k", "a:b", b"")
    with pytest.raises(KeyError, match="nope"):
        room.enter("nope", "k", "a", b"")
    with pytest.raises(ValueError, match="tokens"):
        room.enter("b", "k", "a", b"", tokens=5000)


def test_policy_park_option() -> None:
    p = taskgate.load_policies({"x": {"strategy": "gcra", "limit": 1, "period": "1s"}})["x"]
    assert p.deferral.park == "auto"
    with pytest.raises(taskgate.InvalidPolicyError, match=r"deferral.park.*'sometimes'"):
        taskgate.load_policies(
            {"x": {"strategy": "gcra", "limit": 1, "period": "1s", "deferral": {"park": "sometimes"}}}
        )


# -- persistence: auto parks only on a store that keeps its data ----------------------------------------


@pytest.fixture(scope="module")
def aof_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require(shutil.which("redis-server") is not None, "redis-server", "apt-get install redis-server")
    d: Path = tmp_path_factory.mktemp("aof")
    port = 7191
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes", "--save", "",
         "--dir", str(d)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)


def test_auto_parks_only_where_the_store_persists(aof_redis: str, redis_url: str) -> None:
    spec = {"p": {"strategy": "gcra", "limit": 1, "period": "1s"}}
    with taskgate.connect(aof_redis, spec) as b:
        assert persistence(b) == (True, "appendonly yes")
        assert parks(b.policy("p"), b)
    plain = redis.Redis.from_url(redis_url)
    if plain.config_get("appendonly").get("appendonly") == "no" and not plain.config_get("save").get("save"):
        with taskgate.connect(redis_url, spec) as b:
            assert persistence(b)[0] is False
            assert not parks(b.policy("p"), b)
    with taskgate.connect("memory://", spec) as b:
        assert not parks(b.policy("p"), b)


# -- seeing it: top, metrics, the rooms command ----------------------------------------------------------


def test_operators_see_the_rooms(redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry
    from rich.console import Console

    from taskgate import cli, top
    from taskgate.metrics import TaskgateCollector
    from taskgate.stats import read_snapshot
    from taskgate.waiting_view import read_waiting

    prefix = f"tgops{time.time_ns()}"
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"version": 1, "limiters": POLICIES}))
    b = taskgate.connect(redis_url, str(cfg), prefix=prefix)
    assert isinstance(b, taskgate.RedisBackend)
    room = WaitingRoom(b, lead_ms=0)
    for i in range(4):
        room.enter("r", "acme", f"t{i}", b"", now=NOW)
    room.promote("r", "acme", 1, now=NOW + 100)
    room.claim("r", "acme", "t1", now=NOW + 700)  # waited 0.7 s
    views = read_waiting(b)
    (v,) = views
    assert (v.policy, v.rooms, v.waiting, v.handed_off, v.claimed) == ("r", 1, 2, 0, 1)
    assert v.oldest_parked_at == NOW
    assert v.drain_s == pytest.approx(0.2)
    assert v.wait_buckets[2] == 1  # (0.5 s, 1 s]
    snap = read_snapshot(b.client, b.policies, prefix)
    snap = dataclasses.replace(snap, waiting=views)
    assert type(snap).from_json(snap.to_json()) == snap
    con = Console(width=200, record=True)
    con.print(top.render(snap))
    assert "waiting rooms" in con.export_text()
    reg = CollectorRegistry()
    reg.register(TaskgateCollector(lambda: snap))
    text = generate_latest(reg).decode()
    assert 'taskgate_waiting{policy="r"} 2.0' in text
    assert 'taskgate_wait_seconds_bucket{le="1.0",policy="r"} 1.0' in text
    base = ["--redis", redis_url, "--config", str(cfg), "--prefix", prefix]
    assert cli.main(["rooms", *base, "list"]) == 0
    assert "acme" in capsys.readouterr().out
    assert cli.main(["rooms", *base, "show", "r", "acme"]) == 0
    assert "2 waiting" in capsys.readouterr().out
    assert cli.main(["rooms", *base, "purge", "r", "acme"]) == 2  # no terminal, no --yes: refused
    assert "confirm with --yes" in capsys.readouterr().err
    assert cli.main(["rooms", *base, "purge", "r", "acme", "--yes"]) == 0
    assert "removed 2 task(s)" in capsys.readouterr().out
    assert cli.main(["rooms", *base, "show", "nope", "acme"]) == 2
    b.close()


def test_a_full_store_falls_back_to_the_fail_mode(redis_url: str) -> None:
    """maxmemory reached (Redis answers OOM to the park): the task is deferred through the broker with a
    backoff under fail: closed (run under fail: open), never lost and never failed."""
    import redis.exceptions

    from taskgate.integrations._gate import DeferralState, Deferred, Gate
    from taskgate.integrations.options import parse_options

    b = taskgate.connect(
        redis_url,
        {"r": POLICIES["r"], "o": {**RATE, "fail": "open"}},
        prefix=f"tgoom{time.time_ns()}",
    )
    assert isinstance(b, taskgate.RedisBackend)
    room = WaitingRoom(b)

    def full(*args: Any, **kwargs: Any) -> Any:
        raise taskgate.TaskgateError(
            "engine script enter:gcra failed: "
            + str(redis.exceptions.ResponseError("OOM command not allowed when used memory > 'maxmemory'."))
        )

    room.enter = full  # type: ignore[method-assign]
    gate = Gate(lambda: b)
    out = gate.enter_room(room, parse_options("t", "r"), (), {}, DeferralState(), "id1", b"")
    assert isinstance(out, Deferred)
    assert out.reason == "unavailable"
    assert out.countdown_ms == 1000
    opened = gate.enter_room(room, parse_options("t", "o"), (), {}, DeferralState(), "id2", b"")
    assert not isinstance(opened, Deferred)
    b.close()
