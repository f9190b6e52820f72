"""The battle test's waiting-room phase: a backlog parked in the engine survives the faults that matter to it.

Its own store Redis with AOF (``appendfsync always``: ``deferral.park: auto`` parks there because it
persists), a Redis for the bodies' records, two Celery workers (``--pool threads -c 16``, RabbitMQ,
acks_late) on ``tests/apps/room_app.py``, one plain gcra policy on one key. The tasks are sent at once
(most are parked when sent), then, at fractions of the ideal drain time:

- 25%: a worker is SIGKILLed -- its promoter dies with whatever it had taken (rooms leased, hand-offs not
  yet sent); a fresh worker takes its place;
- 50%: the store restarts (``SHUTDOWN``, start again on the same AOF);
- 70%: a worker is SIGSTOPped for 6 s, then continued.

Checks: every task ran (none lost); none ran twice, except a task the killed worker was running (acks_late
redelivery, Celery's own at-least-once, at most once more); the start rate over the run never above the limit
(+2%); outside the 3 seconds after each fault's recovery (the killed worker replaced, the store back, the
stopped worker resumed: granted work held back by the fault starts together), no 2-second window above
2 x limit x 1.03 + burst + 1 (at 100-250/s on a loaded box a start a few ms late crosses a window's edge:
the engine's slots are exact, the starts jitter -- 3%, as the global-rate checks allow); most tasks waited
in the room.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from integration.checks import Check
from integration.procs import RedisServer
from tests.fleet import Fleet, Record, delete_queues, max_in_window, read_records


@dataclass(frozen=True)
class RoomPlan:
    tasks: int
    rate: int  # gcra limit per second (burst 1)


FULL = RoomPlan(tasks=20_000, rate=250)
SHORT = RoomPlan(tasks=2_000, rate=100)
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"


def run(plan: RoomPlan, tmp: Path, logdir: Path, say: Callable[[str], None]) -> tuple[list[Check], list[str]]:
    """Run the phase; (its checks, its fault log)."""
    store = RedisServer("room-store", tmp, logdir / "room-store.log", aof=True).start()
    records = RedisServer("room-records", tmp, logdir / "room-records.log").start()
    prefix = f"tgroom{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "TG_BROKER": AMQP_URL,
        "TG_STORE": store.url(0),
        "TG_RECORD": records.url(0),
        "TG_PREFIX": prefix,
        "TG_QUEUE": f"room-{prefix}",
        "TG_RATE": str(plan.rate),
        "TG_PARK": "auto",
        "TG_ACKS_LATE": "1",
    }
    os.environ.update({k: v for k, v in env.items() if k.startswith("TG_")})
    from tests.apps import room_app

    fleet = Fleet(env, logdir, tag=prefix)  # two Celery workers (-P threads -c 16), then a third
    faults: list[str] = []

    def worker() -> None:
        fleet.celery("tests.apps.room_app", f"room-worker{len(fleet.procs)}", concurrency=16, pool="threads")
        fleet.wait_ready(60)

    rec = records.client(10.0)
    key = f"{prefix}:start"
    try:
        worker()
        worker()
        say(f"room phase: {plan.tasks} tasks on gcra {plan.rate}/s, store Redis with AOF on :{store.port}")
        t0 = time.time()
        for i in range(plan.tasks):
            room_app.paced.apply_async((i,))
        ideal = plan.tasks / plan.rate

        def at(fraction: float) -> None:
            while time.time() < t0 + fraction * ideal:
                time.sleep(0.1)

        at(0.25)
        killed = fleet.procs[0]
        killed_at = time.time()
        killed.kill()
        killed.wait()
        faults.append(f"room: SIGKILL worker 0 (pid {killed.pid}, its promoter) at +{killed_at - t0:.1f}s")
        worker()
        replaced = time.time()  # the killed worker's unacked tasks (acks_late) now run on the others
        at(0.5)
        down, up = store.restart()
        restarted = up
        faults.append(f"room: store restarted (AOF) at +{down - t0:.1f}s, up after {up - down:.2f}s")
        at(0.7)
        stopped = fleet.procs[1]
        os.kill(stopped.pid, signal.SIGSTOP)
        time.sleep(6)
        os.kill(stopped.pid, signal.SIGCONT)
        resumed = time.time()
        faults.append(f"room: SIGSTOP worker 1 for 6 s at +{resumed - 6 - t0:.1f}s")
        deadline = time.time() + ideal + 180
        while rec.llen(key) < plan.tasks and time.time() < deadline:
            time.sleep(1)
        time.sleep(3)  # time for a second run, if there were one
        raw = read_records(rec, prefix, "start")
        counts = _room_counts(store.client(10.0), prefix)
    finally:
        fleet.stop(30)
        delete_queues(room_app.app, env["TG_QUEUE"])
        store.stop()
        records.stop()
    return _checks(plan, raw, killed_at, killed.pid, (replaced, restarted, resumed), counts), faults


def _room_counts(client: Any, prefix: str) -> dict[str, int]:
    out: Counter[str] = Counter()
    for k in client.scan_iter(match=f"{prefix}:*:wm", count=1000):
        for f, v in client.hgetall(k).items():
            out[f.decode()] += int(v)
    return dict(out)


def _checks(
    plan: RoomPlan,
    raw: list[Record],
    killed_at: float,
    killed_pid: int,
    bunching: tuple[float, ...],
    counts: dict[str, int],
) -> list[Check]:
    ids = [r[0] for r in raw]
    times = sorted(r[1] for r in raw)
    n = Counter(ids)
    lost = plan.tasks - len(n)
    cut_short = {r[0] for r in raw if r[2] == killed_pid and r[1] >= killed_at - 2}
    twice = {i for i, c in n.items() if c > 1}
    bad = sorted(i for i in twice if i not in cut_short or n[i] > 2)
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    rate = (len(times) - 1) / span if span else 0.0
    # after the killed worker is replaced (its unacked tasks, granted before, are redelivered), after the
    # store restart (work deferred while it was down comes back) and after the stopped worker resumes (it
    # starts the grants it held), granted tasks start together: those seconds are left out
    calm = [t for t in times if not any(b <= t < b + 3 for b in bunching)]
    top = max_in_window(calm, 2.0)
    bound = int(2 * plan.rate * 1.03) + 2
    parked = counts.get("np", 0)
    return [
        Check("room: nothing lost", lost == 0, f"{len(n)}/{plan.tasks} tasks ran"),
        Check(
            "room: none run twice",
            not bad,
            f"{len(twice)} ran twice, all cut short by the SIGKILL (acks_late redelivery)"
            if not bad
            else f"{len(bad)} ran twice without being cut short: {bad[:5]}",
        ),
        Check(
            "room: the limit held",
            rate <= plan.rate * 1.02 and top <= bound,
            f"{rate:.2f} starts/s over {span:.0f}s (limit {plan.rate}); most in 2 s {top} outside the 3 s "
            f"after each fault's recovery (2 x limit x 1.03 + burst + 1 = {bound})",
        ),
        Check(
            "room: the backlog waited in the engine",
            parked >= plan.tasks // 2 and counts.get("npr", 0) >= parked - 1,
            f"parked {parked} ({counts.get('nsp', 0)} when sent), promoted {counts.get('npr', 0)}, "
            f"grants claimed {counts.get('ncl', 0)}",
        ),
    ]
