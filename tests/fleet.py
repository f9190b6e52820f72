"""What the real-worker tests share about the processes they start and what the job bodies record."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
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
