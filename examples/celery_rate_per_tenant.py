# mypy: disallow-untyped-decorators=False
"""Celery: a global rate per tenant, shared by every worker (not Celery's per-worker ``rate_limit``).

Two tenants send webhooks at 5 per second each; tenant A floods, tenant B does not wait behind it.
Denied tasks book their slot and come back exactly once, at it.

Run::

    python examples/celery_rate_per_tenant.py
    python examples/celery_rate_per_tenant.py --redis redis://localhost:6379/0 --broker redis://localhost:6379/1
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import defaultdict

from celery import Celery
from celery.contrib.testing.worker import start_worker

import taskgate.celery

POLICIES = {"webhooks": {"strategy": "gcra", "limit": 5, "period": "1s", "burst": 1}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis", help="taskgate store (default: the embedded memory:// store)")
    ap.add_argument("--broker", default="memory://")
    args = ap.parse_args()
    app = Celery("webhooks", broker=args.broker, set_as_current=False)
    app.conf.update(task_ignore_result=True, broker_transport_options={"polling_interval": 0.01})
    taskgate.celery.install(app, args.redis or "memory://webhooks", policies=POLICIES)
    starts: dict[str, list[float]] = defaultdict(list)
    lock = threading.Lock()

    @app.task(name="hooks.deliver", throttle="webhooks", key="tenant", shared=False)
    def deliver(tenant: str, event: int) -> None:
        with lock:
            starts[tenant].append(time.monotonic())

    t0 = time.monotonic()
    with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False, loglevel="ERROR"):
        for i in range(20):
            deliver.delay("A", i)
        for i in range(5):
            deliver.delay("B", i)
        while sum(map(len, starts.values())) < 25 and time.monotonic() - t0 < 60:
            time.sleep(0.05)
    for tenant, ts in sorted(starts.items()):
        rate = (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 else float("nan")
        print(f"tenant {tenant}: {len(ts)} delivered, last at +{ts[-1] - t0:.1f}s, {rate:.1f}/s")
    a_done, b_done = starts["A"][-1] - t0, starts["B"][-1] - t0
    return 0 if len(starts["A"]) == 20 and len(starts["B"]) == 5 and b_done < a_done else 1


if __name__ == "__main__":
    raise SystemExit(main())
