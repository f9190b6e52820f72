"""taskgate: distributed throttling for Python task queues.

One engine (Lua scripts, atomic in Redis) decides by rate, concurrency and cost; Celery and RQ workers ask it
before a task body runs, and a task that may not run yet is deferred, never dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskgate._version import __version__
from taskgate.admission import (
    Admission,
    AsyncAdmission,
    AsyncReservation,
    Held,
    Reservation,
    current,
    usage_tokens,
)
from taskgate.backends import AsyncRedisBackend, RedisBackend, connect, connect_async
from taskgate.backends.fairness import set_weight
from taskgate.errors import (
    BackendUnavailableError,
    InvalidPolicyError,
    OperationNotSupportedError,
    PolicyNotFoundError,
    TaskgateError,
    ThrottledError,
)
from taskgate.logs import log_keys
from taskgate.policy import Policies, Policy, load_policies
from taskgate.types import Decision, Forecast, Settlement

if TYPE_CHECKING:
    from taskgate.backends.service import AsyncServiceBackend, ServiceBackend

__all__ = [
    "Admission",
    "AsyncAdmission",
    "AsyncRedisBackend",
    "AsyncReservation",
    "AsyncServiceBackend",
    "BackendUnavailableError",
    "Decision",
    "Forecast",
    "Held",
    "InvalidPolicyError",
    "OperationNotSupportedError",
    "Policies",
    "Policy",
    "PolicyNotFoundError",
    "RedisBackend",
    "Reservation",
    "ServiceBackend",
    "Settlement",
    "TaskgateError",
    "ThrottledError",
    "__version__",
    "connect",
    "connect_async",
    "current",
    "load_policies",
    "log_keys",
    "set_weight",
    "usage_tokens",
]

_LAZY = {"ServiceBackend", "AsyncServiceBackend"}  # the gRPC door: `import taskgate` never imports grpc


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from taskgate.backends import service

        cls: type = getattr(service, name)
        cls.__module__ = "taskgate"
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


for _name in __all__:
    _obj = globals().get(_name)
    if isinstance(_obj, type):
        _obj.__module__ = "taskgate"
del _name, _obj
