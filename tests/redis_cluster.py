"""A throwaway 3-master Redis Cluster on loopback (ports of our own), for the cluster tests.

Started with the machine's ``redis-server`` / ``redis-cli``; every process is stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# TASKGATE_TEST_CLUSTER_PORT moves the cluster (runs side by side on one machine each take their own ports)
BASE_PORT = int(os.environ.get("TASKGATE_TEST_CLUSTER_PORT", "7100"))


class Cluster:
    def __init__(self, base_port: int = BASE_PORT, masters: int = 3) -> None:
        self.ports = [base_port + i for i in range(masters)]
        self.dir = Path(tempfile.mkdtemp(prefix="tg-cluster-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self) -> None:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            raise RuntimeError("redis-server and redis-cli are needed for the cluster tests")
        for port in self.ports:
            d = self.dir / str(port)
            d.mkdir()
            self.procs.append(
                subprocess.Popen(
                    [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                     "--cluster-config-file", "nodes.conf", "--save", "", "--appendonly", "no", "--dir", str(d)],
                    stdout=(d / "log").open("wb"), stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
        for port in self.ports:
            _wait_port(port)
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = subprocess.run(
                [cli, "-p", str(self.ports[0]), "cluster", "info"], capture_output=True, text=True
            )
            if "cluster_state:ok" in out.stdout:
                return
            time.sleep(0.2)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server did not listen on {port}")
