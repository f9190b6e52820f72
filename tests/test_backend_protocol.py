"""Every door offers the Backend protocol (taskgate.backends.base): mypy checks the assignments below, and
the test checks that the doors' public operations and the protocol's are one list (a new operation on the
doors is added to the protocol, so the gate and the server can be checked against it)."""

from __future__ import annotations

import inspect

from taskgate.backends.base import AsyncBackend, Backend
from taskgate.backends.cluster import AsyncClusterRedisBackend, ClusterRedisBackend
from taskgate.backends.redis import AsyncRedisBackend, RedisBackend
from taskgate.backends.service import AsyncServiceBackend, ServiceBackend


def _typed(
    r: RedisBackend,
    c: ClusterRedisBackend,
    s: ServiceBackend,
    ar: AsyncRedisBackend,
    ac: AsyncClusterRedisBackend,
    aserv: AsyncServiceBackend,
) -> tuple[list[Backend], list[AsyncBackend]]:
    """Never called: mypy checks that each door is assignable to its protocol."""
    return [r, c, s], [ar, ac, aserv]


def _ops(cls: type) -> dict[str, inspect.Signature]:
    out = {}
    for name, fn in inspect.getmembers(cls, inspect.isfunction):
        if not name.startswith("_"):
            out[name] = inspect.signature(fn)
    return out


# what one door offers beyond the protocol (see taskgate.backends.base)
_OWN = {
    "RedisBackend": {"flush_stats", "lease_window"},
    "AsyncRedisBackend": {"flush_stats", "lease_window"},
    "ServiceBackend": {"refresh_policies", "from_url"},
    "AsyncServiceBackend": {"refresh_policies", "from_url"},
}


def test_the_doors_and_the_protocol_list_the_same_operations() -> None:
    for proto, doors in (
        (Backend, [RedisBackend, ServiceBackend]),
        (AsyncBackend, [AsyncRedisBackend, AsyncServiceBackend]),
    ):
        want = _ops(proto)
        for door in doors:
            have = _ops(door)
            assert set(have) - _OWN[door.__name__] == set(want), door.__name__
            for name, sig in want.items():
                params = have[name].parameters.values()
                names = [p.name for p in params if p.kind != p.VAR_KEYWORD]
                rest = any(p.kind == p.VAR_KEYWORD for p in params)  # takes the others as **kw
                expected = list(sig.parameters)
                assert names == (expected[: len(names)] if rest else expected), (door.__name__, name)
