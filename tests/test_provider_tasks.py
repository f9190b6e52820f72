"""The provider from inside a task: ``taskgate.current().report(...)``, SDK rate-limit errors recognised in
the gate's shared path (``AdmissionGroup.__exit__``), the task that hit a 429 deferred (not failed, retries
untouched) and the cap on such deferrals. Celery on an in-process worker (memory:// broker, solo pool), the
embedded ``memory://`` store, as in ``test_celery_unit.py``."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery.canvas import Signature
from celery.contrib.testing.worker import start_worker

import taskgate
import taskgate.celery
from taskgate.engine.keys import keyset
from taskgate.errors import ThrottledError
from taskgate.integrations._gate import AdmissionGroup

POLICIES: dict[str, Any] = {
    "llm": {
        "strategy": "gcra",
        "limit": 100,
        "period": "1s",
        "burst": 100,
        "bookingHorizon": 0,
        "concurrency": {"minLimit": 1, "maxLimit": 8, "leaseTtl": "30s"},
        "provider": {"maxDeferrals": 3},
    },
    "capped": {
        "strategy": "gcra",
        "limit": 100,
        "period": "1s",
        "burst": 100,
        "provider": {"maxDeferrals": 1},
    },
}


class _Resp:
    def __init__(self, headers: dict[str, str]) -> None:
        self.status_code = 429
        self.headers = headers


class RateLimitError(Exception):
    """The shape of ``openai.RateLimitError`` / ``anthropic.RateLimitError`` (duck-typed: no SDK needed)."""

    def __init__(self, retry_after: str = "0.3", code: str | None = None) -> None:
        super().__init__("Error code: 429 - rate limit reached")
        self.response = _Resp({"retry-after": retry_after, "x-ratelimit-remaining-requests": "0"})
        self.status_code = 429
        self.code = code


class Env:
    def __init__(self, eager: bool) -> None:
        b = taskgate.connect(f"memory://{uuid.uuid4().hex}", POLICIES, prefix="tgp")
        assert isinstance(b, taskgate.RedisBackend)
        self.b = b
        self.app = Celery(f"tgprov{uuid.uuid4().hex[:6]}", broker="memory://", backend="cache+memory://")
        self.app.conf.update(
            task_always_eager=eager,
            task_eager_propagates=True,
            task_default_queue=f"q-{uuid.uuid4().hex}",
            broker_transport_options={"polling_interval": 0.02},
            worker_hijack_root_logger=False,
        )
        taskgate.celery.install(self.app, self.b)
        self.attempts: dict[str, int] = {}
        self.lock = threading.Lock()

    def task(self, **opts: Any) -> Any:
        return self.app.task(shared=False, **opts)

    def attempt(self, name: str) -> int:
        with self.lock:
            self.attempts[name] = self.attempts.get(name, 0) + 1
            return self.attempts[name]

    def reported_429s(self, policy: str, key: str) -> int:
        raw = self.b.client.hget(keyset(self.b.prefix, self.b.policy(policy), key).provider, "n")
        return int(raw or 0)


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env(eager=False)
    yield e
    e.b.close()


@pytest.fixture
def eager() -> Iterator[Env]:
    e = Env(eager=True)
    yield e
    e.b.close()


@pytest.fixture
def republished(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    original = Signature.apply_async

    def spy(self: Signature, *args: Any, **kwargs: Any) -> Any:
        seen.append({**self.options, **kwargs})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Signature, "apply_async", spy)
    return seen


@pytest.fixture
def throttled() -> Iterator[list[dict[str, Any]]]:
    got: list[dict[str, Any]] = []

    def on(sender: Any = None, **kw: Any) -> None:
        got.append(kw)

    taskgate.celery.task_throttled.connect(on, weak=False)
    yield got
    taskgate.celery.task_throttled.disconnect(on)


def worker(app: Celery) -> Any:
    return start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20)


def test_an_sdk_rate_limit_error_defers_the_task_and_holds_the_key(
    env: Env, republished: list[dict[str, Any]], throttled: list[dict[str, Any]]
) -> None:
    @env.task(bind=True, throttle="llm", key=lambda tenant: tenant, max_retries=0)
    def call(self: Any, tenant: str) -> tuple[int, int]:
        if env.attempt(self.request.id) == 1:
            raise RateLimitError("0.3")  # no user code: the gate recognises it
        return int(self.request.retries), env.attempts[self.request.id]

    with worker(env.app):
        r = call.delay("acme")
        assert tuple(r.get(timeout=20)) == (0, 2)  # not failed, retries untouched, ran twice
    assert env.reported_429s("llm", "acme") == 1  # the fleet-wide hold was written once
    (o,) = republished
    assert o["task_id"] == r.id
    assert 0.29 <= o["countdown"] <= 0.3 + 0.05 + 0.01  # the hold left + jitter
    assert o["headers"]["taskgate"]["provider"] == 1
    assert o["headers"]["taskgate"]["deferrals"] == 0  # max_deferrals is not used up
    (kw,) = throttled
    assert (kw["policy"], kw["axis"], kw["decision"]) == ("llm", "provider", None)


def test_report_from_the_body_then_raise_defers(env: Env, republished: list[dict[str, Any]]) -> None:
    @env.task(bind=True, throttle="llm", key=lambda tenant: tenant)
    def call(self: Any, tenant: str) -> str:
        if env.attempt(self.request.id) == 1:
            got = taskgate.current().report(status=429, retry_after=0.2)
            assert [g.retry_after_ms for g in got] == [200]  # type: ignore[attr-defined]
            raise RuntimeError("my own client's error after a 429")
        return "ok"

    with worker(env.app):
        assert call.delay("acme").get(timeout=20) == "ok"
    assert len(republished) == 1


def test_provider_deferrals_are_capped_with_a_clear_error(env: Env) -> None:
    @env.task(bind=True, throttle="capped", key=lambda tenant: tenant)
    def call(self: Any, tenant: str) -> None:
        env.attempt(self.request.id)
        raise RateLimitError("0.05")

    with worker(env.app):
        r = call.delay("acme")
        with pytest.raises(ThrottledError, match=r"refused by the provider \(429\) 2 times.*maxDeferrals=1"):
            r.get(timeout=20)
        assert r.state == "FAILURE"
    assert env.attempts[r.id] == 2
    assert env.reported_429s("capped", "acme") == 2


@pytest.mark.parametrize("error", [ValueError("a bug"), RateLimitError(code="insufficient_quota")])
def test_other_errors_still_fail_the_task(env: Env, error: Exception) -> None:
    @env.task(bind=True, throttle="llm", key=lambda tenant: tenant)
    def call(self: Any, tenant: str) -> None:
        env.attempt(self.request.id)
        raise error

    with worker(env.app):
        r = call.delay("acme")
        with pytest.raises(type(error)):
            r.get(timeout=20)
    assert env.attempts[r.id] == 1
    assert env.reported_429s("llm", "acme") == 0


def test_eager_reports_and_raises_the_providers_error(eager: Env) -> None:
    @eager.task(throttle="llm", key=lambda tenant: tenant)
    def call(tenant: str) -> None:
        raise RateLimitError("30")

    with pytest.raises(RateLimitError):
        call.delay("acme")
    d = eager.b.admit("llm", "acme")
    assert (d.allowed, d.binding_axis) == (False, "provider")
    assert 29_000 < d.retry_after_ms <= 30_000


def test_success_with_headers_paces_the_key(eager: Env) -> None:
    @eager.task(throttle="llm", key=lambda tenant: tenant)
    def call(tenant: str) -> list[Any]:
        return taskgate.current().report({"x-ratelimit-limit-requests": "120"})  # type: ignore[return-value]

    (r,) = call.delay("acme").get()
    assert (r.provider_limit, r.pacing_interval_ms, r.hold_until) == (120, 500.0, 0)


def test_plain_admission_reports_an_sdk_error_once(eager: Env) -> None:
    b = eager.b
    with pytest.raises(RateLimitError), b.admit("llm", "k") as adm:
        raise RateLimitError("1")
    assert adm.rate_limited is not None
    assert adm.rate_limited.concurrency_limit == 6  # 8 x 0.75 once: the release was not counted a drop
    assert b.report("llm", "k", {}).concurrency_limit == 6


def test_without_provider_deferral_the_error_stands_and_the_key_is_held(eager: Env) -> None:
    """A group made without provider deferral (defer_on_429=False): the hold is written, the error stands."""
    g = AdmissionGroup([], backend=eager.b, key="k", policies=["llm"])  # defer_on_429=False
    with pytest.raises(RateLimitError), g:
        raise RateLimitError("5")
    assert eager.b.admit("llm", "k").binding_axis == "provider"
    assert eager.reported_429s("llm", "k") == 1


def test_group_report_names_a_bad_policy(eager: Env) -> None:
    g = AdmissionGroup([], backend=eager.b, key="k", policies=["llm"])
    with pytest.raises(ValueError, match=r"report\(policy='nope'\): this task holds \['llm'\]"):
        g.report(status=429, policy="nope")
    with pytest.raises(RuntimeError, match="admitted without the store"):
        AdmissionGroup([], fail_open=True).report(status=429)


def test_malformed_headers_never_raise_in_the_task(eager: Env, caplog: pytest.LogCaptureFixture) -> None:
    """Malformed or absurd values are ignored, one debug line each; the task goes on (no hold, no pacing)."""
    bad = {
        "retry-after-ms": "1e999",
        "retry-after": "soon",
        "x-ratelimit-limit-requests": "-5",
        "x-ratelimit-remaining-requests": "lots",
        "x-ratelimit-reset-requests": "6 minutes",
        "x-ratelimit-reset-tokens": "9999999h",
        "anthropic-ratelimit-requests-reset": "yesterday",
        "RateLimit": ";;;,,,",
    }

    @eager.task(throttle="llm", key=lambda tenant: tenant)
    def call(tenant: str) -> list[Any]:
        return taskgate.current().report(bad)  # type: ignore[return-value]

    with caplog.at_level(logging.DEBUG, logger="taskgate"):
        (r,) = call.delay("acme").get()
    assert (r.hold_until, r.provider_limit, r.pacing_interval_ms, r.rate_limited) == (0, 0, 0.0, 0)
    ignored = [
        x.getMessage() for x in caplog.records if "ignored (malformed or out of range)" in x.getMessage()
    ]
    for name in [n.lower() for n in bad if n != "RateLimit"]:
        assert len([m for m in ignored if f"provider {name} " in m]) == 1, (name, ignored)
    assert len(ignored) == 7
    assert eager.b.admit("llm", "acme").allowed
