"""The ``taskgate`` command.

Each subcommand is one :class:`Command` in :data:`COMMANDS`: a ``configure`` function that adds its
arguments to its own parser and a ``run`` function that gets the parsed arguments and returns the exit
status. Heavy imports (grpc, redis) happen inside ``run``. To add a subcommand, write the two functions and
:func:`register` them (in this module or in the module that implements the command)::

    def _configure_peek(p: argparse.ArgumentParser) -> None: ...
    def _run_peek(args: argparse.Namespace) -> int: ...
    register(Command("peek", "show a key's state without consuming", _configure_peek, _run_peek))

A command with sub-commands of its own (``taskgate policies check``) adds them in ``configure`` with
``p.add_subparsers()``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from taskgate._version import __version__

if TYPE_CHECKING:
    from taskgate.backends.redis import RedisBackend
    from taskgate.policy import Policies
    from taskgate.server import ServeConfig

__all__ = ["COMMANDS", "Command", "build_parser", "main", "register"]


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


# --- serve -------------------------------------------------------------------------------------------------


def _configure_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--listen",
        default="127.0.0.1:50051",
        metavar="HOST:PORT",
        help="address to serve on (default: %(default)s; [::1]:PORT for IPv6; port 0 picks one)",
    )
    p.add_argument(
        "--redis",
        metavar="URL",
        help="the shared store (redis://, rediss://, unix://); default: the embedded memory:// store",
    )
    p.add_argument(
        "--config",
        metavar="POLICIES",
        default=os.environ.get("TASKGATE_POLICIES"),
        help="the policy file (default: $TASKGATE_POLICIES)",
    )
    p.add_argument("--prefix", default="taskgate", help="key prefix in the store (default: %(default)s)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="N server processes on one port (SO_REUSEPORT); needs --redis (default: 1)",
    )
    p.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca", metavar="PEM", help="mutual TLS: require client certificates signed by this CA"
    )
    p.add_argument(
        "--secret-file",
        metavar="FILE",
        help="require the metadata `authorization: Bearer <secret>` (the file holds the secret)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --listen without TLS or a secret (trusted networks only)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, time given to in-flight calls (default: %(default)s)",
    )
    p.add_argument(
        "--store-timeout",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="timeout of one store round trip; keep it below the clients' deadline (default: %(default)s)",
    )
    p.add_argument(
        "--fail-retry-ms",
        type=int,
        default=1000,
        metavar="MS",
        help="retry_after_ms of a fail-closed decision while the store is down",
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="also serve Prometheus metrics (the fleet-wide counters in the store) on http://HOST:PORT/metrics",
    )


def _run_serve(args: argparse.Namespace) -> int:
    try:
        import grpc  # noqa: F401
        import grpc_health.v1  # noqa: F401
        import grpc_reflection.v1alpha  # noqa: F401
    except ImportError as e:
        print(f"taskgate serve needs the grpc extra ({e}): pip install 'taskgate[grpc]'", file=sys.stderr)
        return 2
    try:
        import taskgate._proto.throttlekit_pb2  # noqa: F401
    except ImportError:
        print(
            "taskgate serve: the gRPC stubs are missing: run `python scripts/gen_proto.py`", file=sys.stderr
        )
        return 2
    from taskgate.server import ServeConfig, run

    cfg = ServeConfig(
        listen=args.listen,
        redis=args.redis,
        policies=args.config,
        prefix=args.prefix,
        workers=args.workers,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        secret_file=args.secret_file,
        insecure=args.insecure,
        grace=args.grace,
        fail_retry_ms=args.fail_retry_ms,
        store_timeout=args.store_timeout,
    )
    if args.metrics:
        status = _serve_metrics(cfg, args.metrics)
        if status:
            return status
    return run(cfg)


def _serve_metrics(cfg: ServeConfig, listen: str) -> int:
    """Start the exporter beside the server (in this process: with --workers N, once for all of them)."""
    from taskgate.errors import InvalidPolicyError
    from taskgate.policy import load_policies
    from taskgate.server import ConfigError

    try:
        cfg.validate()
        policies = load_policies(cfg.policies)
    except (ConfigError, InvalidPolicyError):
        return 0  # run() reports it, as without --metrics
    try:
        from taskgate.metrics import start_exporter

        _, port = start_exporter(cfg.store_url, policies, cfg.prefix, listen)
    except ImportError as e:
        print(f"taskgate serve --metrics needs prometheus-client ({e}): pip install 'taskgate[metrics]'")
        return 2
    except (OSError, ValueError) as e:
        print(f"taskgate serve: error: --metrics {listen}: {e}", file=sys.stderr)
        return 2
    host = listen.rpartition(":")[0]
    print(f"taskgate serve: metrics on http://{host}:{port}/metrics", flush=True)
    return 0


register(
    Command("serve", "run the gRPC service door (throttlekit.v1.RateLimiter)", _configure_serve, _run_serve)
)


# --- demo --------------------------------------------------------------------------------------------------


def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis", metavar="URL", help="run on this Redis instead of the embedded store")
    p.add_argument("--broker", metavar="URL", help="run on this Celery broker instead of memory://")
    p.add_argument("--seed", type=int, default=None, help="random seed (reproducible runs)")


def _run_demo(args: argparse.Namespace) -> int:
    from taskgate.demo import run

    return run(args.redis, args.broker, args.seed)


register(
    Command(
        "demo",
        "the main job on the embedded default: a throttled Celery fleet, live",
        _configure_demo,
        _run_demo,
    )
)


# --- operating: top, exporter, policies check, peek, reset, check -------------------------------------------


def _store_args(
    p: argparse.ArgumentParser, *, redis_help: str = "the store (default: $TASKGATE_URL)"
) -> None:
    p.add_argument("--redis", metavar="URL", default=os.environ.get("TASKGATE_URL"), help=redis_help)
    p.add_argument(
        "--config",
        metavar="POLICIES",
        default=os.environ.get("TASKGATE_POLICIES"),
        help="the policy file (default: $TASKGATE_POLICIES)",
    )
    p.add_argument("--prefix", default="taskgate", help="key prefix in the store (default: %(default)s)")


def _fail(cmd: str, message: object, status: int = 2) -> int:
    print(f"taskgate {cmd}: error: {message}", file=sys.stderr)
    return status


def _load(cmd: str, args: argparse.Namespace) -> Policies | int:
    from taskgate.errors import InvalidPolicyError
    from taskgate.policy import load_policies

    if not args.config:
        return _fail(cmd, "no policies: give --config FILE (or set $TASKGATE_POLICIES)")
    try:
        return load_policies(args.config)
    except InvalidPolicyError as e:
        return _fail(cmd, e)


def _backend(cmd: str, args: argparse.Namespace) -> RedisBackend | int:
    """The direct door to the store of ``--redis`` (an exit status on a bad configuration)."""
    from taskgate.backends import connect
    from taskgate.backends.redis import RedisBackend

    if not args.redis:
        return _fail(cmd, "no store: give --redis URL (or set $TASKGATE_URL)")
    pols = _load(cmd, args)
    if isinstance(pols, int):
        return pols
    try:
        b = connect(args.redis, pols, prefix=args.prefix)
    except ValueError as e:
        return _fail(cmd, e)
    if not isinstance(b, RedisBackend):
        b.close()
        return _fail(cmd, f"--redis {args.redis!r}: expected redis://, rediss://, unix://, redis+cluster://")
    return b


def _configure_top(p: argparse.ArgumentParser) -> None:
    _store_args(p, redis_help="read the counters from this store (default: $TASKGATE_URL)")
    p.add_argument(
        "--grpc",
        metavar="HOST:PORT",
        help="read through a server's Monitor door instead (grpcs://HOST:PORT: over TLS)",
    )
    p.add_argument("--secret-file", metavar="FILE", help="the server's secret (a --grpc server with one)")
    p.add_argument("--tls-ca", metavar="FILE", help="--grpc over TLS, trusting this CA (PEM)")
    p.add_argument("--tls-cert", metavar="FILE", help="--grpc over mutual TLS: this client certificate")
    p.add_argument("--tls-key", metavar="FILE", help="--grpc over mutual TLS: the client certificate's key")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit (for scripts)")
    p.add_argument("--json", action="store_true", help="with --once: the snapshot as JSON")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="refresh (default: 1)")
    p.add_argument("--rate", type=int, default=5, metavar="SECONDS", help="rates over (default: 5)")
    p.add_argument("--top", type=int, default=5, metavar="N", help="top keys per policy (default: 5)")


def _run_top(args: argparse.Namespace) -> int:
    from taskgate import top
    from taskgate.engine.keys import STATS_SLOTS

    if not 1 <= args.rate <= STATS_SLOTS:
        return _fail("top", f"--rate must be 1 to {STATS_SLOTS} seconds, got {args.rate}")
    if args.top < 0 or not args.interval > 0:
        return _fail("top", "--top must be >= 0 and --interval > 0")
    source: top.Source
    if args.grpc:
        try:
            import grpc  # noqa: F401
        except ImportError as e:
            return _fail("top", f"--grpc needs the grpc extra ({e}): pip install 'taskgate[grpc]'")
        secret = None
        if args.secret_file:
            from pathlib import Path

            try:
                secret = Path(args.secret_file).read_text().strip()
            except OSError as e:
                return _fail("top", f"--secret-file {args.secret_file!r}: {e.strerror or e}")
        try:
            source = top.GrpcSource(
                args.grpc,
                secret=secret,
                root_certificates=args.tls_ca,
                certificate_chain=args.tls_cert,
                private_key=args.tls_key,
            )
        except ValueError as e:
            return _fail("top", e)
    elif args.tls_ca or args.tls_cert or args.tls_key:
        return _fail("top", "--tls-ca, --tls-cert and --tls-key go with --grpc (a server's Monitor door)")
    else:
        if not args.redis:
            return _fail("top", "give --redis URL (or $TASKGATE_URL) with --config, or --grpc HOST:PORT")
        pols = _load("top", args)
        if isinstance(pols, int):
            return pols
        try:
            source = top.RedisSource(args.redis, pols, args.prefix, rate_s=args.rate, top=args.top)
        except ValueError as e:
            return _fail("top", e)
    try:
        return top.run(source, once=args.once, as_json=args.json, interval=args.interval)
    except Exception as e:  # unreachable store or server: one line, not a traceback
        from taskgate.errors import TaskgateError

        if callable(getattr(e, "code", None)) and callable(getattr(e, "details", None)):  # a grpc.RpcError
            return _fail("top", f"{args.grpc}: {e.code().name}: {e.details()}", 1)  # type: ignore[attr-defined]
        if isinstance(e, (TaskgateError, OSError)) or type(e).__module__.startswith("redis"):
            return _fail("top", f"{type(e).__name__}: {e}", 1)
        raise


register(
    Command(
        "top", "live view of every policy, fleet-wide (from the store or a server)", _configure_top, _run_top
    )
)


def _configure_exporter(p: argparse.ArgumentParser) -> None:
    _store_args(p)
    p.add_argument(
        "--listen",
        default="127.0.0.1:9464",
        metavar="HOST:PORT",
        help="serve /metrics here (default: %(default)s; port 0 picks one)",
    )


def _run_exporter(args: argparse.Namespace) -> int:
    import signal
    import threading

    try:
        from taskgate.metrics import start_exporter
    except ImportError as e:
        return _fail("exporter", f"needs prometheus-client ({e}): pip install 'taskgate[metrics]'")
    if not args.redis:
        return _fail("exporter", "no store: give --redis URL (or set $TASKGATE_URL)")
    pols = _load("exporter", args)
    if isinstance(pols, int):
        return pols
    try:
        server, port = start_exporter(args.redis, pols, args.prefix, args.listen)
    except (OSError, ValueError) as e:
        return _fail("exporter", e)
    host = args.listen.rpartition(":")[0]
    print(f"taskgate exporter: serving http://{host}:{port}/metrics ({len(pols)} policies)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    return 0


register(
    Command(
        "exporter",
        "serve the fleet-wide counters as Prometheus metrics",
        _configure_exporter,
        _run_exporter,
    )
)


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
        return _fail("policies check", e, 1)
    if not pols:
        return _fail("policies check", f"{args.file}: no policies", 1)
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
    _store_args(p)
    if cost:
        p.add_argument("--cost", type=int, default=1, metavar="N", help="rate units (default: 1)")
        p.add_argument("--tokens", type=int, default=0, metavar="N", help="cost-axis tokens (admit policies)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _decision_fields(d: Any) -> dict[str, Any]:
    return {
        "allowed": d.allowed,
        "limit": d.limit,
        "remaining": d.remaining,
        "reset_at": d.reset_at,
        "retry_after_ms": d.retry_after_ms,
    }


def _print_fields(title: str, fields: dict[str, Any], as_json: bool) -> None:
    if as_json:
        import json

        print(json.dumps(fields))
        return
    print(title)
    for k, v in fields.items():
        print(f"  {k:<16} {v}")


def _with_backend(cmd: str, args: argparse.Namespace, fn: Callable[[RedisBackend], int]) -> int:
    from taskgate.errors import TaskgateError

    b = _backend(cmd, args)
    if isinstance(b, int):
        return b
    try:
        b.policy(args.policy)
        return fn(b)
    except (TaskgateError, ValueError) as e:
        return _fail(cmd, e)
    finally:
        b.close()


def _run_peek(args: argparse.Namespace) -> int:
    from taskgate.stats import read_key

    def go(b: RedisBackend) -> int:
        p = b.policy(args.policy)
        out: dict[str, Any] = {"policy": p.name, "key": args.key}
        if p.rate is not None:
            out |= {f"rate_{k}": v for k, v in _decision_fields(b.peek(p.name, args.key)).items()}
        view = read_key(b.client, p, b.prefix, args.key)
        for i, bv in enumerate(view.budgets):
            out[f"budget{i}"] = f"{bv.used}/{bv.budget} per {bv.window_ms} ms, resets at {bv.resets_at}"
        if p.concurrency is not None:
            if view.inflight is not None:
                out["slots"] = f"{view.inflight}/{view.limit} (this key)"
            else:
                s = next(iter(_snapshot(b, [p]).policies))
                out["slots"] = f"{s.inflight}/{s.concurrency_limit} (policy-wide)"
        _print_fields(f"{p.name} {args.key!r} (nothing consumed)", out, args.json)
        return 0

    return _with_backend("peek", args, go)


def _snapshot(b: RedisBackend, pols: list[Any]) -> Any:
    from taskgate.stats import read_snapshot

    return read_snapshot(b.client, pols, b.prefix, top=0)


def _run_reset(args: argparse.Namespace) -> int:
    def go(b: RedisBackend) -> int:
        b.reset(args.policy, args.key)
        print(f"reset {args.policy} {args.key!r}: its rate, bookings and budgets are forgotten")
        return 0

    return _with_backend("reset", args, go)


def _run_check(args: argparse.Namespace) -> int:
    def go(b: RedisBackend) -> int:
        p = b.policy(args.policy)
        if p.admits:
            adm = b.admit(p.name, args.key, args.cost, args.tokens)
            out = _decision_fields(adm.decision) | {"binding_axis": adm.binding_axis}
            if adm.allowed:
                adm.release()  # a check holds nothing
                if adm.reservation_id:
                    out["reserved_tokens"] = adm.reserved_tokens
        else:
            if args.tokens:
                raise ValueError(f"--tokens given, but policy {p.name!r} has no tokenBudget")
            out = _decision_fields(b.check(p.name, args.key, args.cost))
        verdict = "allowed" if out["allowed"] else "denied"
        _print_fields(f"{p.name} {args.key!r}: {verdict} (consumed)", out, args.json)
        return 0 if out["allowed"] else 1

    return _with_backend("check", args, go)


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


# --- the command itself ------------------------------------------------------------------------------------

import taskgate.cli_fairness  # noqa: E402 - registers `taskgate fairness`
import taskgate.cli_rooms  # noqa: E402, F401 - registers `taskgate rooms`


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
