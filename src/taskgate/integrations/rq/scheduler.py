"""RQ's scheduler as a thread of a :class:`~taskgate.integrations.rq.worker.SimpleWorker` (RQ's own forks a
process, which cannot share an in-process fakeredis)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from rq.scheduler import RQScheduler

__all__ = ["ThreadScheduler"]

log = logging.getLogger("taskgate")


class ThreadScheduler(RQScheduler):
    """RQ's scheduler as a thread of the worker (RQ's own forks a process, which cannot share fakeredis)."""

    def __init__(self, queues: Any, connection: Any, tick: float) -> None:
        super().__init__(queues, connection=connection)  # interval stays 1 (whole seconds: the lock TTL)
        self._connection = connection
        self.tick = tick
        self._halt = threading.Event()

    def start(self) -> threading.Thread:
        self._halt = threading.Event()
        t = threading.Thread(target=self._loop, name="rq-scheduler", daemon=True)
        self._process: Any = t
        t.start()
        return t

    def _loop(self) -> None:
        me: Any = self  # RQ's scheduler methods are untyped
        me.register_birth()
        while not self._halt.is_set():
            try:
                if me.should_reacquire_locks:
                    me.acquire_locks()
                me.heartbeat()
                me.enqueue_scheduled_jobs()
            except Exception:
                log.exception("taskgate: in-process RQ scheduler tick failed")
            self._halt.wait(self.tick)
        me.stop()

    def halt(self, timeout: float = 5.0) -> None:
        self._halt.set()
        t = self._process
        if isinstance(t, threading.Thread) and t is not threading.current_thread():
            t.join(timeout)
