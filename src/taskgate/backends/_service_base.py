"""What the gRPC doors of both sides share: the import of grpc (with its fork support), configuration, the
ONE mapping of gRPC errors, the fail-mode answer (no I/O). The doors are ``backends/_async/service.py``
(written once) and its generated sync twin; :mod:`taskgate.backends.service` is their public home, and its
docstring says how they work."""

from __future__ import annotations

import os
import sys

if "grpc" not in sys.modules:
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "1")

try:
    import grpc
    import grpc.aio
except ImportError as _e:  # pragma: no cover (depends on the install)
    raise ImportError(
        "the gRPC door (grpc://, grpcs://) needs the grpc extra: install taskgate[grpc]"
    ) from _e
try:
    from taskgate._proto import throttlekit_pb2_grpc as pbg
except ImportError as _e:  # pragma: no cover
    raise ImportError(
        "taskgate's gRPC stubs are missing: install taskgate[grpc] (a source checkout: run "
        "`python scripts/gen_proto.py`)"
    ) from _e

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from tenacity import (
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from taskgate.backends._grpc_wire import Call, check_int
from taskgate.backends.failmode import FailMode, fail_decision
from taskgate.errors import (
    BackendUnavailableError,
    OperationNotSupportedError,
    PolicyNotFoundError,
    TaskgateError,
)
from taskgate.policy import Policies
from taskgate.types import AdmitReply, Decision

__all__ = [  # (and grpc, imported here first: see GRPC_ENABLE_FORK_SUPPORT above)
    "DEFAULT_PORT",
    "INHERITED",
    "Conn",
    "FailMode",
    "Pem",
    "ServiceBase",
    "map_rpc_error",
    "no_report",
    "parse_target",
    "grpc",
    "read_pem",
    "warn_without_fork_support",
]

T = TypeVar("T")
_B = TypeVar("_B", bound="ServiceBase")
log = logging.getLogger("taskgate")
DEFAULT_PORT = 50051
Pem = bytes | str | os.PathLike[str]
INHERITED: list[object] = []  # a parent's channels, found in a forked child: kept, never used or closed
# Reconnect quickly after an outage (gRPC's default backoff grows to 120 s).
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5000),
    ("grpc.keepalive_time_ms", 30_000),
)


# --- errors: the ONE mapping -------------------------------------------------------------------------------


def map_rpc_error(e: grpc.RpcError, where: str, method: str = "", policy: str = "") -> Exception:
    """The taskgate error for a failed call (raise it ``from e``)."""
    code = e.code()
    details = e.details() or ""
    if code == grpc.StatusCode.NOT_FOUND:
        err = PolicyNotFoundError(policy)
        err.args = (details or f"unknown policy {policy!r} at {where}",)
        return err
    if code == grpc.StatusCode.UNIMPLEMENTED:
        if not details or details == "Method not found!":
            details = f"{method} is not implemented by the service at {where}"
        return OperationNotSupportedError(details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ValueError(details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return BackendUnavailableError(
            f"the taskgate service at {where} is unavailable ({code.name}: {details})"
        )
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return TaskgateError(
            f"the taskgate service at {where} refused the call ({code.name}: {details}); pass the server's "
            "shared secret as secret= (or $TASKGATE_SECRET) and check the TLS client certificate"
        )
    return TaskgateError(f"{method or 'call'} failed at {where}: {code.name}: {details}")


def _transient(e: BaseException) -> bool:
    return isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.UNAVAILABLE


# --- configuration shared by the twins ---------------------------------------------------------------------


def read_pem(value: Pem | None, name: str) -> bytes | None:
    """PEM bytes from bytes, PEM text or a file path."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    path = Path(value)
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"{name}: cannot read {os.fspath(path)!r}: {e.strerror or e}") from e


def parse_target(url: str) -> tuple[str, bool]:
    """``grpc://host[:port]`` / ``grpcs://host[:port]`` -> (``host:port``, secure)."""
    parts = urlsplit(url)
    if parts.scheme not in ("grpc", "grpcs") or not parts.hostname:
        raise ValueError(f"not a gRPC URL: {url!r} (expected grpc://host:port or grpcs://host:port)")
    if parts.path not in ("", "/") or parts.query or parts.username or parts.password:
        raise ValueError(f"{url!r}: a gRPC URL is scheme://host:port only (pass options as keywords)")
    host = parts.hostname
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{parts.port or DEFAULT_PORT}", parts.scheme == "grpcs"


def no_report() -> OperationNotSupportedError:
    return OperationNotSupportedError(
        "report() (what a provider said: 429s, rate-limit headers) needs the direct door: "
        "connect to redis:// (or memory://); the gRPC service has no Report RPC yet"
    )


class ServiceBase:
    """Configuration and rules shared by the twins (see the module docstring for every option)."""

    def __init__(
        self,
        target: str = f"127.0.0.1:{DEFAULT_PORT}",
        *,
        secure: bool = False,
        secret: str | None = None,
        root_certificates: Pem | None = None,
        certificate_chain: Pem | None = None,
        private_key: Pem | None = None,
        timeout: float = 2.0,
        retries: int = 3,
        fail: FailMode | None = None,
        fail_retry_ms: int = 1000,
        policies: Policies | None = None,
        heartbeat_interval: float | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if fail not in (None, "open", "closed"):
            raise ValueError(f"fail must be 'open', 'closed' or None, got {fail!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if check_int(retries, "retries") < 1:
            raise ValueError(f"retries must be >= 1 (1 = no retry), got {retries}")
        self.target = target
        self.secure = secure or any(
            x is not None for x in (root_certificates, certificate_chain, private_key)
        )
        self.url = f"{'grpcs' if self.secure else 'grpc'}://{target}"
        self.timeout = float(timeout)
        self.retries = retries
        self.fail: FailMode | None = fail
        self.fail_retry_ms = check_int(fail_retry_ms, "fail_retry_ms", 1)
        self._root = read_pem(root_certificates, "root_certificates")
        self._chain = read_pem(certificate_chain, "certificate_chain")
        self._key = read_pem(private_key, "private_key")
        if (self._chain is None) != (self._key is None):
            raise ValueError(
                "certificate_chain and private_key go together (mutual TLS): give both or neither"
            )
        secret = secret if secret is not None else os.environ.get("TASKGATE_SECRET") or None
        self._metadata = (("authorization", f"Bearer {secret}"),) if secret else None
        self._options = [*_CHANNEL_OPTIONS, *channel_options]
        self._local = policies if policies is not None else Policies()
        self._policies: Policies | None = None
        self._heartbeat_interval = heartbeat_interval
        self._last_outage_log = 0.0

    @classmethod
    def from_url(cls: type[_B], url: str, **options: Any) -> _B:
        target, secure = parse_target(url)
        return cls(target, secure=secure or bool(options.pop("secure", False)), **options)

    def _credentials(self) -> Any:
        """The channel credentials: TLS for a secure door, None for a plain one."""
        if not self.secure:
            return None
        return grpc.ssl_channel_credentials(self._root, self._key, self._chain)

    def _connect(self, channel: Any, loop: object) -> Conn:
        return Conn(os.getpid(), channel, pbg.RateLimiterStub(channel), loop)

    @property
    def policies(self) -> Policies:
        """The server's policies once fetched (``refresh_policies()``; the sync twin fetches on first use),
        else the ones given to the constructor."""
        return self._policies if self._policies is not None else self._local

    @property
    def _known(self) -> Policies:
        """The policies known without a call: the server's if fetched, else the constructor's."""
        return self._policies if self._policies is not None else self._local

    def _accounting(self, name: str) -> str:
        p = self._known.get(name)
        return p.accounting if p is not None else "escrow"

    def _wants_policies(self, reply: AdmitReply, tokens: int, heartbeat: bool) -> bool:
        """Fetch the server's policies after this admit? Only when an admission needs them: its tokens'
        accounting mode, or the lease TTL for the heartbeat cadence."""
        return self._policies is None and reply.decision.allowed and (tokens > 0 or heartbeat)

    @property
    def heartbeat_interval(self) -> float:
        if self._heartbeat_interval is not None:
            return self._heartbeat_interval
        ttls = [p.concurrency.lease_ttl_ms for p in self._known.values() if p.concurrency is not None]
        return (min(ttls) / 3000.0) if ttls else 10.0

    def _fail_decision(self, call: Call[Any], e: Exception) -> Decision:
        now = time.monotonic()
        if now - self._last_outage_log >= 10.0:
            self._last_outage_log = now
            log.warning("taskgate: %s; fail=%s: answering %s without the service", e, self.fail, call.method)
        p = self._known.get(call.policy)  # the limit the server would report, where the policy is known
        return fail_decision(p, int(time.time() * 1000), self.fail_retry_ms, self.fail)

    def _failed(self, call: Call[T], e: grpc.RpcError) -> T:
        err = map_rpc_error(e, self.url, call.method, call.policy)
        if isinstance(err, BackendUnavailableError) and self.fail is not None and call.fallback is not None:
            return call.fallback(self._fail_decision(call, err))
        raise err from e

    def _retry_kwargs(self) -> dict[str, Any]:
        return {
            "stop": stop_after_attempt(self.retries) | stop_after_delay(self.timeout),
            "wait": wait_random_exponential(multiplier=0.05, max=0.5),
            "retry": retry_if_exception(_transient),
            "reraise": True,
        }

    def _unknown(self, name: str) -> PolicyNotFoundError:
        return PolicyNotFoundError(name, list(self._known))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def warn_without_fork_support() -> None:
    if os.environ.get("GRPC_ENABLE_FORK_SUPPORT", "").lower() not in ("1", "true", "yes"):
        log.warning(
            "taskgate: this process was forked after its parent used gRPC, and gRPC's fork support is off: "
            "calls may fail. Set GRPC_ENABLE_FORK_SUPPORT=1 before grpc is first imported (importing "
            "taskgate.backends.service first does it)"
        )


@dataclass
class Conn:
    """A channel and its stub, with the process (and, on the asyncio side, the event loop) it belongs to."""

    pid: int
    channel: Any
    stub: Any
    loop: object = None
