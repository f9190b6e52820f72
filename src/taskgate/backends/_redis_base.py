"""What the Redis doors of both sides share: configuration, validation and error mapping (no I/O). The doors
are ``backends/_async/redis.py`` (written once) and its generated sync twin; :mod:`taskgate.backends.redis` is
their public home."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from taskgate.engine.plan import AxesPlanner, Plan
from taskgate.engine.stats_buffer import StatsBuffer, StatsDelta
from taskgate.errors import BackendUnavailableError, TaskgateError
from taskgate.policy import Policies, Policy
from taskgate.types import HeartbeatReply, WindowLease

__all__ = [
    "FLUSH_EVERY_S",
    "UNAVAILABLE",
    "Pending",
    "RedisBase",
    "merge_heartbeats",
    "redact",
    "script_error",
    "slot_groups",
    "time_ms",
]

T = TypeVar("T")
UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)
FLUSH_EVERY_S = 1.0  # cluster mode: the background flusher's period
log = logging.getLogger("taskgate")


def redact(url: str) -> str:
    """The URL without its password."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + netloc, parts.path, parts.query, parts.fragment))


def merge_heartbeats(replies: list[HeartbeatReply]) -> HeartbeatReply:
    return HeartbeatReply(
        [x for r in replies for x in r.live],
        [x for r in replies for x in r.reclaimed],
        min((r.next_deadline for r in replies), default=0),
    )


def script_error(plan: Plan[Any], e: ResponseError) -> TaskgateError:
    return TaskgateError(f"engine script {plan.script.name} failed: {e}")


Pending = list[tuple[str, int, StatsDelta]]


class RedisBase:
    """Configuration, validation and reply handling of both Redis doors."""

    def __init__(
        self, policies: Policies, *, prefix: str = "taskgate", url: str = "redis://", cluster: bool = False
    ) -> None:
        self._plan = AxesPlanner(policies, prefix, cluster=cluster)
        self._stats: StatsBuffer | None = StatsBuffer() if cluster else None
        self.url = redact(url)
        ttls = [p.concurrency.lease_ttl_ms for p in policies.values() if p.concurrency is not None]
        self.heartbeat_interval = (min(ttls) / 3000.0) if ttls else 10.0

    @property
    def policies(self) -> Policies:
        return self._plan.policies

    @property
    def prefix(self) -> str:
        return self._plan.prefix

    def policy(self, name: str) -> Policy:
        return self._plan.policy(name)

    def _unavailable(self, e: BaseException) -> BackendUnavailableError:
        return BackendUnavailableError(f"cannot reach the store at {self.url}: {e}")

    def _collected(self, plan: Plan[T], raw: Any) -> Any:
        """The op's reply; in stats mode collect, the counts it carries go to the buffer."""
        if plan.collect and self._stats is not None:
            self._stats.add(plan.collect, raw[1])
            return raw[0]
        return raw

    def _flush_plans(self, items: Pending) -> list[Plan[None]]:
        return [self._plan.stats_flush(p, sec * 1000, d) for p, sec, d in items]

    def _decision_result(self, plan: Plan[T], raw: Any) -> Any:
        """A pipelined decision's raw result (errors raised as by :meth:`_run`); None: run it again alone."""
        if isinstance(raw, NoScriptError):
            return None
        if isinstance(raw, ResponseError):
            raise script_error(plan, raw) from raw
        if isinstance(raw, BaseException):
            raise self._unavailable(raw) from raw
        return raw

    def _lease_plan(
        self, policy: str, key: str, wants: int, axis: str, now: int | None, tenant: str | None, weight: float
    ) -> Plan[WindowLease]:
        if axis == "rate":
            return self._plan.lease_window(policy, key, wants, now, tenant=tenant, weight=weight)
        if tenant is not None:
            raise ValueError("a split between tenants is of a fixed window's rate (axis 'rate')")
        if axis == "tokens":
            return self._plan.lease_budget(policy, key, wants, now)
        raise ValueError(f"axis must be 'rate' or 'tokens', got {axis!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, policies={sorted(self.policies)})"


# -- Redis Cluster ------------------------------------------------------------------------------------------


def time_ms(t: Any) -> int:
    """Redis ``TIME`` (seconds, microseconds) in epoch-ms."""
    sec, usec = t
    return int(sec) * 1000 + int(usec) // 1000


def slot_groups(client: Any, keys: Sequence[str]) -> list[list[int]]:
    """The indexes of ``keys`` grouped by hash slot, in first-seen order."""
    by_slot: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        by_slot.setdefault(client.keyslot(k), []).append(i)
    return list(by_slot.values())
