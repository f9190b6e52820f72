"""The Monitor service of ``taskgate serve`` (``throttlekit.v1.Monitor``): read-only, loopback-only unless the
server has a secret.

- ``GetSnapshot``: the fleet-wide counters of every policy, read from the store
  (:func:`taskgate.stats.read_snapshot_async`; the same numbers ``taskgate top`` and the exporter show).
  ``PolicySummary.allowed``/``denied`` count the last ``meta.window_ms``; ``limit`` is the rate axis'
  ceiling (else the slot limit); ``latency`` is this server process's store time per decision (its last
  1024); ``top_denied`` is over the current and the previous minute (``top_requested`` is not tracked: it
  would cost every decision a write). ``guards`` are the policy-wide concurrency limits (``inflight`` of
  ``limit``, ``share`` = inflight / limit; ``nodes`` 0: not tracked). ``recent_denials`` are this process's
  last 50. ``raw_json`` holds taskgate's whole :class:`~taskgate.stats.Snapshot` (totals, booked, tokens,
  leases, wait, top spenders, each top key's budgets).
- ``Watch``: a live feed of this process's denials (``policy`` "" = all). Each subscriber has a bounded
  queue; a reader too slow for the feed loses events (never the server's memory).

Access: a server started with a secret (``--secret-file``) already requires ``authorization: Bearer
<secret>`` on every call (``x-monitor-secret: <secret>`` also opens the Monitor, as ThrottleKit's clients
send it), and then the Monitor answers any peer; without a secret it answers only loopback
peers (and Unix sockets), ``PERMISSION_DENIED`` otherwise.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import statistics
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from taskgate._proto import throttlekit_pb2 as pb
from taskgate._proto import throttlekit_pb2_grpc as pbg
from taskgate._version import __version__
from taskgate.server.errors import map_errors
from taskgate.server.hooks import DecisionEvent, ServiceContext, register_service
from taskgate.stats import Snapshot, read_snapshot_async

__all__ = ["MONITOR", "DenialFeed", "MonitorService", "is_loopback_peer", "snapshot_message"]

MONITOR = pb.DESCRIPTOR.services_by_name["Monitor"].full_name
QUEUE_SIZE = 256  # events a Watch subscriber may lag behind before it loses some
RECENT = 50  # recent denials kept for GetSnapshot
LATENCIES = 1024  # decisions per policy kept for the latency summary
_DECISION_AXIS = {"Check": "rate", "CheckMany": "rate", "Debit": "cost"}
_Ctx = Any  # grpc.aio.ServicerContext


def is_loopback_peer(peer: str) -> bool:
    """True for ``ipv4:127.x:port``, ``ipv6:[::1]:port`` and Unix-socket peers (grpc's ``context.peer()``)."""
    kind, _, rest = peer.partition(":")
    if kind in ("unix", "unix-abstract"):
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@dataclass(eq=False)
class Subscriber:
    policy: str
    queue: asyncio.Queue[pb.DenialEvent] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))
    dropped: int = 0


class DenialFeed:
    """A decision listener (``ctx.listeners``): keeps the recent denials and per-policy latencies, and fans
    denials out to Watch subscribers, each through a bounded queue that drops for a slow reader."""

    def __init__(self, queue_size: int = QUEUE_SIZE) -> None:
        self.queue_size = queue_size
        self.subscribers: set[Subscriber] = set()
        self.recent: deque[pb.DenialEvent] = deque(maxlen=RECENT)
        self.latency: dict[str, deque[float]] = {}
        self.dropped = 0

    def subscribe(self, policy: str = "") -> Subscriber:
        sub = Subscriber(policy, asyncio.Queue(self.queue_size))
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def __call__(self, ev: DecisionEvent) -> None:
        if ev.op not in ("Check", "CheckMany", "Debit", "Admit"):
            return
        if not ev.failed:
            lat = self.latency.get(ev.policy)
            if lat is None:
                lat = self.latency[ev.policy] = deque(maxlen=LATENCIES)
            lat.append(ev.elapsed_ns / 1e6)
        d = ev.decision
        if d.allowed:
            return
        denial = pb.DenialEvent(
            at=int(time.time() * 1000),
            policy=ev.policy,
            key=ev.key,
            axis="unavailable" if ev.failed else (ev.axis or _DECISION_AXIS.get(ev.op, "rate")),
            limit=d.limit,
            remaining=d.remaining,
            retry_after_ms=d.retry_after_ms,
        )
        self.recent.append(denial)
        for sub in self.subscribers:
            if sub.policy and sub.policy != ev.policy:
                continue
            try:
                sub.queue.put_nowait(denial)
            except asyncio.QueueFull:
                sub.dropped += 1
                self.dropped += 1

    def latency_summary(self, policy: str) -> pb.LatencySummary:
        lat = sorted(self.latency.get(policy, ()))
        if not lat:
            return pb.LatencySummary()
        return pb.LatencySummary(
            avg_ms=statistics.fmean(lat),
            p50_ms=lat[len(lat) // 2],
            p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            max_ms=lat[-1],
            n=len(lat),
        )


def snapshot_message(snap: Snapshot, feed: DenialFeed | None = None, node: str = "") -> pb.Snapshot:
    """The Monitor ``Snapshot`` message of a :class:`~taskgate.stats.Snapshot` (pure)."""
    out = pb.Snapshot(
        meta=pb.MonitorMeta(
            generated_at=snap.generated_at,
            window_ms=snap.window_s * 1000,
            mode="store",
            lens_version=f"taskgate {__version__}",
            node_id=node,
        ),
        raw_json=snap.to_json(),
    )
    for p in snap.policies:
        summary = pb.PolicySummary(
            name=p.name,
            kind=p.kind,
            strategy=p.strategy,
            allowed=p.window.allowed,
            denied=p.window.denied,
            limit=p.limit,
            top_denied=[pb.KeyCount(key=k.key, count=k.count) for k in p.top_denied],
        )
        if feed is not None:
            summary.latency.CopyFrom(feed.latency_summary(p.name))
        out.policies.append(summary)
        if p.inflight is not None and p.concurrency_limit:
            out.guards.append(
                pb.GuardSummary(
                    name=p.name,
                    limit=p.concurrency_limit,
                    inflight=p.inflight,
                    share=p.inflight / p.concurrency_limit,
                    l_global=p.concurrency_limit,
                )
            )
    if feed is not None:
        out.recent_denials.extend(feed.recent)
    return out


@map_errors
class MonitorService(pbg.MonitorServicer):
    def __init__(self, ctx: ServiceContext, feed: DenialFeed) -> None:
        self._b = ctx.backend
        self._feed = feed
        self._open = ctx.config.secret_file is not None  # the secret interceptor guards every call
        self._node = f"{socket.gethostname()}:{os.getpid()}"

    async def _guard(self, context: _Ctx) -> None:
        if self._open or is_loopback_peer(context.peer() or ""):
            return
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            "the Monitor answers loopback peers only, unless the server has a secret (--secret-file)",
        )

    async def GetSnapshot(self, request: pb.GetSnapshotRequest, context: _Ctx) -> pb.GetSnapshotResponse:
        await self._guard(context)
        b = self._b
        snap = await read_snapshot_async(b.client, b.policies, b.prefix)
        return pb.GetSnapshotResponse(snapshot=snapshot_message(snap, self._feed, self._node))

    async def Watch(self, request: pb.WatchRequest, context: _Ctx) -> AsyncIterator[pb.WatchResponse]:
        await self._guard(context)
        if request.policy:
            self._b.policy(request.policy)  # NOT_FOUND for an unknown policy
        sub = self._feed.subscribe(request.policy)
        try:
            while True:
                yield pb.WatchResponse(denial=await sub.queue.get())
        finally:
            self._feed.unsubscribe(sub)


@register_service
def _register(server: Any, ctx: ServiceContext) -> str:
    feed = DenialFeed()
    ctx.listeners.append(feed)
    pbg.add_MonitorServicer_to_server(MonitorService(ctx, feed), server)
    return MONITOR
