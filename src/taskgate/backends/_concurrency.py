"""The primitives where the sync and the asyncio sides genuinely differ, side by side.

The asyncio doors and admissions (``backends/_async/``) are written once against the ``Async`` names below;
``scripts/unasync.py`` generates the sync twins (``backends/_sync/``), which get the plain names. So a
difference of transport lives here, in a few lines, and never forks a whole class:

- :class:`Ticker` runs a periodic job on a daemon thread; :class:`AsyncTicker` on a task of the running event
  loop. Both keep going whatever the job raises, and a stopped one stays stopped.
- :data:`Lock` is a :class:`threading.Lock`; :class:`AsyncLock` is a no-op: the asyncio side runs on one event
  loop, and no block it guards awaits, so nothing can interleave inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable

__all__ = ["AsyncLock", "AsyncTicker", "Lock", "Ticker"]

log = logging.getLogger("taskgate")
Lock = threading.Lock


class AsyncLock:
    """The asyncio side's stand-in for :data:`Lock` (see the module docstring): guards nothing."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class Ticker:
    """Calls ``tick()`` every ``interval`` seconds from a daemon thread, from :meth:`start` (idempotent,
    thread-safe) until :meth:`stop`. Fork-safe: in a forked child, ``start`` starts the child's own thread."""

    def __init__(self, interval: float, tick: Callable[[], None], name: str) -> None:
        self.interval = interval
        self._tick = tick
        self._name = name
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        with self._lock:
            if os.getpid() != self._pid:  # forked: the parent's thread is not ours
                self._pid, self._thread, self._stop = os.getpid(), None, threading.Event()
            if self._stop.is_set():
                return
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        stop = self._stop
        while not stop.wait(self.interval):
            try:
                self._tick()
            except Exception:  # never die (the job logs its own errors; this is the last guard)
                log.exception("taskgate: %s failed", self._name)

    def stop(self) -> None:
        self._stop.set()


class AsyncTicker:
    """Awaits ``tick()`` every ``interval`` seconds from a task of the running event loop, from :meth:`start`
    (idempotent; after an event loop ended, it starts a task on the current one) until ``await stop()``."""

    def __init__(self, interval: float, tick: Callable[[], Awaitable[None]], name: str) -> None:
        self.interval = interval
        self._tick = tick
        self._name = name
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def start(self) -> None:
        if self._stopped:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._tick()
            except Exception:  # never die (the job logs its own errors; this is the last guard)
                log.exception("taskgate: %s failed", self._name)

    async def stop(self) -> None:
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
