"""The service door: :class:`ServiceBackend` and :class:`AsyncServiceBackend`, gRPC clients of
``taskgate serve`` (or of a ThrottleKit server) with the surface and the types of the Redis door.

``taskgate.connect("grpc://host:port")`` / ``"grpcs://host:port"`` build one. What differs from the Redis
door, and why:

- ``now=`` cannot travel (ThrottleKit's wire has no such field, and a shared service must not let callers
  move its clock): every method accepts it for surface parity and raises ``ValueError`` if it is given. The
  service decides with the store's clock.
- Every call has a deadline (``timeout``, default 2 s). Idempotent calls (Peek, Forecast, Release, Heartbeat,
  ListPolicies) are retried on ``UNAVAILABLE`` (tenacity, at most ``retries`` attempts within ``timeout``);
  consuming calls are never retried, so a unit is never spent twice.
- gRPC errors become taskgate's in ONE place, :func:`map_rpc_error` (``raise ... from``).
- ``fail="open"|"closed"`` answers decision calls (check, check_many, peek, debit, admit) while the service
  is unreachable: open allows (nothing held), closed denies with ``retry_after_ms=fail_retry_ms``. ``None``
  (the default) raises :class:`~taskgate.BackendUnavailableError`; Celery/RQ integrations then apply each
  policy's own ``fail`` mode.
- The policies (for the accounting mode of an admission, the heartbeat cadence, ``policy(name)``) come from
  the server's ListPolicies, fetched once and cached; the ``policies`` given to the constructor are only a
  fallback for a server without ListPolicies (ThrottleKit) or while it is unreachable.
- Fork-safe: the channel is created lazily, per process (a client made before ``fork()`` opens its own
  channel in the child and never touches the parent's). Importing this module sets
  ``GRPC_ENABLE_FORK_SUPPORT=1`` unless it is already set or grpc is already imported, so a parent that
  used the channel before forking (Celery prefork, RQ) leaves gRPC usable in the child.
- Security: ``grpcs://`` is TLS (``root_certificates`` to trust a private CA; ``certificate_chain`` and
  ``private_key`` for mutual TLS); ``secret`` (default ``$TASKGATE_SECRET``) is sent as
  ``authorization: Bearer <secret>``.
"""

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

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar
from urllib.parse import urlsplit

from tenacity import (
    AsyncRetrying,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from taskgate.admission import (
    Admission,
    AsyncAdmission,
    AsyncHeartbeatPump,
    AsyncReservation,
    HeartbeatPump,
    Reservation,
)
from taskgate.backends._grpc_wire import Call, Calls, check_int, merge_heartbeats
from taskgate.errors import (
    BackendUnavailableError,
    OperationNotSupportedError,
    PolicyNotFoundError,
    TaskgateError,
)
from taskgate.policy import Policies, Policy
from taskgate.types import AdmitReply, Decision, Forecast, HeartbeatReply, Settlement

__all__ = ["AsyncServiceBackend", "ServiceBackend", "map_rpc_error"]

T = TypeVar("T")
_B = TypeVar("_B", bound="_Base")
log = logging.getLogger("taskgate")
DEFAULT_PORT = 50051
FailMode = Literal["open", "closed"]
Pem = bytes | str | os.PathLike[str]
_INHERITED: list[object] = []  # a parent's channels, found in a forked child: kept, never used or closed
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


def _pem(value: Pem | None, name: str) -> bytes | None:
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


def _no_report() -> OperationNotSupportedError:
    return OperationNotSupportedError(
        "report() (what a provider said: 429s, rate-limit headers) needs the direct door: "
        "connect to redis:// (or memory://); the gRPC service has no Report RPC yet"
    )


class _Base:
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
        self._root = _pem(root_certificates, "root_certificates")
        self._chain = _pem(certificate_chain, "certificate_chain")
        self._key = _pem(private_key, "private_key")
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
        return grpc.ssl_channel_credentials(self._root, self._key, self._chain)

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
        ms = int(time.time() * 1000)
        if self.fail == "open":
            return Decision(True, 0, 0, ms, 0)
        return Decision(False, 0, 0, ms + self.fail_retry_ms, self.fail_retry_ms)

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


def _warn_without_fork_support() -> None:
    if os.environ.get("GRPC_ENABLE_FORK_SUPPORT", "").lower() not in ("1", "true", "yes"):
        log.warning(
            "taskgate: this process was forked after its parent used gRPC, and gRPC's fork support is off: "
            "calls may fail. Set GRPC_ENABLE_FORK_SUPPORT=1 before grpc is first imported (importing "
            "taskgate.backends.service first does it)"
        )


@dataclass
class _Conn:
    pid: int
    channel: Any
    stub: Any
    loop: asyncio.AbstractEventLoop | None = None


# --- the sync twin -----------------------------------------------------------------------------------------


class ServiceBackend(_Base):
    """The gRPC door (sync). Thread-safe; fork-safe (one channel per process, opened on first use)."""

    _conn: _Conn | None = None
    _pump: HeartbeatPump | None = None

    def _channel(self) -> _Conn:
        c = self._conn
        if c is not None and c.pid == os.getpid():
            return c
        if c is not None:  # forked: the parent's channel is not ours
            _INHERITED.append(c)
            self._pump = None
            _warn_without_fork_support()
        if self.secure:
            ch = grpc.secure_channel(self.target, self._credentials(), options=self._options)
        else:
            ch = grpc.insecure_channel(self.target, options=self._options)
        c = self._conn = _Conn(os.getpid(), ch, pbg.RateLimiterStub(ch))
        return c

    def _run(self, call: Call[T]) -> T:
        fn = getattr(self._channel().stub, call.method)
        try:
            if call.idempotent and self.retries > 1:
                resp = Retrying(**self._retry_kwargs())(
                    fn, call.request, timeout=self.timeout, metadata=self._metadata
                )
            else:
                resp = fn(call.request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            return self._failed(call, e)
        return call.decode(resp)

    def refresh_policies(self) -> Policies:
        """Fetch the server's policies (ListPolicies) and cache them."""
        self._policies = self._run(Calls.list_policies())
        return self._policies

    def _ensure_policies(self) -> None:
        if self._policies is None:
            try:
                self.refresh_policies()
            except (OperationNotSupportedError, BackendUnavailableError):
                if not self._local:
                    raise

    @property
    def policies(self) -> Policies:
        """The server's policies (ListPolicies, fetched on first use and cached; ``refresh_policies()``
        refetches). A server without ListPolicies, or an unreachable one, gives the constructor's."""
        if self._policies is None:
            try:
                self.refresh_policies()
            except (OperationNotSupportedError, BackendUnavailableError) as e:
                log.debug("taskgate: using the local policies: %s", e)
        return super().policies

    def policy(self, name: str) -> Policy:
        """The server's policy ``name`` (fetched and cached; refetched once if the name is new)."""
        self._ensure_policies()
        if name not in self._known and self._policies is not None:
            self.refresh_policies()
        if name not in self._known:
            raise self._unknown(name)
        return self._known[name]

    def check(
        self,
        policy: str,
        key: str,
        cost: int = 1,
        *,
        now: int | None = None,
        book: bool = False,
        token: str = "",
    ) -> Decision:
        """Consume ``cost`` units for ``key`` if the policy allows it now (``book``: see the Redis door)."""
        return self._run(Calls.check(policy, key, cost, now, book, token))

    def check_many(
        self, policy: str, keys: Sequence[str], cost: int = 1, *, now: int | None = None
    ) -> list[Decision]:
        """One decision per key, in input order, at one instant, in one round trip."""
        return self._run(Calls.check_many(policy, keys, cost, now))

    def peek(self, policy: str, key: str, *, now: int | None = None) -> Decision:
        """The state of ``key`` without consuming anything."""
        return self._run(Calls.peek(policy, key, now))

    def forecast(self, policy: str, key: str, cost: int = 1, *, now: int | None = None) -> Forecast:
        return self._run(Calls.forecast(policy, key, cost, now))

    def admit(
        self,
        policy: str,
        key: str,
        cost: int = 1,
        tokens: int = 0,
        *,
        now: int | None = None,
        holder: str | None = None,
        book: bool = False,
        booking_token: str = "",
        heartbeat: bool = False,
    ) -> Admission:
        """Rate x concurrency x cost in one atomic call; ``heartbeat=True`` renews the lease from a thread."""
        reply = self._run(Calls.admit(policy, key, cost, tokens, now, holder, book, booking_token))
        if self._wants_policies(reply, tokens, heartbeat):
            try:
                self.refresh_policies()
            except TaskgateError as e:  # the admission stands; known policies (or escrow) are used
                log.warning("taskgate: cannot fetch the service's policies (%s)", e)
        adm = Admission(self, policy, key, reply, tokens, self._accounting(policy))
        if heartbeat:
            if self._pump is None:
                self._pump = HeartbeatPump(self, self.heartbeat_interval)
            adm.start_heartbeat(self._pump)
        return adm

    def release(self, lease_id: str, *, dropped: bool = False, now: int | None = None) -> bool:
        """Release a lease by id (idempotent). False if it was not held (already released or reclaimed)."""
        return self._run(Calls.release(lease_id, dropped, now))

    def heartbeat(self, lease_ids: list[str], *, now: int | None = None) -> HeartbeatReply:
        """Renew leases; reports which are live and which were reclaimed."""
        return merge_heartbeats([self._run(c) for c in Calls.heartbeat(lease_ids, now)])

    def debit(self, policy: str, key: str, tokens: int = 1, *, now: int | None = None) -> Decision:
        """Post-hoc cost against the policy's token budgets (admitted iff budget remains before it)."""
        return self._run(Calls.debit(policy, key, tokens, now))

    def reserve(self, policy: str, key: str, tokens: int, *, now: int | None = None) -> Reservation:
        """Escrow an estimate now; settle the actual later."""
        r = self._run(Calls.reserve(policy, key, tokens, now))
        return Reservation(self, policy, key, r.decision, r.reservation_id, r.expires_at)

    def settle(
        self, policy: str, key: str, reservation_id: str, actual: int, *, now: int | None = None
    ) -> Settlement:
        return self._run(Calls.settle(policy, key, reservation_id, actual, now))

    def reset(self, policy: str, key: str) -> None:
        """Forget all state of ``key`` under ``policy``."""
        self._run(Calls.reset(policy, key))

    def report(self, policy: str, key: str, response: object = None, **kw: object) -> NoReturn:
        """Not on the service door (the wire has no such RPC yet): raises OperationNotSupportedError."""
        raise _no_report()

    def ping(self) -> None:
        """Raise BackendUnavailableError unless the service accepts a connection within ``timeout``."""
        try:
            grpc.channel_ready_future(self._channel().channel).result(timeout=self.timeout)
        except grpc.FutureTimeoutError as e:
            raise BackendUnavailableError(f"the taskgate service at {self.url} is unreachable") from e

    def close(self) -> None:
        if self._pump is not None:
            self._pump.stop()
            self._pump = None
        c, self._conn = self._conn, None
        if c is not None and c.pid == os.getpid():
            c.channel.close()

    def __enter__(self) -> ServiceBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the asyncio twin --------------------------------------------------------------------------------------


class AsyncServiceBackend(_Base):
    """The asyncio twin of :class:`ServiceBackend` (grpc.aio). One channel per process and event loop."""

    _conn: _Conn | None = None
    _pump: AsyncHeartbeatPump | None = None

    def _channel(self) -> _Conn:
        loop = asyncio.get_running_loop()
        c = self._conn
        if c is not None and c.pid == os.getpid() and c.loop is loop:
            return c
        if c is not None:  # forked, or another event loop: that channel cannot serve us
            _INHERITED.append(c)
            self._pump = None
            if c.pid != os.getpid():
                _warn_without_fork_support()
        if self.secure:
            ch = grpc.aio.secure_channel(self.target, self._credentials(), options=self._options)
        else:
            ch = grpc.aio.insecure_channel(self.target, options=self._options)
        c = self._conn = _Conn(os.getpid(), ch, pbg.RateLimiterStub(ch), loop)
        return c

    async def _run(self, call: Call[T]) -> T:
        fn = getattr(self._channel().stub, call.method)
        resp: Any
        try:
            if call.idempotent and self.retries > 1:

                async def attempt() -> Any:  # a coroutine: tenacity would not await a grpc.aio call object
                    return await fn(call.request, timeout=self.timeout, metadata=self._metadata)

                resp = await AsyncRetrying(**self._retry_kwargs())(attempt)
            else:
                resp = await fn(call.request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            return self._failed(call, e)
        return call.decode(resp)

    async def refresh_policies(self) -> Policies:
        self._policies = await self._run(Calls.list_policies())
        return self._policies

    def policy(self, name: str) -> Policy:
        """The policy ``name`` as last fetched from the server (``await refresh_policies()``; an admit with
        tokens or a heartbeat fetches them once), else from the policies given to the constructor."""
        if name not in self._known:
            if self._policies is None:
                err = self._unknown(name)
                err.args = (
                    f"{err.args[0]}; the service's policies are not fetched yet: await refresh_policies()",
                )
                raise err
            raise self._unknown(name)
        return self._known[name]

    async def check(
        self,
        policy: str,
        key: str,
        cost: int = 1,
        *,
        now: int | None = None,
        book: bool = False,
        token: str = "",
    ) -> Decision:
        return await self._run(Calls.check(policy, key, cost, now, book, token))

    async def check_many(
        self, policy: str, keys: Sequence[str], cost: int = 1, *, now: int | None = None
    ) -> list[Decision]:
        return await self._run(Calls.check_many(policy, keys, cost, now))

    async def peek(self, policy: str, key: str, *, now: int | None = None) -> Decision:
        return await self._run(Calls.peek(policy, key, now))

    async def forecast(self, policy: str, key: str, cost: int = 1, *, now: int | None = None) -> Forecast:
        return await self._run(Calls.forecast(policy, key, cost, now))

    async def admit(
        self,
        policy: str,
        key: str,
        cost: int = 1,
        tokens: int = 0,
        *,
        now: int | None = None,
        holder: str | None = None,
        book: bool = False,
        booking_token: str = "",
        heartbeat: bool = False,
    ) -> AsyncAdmission:
        reply = await self._run(Calls.admit(policy, key, cost, tokens, now, holder, book, booking_token))
        if self._wants_policies(reply, tokens, heartbeat):
            try:
                await self.refresh_policies()
            except TaskgateError as e:
                log.warning("taskgate: cannot fetch the service's policies (%s)", e)
        adm = AsyncAdmission(self, policy, key, reply, tokens, self._accounting(policy))
        if heartbeat:
            if self._pump is None:
                self._pump = AsyncHeartbeatPump(self, self.heartbeat_interval)
            adm.start_heartbeat(self._pump)
        return adm

    async def release(self, lease_id: str, *, dropped: bool = False, now: int | None = None) -> bool:
        return await self._run(Calls.release(lease_id, dropped, now))

    async def heartbeat(self, lease_ids: list[str], *, now: int | None = None) -> HeartbeatReply:
        return merge_heartbeats([await self._run(c) for c in Calls.heartbeat(lease_ids, now)])

    async def debit(self, policy: str, key: str, tokens: int = 1, *, now: int | None = None) -> Decision:
        return await self._run(Calls.debit(policy, key, tokens, now))

    async def reserve(
        self, policy: str, key: str, tokens: int, *, now: int | None = None
    ) -> AsyncReservation:
        r = await self._run(Calls.reserve(policy, key, tokens, now))
        return AsyncReservation(self, policy, key, r.decision, r.reservation_id, r.expires_at)

    async def settle(
        self, policy: str, key: str, reservation_id: str, actual: int, *, now: int | None = None
    ) -> Settlement:
        return await self._run(Calls.settle(policy, key, reservation_id, actual, now))

    async def reset(self, policy: str, key: str) -> None:
        await self._run(Calls.reset(policy, key))

    async def report(self, policy: str, key: str, response: object = None, **kw: object) -> NoReturn:
        raise _no_report()

    async def ping(self) -> None:
        try:
            await asyncio.wait_for(self._channel().channel.channel_ready(), self.timeout)
        except asyncio.TimeoutError as e:
            raise BackendUnavailableError(f"the taskgate service at {self.url} is unreachable") from e

    async def aclose(self) -> None:
        if self._pump is not None:
            await self._pump.stop()
            self._pump = None
        c, self._conn = self._conn, None
        if c is not None and c.pid == os.getpid() and c.loop is asyncio.get_running_loop():
            await c.channel.close()

    async def __aenter__(self) -> AsyncServiceBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
