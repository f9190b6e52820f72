"""``taskgate fairness``: the weights of fair keys in the waiting rooms of a policy (registered by
:mod:`taskgate.cli`).

::

    taskgate fairness set   POLICY FAIRKEY WEIGHT   # store a weight: in force fleet-wide within a second
    taskgate fairness unset POLICY FAIRKEY          # remove it: the policy file's weight applies again
    taskgate fairness show  POLICY                  # the weights in force, and where each comes from
"""

from __future__ import annotations

import argparse

from taskgate.cli_base import Command, direct_door, fail, register, store_args

__all__: list[str] = []


def _configure(p: argparse.ArgumentParser) -> None:
    store_args(p)
    sub = p.add_subparsers(dest="fairness_command", metavar="COMMAND", required=True)
    put = sub.add_parser("set", help="store the weight of a fair key (in force within a second)")
    unset = sub.add_parser("unset", help="remove a stored weight (the policy file's applies again)")
    show = sub.add_parser("show", help="the weights in force for a policy, and where each comes from")
    for s in (put, unset, show):
        s.add_argument("policy")
    for s in (put, unset):
        s.add_argument("fair_key", metavar="FAIRKEY")
    put.add_argument("weight", metavar="WEIGHT", help="a number > 0: the share is weight / sum of weights")


def _run(args: argparse.Namespace) -> int:
    from taskgate.backends.fairness import clear_weight, set_weight, weights_in_force
    from taskgate.errors import TaskgateError

    b = direct_door("fairness", args)
    if isinstance(b, int):
        return b
    try:
        if args.fairness_command == "set":
            w = set_weight(b, args.policy, args.fair_key, args.weight)
            print(f"policy {args.policy!r}: fair key {args.fair_key!r} weight {w:g} (in force within 1 s)")
        elif args.fairness_command == "unset":
            gone = clear_weight(b, args.policy, args.fair_key)
            print(
                f"policy {args.policy!r}: fair key {args.fair_key!r}: "
                + ("removed" if gone else "none stored")
            )
        else:
            default, weights = weights_in_force(b, args.policy)
            print(f"policy {args.policy!r}: default weight {default:g}")
            if weights:
                print(f"{'fair key':<30} {'weight':>8}  from")
            for k, (w, where) in sorted(weights.items()):
                print(f"{k:<30} {w:>8g}  {where}")
        return 0
    except (TaskgateError, ValueError) as e:
        return fail("fairness", e)
    finally:
        b.close()


register(Command("fairness", "the weights of fair keys in the waiting rooms of a policy", _configure, _run))
