"""``taskgate demo``: the main job on the embedded default — no Redis, no broker needed.

An in-process Celery worker (memory broker, 4 threads) runs LLM-like tasks for three tenants under one
unified policy: a per-tenant request rate, a fleet-wide in-flight cap and a per-tenant token budget
(escrow: the estimate is reserved before the call, the actual usage settled after). A live view shows each
tenant's progress, deferrals and token use; a closing table shows that every limit held.
``--redis URL`` / ``--broker URL`` run the same demo on real services.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

RATE, BURST, INFLIGHT, BUDGET, WINDOW_S = 12, 2, 4, 3000, 5
TENANTS = {"acme": 45, "globex": 30, "initech": 25}
DEMO_POLICIES = {
    "llm": {
        "description": "per-tenant requests/s, fleet-wide in-flight cap, per-tenant tokens per window",
        "strategy": "gcra",
        "limit": RATE,
        "period": "1s",
        "burst": BURST,
        "concurrency": {"maxLimit": INFLIGHT, "leaseTtl": "10s"},
        "tokenBudget": {"budget": BUDGET, "window": f"{WINDOW_S}s"},
    }
}


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    starts: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    done: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    deferrals: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    tokens: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))
    inflight: int = 0
    max_inflight: int = 0


def _peak_per_window(times: list[float], width: float) -> int:
    times = sorted(times)
    j = best = 0
    for i, t in enumerate(times):
        while times[j] <= t - width:
            j += 1
        best = max(best, i - j + 1)
    return best


def run(redis_url: str | None = None, broker: str | None = None, seed: int | None = None) -> int:
    """Run the demo; returns 0 when every limit held."""
    import logging

    try:
        from celery import Celery
    except ImportError:
        raise SystemExit("taskgate demo runs a Celery worker: pip install 'taskgate[celery]'") from None
    from celery.contrib.testing.worker import start_worker
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    import taskgate
    import taskgate.celery

    rng = random.Random(seed)
    console = Console()
    prefix = f"tgdemo{uuid.uuid4().hex[:8]}"
    store = redis_url or f"memory://demo-{prefix}"
    backend = taskgate.connect(store, DEMO_POLICIES, prefix=prefix)
    app = Celery("taskgate_demo", broker=broker or "memory://", set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        broker_connection_retry=False,
        broker_transport_options={"polling_interval": 0.01},
    )
    taskgate.celery.install(app, backend)
    tally = Tally()
    logging.getLogger("celery").setLevel(logging.ERROR)

    @app.task(  # type: ignore[untyped-decorator]
        name="demo.summarize",
        throttle="llm",
        key="tenant",
        tokens=lambda tenant, doc, max_tokens: len(doc) // 4 + max_tokens,
        shared=False,
    )
    def summarize(tenant: str, doc: str, max_tokens: int) -> int:
        started = time.time()  # the budget charged the estimate in this window, at admission
        with tally.lock:
            tally.starts[tenant].append(time.monotonic())
            tally.inflight += 1
            tally.max_inflight = max(tally.max_inflight, tally.inflight)
        try:
            time.sleep(rng.uniform(0.05, 0.35))  # the "LLM call"
            used = len(doc) // 4 + rng.randint(max_tokens // 4, max_tokens)  # actual <= estimate
            taskgate.current().settle(
                {"prompt_tokens": len(doc) // 4, "completion_tokens": used - len(doc) // 4}
            )
            with tally.lock:
                tally.tokens[tenant].append((started, used))
            return used
        finally:
            with tally.lock:
                tally.inflight -= 1
                tally.done[tenant] += 1

    @taskgate.celery.task_throttled.connect(weak=False)  # type: ignore[untyped-decorator]
    def _deferred(sender: Any = None, **kw: Any) -> None:
        if getattr(sender, "name", "") == "demo.summarize":
            tenant = (sender.request.kwargs or {}).get("tenant") or (sender.request.args or ["?"])[0]
            with tally.lock:
                tally.deferrals[str(tenant)] += 1

    total = sum(TENANTS.values())
    console.print(
        f"[bold]taskgate demo[/] — {total} LLM-like tasks for {len(TENANTS)} tenants on "
        f"{'Redis ' + backend.url if redis_url else 'the embedded store (memory://)'}, "
        f"broker {broker or 'memory://'}, 4 worker threads\n"
        f"policy [cyan]llm[/]: {RATE} requests/s per tenant (burst {BURST}), at most {INFLIGHT} in flight "
        f"fleet-wide, {BUDGET} tokens per {WINDOW_S}s per tenant (escrow: reserve, then settle)"
    )

    def view() -> Table:
        t = Table(expand=False)
        for col in ("tenant", "done", "deferrals", f"tokens this {WINDOW_S}s window"):
            t.add_column(col)
        now = time.time()
        start = now - now % WINDOW_S
        with tally.lock:
            for tenant, n in TENANTS.items():
                used = sum(u for ts, u in tally.tokens[tenant] if ts >= start)
                bar = "█" * int(20 * min(used, BUDGET) / BUDGET)
                t.add_row(
                    tenant,
                    f"{tally.done[tenant]}/{n}",
                    str(tally.deferrals[tenant]),
                    f"{bar:<20} {used}/{BUDGET}",
                )
            t.caption = f"in flight {tally.inflight}/{INFLIGHT}"
        return t

    t0 = time.monotonic()
    with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False, loglevel="ERROR"):
        jobs = [tenant for tenant, n in TENANTS.items() for _ in range(n)]
        rng.shuffle(jobs)
        for tenant in jobs:
            doc = "lorem ipsum " * rng.randint(20, 60)
            summarize.apply_async(kwargs={"tenant": tenant, "doc": doc, "max_tokens": 150})
        with Live(view(), console=console, refresh_per_second=8, transient=False) as live:
            while sum(tally.done.values()) < total and time.monotonic() - t0 < 120:
                time.sleep(0.125)
                live.update(view())
            live.update(view())
    elapsed = time.monotonic() - t0
    backend.close()
    console.print()

    ok = True
    table = Table(title=f"every limit held? ({sum(tally.done.values())}/{total} tasks in {elapsed:.1f}s)")
    for col in ("limit", "allowed", "observed", "held"):
        table.add_column(col)
    peak_rate = max(_peak_per_window(v, 1.0) for v in tally.starts.values())
    rows = [("rate per tenant (any 1 s)", RATE + BURST, peak_rate)]
    rows.append(("in flight (fleet-wide)", INFLIGHT, tally.max_inflight))
    for tenant in TENANTS:
        windows: dict[int, int] = defaultdict(int)
        for ts, used in tally.tokens[tenant]:
            windows[int(ts // WINDOW_S)] += used
        rows.append((f"tokens per {WINDOW_S}s window, {tenant}", BUDGET, max(windows.values(), default=0)))
    rows.append(("tasks lost", 0, total - sum(tally.done.values())))
    for name, allowed, seen in rows:
        held = seen <= allowed
        ok &= held
        table.add_row(name, str(allowed), str(seen), "[green]yes[/]" if held else "[red]NO[/]")
    console.print(table)
    console.print(f"deferrals: {sum(tally.deferrals.values())} (re-queued with a countdown, none dropped)")
    return 0 if ok else 1
