"""The embedded store: the very same Lua scripts, run in-process by fakeredis + lupa.

``memory://`` is one store per process (every ``connect("memory://")`` in a process shares it, like a local
Redis would); ``memory://NAME`` gives separate named stores. Thread-safe; not shared across processes.
"""

from __future__ import annotations

import threading
from typing import Any

import fakeredis

__all__ = ["async_client", "sync_client"]

_servers: dict[str, Any] = {}
_lock = threading.Lock()


def _server(url: str) -> Any:
    name = url.split("://", 1)[1].strip("/") or "default"
    with _lock:
        if name not in _servers:
            _servers[name] = fakeredis.FakeServer()
        return _servers[name]


def sync_client(url: str) -> Any:
    return fakeredis.FakeRedis(server=_server(url))


def async_client(url: str) -> Any:
    return fakeredis.FakeAsyncRedis(server=_server(url))
