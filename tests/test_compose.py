"""docker-compose.yml stays valid (no Docker engine here): its structure, and every command it runs exists.

With a Docker CLI that has the compose plugin, ``docker compose config`` validates it against the Compose
schema too.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from taskgate.cli import build_parser
from tests.conftest import ROOT

COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def test_structure() -> None:
    assert {"redis", "taskgate", "celery-worker", "rq-worker", "producer"} <= set(SERVICES)
    built = {s["image"] for s in SERVICES.values() if "build" in s}
    for name, svc in SERVICES.items():
        assert "image" in svc or "build" in svc, name
        assert isinstance(svc.get("command", []), list), f"{name}: command must be a list"
        for dep in svc.get("depends_on", {}):
            assert dep in SERVICES, f"{name} depends on unknown service {dep}"
        if svc.get("image", "").startswith("taskgate:"):
            assert svc["image"] in built, f"{name}: image {svc['image']} is built by no service"
        for port in svc.get("ports", []):
            host, _, container = str(port).partition(":")
            assert host.isdigit(), port
            assert container.isdigit(), port


def test_dockerfile_copies_what_exists() -> None:
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src


def _module_of(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_commands_exist(name: str) -> None:
    cmd: list[str] = SERVICES[name].get("command", [])
    if not cmd or cmd[0] == "redis-server":
        return
    if cmd[0] == "taskgate":
        build_parser().parse_args(cmd[1:])  # exits (fails the test) on an unknown command or flag
    elif cmd[0] == "celery":
        importlib.import_module(_module_of(cmd, "-A"))
    elif cmd[0] == "rq":
        for flag in ("--worker-class", "--job-class"):
            mod, _, cls = _module_of(cmd, flag).rpartition(".")
            assert hasattr(importlib.import_module(mod), cls), _module_of(cmd, flag)
    elif cmd[:2] == ["python", "-m"]:
        importlib.import_module(cmd[2])
    else:
        pytest.fail(f"{name}: no check for command {cmd[0]!r}")


def test_docker_compose_config_when_available() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` here; the structure tests above still ran")
    r = subprocess.run(
        [docker, "compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
