"""Celery integration, fast: no real worker processes.

Eager mode (``task_always_eager``) for the gate itself, and an in-process worker thread
(``celery.contrib.testing.worker.start_worker``, solo pool) on the ``memory://`` broker where a deferral must
really be re-published. The store is the embedded ``memory://<uuid>`` (one per test). The real-worker
behaviour (prefork, RabbitMQ/Redis brokers, SIGKILL) is in ``test_celery_workers.py``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from celery.canvas import Signature
from celery.contrib.testing.worker import start_worker

import taskgate
import taskgate.celery
from taskgate.errors import BackendUnavailableError, ThrottledError
from taskgate.integrations import _gate
from taskgate.integrations._gate import AdmissionGroup

POLICIES: dict[str, Any] = {
    # 10 at once, then 10 an hour: "remaining" tells which key a task was charged to, and how much
    "quota": {"strategy": "gcra", "limit": 10, "period": "1h", "burst": 10, "bookingHorizon": 0},
    "r2": {"strategy": "gcra", "limit": 2, "period": "1s", "burst": 1},
    "r2nb": {"strategy": "gcra", "limit": 2, "period": "1s", "burst": 1, "bookingHorizon": 0},
    "hourly": {"strategy": "gcra", "limit": 1, "period": "1h", "burst": 1, "bookingHorizon": 0},
    "minute": {"strategy": "gcra", "limit": 1, "period": "1m", "burst": 1, "bookingHorizon": "2m"},
    "hourly_run": {
        "strategy": "gcra",
        "limit": 1,
        "period": "1h",
        "bookingHorizon": 0,
        "deferral": {"maxDeferrals": 1, "onExhausted": "run"},
    },
    "conc1": {"concurrency": {"maxLimit": 1, "leaseTtl": "5s"}},
    "tok": {"tokenBudget": {"budget": 1000, "windowMs": "1h"}},
    "tokdebit": {"tokenBudget": {"budget": 1000, "windowMs": "1h"}, "accounting": "debit"},
    "open": {"strategy": "gcra", "limit": 100, "period": "1s", "fail": "open"},
    "closed": {"strategy": "gcra", "limit": 100, "period": "1s", "fail": "closed"},
    "conc1_open": {"concurrency": {"maxLimit": 1, "leaseTtl": "5s"}, "fail": "open"},
}


# ----------------------------------------------------------------------------------------------- helpers


class Spy:
    """A backend wrapper: records the gate's calls (op, policy, key, cost, tokens); while ``down`` is non-zero
    those calls raise BackendUnavailableError (``down=n``: the next n calls; ``down=-1``: until reset)."""

    def __init__(self, inner: Any, down: int = 0) -> None:
        self.inner: taskgate.RedisBackend = inner
        self.down = down
        self.calls: list[tuple[str, str, str, int, int]] = []
        self.failed = 0
        self._lock = threading.Lock()

    def _note(self, op: str, policy: str, key: str, cost: int, tokens: int) -> None:
        with self._lock:
            self.calls.append((op, policy, key, cost, tokens))
            if self.down:
                self.down -= 1 if self.down > 0 else 0
                self.failed += 1
                raise BackendUnavailableError("cannot reach the store at memory://: simulated outage")

    def check(self, policy: str, key: str, cost: int = 1, **kw: Any) -> taskgate.Decision:
        self._note("check", policy, key, cost, 0)
        return self.inner.check(policy, key, cost, **kw)

    def admit(self, policy: str, key: str, cost: int = 1, tokens: int = 0, **kw: Any) -> taskgate.Admission:
        self._note("admit", policy, key, cost, tokens)
        return self.inner.admit(policy, key, cost, tokens, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Env:
    """One app + its store. ``b`` is the backend the app uses (through ``spy``)."""

    def __init__(self, eager: bool, install: bool = True, **defaults: Any) -> None:
        self.store = f"memory://{uuid.uuid4().hex}"
        self.b = taskgate.connect(self.store, POLICIES, prefix="tgu")
        self.spy = Spy(self.b)
        self.app = Celery(f"tgunit{uuid.uuid4().hex[:6]}", broker="memory://", backend="cache+memory://")
        self.app.conf.update(
            task_always_eager=eager,
            task_eager_propagates=True,
            task_default_queue=f"q-{uuid.uuid4().hex}",  # the memory transport is shared by the process
            broker_transport_options={"polling_interval": 0.02},
            worker_hijack_root_logger=False,
        )
        if install:
            taskgate.celery.install(self.app, self.spy, **defaults)

    def task(self, **opts: Any) -> Any:
        """``@app.task(...)``, not shared: each test's tasks stay in its own app (Celery adds shared tasks
        to every app it finalizes, and these tests reuse function names)."""
        return self.app.task(shared=False, **opts)

    def budget_left(self, policy: str, key: str) -> int:
        """Tokens left in the budget (a debit of 1 tells; it costs 1)."""
        return self.b.debit(policy, key, 1).remaining + 1

    def slot_free(self, policy: str, key: str = "*") -> bool:
        adm = self.b.admit(policy, key)
        adm.release()
        return adm.allowed


@pytest.fixture
def eager() -> Iterator[Env]:
    env = Env(eager=True)
    yield env
    env.b.close()


@pytest.fixture
def env() -> Iterator[Env]:
    env = Env(eager=False)
    yield env
    env.b.close()


@pytest.fixture
def republished(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every re-publish of a deferred task (its options), still published."""
    seen: list[dict[str, Any]] = []
    original = Signature.apply_async

    def spy(self: Signature, *args: Any, **kwargs: Any) -> Any:
        seen.append({**self.options, **kwargs, "task": self.task})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Signature, "apply_async", spy)
    return seen


@pytest.fixture
def signals() -> Iterator[list[tuple[str, Any, dict[str, Any]]]]:
    got: list[tuple[str, Any, dict[str, Any]]] = []

    def throttled(sender: Any = None, **kw: Any) -> None:
        got.append(("throttled", sender, kw))

    def admitted(sender: Any = None, **kw: Any) -> None:
        got.append(("admitted", sender, kw))

    taskgate.celery.task_throttled.connect(throttled, weak=False)
    taskgate.celery.task_admitted.connect(admitted, weak=False)
    yield got
    taskgate.celery.task_throttled.disconnect(throttled)
    taskgate.celery.task_admitted.disconnect(admitted)


def worker(app: Celery) -> Any:
    return start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=20)


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


# -------------------------------------------------------------------------------- declaration: options


@pytest.mark.parametrize(
    ("misspelt", "meant"),
    [
        ("throtle", "throttle"),
        ("max_deferral", "max_deferrals"),
        ("on_exhaust", "on_exhausted"),
        ("tokes", "tokens"),
        ("fair_kye", "fair_key"),
    ],
)
def test_misspelt_option_fails_at_declaration(eager: Env, misspelt: str, meant: str) -> None:
    with pytest.raises(TypeError) as e:

        @eager.task(name="unit.misspelt", throttle="quota", **{misspelt: 1})
        def f(x: int) -> int:
            return x

    msg = str(e.value)
    assert repr(misspelt) in msg
    assert f"did you mean {meant!r}" in msg
    assert "unit.misspelt" in msg


def test_misspelt_throttle_without_throttle(eager: Env) -> None:
    """``throtle=`` alone (no ``throttle=``) would silently run unthrottled: it fails too."""
    with pytest.raises(TypeError, match=r"unknown option 'throtle'; did you mean 'throttle'"):

        @eager.task(throtle="quota")
        def f(x: int) -> int:
            return x


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("throttle", 5, "policy name"),
        ("throttle", [], "policy name"),
        ("key", 3, "callable"),
        ("key", "nope", "parameters"),
        ("cost", 0, "int >= 1"),
        ("cost", True, "int >= 1"),
        ("tokens", -1, "int >= 0"),
        ("max_deferrals", -1, "int >= 0"),
        ("on_exhausted", "explode", "'fail' or 'run'"),
        ("book", "yes", "True or False"),
        ("fair_key", 3, "callable"),
        ("fair_key", "nope", "parameters"),
        ("fair_key", "", "callable"),
    ],
)
def test_bad_option_value_fails_at_declaration(eager: Env, option: str, value: object, expected: str) -> None:
    opts: dict[str, Any] = {"throttle": "quota", option: value}
    with pytest.raises(TypeError) as e:

        @eager.task(name="unit.bad", **opts)
        def f(tenant: str, prompt: str) -> str:
            return prompt

    msg = str(e.value)
    assert "'unit.bad'" in msg
    assert f"{option}={value!r}" in msg
    assert expected in msg


def test_unknown_install_option(eager: Env) -> None:
    app = Celery("x", broker="memory://")
    with pytest.raises(TypeError, match="max_deferal"):
        taskgate.celery.install(app, eager.spy, max_deferal=3)


def test_install_after_finalize_raises(eager: Env) -> None:
    app = Celery("finalized_app", broker="memory://")

    @app.task(shared=False)
    def f() -> int:
        return 1

    app.finalize()
    with pytest.raises(RuntimeError, match=r"after Celery app 'finalized_app' was finalized"):
        taskgate.celery.install(app, eager.spy)


def test_not_installed_names_the_app() -> None:
    app = Celery("bare_app", broker="memory://")
    with pytest.raises(RuntimeError, match=r"not installed on Celery app 'bare_app'"):
        taskgate.celery.runtime(app)


# ------------------------------------------------------------------------------------- keys and units


@pytest.mark.parametrize(
    "call",
    [
        lambda t, tenant: t.delay(tenant, "p"),
        lambda t, tenant: t.delay(tenant=tenant, prompt="p"),
        lambda t, tenant: t.delay(tenant, prompt="p"),
        lambda t, tenant: t.apply_async(kwargs={"prompt": "p", "tenant": tenant}),
    ],
    ids=["positional", "keywords", "mixed", "apply_async-kwargs"],
)
def test_key_callable_bound_by_signature(eager: Env, call: Callable[[Any, str], Any]) -> None:
    @eager.task(throttle="quota", key=lambda tenant: tenant)
    def summarize(tenant: str, prompt: str) -> str:
        return f"{tenant}:{prompt}"

    tenant = f"T{uuid.uuid4().hex[:6]}"
    assert call(summarize, tenant).get() == f"{tenant}:p"
    assert eager.b.peek("quota", tenant).remaining == 9
    assert eager.spy.calls == [("check", "quota", tenant, 1, 0)]


def test_key_callable_on_bound_task(eager: Env) -> None:
    """``bind=True``: the key callable gets the task's arguments, not ``self``."""

    @eager.task(bind=True, throttle="quota", key=lambda tenant: tenant)
    def summarize(self: Any, tenant: str, prompt: str) -> str:
        return str(self.request.id)

    r = summarize.delay("A", "p")
    assert r.get() == r.id
    assert eager.spy.calls == [("check", "quota", "A", 1, 0)]


def test_key_parameter_name(eager: Env) -> None:
    @eager.task(throttle="quota", key="tenant")
    def f(prompt: str, tenant: str = "dflt") -> str:
        return tenant

    assert f.delay("p", "A").get() == "A"
    assert f.delay(prompt="p", tenant="B").get() == "B"
    assert f.delay("p").get() == "dflt"  # the parameter's default is the key
    assert [c[2] for c in eager.spy.calls] == ["A", "B", "dflt"]


def test_key_with_var_keywords(eager: Env) -> None:
    @eager.task(throttle="quota", key=lambda tenant, **kw: f"{tenant}/{kw['n']}")
    def f(tenant: str, n: int) -> int:
        return n

    @eager.task(throttle="quota", key=lambda **kw: kw["tenant"])
    def g(tenant: str, n: int) -> int:
        return n

    @eager.task(throttle="quota", key="tenant")
    def h(prompt: str, **extra: Any) -> str:
        return prompt

    assert f.delay("A", 3).get() == 3
    assert f.delay(n=4, tenant="A").get() == 4
    assert g.delay("B", 5).get() == 5
    assert h.delay("p", tenant="C").get() == "p"
    assert [c[2] for c in eager.spy.calls] == ["A/3", "A/4", "B", "C"]


def test_key_callable_with_other_names(eager: Env) -> None:
    """A key callable whose parameters are not named after the task's gets the call as made: positional
    works; a keyword call it cannot take fails the task with a message naming key=."""

    @eager.task(throttle="quota", key=lambda t, p: t)
    def f(tenant: str, prompt: str) -> str:
        return prompt

    assert f.delay("A", "p").get() == "p"
    with pytest.raises(ValueError, match=r"key= callable"):
        f.delay(tenant="A", prompt="p")


@pytest.mark.parametrize("bad", [None, "", 1.5, True])
def test_key_must_give_str_or_int(eager: Env, bad: object) -> None:
    @eager.task(throttle="quota", key=lambda tenant: bad)
    def f(tenant: str) -> str:
        return tenant

    with pytest.raises(ValueError, match=r"key= gave"):
        f.delay("A")


def test_no_key_is_one_global_key(eager: Env) -> None:
    @eager.task(throttle="quota")
    def f(x: int) -> int:
        return x

    f.delay(1).get()
    assert eager.spy.calls == [("check", "quota", "*", 1, 0)]


def test_cost_and_tokens_callables(eager: Env) -> None:
    @eager.task(throttle="quota", key="tenant", cost=lambda n: n)
    def batch(tenant: str, n: int) -> int:
        return n

    @eager.task(throttle="tok", key="tenant", tokens=lambda prompt: len(prompt))
    def llm(tenant: str, prompt: str) -> int:
        return len(prompt)

    assert batch.delay("A", 3).get() == 3
    assert eager.b.peek("quota", "A").remaining == 7
    assert llm.delay(prompt="x" * 120, tenant="B").get() == 120
    assert eager.budget_left("tok", "B") == 1000 - 120  # unsettled: the estimate stands


def test_cost_callable_bad_value_fails_the_task(eager: Env) -> None:
    @eager.task(throttle="quota", cost=lambda n: n)
    def batch(n: int) -> int:
        return n

    with pytest.raises(ValueError, match=r"cost= gave 0"):
        batch.delay(0)
    assert eager.spy.calls == []


# ------------------------------------------------------------------------------- untouched / bypassed


def test_task_without_throttle_is_untouched(eager: Env) -> None:
    @eager.task()
    def plain(x: int) -> int:
        return x + 1

    @eager.task(bind=True, max_retries=3)
    def plain_bound(self: Any, x: int) -> int:
        return int(self.max_retries) + x

    assert plain.delay(1).get() == 2
    assert plain_bound.delay(1).get() == 4
    assert taskgate.celery.options_of(eager.app.tasks[plain.name]) is None
    assert not hasattr(eager.app.tasks[plain.name], "throttle")
    assert eager.spy.calls == []


def test_direct_call_bypasses_the_throttle(eager: Env) -> None:
    @eager.task(throttle="hourly", max_deferrals=0)
    def f(x: int) -> int:
        return x

    assert f.delay(1).get() == 1  # takes the only slot of the hour
    assert [f(i) for i in range(5)] == list(range(5))  # a plain function call: no gate
    assert len(eager.spy.calls) == 1
    with pytest.raises(ThrottledError):
        f.delay(2)


def test_current_outside_a_task() -> None:
    with pytest.raises(RuntimeError, match=r"no admission is held here"):
        taskgate.current()


# ----------------------------------------------------------------------------------------- eager mode


def test_eager_waits_and_asks_again(eager: Env, republished: list[dict[str, Any]]) -> None:
    """2/s, burst 1: four eager calls are spaced by the limit (>= 1.5 s), nothing is re-published."""

    @eager.task(throttle="r2")
    def f(x: int) -> int:
        return x

    t0 = time.monotonic()
    assert [f.delay(i).get() for i in range(4)] == [0, 1, 2, 3]
    elapsed = time.monotonic() - t0
    assert elapsed >= 1.4, elapsed
    assert elapsed < 5, elapsed
    assert republished == []


def test_eager_on_exhausted_fail_names_the_policy(eager: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr("taskgate.integrations.celery.time.sleep", sleeps.append)

    @eager.task(name="unit.fail3", throttle="hourly", max_deferrals=3, on_exhausted="fail")
    def f(x: int) -> int:
        return x

    assert f.delay(1).get() == 1
    with pytest.raises(ThrottledError) as e:
        f.delay(2)
    assert len(sleeps) == 3  # waited and asked again 3 times, then gave up
    assert all(s > 3000 for s in sleeps)
    msg = str(e.value)
    assert "'hourly'" in msg
    assert "unit.fail3" in msg
    assert "max_deferrals=3" in msg
    assert e.value.decision is not None
    assert not e.value.decision.allowed


def test_eager_on_exhausted_run(eager: Env) -> None:
    ran: list[int] = []

    @eager.task(throttle="hourly", max_deferrals=0, on_exhausted="run")
    def f(x: int) -> int:
        ran.append(x)
        return x

    assert [f.delay(i).get() for i in range(3)] == [0, 1, 2]
    assert ran == [0, 1, 2]


def test_exhaustion_defaults_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    """Task option > app default (install/conf) > the policy's ``deferral:`` block."""
    env = Env(eager=True, on_exhausted="fail")

    @env.task(throttle="hourly_run")  # policy says: 0 deferrals, then run; the app says fail
    def f(x: int) -> int:
        return x

    @env.task(throttle="hourly_run", key="x", on_exhausted="run")
    def g(x: int) -> int:
        return x

    sleeps: list[float] = []
    monkeypatch.setattr("taskgate.integrations.celery.time.sleep", sleeps.append)
    assert f.delay(1).get() == 1
    with pytest.raises(ThrottledError):
        f.delay(2)
    assert len(sleeps) == 1  # the policy's maxDeferrals: 1
    assert g.delay(1).get() == 1
    assert g.delay(1).get() == 1  # exhausted after one wait, then runs (task option)
    assert len(sleeps) == 2

    env2 = Env(eager=True)

    @env2.task(throttle="hourly_run")
    def h(x: int) -> int:
        return x

    assert [h.delay(i).get() for i in range(3)] == [0, 1, 2]  # the policy's block alone: run
    env2.app.conf.taskgate_on_exhausted = "fail"
    with pytest.raises(ThrottledError):
        h.delay(3)
    env2.app.conf.taskgate_max_deferrals = 0
    sleeps.clear()
    with pytest.raises(ThrottledError, match="max_deferrals=0"):
        h.delay(4)
    assert sleeps == []


# --------------------------------------------------------------------------------- token settlement


def test_settle_charges_the_actual(eager: Env) -> None:
    @eager.task(throttle="tok", key="tenant", tokens=lambda prompt: 100)
    def llm(tenant: str, prompt: str) -> int:
        group = taskgate.current()
        assert isinstance(group, AdmissionGroup)
        group.settle(30)
        return 30

    @eager.task(throttle="tok", key="tenant", tokens=lambda prompt: 100)
    def llm_usage(tenant: str, prompt: str) -> int:
        taskgate.current().settle({"prompt_tokens": 12, "completion_tokens": 8})
        return 20

    @eager.task(throttle="tok", key="tenant", tokens=100)
    def llm_unsettled(tenant: str, prompt: str) -> int:
        return 0

    llm.delay("A", "p").get()
    assert eager.budget_left("tok", "A") == 1000 - 30
    llm_usage.delay("B", "p").get()
    assert eager.budget_left("tok", "B") == 1000 - 20
    llm_unsettled.delay("C", "p").get()
    assert eager.budget_left("tok", "C") == 1000 - 100  # the reservation stays charged


def test_settle_debit_accounting(eager: Env) -> None:
    @eager.task(throttle="tokdebit", key="tenant", tokens=100)
    def llm(tenant: str, settle: int | None) -> int:
        if settle is not None:
            taskgate.current().settle(settle)
        return 0

    llm.delay("A", 250).get()
    assert eager.budget_left("tokdebit", "A") == 1000 - 250
    llm.delay("B", None).get()
    assert eager.budget_left("tokdebit", "B") == 1000 - 100  # unsettled: the estimate is debited


def test_settle_twice_and_settle_without_budget(eager: Env) -> None:
    @eager.task(throttle="tok", tokens=10)
    def twice() -> None:
        taskgate.current().settle(5)
        taskgate.current().settle(5)

    @eager.task(throttle="conc1")
    def no_budget() -> None:
        taskgate.current().settle(5)

    with pytest.raises(RuntimeError, match="already settled"):
        twice.delay()
    with pytest.raises(ValueError, match="no policy with a tokenBudget"):
        no_budget.delay()


def test_budget_exhausted_defers(eager: Env) -> None:
    @eager.task(name="unit.big", throttle="tok", tokens=600, max_deferrals=0)
    def llm() -> int:
        return 1

    assert llm.delay().get() == 1
    with pytest.raises(ThrottledError, match=r"'tok' \(cost\)"):
        llm.delay()


# ------------------------------------------------------------------------------------ several policies


def test_all_policies_must_admit_concurrency_denies(eager: Env) -> None:
    hog = eager.b.admit("conc1", "*")
    assert hog.allowed

    @eager.task(throttle=["quota", "conc1"], max_deferrals=0)
    def f(x: int) -> int:
        return x

    with pytest.raises(ThrottledError, match=r"'conc1' \(concurrency\)"):
        f.delay(1)
    assert eager.b.peek("quota", "*").remaining == 10  # the rate was not consumed
    hog.release()
    assert f.delay(2).get() == 2
    assert eager.b.peek("quota", "*").remaining == 9


def test_denial_by_rate_releases_the_concurrency_slot(eager: Env) -> None:
    """Admit policies are asked first; when the rate policy then denies, the slot taken is given back."""

    @eager.task(throttle=["hourly", "conc1"], max_deferrals=0)
    def f(x: int) -> int:
        assert not eager.slot_free("conc1")  # held while the body runs
        return x

    assert f.delay(1).get() == 1
    assert eager.slot_free("conc1")
    with pytest.raises(ThrottledError, match=r"'hourly' \(rate\)"):
        f.delay(2)
    assert [c[:2] for c in eager.spy.calls[-2:]] == [("admit", "conc1"), ("check", "hourly")]
    assert eager.slot_free("conc1")  # the slot admitted before the denial was released


def test_denial_by_budget_releases_the_concurrency_slot(eager: Env) -> None:
    @eager.task(throttle=["conc1", "tok"], tokens=lambda n: n, max_deferrals=0)
    def f(n: int) -> int:
        return n

    assert f.delay(900).get() == 900
    with pytest.raises(ThrottledError, match=r"'tok'"):
        f.delay(200)
    assert eager.slot_free("conc1")
    assert eager.budget_left("tok", "*") == 100  # the denied reservation was not charged


def test_body_exception_releases_the_slot(eager: Env) -> None:
    @eager.task(throttle="conc1")
    def boom() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        boom.delay()
    assert eager.slot_free("conc1")


# ------------------------------------------------------------------------------------------ fail modes


def test_fail_open_runs_the_task(eager: Env) -> None:
    eager.spy.down = -1

    @eager.task(throttle="open")
    def f(x: int) -> bool:
        group = taskgate.current()
        assert isinstance(group, AdmissionGroup)
        group.settle(5)  # nothing to settle against; no error
        return group.fail_open

    assert f.delay(1).get() is True
    assert eager.spy.failed == 1


def test_fail_open_needs_every_policy_open(eager: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """One ``fail: closed`` policy among the task's makes it defer (and a failure releases what was held)."""
    monkeypatch.setattr(_gate, "OUTAGE_BACKOFF_MS", (50,))

    @eager.task(throttle=["open", "conc1_open", "closed"])
    def f(x: int) -> int:
        return x

    eager.spy.down = 3
    t0 = time.monotonic()
    assert f.delay(1).get() == 1
    assert time.monotonic() - t0 >= 0.15
    assert eager.spy.failed == 3
    assert eager.slot_free("conc1_open")


def test_fail_closed_eager_waits_and_retries(eager: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gate, "OUTAGE_BACKOFF_MS", (100, 200))
    eager.spy.down = 2

    @eager.task(throttle="closed", max_deferrals=0)  # an outage never exhausts the deferrals
    def f(x: int) -> int:
        return x

    t0 = time.monotonic()
    assert f.delay(7).get() == 7
    assert time.monotonic() - t0 >= 0.3
    assert eager.spy.failed == 2
    assert len(eager.spy.calls) == 3


def test_fail_closed_worker_republishes_until_the_store_is_back(
    env: Env,
    monkeypatch: pytest.MonkeyPatch,
    republished: list[dict[str, Any]],
    signals: list[tuple[str, Any, dict[str, Any]]],
) -> None:
    monkeypatch.setattr(_gate, "OUTAGE_BACKOFF_MS", (100, 200))
    env.spy.down = 2

    @env.task(bind=True, throttle="closed", max_deferrals=0)
    def f(self: Any, x: int) -> tuple[int, int]:
        return x, int(self.request.retries)

    with worker(env.app):
        r = f.delay(7)
        assert tuple(r.get(timeout=20)) == (7, 0)
    assert env.spy.failed == 2
    assert [o["countdown"] for o in republished] == [0.1, 0.2]
    assert all(o["task_id"] == r.id for o in republished)
    assert [o["headers"]["taskgate"]["outages"] for o in republished] == [1, 2]
    throttled = [kw for kind, _, kw in signals if kind == "throttled"]
    assert [(kw["policy"], kw["axis"], kw["decision"]) for kw in throttled] == [
        ("closed", "unavailable", None)
    ] * 2


# ---------------------------------------------------------------------------------- worker: deferral


def test_worker_defers_by_republishing(
    env: Env, republished: list[dict[str, Any]], signals: list[tuple[str, Any, dict[str, Any]]]
) -> None:
    @env.task(bind=True, throttle="r2nb", max_retries=1)
    def f(self: Any, x: int) -> tuple[int, str, int]:
        return x, str(self.request.id), int(self.request.retries)

    with worker(env.app):
        t0 = time.monotonic()
        rs = [f.delay(i) for i in range(4)]
        out = [tuple(r.get(timeout=20)) for r in rs]
        elapsed = time.monotonic() - t0
    assert out == [(i, r.id, 0) for i, r in enumerate(rs)]  # same ids; retries untouched
    assert elapsed >= 1.4, elapsed
    assert republished, "some tasks were meant to be deferred"
    assert {o["task_id"] for o in republished} <= {r.id for r in rs}
    for o in republished:
        assert 0 < o["countdown"] <= 0.5 + 0.05 + 0.01  # retry_after + jitter
        assert o["retries"] == 0
    # signals
    throttled = [(s, kw) for kind, s, kw in signals if kind == "throttled"]
    admitted = [(s, kw) for kind, s, kw in signals if kind == "admitted"]
    assert len(throttled) == len(republished)
    assert sorted(kw["task_id"] for _, kw in admitted) == sorted(r.id for r in rs)
    for sender, kw in throttled:
        assert sender.name == f.name
        assert set(kw) == {"signal", "task_id", "policy", "axis", "countdown", "deferrals", "decision"}
        assert kw["policy"] == "r2nb"
        assert kw["axis"] == "rate"
        assert kw["deferrals"] >= 1
        assert isinstance(kw["decision"], taskgate.Decision)
        assert not kw["decision"].allowed
        assert kw["countdown"] > 0
    per_task = {kw["task_id"]: kw["deferrals"] for _, kw in throttled}
    for sender, kw in admitted:
        assert sender.name == f.name
        assert set(kw) == {"signal", "task_id", "policies", "deferrals"}
        assert kw["policies"] == ("r2nb",)
        assert kw["deferrals"] == per_task.get(kw["task_id"], 0)


def test_worker_booked_slot_comes_back_once(env: Env, republished: list[dict[str, Any]]) -> None:
    """gcra with booking: a denied task books its slot and is re-published exactly once, to that slot."""

    @env.task(throttle="r2")
    def f(x: int) -> int:
        return x

    with worker(env.app):
        rs = [f.delay(i) for i in range(4)]
        assert [r.get(timeout=20) for r in rs] == [0, 1, 2, 3]
    ids = [o["task_id"] for o in republished]
    assert len(ids) == len(set(ids)) == 3  # one hop each
    for o in republished:
        assert o["headers"]["taskgate"]["bookings"].keys() == {"r2"}


def test_countdown_capped_below_visibility_timeout(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.app.conf.broker_transport_options = {"visibility_timeout": 10, "polling_interval": 0.02}
    captured: list[dict[str, Any]] = []

    def capture(self: Signature, *args: Any, **kwargs: Any) -> None:
        captured.append({**self.options, **kwargs})

    monkeypatch.setattr(Signature, "apply_async", capture)

    @env.task(throttle="minute")  # a denial waits ~60 s (and books its slot)
    def f(x: int) -> int:
        return x

    with worker(env.app):
        first = f.delay(1)
        assert first.get(timeout=20) == 1
        second = f.delay(2)
        wait_for(lambda: bool(captured))
    (o,) = captured
    assert o["task_id"] == second.id
    assert o["countdown"] == 5.0  # min(retry_after ~60 s, visibility_timeout / 2)
    state = o["headers"]["taskgate"]
    assert state["deferrals"] == 1
    assert "minute" in state["bookings"]  # the booked slot travels; it will be re-deferred until then


def test_max_countdown_settings(env: Env) -> None:
    rt = taskgate.celery.runtime(env.app)
    assert rt.max_countdown_s() == 600.0  # memory:// / amqp: below RabbitMQ's consumer timeout
    env.app.conf.broker_url = "redis://127.0.0.1:6379/5"
    assert rt.max_countdown_s() == 1800.0  # Redis default visibility timeout is 1 h
    env.app.conf.broker_transport_options = {"visibility_timeout": 10}
    assert rt.max_countdown_s() == 5.0
    env.app.conf.broker_transport_options = {"visibility_timeout": 1}
    assert rt.max_countdown_s() == 1.0
    env.app.conf.taskgate_max_countdown = 2
    assert rt.max_countdown_s() == 2.0


def test_worker_exhausted_fail_marks_the_task_failed(env: Env) -> None:
    @env.task(throttle="hourly", max_deferrals=0)
    def f(x: int) -> int:
        return x

    with worker(env.app):
        assert f.delay(1).get(timeout=20) == 1
        r = f.delay(2)
        with pytest.raises(ThrottledError, match="'hourly'"):
            r.get(timeout=20)
        assert r.state == "FAILURE"


# ----------------------------------------------------------------------------- base class alternative


def test_throttled_task_base_class_with_configure(monkeypatch: pytest.MonkeyPatch) -> None:
    env = Env(eager=True, install=False)
    app = Celery(
        f"tgcls{uuid.uuid4().hex[:6]}",
        broker="memory://",
        backend="cache+memory://",
        task_cls="taskgate.celery:ThrottledTask",
    )
    app.conf.update(
        task_always_eager=True,
        task_eager_propagates=True,
        task_default_queue=f"q-{uuid.uuid4().hex}",
        broker_transport_options={"polling_interval": 0.02},
    )
    taskgate.celery.configure(app, env.spy, max_deferrals=0)

    with pytest.raises(TypeError, match="did you mean 'throttle'"):

        @app.task(shared=False, throtle="hourly")
        def bad(x: int) -> int:
            return x

    @app.task(shared=False, throttle="hourly", key=lambda tenant: tenant)
    def f(tenant: str, x: int) -> int:
        return x

    @app.task(shared=False, bind=True)
    def plain(self: Any, x: int) -> str:
        return str(self.request.id)

    assert isinstance(app.tasks[f.name], taskgate.celery.ThrottledTask)
    assert f.delay("A", 1).get() == 1
    with pytest.raises(ThrottledError, match="max_deferrals=0"):
        f.delay("A", 2)
    assert f.delay("B", 3).get() == 3
    r = plain.delay(1)
    assert r.get() == r.id
    assert f("A", 4) == 4  # direct call
    assert [c[2] for c in env.spy.calls] == ["A", "A", "B"]

    # and on a worker: deferred by re-publishing, then runs
    app.conf.task_always_eager = False
    seen: list[str] = []
    original = Signature.apply_async

    def spy(self: Signature, *args: Any, **kwargs: Any) -> Any:
        seen.append(str(self.options.get("task_id")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Signature, "apply_async", spy)

    @app.task(shared=False, throttle="r2nb", max_deferrals=100)
    def g(x: int) -> int:
        return x

    with worker(app):
        rs = [g.delay(i) for i in range(3)]
        assert [r.get(timeout=20) for r in rs] == [0, 1, 2]
    assert seen
    assert set(seen) <= {r.id for r in rs}
    env.b.close()


# ------------------------------------------------------------------------------ regressions (bugs fixed)


def test_install_survives_config_from_object(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``install()`` then ``app.config_from_object(...)`` (a common order) replaced the configuration that
    held taskgate's task annotation: every task ran unthrottled, silently. Both orders, and the user's own
    annotations from the config module, must survive."""
    (tmp_path / "tgunit_celeryconfig.py").write_text(
        "task_always_eager = True\ntask_eager_propagates = True\ntask_annotations = {'*': {'mine': 42}}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    b = taskgate.connect(f"memory://{uuid.uuid4().hex}", POLICIES)
    for order in ("install-first", "config-first", "configured-install-first"):
        app = Celery(f"tgcfg{uuid.uuid4().hex[:6]}", broker="memory://")
        if order == "configured-install-first":
            app.conf.task_default_queue = "x"  # read and written: the configuration is loaded
            assert app.conf.task_default_queue == "x"
        if order != "config-first":
            taskgate.celery.install(app, b, max_deferrals=0)
        app.config_from_object("tgunit_celeryconfig")
        if order == "config-first":
            taskgate.celery.install(app, b, max_deferrals=0)

        @app.task(shared=False, throttle="hourly", key=lambda x: order)
        def f(x: int) -> int:
            return x

        assert app.conf.task_always_eager
        assert f.delay(1).get(timeout=5) == 1
        with pytest.raises(ThrottledError):
            f.delay(2).get(timeout=5)
        assert app.tasks[f.name].mine == 42  # the config's own annotation applies too
        assert len(app.conf.task_annotations) == 2
    b.close()


def test_throttled_task_base_without_configure_leaves_plain_tasks_alone() -> None:
    """``task_cls=ThrottledTask`` on an app where configure() was not (yet) called: tasks without
    ``throttle=`` run (they used to fail: "taskgate is not installed"); throttled ones fail naming the app."""
    app = Celery(
        f"tgbare{uuid.uuid4().hex[:6]}", broker="memory://", task_cls="taskgate.celery:ThrottledTask"
    )
    app.conf.update(task_always_eager=True, task_eager_propagates=True)

    @app.task(shared=False)
    def plain(x: int) -> int:
        return x + 1

    @app.task(shared=False, throttle="hourly")
    def throttled(x: int) -> int:
        return x

    assert plain.delay(1).get() == 2
    with pytest.raises(RuntimeError, match="not installed"):
        throttled.delay(1)


def test_on_exhausted_run_body_can_settle(eager: Env) -> None:
    """A body written with ``taskgate.current().settle(...)`` still works when it runs by on_exhausted="run"
    (it used to raise "no admission is held here")."""

    @eager.task(throttle="tok", tokens=600, max_deferrals=0, on_exhausted="run")
    def llm(settle: bool) -> int:
        if settle:
            assert taskgate.current().settle(10) == []  # nothing was admitted: nothing to settle
        return 1

    assert llm.delay(False).get() == 1  # holds 600 of 1000
    assert llm.delay(True).get() == 1  # 600 more does not fit: exhausted at once, runs anyway
    assert eager.budget_left("tok", "*") == 400


def test_outages_do_not_use_up_max_deferrals(eager: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Waits for the store (fail: closed) are not throttle deferrals: a task with max_deferrals=1 that waited
    out 3 outages still gets its one throttle deferral."""
    sleeps: list[float] = []
    monkeypatch.setattr("taskgate.integrations.celery.time.sleep", sleeps.append)
    monkeypatch.setattr(_gate, "OUTAGE_BACKOFF_MS", (1,))

    @eager.task(throttle="hourly", max_deferrals=1)
    def f(x: int) -> int:
        return x

    assert f.delay(1).get() == 1
    eager.spy.down = 3
    with pytest.raises(ThrottledError, match=r"deferred 1 times"):
        f.delay(2)
    assert sleeps[:3] == [0.001] * 3
    assert len(sleeps) == 4  # 3 outages + 1 throttle deferral


def test_eager_waits_fire_task_throttled(eager: Env, signals: list[tuple[str, Any, dict[str, Any]]]) -> None:
    @eager.task(throttle="r2nb")
    def f(x: int) -> int:
        return x

    assert [f.delay(i).get() for i in range(2)] == [0, 1]
    kinds = [k for k, _, _ in signals]
    assert kinds == ["admitted", "throttled", "admitted"]
    _, sender, kw = signals[1]
    assert sender.name == f.name
    assert kw["policy"] == "r2nb"
    assert kw["axis"] == "rate"
    assert kw["deferrals"] == 1
    assert 0.25 < kw["countdown"] <= 0.56
    assert signals[2][2]["deferrals"] == 1


def test_install_with_the_apps_own_annotations() -> None:
    """Celery applies only the first ``'*'`` annotation: taskgate's used to be appended after the app's own
    ``'*'`` entry and was then ignored (tasks ran unthrottled). Both apply now, and per-task entries too."""
    b = taskgate.connect(f"memory://{uuid.uuid4().hex}", POLICIES)
    app = Celery(f"tgann{uuid.uuid4().hex[:6]}", broker="memory://")
    app.conf.update(
        task_always_eager=True,
        task_eager_propagates=True,
        task_annotations=[{"unit.ann": {"per_task": 1}}, {"*": {"star": 2}}, {"*": {"hidden": 3}}],
    )
    taskgate.celery.install(app, b, max_deferrals=0)

    @app.task(shared=False, name="unit.ann", throttle="hourly")
    def f(x: int) -> int:
        return x

    assert f.delay(1).get() == 1
    with pytest.raises(ThrottledError):
        f.delay(2)
    t = app.tasks["unit.ann"]
    assert (t.per_task, t.star) == (1, 2)
    assert not hasattr(t, "hidden")  # Celery's rule (first '*' wins) is unchanged
    b.close()
