"""Extension points of ``taskgate serve`` for services that live beside the RateLimiter (Monitor, Fleet).

A service module registers a function with :func:`register_service`; :func:`~taskgate.server.app.build_server`
calls it with the server and a :class:`ServiceContext` before the server starts. The function adds its
servicer, may subscribe to every decision (``ctx.listeners``), and returns its full service name so it is
advertised by reflection and health checking; decorate the servicer with
:func:`taskgate.server.errors.map_errors` so its errors map to status codes like the RateLimiter's. Modules
listed in :data:`BUILTIN_SERVICE_MODULES` are imported
(if present) by the server, so ``taskgate serve`` picks the Monitor and the Fleet up without further wiring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from taskgate.types import Decision

if TYPE_CHECKING:
    from taskgate.backends.redis import AsyncRedisBackend
    from taskgate.server.config import ServeConfig

__all__ = [
    "BUILTIN_SERVICE_MODULES",
    "DecisionEvent",
    "DecisionListener",
    "ServiceContext",
    "ServiceRegistrar",
    "register_service",
    "registrars",
]

BUILTIN_SERVICE_MODULES = ("taskgate.server.monitor", "taskgate.server.fleet")


@dataclass(frozen=True, slots=True)
class DecisionEvent:
    """One decision the server made: ``op`` is the RPC (``Check``, ``Admit`` ...), ``axis`` the binding axis
    of an admit ("" otherwise), ``elapsed_ns`` the time spent in the store, ``failed`` True when the store
    was unreachable and the decision came from the policy's fail mode."""

    op: str
    policy: str
    key: str
    decision: Decision
    axis: str
    elapsed_ns: int
    failed: bool = False


DecisionListener = Callable[[DecisionEvent], None]


@dataclass
class ServiceContext:
    """What an extra service gets: the store door, the configuration and the decision listeners."""

    backend: AsyncRedisBackend
    config: ServeConfig
    listeners: list[DecisionListener] = field(default_factory=list)


ServiceRegistrar = Callable[[Any, ServiceContext], "str | None"]
_REGISTRARS: list[ServiceRegistrar] = []


def register_service(fn: ServiceRegistrar) -> ServiceRegistrar:
    """Decorator: call ``fn(server, ctx)`` when a server is built (``fn`` returns its service name)."""
    if fn not in _REGISTRARS:
        _REGISTRARS.append(fn)
    return fn


def registrars() -> list[ServiceRegistrar]:
    return list(_REGISTRARS)
