"""Shared-secret authentication: every call must carry the metadata ``authorization: Bearer <secret>``; a
Monitor call (``throttlekit.v1.Monitor``) may carry ``x-monitor-secret: <secret>`` instead, and a Fleet call
(``throttlekit.v1.Fleet``) ``x-fleet-secret: <secret>``, as ThrottleKit's clients send them.

The comparison is constant-time (:func:`hmac.compare_digest`). Health checks are exempt, so load balancers
and ``grpc_health_probe`` work without the secret (they learn nothing but "serving"). TLS and mutual TLS are
configured on the port itself (:mod:`taskgate.server.app`), not here.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

__all__ = ["FLEET_PREFIX", "HEALTH_PREFIX", "MONITOR_PREFIX", "SecretInterceptor"]

HEALTH_PREFIX = "/grpc.health.v1.Health/"
MONITOR_PREFIX = "/throttlekit.v1.Monitor/"
FLEET_PREFIX = "/throttlekit.v1.Fleet/"
_ALT = {MONITOR_PREFIX: "x-monitor-secret", FLEET_PREFIX: "x-fleet-secret"}  # the services' own metadata
_MESSAGE = "missing or wrong secret: send the metadata `authorization: Bearer <secret>`"


async def _deny_unary(request: Any, context: Any) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)


async def _deny_stream(request: Any, context: Any) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)
    yield None  # pragma: no cover (abort raises)


def _presented(metadata: Sequence[tuple[str, str | bytes]] | None, alt: str = "") -> bytes:
    """The secret a call presents: its bearer token, or its ``alt`` metadata (a Monitor call's
    ``x-monitor-secret``, a Fleet call's ``x-fleet-secret``)."""
    for k, v in metadata or ():
        raw = v if isinstance(v, bytes) else v.encode("utf-8", "replace")
        if k == "authorization":
            scheme, _, token = raw.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        elif alt and k == alt and raw.strip():
            return raw.strip()
    return b""


class SecretInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Rejects calls without the right bearer secret with ``UNAUTHENTICATED`` (health checks exempt)."""

    def __init__(self, secret: bytes, exempt: Sequence[str] = (HEALTH_PREFIX,)) -> None:
        if not secret:
            raise ValueError("the shared secret is empty")
        self._secret = secret
        self._exempt = tuple(exempt)
        self._denials: dict[str, Any] = {}  # one deny handler per method (stable objects)

    def _deny(self, method: str, real: Any) -> Any:
        h = self._denials.get(method)
        if h is None:
            if real is not None and real.response_streaming and not real.request_streaming:
                h = grpc.unary_stream_rpc_method_handler(_deny_stream)
            else:
                h = grpc.unary_unary_rpc_method_handler(_deny_unary)
            self._denials[method] = h
        return h

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        method: str = details.method
        if method.startswith(self._exempt) or hmac.compare_digest(
            _presented(details.invocation_metadata, _ALT.get(method[: method.find("/", 1) + 1], "")),
            self._secret,
        ):
            return await continuation(details)
        return self._deny(method, await continuation(details))
