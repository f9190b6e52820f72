"""ThrottleKit's own Fleet client (throttlekit-py's ``FleetBackend`` / ``LeasedLimiter``) against a server, in a
process of its own: throttlekit-py registers ``throttlekit.proto`` in protobuf's default descriptor pool, as
taskgate's stubs do, so the two cannot share a process. Used by tests/test_fleet.py::

    python tests/tk_fleet_client.py '{"target": "127.0.0.1:5000", "policy": "w", "domain": "t", ...}'

Runs ``clients`` threads, each with its own ``FleetBackend`` and ``LeasedLimiter(batch)`` for ``domain`` (or
for the i-th of ``domains``), each making ``requests`` checks of cost 1 (the wall clock), and prints one JSON
object: the allowed checks per window (``reset_at``) and per domain, the denials, the reserves sent, and
``probes`` (one ``reserve`` per entry of ``probes``, sent before the clients start when ``probes_first``: its
lease, or the exception's type and text).
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from typing import Any

from throttlekit import FleetBackend


def main(spec: dict[str, Any]) -> dict[str, Any]:
    allowed: Counter[int] = Counter()
    by_domain: Counter[str] = Counter()
    denied: list[dict[str, int]] = []
    reserves = [0]
    lock = threading.Lock()
    secret = spec.get("secret")

    def client(domain: str) -> None:
        with FleetBackend(spec["target"], secret=secret) as fleet:
            inner = fleet.reserve

            def counted(*a: Any, **kw: Any) -> Any:
                with lock:
                    reserves[0] += 1
                return inner(*a, **kw)

            fleet.reserve = counted  # type: ignore[method-assign]
            limiter = fleet.leased(spec["policy"], domain=domain, batch=spec["batch"])
            for _ in range(spec["requests"]):
                d = limiter.check()
                with lock:
                    if d.allowed:
                        allowed[d.reset_at] += 1
                        by_domain[domain] += 1
                    else:
                        denied.append(
                            {"reset_at": d.reset_at, "retry_after_ms": d.retry_after_ms, "limit": d.limit}
                        )

    domains = spec.get("domains") or [spec["domain"]] * spec["clients"]
    threads = [threading.Thread(target=client, args=(d,)) for d in domains]
    probes: list[dict[str, Any]] = []
    if spec.get("probes_first"):
        run_probes(spec, probes)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not spec.get("probes_first"):
        run_probes(spec, probes)
    return {
        "allowed": {str(k): v for k, v in allowed.items()},
        "allowed_by_domain": dict(by_domain),
        "denied": denied,
        "reserves": reserves[0],
        "probes": probes,
    }


def run_probes(spec: dict[str, Any], probes: list[dict[str, Any]]) -> None:
    with FleetBackend(spec["target"], secret=spec.get("secret")) as fleet:
        for p in spec.get("probes", []):
            try:
                lease = fleet.reserve(
                    p["policy"],
                    domain=p.get("domain", ""),
                    wants=p.get("wants", 1),
                    axis=p.get("axis", "rate"),
                )
                probes.append(
                    {
                        "capacity": lease.capacity,
                        "expiry_ms": lease.expiry_ms,
                        "limit": lease.limit,
                        "retry_after_ms": lease.retry_after_ms,
                        "refresh_interval_ms": lease.refresh_interval_ms,
                    }
                )
            except Exception as e:
                probes.append({"error": type(e).__name__, "text": str(e)})


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
