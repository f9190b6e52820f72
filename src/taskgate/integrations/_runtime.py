"""The worker-side runtime shared by Celery and RQ: one per Celery app or RQ worker.

It holds the backend of this process (made on first use from a URL, or the backend object given; made
again in a forked child, whose parent's connections it must not share), the :class:`Gate` asking it, and
the settings (``max_deferrals``, ``on_exhausted``, ``short_wait_ms`` ...), and it resolves what a task does
once its deferrals are used up: task option > queue setting > the policy's ``deferral:`` block.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from taskgate.backends.base import Backend
from taskgate.backends.redis import RedisBackend
from taskgate.backends.waiting import WaitingRoom
from taskgate.errors import ThrottledError
from taskgate.integrations._gate import Deferred, Gate
from taskgate.integrations.options import ThrottleOptions
from taskgate.integrations.waiting import parks
from taskgate.policy import PolicySource

__all__ = ["Runtime"]

log = logging.getLogger("taskgate")


class Runtime:
    """Backend, gate and settings of one Celery app or RQ worker. Subclasses name their settings in
    ``SETTINGS`` (name -> default) and may look settings up elsewhere first (:meth:`setting`)."""

    SETTINGS: ClassVar[Mapping[str, Any]] = {}
    where: ClassVar[str] = "taskgate"  # names the caller in errors
    # a task whose body met the provider's 429 is deferred, not failed (the queue knows how: Celery, RQ)
    PROVIDER_DEFERRAL: ClassVar[bool] = False

    def __init__(
        self, backend: str | Backend | None, policies: PolicySource, settings: Mapping[str, Any]
    ) -> None:
        self.check_settings(settings)
        self._spec = backend
        self._policies = policies
        self._backend: Backend | None = None
        self._door: Backend | None = None
        self._pid = -1
        self._lock = threading.Lock()
        self.settings: dict[str, Any] = {**self.SETTINGS, **settings}
        short = int(self.settings.get("short_wait_ms", 250))
        self.gate = Gate(self.door, short_wait_ms=short, provider_deferral=self.PROVIDER_DEFERRAL)
        self._room: WaitingRoom | None = None
        self._room_pid = -1

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> None:
        unknown = set(settings) - set(cls.SETTINGS)
        if unknown:
            raise TypeError(
                f"{cls.where}: unknown setting(s) {sorted(unknown)}; known: {sorted(cls.SETTINGS)}"
            )

    @property
    def backend(self) -> Backend:
        """This process's backend: made on first use, and again after a fork."""
        b = self._backend
        if b is None or self._pid != os.getpid():
            with self._lock:
                b = self._backend
                if b is None or self._pid != os.getpid():
                    if isinstance(self._spec, str) or self._spec is None:
                        from taskgate.backends import connect

                        b = connect(self._spec, self._policies)
                    else:
                        b = self._spec
                    self._backend, self._door, self._pid = b, None, os.getpid()
        return b

    def door(self) -> Backend:
        """The backend as the gate uses it (:meth:`wrap_door` of :attr:`backend`)."""
        backend = self.backend
        door = self._door
        if door is None:
            door = self._door = self.wrap_door(backend)
        return door

    def wrap_door(self, backend: Backend) -> Backend:
        return backend

    # -- the waiting room (integrations/waiting.py says which policies park) -------------------------------

    def room(self) -> WaitingRoom:
        """This process's view of the waiting rooms (over its backend: the direct door; :meth:`parks` is
        False on any other)."""
        if self._room is None or self._room_pid != os.getpid():
            b = self.backend
            if not isinstance(b, RedisBackend):
                raise TypeError(f"{self.where}: the waiting room needs the direct door (redis://), not {b!r}")
            self._room, self._room_pid = WaitingRoom(b), os.getpid()
        return self._room

    def parks(self, opts: ThrottleOptions) -> bool:
        """True if a denied task of ``opts`` waits in the waiting room (any of its policies parks)."""
        b = self.backend
        return any(parks(b.policy(n), b) for n in opts.policies)

    def parks_any(self) -> bool:
        b = self.backend
        return any(parks(p, b) for p in b.policies.values())

    def deferral_limit(self, opts: ThrottleOptions) -> int:
        """max_deferrals of a task before it is decided (task option > setting > its first policy's)."""
        if opts.max_deferrals is not None:
            return opts.max_deferrals
        v = self.setting("max_deferrals")
        return int(v) if v is not None else int(self.backend.policy(opts.policies[0]).deferral.max_deferrals)

    def setting(self, name: str) -> Any:
        return self.settings.get(name)

    def max_deferrals(self, opts: ThrottleOptions, out: Deferred) -> int:
        if opts.max_deferrals is not None:
            return opts.max_deferrals
        v = self.setting("max_deferrals")
        return int(v) if v is not None else int(out.deferral.max_deferrals)

    def on_exhausted(self, opts: ThrottleOptions, out: Deferred) -> str:
        if opts.on_exhausted is not None:
            return opts.on_exhausted
        v = self.setting("on_exhausted")
        return str(v) if v is not None else str(out.deferral.on_exhausted)

    def exhausted(
        self, opts: ThrottleOptions, out: Deferred, task: str
    ) -> Literal["run"] | ThrottledError | None:
        """What a denied attempt of ``task`` (``name[id]``) does: None (defer it), ``"run"`` (its deferrals
        are used up and ``on_exhausted="run"``: run it unthrottled) or the error to fail it with. Waits for
        the store (``fail: closed``) are not throttle deferrals: they never use up ``max_deferrals``."""
        if out.reason != "throttled":
            return None
        limit = self.max_deferrals(opts, out)
        if out.state.deferrals < limit:
            return None
        if self.on_exhausted(opts, out) == "run":
            log.warning(
                "taskgate: %s deferred %d times; on_exhausted=run: running", task, out.state.deferrals
            )
            return "run"
        return ThrottledError(
            f"task {task} was deferred {out.state.deferrals} times by policy {out.policy!r} ({out.axis}); "
            f"max_deferrals={limit} reached",
            out.decision,
        )
