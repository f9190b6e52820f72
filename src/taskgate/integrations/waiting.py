"""Queue-agnostic parts of the waiting room in a worker: whether a policy parks, and the promoter.

Whether a policy's denied tasks are parked in the engine (``deferral.park`` in the policy file):

- ``always``: parked;
- ``never``: re-published to the broker with a countdown (taskgate 0.1's deferral);
- ``auto`` (the default): parked when the store keeps its data across a restart (Redis with AOF or RDB
  snapshots, read once per process with ``CONFIG GET``), else as ``never``, with one warning that says so.
  A store whose settings cannot be read (``CONFIG`` disabled, as on some managed services) is taken as
  persistent, with a warning. The embedded ``memory://`` store and the gRPC door never park.

The promoter: every worker process that consumes queues runs one thread. It takes the rooms that are due
from the engine's index (leased to it, so N workers share the work and each room is promoted by one at a
time), promotes their heads (admitted in the engine) and sends each promoted task with the queue's
``send`` function, then puts the room back at its next due time. It sleeps until the earliest due room (at
most ``idle_s``). A concurrency slot freed by a finishing task is handed on at once by that worker
(:meth:`Promoter.hand_off`), not at the next round.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from redis.exceptions import ResponseError

from taskgate.backends.base import Backend
from taskgate.backends.redis import RedisBackend
from taskgate.backends.waiting import Promoted, WaitingRoom
from taskgate.errors import TaskgateError
from taskgate.policy import Policy

__all__ = ["Promoter", "Send", "parks", "persistence"]

log = logging.getLogger("taskgate")
Send = Callable[[str, str, Promoted], None]  # (policy, key, promoted task): put it back on its queue

_persisted: dict[int, bool] = {}
_lock = threading.Lock()


def persistence(backend: Backend) -> tuple[bool, str]:
    """(persists, how) for a backend's store: Redis AOF/RDB settings; memory:// and gRPC do not park."""
    if not isinstance(backend, RedisBackend) or backend.url.startswith("memory://"):
        return False, "the store is not a Redis server"
    try:
        cfg = backend.client.config_get("appendonly")
        cfg.update(backend.client.config_get("save"))
    except (ResponseError, TaskgateError, OSError) as e:
        return True, f"its persistence settings cannot be read ({e}); taken as persistent"
    aof = str(cfg.get("appendonly", "no")).lower() == "yes"
    rdb = bool(str(cfg.get("save", "")).strip())
    if aof or rdb:
        return True, "appendonly yes" if aof else f"save {cfg.get('save')}"
    return False, "appendonly no and no save points"


def parks(policy: Policy, backend: Backend) -> bool:
    """True if denied tasks of ``policy`` wait in the engine's waiting room (see the module docstring)."""
    mode = policy.deferral.park
    if mode == "never" or not isinstance(backend, RedisBackend):
        return False
    if mode == "always":
        return True
    with _lock:
        got = _persisted.get(id(backend))
        if got is None:
            got, how = persistence(backend)
            _persisted[id(backend)] = got
            if not got:
                log.warning(
                    "taskgate: the store at %s does not persist (%s): a restart would lose parked tasks, so "
                    "policies with deferral.park=auto re-publish deferred tasks to the broker instead; set "
                    "deferral.park: always to park anyway, or turn on AOF",
                    backend.url,
                    how,
                )
            elif "cannot be read" in how:
                log.warning("taskgate: the store at %s: %s", backend.url, how)
        return got


class Promoter:
    """Promotes due waiting rooms and sends the promoted tasks (one thread per worker process)."""

    def __init__(
        self, room: Callable[[], WaitingRoom], send: Send, *, batch: int = 64, idle_s: float = 1.0
    ) -> None:
        self._room = room
        self.send = send
        self.batch = batch
        self.idle_s = idle_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.promoted = 0

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="taskgate-promoter", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def wake(self) -> None:
        self._wake.set()

    def hand_off(self, policy: str, key: str) -> int:
        """Promote the head(s) of one room now and send them (a slot was just freed). Returns how many."""
        room = self._room()
        res = room.promote(policy, key, self.batch)
        for t in res.tasks:
            self._send(policy, key, t)
        room.reschedule(policy, key, res)
        self.promoted += len(res.tasks)
        return len(res.tasks)

    def _send(self, policy: str, key: str, t: Promoted) -> None:
        try:
            self.send(policy, key, t)
        except Exception:  # it stays in the hand-off set: handed out again after its deadline
            log.exception(
                "taskgate: sending promoted task %s (policy %r) failed; it will be re-sent", t.task_id, policy
            )

    def run_once(self) -> float:
        """One round: promote every due room. Returns how long to sleep before the next round (s)."""
        room = self._room()
        now, next_due, rooms = room.due_rooms()
        for policy, key in rooms:
            try:
                self.hand_off(policy, key)
            except KeyError:  # a policy this worker does not know: leave it to a worker that does
                log.debug("taskgate: waiting room of unknown policy %r skipped", policy)
        if rooms:
            return 0.0
        if next_due <= 0:
            return self.idle_s
        return min(self.idle_s, max(0.0, (next_due - now) / 1000.0))

    def _loop(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                wait = self.run_once()
                backoff = 0.5
            except Exception as e:  # never die: the store may come back
                log.warning("taskgate: promoter round failed (%s); retrying in %.1fs", e, backoff)
                wait, backoff = backoff, min(backoff * 2, 10.0)
            if wait > 0:
                self._wake.wait(wait)
                self._wake.clear()
