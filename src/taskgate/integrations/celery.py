"""Celery integration: ``@app.task(throttle="llm", key=...)``, decided by the engine before the body runs.

::

    app = Celery("app", broker="amqp://guest@localhost//")
    taskgate.celery.install(app, "redis://localhost:6379/0", policies="taskgate.yaml")

    @app.task(throttle="llm", key=lambda tenant, prompt: tenant, tokens=lambda tenant, prompt: 800)
    def summarize(tenant, prompt): ...

How it works:

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
- The waiting room (policies that park, see :mod:`taskgate.integrations.waiting`): a task of one policy is
  decided when it is sent (an ``@apply_async`` annotation): admitted, it is sent with its grant; otherwise
  it is parked in the engine and nothing is sent. In the worker, a denied task is parked (atomically with
  its decision) and acked. The worker's promoter sends parked tasks back, admitted, to a *lane* of their
  queue (``<queue>.taskgate``) that every worker consuming the queue also consumes (added at start-up), so
  they never land behind a backlog; they claim their grant there and do not pay again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NoReturn

try:
    from celery import Celery, Task, signals
    from celery.app.annotations import prepare as prepare_annotations
    from celery.exceptions import Ignore, Reject, Retry
    from celery.utils.dispatch import Signal
    from celery.utils.functional import firstmethod
    from kombu.serialization import dumps as kombu_dumps
    from kombu.serialization import loads as kombu_loads
    from kombu.utils.uuid import uuid
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(f"taskgate.celery needs Celery: pip install 'taskgate[celery]' ({e})") from e

from taskgate.backends.waiting import Promoted
from taskgate.integrations._gate import (
    AdmissionGroup,
    Admitted,
    DeferralState,
    Deferred,
    Parked,
    ProviderDeferred,
    _undo,
)
from taskgate.integrations._runtime import Runtime
from taskgate.integrations.options import (
    OPTION_NAMES,
    ROOM_OPTION_NAMES,
    ThrottleOptions,
    check_option_names,
    parse_options,
)
from taskgate.integrations.waiting import Promoter
from taskgate.policy import PolicySource

__all__ = [
    "HEADER",
    "CeleryRuntime",
    "ThrottledTask",
    "configure",
    "install",
    "options_of",
    "runtime",
    "task_admitted",
    "task_throttled",
    "throttled_call",
]

log = logging.getLogger("taskgate")
HEADER = "taskgate"
LANE_SUFFIX = ".taskgate"  # promoted tasks of queue Q go to the lane Q + LANE_SUFFIX
_CLEAN_EXC = (Ignore, Reject, Retry)

task_throttled = Signal(
    name="task_throttled", providing_args={"task_id", "policy", "axis", "countdown", "deferrals", "decision"}
)
task_admitted = Signal(name="task_admitted", providing_args={"task_id", "policies", "deferrals"})


class CeleryRuntime(Runtime):
    """Per app: the shared :class:`Runtime` (backend per process, gate, settings: each also readable from
    ``app.conf.taskgate_<name>``, which wins) and the options of each task class."""

    SETTINGS: ClassVar[Mapping[str, Any]] = {
        "max_deferrals": None,
        "on_exhausted": None,
        "book": None,
        "short_wait_ms": 250,
        "max_countdown": None,
        "gate_on_send": True,
    }
    where = "taskgate.celery.install()"
    PROVIDER_DEFERRAL = True

    def __init__(
        self, app: Celery, backend: Any, policies: PolicySource, defaults: Mapping[str, Any]
    ) -> None:
        super().__init__(backend, policies, defaults)
        self.app = app
        self._options: dict[type[Any], ThrottleOptions | None] = {}
        self.promoter = Promoter(self.room, self.send_promoted)

    def send_promoted(self, policy: str, key: str, t: Promoted) -> None:
        """Send a promoted task to the lane of its queue, marked with the policy that granted it."""
        ctype, enc, body = t.payload.split(b"\n", 2)
        d = kombu_loads(body, ctype.decode(), enc.decode(), accept={ctype.decode()})  # type: ignore[no-untyped-call]
        opts = d.setdefault("options", {})
        headers = opts.setdefault("headers", {})
        state = DeferralState.from_dict(headers.get(HEADER))
        state.promoted = policy
        headers[HEADER] = state.as_dict()
        opts["queue"] = str(opts.get("queue") or self.app.conf.task_default_queue) + LANE_SUFFIX
        self.app.signature(d).apply_async()

    def options(self, task: Task) -> ThrottleOptions | None:
        cls = type(task)
        if cls not in self._options:
            self._options[cls] = options_of(task)
        return self._options[cls]

    def setting(self, name: str) -> Any:
        conf = getattr(self.app.conf, f"taskgate_{name}", None)
        return self.settings.get(name) if conf is None else conf

    def max_countdown_s(self) -> float:
        """Cap a countdown well below the broker's visibility timeout (Redis/SQS redeliver unacked ETA tasks
        after it) and RabbitMQ's consumer timeout, so a long wait is several short hops."""
        explicit = self.setting("max_countdown")
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


_OPTIONS = OPTION_NAMES + ROOM_OPTION_NAMES  # Celery's tasks wait in the engine's waiting room: fair_key=


def options_of(task: Task) -> ThrottleOptions | None:
    throttle = _raw(task, "throttle")
    if throttle is None:
        return None
    values = {n: _raw(task, n) for n in _OPTIONS if n != "throttle"}
    given = {n: v for n, v in values.items() if v is not None}
    return parse_options(task.name, throttle, func=task.run, **given)


_runtimes: dict[int, CeleryRuntime] = {}


def runtime(app: Celery) -> CeleryRuntime:
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
    _runtimes[id(app)] = CeleryRuntime(app, backend, policies, defaults)
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
    signals.celeryd_after_setup.connect(_on_worker_setup, weak=False)
    signals.worker_ready.connect(_on_worker_ready, weak=False)
    signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
    if app.configured:
        _annotate(app)


def _on_after_configure(sender: Celery, **kwargs: Any) -> None:
    _annotate(sender)


def _on_worker_setup(sender: Any, instance: Any, **kwargs: Any) -> None:
    """Every queue a worker consumes gets its lane of promoted tasks, consumed by the same worker."""
    rt = _runtimes.get(id(instance.app))
    if rt is None or not rt.parks_any():
        return
    queues = instance.app.amqp.queues
    for q in list(queues.consume_from.values()):
        if not q.name.endswith(LANE_SUFFIX):
            queues.select_add(q.name + LANE_SUFFIX)


def _on_worker_ready(sender: Any, **kwargs: Any) -> None:
    rt = _runtimes.get(id(sender.app))
    if rt is not None and rt.parks_any():
        rt.promoter.start()


def _on_worker_shutdown(sender: Any, **kwargs: Any) -> None:
    for rt in list(_runtimes.values()):
        rt.promoter.stop()


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
        return {**theirs, "@__call__": _around, "@apply_async": _around_send}

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
        check_option_names(name, opts, names=_OPTIONS)
        if "throttle" in opts:
            given = {n: opts[n] for n in _OPTIONS if n in opts and n != "throttle"}
            parse_options(name, opts["throttle"], func=fun, **given)
            for n in ("key", "cost", "tokens", "fair_key"):
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

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: Any = None, **options: Any) -> Any:
        return throttled_send(self, Task.apply_async, args, kwargs, task_id, options)


def _around_send(send: Callable[..., Any]) -> Callable[..., Any]:
    def apply_async(
        self: Task, args: Any = None, kwargs: Any = None, task_id: Any = None, **options: Any
    ) -> Any:
        return throttled_send(self, send, args, kwargs, task_id, options)

    return apply_async


_NOT_STORED = ("producer", "connection", "publisher", "router", "exchange", "routing_key", "add_to_parent")


def throttled_send(
    task: Task, send: Callable[..., Any], args: Any, kwargs: Any, task_id: Any, options: dict[str, Any]
) -> Any:
    """Sending a task whose policy parks: decide it now, so throttled work never queues on the broker.
    Admitted: sent with its grant (the worker claims it). Not admitted: parked in the waiting room, sent
    later by a worker's promoter, and nothing is sent now. Anything else (eager mode, a countdown or eta, a
    task of several policies, a message already promoted, the store down) is sent as it is: the worker
    decides."""
    rt = _runtimes.get(id(task.app))
    opts = rt.options(task) if rt is not None else None
    headers = options.get("headers") or {}
    if (
        rt is None
        or opts is None
        or len(opts.policies) != 1
        or not rt.setting("gate_on_send")
        or task.app.conf.task_always_eager
        or options.get("countdown") is not None
        or options.get("eta") is not None
        or (isinstance(headers, dict) and HEADER in headers)
        or not rt.parks(opts)
    ):
        return send(task, args, kwargs, task_id=task_id, **options)
    args, kwargs = tuple(args or ()), dict(kwargs or {})
    task_id = str(task_id or uuid())
    stored = {k: v for k, v in options.items() if k not in _NOT_STORED}
    parent = task.app.current_worker_task
    if parent is not None and parent.request.id:
        stored.setdefault("parent_id", parent.request.id)
        stored.setdefault("root_id", parent.request.root_id or parent.request.id)
    queue = _send_queue(task, args, kwargs, options)
    stored["queue"] = queue
    stored["headers"] = {**(headers if isinstance(headers, dict) else {}), HEADER: DeferralState().as_dict()}
    try:
        sig = task.signature(args, kwargs, task_id=task_id, **stored)
        out = rt.gate.enter_at_send(rt.room(), opts, args, kwargs, task_id, _payload(task, sig))
    except Exception as e:  # unserializable options, a key= that raises, the store down: the worker decides
        log.debug("taskgate: %s[%s] not decided at send (%s): sent as it is", task.name, task_id, e)
        return send(task, args, kwargs, task_id=task_id, **options)
    if out == "handed":
        state = DeferralState(promoted=opts.policies[0])
        options = {**options, "headers": {**stored["headers"], HEADER: state.as_dict()}, "queue": queue}
        for k in ("exchange", "routing_key"):
            options.pop(k, None)
        return send(task, args, kwargs, task_id=task_id, **options)
    log.debug("taskgate: %s[%s] %s at send (policy %r)", task.name, task_id, out, opts.policies[0])
    return task.AsyncResult(task_id)


def _send_queue(task: Task, args: Any, kwargs: Any, options: dict[str, Any]) -> str:
    """The name of the queue a task being sent is routed to (the app's router, as Celery would)."""
    q = options.get("queue")
    if q is not None:
        return str(getattr(q, "name", q))
    route = task.app.amqp.router.route(dict(options), task.name, args, kwargs)
    q = route.get("queue")
    return str(getattr(q, "name", q) or task.app.conf.task_default_queue)


def _payload(task: Task, sig: Any) -> bytes:
    """A signature as stored in the waiting room: content type, encoding and body, as kombu serializes it."""
    ctype, enc, body = kombu_dumps(dict(sig), serializer=task.serializer)  # type: ignore[no-untyped-call]
    data = body if isinstance(body, bytes) else str(body).encode()
    return str(ctype).encode() + b"\n" + str(enc).encode() + b"\n" + data


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
    if not req.is_eager and rt.parks(opts) and state.deferrals < rt.deferral_limit(opts):
        return _through_room(task, rt, opts, call, args, kwargs, state)
    while True:
        out = rt.gate.enter(opts, args, kwargs, state, holder=str(req.id))
        if isinstance(out, Admitted):
            break
        exhausted = rt.exhausted(opts, out, f"{task.name}[{req.id}]")
        if exhausted == "run":
            with AdmissionGroup([], fail_open=True):  # taskgate.current().settle() stays valid
                return call(task, *args, **kwargs)
        if exhausted is not None:
            raise exhausted
        # waits for the store (fail: closed) are not throttle deferrals: they never use up max_deferrals
        deferrals = state.deferrals + int(out.reason == "throttled")
        if req.is_eager:  # no re-publish in eager mode: wait and ask again
            _signal_throttled(task, out, out.countdown_ms / 1000.0, deferrals)
            time.sleep(out.countdown_ms / 1000.0)
            state = dataclasses.replace(out.state, deferrals=deferrals)
            continue
        _defer(task, rt, out, deferrals)
    try:
        return _run_admitted(task, call, args, kwargs, out.group, opts, state.deferrals)
    except ProviderDeferred as pd:  # the provider said 429: re-queued until its hold ends, not failed
        if req.is_eager:
            raise pd.__cause__ or pd from None
        _defer(task, rt, pd.deferred, state.deferrals)


def _run_admitted(
    task: Task,
    call: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    group: AdmissionGroup,
    opts: ThrottleOptions,
    deferrals: int,
) -> Any:
    """Run the body holding what the task was granted (released when it ends)."""
    with group:
        task_admitted.send(sender=task, task_id=task.request.id, policies=opts.policies, deferrals=deferrals)
        try:
            return call(task, *args, **kwargs)
        except _CLEAN_EXC:
            group.release(dropped=False)
            raise


def _through_room(
    task: Task,
    rt: CeleryRuntime,
    opts: ThrottleOptions,
    call: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    state: DeferralState,
) -> Any:
    """Admit, or park in the waiting room and ack; run the task if admitted, then hand on a freed slot."""
    req = task.request
    nxt = DeferralState(state.deferrals + 1, {}, 0, provider=state.provider)
    headers = dict(req.headers or {})
    headers[HEADER] = nxt.as_dict()
    sig = task.signature_from_request(req, queue=_queue_of(task), retries=req.retries, headers=headers)
    again = bool((req.delivery_info or {}).get("redelivered")) and bool(task.acks_late)
    out = rt.gate.enter_room(
        rt.room(), opts, args, kwargs, state, str(req.id), _payload(task, sig), redelivered=again
    )
    if isinstance(out, Deferred):  # the store is down (fail: closed)
        _defer(task, rt, out, state.deferrals)
    if isinstance(out, Parked):
        if out.duplicate:
            log.info("taskgate: %s[%s] is a duplicate message (it waits, or ran): dropped", task.name, req.id)
        else:
            log.debug(
                "taskgate: parked %s[%s] (policy %r, %d waiting)", task.name, req.id, out.policy, out.depth
            )
            task_throttled.send(
                sender=task, task_id=req.id, policy=out.policy, axis=out.axis or "waiting", countdown=None,
                deferrals=nxt.deferrals, decision=None,
            )  # fmt: skip
        raise Ignore()
    freed = [(a.policy, a.key) for a in out.group.admissions if a.lease_id]
    try:
        return _run_admitted(task, call, args, kwargs, out.group, opts, state.deferrals)
    except ProviderDeferred as pd:  # the provider said 429: back into the waiting room until its hold ends
        _park_again(task, rt, opts, args, kwargs, pd.deferred, sig)
    finally:
        for policy, key in freed:  # the freed slot goes to the oldest waiter now, not at the next round
            try:
                rt.promoter.hand_off(policy, key)
            except Exception as e:
                log.warning(
                    "taskgate: handing on the slot of policy %r failed (%s); the promoter will", policy, e
                )


def _park_again(
    task: Task,
    rt: CeleryRuntime,
    opts: ThrottleOptions,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    out: Deferred,
    sig: Any,
) -> NoReturn:
    """Park a task that ran and met the provider's 429 (its hold now denies the key): it waits in the room
    of the policy that was refused and is promoted when the hold ends; its own retries are untouched."""
    req = task.request
    p = rt.backend.policy(out.policy)
    key = opts.key_for(args, kwargs)
    cost = opts.units_for("cost", args, kwargs) if p.rate else 1
    tokens = opts.units_for("tokens", args, kwargs) if p.budgets else 0
    headers = dict(sig.options.get("headers") or {})
    headers[HEADER] = out.state.as_dict()
    sig = sig.clone(headers=headers)
    e = rt.room().enter(p.name, key, str(req.id), _payload(task, sig), cost, tokens, dedupe=False)
    if e.status != "parked":  # the hold has ended already: re-published, as without the room
        if e.admission is not None:
            _undo([e.admission])
        _defer(task, rt, out, out.state.deferrals)
    _signal_throttled(task, out, out.countdown_ms / 1000.0, out.state.deferrals)
    raise Ignore()


def _queue_of(task: Task) -> str:
    """The name of the queue the current message came from (its routing key among the queues known)."""
    info = task.request.delivery_info or {}
    rk = info.get("routing_key")
    queues = task.app.amqp.queues
    if rk:
        name = str(rk)
        if name.endswith(LANE_SUFFIX):
            return name[: -len(LANE_SUFFIX)]
        if name in queues:
            return name
        for q in queues.values():
            if q.routing_key == rk:
                return str(q.name)
    return str(task.app.conf.task_default_queue)


def _defer(task: Task, rt: CeleryRuntime, out: Deferred, deferrals: int) -> NoReturn:
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
