"""Redis key layout. Every key a script touches is built here and passed in KEYS (never built in Lua).

For policy ``P`` and caller key ``K`` (``K`` escaped: ``%`` -> ``%25``, ``{`` -> ``%7B``, ``}`` -> ``%7D``,
so a key can never close the hash tag or collide with another key's layout)::

    {prefix}:{P:K}:r        rate state (the ThrottleKit layout of the strategy)
    {prefix}:{P:K}:bk       bookings (sorted set token -> valid_at)
    {prefix}:{P:K}:b<i>     token budget i (hash: window start, charged)
    {prefix}:{P:K}:rv:<id>  one open reservation (hash: tokens, at, window start per budget)
    {prefix}:{P:K}:pv       what the provider reported (hash: hold until, pacing; ``lua/provider.lua``)
    {prefix}:{P:K}:ft       the Fleet door's tenants of the window (hash: weight, last reserve, granted)
    {prefix}:{P:K}:c        concurrency leases when the limit is per key (sorted set lease -> expiry)
    {prefix}:{P}:c          concurrency leases when the limit is policy-wide
    ...:cm, ...:cw          lease meta (adaptive limit, mean hold) and waiters, beside the leases
    {prefix}:{P:K}:wq, :wd, :wh, :wg, :wc, :wm, :wp, :wf, :ws, :wo
                            the waiting room of (P, K) (``lua/room.lua``): order, payloads, hand-offs,
                            grants, claimed ids, counters, the fair keys' queues and tags, starts per fair
                            key (this minute, the one before) -- in the slot of the decision they wait for
    {prefix}:{P}:fw         runtime fairness weights of policy P (hash fair key -> weight), read by the
                            callers (never by a script: it is in the slot of {P}, not of the room)
    {prefix}:rooms          index of the rooms with work (sorted set "P<US>K" -> when its head is due);
                            a hint for the promoters (never the truth: the rooms are), its own slot

All keys of one admit must share a Redis Cluster hash slot, so a policy with a *policy-wide* concurrency limit
tags every key with ``{P}`` (``{prefix}:{P}:K:r`` ...): one slot per policy. Otherwise the tag is ``{P:K}``:
one slot per (policy, key), which spreads tenants across a cluster.

Operating counters (``lua/stats.lua``; off for a policy with ``counters: false``), per policy, under the
policy's own tag ``{P}``::

    {prefix}:{P}:st           counts hash: a fixed set of counters per second for the last 60 seconds, and
                              the totals the older seconds were rolled up into
    {prefix}:{P}:sd0, :sd1    top denied keys (sorted sets key -> denials), one per minute, two kept
    {prefix}:{P}:ss0, :ss1    top spenders (sorted sets key -> tokens), likewise (policies with a budget)

These names can never collide with a per-key layout: after ``{P}:`` a per-key name always holds the
(non-empty) caller key and a ``:`` before its suffix, and ``st``/``sd0``... hold no ``:``. Every stats key has
an expiry (the counts hash 24 h from its last roll-up, a top set two minutes past its minute).

Redis Cluster, the choice: the stats keys of a policy live in the hash slot of ``{P}``, while a decision on a
per-key policy lives in the slot of ``{P:K}``, and one script may only touch one slot. So:

- standalone Redis (and ``memory://``), and on a cluster every policy whose decisions are already in the
  ``{P}`` slot (a policy-wide concurrency limit), pass the stats keys at the end of KEYS and the counters are
  updated *in the decision's script*, atomically with it (mode ``inline``);
- on a cluster, for the other policies, the planner omits the stats keys and runs the *collect* variant of
  the same script: it returns ``{reply, deltas}`` instead of writing them (the counts depend on the outcome,
  so they cannot ride in the same pipeline as their own decision). The backend sums the deltas per (policy,
  second) and sends them with the small ``stats`` script, pipelined with its next call once they have waited
  :data:`STATS_FLUSH_S` (a busy process adds no round trip), from a background flusher (every second) when
  the process goes quiet, and on close. The counting rules stay in Lua, in one place; on a cluster the
  counters are not atomic with the decisions and lag them by up to about a second (a process killed in
  between loses its unsent deltas).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from taskgate.policy import Policy

__all__ = [
    "STATS_COUNTERS",
    "STATS_EPOCH_MS",
    "STATS_FLUSH_S",
    "STATS_SLOTS",
    "STATS_TOP",
    "STATS_TTL_MS",
    "ROOM_SEP",
    "KeySet",
    "StatsKeys",
    "escape",
    "is_stats_key",
    "keyset",
    "member_head",
    "rooms_index",
    "shares_stats_slot",
    "stats_keys",
    "unescape",
    "weights_key",
]

# The fixed set of counters of every bucket (names as stored, short: they are hash fields):
# a allowed, dr/dc/dk/dp denied by axis (rate/concurrency/cost/provider: admit's provider hold or pacing;
# check counts those under dr), bk booked (denials that took a future slot), w sum of retry_after_ms over
# denials, tr/tc/tf tokens reserved/charged/refunded, la/lr/lx leases acquired/released/reclaimed,
# pr 429s reported by the provider, ph ms of hold those reports added (extensions, never counted twice).
STATS_COUNTERS: tuple[str, ...] = (
    "a", "dr", "dc", "dk", "bk", "w", "tr", "tc", "tf", "la", "lr", "lx", "dp", "pr", "ph",
)  # fmt: skip
STATS_SLOTS = 60  # seconds kept one by one (older ones are rolled up into the totals)
STATS_EPOCH_MS = 60_000  # a top set covers one minute; two are kept (this minute and the last)
STATS_TOP = 32  # keys kept per top set (trimmed back to this when it doubles)
STATS_TTL_MS = 86_400_000  # the counts hash outlives an idle day; totals survive that long
STATS_FLUSH_S = 0.25  # cluster mode: the longest a process keeps deltas before sending them with a call
_UNESCAPE = re.compile(r"%(25|7B|7D)")
_CHARS = {"25": "%", "7B": "{", "7D": "}"}


def escape(key: str) -> str:
    return key.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def unescape(member: str) -> str:
    """The caller's key from its escaped form (as the top-key sets store it)."""
    return _UNESCAPE.sub(lambda m: _CHARS[m.group(1)], member)


class KeySet:
    __slots__ = ("base", "policy_base")

    def __init__(self, base: str, policy_base: str) -> None:
        self.base = base
        self.policy_base = policy_base

    @property
    def rate(self) -> str:
        return self.base + ":r"

    @property
    def bookings(self) -> str:
        return self.base + ":bk"

    @property
    def provider(self) -> str:
        """The provider's hold and pacing for this (policy, key) (read by check and admit)."""
        return self.base + ":pv"

    @property
    def tenants(self) -> str:
        """The Fleet door's tenants of this (policy, key)'s window (``lua/op_lease.lua``)."""
        return self.base + ":ft"

    def reservation(self, rid: str) -> str:
        return f"{self.base}:rv:{rid}"

    @property
    def waiters(self) -> str:
        return self.policy_base + ":cw"

    def budget(self, i: int) -> str:
        return f"{self.base}:b{i}"

    @property
    def leases(self) -> str:
        return self.policy_base + ":c"

    def room(self) -> list[str]:
        """The waiting room's keys in the order of ``lua/room.lua``: q, d, h, g, c, m."""
        b = self.base
        return [b + ":wq", b + ":wd", b + ":wh", b + ":wg", b + ":wc", b + ":wm"]

    def fair(self) -> list[str]:
        """The room's fair queueing keys (``lua/room.lua``): p (the tasks behind each fair key's head), f
        (tags and counts per fair key), s and o (starts per fair key, this window and the one before)."""
        b = self.base
        return [b + ":wp", b + ":wf", b + ":ws", b + ":wo"]

    @property
    def meta(self) -> str:
        """Per-lease-set metadata (adaptive limit, mean hold time)."""
        return self.policy_base + ":cm"


def keyset(prefix: str, policy: Policy, key: str) -> KeySet:
    k = escape(key)
    if policy.concurrency is not None and not policy.concurrency.per_key:
        tag = f"{prefix}:{{{policy.name}}}"
        return KeySet(f"{tag}:{k}", tag)
    base = f"{prefix}:{{{policy.name}:{k}}}"
    return KeySet(base, base)


ROOM_SEP = "\x1f"  # between the policy and the key of a room's name in the index


def weights_key(prefix: str, policy: str) -> str:
    """The runtime fairness weights of ``policy`` (hash fair key -> weight)."""
    return f"{prefix}:{{{policy}}}:fw"


def rooms_index(prefix: str) -> str:
    return f"{prefix}:rooms"


class StatsKeys(NamedTuple):
    """The stats keys of one policy, in KEYS order."""

    counts: str
    denied0: str
    denied1: str
    spent0: str
    spent1: str


def stats_keys(prefix: str, policy: str) -> StatsKeys:
    tag = f"{prefix}:{{{policy}}}"
    return StatsKeys(f"{tag}:st", f"{tag}:sd0", f"{tag}:sd1", f"{tag}:ss0", f"{tag}:ss1")


def is_stats_key(prefix: str, name: str | bytes) -> bool:
    """True for a stats key (of any policy) under ``prefix``."""
    n = name.decode() if isinstance(name, bytes) else name
    head = f"{prefix}:{{"
    if not n.startswith(head):
        return False
    close = n.find("}:", len(head))
    return close > 0 and n[close + 2 :] in ("st", "sd0", "sd1", "ss0", "ss1")


def member_head(prefix: str, policy: Policy) -> int:
    """Byte length of a rate key before the (escaped) caller key: the check script cuts the member of a
    top-key set out of KEYS[i] with it (see ``lua/stats.lua``)."""
    if policy.concurrency is not None and not policy.concurrency.per_key:
        return len(f"{prefix}:{{{policy.name}}}:".encode())
    return len(f"{prefix}:{{{policy.name}:".encode())


def shares_stats_slot(policy: Policy) -> bool:
    """True if every decision key of ``policy`` is in the hash slot of its stats keys (tag ``{P}``)."""
    return policy.concurrency is not None and not policy.concurrency.per_key
