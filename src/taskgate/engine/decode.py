"""Decoding of the engine's replies (Redis replies bytes or str): shared by the planners and the stats
buffer."""

from __future__ import annotations

from collections.abc import Sequence
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


def decode_many(raw: Sequence[Any]) -> list[Decision]:
    return [decode_decision(raw, i) for i in range(0, len(raw), 7)]


def decode_forecast(raw: Sequence[Any]) -> Forecast:
    return Forecast(spendable_now=int(raw[0]), next_replenish_at=int(raw[1]), full_at=int(raw[2]))


def decode_window_lease(raw: Sequence[Any]) -> WindowLease:
    return WindowLease(int(raw[0]), int(raw[1]), int(raw[2]), int(raw[3]), int(raw[4]))
