"""The gRPC door: ``taskgate serve`` (wire rules, fail modes, health, reflection, graceful shutdown, workers,
a fleet of servers) and ServiceBackend / AsyncServiceBackend (deadlines, retries, fail modes, fork safety).
The surface shared with the other doors is in test_conformance.py; TLS and secrets in
test_service_security.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import grpc
import pytest
import redis
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import taskgate
from taskgate import cli
from taskgate._proto import throttlekit_pb2 as pb
from taskgate._proto import throttlekit_pb2_grpc as pbg
from taskgate.backends.service import AsyncServiceBackend, ServiceBackend, map_rpc_error, parse_target
from taskgate.policy import load_policies, parse_policy
from taskgate.server import ServeConfig, hooks
from taskgate.server.app import build_server
from taskgate.server.errors import status_of
from taskgate.server.hooks import DecisionEvent, ServiceContext, register_service
from taskgate.server.testing import ServerProcess, free_port
from taskgate.server.wire import policy_info
from tests.conftest import require

REDIS_URL = "redis://127.0.0.1:6379/10"
POLICIES = """
version: 1
limiters:
  api: {strategy: gcra, limit: 5, period: 1h, burst: 5}
  open: {strategy: gcra, limit: 5, period: 1h, burst: 5, fail: open}
  slots: {concurrency: {maxLimit: 2, leaseTtl: 1s}, fail: open}
  lease: {concurrency: {maxLimit: 1, perKey: true, leaseTtl: 1s}}
  budget: {tokenBudget: {budget: 100, window: 1d}}
  debits: {tokenBudget: {budget: 100, window: 1d}, accounting: debit, concurrency: {maxLimit: 5}}
  fleet: {strategy: gcra, limit: 50, period: 1h, burst: 50}
"""


def _redis_up() -> bool:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
        return True
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def needs_redis() -> None:
    require(_redis_up(), f"Redis at {REDIS_URL}", "start redis-server on 127.0.0.1:6379")


def _unlink_prefix(prefix: str) -> None:
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        r.unlink(*keys)
    r.close()


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("service") / "policies.yaml"
    path.write_text(POLICIES)
    return path


@pytest.fixture(scope="module")
def mem_server(policy_file: Path) -> Iterator[ServerProcess]:
    """A server over the embedded memory:// store (no Redis needed)."""
    with ServerProcess("--config", str(policy_file)) as srv:
        yield srv


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"tgs{uuid.uuid4().hex[:10]}"
    yield p
    if _redis_up():
        _unlink_prefix(p)


def fresh() -> str:
    return uuid.uuid4().hex


class FakeRpcError(grpc.RpcError):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


# --- pure parts --------------------------------------------------------------------------------------------


def test_policy_catalog_round_trips(policy_file: Path) -> None:
    pols = load_policies(str(policy_file))
    extra = load_policies(
        {
            "tb": {"strategy": "tokenBucket", "capacity": 10, "refillPerSec": 0.5, "arithmetic": "tolerant"},
            "sw": {"strategy": "slidingWindow", "limit": 10, "window": "1m", "buckets": 6},
            "log": {"strategy": "slidingWindowLog", "limit": 3, "window": "10s"},
            "fw": {"strategy": "fixedWindow", "limit": 3, "window": "10s", "fail": "open"},
            "u": {
                "strategy": "gcra",
                "limit": 9,
                "period": "1m",
                "burst": 3,
                "bookingHorizon": 0,
                "concurrency": {"minLimit": 2, "maxLimit": 8, "perKey": True, "leaseTtl": "5s"},
                "tokenBudget": [{"budget": 5, "window": "1m"}, {"budget": 50, "window": "1h"}],
                "accounting": "debit",
                "deferral": {"maxDeferrals": 3, "onExhausted": "run", "jitter": "10ms"},
                "counters": False,
            },
        }
    )
    for p in [*pols.values(), *extra.values()]:
        info = policy_info(p)
        assert parse_policy(p.name, yaml.safe_load(info.yaml)) == p
        assert info.kind == p.kind


def test_server_status_codes() -> None:
    cases = [
        (taskgate.PolicyNotFoundError("x"), grpc.StatusCode.NOT_FOUND),
        (taskgate.OperationNotSupportedError("no"), grpc.StatusCode.UNIMPLEMENTED),
        (ValueError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (taskgate.InvalidPolicyError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (taskgate.BackendUnavailableError("down"), grpc.StatusCode.UNAVAILABLE),
        (taskgate.TaskgateError("odd"), grpc.StatusCode.INTERNAL),
        (RuntimeError("secret internals"), grpc.StatusCode.INTERNAL),
    ]
    for exc, code in cases:
        assert status_of(exc)[0] == code
    assert "secret internals" not in status_of(RuntimeError("secret internals"))[1]


def test_client_error_mapping() -> None:
    S = grpc.StatusCode
    cases: list[tuple[grpc.StatusCode, type[Exception]]] = [
        (S.NOT_FOUND, taskgate.PolicyNotFoundError),
        (S.UNIMPLEMENTED, taskgate.OperationNotSupportedError),
        (S.INVALID_ARGUMENT, ValueError),
        (S.UNAVAILABLE, taskgate.BackendUnavailableError),
        (S.DEADLINE_EXCEEDED, taskgate.BackendUnavailableError),
        (S.UNAUTHENTICATED, taskgate.TaskgateError),
        (S.INTERNAL, taskgate.TaskgateError),
    ]
    for code, exc in cases:
        err = map_rpc_error(FakeRpcError(code, "the details"), "grpc://h:1", "Check", "p")
        assert type(err) is exc
        assert "the details" in str(err)
    assert "secret" in str(map_rpc_error(FakeRpcError(S.UNAUTHENTICATED), "grpc://h:1"))
    nf = map_rpc_error(FakeRpcError(S.NOT_FOUND, "unknown policy 'p'"), "grpc://h:1", "Check", "p")
    assert isinstance(nf, KeyError)
    assert str(nf) == "unknown policy 'p'"


def test_parse_target() -> None:
    assert parse_target("grpc://localhost:7000") == ("localhost:7000", False)
    assert parse_target("grpcs://svc.example") == ("svc.example:50051", True)
    assert parse_target("grpc://[::1]:9") == ("[::1]:9", False)
    for bad in ("http://x:1", "grpc://", "grpc://h:1/path", "grpc://u:p@h:1"):
        with pytest.raises(ValueError, match="grpc"):
            parse_target(bad)


def test_connect_builds_the_grpc_doors_lazily() -> None:
    b = taskgate.connect("grpc://127.0.0.1:1", timeout=0.5)
    assert isinstance(b, ServiceBackend)
    assert b.url == "grpc://127.0.0.1:1"
    assert b._conn is None  # no channel until the first call
    a = taskgate.connect_async("grpcs://127.0.0.1:1")
    assert isinstance(a, AsyncServiceBackend)
    assert a.secure
    assert taskgate.ServiceBackend is ServiceBackend
    assert "ServiceBackend" in taskgate.__all__
    with pytest.raises(TypeError):
        taskgate.connect("grpc://127.0.0.1:1", socket_timeout=1)  # a Redis option is not silently dropped


def test_import_taskgate_does_not_import_grpc() -> None:
    code = "import sys, taskgate; taskgate.connect('memory://'); sys.exit('grpc' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_now_cannot_travel() -> None:
    b = ServiceBackend("127.0.0.1:1")
    calls: list[Callable[[], object]] = [
        lambda: b.check("p", "k", now=1),
        lambda: b.check_many("p", ["k"], now=1),
        lambda: b.peek("p", "k", now=1),
        lambda: b.forecast("p", "k", now=1),
        lambda: b.debit("p", "k", 1, now=1),
        lambda: b.admit("p", "k", now=1),
        lambda: b.release("l", now=1),
        lambda: b.heartbeat(["l"], now=1),
        lambda: b.reserve("p", "k", 1, now=1),
        lambda: b.settle("p", "k", "r", 1, now=1),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="now= cannot travel"):
            call()
    assert b._conn is None


class FlakyStub:
    """Fails the first ``failures`` calls of every method with ``code``, then answers."""

    def __init__(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.failures = failures
        self.code = code
        self.calls: list[tuple[str, Any, Any]] = []

    def __getattr__(self, method: str) -> Callable[..., Any]:
        def call(request: Any, timeout: Any = None, metadata: Any = None) -> Any:
            self.calls.append((method, timeout, metadata))
            if sum(1 for m, _, _ in self.calls if m == method) <= self.failures:
                raise FakeRpcError(self.code, "connection refused")
            d = pb.Decision(allowed=True, limit=5, remaining=4)
            return SimpleNamespace(decision=d, released=True)

        return call


def flaky(b: ServiceBackend, stub: FlakyStub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(b, "_channel", lambda: SimpleNamespace(stub=stub))


def test_only_idempotent_calls_are_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    b = ServiceBackend("127.0.0.1:1", secret="s3cret", timeout=1.5, retries=3)
    stub = FlakyStub(failures=2)
    flaky(b, stub, monkeypatch)
    assert b.peek("p", "k").remaining == 4  # two UNAVAILABLE, then an answer
    assert b.release("a:1:1:pk") is True
    with pytest.raises(taskgate.BackendUnavailableError) as info:
        b.check("p", "k")  # consuming: never retried
    assert isinstance(info.value.__cause__, grpc.RpcError)
    assert [m for m, _, _ in stub.calls] == ["Peek"] * 3 + ["Release"] * 3 + ["Check"]
    assert {t for _, t, _ in stub.calls} == {1.5}  # a deadline on every call
    assert {md for _, _, md in stub.calls} == {(("authorization", "Bearer s3cret"),)}


def test_other_codes_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    b = ServiceBackend("127.0.0.1:1")
    stub = FlakyStub(failures=5, code=grpc.StatusCode.DEADLINE_EXCEEDED)
    flaky(b, stub, monkeypatch)
    with pytest.raises(taskgate.BackendUnavailableError, match="DEADLINE_EXCEEDED"):
        b.peek("p", "k")
    assert len(stub.calls) == 1


def test_client_fail_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    modes: list[tuple[Literal["open", "closed"], bool]] = [("open", True), ("closed", False)]
    for fail, allowed in modes:
        b = ServiceBackend("127.0.0.1:1", fail=fail, fail_retry_ms=700)
        flaky(b, FlakyStub(failures=99), monkeypatch)
        d = b.check("p", "k")
        assert d.allowed is allowed
        assert d.retry_after_ms == (0 if allowed else 700)
        assert [x.allowed for x in b.check_many("p", ["a", "b"])] == [allowed, allowed]
        assert b.peek("p", "k").allowed is allowed
        assert b.debit("p", "k", 5).allowed is allowed
        adm = b.admit("p", "k")
        assert adm.allowed is allowed
        assert not adm.held  # nothing is held without the service
        with pytest.raises(taskgate.BackendUnavailableError):
            b.forecast("p", "k")  # no decision to fail into
        with pytest.raises(taskgate.BackendUnavailableError):
            b.release("a:1:1:pk")
    with pytest.raises(ValueError, match="fail"):
        ServiceBackend("127.0.0.1:1", fail="maybe")  # type: ignore[arg-type]


def test_unreachable_service_fails_fast_or_by_mode() -> None:
    url = f"grpc://127.0.0.1:{free_port()}"
    with taskgate.connect(url, timeout=1.0) as b:
        t0 = time.monotonic()
        with pytest.raises(taskgate.BackendUnavailableError, match="UNAVAILABLE"):
            b.check("api", "k")
        with pytest.raises(taskgate.BackendUnavailableError):
            b.ping()
        assert time.monotonic() - t0 < 3.0
    with taskgate.connect(url, fail="closed") as b:
        d = b.check("api", "k")
        assert not d.allowed
        assert d.retry_after_ms == 1000


def test_deadline_on_a_silent_peer() -> None:
    """A peer that accepts the connection and never speaks: the call still ends within its deadline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        b = ServiceBackend(f"127.0.0.1:{s.getsockname()[1]}", timeout=0.4)
        t0 = time.monotonic()
        with pytest.raises(taskgate.BackendUnavailableError):
            b.check("api", "k")
        assert time.monotonic() - t0 < 2.0
        b.close()


def test_deadline_on_a_slow_server() -> None:
    """A server that answers too late: DEADLINE_EXCEEDED at the client's deadline."""

    def slow(request: pb.CheckRequest, context: Any) -> pb.CheckResponse:
        time.sleep(1.5)
        return pb.CheckResponse()

    handler = grpc.unary_unary_rpc_method_handler(
        slow,
        request_deserializer=pb.CheckRequest.FromString,
        response_serializer=pb.CheckResponse.SerializeToString,
    )
    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("throttlekit.v1.RateLimiter", {"Check": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with ServiceBackend(f"127.0.0.1:{port}", timeout=0.3) as b:
            t0 = time.monotonic()
            with pytest.raises(taskgate.BackendUnavailableError, match="DEADLINE_EXCEEDED"):
                b.check("api", "k")
            assert time.monotonic() - t0 < 1.2
    finally:
        server.stop(0)


# --- the server --------------------------------------------------------------------------------------------


def test_wire_rules_and_extensions(mem_server: ServerProcess) -> None:
    """Raw stubs, as a ThrottleKit client calls: cost 0 means 1, tokens 0 means 1, hold/value are ignored."""
    with grpc.insecure_channel(mem_server.target) as ch:
        stub = pbg.RateLimiterStub(ch)
        k = fresh()
        d = stub.Check(pb.CheckRequest(policy="api", key=k, cost=0)).decision
        assert (d.allowed, d.limit, d.remaining) == (True, 5, 4)
        ds = stub.CheckMany(pb.CheckManyRequest(policy="api", keys=[k, fresh()])).decisions
        assert [x.remaining for x in ds] == [3, 4]
        assert stub.Forecast(pb.ForecastRequest(policy="api", key=k)).forecast.spendable_now == 3
        assert stub.Debit(pb.DebitRequest(policy="budget", key=k)).decision.remaining == 99
        a = stub.Admit(pb.AdmitRequest(policy="lease", key=k, hold=5000, value=7))
        assert a.decision.allowed
        assert a.lease_id
        assert a.binding_axis
        assert not a.policy_denied
        hb = stub.Heartbeat(pb.HeartbeatRequest(lease_ids=[a.lease_id]))
        assert list(hb.live_ids) == [a.lease_id]
        assert stub.Release(pb.ReleaseRequest(lease_id=a.lease_id)).released
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(pb.CheckRequest(policy="api", key=k, cost=-3))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cost" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.Heartbeat(pb.HeartbeatRequest(lease_ids=["x"] * 1001))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        names = [p.name for p in stub.ListPolicies(pb.ListPoliciesRequest()).policies]
        assert sorted(names) == sorted(load_policies(POLICIES))


def test_health_and_reflection(mem_server: ServerProcess) -> None:
    with grpc.insecure_channel(mem_server.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "throttlekit.v1.RateLimiter"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=2)
        assert next(iter(watch)).status == health_pb2.HealthCheckResponse.SERVING  # a streaming handler
        watch.cancel()
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(refl.ServerReflectionInfo(iter([req]), timeout=2)))
        names = {s.name for s in reply.list_services_response.service}
        assert {"throttlekit.v1.RateLimiter", "grpc.health.v1.Health"} <= names


def test_client_fetches_the_servers_policies(mem_server: ServerProcess) -> None:
    with taskgate.connect(mem_server.url) as b:
        assert isinstance(b, ServiceBackend)
        assert dict(b.policies) == dict(load_policies(POLICIES))
        assert b.policy("debits").accounting == "debit"
        with pytest.raises(taskgate.PolicyNotFoundError):
            b.policy("nope")
        assert b.heartbeat_interval == pytest.approx(1 / 3)
        with b.admit("debits", fresh(), tokens=7) as a:
            assert a.accounting == "debit"  # known from the server, not from a local file
        assert a.settled is not None  # debit accounting: the estimate was debited at release


def test_sync_heartbeat_pump_keeps_a_long_hold(mem_server: ServerProcess) -> None:
    with taskgate.connect(mem_server.url) as b:
        k = fresh()
        with b.admit("lease", k, heartbeat=True) as a:
            time.sleep(1.5)  # > the 1 s lease: only the pump keeps it
            assert not b.admit("lease", k).allowed
            assert not a.reclaimed
        assert a.released
        assert b.admit("lease", k).allowed


def test_async_door(mem_server: ServerProcess) -> None:
    async def main() -> None:
        b = taskgate.connect_async(mem_server.url)
        assert isinstance(b, AsyncServiceBackend)
        k = fresh()
        assert (await b.check("api", k)).remaining == 4
        assert [d.allowed for d in await b.check_many("api", [k, k])] == [True, True]
        assert (await b.peek("api", k)).remaining == 2
        assert (await b.forecast("api", k)).spendable_now == 2
        adm = await b.admit("lease", k, heartbeat=True)
        async with adm:
            assert adm.accounting == "escrow"
            await asyncio.sleep(1.5)
            assert not (await b.admit("lease", k)).allowed
            assert not adm.reclaimed
        assert (await b.admit("lease", k)).allowed
        assert b.policy("lease").concurrency is not None
        r = await b.reserve("budget", k, 10)
        assert (await r.settle(4)).refunded == 6
        await b.reset("api", k)
        assert (await b.peek("api", k)).remaining == 5
        with pytest.raises(taskgate.PolicyNotFoundError):
            await b.check("nope", k)
        with pytest.raises(taskgate.OperationNotSupportedError):
            await b.debit("api", k)
        with pytest.raises(ValueError, match="key"):
            await b.check("api", "")
        await b.ping()
        await b.aclose()

    asyncio.run(main())
    asyncio.run(_async_twice(mem_server.url))


async def _async_twice(url: str) -> None:
    """The same client on a second event loop opens a new channel instead of failing."""
    b = AsyncServiceBackend(parse_target(url)[0])
    assert (await b.check("api", fresh())).allowed
    await b.aclose()


def test_server_fail_modes_when_the_store_is_down(policy_file: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/10"
    args = ("--config", str(policy_file), "--redis", dead, "--fail-retry-ms", "1500")
    with ServerProcess(*args) as srv, taskgate.connect(srv.url) as b:
        closed = b.check("api", "k")
        assert not closed.allowed
        assert closed.retry_after_ms == 1500
        assert closed.limit == 5
        assert b.check("open", "k").allowed
        assert [d.allowed for d in b.check_many("api", ["a", "b"])] == [False, False]
        assert b.peek("open", "k").allowed
        a = b.admit("slots", "k")  # fail: open
        assert a.allowed
        assert not a.held
        assert not b.debit("budget", "k", 5).allowed
        with pytest.raises(taskgate.BackendUnavailableError, match="cannot reach the store"):
            b.forecast("api", "k")
        with pytest.raises(taskgate.PolicyNotFoundError):
            b.check("nope", "k")  # still NOT_FOUND, not a fail-mode decision
        with pytest.raises(ValueError, match="key"):
            b.check("api", "")
        assert "store unavailable" in srv.log_text()


class DelayProxy:
    """A TCP proxy to Redis that holds every client->Redis chunk for ``delay`` seconds (a slow store)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.delay = 0.0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port: int = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, slow: bool) -> None:
        try:
            while data := src.recv(65536):
                if slow:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def close(self) -> None:
        self.sock.close()


def test_graceful_shutdown_finishes_in_flight_calls(policy_file: Path, prefix: str) -> None:
    needs_redis()
    proxy = DelayProxy(("127.0.0.1", 6379))
    with contextlib.ExitStack() as stack:
        stack.callback(proxy.close)
        store = f"redis://127.0.0.1:{proxy.port}/10"
        args = ("--config", str(policy_file), "--redis", store, "--prefix", prefix, "--store-timeout", "5")
        srv = ServerProcess(*args, "--grace", "5").start()
        stack.callback(srv.kill)
        b = ServiceBackend(srv.target, timeout=5.0)
        assert b.check("api", "warm-up").allowed  # the store connection is open, the script loaded
        proxy.delay = 0.6
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(b.check("api", "k")))
        t0 = time.monotonic()
        t.start()
        time.sleep(0.2)  # the call is in flight, waiting on the slow store
        srv.signal(signal.SIGTERM)
        assert srv.proc is not None
        assert srv.proc.wait(10) == 0
        t.join(5)
        assert result
        assert result[0].allowed  # finished, not cut off
        assert time.monotonic() - t0 >= 0.6
        with pytest.raises(taskgate.BackendUnavailableError):
            ServiceBackend(srv.target, timeout=1.0).check("api", "k")  # no longer accepting
        assert "shutting down" in srv.log_text()
        b.close()


def test_cli_refuses_bad_configurations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nlimiters:\n  api: {strategy: gcra, limit: 0, period: 1s}\n")
    cases = [
        (["serve", "--workers", "2"], "needs a shared store"),
        (["serve", "--config", str(bad)], "'api'"),
        (["serve", "--redis", "grpc://x:1"], "redis://"),
        (["serve", "--tls-cert", str(bad)], "--tls-key"),
        (["serve", "--listen", "nonsense"], "HOST:PORT"),
        (["serve", "--config", str(tmp_path / "missing.yaml")], "no such file"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        assert message in capsys.readouterr().err
    assert cli.main([]) == 2
    assert "serve" in cli.COMMANDS


@pytest.mark.slow
def test_workers_share_one_port(policy_file: Path, prefix: str) -> None:
    needs_redis()
    args = ("--config", str(policy_file), "--redis", REDIS_URL, "--prefix", prefix, "--workers", "2")
    with ServerProcess(*args) as srv:
        line = next(x for x in srv.log_text().splitlines() if "ready on" in x)
        pids = [int(p) for p in line.split("pids ")[1].split(";")[0].split()]
        assert len(pids) == 2
        k = fresh()
        allowed = 0
        for _ in range(8):  # new connections: the kernel spreads them over the workers
            with ServiceBackend(srv.target) as b:
                allowed += b.check("api", k).allowed
        assert allowed == 5  # one shared limit across the workers
        os.kill(pids[0], signal.SIGKILL)  # a crashed worker is replaced
        _wait_for(lambda: "restarting" in srv.log_text(), 10)
        _wait_for(lambda: srv.log_text().count("serving") >= 3, 20)
        with ServiceBackend(srv.target) as b:
            assert b.peek("api", k).remaining == 0
        assert srv.stop() == 0
    for pid in pids[1:]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.slow
def test_workers_stop_when_their_parent_is_killed(policy_file: Path, prefix: str) -> None:
    needs_redis()
    args = ("--config", str(policy_file), "--redis", REDIS_URL, "--prefix", prefix, "--workers", "2")
    with ServerProcess(*args) as srv:
        line = next(x for x in srv.log_text().splitlines() if "ready on" in x)
        pids = [int(p) for p in line.split("pids ")[1].split(";")[0].split()]
        srv.kill()  # SIGKILL: the parent cannot forward anything
        _wait_for(lambda: not any(_alive(p) for p in pids), 10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"


def _wait_for(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


FLEET_CLIENT = textwrap.dedent(
    """
    import sys, time, taskgate
    targets, key, n, me = sys.argv[1].split(","), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    doors = [taskgate.connect("grpc://" + t, timeout=10.0) for t in targets]
    for d in doors:
        d.ping()
    time.sleep(max(0.0, float(sys.argv[5]) - time.time()))  # all clients start together
    allowed = sum(doors[(me + i) % len(doors)].check("fleet", key).allowed for i in range(n))
    print(allowed)
    """
)


@contextlib.contextmanager
def fleet(n: int, *args: str) -> Iterator[list[ServerProcess]]:
    """``n`` servers started in parallel, all stopped on exit whatever happens."""
    with contextlib.ExitStack() as stack:
        servers = []
        for _ in range(n):
            srv = ServerProcess(*args).launch()
            stack.callback(srv.log_path.unlink, missing_ok=True)
            stack.callback(srv.stop)
            servers.append(srv)
        for srv in servers:
            srv.wait_ready()
        yield servers


@pytest.mark.slow
def test_fleet_admits_exactly_the_limit(policy_file: Path, prefix: str) -> None:
    """3 servers over one Redis, 4 client processes hammering one key: exactly 50 of 50/h get through."""
    needs_redis()
    with fleet(3, "--config", str(policy_file), "--redis", REDIS_URL, "--prefix", prefix) as servers:
        targets = ",".join(s.target for s in servers)
        key = fresh()
        start = str(time.time() + 2.0)
        clients = [
            subprocess.Popen(
                [sys.executable, "-c", FLEET_CLIENT, targets, key, "60", str(i), start],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(4)
        ]
        outs = [c.communicate(timeout=60) for c in clients]
        assert [c.returncode for c in clients] == [0] * 4, [err[-2000:] for _, err in outs]
        counts = [int(out) for out, _ in outs]
        assert sum(counts) == 50, counts  # 240 checks through 3 servers: exactly the limit, no more, no less


@pytest.mark.slow
def test_a_killed_server_loses_no_slot_beyond_its_lease(policy_file: Path, prefix: str) -> None:
    needs_redis()
    with fleet(2, "--config", str(policy_file), "--redis", REDIS_URL, "--prefix", prefix) as (a_srv, b_srv):
        a, b = ServiceBackend(a_srv.target), ServiceBackend(b_srv.target)
        h1, h2 = a.admit("slots", "k"), a.admit("slots", "k")
        assert h1.held
        assert h2.held
        a_srv.kill()  # SIGKILL: no shutdown, no release
        assert not b.admit("slots", "k").allowed  # the slots are still held...
        assert b.release(h1.lease_id) is True  # ...and any replica can release them (stateless)
        h3 = b.admit("slots", "k")
        assert h3.allowed
        assert not b.admit("slots", "k").allowed
        _wait_for(lambda: b.admit("slots", "k").allowed, 5)  # h2 abandoned: back after its lease
        assert int(time.time() * 1000) >= h2.lease_expires_at - 50
        b.close()
        a.close()


FORK_CLIENT = textwrap.dedent(
    """
    import os, sys, taskgate
    b = taskgate.connect(sys.argv[1])
    early = taskgate.connect(sys.argv[1])  # made before the fork, first used in the child
    assert b.check("api", sys.argv[2]).allowed  # the parent's channel is open when it forks
    pid = os.fork()
    if pid == 0:
        ok = b.check("api", sys.argv[2]).remaining == 3 and early.check("api", sys.argv[2]).remaining == 2
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    assert b.check("api", sys.argv[2]).remaining == 1  # the parent's channel still works
    print("ok")
    """
)


def test_a_client_made_before_fork_works_in_the_child(mem_server: ServerProcess) -> None:
    out = subprocess.run(
        [sys.executable, "-c", FORK_CLIENT, mem_server.url, fresh()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_sigint_also_stops_cleanly(policy_file: Path) -> None:
    with ServerProcess("--config", str(policy_file)) as srv:
        srv.signal(signal.SIGINT)
        assert srv.proc is not None
        assert srv.proc.wait(10) == 0
        assert "stopped" in srv.log_text()


def test_hooks_let_another_service_in(policy_file: Path) -> None:
    """The Monitor's way in: a registrar adds its service and listens to every decision."""
    events: list[DecisionEvent] = []

    def registrar(server: Any, ctx: ServiceContext) -> str:
        ctx.listeners.append(events.append)
        return "test.Dummy"

    async def main() -> list[str]:
        backend = taskgate.connect_async(f"memory://{fresh()}", str(policy_file))
        assert isinstance(backend, taskgate.AsyncRedisBackend)
        built = await build_server(ServeConfig(listen="127.0.0.1:0"), backend)
        await built.server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{built.port}") as ch:
                stub = pbg.RateLimiterStub(ch)
                await stub.Check(pb.CheckRequest(policy="api", key="k"))
                await stub.Admit(pb.AdmitRequest(policy="lease", key="k"))
                health = health_pb2_grpc.HealthStub(ch)
                reply = await health.Check(health_pb2.HealthCheckRequest(service="test.Dummy"))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await built.server.stop(0)
            await backend.aclose()
        return built.services

    register_service(registrar)
    try:
        services = asyncio.run(main())
    finally:
        hooks._REGISTRARS.remove(registrar)
    # and the built-in Monitor and Fleet (taskgate.server.monitor, .fleet) register themselves, in any order
    assert services[0] == "throttlekit.v1.RateLimiter"
    assert sorted(services[1:]) == ["test.Dummy", "throttlekit.v1.Fleet", "throttlekit.v1.Monitor"]
    assert [(e.op, e.policy, e.key, e.decision.allowed) for e in events] == [
        ("Check", "api", "k", True),
        ("Admit", "lease", "k", True),
    ]
    assert events[1].axis == "concurrency"
    assert events[0].elapsed_ns > 0
