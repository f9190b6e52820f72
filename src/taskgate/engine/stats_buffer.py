"""Counts the engine returns instead of writing them (counters on Redis Cluster, mode ``collect``: see
:mod:`taskgate.engine.keys`), summed per policy until a door sends them with ``Planner.stats_flush``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from taskgate.engine.decode import text
from taskgate.engine.keys import STATS_FLUSH_S


@dataclass
class StatsDelta:
    """Counts collected by decisions (cluster mode), summed until they are sent."""

    counters: dict[str, int] = field(default_factory=dict)
    denied: dict[str, int] = field(default_factory=dict)
    spent: dict[str, int] = field(default_factory=dict)

    def add(self, raw: Sequence[Any], at: int = 1) -> None:
        """Add the deltas of one reply (the part after ``now``: see ``lua/stats.lua``)."""
        for m in (self.counters, self.denied, self.spent):
            n = int(raw[at])
            for j in range(n):
                name = text(raw[at + 1 + 2 * j])
                m[name] = m.get(name, 0) + int(raw[at + 2 + 2 * j])
            at += 1 + 2 * n

    def merge(self, other: StatsDelta) -> None:
        for mine, theirs in (
            (self.counters, other.counters),
            (self.denied, other.denied),
            (self.spent, other.spent),
        ):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v

    def args(self) -> list[str | int | float]:
        out: list[str | int | float] = []
        for m in (self.counters, self.denied, self.spent):
            out.append(len(m))
            for k, v in m.items():
                out += [k, v]
        return out


class StatsBuffer:
    """Deltas of cluster-mode decisions per (policy, second), thread-safe. ``due()`` once the oldest has
    waited ``flush_s``: the backend then sends them with its next call (pipelined) or from its timer."""

    def __init__(self, flush_s: float = STATS_FLUSH_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.flush_s = flush_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int], StatsDelta] = {}
        self._since = 0.0

    def add(self, policy: str, raw: Sequence[Any]) -> None:
        """Add a reply's deltas (``{now, nc, ...}``) for ``policy``."""
        sec = int(raw[0]) // 1000
        with self._lock:
            if not self._pending:
                self._since = self._clock()
            d = self._pending.get((policy, sec))
            if d is None:
                d = self._pending[(policy, sec)] = StatsDelta()
            d.add(raw)

    def __bool__(self) -> bool:
        return bool(self._pending)

    def due(self) -> bool:
        return bool(self._pending) and self._clock() - self._since >= self.flush_s

    def take(self) -> list[tuple[str, int, StatsDelta]]:
        with self._lock:
            items, self._pending = self._pending, {}
        return [(p, sec, d) for (p, sec), d in items.items()]

    def put_back(self, items: list[tuple[str, int, StatsDelta]]) -> None:
        """Keep deltas that could not be sent, for the next try."""
        with self._lock:
            if not self._pending:
                self._since = self._clock()
            for p, sec, d in items:
                mine = self._pending.get((p, sec))
                if mine is None:
                    self._pending[(p, sec)] = d
                else:
                    mine.merge(d)
