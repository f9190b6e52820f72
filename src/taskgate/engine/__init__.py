"""The engine: taskgate's Lua scripts, the ONE place any decision is computed.

Scripts are composed from files in ``lua/`` (loaded once with :mod:`importlib.resources`): ``common.lua``
(helpers), one *rate fragment* per strategy (``rate_<strategy>.lua``: the state layout and the decision
functions of that strategy) and one *operation* (``op_<op>.lua``: KEYS/ARGV/reply contract at its top). So
each strategy's algorithm is written once and reused by check, peek, forecast and admit, and every script
stays a single atomic EVALSHA. The same bytes serve the sync and async doors and the embedded store.

Operating counters: the counted operations of a policy with ``counters: true`` get the ``stats.lua`` fragment
and their body wrapped (``return stats_finish(op, tg_op())``), in one of two modes: ``inline`` (the stats keys
come last in KEYS and are written in the same script) or ``collect`` (Redis Cluster: the reply carries the
counts, written later by the ``stats`` script). Without counters, ``stats_off.lua`` makes the hooks no-ops.
See :mod:`taskgate.engine.keys` for the layout and the cluster choice.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

from taskgate.engine.keys import STATS_COUNTERS, STATS_EPOCH_MS, STATS_SLOTS, STATS_TOP, STATS_TTL_MS

__all__ = ["COUNTED_OPS", "Script", "StatsMode", "script"]


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: str
    sha: str


@cache
def _read(name: str) -> str:
    return (resources.files("taskgate.engine") / "lua" / name).read_text(encoding="utf-8")


StatsMode = Literal["off", "inline", "collect"]
COUNTED_OPS = frozenset({"check", "admit", "release", "heartbeat", "debit", "reserve", "settle", "report"})


@cache
def _stats_fragment(mode: str, stats_keys: int) -> str:
    if mode == "off":
        return _read("stats_off.lua")
    subs = {
        "@NSK@": str(stats_keys),
        "@COUNTERS@": ", ".join(f"'{c}'" for c in STATS_COUNTERS),
        "@SLOTS@": str(STATS_SLOTS),
        "@EPOCH_MS@": str(STATS_EPOCH_MS),
        "@TOP@": str(STATS_TOP),
        "@TTL_MS@": str(STATS_TTL_MS),
        "@MODE@": mode,
    }
    text = _read("stats.lua")
    for k, v in subs.items():
        text = text.replace(k, v)
    return text


@cache
def script(
    op: str,
    strategy: str | None = None,
    stats: StatsMode = "off",
    stats_keys: int = 5,
    consts: tuple[str | int | float, ...] = (),
) -> Script:
    """The composed script for ``op`` (``check``, ``forecast``, ``admit`` ...) on a rate ``strategy``
    (``None`` for operations without a rate axis, which get the ``rate_none`` fragment), with the counters
    in mode ``stats`` (``off`` unless ``op`` is counted) and, in mode inline, ``stats_keys`` stats keys at the
    end of KEYS (5, or 3 for a policy that never spends tokens). ``script("stats")`` writes collected
    counters.

    ``consts``: a policy's constant arguments, written into the script as the Lua table ``TG_CONST`` of
    strings (each exactly the text redis-py would send as ARGV, so ``tonumber`` reads the same double)
    instead of travelling in ARGV with every call: one script per policy, and a call carries only what
    varies (``op_check.lua``: each argument costs the client an encoding and the server a Lua string)."""
    if op == "stats":
        stats, stats_keys = "inline", 5
    elif op not in COUNTED_OPS:
        stats = "off"
    if stats not in ("off", "inline", "collect"):
        raise ValueError(f"stats mode must be off, inline or collect, got {stats!r}")
    if stats_keys not in (3, 5):
        raise ValueError(f"stats_keys must be 3 or 5, got {stats_keys!r}")
    parts = [
        f"-- taskgate engine script: op={op} rate={strategy or 'none'} stats={stats}\n",
        _read("common.lua"),
    ]
    parts.append(_stats_fragment(stats, stats_keys))
    if op not in ("reset", "stats", *_ROOM_PLAIN_OPS):
        parts.append(_read(f"rate_{strategy or 'none'}.lua"))
        for frag in _EXTRA_FRAGMENTS.get(op, ()):
            parts.append(_read(frag))
    if op in _ROOM_ADMIT_OPS:  # the waiting room admits with the very body of op admit, as a function
        parts.append("pv_spread = false  -- provider.lua: no return slots in a room (one queue)\n")
        parts.append(f"local function tg_admit(KEYS, ARGV)\n{_read('op_admit.lua')}\nend\n")
    if consts:
        parts.append(f"local TG_CONST = {{{', '.join(_lua_str(v) for v in consts)}}}\n")
    body = _read(f"op_{op}.lua")
    if stats == "off" or op == "stats":
        parts.append(body)
    else:
        parts.append(f"local function tg_op()\n{body}\nend\nreturn stats_finish('{op}', tg_op())\n")
    source = "\n".join(parts)
    return Script(f"{op}:{strategy or 'none'}", source, hashlib.sha1(source.encode()).hexdigest())  # noqa: S324


def _lua_str(v: str | int | float) -> str:
    """``v`` as a Lua string literal of the bytes redis-py sends for it (its Encoder: repr of a number)."""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise TypeError(f"a script constant must be a str, int or float, got {v!r}")
    text = v if isinstance(v, str) else repr(v)
    if not text.isprintable() or "'" in text or "\\" in text:
        raise ValueError(f"a script constant must be printable text without quotes, got {text!r}")
    return f"'{text}'"


# Fragments beyond common + rate that an operation needs.
_EXTRA_FRAGMENTS: dict[str, tuple[str, ...]] = {
    "check": ("provider.lua",),
    "admit": ("conc.lua", "budget.lua", "provider.lua"),
    "report": ("conc.lua", "budget.lua", "provider.lua"),
    "release": ("conc.lua",),
    "heartbeat": ("conc.lua",),
    "debit": ("budget.lua",),
    "lease_budget": ("budget.lua",),
    "reserve": ("budget.lua",),
    "settle": ("budget.lua",),
    "enter": ("conc.lua", "budget.lua", "provider.lua", "room.lua"),
    "promote": ("conc.lua", "budget.lua", "provider.lua", "room.lua"),
    "claim": ("room.lua",),
}
# Waiting-room operations that admit (they embed op admit) and those that need no rate fragment.
_ROOM_ADMIT_OPS = frozenset({"enter", "promote"})
_ROOM_PLAIN_OPS = ("rooms_due", "room_purge", "room_head")
