"""``taskgate policies check`` (validate a policy file) and the commands on one key: ``peek``, ``reset`` and
``check`` (registered by :mod:`taskgate.cli`)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from taskgate.cli_base import (
    Command,
    decision_fields,
    fail,
    print_fields,
    register,
    store_args,
    with_door,
)

if TYPE_CHECKING:
    from taskgate.backends.redis import RedisBackend

__all__: list[str] = []


def _configure_policies(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="policies_command", metavar="COMMAND", required=True)
    c = sub.add_parser("check", help="validate a policy file and print the effective policies")
    c.add_argument("file", metavar="FILE")


def _describe_policy(p: Any) -> list[str]:
    c = p.concurrency
    conc = "-"
    if c is not None:
        conc = f"{c.min_limit}..{c.max_limit}" if c.adaptive else str(c.max_limit)
        conc += f" {'per key' if c.per_key else 'policy-wide'}, lease {c.lease_ttl_ms} ms"
    budgets = ", ".join(f"{b.budget}/{b.window_ms} ms" for b in p.budgets) or "-"
    return [
        p.name,
        p.kind,
        p.rate.describe() if p.rate else "-",
        conc,
        budgets + (f" ({p.accounting})" if p.budgets else ""),
        f"{p.booking_horizon_ms} ms" if p.booking_horizon_ms else "-",
        p.fail,
        "on" if p.counters else "off",
    ]


def _run_policies(args: argparse.Namespace) -> int:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from taskgate.errors import InvalidPolicyError
    from taskgate.policy import load_policies

    try:
        pols = load_policies(args.file)
    except InvalidPolicyError as e:
        return fail("policies check", e, 1)
    if not pols:
        return fail("policies check", f"{args.file}: no policies", 1)
    t = Table(title=f"{args.file}: {len(pols)} policies, valid", box=box.SIMPLE_HEAD, title_justify="left")
    for name in ("Policy", "Kind", "Rate", "Concurrency", "Token budgets", "Booking", "Fail", "Counters"):
        t.add_column(name, no_wrap=True)
    for p in pols.values():
        t.add_row(*_describe_policy(p))
    con = Console()
    if not con.is_terminal:
        con = Console(width=max(con.width, 200))  # a pipe or a file: whole rows
    con.print(t)
    return 0


register(
    Command("policies", "work with policy files: `policies check FILE`", _configure_policies, _run_policies)
)


def _configure_key_cmd(p: argparse.ArgumentParser, *, cost: bool = False) -> None:
    p.add_argument("policy", metavar="POLICY")
    p.add_argument("key", metavar="KEY")
    store_args(p)
    if cost:
        p.add_argument("--cost", type=int, default=1, metavar="N", help="rate units (default: 1)")
        p.add_argument("--tokens", type=int, default=0, metavar="N", help="cost-axis tokens (admit policies)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _run_peek(args: argparse.Namespace) -> int:
    from taskgate.stats import read_key

    def go(b: RedisBackend) -> int:
        p = b.policy(args.policy)
        out: dict[str, Any] = {"policy": p.name, "key": args.key}
        if p.rate is not None:
            out |= {f"rate_{k}": v for k, v in decision_fields(b.peek(p.name, args.key)).items()}
        view = read_key(b.client, p, b.prefix, args.key)
        for i, bv in enumerate(view.budgets):
            out[f"budget{i}"] = f"{bv.used}/{bv.budget} per {bv.window_ms} ms, resets at {bv.resets_at}"
        if p.concurrency is not None:
            if view.inflight is not None:
                out["slots"] = f"{view.inflight}/{view.limit} (this key)"
            else:
                s = next(iter(_snapshot(b, [p]).policies))
                out["slots"] = f"{s.inflight}/{s.concurrency_limit} (policy-wide)"
        print_fields(f"{p.name} {args.key!r} (nothing consumed)", out, args.json)
        return 0

    return with_door("peek", args, go)


def _snapshot(b: RedisBackend, pols: list[Any]) -> Any:
    from taskgate.stats import read_snapshot

    return read_snapshot(b.client, pols, b.prefix, top=0)


def _run_reset(args: argparse.Namespace) -> int:
    def go(b: RedisBackend) -> int:
        b.reset(args.policy, args.key)
        print(f"reset {args.policy} {args.key!r}: its rate, bookings and budgets are forgotten")
        return 0

    return with_door("reset", args, go)


def _run_check(args: argparse.Namespace) -> int:
    def go(b: RedisBackend) -> int:
        p = b.policy(args.policy)
        if p.admits:
            adm = b.admit(p.name, args.key, args.cost, args.tokens)
            out = decision_fields(adm.decision) | {"binding_axis": adm.binding_axis}
            if adm.allowed:
                adm.release()  # a check holds nothing
                if adm.reservation_id:
                    out["reserved_tokens"] = adm.reserved_tokens
        else:
            if args.tokens:
                raise ValueError(f"--tokens given, but policy {p.name!r} has no tokenBudget")
            out = decision_fields(b.check(p.name, args.key, args.cost))
        verdict = "allowed" if out["allowed"] else "denied"
        print_fields(f"{p.name} {args.key!r}: {verdict} (consumed)", out, args.json)
        return 0 if out["allowed"] else 1

    return with_door("check", args, go)


register(Command("peek", "show a key's state without consuming anything", _configure_key_cmd, _run_peek))
register(Command("reset", "forget a key's state under a policy", _configure_key_cmd, _run_reset))
register(
    Command(
        "check",
        "take one decision for a key (exit 0 allowed, 1 denied)",
        lambda p: _configure_key_cmd(p, cost=True),
        _run_check,
    )
)
