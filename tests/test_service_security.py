"""The service door's protection: TLS, mutual TLS, the shared secret, and the refusal to serve a non-loopback
address unprotected. Certificates are made for the run with the ``openssl`` command."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import taskgate
from taskgate.backends.service import ServiceBackend
from taskgate.server import ConfigError, ServeConfig
from taskgate.server.testing import ServerProcess
from tests.conftest import require

POLICIES = "version: 1\nlimiters:\n  api: {strategy: gcra, limit: 100, period: 1h, burst: 100}\n"
SECRET = "0123456789abcdef0123456789abcdef"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _leaf(d: Path, name: str, ca: str, ext: str) -> None:
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with a server certificate (localhost, 127.0.0.1) and a client certificate; a second, foreign CA
    with its own client certificate."""
    require(shutil.which("openssl") is not None, "the openssl command", "install openssl")
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _leaf(d, "stranger", "other-ca", "extendedKeyUsage=clientAuth\n")
    (d / "policies.yaml").write_text(POLICIES)
    (d / "secret").write_text(SECRET + "\n")
    return d


@pytest.fixture(scope="module")
def tls_server(pki: Path) -> Iterator[ServerProcess]:
    args = ("--config", str(pki / "policies.yaml"), "--tls-cert", str(pki / "server.pem"))
    with ServerProcess(*args, "--tls-key", str(pki / "server.key"), scheme="grpcs") as srv:
        yield srv


@pytest.fixture(scope="module")
def mtls_server(pki: Path) -> Iterator[ServerProcess]:
    args: tuple[str, ...] = ("--config", str(pki / "policies.yaml"), "--tls-cert", str(pki / "server.pem"))
    args += ("--tls-key", str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem"))
    with ServerProcess(*args, scheme="grpcs") as srv:
        yield srv


@pytest.fixture(scope="module")
def secret_server(pki: Path) -> Iterator[ServerProcess]:
    with ServerProcess("--config", str(pki / "policies.yaml"), "--secret-file", str(pki / "secret")) as srv:
        yield srv


# --- TLS ---------------------------------------------------------------------------------------------------


def test_tls(tls_server: ServerProcess, pki: Path) -> None:
    with taskgate.connect(tls_server.url, root_certificates=str(pki / "ca.pem")) as b:
        assert isinstance(b, ServiceBackend)
        assert b.secure
        assert b.check("api", "k").allowed
    pem = (pki / "ca.pem").read_bytes()  # bytes or PEM text work as well as a path
    with ServiceBackend(tls_server.target, root_certificates=pem.decode()) as b:
        assert b.check("api", "k").allowed
    assert "TLS;" in tls_server.log_text()


def test_plaintext_to_a_tls_port_fails(tls_server: ServerProcess) -> None:
    with (
        ServiceBackend(tls_server.target, timeout=1.0) as b,
        pytest.raises(taskgate.BackendUnavailableError),
    ):
        b.check("api", "k")


def test_tls_without_trusting_the_ca_fails(tls_server: ServerProcess) -> None:
    with (
        ServiceBackend(tls_server.target, secure=True, timeout=1.0) as b,
        pytest.raises(taskgate.BackendUnavailableError),
    ):
        b.check("api", "k")


def test_async_door_over_tls(tls_server: ServerProcess, pki: Path) -> None:
    async def main() -> None:
        b = taskgate.connect_async(tls_server.url, root_certificates=str(pki / "ca.pem"))
        assert (await b.check("api", "k")).allowed
        await b.aclose()

    asyncio.run(main())


def test_mutual_tls(mtls_server: ServerProcess, pki: Path) -> None:
    ca = str(pki / "ca.pem")
    with ServiceBackend(
        mtls_server.target,
        root_certificates=ca,
        certificate_chain=str(pki / "client.pem"),
        private_key=str(pki / "client.key"),
    ) as b:
        assert b.check("api", "k").allowed
    for cert in (None, "stranger"):  # no client certificate; one from a CA the server does not trust
        chain = str(pki / f"{cert}.pem") if cert else None
        key = str(pki / f"{cert}.key") if cert else None
        with (
            ServiceBackend(
                mtls_server.target,
                root_certificates=ca,
                certificate_chain=chain,
                private_key=key,
                timeout=1.0,
            ) as b,
            pytest.raises(taskgate.BackendUnavailableError),
        ):
            b.check("api", "k")
    with pytest.raises(ValueError, match="together"):
        ServiceBackend(mtls_server.target, certificate_chain=str(pki / "client.pem"))
    assert "mTLS" in mtls_server.log_text()


def _top(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "taskgate.cli", "top", "--once", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_top_over_tls_and_mutual_tls(
    tls_server: ServerProcess, mtls_server: ServerProcess, pki: Path
) -> None:
    """`taskgate top --grpc` reaches a TLS (and an mTLS) server's Monitor door; without trusting its CA it says
    why in one line."""
    ca = str(pki / "ca.pem")
    ok = _top("--grpc", tls_server.url, "--tls-ca", ca)
    assert ok.returncode == 0, ok.stderr
    assert "api" in ok.stdout
    assert "grpcs " in ok.stdout
    ok = _top("--grpc", mtls_server.target, "--tls-ca", ca, "--tls-cert", str(pki / "client.pem"),
              "--tls-key", str(pki / "client.key"))  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "api" in ok.stdout
    untrusted = _top("--grpc", tls_server.url)
    assert untrusted.returncode == 1
    assert "UNAVAILABLE" in untrusted.stderr
    assert "Traceback" not in untrusted.stderr
    half = _top("--grpc", mtls_server.target, "--tls-cert", str(pki / "client.pem"))
    assert half.returncode != 0
    assert "together" in half.stderr
    stray = _top("--redis", "redis://127.0.0.1:6379/9", "--tls-ca", ca)
    assert stray.returncode != 0
    assert "go with --grpc" in stray.stderr


# --- the shared secret -------------------------------------------------------------------------------------


def test_secret(secret_server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TASKGATE_SECRET", raising=False)
    with ServiceBackend(secret_server.target, secret=SECRET) as b:
        assert b.check("api", "k").allowed
        assert "api" in b.refresh_policies()
    for wrong in (None, "not-the-secret", SECRET + "x"):
        with ServiceBackend(secret_server.target, secret=wrong) as b:
            with pytest.raises(taskgate.TaskgateError, match="UNAUTHENTICATED") as info:
                b.check("api", "k")
            assert not isinstance(info.value, taskgate.BackendUnavailableError)  # not an outage
            with pytest.raises(taskgate.TaskgateError, match="secret"):
                b.peek("api", "k")
    monkeypatch.setenv("TASKGATE_SECRET", SECRET)
    with taskgate.connect(secret_server.url) as b:
        assert b.check("api", "k").allowed


def test_wrong_secret_is_not_failed_open(secret_server: ServerProcess) -> None:
    """fail="open" covers outages, never a refused credential."""
    with (
        ServiceBackend(secret_server.target, secret="wrong-secret-wrong", fail="open") as b,
        pytest.raises(taskgate.TaskgateError, match="UNAUTHENTICATED"),
    ):
        b.check("api", "k")


def test_monitor_accepts_x_monitor_secret(secret_server: ServerProcess) -> None:
    """ThrottleKit's monitoring clients send the secret as `x-monitor-secret` (WIRE.md): it opens the Monitor,
    not the RateLimiter; a wrong one is refused."""
    from taskgate._proto import throttlekit_pb2 as pb
    from taskgate._proto import throttlekit_pb2_grpc as pbg

    with grpc.insecure_channel(secret_server.target) as ch:
        monitor, limiter = pbg.MonitorStub(ch), pbg.RateLimiterStub(ch)
        snap = monitor.GetSnapshot(
            pb.GetSnapshotRequest(), metadata=[("x-monitor-secret", SECRET)], timeout=5
        )
        assert "api" in {p.name for p in snap.snapshot.policies}
        for md in ([("x-monitor-secret", "wrong")], [("x-monitor-secret", "")], []):
            with pytest.raises(grpc.RpcError) as info:
                monitor.GetSnapshot(pb.GetSnapshotRequest(), metadata=md, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            limiter.Check(pb.CheckRequest(policy="api", key="k"), metadata=[("x-monitor-secret", SECRET)])
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_secret(secret_server: ServerProcess) -> None:
    with grpc.insecure_channel(secret_server.target) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- refusing unsafe configurations ------------------------------------------------------------------------


def test_non_loopback_without_protection_refuses_to_start(pki: Path) -> None:
    cmd = [sys.executable, "-m", "taskgate.cli", "serve", "--listen", "0.0.0.0:0"]
    out = subprocess.run(
        [*cmd, "--config", str(pki / "policies.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0:0" in out.stderr
    assert "--insecure" in out.stderr
    assert "ready on" not in out.stdout


def test_which_listen_addresses_need_protection(pki: Path) -> None:
    secret, cert, key = str(pki / "secret"), str(pki / "server.pem"), str(pki / "server.key")
    for listen in ("0.0.0.0:50051", "[::]:50051", "10.1.2.3:50051"):
        with pytest.raises(ConfigError, match="refusing"):
            ServeConfig(listen=listen).validate()
        ServeConfig(listen=listen, secret_file=secret).validate()
        ServeConfig(listen=listen, tls_cert=cert, tls_key=key).validate()
        ServeConfig(listen=listen, insecure=True).validate()
    for listen in ("127.0.0.1:0", "[::1]:0", "localhost:0", "127.0.0.2:0"):
        ServeConfig(listen=listen).validate()


def test_bad_secret_files_are_refused(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("abc\n")
    spaced = tmp_path / "spaced"
    spaced.write_text("a secret with spaces in it\n")
    with pytest.raises(ConfigError, match="at least 16"):
        ServeConfig(secret_file=str(short)).validate()
    with pytest.raises(ConfigError, match="printable"):
        ServeConfig(secret_file=str(spaced)).validate()
    with pytest.raises(ConfigError, match="no such file"):
        ServeConfig(secret_file=str(tmp_path / "missing")).validate()
    with pytest.raises(ConfigError, match="--tls-cert"):
        ServeConfig(tls_client_ca=str(short)).validate()
    with pytest.raises(ConfigError, match="not a PEM file"):
        ServeConfig(tls_cert=str(short), tls_key=str(short)).validate()
