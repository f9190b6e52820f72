"""Celery integration: ``@app.task(throttle="llm", key=...)``, decided by the engine before the body runs.

::

    app = Celery("app", broker="amqp://guest@localhost//")
    taskgate.celery.install(app, "redis://localhost:6379/0", policies="taskgate.yaml")

    @app.task(throttle="llm", key=lambda tenant, prompt: tenant, tokens=lambda tenant, prompt: 800)
    def summarize(tenant, prompt): ...

How it works (see ``shared/research/integration-mechanics.md`` for the experiments behind each choice):

- ``install`` adds a ``@__call__`` task annotation, so it wraps every task of the app that declares
  ``throttle=``; it must run before the app is finalized (before tasks are used). Or use
  ``Celery(..., task_cls="taskgate.celery:ThrottledTask")`` and :func:`configure`.
- Before the body, one gate decision (``admit`` for concurrency/budgets, ``check`` for rate) per try.
  Admitted: the body runs holding its slot (heartbeat thread), released in ``finally`` (``dropped=True``
  if the body raised), tokens settled from ``taskgate.current().settle(usage)`` (unsettled: the estimate
  stands).
- Denied: the same task (same id, chain, chord, links, headers, queue, priority and ``retries``) is
  re-published with ``signature_from_request`` and a countdown = ``retry_after_ms`` (+ jitter), capped below
  the broker's visibility timeout, then ``Ignore()``. Never ``retry()`` (it burns ``max_retries``), never
  ``Reject``. A booked rate slot travels in the ``taskgate`` header: the task comes back once, at its slot,
  already paid on the rate axis.
- ``task_prerun``/``task_postrun`` fire on every deferred attempt too (state IGNORED); use our signals
  :data:`task_throttled` and :data:`task_admitted` for metrics.
- Eager mode (``task_always_eager``): no re-publish; the caller waits ``retry_after`` and asks again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

try:
    from celery import Celery, Task
    from celery.app.annotations import prepare as prepare_annotations
    from celery.exceptions import Ignore, Reject, Retry
    from celery.utils.dispatch import Signal
    from celery.utils.functional import firstmethod
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(f"taskgate.celery needs Celery: pip install 'taskgate[celery]' ({e})") from e

from taskgate.errors import ThrottledError
from taskgate.integrations._gate import (
    AdmissionGroup,
    Admitted,
    DeferralState,
    Deferred,
    Gate,
    ProviderDeferred,
)
from taskgate.integrations.options import OPTION_NAMES, ThrottleOptions, check_option_names, parse_options
from taskgate.policy import PolicySource

__all__ = ["HEADER", "ThrottledTask", "configure", "install", "task_admitted", "task_throttled"]

log = logging.getLogger("taskgate")
HEADER = "taskgate"
_CLEAN_EXC = (Ignore, Reject, Retry)

task_throttled = Signal(
    name="task_throttled", providing_args={"task_id", "policy", "axis", "countdown", "deferrals", "decision"}
)
task_admitted = Signal(name="task_admitted", providing_args={"task_id", "policies", "deferrals"})


class _Runtime:
    """Per app: the backend (one per process, made lazily: prefork-safe), the gate and the defaults."""

    def __init__(self, app: Celery, backend: Any, policies: PolicySource, defaults: dict[str, Any]) -> None:
        self.app = app
        self._spec = backend
        self._policies = policies
        self._backend: Any = None
        self._pid = -1
        self._lock = threading.Lock()
        self.defaults = defaults
        short = int(defaults.get("short_wait_ms", 250))
        self.gate = Gate(self.backend_now, short_wait_ms=short, provider_deferral=True)
        self._options: dict[type[Any], ThrottleOptions | None] = {}

    def backend_now(self) -> Any:
        if self._backend is None or self._pid != os.getpid():
            with self._lock:
                if self._backend is None or self._pid != os.getpid():
                    from taskgate.backends import connect

                    if isinstance(self._spec, str) or self._spec is None:
                        self._backend = connect(self._spec, self._policies)
                    else:
                        self._backend = self._spec
                    self._pid = os.getpid()
        return self._backend

    def options(self, task: Task) -> ThrottleOptions | None:
        cls = type(task)
        if cls not in self._options:
            self._options[cls] = options_of(task)
        return self._options[cls]

    def setting(self, name: str, default: Any) -> Any:
        conf = getattr(self.app.conf, f"taskgate_{name}", None)
        return self.defaults.get(name, default) if conf is None else conf

    def max_countdown_s(self) -> float:
        """Cap a countdown well below the broker's visibility timeout (Redis/SQS redeliver unacked ETA tasks
        after it) and RabbitMQ's consumer timeout, so a long wait is several short hops."""
        explicit = self.setting("max_countdown", None)
        if explicit is not None:
            return float(explicit)
        vt = (self.app.conf.broker_transport_options or {}).get("visibility_timeout")
        if vt:
            return max(1.0, float(vt) / 2)
        url = str(self.app.conf.broker_url or "")
        return 1800.0 if url.startswith(("redis", "rediss", "sqs")) else 600.0


def _raw(task: Task, name: str) -> Any:
    """A class attribute as declared (a callable declared as ``key=lambda ...`` must not become a method)."""
    for klass in type(task).__mro__:
        if name in vars(klass):
            v = vars(klass)[name]
            return v.__func__ if isinstance(v, staticmethod) else v
    return None


def options_of(task: Task) -> ThrottleOptions | None:
    throttle = _raw(task, "throttle")
    if throttle is None:
        return None
    values = {n: _raw(task, n) for n in OPTION_NAMES if n != "throttle"}
    given = {n: v for n, v in values.items() if v is not None}
    return parse_options(task.name, throttle, func=task.run, **given)


_runtimes: dict[int, _Runtime] = {}


def runtime(app: Celery) -> _Runtime:
    rt = _runtimes.get(id(app))
    if rt is None:
        raise RuntimeError(
            f"taskgate is not installed on Celery app {app.main!r}: call taskgate.celery.install(app, …)"
        )
    return rt


def configure(app: Celery, backend: Any = None, policies: PolicySource = None, **defaults: Any) -> None:
    """Tell ``app`` which backend (URL or backend object) and policies its throttled tasks use, and the
    app-wide defaults (``max_deferrals``, ``on_exhausted``, ``book``, ``short_wait_ms``, ``max_countdown``;
    also readable from ``app.conf.taskgate_<name>``)."""
    unknown = set(defaults) - {"max_deferrals", "on_exhausted", "book", "short_wait_ms", "max_countdown"}
    if unknown:
        raise TypeError(f"taskgate.celery.install(): unknown option(s) {sorted(unknown)}")
    _runtimes[id(app)] = _Runtime(app, backend, policies, defaults)
    _wrap_task_decorator(app)


def install(app: Celery, backend: Any = None, policies: PolicySource = None, **defaults: Any) -> None:
    """Throttle every task of ``app`` declared with ``throttle=``. Call before the app is finalized."""
    if app.finalized:
        raise RuntimeError(
            f"taskgate.celery.install() was called after Celery app {app.main!r} was finalized "
            "(its tasks are already bound): call install() right after creating the app, "
            "before any task is used"
        )
    configure(app, backend, policies, **defaults)
    # app.config_from_object() after install() reloads the configuration and drops what install() set:
    # (re-)annotate whenever the configuration is loaded, and now if it already is
    app.on_after_configure.connect(_on_after_configure, weak=False)
    if app.configured:
        _annotate(app)


def _on_after_configure(sender: Celery, **kwargs: Any) -> None:
    _annotate(sender)


def _annotate(app: Celery) -> None:
    """Put taskgate's task annotation first in ``app.conf.task_annotations`` (once)."""
    annotations = app.conf.task_annotations
    if annotations is None:
        existing: list[Any] = []
    elif isinstance(annotations, (list, tuple)):
        existing = list(annotations)
    else:
        existing = [annotations]
    if not any(isinstance(a, _Annotation) for a in existing):
        app.conf.task_annotations = [_Annotation(app), *existing]


class _Annotation:
    """taskgate's entry in ``task_annotations``: ``{"*": {"@__call__": _around}}``, merged with the app's own
    ``"*"`` entry. Celery applies only the first ``"*"`` entry of the list (and the first entry naming the
    task), so a plain dict appended after the user's ``"*"`` would be ignored, and one put before it would
    hide it; this one takes the first place and carries the ``"*"`` entry that would have applied."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def annotate(self, task: Any) -> None:
        return None  # the entries naming the task apply as they would without taskgate

    def annotate_any(self) -> dict[str, Any]:
        others = [a for a in prepare_annotations(self.app.conf.task_annotations) if a is not self]
        theirs = firstmethod("annotate_any")(others) or {}
        return {**theirs, "@__call__": _around}

    def __repr__(self) -> str:
        return "<taskgate.celery annotation {'*': {'@__call__': taskgate}}>"


def _wrap_task_decorator(app: Celery) -> None:
    """Validate throttle options when a task is declared (a misspelt ``throtle=`` fails there)."""
    if getattr(app, "_taskgate_wrapped", False):
        return
    original = app.task

    def task(*args: Any, **opts: Any) -> Any:
        if not (len(args) == 1 and callable(args[0])):
            if args:
                return original(*args, **opts)
            return lambda fun: task(fun, **opts)
        fun = args[0]
        name = str(opts.get("name") or f"{getattr(fun, '__module__', '?')}.{getattr(fun, '__name__', '?')}")
        check_option_names(name, opts)
        if "throttle" in opts:
            given = {n: opts[n] for n in OPTION_NAMES if n in opts and n != "throttle"}
            parse_options(name, opts["throttle"], func=fun, **given)
            for n in ("key", "cost", "tokens"):
                if callable(opts.get(n)):
                    opts[n] = staticmethod(opts[n])
        return original(fun, **opts)

    app.task = task
    app._taskgate_wrapped = True


def _around(call: Callable[..., Any]) -> Callable[..., Any]:
    def __call__(self: Task, *args: Any, **kwargs: Any) -> Any:
        return throttled_call(self, call, args, kwargs)

    return __call__


class ThrottledTask(Task):  # type: ignore[misc]
    """A base class alternative to :func:`install`: ``Celery(..., task_cls="taskgate.celery:ThrottledTask")``
    plus :func:`configure` (or ``@app.task(base=ThrottledTask, throttle=...)``)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return throttled_call(self, Task.__call__, args, kwargs)


def throttled_call(
    task: Task, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    req = task.request
    if req.called_directly:
        return call(task, *args, **kwargs)
    rt = _runtimes.get(id(task.app))
    if rt is None:
        if _raw(task, "throttle") is None:  # e.g. task_cls=ThrottledTask, configure() not called
            return call(task, *args, **kwargs)
        rt = runtime(task.app)  # raises, naming the app
    opts = rt.options(task)
    if opts is None:
        return call(task, *args, **kwargs)
    headers = req.headers or {}
    state = DeferralState.from_dict(headers.get(HEADER) or getattr(req, HEADER, None))
    while True:
        out = rt.gate.enter(opts, args, kwargs, state, holder=str(req.id))
        if isinstance(out, Admitted):
            break
        limit = _max_deferrals(rt, opts, out)
        if state.deferrals >= limit and out.reason == "throttled":
            if _on_exhausted(rt, opts, out) == "run":
                log.warning(
                    "taskgate: %s[%s] deferred %d times; on_exhausted=run: running", task.name, req.id, limit
                )
                with AdmissionGroup([], fail_open=True):  # taskgate.current().settle() stays valid
                    return call(task, *args, **kwargs)
            raise ThrottledError(
                f"task {task.name}[{req.id}] was deferred {state.deferrals} times by policy {out.policy!r} "
                f"({out.axis}); max_deferrals={limit} reached",
                out.decision,
            )
        # waits for the store (fail: closed) are not throttle deferrals: they never use up max_deferrals
        deferrals = state.deferrals + int(out.reason == "throttled")
        if req.is_eager:  # no re-publish in eager mode: wait and ask again
            _signal_throttled(task, out, out.countdown_ms / 1000.0, deferrals)
            time.sleep(out.countdown_ms / 1000.0)
            state = dataclasses.replace(out.state, deferrals=deferrals)
            continue
        _defer(task, rt, out, deferrals)
    try:
        with out.group:
            task_admitted.send(sender=task, task_id=req.id, policies=opts.policies, deferrals=state.deferrals)
            try:
                return call(task, *args, **kwargs)
            except _CLEAN_EXC:
                out.group.release(dropped=False)
                raise
    except ProviderDeferred as pd:  # the provider said 429: re-queued until its hold ends, not failed
        if req.is_eager:
            raise pd.__cause__ or pd from None
        _defer(task, rt, pd.deferred, state.deferrals)


def _max_deferrals(rt: _Runtime, opts: ThrottleOptions, out: Deferred) -> int:
    if opts.max_deferrals is not None:
        return opts.max_deferrals
    v = rt.setting("max_deferrals", None)
    return int(v) if v is not None else rt.backend_now().policy(out.policy).deferral.max_deferrals


def _on_exhausted(rt: _Runtime, opts: ThrottleOptions, out: Deferred) -> str:
    if opts.on_exhausted is not None:
        return opts.on_exhausted
    v = rt.setting("on_exhausted", None)
    return str(v) if v is not None else str(rt.backend_now().policy(out.policy).deferral.on_exhausted)


def _defer(task: Task, rt: _Runtime, out: Deferred, deferrals: int) -> None:
    req = task.request
    countdown = min(out.countdown_ms / 1000.0, rt.max_countdown_s())
    state = dataclasses.replace(out.state, deferrals=deferrals)
    headers = dict(req.headers or {})
    headers[HEADER] = state.as_dict()
    sig = task.signature_from_request(req, retries=req.retries, countdown=countdown, headers=headers)
    sig.apply_async()
    log.debug(
        "taskgate: deferred %s[%s] by %.3fs (policy %r, %s, deferral #%d)",
        task.name,
        req.id,
        countdown,
        out.policy,
        out.axis,
        state.deferrals,
    )
    _signal_throttled(task, out, countdown, state.deferrals)
    raise Ignore()


def _signal_throttled(task: Task, out: Deferred, countdown: float, deferrals: int) -> None:
    task_throttled.send(
        sender=task,
        task_id=task.request.id,
        policy=out.policy,
        axis=out.axis,
        countdown=countdown,
        deferrals=deferrals,
        decision=out.decision,
    )
