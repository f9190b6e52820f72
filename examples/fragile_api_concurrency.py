# mypy: disallow-untyped-decorators=False
"""Celery: at most 3 calls in flight to a fragile API, across every worker — and a slot is never lost.

The slot is a lease with a TTL, renewed by a heartbeat while the task runs and released when it ends
(``dropped=True`` if it raised). A worker that dies mid-call frees its slot when the lease expires.

Run::

    python examples/fragile_api_concurrency.py
"""

from __future__ import annotations

import argparse
import random
import threading
import time

from celery import Celery
from celery.contrib.testing.worker import start_worker

import taskgate.celery

POLICIES = {"partner-api": {"concurrency": {"maxLimit": 3, "leaseTtl": "10s"}}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis", help="taskgate store (default: the embedded memory:// store)")
    ap.add_argument("--broker", default="memory://")
    args = ap.parse_args()
    app = Celery("partner", broker=args.broker, set_as_current=False)
    app.conf.update(task_ignore_result=True, broker_transport_options={"polling_interval": 0.01})
    taskgate.celery.install(app, args.redis or "memory://partner", policies=POLICIES)
    lock = threading.Lock()
    state = {"inflight": 0, "peak": 0, "done": 0}

    @app.task(name="partner.sync", throttle="partner-api", shared=False)
    def sync_account(account: int) -> None:
        with lock:
            state["inflight"] += 1
            state["peak"] = max(state["peak"], state["inflight"])
        try:
            time.sleep(random.uniform(0.05, 0.2))  # the fragile API
        finally:
            with lock:
                state["inflight"] -= 1
                state["done"] += 1

    t0 = time.monotonic()
    with start_worker(app, pool="threads", concurrency=8, perform_ping_check=False, loglevel="ERROR"):
        for i in range(40):
            sync_account.delay(i)
        while state["done"] < 40 and time.monotonic() - t0 < 60:
            time.sleep(0.05)
    print(f"{state['done']}/40 accounts synced in {time.monotonic() - t0:.1f}s with 8 worker threads; "
          f"at most {state['peak']} in flight (limit 3)")  # fmt: skip
    return 0 if state["done"] == 40 and state["peak"] <= 3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
