"""A real ``taskgate serve`` in a subprocess, for integration tests (taskgate's own and yours)::

    with ServerProcess("--config", "policies.yaml", "--redis", "redis://localhost:6379/0") as srv:
        backend = taskgate.connect(srv.url)
        ...

It starts ``python -m taskgate.cli serve --listen 127.0.0.1:0 ...`` (the server binds a free port itself, so
no other process can take it in between), waits for the "ready on HOST:PORT" line, and stops the server with
SIGTERM on exit (``kill()`` for a SIGKILL). The server's output goes
to a log file (``log_text()``) so a failing test can show it.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

__all__ = ["ServerProcess", "free_port"]

READY = "taskgate serve: ready on"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class ServerProcess:
    """``taskgate serve`` with extra CLI ``args`` on 127.0.0.1 and a free port (or ``listen``)."""

    def __init__(
        self,
        *args: str,
        listen: str | None = None,
        env: dict[str, str] | None = None,
        scheme: str = "grpc",
    ) -> None:
        self.listen = listen or "127.0.0.1:0"  # the real port is read from the ready line
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.scheme = scheme
        self.proc: subprocess.Popen[bytes] | None = None
        fd, name = tempfile.mkstemp(prefix="taskgate-serve-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.listen}"

    @property
    def target(self) -> str:
        return self.listen

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("not started")
        return self.proc.pid

    def command(self) -> list[str]:
        return [sys.executable, "-m", "taskgate.cli", "serve", "--listen", self.listen, *self.args]

    def launch(self) -> ServerProcess:
        """Start the process without waiting (then :meth:`wait_ready`): several servers start in parallel."""
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait_ready(self, timeout: float = 30.0) -> ServerProcess:
        if self.proc is None:
            raise RuntimeError("not launched")
        deadline = time.monotonic() + timeout
        while READY not in self.log_text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"taskgate serve exited with {self.proc.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"taskgate serve not ready after {timeout}s:\n{self.log_text()}")
            time.sleep(0.02)
        m = re.search(re.escape(READY) + r" (\S+) \(", self.log_text())
        if m is not None:
            self.listen = m.group(1)
        return self

    def start(self, timeout: float = 30.0) -> ServerProcess:
        return self.launch().wait_ready(timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait; the exit status (SIGKILL after ``timeout``)."""
        if self.proc is None:
            return 0
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: no shutdown, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self.wait_ready()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)
