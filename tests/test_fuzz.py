"""Bad input, fuzzed: the policy loader, every public API argument and the gRPC door.

Only TaskgateError / ValueError / TypeError with a message (or the right gRPC status) may come out: never a
traceback from deep inside, never a hang, never corrupted state.
"""

from __future__ import annotations

import string
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import taskgate
from taskgate import InvalidPolicyError, TaskgateError
from taskgate._proto import throttlekit_pb2 as pb
from taskgate._proto import throttlekit_pb2_grpc as pbg
from taskgate.server.testing import ServerProcess

FIELDS = ["strategy", "limit", "period", "periodMs", "burst", "capacity", "refillPerSec", "windowMs", "window",
          "buckets", "tokenBudget", "concurrency", "fail", "accounting", "bookingHorizon", "deferral", "counters"]  # fmt: skip
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=20), st.sampled_from(["gcra", "tokenBucket", "1s", "0ms", "5 parsecs", "-1m", "open"]),
)  # fmt: skip
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)  # fmt: skip
policies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), values, max_size=6)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.dictionaries(st.text(max_size=12), policies, max_size=3))
def test_loader_on_random_mappings(data: dict[str, Any]) -> None:
    try:
        loaded = taskgate.load_policies(data)
    except InvalidPolicyError as e:
        assert str(e)
        return
    for name, p in loaded.items():  # whatever loads is usable and sane
        assert p.name == name
        if p.rate is not None:
            assert p.rate.max_cost >= 1
        if p.concurrency is not None:
            assert 1 <= p.concurrency.min_limit <= p.concurrency.max_limit


@FAST
@given(st.text(max_size=200) | st.binary(max_size=100).map(lambda b: b.decode("latin-1")))
def test_loader_on_random_yaml_text(text: str) -> None:
    try:
        taskgate.load_policies(text if ("\n" in text or ":" in text) else text + "\n")
    except InvalidPolicyError as e:
        assert str(e)


@FAST
@given(
    st.dictionaries(
        st.sampled_from(["version", "limiters", "extra"]),
        st.one_of(values, st.dictionaries(st.text(max_size=6), policies, max_size=2)),
        max_size=3,
    )
)
def test_loader_on_random_documents(doc: dict[str, Any]) -> None:
    try:
        taskgate.load_policies(yaml.safe_dump(doc, allow_unicode=True) + "\n")
    except InvalidPolicyError as e:
        assert str(e)


POL = {
    "r": {"strategy": "gcra", "limit": 5, "period": "1s", "burst": 2},
    "u": {"strategy": "gcra", "limit": 5, "period": "1s", "concurrency": {"maxLimit": 2},
          "tokenBudget": {"budget": 100, "window": "1m"}},
}  # fmt: skip
args = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(), st.text(max_size=30),
    st.text(min_size=1000, max_size=1100), st.lists(st.text(max_size=4), max_size=3), st.binary(max_size=5),
)  # fmt: skip
OPS = ["check", "check_many", "peek", "forecast", "debit", "admit", "reserve", "reset"]


@pytest.fixture(scope="module")
def mem() -> taskgate.RedisBackend:
    b = taskgate.connect(f"memory://{uuid.uuid4().hex}", POL)
    assert isinstance(b, taskgate.RedisBackend)
    return b


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(OPS), st.sampled_from(["r", "u", "nope"]) | args, args, args, args)
def test_public_api_arguments(
    mem: taskgate.RedisBackend, op: str, policy: Any, key: Any, a: Any, b: Any
) -> None:
    fn = getattr(mem, op)
    try:
        if op in ("check", "forecast", "debit", "reserve"):
            fn(policy, key, a, now=b if isinstance(b, int) and not isinstance(b, bool) and b > 0 else None)
        elif op == "check_many":
            fn(policy, key if not isinstance(key, str) else [key], a)
        elif op == "admit":
            with fn(policy, key, a if isinstance(a, int) else 1, b if isinstance(b, int) else 0):
                pass
        else:
            fn(policy, key)
    except (TaskgateError, ValueError, TypeError) as e:
        assert str(e), f"{type(e).__name__} without a message"
    # the store is still consistent: a known-good call works
    assert mem.peek("r", "sane").limit == 2


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    cfg = Path(tmp_path_factory.mktemp("fuzz")) / "p.yaml"
    cfg.write_text(yaml.safe_dump({"version": 1, "limiters": POL}))
    with ServerProcess("--config", str(cfg)) as srv:
        yield srv.target


OK_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED}
text = st.one_of(st.text(max_size=40), st.text(alphabet=string.printable, min_size=1020, max_size=1200))
i64 = st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_grpc_door_random_requests(door: str, data: st.DataObject) -> None:
    with grpc.insecure_channel(door) as ch:
        stub = pbg.RateLimiterStub(ch)
        policy = data.draw(st.sampled_from(["r", "u", "", "nope"]) | st.text(max_size=20))
        call: Any
        req: Any
        rpc = data.draw(
            st.sampled_from(
                ["Check", "CheckMany", "Peek", "Forecast", "Debit", "Admit", "Release", "Heartbeat"]
            )
        )
        if rpc == "Check":
            call, req = stub.Check, pb.CheckRequest(policy=policy, key=data.draw(text), cost=data.draw(i64))
        elif rpc == "CheckMany":
            keys = data.draw(st.lists(text, max_size=5) | st.just(["k"] * 1001))
            call, req = stub.CheckMany, pb.CheckManyRequest(policy=policy, keys=keys, cost=data.draw(i64))
        elif rpc == "Peek":
            call, req = stub.Peek, pb.PeekRequest(policy=policy, key=data.draw(text))
        elif rpc == "Forecast":
            call, req = (
                stub.Forecast,
                pb.ForecastRequest(policy=policy, key=data.draw(text), cost=data.draw(i64)),
            )
        elif rpc == "Debit":
            call, req = stub.Debit, pb.DebitRequest(policy=policy, key=data.draw(text), tokens=data.draw(i64))
        elif rpc == "Admit":
            call, req = (
                stub.Admit,
                pb.AdmitRequest(
                    policy=policy, key=data.draw(text), cost=data.draw(i64), tokens=data.draw(i64)
                ),
            )
        elif rpc == "Release":
            call, req = stub.Release, pb.ReleaseRequest(lease_id=data.draw(text))
        else:
            call, req = stub.Heartbeat, pb.HeartbeatRequest(lease_ids=data.draw(st.lists(text, max_size=3)))
        try:
            call(req, timeout=5)
        except grpc.RpcError as e:
            assert e.code() in OK_CODES, (rpc, e.code(), e.details())
            assert e.details()
        # the server is still healthy and consistent
        assert stub.Peek(pb.PeekRequest(policy="r", key="sane"), timeout=5).decision.limit == 2
