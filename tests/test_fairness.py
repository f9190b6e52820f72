"""Weighted fair queueing across fair keys inside one waiting room (``engine/lua/room.lua``), on the embedded
store, the real Redis and a Redis Cluster, with an explicit ``now``: a late tenant is served at its share, not
after the flood; weights split the slots; a tenant alone gets them all; without fair keys the room is FIFO.
The weights: policy file, store (``set_weight``), validation."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import taskgate
from taskgate.backends.fairness import Weights, clear_weight, set_weight, stored_weights
from taskgate.backends.waiting import WaitingRoom
from taskgate.engine.keys import keyset
from taskgate.errors import InvalidPolicyError, PolicyNotFoundError
from taskgate.integrations.options import parse_options
from taskgate.policy import parse_policy

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


def flood(room: WaitingRoom, policy: str, fair_key: str | None, n: int, at: int, tag: str = "") -> None:
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
    assert all(0 < c.pttl(k) <= room.room_ttl_ms for k in [*ks.room()[:2], *ks.fair()])
    assert room.purge("w", "k") == 9
    assert not any(c.exists(k) for k in [ks.room()[0], *ks.fair()])
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


def test_rq_rejects_fair_key_until_its_jobs_wait_in_the_engine() -> None:
    import taskgate.rq

    with pytest.raises(TypeError, match="fair_key"):

        @taskgate.rq.throttled("r", fair_key="tenant")
        def job(tenant: str) -> None: ...


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
    flood(room, "w", "acme", 4, NOW)  # acme0 admitted
    flood(room, "w", "beta", 2, NOW)
    assert room.fair_keys("w", "k") == {"acme": 3, "beta": 2}
    base = ["--redis", redis_url, "--config", str(cfg), "--prefix", prefix]
    assert cli.main(["rooms", *base, "show", "w", "k"]) == 0
    out = capsys.readouterr().out
    assert "fair key 'acme': 3 waiting" in out
    assert "fair key 'beta': 2 waiting" in out
    serve(room, "w", 5, NOW + SLOT)
    assert room.fair_keys("w", "k") == {}
    b.close()
