"""Building and running the grpc.aio server: RateLimiter + health + reflection (+ registered services), the
secret interceptor when a secret is configured, TLS/mTLS on the port, graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from taskgate._proto import throttlekit_pb2 as pb
from taskgate._proto import throttlekit_pb2_grpc as pbg
from taskgate.backends import connect_async
from taskgate.backends.redis import AsyncRedisBackend, redact
from taskgate.errors import BackendUnavailableError, InvalidPolicyError
from taskgate.policy import load_policies
from taskgate.server.auth import SecretInterceptor
from taskgate.server.config import ConfigError, ServeConfig, read_secret, split_listen
from taskgate.server.hooks import BUILTIN_SERVICE_MODULES, ServiceContext, registrars
from taskgate.server.service import RateLimiterService
from taskgate.server.workers import supervise

__all__ = ["Built", "build_server", "run", "serve_async"]

log = logging.getLogger("taskgate.server")
RATE_LIMITER = pb.DESCRIPTOR.services_by_name["RateLimiter"].full_name
READY = "taskgate serve: ready on"


@dataclass
class Built:
    """A server that is configured and bound but not started."""

    server: Any  # grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    services: list[str]
    context: ServiceContext


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _load_builtin_services() -> None:
    for name in BUILTIN_SERVICE_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            importlib.import_module(name)


async def build_server(cfg: ServeConfig, backend: AsyncRedisBackend) -> Built:
    """Configure a grpc.aio server for ``cfg`` over ``backend`` and bind its port (raises ConfigError)."""
    # No interceptor unless a secret is configured: each one costs every call (errors are mapped by the
    # servicers' own decorator, taskgate.server.errors.map_errors).
    interceptors = [SecretInterceptor(read_secret(cfg.secret_file))] if cfg.secret_file is not None else None
    options = [("grpc.so_reuseport", 1 if cfg.reuse_port else 0)]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    ctx = ServiceContext(backend, cfg)
    service = RateLimiterService(backend, fail_retry_ms=cfg.fail_retry_ms, listeners=ctx.listeners)
    pbg.add_RateLimiterServicer_to_server(service, server)
    names = [RATE_LIMITER]
    _load_builtin_services()
    for register in registrars():
        name = register(server, ctx)
        if name:
            names.append(name)
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    for name in ("", *names):
        await hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    host, port = split_listen(cfg.listen)
    address = _address(host, port)
    try:
        if cfg.tls:
            cert, key, ca = cfg.read_tls()
            creds = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
            )
            bound = server.add_secure_port(address, creds)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError as e:
        hint = "is the port in use" + (", or do --tls-cert and --tls-key not match?" if cfg.tls else "?")
        raise ConfigError(f"cannot listen on {cfg.listen}: {e} ({hint})") from e
    if not bound:
        raise ConfigError(f"cannot listen on {cfg.listen} (is the port in use?)")
    return Built(server, hs, bound, names, ctx)


def _describe(cfg: ServeConfig, built: Built, n_policies: int) -> str:
    host, _ = split_listen(cfg.listen)
    guard = ("mTLS" if cfg.tls_client_ca else "TLS") if cfg.tls else "plaintext"
    if cfg.secret_file:
        guard += " + secret"
    return (
        f"{READY} {_address(host, built.port)} ({guard}; store {redact(cfg.store_url)}, prefix "
        f"{cfg.prefix!r}, {n_policies} policies; pid {os.getpid()})"
    )


async def serve_async(cfg: ServeConfig, *, ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting, give in-flight calls ``cfg.grace`` seconds, close."""
    cfg.validate()
    policies = load_policies(cfg.policies)
    opts = {"socket_timeout": cfg.store_timeout, "socket_connect_timeout": cfg.store_timeout}
    backend = connect_async(cfg.store_url, policies, prefix=cfg.prefix, **(opts if cfg.redis else {}))
    if not isinstance(backend, AsyncRedisBackend):
        raise ConfigError(
            f"--redis {redact(cfg.store_url)!r}: the store must be redis://, rediss:// or unix://"
        )
    try:
        await backend.ping()
    except BackendUnavailableError as e:
        log.warning("taskgate serve: %s; serving anyway (decisions follow each policy's fail mode)", e)
    built = await build_server(cfg, backend)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await built.server.start()
    line = _describe(cfg, built, len(policies))
    (ready or _print)(line)
    await stop.wait()
    log.info("taskgate serve: shutting down (grace %.1fs)", cfg.grace)
    await built.health.enter_graceful_shutdown()
    await built.server.stop(cfg.grace)
    await backend.aclose()
    log.info("taskgate serve: stopped")


def _print(line: str) -> None:
    print(line, flush=True)


def run(cfg: ServeConfig) -> int:
    """``taskgate serve``: exit status 0 after a clean shutdown, 2 for a configuration error."""
    try:
        cfg.validate()
        load_policies(cfg.policies)  # fail here, once, with the policy's own message
        if cfg.workers > 1:
            return supervise(serve_async, cfg)
        asyncio.run(serve_async(cfg))
    except (ConfigError, InvalidPolicyError) as e:
        print(f"taskgate serve: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0
