"""Prometheus metrics: the fleet-wide counters the engine keeps in the store, read on every scrape.

::

    taskgate exporter --redis URL --config POLICIES --listen HOST:PORT   # standalone
    taskgate serve ... --metrics HOST:PORT                               # beside the gRPC door

Every worker and every server writes the same counters in the store (``engine/lua/stats.lua``), so one
exporter anywhere shows the whole fleet; several exporters show the same numbers. The metrics, each labelled
by ``policy``:

===================================== ======= ==============================================================
``taskgate_decisions_total``          counter ``outcome`` allowed (``axis`` "") or denied (``axis`` rate,
                                              concurrency or cost: the policy's axes; provider: admit
                                              denied by a provider's hold or pacing): check, check_many
                                              (per key), admit, debit, reserve
``taskgate_booked_total``             counter denials that booked a future slot (deferred with a slot)
``taskgate_retry_after_seconds_total`` counter the waits handed to denied work (/ denials = the mean wait)
``taskgate_tokens_total``             counter ``kind`` reserved, charged or refunded (cost axis)
``taskgate_leases_total``             counter ``event`` acquired, released or reclaimed (concurrency axis)
``taskgate_provider_429s_total``      counter 429s the provider answered, as reported (``report``)
``taskgate_provider_hold_seconds_total`` counter the hold time those reports added (fleet-wide holds)
``taskgate_inflight``                 gauge   leases held now (policy-wide concurrency limits)
``taskgate_concurrency_limit``        gauge   the current (adaptive) limit; the ceiling per key for per-key
``taskgate_counters_enabled``         gauge   1 unless the policy says ``counters: false``
``taskgate_up``                       gauge   1 if the store answered this scrape (no label)
``taskgate_waiting``                  gauge   tasks waiting in the engine's waiting rooms
``taskgate_waiting_oldest_seconds``   gauge   how long the oldest of them has waited
``taskgate_wait_seconds``             histo   wait of the tasks claimed, parked to claimed (``_bucket``, ...)
``taskgate_fair_start_share``         gauge   ``fair_key``: its share of the policy's starts, last minute
``taskgate_fair_weight_share``        gauge   ``fair_key``: its weight's share among the fair keys active
``taskgate_fair_starts``              gauge   ``fair_key``: its starts over the last minute
``taskgate_fair_waiting``             gauge   ``fair_key``: its tasks waiting in the rooms
===================================== ======= ==============================================================

Counters restart from 0 when a policy's counters expire (idle for a day) or the store is flushed, which
Prometheus' ``rate()`` handles as a counter reset. Limit keys are never labels: they can be personal data and
their number is unbounded; ``taskgate top`` and the Monitor door show the top keys. Fair keys (tenants) are,
bounded: per policy the ``fair_top`` (10) with the most starts over the last minute, the rest summed as
``fair_key="other"`` (``"(none)"``: work without a fair key); ``fair_top=0`` labels none of them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from taskgate.stats import Snapshot
from taskgate.waiting_view import FAIR_TOP
from taskgate.waiting_view import families as waiting_families

__all__ = ["TaskgateCollector", "parse_listen", "serve", "start_exporter"]

log = logging.getLogger("taskgate")


class TaskgateCollector(Collector):
    """A Collector that reads a :class:`~taskgate.stats.Snapshot` (``read()``) on each scrape."""

    def __init__(self, read: Callable[[], Snapshot]) -> None:
        self._read = read

    def describe(self) -> list[Metric]:
        return []  # no read at registration

    def collect(self) -> Iterator[Metric]:
        t0 = time.perf_counter()
        up = GaugeMetricFamily("taskgate_up", "1 if the store answered this scrape")
        try:
            snap = self._read()
        except Exception as e:
            log.warning("taskgate: metrics: cannot read the counters: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families(snap)
        yield from waiting_families(snap.waiting, snap.generated_at)
        took = GaugeMetricFamily("taskgate_scrape_seconds", "time spent reading the store for this scrape")
        took.add_metric([], time.perf_counter() - t0)
        yield took


def families(snap: Snapshot) -> Iterator[Metric]:
    """The metric families of one snapshot (pure)."""
    decisions = CounterMetricFamily(
        "taskgate_decisions",
        "decisions by outcome and, for denials, the axis",
        labels=["policy", "outcome", "axis"],
    )
    booked = CounterMetricFamily("taskgate_booked", "denials that booked a future slot", labels=["policy"])
    wait = CounterMetricFamily(
        "taskgate_retry_after_seconds", "sum of the retry_after handed to denied work", labels=["policy"]
    )
    tokens = CounterMetricFamily("taskgate_tokens", "tokens on the cost axis", labels=["policy", "kind"])
    leases = CounterMetricFamily("taskgate_leases", "concurrency leases", labels=["policy", "event"])
    inflight = GaugeMetricFamily(
        "taskgate_inflight", "leases held now (policy-wide limits)", labels=["policy"]
    )
    limit = GaugeMetricFamily(
        "taskgate_concurrency_limit", "the current concurrency limit", labels=["policy"]
    )
    enabled = GaugeMetricFamily(
        "taskgate_counters_enabled", "1 if the policy keeps counters", labels=["policy"]
    )
    p429 = CounterMetricFamily("taskgate_provider_429s", "429s reported by the provider", labels=["policy"])
    held = CounterMetricFamily(
        "taskgate_provider_hold_seconds", "hold time added by the provider's reports", labels=["policy"]
    )
    for p in snap.policies:
        t = p.totals
        enabled.add_metric([p.name], 1 if p.counters else 0)
        if p.inflight is not None:
            inflight.add_metric([p.name], p.inflight)
        if p.concurrency_limit is not None:
            limit.add_metric([p.name], p.concurrency_limit)
        if not p.counters:
            continue
        decisions.add_metric([p.name, "allowed", ""], t.allowed)
        for axis in (*p.axes, "provider"):
            decisions.add_metric([p.name, "denied", axis], t.denied_by(axis))
        p429.add_metric([p.name], t.provider_429s)
        held.add_metric([p.name], t.provider_hold_ms / 1000.0)
        booked.add_metric([p.name], t.booked)
        wait.add_metric([p.name], t.wait_ms / 1000.0)
        if "cost" in p.axes:
            for kind, v in (
                ("reserved", t.tokens_reserved),
                ("charged", t.tokens_charged),
                ("refunded", t.tokens_refunded),
            ):
                tokens.add_metric([p.name, kind], v)
        if "concurrency" in p.axes:
            for event, v in (
                ("acquired", t.leases_acquired),
                ("released", t.leases_released),
                ("reclaimed", t.leases_reclaimed),
            ):
                leases.add_metric([p.name, event], v)
    yield from (decisions, booked, wait, tokens, leases, inflight, limit, enabled, p429, held)


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) -> (host, port); port 0 picks a free one."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:9464), got {listen!r}")
    return host.strip("[]"), int(port)


def serve(collector: Collector, listen: str) -> tuple[Any, int]:
    """Serve ``/metrics`` with only ``collector`` on ``listen`` from a daemon thread: (server, bound port)."""
    from prometheus_client import start_http_server

    host, port = parse_listen(listen)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server, int(server.server_port)


def start_exporter(
    url: str, policies: Any, prefix: str, listen: str, *, fair_top: int = FAIR_TOP
) -> tuple[Any, int]:
    """An exporter of the counters of ``policies`` in the store at ``url`` (redis://, rediss://, unix://,
    redis+cluster://, memory://), served on ``listen``: (server, bound port). ``fair_top``: fair keys
    labelled per policy (the rest: ``other``)."""
    from taskgate.backends import connect
    from taskgate.backends.redis import RedisBackend
    from taskgate.stats import read_snapshot
    from taskgate.waiting_view import read_waiting

    backend = connect(url, policies, prefix=prefix)
    if not isinstance(backend, RedisBackend):
        raise ValueError(
            f"the exporter reads the store itself: give a redis:// or memory:// URL, not {url!r}"
        )

    def read() -> Snapshot:
        snap = read_snapshot(backend.client, backend.policies, backend.prefix)
        return dataclasses.replace(snap, waiting=read_waiting(backend, snap.generated_at, fair_top))

    return serve(TaskgateCollector(read), listen)
