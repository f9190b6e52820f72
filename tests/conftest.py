"""Fixtures that follow the CI rule: a test that needs a real service skips locally with a message saying what
to start, and FAILS when CI=true (CI must exercise the real Redis and RabbitMQ)."""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import taskgate

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REDIS_URL = os.environ.get("TASKGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
AMQP_URL = os.environ.get("TASKGATE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
ROOT = Path(__file__).resolve().parents[1]
# ThrottleKit's conformance vectors, vendored (contract/VENDORED.json: source, version, sha256)
VECTORS = ROOT / "contract" / "golden-vectors.json"


def require(ok: bool, what: str, fix: str) -> None:
    """Skip (locally) or fail (CI=true) when a service or file the test needs is missing."""
    if ok:
        return
    msg = f"{what} is not available: {fix}"
    if CI:
        pytest.fail(f"CI=true and {msg}", pytrace=False)
    pytest.skip(msg)


def redis_up(url: str = REDIS_URL) -> bool:
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        return True
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def tcp_up(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> str:
    require(redis_up(), f"Redis at {REDIS_URL}", "start redis-server on 127.0.0.1:6379")
    return REDIS_URL


@pytest.fixture(scope="session")
def amqp_url() -> str:
    require(tcp_up("127.0.0.1", 5672), "RabbitMQ at 127.0.0.1:5672", "run `rabbitmq-server -detached`")
    return AMQP_URL


@pytest.fixture(scope="session")
def vectors() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS.read_text())
    return data


# The reference implementation: ThrottleKit's own Lua scripts and descriptor, from the throttlekit-py wheel.
# Test-only and installed without its dependencies (it pins protobuf<7, taskgate[grpc] needs protobuf>=7), so
# it is not in the dev extra: scripts/test installs tests/reference-requirements.txt with --no-deps.
THROTTLEKIT_PY_VERSION = "0.5.1"


@pytest.fixture(scope="session")
def throttlekit_py() -> Path:
    """The installed throttlekit-py package directory (found, never imported)."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("throttlekit")
    fix = "run scripts/test, or pip install --no-deps -r tests/reference-requirements.txt"
    require(spec is not None and spec.origin is not None, "throttlekit-py (the reference)", fix)
    assert spec is not None
    assert spec.origin is not None
    version = importlib.metadata.version("throttlekit-py")
    require(
        version == THROTTLEKIT_PY_VERSION, f"throttlekit-py {THROTTLEKIT_PY_VERSION} (found {version})", fix
    )
    return Path(spec.origin).parent


@pytest.fixture
def prefix() -> str:
    return f"tgt{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    """A 3-master Redis Cluster on loopback (ports 7100-7102, or from ``TASKGATE_TEST_CLUSTER_PORT``), started
    once for the session."""
    import shutil

    from tests.redis_cluster import Cluster

    require(
        shutil.which("redis-server") is not None,
        "redis-server",
        "install Redis (apt-get install redis-server)",
    )
    cluster = Cluster()
    try:
        cluster.start()
    except Exception as e:
        cluster.stop()
        ports = f"{cluster.ports[0]}-{cluster.ports[-1]}"
        require(False, f"a Redis Cluster on 127.0.0.1:{ports}", f"it could not start: {e}")
    yield cluster.url
    cluster.stop()


@pytest.fixture(params=["memory", "redis", "cluster"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The decision tests run on the embedded store, the real Redis and a Redis Cluster."""
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}"
    url: str = request.getfixturevalue("redis_url" if request.param == "redis" else "cluster_url")
    return url


@pytest.fixture
def connect(store_url: str, prefix: str) -> Iterator[Any]:
    made: list[taskgate.RedisBackend] = []

    def make(policies: Any) -> taskgate.RedisBackend:
        b = taskgate.connect(store_url, policies, prefix=prefix)
        assert isinstance(b, taskgate.RedisBackend)  # store_url is memory:// or redis://
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()
