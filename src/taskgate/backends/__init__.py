"""The doors over the engine, and :func:`connect` / :func:`connect_async` that pick one from a URL."""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from taskgate.backends.redis import AsyncRedisBackend, RedisBackend, redact
from taskgate.policy import PolicySource, load_policies

if TYPE_CHECKING:
    from taskgate.backends.service import AsyncServiceBackend, ServiceBackend

__all__ = [
    "AsyncRedisBackend",
    "AsyncServiceBackend",
    "RedisBackend",
    "ServiceBackend",
    "connect",
    "connect_async",
]

_REDIS = ("redis://", "rediss://", "unix://")
_CLUSTER = ("redis+cluster://", "rediss+cluster://")
_GRPC = ("grpc://", "grpcs://")


def _service() -> ModuleType:
    """The gRPC door, imported on first use (it raises ImportError "install taskgate[grpc]" without grpc)."""
    from taskgate.backends import service

    return service


def __getattr__(name: str) -> Any:
    if name in ("ServiceBackend", "AsyncServiceBackend"):
        return getattr(_service(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _resolve(url: str | None, policies: PolicySource) -> tuple[str, Any]:
    if url is None:
        url = os.environ.get("TASKGATE_URL") or "memory://"
    if not isinstance(url, str):
        raise ValueError(
            f"url must be a string such as 'redis://localhost:6379/0' or 'memory://', got {url!r}"
        )
    if policies is None and os.environ.get("TASKGATE_POLICIES"):
        policies = os.environ["TASKGATE_POLICIES"]
    return url, load_policies(policies)


def _unknown(url: str) -> ValueError:
    return ValueError(
        f"unsupported URL {redact(url)!r}: use redis://, rediss://, unix://, redis+cluster://, "
        "grpc://, grpcs:// or memory://"
    )


def _open(url: str | None, policies: PolicySource, prefix: str, options: dict[str, Any], aio: bool) -> Any:
    """The door for ``url`` on one side (``aio``: the asyncio twin); :func:`connect` says what it takes."""
    url, pols = _resolve(url, policies)
    if url.startswith(_GRPC):
        service = _service()
        door: Any = service.AsyncServiceBackend if aio else service.ServiceBackend
        return door.from_url(url, policies=pols, **options)
    redis_door: Any = AsyncRedisBackend if aio else RedisBackend
    if url.startswith("memory://"):
        from taskgate.backends import memory

        client = memory.async_client(url) if aio else memory.sync_client(url)
        return redis_door(client, pols, prefix=prefix, url=url)
    if not url.startswith(_CLUSTER + _REDIS):
        raise _unknown(url)
    options.setdefault("socket_timeout", 5.0)
    options.setdefault("socket_connect_timeout", 5.0)
    if aio:
        import redis.asyncio.cluster

        redis_client: Any = redis.asyncio.Redis
        cluster_client: Any = redis.asyncio.cluster.RedisCluster
    else:
        import redis.cluster

        redis_client, cluster_client = redis.Redis, redis.cluster.RedisCluster
    if url.startswith(_CLUSTER):
        from taskgate.backends import cluster

        door = cluster.AsyncClusterRedisBackend if aio else cluster.ClusterRedisBackend
        return door(
            cluster_client.from_url(cluster.cluster_url(url), **options), pols, prefix=prefix, url=url
        )
    if not aio:
        options.setdefault("health_check_interval", 30)
    return redis_door(redis_client.from_url(url, **options), pols, prefix=prefix, url=url)


def connect(
    url: str | None = None, policies: PolicySource = None, *, prefix: str = "taskgate", **options: Any
) -> RedisBackend | ServiceBackend:
    """A backend for ``url`` (default: ``$TASKGATE_URL``, else the embedded ``memory://``).

    ``policies`` is a policy file path, YAML text, a mapping or :class:`~taskgate.Policies`
    (default: ``$TASKGATE_POLICIES``). ``options`` go to the Redis client (e.g. ``socket_timeout``), or for
    ``grpc://``/``grpcs://`` to :class:`~taskgate.ServiceBackend` (``timeout``, ``secret``, ``fail`` ...;
    the server applies its own key prefix and policies, the local ones are only a fallback).
    """
    return cast("RedisBackend | ServiceBackend", _open(url, policies, prefix, options, aio=False))


def connect_async(
    url: str | None = None, policies: PolicySource = None, *, prefix: str = "taskgate", **options: Any
) -> AsyncRedisBackend | AsyncServiceBackend:
    """The asyncio twin of :func:`connect` (same URLs, same surface, awaited)."""
    return cast("AsyncRedisBackend | AsyncServiceBackend", _open(url, policies, prefix, options, aio=True))
