"""Real worker processes, and what their job bodies record: the one helper of the tests, ``bench/`` and
``integration/`` (``from tests.fleet import ...``; both run from the repository root).

- :class:`Fleet` starts Celery (:meth:`Fleet.celery`) and RQ (:meth:`Fleet.rq`) workers, each in its own
  session with its own log file, waits until every one is ready (Celery's `` ready.`` line, RQ's worker key
  in its Redis), reads their CPU and memory from /proc, and stops them by PID: SIGCONT (a test may have
  paused one) and SIGTERM (warm shutdown), then SIGKILL of what is left of each process group. Nothing is
  ever found or killed by name. :func:`celery_argv` / :func:`rq_argv` are the command lines, for a caller
  that tracks its processes otherwise (the battle test), and :func:`wait_ready` its wait.
- The bodies append ``ident|time|pid|extra`` to the Redis list ``<prefix>:<kind>``: :func:`read_records`.
- Rate checks that hold on a loaded box: :class:`GrantLog` records the slots the engine hands out,
  :func:`check_paced` judges a paced run on them, :func:`busiest_window` / :func:`max_in_window` count.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
Record = tuple[str, float, int, str]
CELERY_READY = " ready."  # the line a Celery worker logs once it consumes
RQ_READY = "Listening on"  # ... and an RQ worker (at the default log level; --quiet logs nothing)


def read_records(r: Any, prefix: str, kind: str) -> list[Record]:
    """The ``<prefix>:<kind>`` list the bodies append to: ``ident|time|pid|extra`` per entry."""
    out = []
    for raw in r.lrange(f"{prefix}:{kind}", 0, -1):
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        ident, t, pid, extra = text.split("|", 3)
        out.append((ident, float(t), int(pid), extra))
    return out


# --- starting and stopping workers ------------------------------------------------------------------------


def celery_argv(
    app: str, node: str, *, concurrency: int, pool: str = "prefork", queues: Sequence[str] = ()
) -> list[str]:
    """``celery worker`` on ``app`` (``-A``) named ``node`` (``-n``, e.g. ``w0-<run>@%h``), without the
    cluster chatter (heartbeat, mingle, gossip) a test fleet does not need."""
    argv = [sys.executable, "-m", "celery", "-A", app, "worker", "-P", pool, "-c", str(concurrency),
            "-n", node, "-l", "info", "--without-heartbeat", "--without-mingle", "--without-gossip"]  # fmt: skip
    return argv + (["-Q", ",".join(queues)] if queues else [])


def rq_argv(
    queue: str,
    url: str,
    name: str,
    *,
    worker_class: str,
    job_class: str = "taskgate.rq.Job",
    scheduler: bool = True,
    quiet: bool = False,
) -> list[str]:
    """``rq worker`` on ``queue`` of the Redis at ``url``, named ``name`` (``-n``)."""
    argv = [sys.executable, "-m", "rq.cli", "worker", queue, "--url", url, "--worker-class", worker_class,
            "--job-class", job_class, "-n", name]  # fmt: skip
    return argv + (["--with-scheduler"] if scheduler else []) + (["--quiet"] if quiet else [])


@dataclass(frozen=True)
class Starting:
    """A worker on its way up: ``ready()`` once it consumes, ``alive()`` while its process runs."""

    name: str
    log: Path
    ready: Callable[[], bool]
    alive: Callable[[], bool]


def wait_ready(workers: Iterable[Starting], timeout: float = 60.0) -> None:
    """Wait until every worker is ready; RuntimeError with the logs of those that are not, at once if one
    exits on the way."""
    waiting = list(workers)
    deadline = time.monotonic() + timeout
    while waiting:
        waiting = [w for w in waiting if not w.ready()]
        dead = [w for w in waiting if not w.alive()]
        if dead or (waiting and time.monotonic() > deadline):
            why = "exited at startup" if dead else f"not ready after {timeout:.0f} s"
            tails = "\n".join(f"--- {w.name} ({w.log}):\n{_tail(w.log)}" for w in dead or waiting)
            raise RuntimeError(f"workers {why}: {[w.name for w in dead or waiting]}\n{tails}")
        if waiting:
            time.sleep(0.1)


def _tail(log: Path, n: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError as e:
        return f"(no log: {e})"


def log_has(log: Path, marker: str) -> Callable[[], bool]:
    return lambda: log.exists() and marker in log.read_text(errors="replace")


def _registered(conn: Any, worker: str) -> Callable[[], bool]:
    """True once the RQ worker ``worker`` is registered in ``conn``'s Redis (it then consumes)."""
    return lambda: bool(conn.exists(f"rq:worker:{worker}"))


def stop_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float, *, groups: bool = False) -> None:
    """SIGCONT (one may be paused) and SIGTERM (warm shutdown) to each, then SIGKILL whatever still runs after
    ``timeout`` s; with ``groups``, SIGKILL each process group too (processes started with
    ``start_new_session=True``: a child such as RQ's scheduler would outlive a worker that had to be killed).
    By PID only."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGCONT)
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


class Fleet:
    """Worker processes started with ``env`` from ``cwd``, logging to ``logdir/<name>.log``; ``tag`` (a run's
    prefix, say) makes their Celery node and RQ worker names unique. See the module."""

    def __init__(self, env: Mapping[str, str], logdir: Path, *, tag: str = "", cwd: Path = ROOT) -> None:
        self.env = dict(env)
        self.logdir = logdir
        self.tag = tag
        self.cwd = cwd
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self._starting: list[Starting] = []

    def spawn(self, name: str, argv: Sequence[str], ready: str | Callable[[], bool]) -> Path:
        """Start ``argv`` as worker ``name`` in a session of its own; ``ready`` says when it consumes (a line
        of its log, or a test). Returns its log file."""
        self.logdir.mkdir(parents=True, exist_ok=True)
        log = self.logdir / f"{name}.log"
        with log.open("wb") as out:
            p = subprocess.Popen(
                argv, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(p)
        self.logs.append(log)
        test = log_has(log, ready) if isinstance(ready, str) else ready
        self._starting.append(Starting(name, log, test, lambda: p.poll() is None))
        return log

    def _unique(self, name: str) -> str:
        return f"{name}-{self.tag}" if self.tag else name

    def celery(
        self,
        app: str,
        name: str,
        *,
        n: int = 1,
        concurrency: int = 2,
        pool: str = "prefork",
        queues: Sequence[str] = (),
    ) -> None:
        """``n`` Celery workers (``name0``, ``name1`` ...; one alone: ``name``) on ``app``."""
        for i in range(n):
            wname = name if n == 1 else f"{name}{i}"
            argv = celery_argv(
                app, f"{self._unique(wname)}@%h", concurrency=concurrency, pool=pool, queues=queues
            )
            self.spawn(wname, argv, CELERY_READY)

    def rq(
        self,
        queue: str,
        url: str,
        name: str,
        *,
        n: int = 1,
        worker_class: str,
        job_class: str = "taskgate.rq.Job",
        scheduler: bool = True,
        quiet: bool = False,
    ) -> None:
        """``n`` RQ workers (named as by :meth:`celery`) on ``queue``; ready once registered in ``url``'s
        Redis (``rq:worker:<name>``: also with ``quiet``, which logs nothing)."""
        import redis

        conn = redis.Redis.from_url(url)
        for i in range(n):
            wname = name if n == 1 else f"{name}{i}"
            full = self._unique(wname)
            argv = rq_argv(
                queue,
                url,
                full,
                worker_class=worker_class,
                job_class=job_class,
                scheduler=scheduler,
                quiet=quiet,
            )
            self.spawn(wname, argv, _registered(conn, full))

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for the workers started since the last wait (see :func:`wait_ready`)."""
        starting, self._starting = self._starting, []
        wait_ready(starting, timeout)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop every worker and its children, by PID (see :func:`stop_all`)."""
        stop_all(self.procs, timeout, groups=True)

    def _sessions(self) -> Iterable[tuple[str, list[str]]]:
        """(/proc/<pid>, the fields of its stat after the name) of each process in this fleet's sessions: each
        worker leads its own, and its pool children, horses and scheduler are in it."""
        sessions = {p.pid for p in self.procs}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                fields = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) in sessions:  # field 6: session id
                yield f"/proc/{d}", fields

    def cpu_s(self) -> float:
        """CPU seconds (user + system) used so far by this fleet's processes."""
        ticks = sum(int(f[11]) + int(f[12]) for _, f in self._sessions())  # fields 14, 15: utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        """RSS of every process of this fleet (mains and their children), MiB."""
        total = 0
        for path, _ in self._sessions():
            try:
                for line in Path(path, "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except (OSError, IndexError, ValueError):
                continue
        return total / 1024


def delete_queues(app: Any, queue: str) -> None:
    """Delete a throttled Celery app's ``queue`` and taskgate's ``<queue>.taskgate`` from its broker (what a
    leftover queue costs is a warning, printed)."""
    with app.connection_for_write() as conn:
        for q in (queue, queue + ".taskgate"):
            try:
                conn.default_channel.queue_delete(q)
            except Exception as e:
                print(f"(queue {q} not deleted: {e})")


# --- judging rates ----------------------------------------------------------------------------------------


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


def busiest_window(times: Iterable[float], width: float = 1.0) -> tuple[int, float]:
    """The most of ``times`` in any half-open window ``width`` s long, and where that window starts."""
    ts = sorted(times)
    j, best, at = 0, 0, 0.0
    for i, t in enumerate(ts):
        while ts[j] <= t - width:
            j += 1
        if i - j + 1 > best:
            best, at = i - j + 1, ts[j]
    return best, at


def max_in_window(times: Iterable[float], width: float = 1.0) -> int:
    """The most of ``times`` in any window ``width`` s long."""
    return busiest_window(times, width)[0]


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
