"""RQ jobs in the waiting room at the scale users have: a backlog on one key.

    .venv/bin/python bench/rq_backlog.py [--jobs 20000] [--rate 10] [--workers 2] [--duration 90] [--record]

Real ``rq worker`` processes (``--worker-class tests.apps.rq_room_jobs.RoomWorker --job-class
taskgate.rq.Job --with-scheduler``, forking) on the local Redis: RQ in db 6, the store in db 9
(``deferral.park: always``), every job start recorded in db 6. The workers start on an empty queue (their
idle RSS is read then), then the jobs are enqueued (``enqueue_many``, pipelines of 1,000); the clock starts
at the first enqueue.

Printed: starts/s from t+30 s to the end of ``--duration`` (target >= 95% of the rate), the most starts in any
1-second window from t+30 s (target <= rate + 2), worker RSS (mains and horses) over idle (target <= +50 MiB),
and the room's counts (parked, promoted, waiting). Every process started here is stopped by its PID; keys are
deleted by this run's prefix.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: this file must not shadow the `rq` package
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import redis

from bench._common import delete_prefix, machine_info, record
from tests.fleet import Fleet, max_in_window, read_records

ROOT = Path(__file__).resolve().parent.parent
RQ_URL = "redis://127.0.0.1:6379/6"
STORE_URL = "redis://127.0.0.1:6379/9"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--rate", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--duration", type=float, default=90.0)
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args(argv)
    prefix = f"tgrb{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "TG_PREFIX": prefix,
        "TG_RATE": str(a.rate),
        "TG_STORE": STORE_URL,
        "PYTHONPATH": str(ROOT),
    }
    os.environ.update({k: v for k, v in env.items() if k.startswith("TG_")})
    sys.path.insert(0, str(ROOT))
    from rq import Queue

    import taskgate
    from taskgate.backends.redis import RedisBackend
    from taskgate.backends.waiting import WaitingRoom
    from tests.apps import rq_room_jobs as jobs

    r = redis.Redis.from_url(RQ_URL)
    store = redis.Redis.from_url(STORE_URL)
    q = Queue(prefix, connection=r)
    logdir = ROOT / "integration" / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    w = Fleet(env, logdir, tag=prefix)  # rq workers on one queue, each in its own session
    w.rq(
        prefix,
        RQ_URL,
        "rq-backlog-w",
        n=a.workers,
        worker_class="tests.apps.rq_room_jobs.RoomWorker",
        quiet=True,
    )
    lines: list[str] = []
    ok = False

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    ids: list[str] = []
    try:
        w.wait_ready()
        time.sleep(2)
        idle = w.rss_mib()
        say(
            f"{a.jobs} jobs on one key at {a.rate}/s (gcra, burst 1, park always), {a.workers} x rq worker "
            f"(forking, --with-scheduler); worker RSS {idle:.0f} MiB idle"
        )
        t0 = time.time()
        for i in range(0, a.jobs, 1000):
            batch = [Queue.prepare_data(jobs.paced, (n,)) for n in range(i, min(a.jobs, i + 1000))]
            ids += [j.id for j in q.enqueue_many(batch)]
        sent = time.time() - t0
        say(f"enqueued {a.jobs} in {sent:.1f}s ({a.jobs / sent:.0f}/s)")
        peak_rss = idle
        while time.time() - t0 < a.duration:
            time.sleep(2)
            peak_rss = max(peak_rss, w.rss_mib())
        end = time.time()
        got = read_records(r, prefix, "start")
        ts = sorted(t for _, t, _, _ in got)
        late = [t for t in ts if t0 + 30 <= t <= end]
        r30 = len(late) / (end - t0 - 30)
        top = max_in_window(late)
        twice = len(got) - len({x[0] for x in got})
        b = taskgate.connect(STORE_URL, jobs.POLICIES, prefix=prefix)
        assert isinstance(b, RedisBackend)
        st = WaitingRoom(b).stats("paced", "*")
        b.close()
        ok = r30 >= 0.95 * a.rate and top <= a.rate + 2 and peak_rss - idle <= 50 and twice == 0
        say(
            f"started {len(ts)} in {a.duration:.0f}s (none twice: {twice == 0}); from t+30s: {r30:.2f}/s "
            f"(target >= {0.95 * a.rate:.2f}); most in 1s from t+30s: {top} (target <= {a.rate + 2}; from t: "
            f"{max_in_window(ts)}); worker RSS peak {peak_rss:.0f} MiB (+{peak_rss - idle:.0f} over idle, "
            f"target <= +50); room: parked {st.parked}, promoted {st.promoted}, claimed {st.claimed}, "
            f"waiting {st.depth}; RQ queue {q.count}: " + ("PASS" if ok else "MISS")
        )
    finally:
        w.stop()
        delete_prefix(store, prefix)
        delete_prefix(r, prefix)
        rq_keys = list(r.scan_iter(match=f"rq:*{prefix}*", count=1000))  # its queue, registries, workers
        for i in range(0, len(rq_keys), 1000):
            r.unlink(*rq_keys[i : i + 1000])
        for i in range(0, len(ids), 1000):
            r.unlink(*[f"rq:job:{j}" for j in ids[i : i + 1000]])
            r.unlink(*[f"rq:results:{j}" for j in ids[i : i + 1000]])
    if a.record:
        record(f"bench/rq_backlog.py {' '.join(sys.argv[1:])}", "\n".join(lines), machine_info())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
