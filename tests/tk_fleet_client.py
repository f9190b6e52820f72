"""ThrottleKit's own Fleet client (throttlekit-py's ``FleetBackend`` / ``LeasedLimiter``) against a server, in a
process of its own: throttlekit-py registers ``throttlekit.proto`` in protobuf's default descriptor pool, as
taskgate's stubs do, so the two cannot share a process. Imports nothing of taskgate. Three modes, each given
a JSON spec (``target``, ``policy``, ``domain``, ``batch`` and the mode's own)::

    python tests/tk_fleet_client.py clients '{"target": "127.0.0.1:5000", "policy": "w", "domain": "t", ...}'
        (tests/test_fleet.py) runs ``clients`` threads, each with its own ``FleetBackend`` and
        ``LeasedLimiter(batch)`` for ``domain`` (or for the i-th of ``domains``), each making ``requests``
        checks of cost 1 (the wall clock), and prints one JSON object: the allowed checks per window
        (``reset_at``) and per domain, the denials, the reserves sent, and ``probes`` (one ``reserve`` per
        entry of ``probes``, sent before the clients start when ``probes_first``: its lease, or the
        exception's type and text).

    python tests/tk_fleet_client.py spend '{...}'
        (bench/fleet.py) reads one command per stdin line, ``lease S`` or ``direct S`` (seconds): for that
        long, spends leases locally (``LeasedLimiter.check``), or makes one round trip per decision with
        throttlekit-py's own ``ServiceBackend.check`` (the RateLimiter service) on the same policy and key;
        prints one JSON line: {"calls", "elapsed_ns", "allowed", "reserves"}; an empty line (or EOF) ends it.

    python tests/tk_fleet_client.py share '{..., "rate": R, "start_ms": T0, "end_ms": T1}'
        (bench/fleet.py) offers R requests/s (paced; a late process catches up) from T0 to T1 (epoch-ms) and
        prints one JSON object, per window (the decision's ``reset_at``): allowed, denied, and the units the
        leases granted. After a denial the process rejects locally until the window ends (the lease's
        ``retry_after_ms``), as a client honouring it would, instead of asking the server again for every
        request.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from throttlekit import Decision, FleetBackend, ServiceBackend


def _counting(
    fleet: FleetBackend,
    reserves: list[int],
    granted: Counter[int] | None = None,
    *,
    lock: threading.Lock | None = None,
) -> None:
    """Count the reserves ``fleet`` sends in ``reserves[0]`` (and, in ``granted``, the units each lease grants
    per window end)."""
    inner = fleet.reserve

    def reserve(*a: Any, **kw: Any) -> Any:
        with lock or contextlib.nullcontext():
            reserves[0] += 1
        lease = inner(*a, **kw)
        if granted is not None:
            granted[lease.expiry_ms] += lease.capacity
        return lease

    fleet.reserve = reserve  # type: ignore[method-assign]


def clients(spec: dict[str, Any]) -> dict[str, Any]:
    allowed: Counter[int] = Counter()
    by_domain: Counter[str] = Counter()
    denied: list[dict[str, int]] = []
    reserves = [0]
    lock = threading.Lock()
    secret = spec.get("secret")

    def client(domain: str) -> None:
        with FleetBackend(spec["target"], secret=secret) as fleet:
            _counting(fleet, reserves, lock=lock)
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


def spend(spec: dict[str, Any]) -> None:
    reserves = [0]
    policy, domain = spec["policy"], spec["domain"]
    with FleetBackend(spec["target"]) as fleet, ServiceBackend(spec["target"]) as service:
        _counting(fleet, reserves)
        leased = fleet.leased(policy, domain=domain, batch=spec["batch"]).check

        def direct() -> Decision:
            return service.check(policy, domain)

        checks: dict[str, Callable[[], Decision]] = {"lease": leased, "direct": direct}
        for _ in range(2000):  # warm-up (and the first lease)
            leased()
        for _ in range(100):
            service.check(policy, domain)
        print(json.dumps({"ready": True}), flush=True)
        clock = time.perf_counter_ns
        for line in sys.stdin:
            if not line.strip():
                break
            what, arg = line.split()
            check, seconds = checks[what], float(arg)
            r0 = reserves[0]
            block = 1000 if what == "lease" else 10
            calls = allowed = 0
            start = clock()
            deadline = start + int(seconds * 1e9)
            t = start
            while t < deadline:
                for _ in range(block):  # the clock read once per block of decisions
                    if check().allowed:
                        allowed += 1
                calls += block
                t = clock()
            out = {"calls": calls, "elapsed_ns": t - start, "allowed": allowed, "reserves": reserves[0] - r0}
            print(json.dumps(out), flush=True)


def share(spec: dict[str, Any]) -> None:
    allowed: Counter[int] = Counter()
    denied: Counter[int] = Counter()
    granted: Counter[int] = Counter()
    reserves = [0]
    rate, start_ms, end_ms = int(spec["rate"]), int(spec["start_ms"]), int(spec["end_ms"])
    behind_ms = 0
    with FleetBackend(spec["target"]) as fleet:
        _counting(fleet, reserves, granted)
        check = fleet.leased(spec["policy"], domain=spec["domain"], batch=spec["batch"]).check
        while time.time() * 1000 < start_ms:
            time.sleep(0.001)
        served = 0
        blocked_until = 0  # epoch-ms: denied until then (the window's end)
        while True:
            now_ms = time.time_ns() // 1_000_000
            if now_ms >= end_ms:
                break
            due = (now_ms - start_ms) * rate // 1000  # requests arrived so far
            if due <= served:
                time.sleep(0.0005)
                continue
            behind_ms = max(behind_ms, (due - served) * 1000 // rate)
            for _ in range(due - served):
                if now_ms < blocked_until:
                    denied[blocked_until] += 1
                    continue
                d = check()
                if d.allowed:
                    allowed[d.reset_at] += 1
                else:
                    denied[d.reset_at] += 1
                    blocked_until = d.reset_at
            served = due
    keys = sorted(set(allowed) | set(denied) | set(granted))
    print(
        json.dumps(
            {
                "windows": {
                    str(k): {"allowed": allowed[k], "denied": denied[k], "granted": granted[k]} for k in keys
                },
                "reserves": reserves[0],
                "offered": served,
                "most_behind_ms": behind_ms,
            }
        )
    )


def _main() -> None:
    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    if mode == "clients":
        print(json.dumps(clients(spec)))
    else:
        {"spend": spend, "share": share}[mode](spec)


if __name__ == "__main__":
    _main()
