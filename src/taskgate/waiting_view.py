"""What operators see of the waiting rooms: per policy, how much waits, since when, and how long it takes.

Read from the store (the rooms' own keys, through the index of rooms): ``taskgate top`` shows a table of it,
the exporter the metrics ``taskgate_waiting{policy}`` (tasks waiting), ``taskgate_waiting_oldest_seconds``
and ``taskgate_wait_seconds`` (histogram of the wait from parked to claimed, kept by the engine in each
room), and ``taskgate rooms`` lists, counts and purges one room.

Fair share (``fair_key=``): per policy, summed over its rooms, each fair key's starts over the last minute
(counted by the rooms' scripts, :func:`~taskgate.backends.fairness.read_fair`) as a share of the policy's,
next to its weight's share among the fair keys active (started in that minute or waiting) and its tasks
waiting: the :data:`FAIR_TOP` fair keys with the most starts (then waiting), the rest summed as ``other``.
A fair key of weight share ``x`` that stayed backlogged gets about ``x`` of the starts; one that had less
work than its share gets less, and the others more (work-conserving).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from taskgate.policy import RateSpec

if TYPE_CHECKING:
    from taskgate.backends.fairness import FairStarts
    from taskgate.backends.waiting import RoomStats

__all__ = ["FAIR_TOP", "FairKeyView", "WaitingView", "families", "fair_view", "read_waiting"]

FAIR_TOP = 10  # fair keys shown per policy (and labelled in the metrics); the rest are summed as "other"
OTHER_LABEL = "other"
NO_FAIR_KEY = "(none)"  # how work without a fair key is shown


@dataclass(frozen=True)
class FairKeyView:
    """One fair key of a policy (or ``other``: the rest summed): its starts over the last minute and their
    share of the policy's, its weight and that weight's share among the active fair keys, its tasks
    waiting."""

    fair_key: str
    starts: float
    start_share: float  # 0..1
    weight: float  # 0 for "other"
    weight_share: float  # 0..1 (for "other": of the fair keys summed in it)
    waiting: int


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
    fair: tuple[FairKeyView, ...] = ()  # the top fair keys, then "other" (empty: no fair key in use)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WaitingView:
        return cls(**{**d, "fair": tuple(FairKeyView(**f) for f in d.get("fair", ()))})


def read_waiting(backend: Any, now_ms: int | None = None, top: int = FAIR_TOP) -> tuple[WaitingView, ...]:
    """Every policy's rooms, from a direct door (``RedisBackend``); empty for another door. ``now_ms``: the
    store's clock (default: read it), for the starts over the last minute."""
    from taskgate.backends.fairness import Weights, read_fair
    from taskgate.backends.redis import RedisBackend
    from taskgate.backends.waiting import WaitingRoom

    if not isinstance(backend, RedisBackend):
        return ()
    room = WaitingRoom(backend)
    known = [(p, k) for p, k, _ in room.rooms() if p in backend.policies]
    by: dict[str, list[RoomStats]] = {}
    for s in room.overview(known):
        by.setdefault(s.policy, []).append(s)
    fair: dict[str, list[FairStarts]] = {}
    for f in read_fair(backend, known):
        fair.setdefault(f.policy, []).append(f)
    now = room.backend_time() if now_ms is None else now_ms
    weights = Weights(backend)
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
                fair_view(fair.get(name, []), *weights.table(p), now, top),
            )
        )
    return tuple(out)


def fair_view(
    rooms: list[FairStarts], default: float, weights: Mapping[str, float], now_ms: int, top: int = FAIR_TOP
) -> tuple[FairKeyView, ...]:
    """The fair keys of one policy's ``rooms`` (summed): the ``top`` with the most starts over the last
    minute (then the most waiting), then ``other``; empty when no fair key was used (only work without
    one)."""
    from taskgate.backends.fairness import OTHER

    starts: dict[str, float] = {}
    waiting: dict[str, int] = {}
    for r in rooms:
        for k, v in r.recent(now_ms).items():
            starts[k] = starts.get(k, 0.0) + v
        for k, n in r.waiting.items():
            waiting[k] = waiting.get(k, 0) + n
    active = [k for k in {*starts, *waiting} - {OTHER} if starts.get(k, 0) > 0 or waiting.get(k, 0) > 0]
    if not active or active == [""]:
        return ()
    w = {k: weights.get(k, default) for k in active}
    total_w = sum(w.values())
    total_s = sum(starts.values())
    ranked = sorted(active, key=lambda k: (-starts.get(k, 0.0), -waiting.get(k, 0), k))

    def view(name: str, keys: list[str], extra: float = 0.0) -> FairKeyView:
        s = sum(starts.get(k, 0.0) for k in keys) + extra
        kw = sum(w[k] for k in keys)
        return FairKeyView(
            name, round(s, 1), s / total_s if total_s else 0.0, kw if len(keys) == 1 and name != OTHER_LABEL
            else 0.0, kw / total_w if total_w else 0.0, sum(waiting.get(k, 0) for k in keys),
        )  # fmt: skip

    out = [view(NO_FAIR_KEY if k == "" else k, [k]) for k in ranked[:top]]
    rest, extra = ranked[top:], starts.get(OTHER, 0.0)
    if rest or extra:
        out.append(view(OTHER_LABEL, rest, extra))
    return tuple(out)


def _per_s(rate: RateSpec) -> float | None:
    """The long-run rate of a rate axis, per second."""
    if rate.strategy == "tokenBucket":
        return rate.refill_per_sec or None
    span = rate.period_ms if rate.strategy == "gcra" else rate.window_ms
    return rate.limit * 1000 / span if span else None


def families(views: tuple[WaitingView, ...], now_ms: int) -> Iterator[Any]:
    """Prometheus metric families of the waiting rooms (policy labels; limit keys are never labels). The fair
    share families carry a ``fair_key`` label, bounded: the :data:`FAIR_TOP` fair keys of each policy, then
    ``other``."""
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
    share = GaugeMetricFamily(
        "taskgate_fair_start_share",
        "a fair key's share of the policy's starts over the last minute",
        labels=["policy", "fair_key"],
    )
    wshare = GaugeMetricFamily(
        "taskgate_fair_weight_share",
        "a fair key's weight share among the fair keys active (started or waiting)",
        labels=["policy", "fair_key"],
    )
    fstarts = GaugeMetricFamily(
        "taskgate_fair_starts", "a fair key's starts over the last minute", labels=["policy", "fair_key"]
    )
    fwait = GaugeMetricFamily(
        "taskgate_fair_waiting", "a fair key's tasks waiting in the rooms", labels=["policy", "fair_key"]
    )  # fmt: skip
    for v in views:
        for f in v.fair:
            labels = [v.policy, f.fair_key]
            share.add_metric(labels, f.start_share)
            wshare.add_metric(labels, f.weight_share)
            fstarts.add_metric(labels, f.starts)
            fwait.add_metric(labels, f.waiting)
    yield waiting
    yield oldest
    yield hist
    yield from (share, wshare, fstarts, fwait)
