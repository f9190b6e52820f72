"""Fairness weights: how the waiting rooms of a policy split its slots across fair keys.

A task declared with ``fair_key=`` waits in its room as one of that fair key's tasks, and the room serves fair
keys by start-time fair queueing (``engine/lua/room.lua``): a fair key of weight ``w`` gets ``w / (sum of the
waiting fair keys' weights)`` of what the policy admits. A weight comes from, first to last:

1. the store: one hash per policy, ``{prefix}:{P}:fw`` (fair key -> weight), written by :func:`set_weight`
   (``taskgate fairness set POLICY FAIRKEY WEIGHT``);
2. the policy file: ``fairness: {weights: {acme: 3}, defaultWeight: 1}``.

The weights hash is in the slot of ``{P}`` and a room in the slot of its ``{P:K}``, so no script reads both:
the caller reads the weights (:class:`Weights`, cached at most :data:`WEIGHT_CACHE_S` per process, so a change
is in force fleet-wide within a second) and passes the task's weight to the room's script in ARGV.

What each fair key got: the room's scripts count its grants (admitted on arrival or promoted: its *starts*)
per fair key in two windows of :data:`STARTS_WINDOW_MS` kept in the room's own slot (``room.lua``'s s and o:
at most 1,000 fair keys each, the rest counted together, both expiring two windows after the last grant);
:func:`read_fair` reads them, with the tasks waiting per fair key, for ``taskgate top`` and the exporter.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from taskgate.backends._redis_base import UNAVAILABLE as _UNAVAILABLE
from taskgate.backends.redis import RedisBackend
from taskgate.engine.keys import keyset, weights_key
from taskgate.engine.plan import text as _s
from taskgate.logs import key_text, log
from taskgate.policy import Policy

__all__ = [
    "OTHER",
    "STARTS_WINDOW_MS",
    "WEIGHT_CACHE_S",
    "FairStarts",
    "Weights",
    "check_weight",
    "clear_weight",
    "read_fair",
    "set_weight",
    "stored_weights",
    "weights_in_force",
]

WEIGHT_CACHE_S = 1.0
STARTS_WINDOW_MS = 60_000  # as room.lua's ROOM_STARTS_MS
OTHER = "\x1fother"  # the starts of the fair keys past a window's first 1,000 (no fair key holds a \x1f)


def check_weight(weight: object, *, policy: str = "?", fair_key: str = "?") -> float:
    """``weight`` (a number, or a str of one) as a float, or ValueError naming the policy, the fair key and
    the value."""
    w = float("nan")
    if isinstance(weight, (int, float)) and not isinstance(weight, bool):
        w = float(weight)
    elif isinstance(weight, str):
        with contextlib.suppress(ValueError):
            w = float(weight)
    if not (math.isfinite(w) and w > 0):
        raise ValueError(
            f"policy {policy!r}: fairness weight of fair key {fair_key!r} = {weight!r}: expected a number > 0"
        )
    return w


def _check_key(fair_key: object) -> str:
    if not isinstance(fair_key, str) or not fair_key:
        raise ValueError(f"a fair key must be a non-empty str, got {fair_key!r}")
    return fair_key


def set_weight(backend: RedisBackend, policy: str, fair_key: str, weight: float | str) -> float:
    """Store the weight of ``fair_key`` in the rooms of ``policy`` (fleet-wide within a second). Unknown
    policy: :class:`~taskgate.errors.PolicyNotFoundError`."""
    p = backend.policy(policy)
    w = check_weight(weight, policy=p.name, fair_key=_check_key(fair_key))
    _store(backend, "hset", weights_key(backend.prefix, p.name), fair_key, repr(w))
    log.info("taskgate: policy %r: fairness weight of fair key %s set to %s", p.name, key_text(fair_key), w)
    return w


def clear_weight(backend: RedisBackend, policy: str, fair_key: str) -> bool:
    """Remove the stored weight of ``fair_key`` (the policy file's applies again). True if there was one."""
    p = backend.policy(policy)
    n = int(_store(backend, "hdel", weights_key(backend.prefix, p.name), _check_key(fair_key)))
    if n:
        log.info("taskgate: policy %r: stored weight of fair key %s removed", p.name, key_text(fair_key))
    return n > 0


def stored_weights(backend: RedisBackend, policy: str) -> dict[str, float]:
    """The weights stored for ``policy`` (not those of the policy file)."""
    p = backend.policy(policy)
    raw: Any = _store(backend, "hgetall", weights_key(backend.prefix, p.name))
    return {_s(k): float(_s(v)) for k, v in (raw or {}).items()}


def weights_in_force(backend: RedisBackend, policy: str) -> tuple[float, dict[str, tuple[float, str]]]:
    """(the default weight, fair key -> (weight, "store" or "policy file")) of every fair key named."""
    p = backend.policy(policy)
    out = {k: (w, "policy file") for k, w in p.fairness.weights}
    out.update({k: (w, "store") for k, w in stored_weights(backend, p.name).items()})
    return p.fairness.default_weight, out


def _store(backend: RedisBackend, command: str, *args: str) -> Any:
    try:
        return getattr(backend.client, command)(*args)
    except _UNAVAILABLE as e:
        raise backend._unavailable(e) from e


class Weights:
    """The weight of a fair key in force (store, then policy file), each policy's stored weights read at
    most once per ``ttl_s`` per process. Thread-safe."""

    def __init__(self, backend: RedisBackend, ttl_s: float = WEIGHT_CACHE_S) -> None:
        self.backend = backend
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, dict[str, float]]] = {}
        self._lock = threading.Lock()

    def _stored(self, policy: Policy) -> dict[str, float]:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(policy.name)
        if hit is not None and hit[0] > now:
            return hit[1]
        stored = stored_weights(self.backend, policy.name)
        with self._lock:
            self._cache[policy.name] = (now + self.ttl_s, stored)
        return stored

    def weight(self, policy: Policy, fair_key: str) -> float:
        if not fair_key:
            return policy.fairness.default_weight
        w = self._stored(policy).get(fair_key)
        return w if w is not None and w > 0 else policy.fairness.weight(fair_key)

    def table(self, policy: Policy) -> tuple[float, dict[str, float]]:
        """(the default weight, fair key -> weight) for every fair key given a weight (file or store)."""
        out = dict(policy.fairness.weights)
        out.update({k: w for k, w in self._stored(policy).items() if w > 0})
        return policy.fairness.default_weight, out


@dataclass(frozen=True, slots=True)
class FairStarts:
    """One room's starts per fair key (``""``: work without one; :data:`OTHER`: the fair keys past a window's
    first 1,000) in its current window (from ``window_start``, epoch-ms) and the one before, and its tasks
    waiting per fair key."""

    policy: str
    key: str
    window_start: int  # 0: no start in the last two windows
    current: dict[str, int]
    previous: dict[str, int]
    waiting: dict[str, int]

    def recent(self, now_ms: int) -> dict[str, float]:
        """Starts per fair key over the last :data:`STARTS_WINDOW_MS` (a sliding estimate: the window before
        counts for the part of it still inside), as of ``now_ms`` (the store's clock)."""
        if not self.window_start:
            return {}
        age = now_ms - self.window_start
        if age >= 2 * STARTS_WINDOW_MS:
            return {}
        if age >= STARTS_WINDOW_MS:  # nothing started in the current window yet: it is the one before
            cur, prev, age = {}, self.current, age - STARTS_WINDOW_MS
        else:
            cur, prev = self.current, self.previous
        part = max(0.0, 1.0 - max(0, age) / STARTS_WINDOW_MS)
        out = {k: float(v) for k, v in cur.items()}
        for k, v in prev.items():
            out[k] = out.get(k, 0.0) + v * part
        return out

    def total(self) -> dict[str, int]:
        """Starts per fair key in both windows (an exact count over a run shorter than one window)."""
        out = dict(self.previous)
        for k, v in self.current.items():
            out[k] = out.get(k, 0) + v
        return out


def _counts(raw: Any) -> tuple[int, dict[str, int]]:
    start, out = 0, {}
    for k, v in (raw or {}).items():
        name = _s(k)
        if name == "w":
            start = int(v)
        elif name == "x":
            out[OTHER] = int(v)
        elif name.startswith("k:"):
            out[name[2:]] = int(v)
    return start, out


def read_fair(backend: RedisBackend, rooms: Sequence[tuple[str, str]]) -> list[FairStarts]:
    """The starts and the tasks waiting per fair key of each room ``(policy, key)``, in one pipeline."""
    pipe = backend.client.pipeline(transaction=False)
    for policy, key in rooms:
        _, f, cur, prev = keyset(backend.prefix, backend.policy(policy), key).fair()
        pipe.hgetall(f)
        pipe.hgetall(cur)
        pipe.hgetall(prev)
    try:
        raw = pipe.execute()
    except _UNAVAILABLE as e:
        raise backend._unavailable(e) from e
    out = []
    for i, (policy, key) in enumerate(rooms):
        f, cur, prev = raw[3 * i : 3 * i + 3]
        waiting = {_s(k)[2:]: int(v) for k, v in (f or {}).items() if _s(k).startswith("n:") and int(v) > 0}
        start, current = _counts(cur)
        _, previous = _counts(prev)
        out.append(FairStarts(policy, key, start, current, previous, waiting))
    return out
