"""What the real-worker tests share about the processes they start and what the job bodies record."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import Any

Record = tuple[str, float, int, str]


def read_records(r: Any, prefix: str, kind: str) -> list[Record]:
    """The ``<prefix>:<kind>`` list the bodies append to: ``ident|time|pid|extra`` per entry."""
    out = []
    for raw in r.lrange(f"{prefix}:{kind}", 0, -1):
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        ident, t, pid, extra = text.split("|", 3)
        out.append((ident, float(t), int(pid), extra))
    return out


def stop_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float, *, groups: bool = False) -> None:
    """Warm shutdown (SIGTERM to each), then SIGKILL whatever is still running after ``timeout`` s; with
    ``groups``, SIGKILL each process group too (processes started with ``start_new_session=True``: a child
    such as RQ's scheduler would outlive a worker that had to be killed). By PID only."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)


class GrantLog:
    """A backend, as the workers of a test use it, that also records each rate slot the engine hands out
    (``<prefix>:grant`` in ``record_to``: ``policy:key|time|pid|slot``, ``slot`` the start of the slot taken in
    the engine's own clock, epoch-s): a ``check`` allowed at once, or a denial that booked a future slot.
    Redeeming a booked slot (or coming back too early for it: the same booking again) takes no new one and
    is not recorded. The slot is the engine's: for GCRA, ``reset_at`` (the new theoretical arrival time)
    less one emission interval times the burst; it does not move when a busy worker starts the job late, so
    rate assertions on it hold on a loaded machine."""

    def __init__(self, backend: Any, record_to: Any, prefix: str) -> None:
        self._backend = backend
        self._record_to = record_to
        self._key = f"{prefix}:grant"

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def check(self, policy: str, key: str, cost: int = 1, **kwargs: Any) -> Any:
        d = self._backend.check(policy, key, cost, **kwargs)
        token = kwargs.get("token", "")
        if (d.allowed and not token) or (d.booked and d.booking_token != token):
            p = self._backend.policy(policy)
            slot_ms = d.reset_at - p.rate.period_ms / p.rate.limit * p.rate.burst
            self._record_to.rpush(
                self._key, f"{policy}:{key}|{time.time():.6f}|{os.getpid()}|{slot_ms / 1000:.6f}"
            )
        return d


def max_in_window(times: list[float], width: float = 1.0) -> int:
    """The most of ``times`` in any window ``width`` s long."""
    times = sorted(times)
    j, best = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - width:
            j += 1
        best = max(best, i - j + 1)
    return best


def check_paced(slots: list[float], starts: list[float], n: int, limit: int) -> str:
    """The pace of ``n`` tasks against ``limit``/s (gcra, burst 1). In the engine (``slots``, its own clock):
    a slot each (one that comes back after its booked slot's grace, on a busy box, books again), never 3%
    faster than the limit, at most 15% slower (slots a busy box's workers leave idle), never more than
    limit + burst in any second. The workers follow it: no start before the first slot, the last within
    1 s of the last slot, never twice the limit in any second. Returns a line for the log."""
    slots, starts = sorted(slots), sorted(starts)
    granted = (len(slots) - 1) / (slots[-1] - slots[0])
    started = (len(starts) - 1) / (starts[-1] - starts[0])
    line = (
        f"engine {granted:.3f}/s, max in 1 s {max_in_window(slots)}; starts {started:.3f}/s, max in 1 s "
        f"{max_in_window(starts)}; slots {len(slots)}"
    )
    print(line)
    assert len(starts) == n, line
    assert n <= len(slots) <= n * 1.5, line
    assert limit * 0.85 <= granted <= limit * 1.03, line
    assert max_in_window(slots) <= limit + 1, line
    assert slots[0] - 0.01 <= starts[0], line
    assert starts[-1] <= slots[-1] + 1.0, line
    assert max_in_window(starts) <= 2 * limit, line
    return line
