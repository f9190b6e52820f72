"""What ``taskgate serve`` is asked to do, and the checks that refuse a bad or unsafe configuration before
anything is bound."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from taskgate.errors import TaskgateError

__all__ = ["DEFAULT_LISTEN", "ConfigError", "ServeConfig", "is_loopback", "split_listen"]

DEFAULT_LISTEN = "127.0.0.1:50051"


class ConfigError(TaskgateError, ValueError):
    """``taskgate serve`` cannot start with this configuration; the message says what to change."""


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Options of ``taskgate serve`` (the CLI flags of the same names)."""

    listen: str = DEFAULT_LISTEN
    redis: str | None = None  # None: the embedded memory:// store
    policies: str | None = None  # the policy file
    prefix: str = "taskgate"
    workers: int = 1
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    secret_file: str | None = None
    insecure: bool = False
    grace: float = 10.0  # seconds given to in-flight calls on SIGTERM/SIGINT
    fail_retry_ms: int = 1000  # retry_after_ms of a fail-closed decision when the store is unreachable
    store_timeout: float = 1.0  # seconds per store round trip: below the clients' 2 s deadline, so that a
    # blackholed store still gets a fail-mode answer to them in time
    reuse_port: bool = False  # set by the --workers parent for its children

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def store_url(self) -> str:
        return self.redis or "memory://"

    def validate(self) -> None:
        """Raise :class:`ConfigError` for anything that would fail later or serve unsafely."""
        host, _ = split_listen(self.listen)
        if self.redis is not None and not self.redis.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"--redis: expected a redis://, rediss:// or unix:// URL, got {self.redis.split('://')[0]}://..."
            )
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.workers > 1 and self.redis is None:
            raise ConfigError(
                "--workers > 1 needs a shared store: give --redis URL (the embedded memory:// store "
                "lives inside one process, so N workers would enforce N separate limits)"
            )
        if not self.store_timeout > 0:
            raise ConfigError(f"--store-timeout must be > 0 seconds, got {self.store_timeout}")
        if self.grace < 0:
            raise ConfigError(f"--grace must be >= 0 seconds, got {self.grace}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
        if self.tls_client_ca is not None and not self.tls:
            raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for flag, path in (
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--tls-client-ca", self.tls_client_ca),
            ("--secret-file", self.secret_file),
            ("--config", self.policies),
        ):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{flag} {path!r}: no such file")
        if self.secret_file is not None:
            read_secret(self.secret_file)
        for flag, path, marker in (
            ("--tls-cert", self.tls_cert, b"-----BEGIN CERTIFICATE-----"),
            ("--tls-client-ca", self.tls_client_ca, b"-----BEGIN CERTIFICATE-----"),
            ("--tls-key", self.tls_key, b"PRIVATE KEY-----"),
        ):
            if path is not None and marker not in Path(path).read_bytes():
                raise ConfigError(f"{flag} {path!r}: not a PEM file (no {marker.decode().strip('-')})")
        if not (self.tls or self.secret_file or self.insecure or is_loopback(host)):
            raise ConfigError(
                f"refusing to listen on {self.listen} (not a loopback address) without protection: anyone "
                "who can reach the port could spend every limit. Give --tls-cert/--tls-key (and "
                "--tls-client-ca for mutual TLS) and/or --secret-file, or pass --insecure if the network is "
                "trusted"
            )

    def read_tls(self) -> tuple[bytes, bytes, bytes | None]:
        """(certificate chain, private key, client CA or None) as bytes."""
        if self.tls_cert is None or self.tls_key is None:
            raise ConfigError("TLS is not configured")
        ca = Path(self.tls_client_ca).read_bytes() if self.tls_client_ca else None
        return Path(self.tls_cert).read_bytes(), Path(self.tls_key).read_bytes(), ca


def read_secret(path: str | os.PathLike[str]) -> bytes:
    """The shared secret in ``path`` (surrounding whitespace and the trailing newline removed)."""
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"--secret-file {os.fspath(path)!r}: {e.strerror or e}") from e
    if len(secret) < 16:
        raise ConfigError(
            f"--secret-file {os.fspath(path)!r}: the secret is {len(secret)} bytes; use at least 16 "
            "(e.g. `openssl rand -hex 32 > secret`)"
        )
    if any(c < 0x21 or c > 0x7E for c in secret):
        raise ConfigError(
            f"--secret-file {os.fspath(path)!r}: the secret must be printable ASCII without spaces "
            "(it travels as gRPC metadata `authorization: Bearer <secret>`)"
        )
    return secret


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port). Port 0 picks a free port."""
    host, sep, port_s = listen.rpartition(":")
    if not sep or not host or not port_s.isdigit() or int(port_s) > 65535:
        raise ConfigError(f"--listen {listen!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN} or [::1]:50051")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"--listen {listen!r}: put an IPv6 address in brackets, e.g. [::1]:50051")
    return host, int(port_s)


def is_loopback(host: str) -> bool:
    """True if ``host`` is a loopback address, or a name that resolves only to loopback addresses."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addrs = {str(info[4][0]).split("%", 1)[0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)
