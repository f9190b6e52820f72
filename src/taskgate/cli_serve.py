"""``taskgate serve`` (the gRPC service door, optionally with its metrics exporter) and ``taskgate demo``
(registered by :mod:`taskgate.cli`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from taskgate.cli_base import Command, register

if TYPE_CHECKING:
    from taskgate.server import ServeConfig

__all__: list[str] = []


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
