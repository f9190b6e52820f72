"""The service door: :class:`ServiceBackend` and :class:`AsyncServiceBackend`, gRPC clients of
``taskgate serve`` (or of a ThrottleKit server) with the surface and the types of the Redis door. Both are
one source, ``backends/_async/service.py``: the sync twin is generated from it by ``scripts/unasync.py``.

``taskgate.connect("grpc://host:port")`` / ``"grpcs://host:port"`` build one. What differs from the Redis
door, and why:

- ``now=`` cannot travel (ThrottleKit's wire has no such field, and a shared service must not let callers
  move its clock): every method accepts it for surface parity and raises ``ValueError`` if it is given. The
  service decides with the store's clock.
- Every call has a deadline (``timeout``, default 2 s). Idempotent calls (Peek, Forecast, Release, Heartbeat,
  ListPolicies) are retried on ``UNAVAILABLE`` (tenacity, at most ``retries`` attempts within ``timeout``);
  consuming calls are never retried, so a unit is never spent twice.
- gRPC errors become taskgate's in ONE place, :func:`map_rpc_error` (``raise ... from``).
- ``fail="open"|"closed"`` answers decision calls (check, check_many, peek, debit, admit) while the service
  is unreachable: open allows (nothing held), closed denies with ``retry_after_ms=fail_retry_ms``; its
  ``limit`` is the policy's where the client knows it, as in the server's own fail answer (one function,
  :func:`taskgate.backends.failmode.fail_decision`). ``None`` (the default) raises
  :class:`~taskgate.BackendUnavailableError`; Celery/RQ integrations then apply each policy's own ``fail``
  mode.
- The policies (for the accounting mode of an admission, the heartbeat cadence, ``policy(name)``) come from
  the server's ListPolicies, fetched once and cached; the ``policies`` given to the constructor are only a
  fallback for a server without ListPolicies (ThrottleKit) or while it is unreachable.
- Fork-safe: the channel is created lazily, per process (a client made before ``fork()`` opens its own
  channel in the child and never touches the parent's). Importing this module sets
  ``GRPC_ENABLE_FORK_SUPPORT=1`` unless it is already set or grpc is already imported, so a parent that
  used the channel before forking (Celery prefork, RQ) leaves gRPC usable in the child.
- Security: ``grpcs://`` is TLS (``root_certificates`` to trust a private CA; ``certificate_chain`` and
  ``private_key`` for mutual TLS); ``secret`` (default ``$TASKGATE_SECRET``) is sent as
  ``authorization: Bearer <secret>``.
"""

from __future__ import annotations

# (first: it sets GRPC_ENABLE_FORK_SUPPORT before grpc is imported, and says what to install without grpc)
from taskgate.backends._service_base import DEFAULT_PORT, Pem, map_rpc_error, parse_target, read_pem

from taskgate.backends._async.service import AsyncServiceBackend  # isort: skip
from taskgate.backends._sync.service import ServiceBackend  # isort: skip

__all__ = [
    "DEFAULT_PORT",
    "AsyncServiceBackend",
    "Pem",
    "ServiceBackend",
    "map_rpc_error",
    "parse_target",
    "read_pem",
]
