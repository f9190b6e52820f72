"""Declaring throttled RQ jobs: the :func:`throttled` decorator (it validates the options and tags the
function), per-job overrides in ``job.meta["taskgate"]`` (:func:`options`), and :func:`options_of`, which
reads both for a job."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import rq.job

from taskgate.integrations.options import (
    OPTION_NAMES,
    ROOM_OPTION_NAMES,
    ThrottleOptions,
    check_option_names,
    parse_options,
)

__all__ = ["ATTR", "META", "META_AT_FRONT", "META_STATE", "options", "options_of", "throttled"]

META = "taskgate"  # job.meta key of the per-job options
META_STATE = "taskgate_state"  # job.meta key of the deferral state (DeferralState.as_dict())
META_AT_FRONT = "taskgate_at_front"  # job.meta key: the job's own enqueue_at_front while a booked deferral
ATTR = "__taskgate_options__"  # attribute the decorator puts on the job function
NAMES = OPTION_NAMES + ROOM_OPTION_NAMES  # RQ's jobs wait in the engine's waiting room too: fair_key=

F = TypeVar("F", bound=Callable[..., Any])


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', getattr(fn, '__name__', '?'))}"


def _reject_unknown(task: str, given: Mapping[str, Any]) -> None:
    check_option_names(task, given, names=NAMES)  # "did you mean ..." for a near miss
    unknown = sorted(set(given) - set(NAMES))
    if unknown:
        raise TypeError(f"task {task!r}: unknown option(s) {unknown}; known: {list(NAMES)}")


def throttled(throttle: str | Sequence[str], **opts: Any) -> Callable[[F], F]:
    """Throttle an RQ job function by policy ``throttle`` (a name or a list of names). Options as for Celery
    tasks: ``key`` (a parameter name or a callable of the job's arguments), ``cost``, ``tokens`` (ints or
    callables), ``max_deferrals``, ``on_exhausted`` (``"fail"``/``"run"``), ``book``, ``fair_key`` (like
    ``key``: the job's tenant, whose share of a shared limit its waiting room keeps fair, see
    :mod:`taskgate.backends.fairness`; read only by policies that park). Validated here; the function itself
    is returned unchanged (only tagged), so it can still be called directly."""

    def tag(fn: F) -> F:
        name = _name(fn)
        _reject_unknown(name, opts)
        setattr(fn, ATTR, parse_options(name, throttle, func=fn, **opts))
        return fn

    if callable(throttle) and not isinstance(throttle, str):
        raise TypeError("@taskgate.rq.throttled needs the policy name: @taskgate.rq.throttled('llm', ...)")
    return tag


def options(throttle: str | Sequence[str] | None = None, **opts: Any) -> dict[str, Any]:
    """Per-job options, to pass as ``queue.enqueue(f, ..., meta=taskgate.rq.options(...))`` (merge with your
    own meta: ``meta={**taskgate.rq.options(key="acme"), "note": 1}``). They override the decorator's.
    Values only: ``key`` is the throttle key of this job (a str or an int), ``fair_key`` its fair key (a str
    or an int), ``cost``/``tokens`` are ints."""
    given = dict(opts)
    if throttle is not None:
        given["throttle"] = throttle
    return {META: _check_meta("taskgate.rq.options()", given)}


def _check_meta(task: str, given: Mapping[str, Any]) -> dict[str, Any]:
    _reject_unknown(task, given)
    for n in ("key", "cost", "tokens", "fair_key"):
        if callable(given.get(n)):
            raise TypeError(
                f"task {task!r}: {n}= in job.meta must be a value for this job, not a callable "
                "(use a callable in @taskgate.rq.throttled)"
            )
    for n, noun in (("key", "throttle key"), ("fair_key", "fair key")):
        v = given.get(n)
        if n in given and (isinstance(v, bool) or not isinstance(v, (str, int)) or v == ""):
            raise TypeError(f"task {task!r}: {n}={v!r}: expected the {noun} (a non-empty str or an int)")
    throttle = given.get("throttle", "-")
    if isinstance(throttle, tuple):
        throttle = list(throttle)
    checked = {n: given[n] for n in NAMES if n in given and n not in ("throttle", "key", "fair_key")}
    parse_options(task, throttle, **checked)
    out = dict(given)
    if "throttle" in out:
        out["throttle"] = throttle if isinstance(throttle, str) else list(throttle)
    return out


def _fixed(value: object) -> Callable[..., object]:
    def key(**_: Any) -> object:
        return value

    return key


def options_of(job: rq.job.Job) -> ThrottleOptions | None:
    """The options of ``job``: its function's decorator, overridden by ``job.meta["taskgate"]``; None if the
    job is not throttled."""
    func = job.func
    base: ThrottleOptions | None = getattr(func, ATTR, None)
    over = job.meta.get(META) if isinstance(job.meta, dict) else None
    if not over:
        return base
    name = str(job.func_name)
    if not isinstance(over, Mapping):
        raise TypeError(f"task {name!r}: job.meta[{META!r}] must be a dict (use taskgate.rq.options())")
    over = _check_meta(name, over)
    if base is None:
        if "throttle" not in over:
            raise TypeError(
                f"task {name!r}: job.meta[{META!r}] has no throttle= and the function is not decorated "
                "with @taskgate.rq.throttled"
            )
        base = parse_options(name, over["throttle"], func=func if callable(func) else None)
    plain = ("cost", "tokens", "max_deferrals", "on_exhausted", "book")
    changes: dict[str, Any] = {n: over[n] for n in plain if n in over}
    if "throttle" in over:
        t = over["throttle"]
        changes["policies"] = (t,) if isinstance(t, str) else tuple(t)
    for n in ("key", "fair_key"):
        if n in over:
            changes[n] = _fixed(over[n])
    return dataclasses.replace(base, **changes)
