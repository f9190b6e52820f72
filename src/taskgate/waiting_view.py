"""What operators see of the waiting rooms: per policy, how much waits, since when, and how long it takes.

Read from the store (the rooms' own keys, through the index of rooms): ``taskgate top`` shows a table of it,
the exporter the metrics ``taskgate_waiting{policy}`` (tasks waiting), ``taskgate_waiting_oldest_seconds``
and ``taskgate_wait_seconds`` (histogram of the wait from parked to claimed, kept by the engine in each
room), and ``taskgate rooms`` lists, counts and purges one room.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from taskgate.policy import RateSpec

if TYPE_CHECKING:
    from taskgate.backends.waiting import RoomStats

__all__ = ["WaitingView", "families", "read_waiting"]


@dataclass(frozen=True)
class WaitingView:
    """The waiting rooms of one policy, summed."""

    policy: str
    rooms: int  # keys with a room in the index
    waiting: int
    handed_off: int  # promoted, not yet claimed by a worker
    oldest_parked_at: int  # epoch-ms (0: nothing waits)
    drain_s: float | None  # waiting / the policy's rate (None: no rate axis)
    claimed: int
    wait_buckets: list[int] = field(default_factory=list)  # per bucket of WAIT_BUCKETS_S, the last: longer
    wait_sum_ms: int = 0


def read_waiting(backend: Any) -> tuple[WaitingView, ...]:
    """Every policy's rooms, from a direct door (``RedisBackend``); empty for another door."""
    from taskgate.backends.redis import RedisBackend
    from taskgate.backends.waiting import WaitingRoom

    if not isinstance(backend, RedisBackend):
        return ()
    room = WaitingRoom(backend)
    known = [(p, k) for p, k, _ in room.rooms() if p in backend.policies]
    by: dict[str, list[RoomStats]] = {}
    for s in room.overview(known):
        by.setdefault(s.policy, []).append(s)
    out = []
    for name, rooms in sorted(by.items()):
        p = backend.policy(name)
        waiting = sum(r.depth for r in rooms)
        per_s = _per_s(p.rate) if p.rate else None
        heads = [r.oldest_parked_at for r in rooms if r.oldest_parked_at]
        out.append(
            WaitingView(
                name,
                len(rooms),
                waiting,
                sum(r.handoff for r in rooms),
                min(heads, default=0),
                waiting / per_s if per_s else None,
                sum(r.claimed for r in rooms),
                [sum(col) for col in zip(*(r.wait_buckets for r in rooms), strict=True)],
                sum(r.wait_sum_ms for r in rooms),
            )
        )
    return tuple(out)


def _per_s(rate: RateSpec) -> float | None:
    """The long-run rate of a rate axis, per second."""
    if rate.strategy == "tokenBucket":
        return rate.refill_per_sec or None
    span = rate.period_ms if rate.strategy == "gcra" else rate.window_ms
    return rate.limit * 1000 / span if span else None


def families(views: tuple[WaitingView, ...], now_ms: int) -> Iterator[Any]:
    """Prometheus metric families of the waiting rooms (policy labels only: keys are never labels)."""
    from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

    from taskgate.backends.waiting import WAIT_BUCKETS_S

    waiting = GaugeMetricFamily("taskgate_waiting", "tasks waiting in the engine's rooms", labels=["policy"])
    oldest = GaugeMetricFamily(
        "taskgate_waiting_oldest_seconds", "how long the oldest waiting task has waited", labels=["policy"]
    )
    hist = HistogramMetricFamily(
        "taskgate_wait_seconds", "the wait of claimed tasks, parked to claimed", labels=["policy"]
    )
    for v in views:
        waiting.add_metric([v.policy], v.waiting)
        oldest.add_metric([v.policy], max(0, now_ms - v.oldest_parked_at) / 1000 if v.oldest_parked_at else 0)
        cum, buckets = 0, []
        for le, n in zip([*map(str, WAIT_BUCKETS_S), "+Inf"], v.wait_buckets, strict=True):
            cum += n
            buckets.append((le, cum))
        hist.add_metric([v.policy], buckets, v.wait_sum_ms / 1000)
    yield waiting
    yield oldest
    yield hist
