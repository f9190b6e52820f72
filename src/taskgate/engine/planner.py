""":class:`Plan`, the argument checks, and :class:`Planner`: the planning of the rate axis (check,
check_many, peek, forecast, a window lease, reset) that :class:`~taskgate.engine.plan.AxesPlanner` extends
with concurrency, cost and admit. :mod:`taskgate.engine.plan` says what a plan is and is the module to
import from.

Counters (:mod:`taskgate.engine.keys` has the layout and the Redis Cluster choice): a counted operation of
a policy with ``counters: true`` gets the policy's stats keys after its own KEYS and one stats argument after
its ARGV (mode ``inline``), or, on a cluster where those keys are in another slot, no stats keys and a reply
that carries the counts (mode ``collect``: ``Plan.collect`` names the policy; :class:`StatsBuffer` sums the
counts until the backend sends them with :meth:`Planner.stats_flush`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from taskgate.engine import Script, StatsMode, script
from taskgate.engine.decode import (
    decode_check,
    decode_decision,
    decode_forecast,
    decode_many,
    decode_window_lease,
)
from taskgate.engine.keys import escape, keyset, member_head, shares_stats_slot, stats_keys
from taskgate.errors import OperationNotSupportedError
from taskgate.logs import key_text
from taskgate.policy import Policies, Policy, RateSpec
from taskgate.types import Decision, Forecast, WindowLease

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


def rate_params(rate: RateSpec) -> list[int | float]:
    """The ARGV of a rate strategy (``lua/rate_*.lua``) in the engine's order, then the arithmetic flag
    (1 = tolerant, 0 = ThrottleKit's)."""
    s = rate.strategy
    t = 1 if rate.tolerant else 0
    if s == "gcra":
        return [rate.period_ms, rate.limit, rate.burst, t]
    if s == "tokenBucket":
        return [rate.capacity, rate.refill_per_sec, t]
    if s == "fixedWindow":
        return [rate.limit, rate.window_ms, t]
    if s == "slidingWindow":
        return [rate.window_ms, rate.limit, rate.buckets, t]
    return [rate.window_ms, rate.limit, t]


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
        return [*rate_params(rate), p.booking_horizon_ms]

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


def _none(raw: Any) -> None:
    return None
