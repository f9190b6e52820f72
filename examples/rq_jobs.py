"""RQ: throttled jobs, admitted by the worker before the job runs, deferred through RQ's scheduler.

Single process here (RQ on fakeredis, the embedded store, a SimpleWorker in a thread with its scheduler);
in production the same jobs run under ``rq worker --worker-class taskgate.rq.Worker --job-class
taskgate.rq.Job --with-scheduler`` with ``TASKGATE_URL`` / ``TASKGATE_POLICIES`` set.

Run::

    python examples/rq_jobs.py
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import taskgate
import taskgate.rq

POLICIES = {
    "geocoder": {"strategy": "gcra", "limit": 4, "period": "1s", "burst": 1},  # a partner API's 4 requests/s
    "llm": {"concurrency": {"maxLimit": 2}, "tokenBudget": {"budget": 5000, "window": "1m"}},
}
STARTS: list[tuple[str, float]] = []


@taskgate.rq.throttled("geocoder", key="country")
def geocode(country: str, address: str) -> str:
    STARTS.append(("geocode", time.monotonic()))
    return f"{address}, {country}"


@taskgate.rq.throttled("llm", key="tenant", tokens=lambda text: len(text) // 4 + 200)
def summarize(tenant: str, text: str) -> str:
    STARTS.append(("summarize", time.monotonic()))
    time.sleep(0.1)
    taskgate.current().settle(len(text) // 4 + 50)
    return text[:20]


def main() -> int:
    import fakeredis
    from rq import Queue

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from examples import rq_jobs as jobs  # RQ runs functions of importable modules, not of __main__

    taskgate.rq.configure(taskgate.connect("memory://rq-example", POLICIES))
    conn = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    q = Queue("default", connection=conn)
    batch = [q.enqueue(jobs.geocode, "FR", f"{i} rue de la Paix") for i in range(8)]
    batch += [q.enqueue(jobs.summarize, "acme", "lorem ipsum " * 100) for _ in range(4)]
    worker = taskgate.rq.SimpleWorker([q], connection=conn)
    worker.scheduler_interval = 0.2
    t0 = time.monotonic()
    thread = threading.Thread(
        target=worker.work, kwargs={"with_scheduler": True, "logging_level": "WARNING"}, daemon=True
    )
    thread.start()
    while time.monotonic() - t0 < 30 and not all(j.is_finished for j in batch):
        time.sleep(0.1)
    worker.stop()
    q.enqueue(jobs.geocode, "FR", "wake the worker up")
    thread.join(10)
    geo = [t for kind, t in jobs.STARTS if kind == "geocode"][:8]
    print(f"{sum(j.is_finished for j in batch)}/{len(batch)} jobs finished in {time.monotonic() - t0:.1f}s")
    if len(geo) > 1:
        print(f"geocode: {len(geo)} calls at {(len(geo) - 1) / (geo[-1] - geo[0]):.1f}/s (limit 4/s)")
    return 0 if all(j.is_finished for j in batch) else 1


if __name__ == "__main__":
    raise SystemExit(main())
