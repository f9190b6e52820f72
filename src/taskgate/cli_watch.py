"""``taskgate top`` (a live view of every policy) and ``taskgate exporter`` (Prometheus metrics): the
fleet-wide counters, read from the store or a server (registered by :mod:`taskgate.cli`)."""

from __future__ import annotations

import argparse

from taskgate.cli_base import Command, fail, load_config, register, store_args

__all__: list[str] = []


def _configure_top(p: argparse.ArgumentParser) -> None:
    store_args(p, redis_help="read the counters from this store (default: $TASKGATE_URL)")
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
        return fail("top", f"--rate must be 1 to {STATS_SLOTS} seconds, got {args.rate}")
    if args.top < 0 or not args.interval > 0:
        return fail("top", "--top must be >= 0 and --interval > 0")
    source: top.Source
    if args.grpc:
        try:
            import grpc  # noqa: F401
        except ImportError as e:
            return fail("top", f"--grpc needs the grpc extra ({e}): pip install 'taskgate[grpc]'")
        secret = None
        if args.secret_file:
            from pathlib import Path

            try:
                secret = Path(args.secret_file).read_text().strip()
            except OSError as e:
                return fail("top", f"--secret-file {args.secret_file!r}: {e.strerror or e}")
        try:
            source = top.GrpcSource(
                args.grpc,
                secret=secret,
                root_certificates=args.tls_ca,
                certificate_chain=args.tls_cert,
                private_key=args.tls_key,
            )
        except ValueError as e:
            return fail("top", e)
    elif args.tls_ca or args.tls_cert or args.tls_key:
        return fail("top", "--tls-ca, --tls-cert and --tls-key go with --grpc (a server's Monitor door)")
    else:
        if not args.redis:
            return fail("top", "give --redis URL (or $TASKGATE_URL) with --config, or --grpc HOST:PORT")
        pols = load_config("top", args)
        if isinstance(pols, int):
            return pols
        try:
            source = top.RedisSource(args.redis, pols, args.prefix, rate_s=args.rate, top=args.top)
        except ValueError as e:
            return fail("top", e)
    try:
        return top.run(source, once=args.once, as_json=args.json, interval=args.interval)
    except Exception as e:  # unreachable store or server: one line, not a traceback
        from taskgate.errors import TaskgateError

        if callable(getattr(e, "code", None)) and callable(getattr(e, "details", None)):  # a grpc.RpcError
            return fail("top", f"{args.grpc}: {e.code().name}: {e.details()}", 1)  # type: ignore[attr-defined]
        if isinstance(e, (TaskgateError, OSError)) or type(e).__module__.startswith("redis"):
            return fail("top", f"{type(e).__name__}: {e}", 1)
        raise


register(
    Command(
        "top", "live view of every policy, fleet-wide (from the store or a server)", _configure_top, _run_top
    )
)


def _configure_exporter(p: argparse.ArgumentParser) -> None:
    store_args(p)
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
        return fail("exporter", f"needs prometheus-client ({e}): pip install 'taskgate[metrics]'")
    if not args.redis:
        return fail("exporter", "no store: give --redis URL (or set $TASKGATE_URL)")
    pols = load_config("exporter", args)
    if isinstance(pols, int):
        return pols
    try:
        server, port = start_exporter(args.redis, pols, args.prefix, args.listen)
    except (OSError, ValueError) as e:
        return fail("exporter", e)
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
