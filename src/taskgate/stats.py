"""The operating counters, read: a :class:`Snapshot` of every policy, built from the store.

The engine keeps the counters itself, in Redis, with each decision (``engine/lua/stats.lua``; the key layout
is in :mod:`taskgate.engine.keys`), so any process that can read the store sees the whole fleet: ``taskgate
top``, the Prometheus exporter and the Monitor door all build their view with this module.

Reading is written once, without I/O: :func:`snapshot_reader` is a generator that yields lists of Redis
commands and receives their replies, and ends with the Snapshot. :func:`read_snapshot` (sync) and
:func:`read_snapshot_async` drive it over a client (standalone, cluster or the embedded store); one call is
three round trips (the store's clock, the counters, then the state of the top keys).

Numbers: ``totals`` are counts since the policy's counters began (they survive an idle day), ``window`` the
last ``window_s`` seconds and ``recent`` the last ``rate_s`` seconds (both including the current second),
from which the rates are taken. Top keys are over the current and the previous minute.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from taskgate.engine.keys import (
    STATS_COUNTERS,
    STATS_EPOCH_MS,
    STATS_SLOTS,
    keyset,
    stats_keys,
    unescape,
)
from taskgate.policy import Policies, Policy
from taskgate.waiting_view import WaitingView

__all__ = [
    "BudgetView",
    "Counters",
    "KeyCount",
    "KeyView",
    "PolicyView",
    "Snapshot",
    "read_key",
    "read_snapshot",
    "read_snapshot_async",
    "snapshot_reader",
]

Command = tuple[Any, ...]
Reader = Generator[list[Command], list[Any], "Snapshot"]

# engine counter name -> Counters field
_FIELDS = {
    "a": "allowed",
    "dr": "denied_rate",
    "dc": "denied_concurrency",
    "dk": "denied_cost",
    "bk": "booked",
    "w": "wait_ms",
    "tr": "tokens_reserved",
    "tc": "tokens_charged",
    "tf": "tokens_refunded",
    "la": "leases_acquired",
    "lr": "leases_released",
    "lx": "leases_reclaimed",
    "dp": "denied_provider",
    "pr": "provider_429s",
    "ph": "provider_hold_ms",
}
assert set(_FIELDS) == set(STATS_COUNTERS)
AXES = ("rate", "concurrency", "cost")  # a policy's own axes; "provider" denies on any (a key's hold/pacing)


@dataclass(frozen=True, slots=True)
class Counters:
    """One set of counts (``wait_ms``: the sum of ``retry_after_ms`` over the denials)."""

    allowed: int = 0
    denied_rate: int = 0
    denied_concurrency: int = 0
    denied_cost: int = 0
    booked: int = 0
    wait_ms: int = 0
    tokens_reserved: int = 0
    tokens_charged: int = 0
    tokens_refunded: int = 0
    leases_acquired: int = 0
    leases_released: int = 0
    leases_reclaimed: int = 0
    denied_provider: int = 0  # admit denied by the provider's hold or pacing (check counts them as rate)
    provider_429s: int = 0  # 429s reported (report)
    provider_hold_ms: int = 0  # the hold time those reports added

    @property
    def denied(self) -> int:
        return self.denied_rate + self.denied_concurrency + self.denied_cost + self.denied_provider

    @property
    def decisions(self) -> int:
        return self.allowed + self.denied

    def denied_by(self, axis: str) -> int:
        return {
            "rate": self.denied_rate,
            "concurrency": self.denied_concurrency,
            "cost": self.denied_cost,
            "provider": self.denied_provider,
        }[axis]

    @classmethod
    def of(cls, counts: Mapping[str, int]) -> Counters:
        """From engine counter names (``a``, ``dr`` ...)."""
        return cls(**{_FIELDS[k]: v for k, v in counts.items() if k in _FIELDS})


@dataclass(frozen=True, slots=True)
class KeyCount:
    key: str
    count: int


@dataclass(frozen=True, slots=True)
class BudgetView:
    """One token budget of one key: ``used`` of ``budget`` in the window ending at ``resets_at``."""

    budget: int
    window_ms: int
    used: int
    resets_at: int


@dataclass(frozen=True, slots=True)
class KeyView:
    """The state of one key: its recent denials and spending, its budgets, its own slots (per-key limit)."""

    key: str
    denied: int = 0
    spent: int = 0
    budgets: tuple[BudgetView, ...] = ()
    inflight: int | None = None
    limit: int | None = None
    held_until: int = 0  # a provider's hold on this key ends then (epoch-ms; 0: none now)
    provider_limit: int = 0  # the limit the provider reports (per its window; 0: none reported)
    provider_rate: float = 0.0  # the pace that gives, per second (0: none)


@dataclass(frozen=True, slots=True)
class PolicyView:
    name: str
    kind: str
    strategy: str
    limit: int  # the rate axis' ceiling (burst, capacity or the window's limit); else the slot limit
    counters: bool  # counters on for this policy
    axes: tuple[str, ...] = ()  # of rate, concurrency, cost
    totals: Counters = field(default_factory=Counters)
    window: Counters = field(default_factory=Counters)
    recent: Counters = field(default_factory=Counters)
    rate_s: float = 1.0  # the span ``recent`` covers, in seconds (the current one partly)
    inflight: int | None = None  # policy-wide concurrency: leases held now
    concurrency_limit: int | None = None  # policy-wide: the current (adaptive) limit; per key: the max
    per_key: bool = False
    top_denied: tuple[KeyCount, ...] = ()
    top_spent: tuple[KeyCount, ...] = ()
    keys: tuple[KeyView, ...] = ()

    def rate(self, what: str) -> float:
        """Per-second rate over ``recent``: ``allowed``, ``denied``, ``booked`` or a Counters field."""
        return float(getattr(self.recent, what)) / self.rate_s

    @property
    def binding_axis(self) -> str:
        """The axis that denied most recently (over ``recent``, else ``window``); "" if none denied."""
        for c in (self.recent, self.window):
            if c.denied:
                return max((*AXES, "provider"), key=c.denied_by)
        return ""

    @property
    def est_wait_ms(self) -> int | None:
        """The mean ``retry_after_ms`` handed to deferred work recently (None: nothing was denied)."""
        for c in (self.recent, self.window):
            if c.denied:
                return round(c.wait_ms / c.denied)
        return None


@dataclass(frozen=True, slots=True)
class Snapshot:
    generated_at: int  # epoch-ms, the store's clock
    window_s: int
    rate_s: int
    prefix: str
    policies: tuple[PolicyView, ...] = ()
    waiting: tuple[WaitingView, ...] = ()  # the waiting rooms (direct doors only: see waiting_view.py)

    def policy(self, name: str) -> PolicyView:
        for p in self.policies:
            if p.name == name:
                return p
        raise KeyError(name)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        d = json.loads(text)
        return cls(
            generated_at=d["generated_at"],
            window_s=d["window_s"],
            rate_s=d["rate_s"],
            prefix=d["prefix"],
            policies=tuple(_policy_from(p) for p in d["policies"]),
            waiting=tuple(WaitingView.from_dict(w) for w in d.get("waiting", ())),
        )


def _policy_from(d: dict[str, Any]) -> PolicyView:
    kw = {f.name: d[f.name] for f in fields(PolicyView) if f.name in d}
    for name in ("totals", "window", "recent"):
        kw[name] = Counters(**kw.get(name, {}))
    kw["axes"] = tuple(kw.get("axes", ()))
    kw["top_denied"] = tuple(KeyCount(**k) for k in kw.get("top_denied", ()))
    kw["top_spent"] = tuple(KeyCount(**k) for k in kw.get("top_spent", ()))
    kw["keys"] = tuple(
        KeyView(**{**k, "budgets": tuple(BudgetView(**b) for b in k.get("budgets", ()))})
        for k in kw.get("keys", ())
    )
    return PolicyView(**kw)


# -- reading ------------------------------------------------------------------------------------------------


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _int(v: Any, default: int = 0) -> int:
    if v is None:
        return default
    try:
        return int(float(_s(v)))
    except ValueError:
        return default


def _now_ms(t: Any) -> int:
    sec, usec = t
    return int(sec) * 1000 + int(usec) // 1000


def _pairs(raw: Any) -> list[tuple[str, float]]:
    """ZRANGE ... WITHSCORES as (member, score) whatever the client's reply shape."""
    if not raw:
        return []
    if isinstance(raw[0], (list, tuple)):
        return [(_s(m), float(sc)) for m, sc in raw]
    return [(_s(raw[i]), float(raw[i + 1])) for i in range(0, len(raw), 2)]


def _hash(raw: Any) -> dict[str, str]:
    if isinstance(raw, Mapping):
        return {_s(k): _s(v) for k, v in raw.items()}
    return {_s(raw[i]): _s(raw[i + 1]) for i in range(0, len(raw or ()), 2)}


def _counts(h: Mapping[str, str], now_sec: int, window_s: int, rate_s: int) -> tuple[Counters, ...]:
    """(totals, window, recent) from a counts hash ("<second>:<c>", "T:<c>"; see ``lua/stats.lua``)."""
    total = dict.fromkeys(STATS_COUNTERS, 0)
    window = dict.fromkeys(STATS_COUNTERS, 0)
    recent = dict.fromkeys(STATS_COUNTERS, 0)
    for name, value in h.items():
        head, _, c = name.partition(":")
        if c not in total:
            continue
        v = _int(value)
        total[c] += v
        if head.isdigit():
            age = now_sec - int(head)
            if 0 <= age < window_s:
                window[c] += v
            if 0 <= age < rate_s:
                recent[c] += v
    return Counters.of(total), Counters.of(window), Counters.of(recent)


def _top(h: Mapping[str, str], tag: str, sets: Sequence[Any], now: int, n: int) -> tuple[KeyCount, ...]:
    """The top ``n`` of the two sets of one kind that hold this minute or the last one."""
    e = now // STATS_EPOCH_MS
    acc: dict[str, float] = {}
    for i, raw in enumerate(sets):
        if _int(h.get(f"E:{tag}{i}"), -1) not in (e, e - 1):
            continue
        for m, score in _pairs(raw):
            acc[m] = acc.get(m, 0.0) + score
    ranked = sorted(acc.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return tuple(KeyCount(unescape(m), round(v)) for m, v in ranked)


def _rate_limit(p: Policy) -> int:
    if p.rate is not None:
        return p.rate.max_cost
    if p.concurrency is not None:
        return p.concurrency.max_limit
    return min(b.budget for b in p.budgets)


def _conc_limit(p: Policy, lim: Any) -> int:
    c = p.concurrency
    assert c is not None
    if lim is None:
        return c.max_limit
    return int(min(max(float(_s(lim)), c.min_limit), c.max_limit))


def _key_reads(p: Policy, prefix: str, key: str, now: int) -> list[Command]:
    ks = keyset(prefix, p, key)
    cmds: list[Command] = [("HMGET", ks.budget(i), "s", "c") for i in range(len(p.budgets))]
    if p.concurrency is not None and p.concurrency.per_key:
        cmds += [("ZCOUNT", ks.leases, f"({now}", "+inf"), ("HGET", ks.meta, "lim")]
    cmds.append(("HMGET", ks.provider, "u", "lim", "iv"))
    return cmds


def _key_view(p: Policy, key: str, now: int, replies: Sequence[Any], denied: int, spent: int) -> KeyView:
    budgets = []
    for i, b in enumerate(p.budgets):
        s, c = replies[i] or (None, None)
        start = now - now % b.window_ms
        used = _int(c) if _int(s, -1) == start else 0
        budgets.append(BudgetView(b.budget, b.window_ms, used, start + b.window_ms))
    inflight = limit = None
    if p.concurrency is not None and p.concurrency.per_key:
        inflight = _int(replies[len(p.budgets)])
        limit = _conc_limit(p, replies[len(p.budgets) + 1])
    u, plim, iv = replies[-1] or (None, None, None)
    held = _int(u) if _int(u) > now else 0
    try:
        pace = 1000.0 / float(_s(iv)) if iv is not None else 0.0
    except (ValueError, ZeroDivisionError):
        pace = 0.0
    return KeyView(key, denied, spent, tuple(budgets), inflight, limit, held, _int(plim), pace)


def snapshot_reader(
    policies: Policies | Iterable[Policy],
    prefix: str = "taskgate",
    *,
    window_s: int = STATS_SLOTS,
    rate_s: int = 5,
    top: int = 5,
) -> Reader:
    """The reading of a Snapshot, without I/O: yields lists of commands (the first is ``[("TIME",)]``),
    receives their replies in order, returns the :class:`Snapshot`."""
    if not 1 <= rate_s <= window_s <= STATS_SLOTS:
        raise ValueError(f"need 1 <= rate_s <= window_s <= {STATS_SLOTS}, got {rate_s}, {window_s}")
    pols = list(policies.values()) if isinstance(policies, Mapping) else list(policies)
    (t,) = yield [("TIME",)]
    now = _now_ms(t)
    cmds: list[Command] = []
    for p in pols:
        sk = stats_keys(prefix, p.name)
        cmds.append(("HGETALL", sk.counts))
        cmds += [("ZRANGE", z, 0, -1, "WITHSCORES") for z in sk[1:]]
        if p.concurrency is not None and not p.concurrency.per_key:
            ks = keyset(prefix, p, "-")
            cmds += [("ZCOUNT", ks.leases, f"({now}", "+inf"), ("HGET", ks.meta, "lim")]
    replies = yield cmds
    firsts: list[dict[str, Any]] = []
    at = 0
    for p in pols:
        h = _hash(replies[at])
        sets = replies[at + 1 : at + 5]
        at += 5
        totals, window, recent = _counts(h, now // 1000, window_s, rate_s)
        kw: dict[str, Any] = {
            "name": p.name,
            "kind": p.kind,
            "strategy": p.rate.strategy if p.rate else "",
            "limit": _rate_limit(p),
            "counters": p.counters,
            "axes": tuple(a for a, on in zip(AXES, (p.rate, p.concurrency, p.budgets), strict=True) if on),
            "totals": totals,
            "window": window,
            "recent": recent,
            "rate_s": max(0.5, rate_s - 1 + (now % 1000) / 1000),
            "per_key": bool(p.concurrency and p.concurrency.per_key),
            "top_denied": _top(h, "d", sets[:2], now, top),
            "top_spent": _top(h, "s", sets[2:], now, top),
        }
        if p.concurrency is not None:
            if p.concurrency.per_key:
                kw["concurrency_limit"] = p.concurrency.max_limit
            else:
                kw["inflight"] = _int(replies[at])
                kw["concurrency_limit"] = _conc_limit(p, replies[at + 1])
                at += 2
        firsts.append(kw)
    # the state of the top keys: their budgets and (per-key limits) their slots
    cmds = []
    chosen: list[list[tuple[str, int, int]]] = []
    for p, kw in zip(pols, firsts, strict=True):
        denied = {k.key: k.count for k in kw["top_denied"]}
        spent = {k.key: k.count for k in kw["top_spent"]}
        names = sorted(set(denied) | set(spent), key=lambda k: (-denied.get(k, 0), -spent.get(k, 0), k))
        picked = [(k, denied.get(k, 0), spent.get(k, 0)) for k in names[:top]]
        chosen.append(picked)
        for k, _, _ in picked:
            cmds += _key_reads(p, prefix, k, now)
    replies = (yield cmds) if cmds else []
    out = []
    at = 0
    for p, kw, picked in zip(pols, firsts, chosen, strict=True):
        views = []
        for k, d, sp in picked:
            n = len(_key_reads(p, prefix, k, now))
            views.append(_key_view(p, k, now, replies[at : at + n], d, sp))
            at += n
        out.append(PolicyView(**kw, keys=tuple(views)))
    return Snapshot(now, window_s, rate_s, prefix, tuple(out))


def key_reader(policy: Policy, prefix: str, key: str) -> Generator[list[Command], list[Any], KeyView]:
    """The state of one key (its budgets and, for a per-key limit, its slots), without I/O."""
    (t,) = yield [("TIME",)]
    now = _now_ms(t)
    cmds = _key_reads(policy, prefix, key, now)
    replies = (yield cmds) if cmds else []
    return _key_view(policy, key, now, replies, 0, 0)


# -- drivers ------------------------------------------------------------------------------------------------


def _pipeline(client: Any) -> Any:
    try:
        return client.pipeline(transaction=False)
    except Exception:  # a cluster client without the argument
        return client.pipeline()


def _drive(client: Any, gen: Generator[list[Command], list[Any], Any]) -> Any:
    cmds = next(gen)
    while True:
        if cmds == [("TIME",)]:
            replies: list[Any] = [client.time()]
        else:
            pipe = _pipeline(client)
            for c in cmds:
                pipe.execute_command(*c)
            replies = list(pipe.execute())
        try:
            cmds = gen.send(replies)
        except StopIteration as stop:
            return stop.value


async def _drive_async(client: Any, gen: Generator[list[Command], list[Any], Any]) -> Any:
    cmds = next(gen)
    while True:
        if cmds == [("TIME",)]:
            replies: list[Any] = [await client.time()]
        else:
            pipe = _pipeline(client)
            for c in cmds:
                pipe.execute_command(*c)
            replies = list(await pipe.execute())
        try:
            cmds = gen.send(replies)
        except StopIteration as stop:
            return stop.value


def read_snapshot(
    client: Any,
    policies: Policies | Iterable[Policy],
    prefix: str = "taskgate",
    *,
    window_s: int = STATS_SLOTS,
    rate_s: int = 5,
    top: int = 5,
) -> Snapshot:
    """The Snapshot of ``policies`` from a redis-py client (sync)."""
    snap: Snapshot = _drive(
        client, snapshot_reader(policies, prefix, window_s=window_s, rate_s=rate_s, top=top)
    )
    return snap


async def read_snapshot_async(
    client: Any,
    policies: Policies | Iterable[Policy],
    prefix: str = "taskgate",
    *,
    window_s: int = STATS_SLOTS,
    rate_s: int = 5,
    top: int = 5,
) -> Snapshot:
    """The Snapshot of ``policies`` from a ``redis.asyncio`` client."""
    gen = snapshot_reader(policies, prefix, window_s=window_s, rate_s=rate_s, top=top)
    snap: Snapshot = await _drive_async(client, gen)
    return snap


def read_key(client: Any, policy: Policy, prefix: str, key: str) -> KeyView:
    """The budgets and (per-key limit) slots of one key, from a redis-py client (sync)."""
    view: KeyView = _drive(client, key_reader(policy, prefix, key))
    return view
