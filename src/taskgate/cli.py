"""The ``taskgate`` command: the parser built from the subcommands registered in :data:`COMMANDS`.

The subcommands live in ``cli_*`` modules (:mod:`taskgate.cli_base` says how to add one), imported here so
that they register: serve and demo (:mod:`taskgate.cli_serve`), top and exporter (:mod:`taskgate.cli_watch`),
policies, peek, reset and check (:mod:`taskgate.cli_keys`), fairness and rooms.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from taskgate._version import __version__
from taskgate.cli_base import COMMANDS, Command, register

# each registers its commands; `taskgate --help` lists them in this order
# isort: off
import taskgate.cli_serve
import taskgate.cli_watch
import taskgate.cli_keys
import taskgate.cli_fairness
import taskgate.cli_rooms  # noqa: F401 (imported to register)

# isort: on

__all__ = ["COMMANDS", "Command", "build_parser", "main", "register"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskgate", description="Distributed throttling for task queues.")
    parser.add_argument("--version", action="version", version=f"taskgate {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="default: %(default)s",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "_run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
