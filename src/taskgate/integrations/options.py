"""Throttle options of a task or job, validated when the task is declared (shared by Celery and RQ)."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["OPTION_NAMES", "ROOM_OPTION_NAMES", "ThrottleOptions", "check_option_names", "parse_options"]

OPTION_NAMES = ("throttle", "key", "cost", "tokens", "max_deferrals", "on_exhausted", "book")
# Options only the engine's waiting room reads (a policy that parks, Celery's tasks and RQ's jobs alike).
ROOM_OPTION_NAMES = ("fair_key",)
Units = int | Callable[..., int]


@dataclass(frozen=True)
class ThrottleOptions:
    """How one task is throttled. ``key``/``cost``/``tokens`` may be callables receiving the task's own
    arguments (bound by the task's signature, so positional and keyword calls both work)."""

    task: str
    policies: tuple[str, ...]
    key: str | Callable[..., object] | None = None
    cost: Units = 1
    tokens: Units = 0
    max_deferrals: int | None = None
    on_exhausted: Literal["fail", "run"] | None = None
    book: bool = True
    signature: inspect.Signature | None = None
    fair_key: str | Callable[..., object] | None = None

    def _values(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if self.signature is None:
            return dict(kwargs)
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise ValueError(f"task {self.task!r}: its arguments do not match its signature: {e}") from None
        bound.apply_defaults()
        values = dict(bound.arguments)
        for name, p in self.signature.parameters.items():
            if p.kind is inspect.Parameter.VAR_KEYWORD and isinstance(values.get(name), dict):
                values.update(values.pop(name))
        return values

    def _call(self, what: str, fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        values = self._values(args, kwargs)
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            return fn(*args, **kwargs)
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            named = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
            if all(n in values for n in named):
                return fn(**values)
        elif all(n in values for n, p in params.items() if p.default is inspect.Parameter.empty):
            return fn(**{n: values[n] for n in params if n in values})
        try:
            return fn(*args, **kwargs)
        except TypeError as e:
            raise ValueError(
                f"task {self.task!r}: {what}= callable {getattr(fn, '__name__', fn)!r} does not accept the "
                f"task's arguments (name its parameters after the task's, or take **kwargs): {e}"
            ) from e

    def _pick(
        self, what: str, spec: str | Callable[..., object], args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> str:
        """The value of option ``what`` (a parameter name or a callable) as a key: a non-empty str or int."""
        k: object
        if isinstance(spec, str):
            values = self._values(args, kwargs)
            if spec not in values:
                raise ValueError(f"task {self.task!r}: {what}={spec!r} is not one of its parameters")
            k = values[spec]
        elif what == "key":
            k = self._call(what, spec, args, kwargs)
        else:
            try:
                k = self._call(what, spec, args, kwargs)
            except ValueError:
                raise
            except Exception as e:
                raise ValueError(
                    f"task {self.task!r}: {what}= callable {getattr(spec, '__name__', spec)!r} raised "
                    f"{type(e).__name__}: {e}"
                ) from e
        if isinstance(k, (str, int)) and not isinstance(k, bool):
            s = str(k)
            if s:
                return s
        noun = "throttle key" if what == "key" else "fair key"
        raise ValueError(
            f"task {self.task!r}: {what}= gave {k!r}; a {noun} must be a non-empty str or an int"
        )

    def key_for(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
        return "*" if self.key is None else self._pick("key", self.key, args, kwargs)

    def fair_key_for(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
        """The task's fair key in its waiting rooms (None: it waits in arrival order)."""
        return None if self.fair_key is None else self._pick("fair_key", self.fair_key, args, kwargs)

    def units_for(self, what: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
        v: object = self.cost if what == "cost" else self.tokens
        if callable(v):
            v = self._call(what, v, args, kwargs)
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if what == "cost" else 0):
            raise ValueError(
                f"task {self.task!r}: {what}= gave {v!r}; expected an int >= {int(what == 'cost')}"
            )
        return v


def check_option_names(
    task: str,
    given: Mapping[str, Any],
    known_elsewhere: Sequence[str] = (),
    names: Sequence[str] = OPTION_NAMES,
) -> None:
    """Fail on a misspelt throttle option (``throtle=``), naming it and the option it resembles."""
    for name in given:
        if name in names or name in known_elsewhere:
            continue
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
        if close:
            raise TypeError(f"task {task!r}: unknown option {name!r}; did you mean {close[0]!r}?")


def parse_options(
    task: str,
    throttle: object,
    *,
    key: object = None,
    cost: object = 1,
    tokens: object = 0,
    max_deferrals: object = None,
    on_exhausted: object = None,
    book: object = True,
    fair_key: object = None,
    func: Callable[..., Any] | None = None,
) -> ThrottleOptions:
    """Validate the options of ``task``; every error names the task, the option and the value."""

    def bad(opt: str, value: object, expected: str) -> TypeError:
        return TypeError(f"task {task!r}: {opt}={value!r}: expected {expected}")

    if isinstance(throttle, str):
        policies: tuple[str, ...] = (throttle,)
    elif isinstance(throttle, (list, tuple)) and throttle and all(isinstance(p, str) and p for p in throttle):
        policies = tuple(throttle)
    else:
        raise bad("throttle", throttle, "a policy name or a non-empty list of policy names")
    sig = None
    if func is not None:
        try:
            sig = inspect.signature(func)
        except (TypeError, ValueError):
            sig = None
    for opt, v in (("key", key), ("fair_key", fair_key)):
        if v is not None and (not (isinstance(v, str) and v) and not callable(v)):
            raise bad(opt, v, "a callable of the task's arguments or the name of one of its parameters")
        if isinstance(v, str) and sig is not None:
            names = [n for n, p in sig.parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
            if v not in names and not any(
                p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()
            ):
                raise bad(opt, v, f"one of the task's parameters {names}")
    for opt, v, lo in (("cost", cost, 1), ("tokens", tokens, 0)):
        if not callable(v) and (isinstance(v, bool) or not isinstance(v, int) or v < lo):
            raise bad(opt, v, f"an int >= {lo} or a callable of the task's arguments")
    if max_deferrals is not None and (
        isinstance(max_deferrals, bool) or not isinstance(max_deferrals, int) or max_deferrals < 0
    ):
        raise bad("max_deferrals", max_deferrals, "an int >= 0")
    if on_exhausted not in (None, "fail", "run"):
        raise bad("on_exhausted", on_exhausted, "'fail' or 'run'")
    if not isinstance(book, bool):
        raise bad("book", book, "True or False")
    return ThrottleOptions(
        task=task,
        policies=policies,
        key=key,  # type: ignore[arg-type]
        cost=cost,  # type: ignore[arg-type]
        tokens=tokens,  # type: ignore[arg-type]
        max_deferrals=max_deferrals,
        on_exhausted=on_exhausted,
        book=book,
        signature=sig,
        fair_key=fair_key,  # type: ignore[arg-type]
    )
