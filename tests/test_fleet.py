"""The Fleet door (``throttlekit.v1.Fleet``): client-held leases of a fixed window's budget.

The grant itself on every store (``lease_window``: the engine's ``op_lease.lua``), then ThrottleKit's own
client, throttlekit-py's ``FleetBackend`` / ``LeasedLimiter`` (run by tests/tk_fleet_client.py in a process
of its own), against a real ``taskgate serve`` on the real Redis: several clients leasing at once never get
more than the window's budget, and leases and direct checks share it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

import taskgate
from taskgate.server.testing import ServerProcess
from tests.conftest import ROOT

WINDOW_MS = 3_600_000
POLICIES = {
    "w": {"strategy": "fixedWindow", "limit": 10, "windowMs": 1000},
    "g": {"strategy": "gcra", "limit": 5, "period": "1s"},
    "t": {"tokenBudget": [{"budget": 100, "windowMs": 1000}, {"budget": 150, "windowMs": 10000}]},
    "f": {"strategy": "fixedWindow", "limit": 100, "windowMs": 1000},
}
NOW = 5_000_250  # 250 ms into the window [5,000,000, 5,001,000)


def test_a_lease_takes_what_is_left_of_the_window(connect: Any) -> None:
    b = connect(POLICIES)
    got = [b.lease_window("w", "", 4, now=NOW) for _ in range(4)]
    assert [g.granted for g in got] == [4, 4, 2, 0]  # a partial grant, then a refusal
    assert {(g.window_end, g.limit) for g in got} == {(5_001_000, 10)}
    assert [g.retry_after_ms for g in got] == [0, 0, 0, 750]  # refused: until the window ends
    assert b.lease_window("w", "", 4, now=5_001_000).granted == 4  # the next window


def test_leases_and_checks_share_one_budget(connect: Any) -> None:
    b = connect(POLICIES)
    assert b.check("w", "t", 3, now=NOW).allowed
    assert b.lease_window("w", "t", 100, now=NOW).granted == 7
    d = b.check("w", "t", now=NOW)
    assert (d.allowed, d.remaining, d.retry_after_ms) == (False, 0, 750)
    assert b.lease_window("w", "other", 100, now=NOW).granted == 10  # another key, another budget
    assert b.lease_window("w", "", 100, now=NOW).granted == 10  # "" is its own, policy-wide budget


def test_a_token_lease_takes_the_least_any_budget_has_left(connect: Any) -> None:
    b = connect(POLICIES)
    got = [b.lease_window("t", "k", 60, axis="tokens", now=NOW) for _ in range(3)]
    assert [(g.granted, g.window_end, g.limit, g.retry_after_ms) for g in got] == [
        (60, 5_001_000, 100, 0),
        (40, 5_001_000, 100, 0),  # the 1 s budget is spent ...
        (0, 5_001_000, 100, 750),
    ]
    d = b.debit("t", "k", 1, now=NOW)  # ... for debits too: one budget, charged like a debit
    assert (d.allowed, d.remaining) == (False, 0)
    # the next second: the 10 s budget has 50 left, then it binds until its own window ends
    later = [b.lease_window("t", "k", 60, axis="tokens", now=5_001_000) for _ in range(2)]
    assert [(g.granted, g.window_end, g.limit, g.retry_after_ms) for g in later] == [
        (50, 5_002_000, 100, 0),
        (0, 5_010_000, 150, 9_000),
    ]


def test_tenants_split_a_window_by_weight(connect: Any) -> None:
    """Under contention the tenants leasing one window split it by weight (3:1), each up to its share
    whatever the order; never more than the window in all; checks' spend is shared out the same way."""
    b: taskgate.RedisBackend = connect(POLICIES)

    def lease(tenant: str, wants: int, now: int = NOW) -> int:
        return b.lease_window(
            "f", "", wants, now=now, tenant=tenant, weight=3 if tenant == "a" else 1
        ).granted

    assert lease("a", 10) == 10  # alone: whatever it asks
    got = {"a": 10, "b": 0}
    for _ in range(12):
        for t in ("b", "a"):
            got[t] += lease(t, 10)
    assert got == {"a": 75, "b": 25}
    assert lease("a", 10) == lease("b", 10) == 0
    # the next window: the same split from the first lease on (both were active in the last window_ms)
    nxt = NOW + 750
    assert [lease("a", 100, nxt), lease("b", 100, nxt), lease("a", 100, nxt)] == [75, 25, 0]
    # on a key checks spend too: the tenants share what the checks leave, by weight
    assert b.check("f", "k", 20, now=NOW).allowed
    got = {"a": 0, "b": 0}
    for _ in range(10):
        for t in ("a", "b"):
            got[t] += b.lease_window("f", "k", 10, now=NOW, tenant=t, weight=3 if t == "a" else 1).granted
    assert got == {"a": 60, "b": 20}
    # a tenant idle for a window is forgotten: the other takes the whole window (work-conserving)
    much_later = NOW + 3750
    assert lease("a", 100, much_later) == 100
    assert lease("b", 1, much_later) == 0  # nothing left: a tenant alone took it all


def test_a_late_tenant_shares_what_is_left_by_what_each_is_owed(connect: Any) -> None:
    b: taskgate.RedisBackend = connect(POLICIES)

    def lease(tenant: str, wants: int, weight: float = 1) -> int:
        return b.lease_window("f", "", wants, now=NOW, tenant=tenant, weight=weight).granted

    assert lease("c", 1) == 1  # active: c, then a, each owed half of the window
    assert lease("a", 100) == 50  # a takes its half (b is not active yet)
    # b arrives late: a third each, but a has taken more than its third. What is left (49) is shared in
    # proportion to what b (33.3) and c (32.3) are still owed
    assert lease("b", 100) == 25
    assert lease("c", 100) == 20
    got = [lease(t, 100) for t in "bcbcab"]
    assert got == [2, 2, 0, 0, 0, 0]  # all 100 granted, none beyond
    with pytest.raises(ValueError, match="weight"):
        lease("d", 1, weight=0)
    with pytest.raises(ValueError, match="tenants"):
        b.lease_window("t", "", 1, axis="tokens", now=NOW, tenant="a")


def test_only_fixed_windows_lease(connect: Any) -> None:
    b = connect(POLICIES)
    with pytest.raises(taskgate.OperationNotSupportedError, match="fixed window"):
        b.lease_window("g", "", 1, now=NOW)
    with pytest.raises(ValueError, match="wants"):
        b.lease_window("w", "", 0, now=NOW)
    with pytest.raises(taskgate.PolicyNotFoundError):
        b.lease_window("nope", "", 1, now=NOW)
    with pytest.raises(taskgate.OperationNotSupportedError, match="tokenBudget"):
        b.lease_window("w", "", 1, axis="tokens", now=NOW)
    with pytest.raises(ValueError, match="axis"):
        b.lease_window("w", "", 1, axis="concurrency", now=NOW)


def test_the_fleet_answers_loopback_peers_only_without_a_secret() -> None:
    from taskgate.server.fleet import FleetService

    class Ctx:
        def __init__(self, peer: str) -> None:
            self._peer = peer
            self.aborted: tuple[Any, str] | None = None

        def peer(self) -> str:
            return self._peer

        async def abort(self, code: Any, message: str) -> None:
            self.aborted = (code, message)

    async def go() -> None:
        for secret, peer, denied in (
            (None, "ipv4:127.0.0.1:1", False),
            (None, "unix:/tmp/sock", False),
            (None, "ipv4:192.0.2.7:1", True),
            ("/etc/secret", "ipv4:192.0.2.7:1", False),  # the secret interceptor has let it in
        ):
            ctx = Ctx(peer)
            config = SimpleNamespace(secret_file=secret)
            service = FleetService(SimpleNamespace(backend=None, config=config))  # type: ignore[arg-type]
            await service._guard(ctx)
            assert (ctx.aborted is not None) == denied, (secret, peer)
            if ctx.aborted:
                assert ctx.aborted[0] == grpc.StatusCode.PERMISSION_DENIED

    asyncio.run(go())


# -- ThrottleKit's client against taskgate serve ----------------------------------------------------------


def tk_client(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "tk_fleet_client.py"), "clients", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text(
        "version: 1\nlimiters:\n"
        f"  window: {{strategy: fixedWindow, limit: 50, windowMs: {WINDOW_MS}}}\n"
        "  paced: {strategy: gcra, limit: 5, period: 1s}\n"
        f"  tokens: {{tokenBudget: {{budget: 1000, windowMs: {WINDOW_MS}}}}}\n"
        f"  shared: {{strategy: fixedWindow, limit: 50, windowMs: {WINDOW_MS},\n"
        "           fairness: {weights: {a: 3, b: 3}, defaultWeight: 1}}\n"
    )
    return path


@pytest.fixture
def served(throttlekit_py: Path, redis_url: str, prefix: str, cfg: Path) -> Iterator[ServerProcess]:
    """``taskgate serve`` on the real Redis (and the reference client installed)."""
    with ServerProcess("--config", str(cfg), "--redis", redis_url, "--prefix", prefix) as srv:
        yield srv


def test_throttlekit_clients_never_get_more_than_the_window(
    served: ServerProcess, redis_url: str, prefix: str, cfg: Path
) -> None:
    srv = served
    domain = f"tenant-{uuid.uuid4().hex[:8]}"
    # 4 clients x 40 requests, leasing 7 at a time, against a budget of 50 per window
    r = tk_client(
        {
            "target": srv.target,
            "policy": "window",
            "domain": domain,
            "clients": 4,
            "batch": 7,
            "requests": 40,
            "probes": [
                {"policy": "window", "domain": domain, "wants": 5},
                {"policy": "paced"},
                {"policy": "window", "axis": "token_budget"},
                {"policy": "nope"},
                {"policy": "tokens", "domain": domain, "axis": "token_budget", "wants": 600},
                {"policy": "tokens", "domain": domain, "axis": "token_budget", "wants": 600},
                {"policy": "window", "axis": "concurrency"},
            ],
        }
    )
    allowed = {int(k): v for k, v in r["allowed"].items()}
    assert allowed, r
    assert all(v <= 50 for v in allowed.values()), allowed
    now = int(time.time() * 1000)
    window_end = now - now % WINDOW_MS + WINDOW_MS
    if len(allowed) == 1:  # the run stayed inside one window (it crosses one only at the hour)
        assert allowed == {window_end: 50}, allowed
        assert len(r["denied"]) == 4 * 40 - 50
    assert {(d["limit"], d["reset_at"]) for d in r["denied"]} <= {(50, e) for e in allowed}
    assert all(0 < d["retry_after_ms"] <= WINDOW_MS for d in r["denied"])
    assert r["reserves"] < 4 * 40  # leases amortize: fewer round trips than requests
    spent, paced, token_budget, unknown, tokens1, tokens2, concurrency = r["probes"]
    assert spent["capacity"] == 0
    assert spent["limit"] == 50
    assert 0 < spent["retry_after_ms"] <= WINDOW_MS
    assert paced["error"] == "OperationNotSupportedError"  # UNIMPLEMENTED: not a fixed window
    assert token_budget["error"] == "OperationNotSupportedError"
    assert unknown["error"] == "PolicyNotFoundError"  # NOT_FOUND
    assert concurrency["error"] == "OperationNotSupportedError"
    assert (tokens1["capacity"], tokens2["capacity"]) == (600, 400)  # AXIS_TOKEN_BUDGET: a budget of 1000
    assert tokens1["limit"] == tokens2["limit"] == 1000
    # the same budget through the direct door: nothing left for the domain in this window
    with taskgate.connect(redis_url, cfg, prefix=prefix) as b:
        assert isinstance(b, taskgate.RedisBackend)
        if len(allowed) == 1 and int(time.time() * 1000) < window_end:
            d = b.check("window", domain)
            assert not d.allowed, d


def test_a_fresh_domain_gets_a_partial_grant(
    served: ServerProcess, redis_url: str, prefix: str, cfg: Path
) -> None:
    srv = served
    domain = f"tenant-{uuid.uuid4().hex[:8]}"
    with taskgate.connect(redis_url, cfg, prefix=prefix) as b:
        assert isinstance(b, taskgate.RedisBackend)
        assert b.check("window", domain, 45).allowed
    r = tk_client(
        {
            "target": srv.target,
            "policy": "window",
            "domain": domain,
            "clients": 0,
            "batch": 1,
            "requests": 0,
            "probes": [{"policy": "window", "domain": domain, "wants": 20}],
        }
    )
    (lease,) = r["probes"]
    now = int(time.time() * 1000)
    assert lease["capacity"] == 5  # what the window had left
    assert lease["expiry_ms"] % WINDOW_MS == 0
    assert lease["expiry_ms"] > now - 5000
    assert 0 < lease["refresh_interval_ms"] <= WINDOW_MS


def test_throttlekit_clients_of_three_tenants_split_the_window_by_weight(
    served: ServerProcess, redis_url: str, prefix: str, cfg: Path
) -> None:
    """A policy with ``fairness:``: the domains are tenants of one window, split 3:1:1 by the policy file's
    weights and the store's (b's 3 is set to 1 at runtime); throttlekit-py's own LeasedLimiters, one
    thread each, all greedy."""
    with taskgate.connect(redis_url, cfg, prefix=prefix) as b:
        assert isinstance(b, taskgate.RedisBackend)
        taskgate.set_weight(b, "shared", "b", 1)
    spec = {
        "target": served.target,
        "policy": "shared",
        "domains": ["a", "b", "c"],
        "batch": 4,
        "requests": 40,
        "probes": [{"policy": "shared", "domain": t, "wants": 1} for t in "abc"],
        "probes_first": True,  # every tenant active before the clients start: their order does not matter
    }
    r = tk_client(spec)
    assert [p["capacity"] for p in r["probes"]] == [1, 1, 1]
    allowed = {int(k): v for k, v in r["allowed"].items()}
    assert sum(allowed.values()) <= 50 - 3
    if len(allowed) == 1:  # one window (the run crosses one only at the hour)
        # shares of 50: 30, 10, 10, less the unit each probe leased and nobody spent
        assert r["allowed_by_domain"] == {"a": 29, "b": 9, "c": 9}, r
        assert len(r["denied"]) == 3 * 40 - 47
        assert {d["limit"] for d in r["denied"]} == {50}


def test_a_secret_opens_the_fleet_as_x_fleet_secret(
    throttlekit_py: Path, redis_url: str, prefix: str, cfg: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret-" + uuid.uuid4().hex)
    args = ("--config", str(cfg), "--redis", redis_url, "--prefix", prefix, "--secret-file", str(secret))
    with ServerProcess(*args) as srv:
        base = {
            "target": srv.target,
            "policy": "window",
            "domain": "d",
            "clients": 0,
            "batch": 1,
            "requests": 0,
        }
        probe = [{"policy": "window", "domain": "d", "wants": 3}]
        (ok,) = tk_client({**base, "secret": secret.read_text(), "probes": probe})["probes"]
        (wrong,) = tk_client({**base, "secret": "wrong", "probes": probe})["probes"]
        (none,) = tk_client({**base, "probes": probe})["probes"]
    assert ok["capacity"] == 3
    for refused in (wrong, none):
        assert refused["error"] == "ThrottleKitError"
        assert "UNAUTHENTICATED" in refused["text"]
