"""Process management for the battle test.

Every process is started here, remembered by PID (and its kernel start time, so a recycled PID is never
signalled), and stopped by PID: SIGCONT (it may be paused), SIGTERM, then SIGKILL of the process and of the
descendants it had (Celery pool children, RQ horses and scheduler). :func:`stop_all` runs from the battle's
``finally`` and from ``atexit``. Nothing is ever found or killed by name.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from taskgate.server.testing import ServerProcess, free_port

__all__ = [
    "Proc",
    "RedisServer",
    "ServeProc",
    "descendants",
    "free_port",
    "proc_start_time",
    "stop_all",
]

REGISTRY: list[Proc | ServeProc] = []


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state is [0], ppid [1], starttime [19])."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def proc_start_time(pid: int) -> int | None:
    st = _stat(pid)
    return int(st[19]) if st is not None else None


def is_running(pid: int, start_time: int | None = None) -> bool:
    """True if ``pid`` exists, is not a zombie and (if given) is the process started at ``start_time``."""
    st = _stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    return start_time is None or int(st[19]) == start_time


def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (children first), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = _stat(int(entry))
        if st is not None and st[0] not in ("Z", "X"):
            parents.setdefault(int(st[1]), []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(0), [])
        out += kids
        todo += kids
    return out


def _signal(pid: int, sig: int, start_time: int | None) -> None:
    if is_running(pid, start_time):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


class Proc:
    """A subprocess with its log file (appended to: a restart keeps the earlier output)."""

    def __init__(self, name: str, cmd: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log = log
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None
        self.start_time: int | None = None
        self._tree: list[tuple[int, int | None]] = []

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} is not started")
        return self.popen.pid

    def start(self) -> Proc:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=Path(__file__).parents[1]
            )
        self.start_time = proc_start_time(self.popen.pid)
        if self not in REGISTRY:
            REGISTRY.append(self)
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tree(self) -> list[tuple[int, int | None]]:
        """(pid, start time) of this process and its living descendants."""
        if not self.alive():
            return []
        pids = [self.pid, *descendants(self.pid)]
        return [(p, proc_start_time(p)) for p in pids]

    def signal_tree(self, sig: int) -> list[int]:
        """Send ``sig`` to this process and every descendant; the PIDs signalled."""
        tree = self.tree()
        for pid, started in tree:
            _signal(pid, sig, started)
        return [p for p, _ in tree]

    def owns(self, pid: int) -> bool:
        """True if ``pid`` is this process or one of its descendants."""
        return self.alive() and (pid == self.pid or pid in descendants(self.pid))

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def terminate(self) -> None:
        """SIGCONT (it may be paused) + SIGTERM, without waiting; :meth:`stop` then waits."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self._tree = self.tree()
        for pid, started in self._tree:
            _signal(pid, signal.SIGCONT, started)
        self.popen.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGCONT + SIGTERM, wait, then SIGKILL what is left of it and of its descendants."""
        if self.popen is None:
            return
        if not self._tree:
            self.terminate()
        tree, self._tree = self._tree, []
        if self.popen.poll() is None:
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        deadline = time.monotonic() + 3.0
        for pid, started in tree[1:]:
            while is_running(pid, started) and time.monotonic() < deadline:
                time.sleep(0.05)
            _signal(pid, signal.SIGKILL, started)


class RedisServer(Proc):
    """A private ``redis-server`` on loopback. RDB persistence only on demand (``--save ""``): :meth:`restart`
    saves with ``SHUTDOWN SAVE`` (no write can slip in between the save and the exit) and starts again on the
    same port and directory, so the data survives and the script cache does not."""

    def __init__(
        self, name: str, workdir: Path, log: Path, port: int | None = None, *, aof: bool = False
    ) -> None:
        self.port = port or free_port()
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        exe = shutil.which("redis-server") or "redis-server"
        # aof: every write in the append-only file before it is acknowledged (the waiting room's store)
        persist = ["--appendonly", "yes", "--appendfsync", "always"] if aof else ["--appendonly", "no"]
        cmd = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
               "--dbfilename", "dump.rdb", "--save", "", *persist, "--protected-mode", "no",
               "--loglevel", "notice"]  # fmt: skip
        super().__init__(name, cmd, log)
        self.paused = False

    def url(self, db: int = 0, query: str = "") -> str:
        return f"redis://127.0.0.1:{self.port}/{db}" + (f"?{query}" if query else "")

    def client(self, timeout: float = 2.0, retries: int = 3) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), retries),
        )

    def start(self, timeout: float = 20.0) -> RedisServer:
        super().start()
        deadline = time.monotonic() + timeout
        c = self.client(0.5)
        while True:
            try:
                if c.ping():
                    break
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            if not self.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: redis-server did not start:\n{self.log_text()[-2000:]}")
            time.sleep(0.02)
        c.close()
        return self

    def restart(self) -> tuple[float, float]:
        """``SHUTDOWN SAVE`` and start again on the same port; (down_at, up_at) in epoch seconds."""
        assert self.popen is not None
        down = time.time()
        c = self.client(retries=0)
        with contextlib.suppress(redis.ConnectionError):
            c.shutdown(save=True)
        self.popen.wait(30)
        self.start()
        return down, time.time()

    def pause(self) -> None:
        self.paused = True
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.paused = False


class ServeProc:
    """``taskgate serve`` through :class:`~taskgate.server.testing.ServerProcess`, with its log under the
    battle's log directory, tracked like the others. :meth:`restart` starts a new one on the same port."""

    def __init__(self, name: str, args: Sequence[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.args = list(args)
        self.log = log
        self.env = env
        self.listen: str | None = None
        self.server: ServerProcess | None = None
        self.generation = 0

    def launch(self) -> ServeProc:
        self.server = ServerProcess(*self.args, listen=self.listen, env=self.env)
        self.server.log_path.unlink(missing_ok=True)  # ours instead of the temp file
        suffix = f".{self.generation}" if self.generation else ""
        self.server.log_path = self.log.with_name(f"{self.log.stem}{suffix}{self.log.suffix}")
        self.server.launch()
        if self not in REGISTRY:
            REGISTRY.append(self)
        return self

    def wait_ready(self) -> ServeProc:
        assert self.server is not None
        self.server.wait_ready(60)
        self.listen = self.server.listen
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.url

    @property
    def pid(self) -> int:
        assert self.server is not None
        return self.server.pid

    def kill(self) -> None:
        if self.server is not None:
            self.server.kill()

    def restart(self) -> None:
        self.generation += 1
        self.launch().wait_ready()

    def terminate(self) -> None:
        if self.server is not None:
            self.server.signal(signal.SIGCONT)
            self.server.signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        if self.server is not None and self.server.proc is not None:
            self.server.signal(signal.SIGCONT)
            self.server.stop(timeout)


_stopping = False


def stop_all() -> None:
    """Stop every process started here, the latest first (workers before servers before Redis)."""
    global _stopping
    if _stopping:
        return
    _stopping = True
    try:
        for p in reversed(REGISTRY):  # in parallel: every process but the Redis servers (brokers, store)
            if not isinstance(p, RedisServer):
                with contextlib.suppress(Exception):
                    p.terminate()
        for p in reversed(REGISTRY):
            try:
                p.stop()
            except Exception as e:  # keep stopping the others
                print(f"battle: stopping {p.name} failed: {e}", flush=True)
        REGISTRY.clear()
    finally:
        _stopping = False


atexit.register(stop_all)
