"""What the ``taskgate`` subcommands share: :class:`Command` and :func:`register` (the registry that
:mod:`taskgate.cli` builds its parser from), the store arguments, the direct door they open, and the way
they print fields and fail.

Each subcommand is one :class:`Command`: a ``configure`` function that adds its arguments to its own
parser and a ``run`` function that gets the parsed arguments and returns the exit status. Heavy imports
(grpc, redis) happen inside ``run``. To add a subcommand, write the two functions in a ``cli_*`` module,
:func:`register` them there, and import that module in :mod:`taskgate.cli`::

    def _configure_peek(p: argparse.ArgumentParser) -> None: ...
    def _run_peek(args: argparse.Namespace) -> int: ...
    register(Command("peek", "show a key's state without consuming", _configure_peek, _run_peek))

A command with sub-commands of its own (``taskgate policies check``) adds them in ``configure`` with
``p.add_subparsers()``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskgate.backends.redis import RedisBackend
    from taskgate.policy import Policies

__all__ = [
    "COMMANDS",
    "Command",
    "decision_fields",
    "direct_door",
    "fail",
    "load_config",
    "print_fields",
    "register",
    "store_args",
    "with_door",
]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register(cmd: Command) -> Command:
    COMMANDS[cmd.name] = cmd
    return cmd


def store_args(p: argparse.ArgumentParser, *, redis_help: str = "the store (default: $TASKGATE_URL)") -> None:
    p.add_argument("--redis", metavar="URL", default=os.environ.get("TASKGATE_URL"), help=redis_help)
    p.add_argument(
        "--config",
        metavar="POLICIES",
        default=os.environ.get("TASKGATE_POLICIES"),
        help="the policy file (default: $TASKGATE_POLICIES)",
    )
    p.add_argument("--prefix", default="taskgate", help="key prefix in the store (default: %(default)s)")


def fail(cmd: str, message: object, status: int = 2) -> int:
    print(f"taskgate {cmd}: error: {message}", file=sys.stderr)
    return status


def load_config(cmd: str, args: argparse.Namespace) -> Policies | int:
    """The policies of ``--config`` (an exit status when none are given or the file is bad)."""
    from taskgate.errors import InvalidPolicyError
    from taskgate.policy import load_policies

    if not args.config:
        return fail(cmd, "no policies: give --config FILE (or set $TASKGATE_POLICIES)")
    try:
        return load_policies(args.config)
    except InvalidPolicyError as e:
        return fail(cmd, e)


def direct_door(cmd: str, args: argparse.Namespace) -> RedisBackend | int:
    """The direct door to the store of ``--redis`` (an exit status on a bad configuration)."""
    from taskgate.backends import connect
    from taskgate.backends.redis import RedisBackend

    if not args.redis:
        return fail(cmd, "no store: give --redis URL (or set $TASKGATE_URL)")
    pols = load_config(cmd, args)
    if isinstance(pols, int):
        return pols
    try:
        b = connect(args.redis, pols, prefix=args.prefix)
    except ValueError as e:
        return fail(cmd, e)
    if not isinstance(b, RedisBackend):
        b.close()
        return fail(cmd, f"--redis {args.redis!r}: expected redis://, rediss://, unix://, redis+cluster://")
    return b


def decision_fields(d: Any) -> dict[str, Any]:
    return {
        "allowed": d.allowed,
        "limit": d.limit,
        "remaining": d.remaining,
        "reset_at": d.reset_at,
        "retry_after_ms": d.retry_after_ms,
    }


def print_fields(title: str, fields: dict[str, Any], as_json: bool) -> None:
    if as_json:
        import json

        print(json.dumps(fields))
        return
    print(title)
    for k, v in fields.items():
        print(f"  {k:<16} {v}")


def with_door(cmd: str, args: argparse.Namespace, fn: Callable[[RedisBackend], int]) -> int:
    """``fn`` over the direct door of ``args`` (checked to know ``args.policy``), closed after; errors become
    one line and exit status 2."""
    from taskgate.errors import TaskgateError

    b = direct_door(cmd, args)
    if isinstance(b, int):
        return b
    try:
        b.policy(args.policy)
        return fn(b)
    except (TaskgateError, ValueError) as e:
        return fail(cmd, e)
    finally:
        b.close()
