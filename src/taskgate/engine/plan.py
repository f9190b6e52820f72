"""The engine's Python half: pure marshalling shared by every Redis-speaking door (sync, async, embedded).

A :class:`Plan` is everything one EVALSHA needs (script, KEYS, ARGV) plus the function that decodes its reply
(:mod:`taskgate.engine.decode`). Planning validates arguments, so bad input fails with a clear ValueError
before any round trip. :class:`~taskgate.engine.planner.Planner` (:mod:`taskgate.engine.planner`, with
:class:`Plan`, the argument checks and the counters' KEYS/ARGV) plans the rate axis: check, check_many, peek,
forecast, a window lease, reset. :class:`AxesPlanner`, here, adds the concurrency and cost axes and admit
(rate x concurrency x cost): it is the planner the direct doors use. This module is where the doors and the
waiting room import all of it from.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from taskgate.engine import script
from taskgate.engine.decode import decode_decision, decode_forecast, decode_many, decode_window_lease, text
from taskgate.engine.keys import keyset
from taskgate.engine.planner import (
    MAX_KEY_BYTES,
    MAX_MANY,
    Plan,
    Planner,
    check_key,
    check_now,
    check_units,
    rate_params,
)
from taskgate.errors import OperationNotSupportedError
from taskgate.logs import key_text, log
from taskgate.policy import Policy
from taskgate.provider import ProviderReport, Reported
from taskgate.types import (
    AdmitReply,
    Decision,
    HeartbeatReply,
    LeaseRef,
    ReserveReply,
    Settlement,
    WindowLease,
)

__all__ = [
    "MAX_KEY_BYTES",
    "MAX_MANY",
    "AxesPlanner",
    "Plan",
    "Planner",
    "check_key",
    "check_now",
    "check_units",
    "decode_decision",
    "decode_forecast",
    "decode_many",
    "decode_window_lease",
    "rate_params",
    "text",
]


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
            *(rate_params(p.rate) if p.rate else []),
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
