"""The direct door: :class:`RedisBackend` and :class:`AsyncRedisBackend`, one EVALSHA per decision.

Both are one source, ``backends/_async/redis.py``: the sync twin is generated from it by
``scripts/unasync.py`` into ``backends/_sync/`` (a build artifact), and they differ only in the transport
call. Planning, validation and decoding are the shared pure functions of :mod:`taskgate.engine.plan`.

Over a Redis Cluster client the counters of per-key policies are collected by the decisions and sent later
(:mod:`taskgate.engine.keys` says why): the collected counts ride in the same pipeline as a later call once
they have waited :data:`~taskgate.engine.keys.STATS_FLUSH_S`, a background flusher sends them when the process
goes quiet, and ``close()`` sends what is left.
"""

from __future__ import annotations

from taskgate.backends._async.redis import AsyncRedisBackend
from taskgate.backends._redis_base import redact

try:
    from taskgate.backends._sync.redis import RedisBackend
except ModuleNotFoundError as _e:  # pragma: no cover (a source checkout that was never installed)
    if _e.name is None or not _e.name.startswith("taskgate.backends._sync"):
        raise
    raise ImportError(
        "taskgate's generated sync doors (taskgate/backends/_sync/) are missing: run `pip install -e .` or "
        "`python scripts/unasync.py` in the source checkout"
    ) from _e

__all__ = ["AsyncRedisBackend", "RedisBackend", "redact"]
