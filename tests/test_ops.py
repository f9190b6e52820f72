"""Operating taskgate (issue 8): the counters the engine keeps with every decision, the Snapshot built from
them, and the three views of it (``taskgate top``, the Prometheus exporter, the Monitor door), the operator
CLI, and keys kept out of logs.

The acceptance test drives a known workload on the real Redis (db 4), part of it through a real ``taskgate
serve``, and checks that ``taskgate top --once``, the Prometheus text (of ``serve --metrics`` and of the
standalone exporter) and ``GetSnapshot`` all report the same, expected numbers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

import taskgate
from taskgate._proto import throttlekit_pb2 as pb
from taskgate._proto import throttlekit_pb2_grpc as pbg
from taskgate.engine.keys import STATS_SLOTS, is_stats_key, stats_keys
from taskgate.engine.stats_buffer import StatsBuffer
from taskgate.logs import key_text, log_keys
from taskgate.metrics import TaskgateCollector
from taskgate.server.hooks import DecisionEvent
from taskgate.server.monitor import DenialFeed, MonitorService, is_loopback_peer
from taskgate.server.testing import ServerProcess
from taskgate.stats import Counters, Snapshot, read_snapshot
from taskgate.top import snapshot_of_proto
from taskgate.types import Decision
from tests.conftest import redis_up, require

OPS_URL = os.environ.get("TASKGATE_TEST_OPS_REDIS_URL", "redis://127.0.0.1:6379/4")
HOUR = 3_600_000
POLICIES = """
version: 1
limiters:
  api: {strategy: gcra, limit: 5, period: 1h, burst: 5}
  booky: {strategy: gcra, limit: 1, period: 10s, burst: 1, bookingHorizon: 1m}
  llm:
    strategy: gcra
    limit: 100
    period: 1h
    burst: 100
    concurrency: {maxLimit: 2}
    tokenBudget: {budget: 1000, window: 1h}
  tenant: {tokenBudget: {budget: 100, window: 1h}, accounting: debit}
  quiet: {strategy: fixedWindow, limit: 100, window: 1h, counters: false}
"""
# (the provider's counters are covered by tests/test_provider_engine.py: this workload reports nothing)
PROVIDER_FIELDS = ("denied_provider", "provider_429s", "provider_hold_ms")
FIELDS = [f for f in Counters.__dataclass_fields__ if f not in PROVIDER_FIELDS]


def _unlink(url: str, prefix: str) -> None:
    r = redis.Redis.from_url(url)
    keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        r.unlink(*keys)
    r.close()


@pytest.fixture
def ops_url() -> str:
    require(redis_up(OPS_URL), f"Redis at {OPS_URL}", "start redis-server on 127.0.0.1:6379")
    return OPS_URL


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"tgops{uuid.uuid4().hex[:10]}"
    yield p
    if redis_up(OPS_URL):
        _unlink(OPS_URL, p)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text(POLICIES)
    return path


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> str:
    """The counters run in the engine's scripts: on the embedded store (Lua 5.4) and the real Redis (5.1)."""
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}"
    url: str = request.getfixturevalue("ops_url")
    return url


def totals(b: taskgate.RedisBackend) -> dict[str, Counters]:
    snap = read_snapshot(b.client, b.policies, b.prefix)
    return {p.name: p.totals for p in snap.policies}


def _clear_of_window_end(window_ms: int = HOUR, margin_ms: int = 60_000) -> None:
    """The workloads below use real time and hour-long windows: never start one in an hour's last minute."""
    left = window_ms - int(time.time() * 1000) % window_ms
    if left < margin_ms:
        time.sleep(left / 1000 + 0.05)


# -- the known workload ---------------------------------------------------------------------------------------


EXPECTED: dict[str, dict[str, int]] = {
    "api": {"allowed": 7, "denied_rate": 3},
    "booky": {"allowed": 1, "denied_rate": 2, "booked": 2},
    "llm": {
        "allowed": 3,
        "denied_concurrency": 2,
        "denied_cost": 1,
        "tokens_reserved": 1100,
        "tokens_refunded": 200,
        "leases_acquired": 3,
        "leases_released": 2,
    },
    "tenant": {"allowed": 2, "denied_cost": 1, "tokens_charged": 120},
}


def expected(name: str) -> dict[str, int]:
    e = dict.fromkeys(FIELDS, 0) | EXPECTED[name]
    e["denied"] = e["denied_rate"] + e["denied_concurrency"] + e["denied_cost"]
    del e["wait_ms"]
    return e


def counts(c: Counters) -> dict[str, int]:
    d = {f: getattr(c, f) for f in FIELDS if f != "wait_ms"}
    d["denied"] = c.denied
    return d


def workload(b: Any, s: Any | None = None) -> list[Any]:
    """Decisions with known outcomes; ``s`` (another door, e.g. the gRPC one) takes part of them. Returns
    what is still held (one llm lease)."""
    s = s or b
    assert [b.check("api", "alice").allowed for _ in range(4)] == [True] * 4
    assert [s.check("api", "alice").allowed for _ in range(3)] == [True, False, False]
    assert [d.allowed for d in b.check_many("api", ["bob", "carol", "alice"])] == [True, True, False]
    booky = [b.check("booky", "dana", book=True) for _ in range(3)]
    assert [(d.allowed, d.booked) for d in booky] == [(True, False), (False, True), (False, True)]
    a1 = b.admit("llm", "acme", tokens=300)
    a2 = s.admit("llm", "globex", tokens=300)
    a3 = b.admit("llm", "acme", tokens=100)
    assert (a1.allowed, a2.allowed, a3.allowed, a3.binding_axis) == (True, True, False, "concurrency")
    assert a1.settle(100).refunded == 200
    assert a1.release()
    a4 = b.admit("llm", "acme", tokens=500)
    a5 = b.admit("llm", "acme", tokens=500)
    assert (a4.allowed, a5.allowed, a5.binding_axis) == (True, False, "concurrency")
    assert a2.release()
    a6 = b.admit("llm", "acme", tokens=500)
    assert (a6.allowed, a6.binding_axis) == (False, "cost")
    assert [b.debit("tenant", "t1", n).allowed for n in (60, 60, 1)] == [True, True, False]
    assert all(b.check("quiet", "q").allowed for _ in range(3))
    return [a4]


def test_the_engine_counts_every_decision(store: str, prefix: str, policy_file: Path) -> None:
    _clear_of_window_end()
    b = taskgate.connect(store, str(policy_file), prefix=prefix)
    assert isinstance(b, taskgate.RedisBackend)
    held = workload(b)
    snap = read_snapshot(b.client, b.policies, b.prefix)
    for name in EXPECTED:
        p = snap.policy(name)
        assert counts(p.totals) == expected(name), name
        assert counts(p.window) == expected(name), name  # all within the last minute
    assert 0 < snap.policy("booky").totals.wait_ms <= 30_000 + 10  # about 10 s + 20 s
    llm = snap.policy("llm")
    assert (llm.inflight, llm.concurrency_limit, llm.binding_axis) == (1, 2, "concurrency")
    assert [(k.key, k.count) for k in llm.top_denied] == [("acme", 3)]
    assert [(k.key, k.count) for k in llm.top_spent] == [("acme", 800), ("globex", 300)]
    acme = next(k for k in llm.keys if k.key == "acme")
    assert [(v.used, v.budget) for v in acme.budgets] == [(600, 1000)]
    assert [(k.key, k.count) for k in snap.policy("api").top_denied] == [("alice", 3)]
    quiet = snap.policy("quiet")
    assert not quiet.counters
    assert quiet.totals == Counters()
    assert not b.client.exists(*stats_keys(prefix, "quiet"))
    for a in held:
        a.release()
    b.close()


def test_every_stats_key_expires(store: str, prefix: str, policy_file: Path) -> None:
    _clear_of_window_end()
    b = taskgate.connect(store, str(policy_file), prefix=prefix)
    assert isinstance(b, taskgate.RedisBackend)
    workload(b)
    names = [k for k in b.client.scan_iter(match=f"{prefix}:*", count=1000) if is_stats_key(prefix, k)]
    assert len(names) >= 4 * 2  # a ring and at least one top set per counted policy
    assert all(b.client.pttl(k) > 0 for k in names)
    b.close()


def test_a_reused_slot_rolls_into_the_totals(store: str, prefix: str) -> None:
    """Explicit clocks: a slot reused a ring later keeps its old counts in the totals; a count older than
    its slot's second goes straight to the totals; nothing is lost."""
    b = taskgate.connect(
        store, {"p": {"strategy": "gcra", "limit": 1000, "period": "1s", "burst": 1000}}, prefix=prefix
    )
    assert isinstance(b, taskgate.RedisBackend)
    t0 = 1_000_000_020_000  # long ago: these counts are in the totals, not in the last minute's window
    b.check("p", "k1", now=t0)
    b.check("p", "k2", now=t0 + 500)
    b.check("p", "k3", now=t0 + STATS_SLOTS * 1000)  # the same slot, a ring later: rolls the first two up
    b.check("p", "k4", now=t0 + 1000)  # an older second than its slot holds
    b.check("p", "k5", now=t0 + STATS_SLOTS * 1000 + 1000)  # and that slot, reused
    p = read_snapshot(b.client, b.policies, prefix).policy("p")
    assert p.totals.allowed == 5
    assert p.window.allowed == 0
    b.close()


def test_top_keys_are_the_callers_keys(store: str, prefix: str) -> None:
    b = taskgate.connect(
        store,
        {
            "p": {"strategy": "gcra", "limit": 1, "period": "1h"},
            "w": {"strategy": "gcra", "limit": 1, "period": "1h", "concurrency": {"maxLimit": 5}},
        },
        prefix=prefix,
    )
    assert isinstance(b, taskgate.RedisBackend)
    odd = "a{b}%7Bc:d"
    for pol in ("p", "w"):
        b.check_many(pol, [odd, odd, "x", odd, "x"])  # (policy-wide concurrency: another key layout)
    snap = read_snapshot(b.client, b.policies, prefix)
    for pol in ("p", "w"):
        assert [(k.key, k.count) for k in snap.policy(pol).top_denied] == [(odd, 2), ("x", 1)]
    b.close()


def test_counters_on_a_cluster(cluster_url: str, prefix: str) -> None:
    """On a cluster, a per-key policy's counts are collected by its decisions and sent later (in the same
    pipeline as a later call, by the flusher, on close); a policy-wide one still counts in the script."""
    pols = {
        "api": {"strategy": "gcra", "limit": 2, "period": "1h", "burst": 2},
        "slots": {"concurrency": {"maxLimit": 1}},
    }
    b = taskgate.connect(cluster_url, pols, prefix=prefix)
    assert isinstance(b, taskgate.RedisBackend)
    assert b._stats is not None
    b._stats.flush_s = 0.0  # every call carries what is pending
    assert [b.check("api", "a").allowed for _ in range(3)] == [True, True, False]
    assert [d.allowed for d in b.check_many("api", [f"k{i}" for i in range(20)])] == [True] * 20
    s1 = b.admit("slots", "x")
    assert not b.admit("slots", "y").allowed
    s1.release()
    assert b.check("api", "late").allowed
    assert b._stats  # the last call's own counts wait for the next one
    b.close()  # sends them
    r = b.client.__class__.from_url(cluster_url.replace("redis+cluster", "redis"))
    snap = read_snapshot(r, taskgate.load_policies(pols), prefix)
    assert (snap.policy("api").totals.allowed, snap.policy("api").totals.denied) == (23, 1)
    assert [(k.key, k.count) for k in snap.policy("api").top_denied] == [("a", 1)]
    slots = snap.policy("slots").totals
    assert (slots.allowed, slots.denied_concurrency, slots.leases_acquired, slots.leases_released) == (
        1,
        1,
        1,
        1,
    )
    r.close()


def test_stats_buffer_sums_per_policy_and_second() -> None:
    clock = [0.0]
    buf = StatsBuffer(flush_s=0.25, clock=lambda: clock[0])
    buf.add("p", [1_000_500, 1, "a", 2, 1, "k", 1, 0])
    buf.add("p", [1_000_900, 2, "a", 1, "dr", 3, 0, 1, "k", 5])
    buf.add("p", [1_001_000, 1, "a", 1, 0, 0])
    assert not buf.due()
    clock[0] = 0.3
    assert buf.due()
    items = sorted(buf.take(), key=lambda it: it[1])
    assert [(p, sec, d.counters, d.denied, d.spent) for p, sec, d in items] == [
        ("p", 1000, {"a": 3, "dr": 3}, {"k": 1}, {"k": 5}),
        ("p", 1001, {"a": 1}, {}, {}),
    ]
    assert items[0][2].args() == [2, "a", 3, "dr", 3, 1, "k", 1, 1, "k", 5]
    assert not buf
    buf.put_back(items)
    assert len(buf.take()) == 2


# -- the three views agree --------------------------------------------------------------------------------------


def _top_once(url: str, policy_file: Path, prefix: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "taskgate.cli", "top", "--once", "--redis", url, "--config", str(policy_file),
         "--prefix", prefix],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def _num(s: str) -> int:
    return int(s.replace(",", ""))


def parse_top(text: str) -> dict[str, Any]:
    """The numbers `taskgate top --once` prints: its Policies and Totals tables and the key rows."""
    lines = text.splitlines()
    out: dict[str, Any] = {"policies": {}, "totals": {}, "keys": {}}
    section = ""
    for line in lines:
        cells = re.split(r"\s{2,}", line.strip())
        if line.startswith(("Policies", "Totals", "Top keys: ")):
            section = line.strip()
            continue
        if not cells or cells[0] in ("", "Policy", "Key") or set(line.strip()) <= {"─", " "}:
            continue
        if section == "Policies" and len(cells) == 8:
            out["policies"][cells[0]] = cells[1:]
        elif section == "Totals" and len(cells) == 13:
            out["totals"][cells[0]] = [_num(c) for c in cells[1:]]
        elif section.startswith("Top keys: "):
            out["keys"].setdefault(section[len("Top keys: ") :], {})[cells[0]] = cells[1:]
    return out


TOTAL_COLUMNS = [
    "allowed",
    "denied",
    "denied_rate",
    "denied_concurrency",
    "denied_cost",
    "booked",
    "tokens_reserved",
    "tokens_charged",
    "tokens_refunded",
    "leases_acquired",
    "leases_released",
    "leases_reclaimed",
]


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def from_metrics(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], policy: str) -> dict[str, int]:
    def get(name: str, **labels: str) -> int:
        return int(m.get((name, tuple(sorted({"policy": policy, **labels}.items()))), 0))

    d = {
        "allowed": get("taskgate_decisions_total", outcome="allowed", axis=""),
        "denied_rate": get("taskgate_decisions_total", outcome="denied", axis="rate"),
        "denied_concurrency": get("taskgate_decisions_total", outcome="denied", axis="concurrency"),
        "denied_cost": get("taskgate_decisions_total", outcome="denied", axis="cost"),
        "booked": get("taskgate_booked_total"),
        "tokens_reserved": get("taskgate_tokens_total", kind="reserved"),
        "tokens_charged": get("taskgate_tokens_total", kind="charged"),
        "tokens_refunded": get("taskgate_tokens_total", kind="refunded"),
        "leases_acquired": get("taskgate_leases_total", event="acquired"),
        "leases_released": get("taskgate_leases_total", event="released"),
        "leases_reclaimed": get("taskgate_leases_total", event="reclaimed"),
    }
    d["denied"] = d["denied_rate"] + d["denied_concurrency"] + d["denied_cost"]
    return d


def _metrics_port(srv: ServerProcess) -> int:
    m = re.search(r"metrics on http://[^:]+:(\d+)/metrics", srv.log_text())
    assert m, srv.log_text()
    return int(m.group(1))


def test_top_metrics_and_monitor_report_the_same_numbers(
    ops_url: str, prefix: str, policy_file: Path
) -> None:
    _clear_of_window_end()
    args = ("--redis", ops_url, "--config", str(policy_file), "--prefix", prefix, "--metrics", "127.0.0.1:0")
    with ServerProcess(*args) as srv:
        b = taskgate.connect(ops_url, str(policy_file), prefix=prefix)
        s = taskgate.connect(srv.url, str(policy_file))  # the gRPC door: the server writes the same counters
        t0 = time.monotonic()
        held = workload(b, s)

        # 1. taskgate top --once (a subprocess reading the store)
        top = parse_top(_top_once(ops_url, policy_file, prefix))
        # 2. Prometheus: the exporter inside `taskgate serve --metrics`, and the standalone one
        served = _metrics(f"http://127.0.0.1:{_metrics_port(srv)}/metrics")
        exporter = subprocess.Popen(
            [sys.executable, "-m", "taskgate.cli", "exporter", "--redis", ops_url, "--config", str(policy_file),
             "--prefix", prefix, "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert exporter.stdout is not None
            line = exporter.stdout.readline()
            port = int(re.search(r":(\d+)/metrics", line).group(1))  # type: ignore[union-attr]
            standalone = _metrics(f"http://127.0.0.1:{port}/metrics")
        finally:
            exporter.terminate()
            exporter.wait(10)
        # 3. the Monitor door
        with grpc.insecure_channel(srv.target) as ch:
            snap_msg = pbg.MonitorStub(ch).GetSnapshot(pb.GetSnapshotRequest(), timeout=10).snapshot
        assert time.monotonic() - t0 < 50, "the window checks below need it all within the minute"
        raw = Snapshot.from_json(snap_msg.raw_json)

        for name in EXPECTED:
            want = expected(name)
            assert dict(zip(TOTAL_COLUMNS, top["totals"][name], strict=True)) == want, ("top", name)
            assert from_metrics(served, name) == want, ("serve --metrics", name)
            assert from_metrics(standalone, name) == want, ("exporter", name)
            assert counts(raw.policy(name).totals) == want, ("GetSnapshot raw_json", name)
            summary = next(p for p in snap_msg.policies if p.name == name)
            assert (summary.allowed, summary.denied) == (want["allowed"], want["denied"]), (
                "GetSnapshot",
                name,
            )

        # the rest of what each shows: in flight vs limit, binding axis, top keys, budgets
        assert top["policies"]["llm"][5] == "1/2"  # In flight
        assert top["policies"]["llm"][4] == "concurrency"  # Binding
        assert top["policies"]["api"][4] == "rate"
        assert top["policies"]["quiet"][1:4] == ["off", "off", "off"]
        assert "quiet" not in top["totals"]
        acme = top["keys"]["llm"]["acme"]
        assert acme[0] == "3"  # denied
        assert acme[1] == "800"  # spent (reserved)
        assert re.fullmatch(r"[█#]{12}[░-]{8} 600/1,000", acme[2]), acme
        assert top["keys"]["api"]["alice"][0] == "3"
        for m in (served, standalone):
            assert m[("taskgate_inflight", (("policy", "llm"),))] == 1
            assert m[("taskgate_concurrency_limit", (("policy", "llm"),))] == 2
            assert m[("taskgate_counters_enabled", (("policy", "quiet"),))] == 0
            assert m[("taskgate_up", ())] == 1
            assert not any(
                lbl and dict(lbl).get("policy") == "quiet" and n == "taskgate_decisions_total" for n, lbl in m
            )
        guards = {g.name: (g.inflight, g.limit) for g in snap_msg.guards}
        assert guards == {"llm": (1, 2)}
        api = next(p for p in snap_msg.policies if p.name == "api")
        assert [(k.key, k.count) for k in api.top_denied] == [("alice", 3)]
        assert api.latency.n == 3  # this server's decisions on api (the three through the door)
        assert {(d.policy, d.key, d.axis) for d in snap_msg.recent_denials} == {("api", "alice", "rate")}
        assert snap_msg.meta.window_ms == 60_000
        # top through the door shows what top on the store shows
        via_door = subprocess.run(
            [sys.executable, "-m", "taskgate.cli", "top", "--once", "--grpc", srv.target],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert via_door.returncode == 0, via_door.stderr
        assert parse_top(via_door.stdout)["totals"] == top["totals"]
        for a in held:
            a.release()
        s.close()
        b.close()


def test_top_once_json(ops_url: str, prefix: str, policy_file: Path) -> None:
    b = taskgate.connect(ops_url, str(policy_file), prefix=prefix)
    b.check("api", "k")
    out = subprocess.run(
        [sys.executable, "-m", "taskgate.cli", "top", "--once", "--json", "--redis", ops_url, "--config",
         str(policy_file), "--prefix", prefix],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    snap = Snapshot.from_json(out.stdout)
    assert snap.policy("api").totals.allowed == 1
    assert [p.name for p in snap.policies] == ["api", "booky", "llm", "tenant", "quiet"]
    b.close()


def test_collector_survives_an_unreachable_store() -> None:
    def boom() -> Snapshot:
        raise redis.ConnectionError("no store")

    fams = list(TaskgateCollector(boom).collect())
    assert [(f.name, [s.value for s in f.samples]) for f in fams] == [("taskgate_up", [0])]


# -- the Monitor door ---------------------------------------------------------------------------------------------


def _denial(policy: str, key: str, op: str = "Check", axis: str = "") -> DecisionEvent:
    return DecisionEvent(op, policy, key, Decision(False, 5, 0, 0, 1000), axis, 1000)


def test_watch_queues_are_bounded_and_drop_for_slow_readers() -> None:
    async def go() -> None:
        feed = DenialFeed(queue_size=3)
        slow, other = feed.subscribe(""), feed.subscribe("llm")
        feed(DecisionEvent("Check", "api", "a", Decision(True, 5, 4, 0, 0), "", 1000))  # allowed: no event
        for i in range(10):
            feed(_denial("api", f"k{i}"))
        feed(_denial("llm", "t", op="Admit", axis="cost"))
        assert (slow.queue.qsize(), slow.dropped) == (3, 8)
        assert (other.queue.qsize(), other.dropped) == (1, 0)
        e = await other.queue.get()
        assert (e.policy, e.key, e.axis, e.retry_after_ms) == ("llm", "t", "cost", 1000)
        assert [x.key for x in feed.recent][-2:] == ["k9", "t"]
        assert feed.latency_summary("api").n == 11
        feed.unsubscribe(slow)
        feed(_denial("api", "late"))
        assert slow.queue.qsize() == 3

    asyncio.run(go())


def test_watch_streams_denials_from_a_real_server(policy_file: Path) -> None:
    with ServerProcess("--config", str(policy_file)) as srv, grpc.insecure_channel(srv.target) as ch:
        monitor, limiter = pbg.MonitorStub(ch), pbg.RateLimiterStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            next(iter(monitor.Watch(pb.WatchRequest(policy="nope"), timeout=5)))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        stream = monitor.Watch(pb.WatchRequest(policy="api"), timeout=20)
        got: list[pb.WatchResponse] = []
        deadline = time.monotonic() + 15
        while not got and time.monotonic() < deadline:
            for _ in range(6):  # a subscription may start after the first calls: keep denying
                limiter.Check(pb.CheckRequest(policy="api", key="eve"))
                limiter.Check(pb.CheckRequest(policy="booky", key="eve"))  # another policy: filtered out
            got.append(next(iter(stream)))
        stream.cancel()
        d = got[0].denial
        assert (d.policy, d.key, d.axis, d.limit) == ("api", "eve", "rate", 5)
        assert d.retry_after_ms > 0


def test_monitor_is_loopback_only_without_a_secret() -> None:
    assert is_loopback_peer("ipv4:127.0.0.1:5000")
    assert is_loopback_peer("ipv6:[::1]:5000")
    assert is_loopback_peer("unix:/tmp/sock")
    assert not is_loopback_peer("ipv4:10.1.2.3:5000")
    assert not is_loopback_peer("ipv6:[2001:db8::1]:5000")
    assert not is_loopback_peer("weird")

    class Ctx:
        def __init__(self, peer: str) -> None:
            self._peer = peer
            self.aborted: tuple[Any, str] | None = None

        def peer(self) -> str:
            return self._peer

        async def abort(self, code: Any, message: str) -> None:
            self.aborted = (code, message)

    def service(secret: str | None) -> MonitorService:
        ctx = SimpleNamespace(backend=None, config=SimpleNamespace(secret_file=secret), listeners=[])
        return MonitorService(ctx, DenialFeed())  # type: ignore[arg-type]

    async def go() -> None:
        for secret, peer, denied in (
            (None, "ipv4:127.0.0.1:1", False),
            (None, "ipv4:192.0.2.7:1", True),
            ("/etc/secret", "ipv4:192.0.2.7:1", False),  # the secret interceptor has let it in
        ):
            ctx = Ctx(peer)
            await service(secret)._guard(ctx)
            assert (ctx.aborted is not None) == denied, (secret, peer)
            if ctx.aborted:
                assert ctx.aborted[0] == grpc.StatusCode.PERMISSION_DENIED

    asyncio.run(go())


def test_a_throttlekit_snapshot_without_our_json_still_shows() -> None:
    msg = pb.Snapshot(
        meta=pb.MonitorMeta(generated_at=1_000, window_ms=10_000),
        policies=[pb.PolicySummary(name="tk", kind="rateLimit", allowed=7, denied=2, limit=5,
                                   top_denied=[pb.KeyCount(key="k", count=2)])],
    )  # fmt: skip
    snap = snapshot_of_proto(msg)
    p = snap.policy("tk")
    assert (p.totals.allowed, p.totals.denied, p.top_denied[0].key, snap.window_s) == (7, 2, "k", 10)


# -- the operator CLI ---------------------------------------------------------------------------------------------


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskgate.cli", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_policies_check(policy_file: Path, tmp_path: Path) -> None:
    ok = cli("policies", "check", str(policy_file))
    assert ok.returncode == 0, ok.stderr
    assert "5 policies, valid" in ok.stdout
    rows = {line.split()[0]: line for line in ok.stdout.splitlines() if line.strip()}
    assert "gcra 100/3600000ms burst 100" in rows["llm"]
    assert "2 policy-wide" in rows["llm"]
    assert "1000/3600000 ms (escrow)" in rows["llm"]
    assert rows["quiet"].split()[-1] == "off"
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nlimiters:\n  x: {strategy: gcra, limit: 10, period: 1s, brust: 2}\n")
    out = cli("policies", "check", str(bad))
    assert out.returncode == 1
    assert "unknown field 'brust'" in out.stderr
    assert "did you mean 'burst'" in out.stderr
    assert cli("policies", "check", str(tmp_path / "missing.yaml")).returncode == 1


def test_check_peek_reset(ops_url: str, prefix: str, policy_file: Path) -> None:
    env = {"TASKGATE_URL": ops_url, "TASKGATE_POLICIES": str(policy_file)}
    statuses = [cli("check", "api", "zed", "--prefix", prefix, env=env).returncode for _ in range(6)]
    assert statuses == [0, 0, 0, 0, 0, 1]
    peek = json.loads(cli("peek", "api", "zed", "--prefix", prefix, "--json", env=env).stdout)
    assert (peek["rate_allowed"], peek["rate_remaining"]) == (False, 0)
    adm = json.loads(
        cli("check", "llm", "acme", "--tokens", "250", "--prefix", prefix, "--json", env=env).stdout
    )
    assert (adm["allowed"], adm["reserved_tokens"]) == (True, 250)
    peek = json.loads(cli("peek", "llm", "acme", "--prefix", prefix, "--json", env=env).stdout)
    assert peek["budget0"].startswith("250/1000 per 3600000 ms")
    assert peek["slots"] == "0/2 (policy-wide)"  # the check released its slot
    reset = cli("reset", "api", "zed", "--prefix", prefix, env=env)
    assert reset.returncode == 0
    assert "reset api 'zed'" in reset.stdout
    assert cli("check", "api", "zed", "--prefix", prefix, env=env).returncode == 0
    unknown = cli("peek", "nope", "k", "--prefix", prefix, env=env)
    assert unknown.returncode == 2
    assert "nope" in unknown.stderr
    no_store = cli("peek", "api", "k", env={"TASKGATE_URL": "", "TASKGATE_POLICIES": str(policy_file)})
    assert no_store.returncode == 2
    assert "--redis" in no_store.stderr


# -- keys stay out of logs ----------------------------------------------------------------------------------------


@pytest.fixture
def keys_hidden(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., bool]]:
    monkeypatch.delenv("TASKGATE_LOG_KEYS", raising=False)
    before = log_keys()
    import taskgate.logs

    monkeypatch.setattr(taskgate.logs, "_show", None)
    yield log_keys
    log_keys(before)


def test_keys_are_not_shown_unless_enabled(
    keys_hidden: Callable[..., bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "alice@example.com" + "x" * 1100
    assert not keys_hidden()
    assert "alice" not in key_text(secret)
    assert key_text(secret) == key_text(secret) != key_text("bob")
    b = taskgate.connect(
        f"memory://{uuid.uuid4().hex}", {"p": {"strategy": "gcra", "limit": 1, "period": "1s"}}
    )
    with pytest.raises(ValueError, match="longer than") as e:
        b.check("p", secret)
    assert "alice" not in str(e.value)
    monkeypatch.setenv("TASKGATE_LOG_KEYS", "1")
    assert "alice@example.com" in key_text(secret)
    monkeypatch.delenv("TASKGATE_LOG_KEYS")
    taskgate.log_keys(True)
    with pytest.raises(ValueError, match=r"alice@example\.com"):
        b.check("p", secret)
    taskgate.log_keys(False)
    assert "alice" not in key_text(secret)
    b.close()
