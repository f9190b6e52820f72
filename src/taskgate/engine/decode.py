"""Decoding of the engine's replies (Redis replies bytes or str): shared by the planners and the stats
buffer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from taskgate.types import Decision, Forecast, WindowLease

__all__ = ["decode_decision", "decode_forecast", "decode_many", "decode_window_lease", "text"]


def text(v: object) -> str:
    """A reply field as text (Redis replies bytes or str)."""
    return v.decode() if isinstance(v, bytes) else str(v)


def decode_decision(raw: Sequence[Any], i: int = 0) -> Decision:
    # positional: a third cheaper than keywords on the hot path (allowed, limit, remaining, reset_at,
    # retry_after_ms, booked, booking_token)
    return Decision(
        int(raw[i]) == 1,
        int(raw[i + 1]),
        int(raw[i + 2]),
        int(raw[i + 3]),
        int(raw[i + 4]),
        int(raw[i + 5]) == 1,
        text(raw[i + 6]) if len(raw) > i + 6 else "",
    )


def _slot_setters() -> Callable[..., Decision]:
    """A Decision built by its slots' own setters, in field order: what its frozen ``__init__`` does through
    ``object.__setattr__`` per field, in half the time (the hot path of every check builds one)."""
    sets = [getattr(Decision, f.name).__set__ for f in fields(Decision)]
    if len(sets) != 7:  # the fields changed: the constructor, as decode_decision
        return Decision
    s0, s1, s2, s3, s4, s5, s6 = sets
    new = object.__new__

    def make(a: bool, li: int, re: int, at: int, rt: int, bk: bool, tok: str) -> Decision:
        d = new(Decision)
        s0(d, a), s1(d, li), s2(d, re), s3(d, at), s4(d, rt), s5(d, bk), s6(d, tok)
        return d

    return make


_make_decision = _slot_setters()


def decode_check(raw: Sequence[Any]) -> Decision:
    """One check's reply, as :func:`decode_decision` reads it: a Redis reply's integers are ints already."""
    a, limit, remaining, reset_at, retry, booked, tok = raw
    return _make_decision(a == 1, limit, remaining, reset_at, retry, booked == 1, text(tok) if tok else "")


def decode_many(raw: Sequence[Any]) -> list[Decision]:
    return [decode_decision(raw, i) for i in range(0, len(raw), 7)]


def decode_forecast(raw: Sequence[Any]) -> Forecast:
    return Forecast(spendable_now=int(raw[0]), next_replenish_at=int(raw[1]), full_at=int(raw[2]))


def decode_window_lease(raw: Sequence[Any]) -> WindowLease:
    return WindowLease(int(raw[0]), int(raw[1]), int(raw[2]), int(raw[3]), int(raw[4]))
