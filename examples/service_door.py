"""The service door: workers that may not hold Redis credentials (or are not Python) ask `taskgate serve`.

Starts ``taskgate serve`` (on the embedded store here; ``--redis URL`` in production), then two client
processes share its limit through ``grpc://`` — the same API, Decisions and Admissions as the direct door.

Run::

    python examples/service_door.py
"""

from __future__ import annotations

import multiprocessing
import tempfile
from pathlib import Path

import taskgate
from taskgate.server.testing import ServerProcess

POLICIES = """
version: 1
limiters:
  exports: {strategy: fixedWindow, limit: 10, windowMs: 1h}
  printer: {concurrency: {maxLimit: 1, leaseTtl: 5s}}
"""


def client(url: str, name: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    backend = taskgate.connect(url)
    allowed = sum(backend.check("exports", "team-a").allowed for _ in range(8))
    out.put((name, allowed))


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "policies.yaml"
        cfg.write_text(POLICIES)
        with ServerProcess("--config", str(cfg)) as server:
            print(f"taskgate serve listening on {server.url}")
            out: multiprocessing.Queue = multiprocessing.Queue()  # type: ignore[type-arg]
            procs = [
                multiprocessing.Process(target=client, args=(server.url, f"client-{i}", out))
                for i in range(2)
            ]
            for p in procs:
                p.start()
            for p in procs:
                p.join(30)
            results = dict(out.get(timeout=5) for _ in procs)
            total = sum(results.values())
            print(f"16 checks against a limit of 10 from two processes: {results} -> {total} allowed")
            backend = taskgate.connect(server.url)
            with backend.admit("printer", "floor-2") as job:
                other = backend.admit("printer", "floor-2")
                print(f"printer: first {'admitted' if job.allowed else 'denied'}, second denied by "
                      f"{other.binding_axis} (retry in {other.retry_after_ms} ms)")  # fmt: skip
    return 0 if total == 10 and not other.allowed else 1


if __name__ == "__main__":
    raise SystemExit(main())
