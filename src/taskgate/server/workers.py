"""``taskgate serve --workers N``: N server processes on one port (SO_REUSEPORT; the kernel spreads
connections), under a parent that starts them, restarts one that dies, and forwards SIGTERM/SIGINT.

The servers are stateless (all state lives in the store), so any worker can serve any call. The parent exits
0 once every worker has shut down cleanly. What each worker runs is given to :func:`supervise` (the app's
``serve_async``), so this module does not import the app that starts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import replace
from types import FrameType
from typing import Any, Protocol

from taskgate.server.config import ConfigError, ServeConfig, split_listen

__all__ = ["supervise"]

log = logging.getLogger("taskgate.server")
MAX_RESTARTS = 5  # within RESTART_WINDOW_S; more and the parent gives up
RESTART_WINDOW_S = 60.0
READY_TIMEOUT_S = 60.0


def _watch_parent(parent: int) -> None:
    """An orphaned worker (its parent was SIGKILLed) shuts down gracefully instead of serving forever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


class Serve(Protocol):
    """What one worker process runs: ``serve_async(cfg, ready=...)`` of :mod:`taskgate.server.app` (a
    module-level function: it reaches the spawned process by reference)."""

    def __call__(
        self, cfg: ServeConfig, *, ready: Callable[[str], None] | None = None
    ) -> Coroutine[Any, Any, None]: ...


def _child(serve: Serve, cfg: ServeConfig, ready: Any, parent: int) -> None:
    threading.Thread(target=_watch_parent, args=(parent,), name="taskgate-parent-watch", daemon=True).start()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def on_ready(line: str) -> None:
        log.info("taskgate serve: worker %d serving", os.getpid())
        ready.set()

    try:
        asyncio.run(serve(cfg, ready=on_ready))
    except ConfigError as e:
        print(f"taskgate serve: worker {os.getpid()}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _reserve_port(cfg: ServeConfig) -> tuple[ServeConfig, socket.socket | None]:
    """Port 0 means "pick one": pick it here, so that every worker binds the same one. The picking socket
    stays bound (SO_REUSEPORT, never listening) until the workers have bound theirs, so that no other
    process can take the port in between."""
    host, port = split_listen(cfg.listen)
    if port:
        return cfg, None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, 0))
    port = s.getsockname()[1]
    return replace(cfg, listen=f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), s


class _Supervisor:
    def __init__(self, serve: Serve, cfg: ServeConfig) -> None:
        self.serve = serve
        self.cfg, self.placeholder = _reserve_port(cfg)
        self.child_cfg = replace(self.cfg, workers=1, reuse_port=True)
        self.mp = multiprocessing.get_context("spawn")
        self.procs: list[Any] = []
        self.events: list[Any] = []
        self.stopping = False
        self.failed = False
        self.restarts: deque[float] = deque()

    def start(self) -> tuple[Any, Any]:
        ev = self.mp.Event()
        p = self.mp.Process(
            target=_child, args=(self.serve, self.child_cfg, ev, os.getpid()), name="taskgate-serve-worker"
        )
        p.start()
        return p, ev

    def forward(self, signum: int, frame: FrameType | None = None) -> None:
        if not self.stopping:
            log.info("taskgate serve: signal %d: stopping %d workers", signum, len(self.procs))
        self.stopping = True
        for p in self.procs:
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)

    def wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT_S
        for p, ev in zip(self.procs, self.events, strict=True):
            while not ev.wait(0.1):
                if self.stopping or not p.is_alive() or time.monotonic() > deadline:
                    return False
        return True

    def replace_dead(self) -> None:
        for i, p in enumerate(self.procs):
            if p.is_alive() or self.stopping:
                continue
            now = time.monotonic()
            while self.restarts and now - self.restarts[0] > RESTART_WINDOW_S:
                self.restarts.popleft()
            if len(self.restarts) >= MAX_RESTARTS:
                n = len(self.restarts)
                log.error(
                    "taskgate serve: workers keep dying (%d restarts in %.0fs); giving up",
                    n,
                    RESTART_WINDOW_S,
                )
                self.failed = True
                self.forward(signal.SIGTERM)
                return
            log.warning("taskgate serve: worker %s exited with %s; restarting it", p.pid, p.exitcode)
            self.restarts.append(now)
            self.procs[i], self.events[i] = self.start()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.forward)
        signal.signal(signal.SIGINT, self.forward)
        for _ in range(self.cfg.workers):
            p, ev = self.start()
            self.procs.append(p)
            self.events.append(ev)
        ready = self.wait_ready()
        if self.placeholder is not None:
            self.placeholder.close()
        if ready:
            print(
                f"taskgate serve: ready on {self.cfg.listen} ({self.cfg.workers} workers, SO_REUSEPORT; "
                f"pids {' '.join(str(p.pid) for p in self.procs)}; parent {os.getpid()})",
                flush=True,
            )
        elif not self.stopping:
            print("taskgate serve: error: the workers did not start (see above)", file=sys.stderr, flush=True)
            self.failed = True
            self.forward(signal.SIGTERM)
        while not self.stopping:
            multiprocessing.connection.wait([p.sentinel for p in self.procs], timeout=0.5)
            self.replace_dead()
        deadline = time.monotonic() + self.cfg.grace + 5.0
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                log.error("taskgate serve: worker %s did not stop in time; killing it", p.pid)
                p.kill()
                p.join()
        clean = all(p.exitcode == 0 for p in self.procs)
        return 0 if clean and not self.failed else 1


def supervise(serve: Serve, cfg: ServeConfig) -> int:
    """Run ``cfg.workers`` server processes on one port, each running ``serve``, until SIGTERM/SIGINT; the
    exit status."""
    if cfg.workers < 2:
        raise ConfigError("supervise() is for --workers >= 2")
    return _Supervisor(serve, cfg).run()
