"""Pure marshalling and decoding shared by every Redis-speaking door (sync, async, embedded).

A :class:`Plan` is everything one EVALSHA needs (script, KEYS, ARGV) plus the function that decodes its reply.
Planning validates arguments, so bad input fails here with a clear ValueError before any round trip.

Counters (:mod:`taskgate.engine.keys` has the layout and the Redis Cluster choice): a counted operation of
a policy with ``counters: true`` gets the policy's stats keys after its own KEYS and one stats argument after
its ARGV (mode ``inline``), or, on a cluster where those keys are in another slot, no stats keys and a reply
that carries the counts (mode ``collect``: ``Plan.collect`` names the policy; :class:`StatsBuffer` sums the
counts until the backend sends them with :meth:`Planner.stats_flush`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from taskgate.engine import Script, StatsMode, script
from taskgate.engine.keys import escape, keyset, member_head, shares_stats_slot, stats_keys
from taskgate.errors import OperationNotSupportedError
from taskgate.logs import key_text, log
from taskgate.policy import Policies, Policy, RateSpec
from taskgate.provider import ProviderReport, Reported
from taskgate.types import (
    AdmitReply,
    Decision,
    Forecast,
    HeartbeatReply,
    LeaseRef,
    ReserveReply,
    Settlement,
    WindowLease,
)

if TYPE_CHECKING:
    from taskgate.engine.stats_buffer import StatsDelta

T = TypeVar("T")
_NOW, _ONE = b"0", b"1"  # check's usual ARGV, pre-encoded (now = Redis TIME, cost 1)
MAX_KEY_BYTES = 1024
MAX_MANY = 1000


@dataclass(slots=True)  # not frozen: a frozen dataclass is ~4x slower to build, and one is built per call
class Plan(Generic[T]):
    script: Script
    keys: list[str]
    args: Sequence[str | int | float | bytes]  # bytes: sent as they are
    decode: Callable[[Any], T]
    collect: str = ""  # stats mode collect: the policy whose counts the reply carries ({reply, deltas})


@dataclass(frozen=True, slots=True)
class _CheckStatic:
    """The parts of a ``check`` plan that depend on the policy only (:meth:`Planner._check_static`)."""

    script: Script
    head: str  # keyset(prefix, policy, key).base == head + escape(key) + mid
    mid: str
    max_cost: int
    books: bool  # booking horizon > 0
    tail: tuple[str | int | float | bytes, ...]  # ARGV after the op's own: (the stats argument) or ()
    stats_keys: tuple[str, ...]  # KEYS after the op's own (stats mode inline)
    collect: str


def check_key(key: object) -> str:
    if not isinstance(key, str):  # not a key at all: say what it is
        raise ValueError(f"key must be a non-empty string, got {type(key).__name__} {key!r}")
    # a key can be personal data: the messages show one only when allowed (taskgate.log_keys)
    if not key:
        raise ValueError("key must be a non-empty string, got ''")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ValueError(
            f"key is not valid Unicode text ({e.reason} at {e.start}): {key_text(key)}"
        ) from None
    if size > MAX_KEY_BYTES:
        raise ValueError(f"key is longer than {MAX_KEY_BYTES} bytes (UTF-8): {key_text(key)}")
    return key


def check_now(now: object) -> int:
    if now is None:
        return 0
    if isinstance(now, bool) or not isinstance(now, int) or now <= 0:
        raise ValueError(f"now must be epoch milliseconds as a positive int, got {now!r}")
    return now


def check_units(value: object, name: str, policy: str, maximum: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(
            f"{name} {value} can never be admitted by policy {policy!r} (at most {maximum} per call): "
            "it would be deferred forever"
        )
    return value


def text(v: object) -> str:
    """A reply field as text (Redis replies bytes or str)."""
    return v.decode() if isinstance(v, bytes) else str(v)


def decode_decision(raw: Sequence[Any], i: int = 0) -> Decision:
    # positional: a third cheaper than keywords on the hot path (allowed, limit, remaining, reset_at,
    # retry_after_ms, booked, booking_token)
    return Decision(
        int(raw[i]) == 1,
        int(raw[i + 1]),
        int(raw[i + 2]),
        int(raw[i + 3]),
        int(raw[i + 4]),
        int(raw[i + 5]) == 1,
        text(raw[i + 6]) if len(raw) > i + 6 else "",
    )


def _slot_setters() -> Callable[..., Decision]:
    """A Decision built by its slots' own setters, in field order: what its frozen ``__init__`` does through
    ``object.__setattr__`` per field, in half the time (the hot path of every check builds one)."""
    sets = [getattr(Decision, f.name).__set__ for f in fields(Decision)]
    if len(sets) != 7:  # the fields changed: the constructor, as decode_decision
        return Decision
    s0, s1, s2, s3, s4, s5, s6 = sets
    new = object.__new__

    def make(a: bool, li: int, re: int, at: int, rt: int, bk: bool, tok: str) -> Decision:
        d = new(Decision)
        s0(d, a), s1(d, li), s2(d, re), s3(d, at), s4(d, rt), s5(d, bk), s6(d, tok)
        return d

    return make


_make_decision = _slot_setters()


def decode_check(raw: Sequence[Any]) -> Decision:
    """One check's reply, as :func:`decode_decision` reads it: a Redis reply's integers are ints already."""
    a, limit, remaining, reset_at, retry, booked, tok = raw
    return _make_decision(a == 1, limit, remaining, reset_at, retry, booked == 1, text(tok) if tok else "")


def decode_many(raw: Sequence[Any]) -> list[Decision]:
    return [decode_decision(raw, i) for i in range(0, len(raw), 7)]


def decode_forecast(raw: Sequence[Any]) -> Forecast:
    return Forecast(spendable_now=int(raw[0]), next_replenish_at=int(raw[1]), full_at=int(raw[2]))


class Planner:
    """Turns public calls into :class:`Plan` objects for one set of policies and one key prefix.
    ``cluster=True``: the client is a Redis Cluster client (counters of per-key policies are collected)."""

    def __init__(self, policies: Policies, prefix: str = "taskgate", *, cluster: bool = False) -> None:
        if not isinstance(prefix, str) or not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix must be a non-empty string without braces, got {prefix!r}")
        self.policies = policies
        self.prefix = prefix
        self.cluster = cluster
        self._stats_of: dict[str, tuple[StatsMode, list[str], int]] = {}
        self._checks: dict[str, _CheckStatic] = {}

    def _stats(self, p: Policy) -> tuple[StatsMode, list[str], int]:
        """(mode, stats keys to append, the check script's member offset) of policy ``p``."""
        got = self._stats_of.get(p.name)
        if got is not None:
            return got
        mode: StatsMode
        if not p.counters:
            mode = "off"
        elif self.cluster and not shares_stats_slot(p):
            mode = "collect"
        else:
            mode = "inline"
        skeys = list(stats_keys(self.prefix, p.name)) if mode == "inline" else []
        if not p.budgets:
            del skeys[3:]  # it never spends: no top-spender sets
        got = self._stats_of[p.name] = (mode, skeys, member_head(self.prefix, p))
        return got

    def _counted(
        self,
        p: Policy,
        op: str,
        strategy: str | None,
        keys: list[str],
        args: list[str | int | float],
        decode: Callable[[Any], T],
        member: str | None,
        consts: tuple[str | int | float, ...] = (),
    ) -> Plan[T]:
        """The plan of a counted operation; ``member`` is the caller's key (None: check, cut from KEYS);
        ``consts``: the policy's constants written into the script (see :func:`taskgate.engine.script`)."""
        mode, skeys, head = self._stats(p)
        if mode == "off":
            return Plan(script(op, strategy, consts=consts), keys, args, decode)
        arg: str | int = head if member is None else escape(member)
        return Plan(
            script(op, strategy, mode, len(skeys) or 5, consts),
            keys + skeys if skeys else keys,
            [*args, arg],
            decode,
            p.name if mode == "collect" else "",
        )

    def stats_flush(self, policy: str, now: int, delta: StatsDelta) -> Plan[None]:
        """Write counts collected in cluster mode (``now``: any epoch-ms of the second they belong to)."""
        return Plan(script("stats"), list(stats_keys(self.prefix, policy)), [now, *delta.args()], _none)

    def policy(self, name: str) -> Policy:
        if not isinstance(name, str):
            raise ValueError(f"policy must be a policy name (str), got {name!r}")
        return self.policies[name]

    def _rate_policy(self, name: str, op: str) -> tuple[Policy, RateSpec]:
        p = self.policy(name)
        if p.rate is None:
            raise OperationNotSupportedError(
                f"{op} needs a rate axis, and policy {name!r} has none ({p.kind}); use admit"
                + (" or debit" if p.budgets else "")
            )
        return p, p.rate

    @staticmethod
    def _rate_args(p: Policy, rate: RateSpec) -> list[str | int | float]:
        return [*rate.params(), p.booking_horizon_ms]

    @classmethod
    def _check_consts(cls, p: Policy, rate: RateSpec) -> tuple[str | int | float, ...]:
        """``op_check.lua``'s TG_CONST: the booking grace, then the strategy's params and horizon."""
        return (p.booking_grace_ms, *cls._rate_args(p, rate))

    def _check_static(self, name: str) -> _CheckStatic:
        """What every check of policy ``name`` shares, worked out once (the hot path only adds the key)."""
        got = self._checks.get(name) if isinstance(name, str) else None
        if got is not None:
            return got
        p, rate = self._rate_policy(name, "check")
        # the plan of a check on a stand-in key, cut around it: the same KEYS and ARGV as for any key
        base = keyset(self.prefix, p, "\0").base
        ref = self._counted(p, "check", rate.strategy, [base], [], _none, None, self._check_consts(p, rate))
        head, mid = ref.keys[0].split("\0")
        got = self._checks[name] = _CheckStatic(
            ref.script,
            head,
            mid,
            rate.max_cost,
            p.booking_horizon_ms > 0,
            tuple(ref.args),
            tuple(ref.keys[1:]),
            ref.collect,
        )
        return got

    def check(
        self,
        name: str,
        key: str,
        cost: int = 1,
        now: int | None = None,
        *,
        book: bool = False,
        token: str = "",
    ) -> Plan[Decision]:
        c = self._check_static(name)
        check_key(key)
        check_units(cost, "cost", name, c.max_cost)
        base = c.head + escape(key) + c.mid  # keyset(prefix, policy, key).base
        # b: redeem a token and/or book; t: redeem a token only; c: plain consume
        mode = "b" if book and c.books else ("t" if token else "c")
        if mode == "c":  # the usual call: its arguments as the bytes redis-py would encode them to
            keys = [base + ":r", base + ":pv", *c.stats_keys]
            args: list[str | int | float | bytes] = [
                _NOW if now is None else check_now(now),
                b"c",
                _ONE if cost == 1 else cost,
                *c.tail,
            ]
        else:
            keys = [base + ":r", base + ":bk", base + ":pv", *c.stats_keys]
            args = [check_now(now), mode, cost, token or "", *c.tail]
        return Plan(c.script, keys, args, decode_check, c.collect)

    def check_many(
        self, name: str, keys: Sequence[str], cost: int = 1, now: int | None = None
    ) -> Plan[list[Decision]]:
        p, rate = self._rate_policy(name, "check_many")
        if isinstance(keys, str) or not isinstance(keys, Sequence):
            raise ValueError(f"keys must be a sequence of strings, got {type(keys).__name__}")
        if len(keys) > MAX_MANY:
            raise ValueError(f"check_many takes at most {MAX_MANY} keys, got {len(keys)}")
        check_units(cost, "cost", name, rate.max_cost)
        ks = [keyset(self.prefix, p, check_key(k)) for k in keys]
        rk = [k.rate for k in ks] + [k.provider for k in ks]
        args: list[str | int | float] = [check_now(now), "c", cost]
        return self._counted(
            p, "check", rate.strategy, rk, args, decode_many, None, self._check_consts(p, rate)
        )

    def peek(self, name: str, key: str, now: int | None = None) -> Plan[Decision]:
        p, rate = self._rate_policy(name, "peek")
        check_key(key)
        ks = keyset(self.prefix, p, key)
        return Plan(
            script("check", rate.strategy, consts=self._check_consts(p, rate)),
            [ks.rate, ks.provider],
            [check_now(now), "p", 1],
            decode_decision,
        )

    def forecast(self, name: str, key: str, cost: int = 1, now: int | None = None) -> Plan[Forecast]:
        p, rate = self._rate_policy(name, "forecast")
        check_key(key)
        check_units(cost, "cost", name, rate.max_cost)
        ks = keyset(self.prefix, p, key)
        args: list[str | int | float] = [check_now(now), *self._rate_args(p, rate)]
        return Plan(script("forecast", rate.strategy), [ks.rate], args, decode_forecast)

    def lease_window(
        self,
        name: str,
        key: str,
        wants: int,
        now: int | None = None,
        *,
        tenant: str | None = None,
        weight: float = 1.0,
    ) -> Plan[WindowLease]:
        """Grant up to ``wants`` units of the current window of a fixedWindow policy for ``key`` ("" = one
        policy-wide budget no check can name), from the counter ``check`` spends (``op_lease.lua``). With a
        ``tenant`` (of ``weight``), the window is split between the tenants that lease it by weight."""
        p, rate = self._rate_policy(name, "a lease")
        if rate.strategy != "fixedWindow":
            raise OperationNotSupportedError(
                f"a lease is a chunk of a fixed window's budget, and policy {name!r} is {rate.strategy}"
            )
        if key != "":
            check_key(key)
        wants = check_units(wants, "wants", name, None)
        ks = keyset(self.prefix, p, key)
        args: list[str | int | float] = [check_now(now), wants, *self._rate_args(p, rate)]
        if tenant is None:
            return Plan(script("lease", rate.strategy), [ks.rate], args, decode_window_lease)
        if tenant != "":
            check_key(tenant)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise ValueError(
                f"policy {name!r}: the weight of tenant {tenant!r} must be a number > 0, got {weight!r}"
            )
        keys = [ks.rate, ks.tenants]
        return Plan(script("lease", rate.strategy), keys, [*args, tenant, float(weight)], decode_window_lease)

    def reset(self, name: str, key: str) -> Plan[int]:
        p = self.policy(name)
        check_key(key)
        ks = keyset(self.prefix, p, key)
        keys = [ks.rate, ks.bookings, ks.provider, *(ks.budget(i) for i in range(len(p.budgets)))]
        if p.concurrency is not None and p.concurrency.per_key:
            keys += [ks.leases, ks.meta, ks.waiters]
        return Plan(script("reset"), keys, [], int)


def decode_window_lease(raw: Sequence[Any]) -> WindowLease:
    return WindowLease(int(raw[0]), int(raw[1]), int(raw[2]), int(raw[3]), int(raw[4]))


def _holder(holder: str | None) -> str:
    """A unique lease holder: the caller's name (e.g. a task id, for operators) plus a random suffix, so two
    leases of one holder can never share an id and a stale release can never free the newer lease."""
    if holder is None:
        return uuid.uuid4().hex
    if not isinstance(holder, str) or not holder or ":" in holder or len(holder) > 200:
        raise ValueError(
            f"holder must be a non-empty string without ':' of at most 200 chars, got {holder!r}"
        )
    return f"{holder}.{uuid.uuid4().hex[:12]}"


def _budget_args(p: Policy) -> list[str | int | float]:
    out: list[str | int | float] = [len(p.budgets)]
    for b in p.budgets:
        out += [b.budget, b.window_ms]
    return out


def _tokens(value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"tokens must be an int >= {minimum}, got {value!r}")
    return value


def _budget_policy(planner: Planner, name: str, op: str) -> Policy:
    p = planner.policy(name)
    if not p.budgets:
        raise OperationNotSupportedError(f"{op} needs a tokenBudget, and policy {name!r} has none ({p.kind})")
    return p


def _res_ttl(p: Policy) -> int:
    """How long a reservation's record is kept: its longest window, plus that again (at least a minute) for
    a holder that settles late (a long body, a paused worker): settle then still knows the estimate and
    charges only the difference, instead of debiting the actual on top of the estimate."""
    longest = max(b.window_ms for b in p.budgets)
    return longest + max(longest, 60_000)


class AxesPlanner(Planner):
    """Planning of the concurrency and cost axes and of admit (rate x concurrency x cost)."""

    def admit(
        self,
        name: str,
        key: str,
        cost: int = 1,
        tokens: int = 0,
        now: int | None = None,
        *,
        holder: str | None = None,
        book: bool = False,
        token: str = "",
    ) -> Plan[AdmitReply]:
        p = self.policy(name)
        if not p.admits:
            raise OperationNotSupportedError(
                f"admit needs a concurrency or tokenBudget axis, and policy {name!r} is a plain rate "
                "limiter: "
                "use check"
            )
        escrow = self.admit_units(p, key, cost, tokens)
        rid = uuid.uuid4().hex if escrow else ""
        hold = _holder(holder) if p.concurrency else ""
        keys, args = self.admit_parts(p, key, cost, tokens, now, hold=hold, rid=rid, book=book, token=token)

        def decode(raw: Sequence[Any]) -> AdmitReply:
            member = text(raw[8])
            lease = LeaseRef.make(name, key, member) if member else None
            reserved = int(raw[10])
            return AdmitReply(
                decode_decision(raw), text(raw[7]), lease, int(raw[9]), rid if reserved else "", reserved
            )

        return self._counted(p, "admit", p.rate.strategy if p.rate else None, keys, args, decode, key)

    @staticmethod
    def admit_units(p: Policy, key: str, cost: int, tokens: int) -> bool:
        """Validate the units of one admission of ``p``; True if its tokens are escrowed."""
        name = p.name
        check_key(key)
        check_units(cost, "cost", name, p.rate.max_cost if p.rate else None)
        _tokens(tokens)
        if tokens and not p.budgets:
            raise ValueError(f"tokens={tokens} given, but policy {name!r} has no tokenBudget")
        escrow = p.accounting == "escrow" and tokens > 0
        if escrow and tokens > min(b.budget for b in p.budgets):
            raise ValueError(
                f"tokens {tokens} can never be admitted by policy {name!r} "
                f"(its smallest budget is {min(b.budget for b in p.budgets)}): it would be deferred forever"
            )
        return escrow

    def admit_parts(
        self,
        p: Policy,
        key: str,
        cost: int,
        tokens: int,
        now: int | None,
        *,
        hold: str,
        rid: str = "",
        book: bool = False,
        token: str = "",
    ) -> tuple[list[str], list[str | int | float]]:
        """KEYS and ARGV of op admit (``lua/op_admit.lua``) for ``p`` (any policy: the waiting room admits
        plain rate policies with it too). ``hold`` is the lease holder (ignored without concurrency)."""
        ks = keyset(self.prefix, p, key)
        c = p.concurrency
        keys = [ks.rate, ks.bookings, ks.leases, ks.meta, ks.waiters, ks.reservation(rid or "-")]
        keys += [ks.budget(i) for i in range(len(p.budgets))]
        keys.append(ks.provider)
        args: list[str | int | float] = [
            check_now(now),
            cost,
            tokens,
            hold if c is not None else "",
            c.lease_ttl_ms if c else 0,
            c.min_limit if c else 0,
            c.max_limit if c else 0,
            "e" if p.accounting == "escrow" else "d",
            "1" if book and p.booking_horizon_ms > 0 else "0",
            token or "",
            p.booking_grace_ms,
            _res_ttl(p) if p.budgets else 0,
            *_budget_args(p),
            *(p.rate.params() if p.rate else []),
            p.booking_horizon_ms,
        ]
        return keys, args

    def report(self, name: str, key: str, report: ProviderReport, now: int | None = None) -> Plan[Reported]:
        """What the provider said about (``name``, ``key``), for ``lua/op_report.lua``."""
        p = self.policy(name)
        check_key(key)
        if not isinstance(report, ProviderReport):
            raise ValueError(f"report must be a ProviderReport (taskgate.provider.parse), got {report!r}")
        ks = keyset(self.prefix, p, key)
        c = p.concurrency
        req, tok = report.requests, report.tokens
        hold, longest = report.hold_ms, p.provider.max_hold_ms
        keys = [ks.provider, ks.meta, *(ks.budget(i) for i in range(len(p.budgets)))]
        args: list[str | int | float] = [
            check_now(now),
            hold,
            longest,
            "1" if report.rate_limited else "0",
            req.limit if req is not None and req.limit else -1,
            req.remaining if req is not None and req.remaining is not None else -1,
            req.window_ms if req is not None and req.window_ms else -1,
            tok.remaining if tok is not None and tok.remaining is not None else -1,
            c.min_limit if c else 0,
            c.max_limit if c else 0,
            p.provider.horizon_ms,
            *_budget_args(p),
        ]

        def decode(raw: Sequence[Any]) -> Reported:
            until, at = int(raw[0]), int(raw[1])
            if hold > longest:
                log.warning(
                    "taskgate: the provider asked policy %r key %s to hold for %.0fs; capped at "
                    "provider.maxHold %.0fs",
                    name,
                    key_text(key),
                    hold / 1000,
                    longest / 1000,
                )
            return Reported(
                report,
                until,
                max(0, until - at) if until else 0,
                hold > longest,
                int(raw[2]),
                int(raw[3]),
                int(raw[4]) / 1000.0,
                int(raw[5]),
                int(raw[6]),
                int(raw[7]),
            )

        return self._counted(p, "report", None, keys, args, decode, key)

    def _lease_set(self, lease: LeaseRef) -> tuple[Policy, list[str]]:
        p = self.policy(lease.policy)
        if p.concurrency is None:
            raise OperationNotSupportedError(
                f"policy {lease.policy!r} has no concurrency axis: nothing to release"
            )
        ks = keyset(self.prefix, p, lease.key)
        return p, [ks.leases, ks.meta]

    def release(self, lease_id: str, dropped: bool = False, now: int | None = None) -> Plan[bool]:
        lease = LeaseRef.parse(lease_id)
        p, keys = self._lease_set(lease)
        c = p.concurrency
        assert c is not None
        args: list[str | int | float] = [
            check_now(now),
            lease.member,
            "1" if dropped else "0",
            c.min_limit,
            c.max_limit,
        ]
        return self._counted(p, "release", None, keys, args, _released, "")

    def heartbeat(self, lease_ids: Sequence[str], now: int | None = None) -> list[Plan[HeartbeatReply]]:
        """One plan per lease set (leases of one policy, or of one (policy, key) for per-key limits)."""
        groups: dict[tuple[str, ...], tuple[Policy, list[LeaseRef]]] = {}
        for lid in lease_ids:
            lease = LeaseRef.parse(lid)
            p, lkeys = self._lease_set(lease)
            groups.setdefault(tuple(lkeys), (p, []))[1].append(lease)
        plans: list[Plan[HeartbeatReply]] = []
        for gkeys, (p, leases) in groups.items():
            by_member = {lease.member: lease.id for lease in leases}
            c = p.concurrency
            assert c is not None

            def decode(raw: Sequence[Any], by_member: dict[str, str] = by_member) -> HeartbeatReply:
                items = [text(x) for x in raw[:-1]]
                bar = items.index("|")
                return HeartbeatReply(
                    [by_member[m] for m in items[:bar]],
                    [by_member[m] for m in items[bar + 1 :]],
                    int(raw[-1]),
                )

            args: list[str | int | float] = [check_now(now), c.lease_ttl_ms, *by_member]
            plans.append(self._counted(p, "heartbeat", None, list(gkeys), args, decode, ""))
        return plans

    def lease_budget(self, name: str, key: str, wants: int, now: int | None = None) -> Plan[WindowLease]:
        """Grant up to ``wants`` tokens of the policy's token budgets for ``key`` ("" = one policy-wide
        budget no other call can name), charged at once like a debit (``op_lease_budget.lua``)."""
        p = _budget_policy(self, name, "a token lease")
        if key != "":
            check_key(key)
        wants = check_units(wants, "wants", name, None)
        ks = keyset(self.prefix, p, key)
        keys = [ks.budget(i) for i in range(len(p.budgets))]
        args: list[str | int | float] = [check_now(now), wants, *_budget_args(p)]
        return Plan(script("lease_budget", None), keys, args, decode_window_lease)

    def debit(self, name: str, key: str, tokens: int = 1, now: int | None = None) -> Plan[Decision]:
        p = _budget_policy(self, name, "debit")
        check_key(key)
        _tokens(tokens, 1)
        ks = keyset(self.prefix, p, key)
        keys = [ks.budget(i) for i in range(len(p.budgets))]
        args: list[str | int | float] = [check_now(now), tokens, *_budget_args(p)]
        return self._counted(p, "debit", None, keys, args, decode_decision, key)

    def reserve(self, name: str, key: str, tokens: int, now: int | None = None) -> Plan[ReserveReply]:
        p = _budget_policy(self, name, "reserve")
        check_key(key)
        _tokens(tokens, 1)
        smallest = min(b.budget for b in p.budgets)
        if tokens > smallest:
            raise ValueError(
                f"tokens {tokens} can never be reserved under policy {name!r} "
                f"(its smallest budget is {smallest})"
            )
        ks = keyset(self.prefix, p, key)
        rid = uuid.uuid4().hex
        keys = [ks.reservation(rid), *(ks.budget(i) for i in range(len(p.budgets)))]
        args: list[str | int | float] = [check_now(now), tokens, _res_ttl(p), *_budget_args(p)]

        def decode(raw: Sequence[Any]) -> ReserveReply:
            d = decode_decision(raw)
            return ReserveReply(d, rid if d.allowed else "", int(raw[7]))

        return self._counted(p, "reserve", None, keys, args, decode, key)

    def settle(
        self, name: str, key: str, reservation_id: str, actual: int, now: int | None = None
    ) -> Plan[Settlement]:
        p = _budget_policy(self, name, "settle")
        check_key(key)
        _tokens(actual, 0)
        if not isinstance(reservation_id, str) or not reservation_id.isalnum():
            raise ValueError(f"not a reservation id: {reservation_id!r}")
        ks = keyset(self.prefix, p, key)
        keys = [ks.reservation(reservation_id), *(ks.budget(i) for i in range(len(p.budgets)))]
        args: list[str | int | float] = [check_now(now), actual, *_budget_args(p)]
        return self._counted(
            p,
            "settle",
            None,
            keys,
            args,
            lambda raw: Settlement(decode_decision(raw), int(raw[7]), int(raw[8])),
            key,
        )


def _released(raw: Any) -> bool:
    return int(raw) == 1


def _none(raw: Any) -> None:
    return None
