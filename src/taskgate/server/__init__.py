"""``taskgate serve``: the gRPC service door (``throttlekit.v1.RateLimiter`` and taskgate's additions) over
one shared store, stateless, so any number of replicas (or ``--workers N`` processes on one port) can serve.

::

    config   ServeConfig and the start-up checks (loopback rule, TLS pairs, files)
    service  the RateLimiter servicer (wire rules, fail modes)
    wire     pure conversions between taskgate types and proto messages
    errors   the ONE mapping of taskgate errors to status codes (a servicer class decorator)
    auth     the shared-secret interceptor
    hooks    extension points for other services (the Monitor) and decision listeners
    app      building and running the grpc.aio server (health, reflection, TLS, graceful shutdown)
    workers  the --workers N parent
    testing  ServerProcess: a real `taskgate serve` subprocess for integration tests

Importing this package does not import grpc; :func:`run` does.
"""

from __future__ import annotations

from taskgate.server.config import ConfigError, ServeConfig

__all__ = ["ConfigError", "ServeConfig", "run"]


def run(cfg: ServeConfig) -> int:
    """Serve ``cfg`` until SIGTERM/SIGINT; the process exit status."""
    from taskgate.server.app import run as _run

    return _run(cfg)
