"""``taskgate rooms``: list, count and purge the engine's waiting rooms (registered by :mod:`taskgate.cli`).

::

    taskgate rooms list  [--redis URL --config FILE]    # every room: policy, key, waiting, oldest wait
    taskgate rooms show  POLICY KEY [--limit N]         # how many wait (per fair key), the next ids
    taskgate rooms purge POLICY KEY [--yes]             # remove what waits there (asks first)
"""

from __future__ import annotations

import argparse
import sys
import time

from taskgate.cli_base import Command, direct_door, fail, register, store_args

__all__: list[str] = []


def _configure(p: argparse.ArgumentParser) -> None:
    store_args(p)
    sub = p.add_subparsers(dest="rooms_command", metavar="COMMAND", required=True)
    sub.add_parser("list", help="every room with work: policy, key, waiting, on the way, oldest wait")
    show = sub.add_parser("show", help="how many tasks wait in one room, and the ids of the first")
    purge = sub.add_parser("purge", help="remove every task waiting in one room (promoted ones stay)")
    for s in (show, purge):
        s.add_argument("policy")
        s.add_argument("key")
    show.add_argument("--limit", type=int, default=20, help="ids to show (default: %(default)s)")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _run(args: argparse.Namespace) -> int:
    from taskgate.backends.waiting import WaitingRoom
    from taskgate.errors import PolicyNotFoundError

    b = direct_door("rooms", args)
    if isinstance(b, int):
        return b
    room = WaitingRoom(b)
    try:
        now = int(time.time() * 1000)
        if args.rooms_command == "list":
            known = [(p, k) for p, k, _ in room.rooms() if p in b.policies]
            print(f"{'policy':<20} {'key':<30} {'waiting':>9} {'on the way':>10} {'oldest wait':>12}")
            for s in room.overview(known):
                oldest = f"{(now - s.oldest_parked_at) / 1000:.1f}s" if s.oldest_parked_at else "-"
                print(f"{s.policy:<20} {s.key:<30} {s.depth:>9} {s.handoff:>10} {oldest:>12}")
            return 0
        s = room.stats(args.policy, args.key)
        if args.rooms_command == "show":
            print(f"policy {args.policy!r} key {args.key!r}: {s.depth} waiting, {s.handoff} on the way")
            fair = room.fair_keys(args.policy, args.key)
            if len(fair) > 1 or "" not in fair:  # shared out by fair key: how many wait for each
                for fk, n in sorted(fair.items(), key=lambda x: -x[1])[: args.limit]:
                    print(f"  fair key {fk!r}: {n} waiting")
            for task_id in room.list(args.policy, args.key, args.limit):
                print(task_id)
            return 0
        if s.depth == 0:
            print(f"policy {args.policy!r} key {args.key!r}: nothing waits")
            return 0
        what = f"the {s.depth} task(s) waiting in the room of policy {args.policy!r}, key {args.key!r}"
        if not args.yes:
            if not sys.stdin.isatty():
                return fail("rooms", f"purge would remove {what}: confirm with --yes")
            answer = input(f"Remove {what}? They will never run. [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing removed")
                return 1
        print(f"removed {room.purge(args.policy, args.key)} task(s)")
        return 0
    except PolicyNotFoundError as e:
        return fail("rooms", e)
    finally:
        b.close()


register(Command("rooms", "list, count and purge the waiting rooms of the engine", _configure, _run))
