"""The Fleet door (``throttlekit.v1.Fleet``): client-held leases against one round trip per decision.

    .venv/bin/python bench/fleet.py [--redis URL] [--seconds S] [--rounds N] [--windows W]
                                    [--tenant-windows T] [--parts 1,2,3] [--record]

Against one real ``taskgate serve --redis ...`` on loopback (started here, stopped by PID):

1. **Local spending vs round trips.** Decisions/s of ONE process spending leases locally with throttlekit-py's
   own ``LeasedLimiter`` (``FleetBackend(...).leased(policy, domain, batch)``; ``tests/tk_fleet_client.py``, a
   process of its own: throttlekit-py and taskgate's stubs register the same ``throttlekit.proto`` in
   protobuf's default pool), against one round trip per decision through taskgate's own gRPC client
   (``taskgate.connect("grpc://...").check``) on the same fixedWindow policy and key (a budget that never
   binds, so every decision is an allow), and through throttlekit-py's own ``ServiceBackend.check`` (the
   RateLimiter service, in the worker process). One synchronous thread each; ``S`` s per measurement, ``N``
   rounds in alternating order (A B, B A, ...); each side's figure is the median of its rounds, a ratio
   the median over the rounds of the two sides' decisions/s in the same round (back to back). Target:
   leases >= 100,000 decisions/s.
2. **3 processes x 1 policy.** Three ``tests/tk_fleet_client.py share`` processes offer 1.2x a fixedWindow
   policy's budget between them (paced; in shares 3:2:1) for ``W`` windows of 1 s, aligned to the window
   boundaries, each leasing ``batch`` at a time; a denied process rejects locally until the window ends (the
   lease's ``retry_after_ms``). Per window (the decisions' ``reset_at``): the units the engine granted (the
   sum of the leases the processes got, each taken from the window's counter: nothing else spends it) and
   the decisions allowed, summed over the processes. Targets, every window: allowed <= granted <= budget;
   and where demand exceeded the budget (a process was denied), allowed / budget >= 95%.
3. **3 tenants x 1 policy, weights 3:1:1.** The same budget on a policy with ``fairness:`` (the domains are
   tenants of one window, ``server/fleet.py``), three ``share`` processes of tenants a, b, c (weights 3, 1,
   1), each offering 0.8x the budget (every tenant wants more than its share) for ``T`` windows; b stops
   after the first half. Per window and per phase: each tenant's share of the decisions allowed. Targets:
   every window allowed <= granted <= budget and allowed / budget >= 95% (but the window b stops in: its
   share is held until it has been idle for a window); each tenant's share within 2 points of its weight's:
   60 / 20 / 20 % with all three, 75 / 0 / 25 % once b has stopped (work-conserving).

``--record`` appends the output to ``bench/RESULTS.md``. On a small, shared machine the client processes,
the server and Redis share the CPUs; the report gives the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis

import taskgate
from bench._common import delete_prefix, fmt_rate, machine_info, record, table
from taskgate.server.testing import ServerProcess

DEFAULT_URL = "redis://127.0.0.1:6379/11"
WORKER = Path(__file__).resolve().parent.parent / "tests" / "tk_fleet_client.py"  # ThrottleKit's client

# part 1: a budget that never binds (every decision an allow), leased 10,000 at a time
OPEN_LIMIT, OPEN_BATCH = 1_000_000_000, 10_000
LOCAL_TARGET = 100_000.0
# part 2: 3 processes offering 1.2x the budget of 30,000 per 1-s window between them, in shares 3:2:1
# (18,000/s, 12,000/s, 6,000/s), each leasing 500 at a time
WINDOW_MS, BUDGET, BATCH = 1000, 30_000, 500
OFFERED = 1.2
SHARES = (3, 2, 1)
PROCS = len(SHARES)
UTILISATION_TARGET = 0.95

# part 3: tenants a, b, c of weights 3, 1, 1, each offering 0.8x the budget
TENANTS = (("a", 3), ("b", 1), ("c", 1))
TENANT_OFFERED = 0.8
SHARE_TOLERANCE = 0.02

POLICY_YAML = (
    "version: 1\nlimiters:\n"
    f"  open: {{strategy: fixedWindow, limit: {OPEN_LIMIT}, windowMs: {WINDOW_MS}}}\n"
    f"  shared: {{strategy: fixedWindow, limit: {BUDGET}, windowMs: {WINDOW_MS}}}\n"
    f"  tenants: {{strategy: fixedWindow, limit: {BUDGET}, windowMs: {WINDOW_MS},\n"
    f"            fairness: {{weights: {{{', '.join(f'{t}: {w}' for t, w in TENANTS)}}}}}}}\n"
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--redis", default=DEFAULT_URL, help="default: %(default)s (own key prefix)")
    p.add_argument(
        "--seconds", type=float, default=3.0, help="part 1, per measurement (default: %(default)s)"
    )
    p.add_argument("--rounds", type=int, default=4, help="part 1, rounds (default: %(default)s)")
    p.add_argument("--windows", type=int, default=10, help="part 2, 1-s windows (default: %(default)s)")
    p.add_argument(
        "--tenant-windows", type=int, default=10, help="part 3, 1-s windows (default: %(default)s)"
    )
    p.add_argument(
        "--offered", type=float, default=OFFERED, help="part 2, demand / budget (default: %(default)s)"
    )
    p.add_argument("--parts", default="1,2,3", help="the parts to run (default: %(default)s)")
    p.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    return p.parse_args(argv)


def progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


# --- part 1 ------------------------------------------------------------------------------------------------


def round_trips(url: str, key: str, seconds: float) -> dict[str, int]:
    """taskgate's own gRPC client: one ``check`` (one round trip) per decision, for ``seconds``."""
    b = taskgate.connect(url)
    try:
        check = b.check
        for _ in range(200):  # warm-up
            check("open", key)
        clock = time.perf_counter_ns
        calls = allowed = 0
        start = clock()
        deadline = start + int(seconds * 1e9)
        t = start
        while t < deadline:
            for _ in range(10):
                if check("open", key).allowed:
                    allowed += 1
            calls += 10
            t = clock()
        return {"calls": calls, "elapsed_ns": t - start, "allowed": allowed}
    finally:
        b.close()


def part1(srv: ServerProcess, seconds: float, rounds: int) -> tuple[list[str], bool]:
    key = f"bench-{uuid.uuid4().hex[:8]}"
    spec = {"target": srv.target, "policy": "open", "domain": key, "batch": OPEN_BATCH}
    worker = subprocess.Popen(
        [sys.executable, str(WORKER), "spend", json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    stdin, stdout = worker.stdin, worker.stdout
    if stdin is None or stdout is None:
        raise RuntimeError("no pipes to the lease worker")
    lease: list[dict[str, int]] = []
    rt: list[dict[str, int]] = []
    tk_rt: list[dict[str, int]] = []
    try:
        if not json.loads(stdout.readline()).get("ready"):
            raise RuntimeError("the lease worker did not start")

        def in_worker(what: str, into: list[dict[str, int]]) -> None:
            stdin.write(f"{what} {seconds}\n")
            stdin.flush()
            into.append(json.loads(stdout.readline()))

        steps: list[tuple[str, Callable[[], None]]] = [
            ("leases (throttlekit-py LeasedLimiter)", lambda: in_worker("lease", lease)),
            ("round trips (taskgate client)", lambda: rt.append(round_trips(srv.url, key, seconds))),
            ("round trips (throttlekit-py ServiceBackend)", lambda: in_worker("direct", tk_rt)),
        ]
        for r in range(rounds):
            for name, fn in steps if r % 2 == 0 else steps[::-1]:
                progress(f"part 1, round {r + 1}/{rounds}: {name}")
                fn()
    finally:
        stdin.close()
        worker.wait(timeout=30)

    def rate(x: dict[str, int]) -> float:
        return x["calls"] * 1e9 / x["elapsed_ns"]

    def paired(a: list[float], b: list[float]) -> list[float]:
        return [x / y for x, y in zip(a, b, strict=True) if y]

    lease_rates, rt_rates, tk_rates = ([rate(x) for x in xs] for xs in (lease, rt, tk_rt))
    ratios, tk_ratios = paired(lease_rates, rt_rates), paired(lease_rates, tk_rates)
    med_lease = statistics.median(lease_rates)
    all_allowed = all(x["allowed"] == x["calls"] for x in lease + rt + tk_rt)

    def row(name: str, rates: list[float], runs: list[dict[str, int]], trips: int) -> list[str]:
        return [
            name,
            fmt_rate(statistics.median(rates)),
            " ".join(fmt_rate(x) for x in rates),
            f"{sum(x['calls'] for x in runs):,}",
            f"{trips:,}",
        ]

    n_rt, n_tk = sum(x["calls"] for x in rt), sum(x["calls"] for x in tk_rt)
    rows = [
        row(
            f"leases: throttlekit-py LeasedLimiter(batch={OPEN_BATCH:,}).check, local",
            lease_rates,
            lease,
            sum(x["reserves"] for x in lease),
        ),
        row("round trips: taskgate.connect('grpc://').check", rt_rates, rt, n_rt),
        row("round trips: throttlekit-py ServiceBackend.check", tk_rates, tk_rt, n_tk),
    ]
    ok = med_lease >= LOCAL_TARGET and all_allowed

    def listed(xs: list[float]) -> str:
        return " ".join(f"{x:,.0f}x" for x in xs)

    out = [
        f"1. local spending vs round trips: one process, one synchronous thread each, fixedWindow limit "
        f"{OPEN_LIMIT:,} per {WINDOW_MS} ms (never binds), one key;",
        f"   {seconds:g} s per measurement x {rounds} rounds, alternating order (A B C, C B A, ...); "
        "decisions/s = the median of the rounds",
        "",
        table(["measurement", "decisions/s", "rounds", "decisions", "round trips"], rows),
        "",
        f"every decision an allow: {all_allowed}",
        f"leases / taskgate client round trips: {statistics.median(ratios):,.0f}x "
        f"(median of the rounds' ratios: {listed(ratios)})",
        f"leases / throttlekit-py ServiceBackend round trips: {statistics.median(tk_ratios):,.0f}x "
        f"(rounds: {listed(tk_ratios)})",
        f"leases: {fmt_rate(med_lease)} decisions/s (target >= {fmt_rate(LOCAL_TARGET)})  "
        + ("PASS" if ok else "MISS"),
    ]
    return out, ok


# --- part 2 ------------------------------------------------------------------------------------------------


def part2(srv: ServerProcess, windows: int, offered: float) -> tuple[list[str], bool]:
    domain = f"tenant-{uuid.uuid4().hex[:8]}"
    total = BUDGET * offered * 1000 / WINDOW_MS  # requests/s, all processes
    rates = [int(total * share / sum(SHARES)) for share in SHARES]
    now = int(time.time() * 1000)
    start = now - now % WINDOW_MS + 2 * WINDOW_MS  # a window boundary >= 1 s away (the workers import)
    end = start + windows * WINDOW_MS
    spec = {
        "target": srv.target,
        "policy": "shared",
        "domain": domain,
        "batch": BATCH,
        "start_ms": start,
        "end_ms": end,
    }
    progress(f"part 2: {PROCS} processes x {windows} windows")
    outs = run_shares([{**spec, "rate": rate} for rate in rates], end - start)
    per = per_window(outs)
    rows = []
    ok = True
    over_budget = under = judged = 0
    for k in sorted(per):
        w = per[k]
        allowed, denied, granted = sum(w["allowed"]), sum(w["denied"]), sum(w["granted"])
        demand = allowed + denied
        within = allowed <= granted <= BUDGET
        saturated = denied > 0  # demand exceeded the budget
        util = allowed / BUDGET
        verdict = "PASS" if within else "MISS (over budget)"
        if saturated:
            judged += 1
            if util < UTILISATION_TARGET:
                verdict = "MISS (utilisation)" if within else verdict + ", MISS (utilisation)"
                under += 1
        else:
            verdict += " (demand <= budget: utilisation not judged)"
        over_budget += not within
        ok &= within and (not saturated or util >= UTILISATION_TARGET)
        rows.append(
            [
                time.strftime("%H:%M:%S", time.gmtime(k / 1000 - WINDOW_MS / 1000)),
                f"{demand:,}",
                f"{granted:,}",
                f"{allowed:,}",
                " + ".join(f"{x:,}" for x in w["allowed"]),
                f"{util * 100:.1f}%",
                verdict,
            ]
        )
    ok &= judged > 0
    reserves = [o["reserves"] for o in outs]
    behind = [o["most_behind_ms"] for o in outs]
    out = [
        f"2. {PROCS} processes x 1 policy: fixedWindow {BUDGET:,} per {WINDOW_MS} ms, one key; the processes "
        f"offer {' + '.join(f'{r:,}' for r in rates)} requests/s (together {offered:g}x the budget, paced)",
        f"   for {windows} windows, LeasedLimiter(batch={BATCH}); a denied process rejects locally until the "
        "window ends",
        "",
        table(
            ["window (UTC)", "demand", "granted", "allowed", "allowed per process", "allowed/budget", ""],
            rows,
        ),
        "",
        "granted: the units of the leases the processes got for that window (each taken in Lua from the "
        "window's counter); allowed: decisions allowed.",
        f"Fleet.Reserve round trips per process: {' '.join(str(x) for x in reserves)} "
        f"(for {sum(o['offered'] for o in outs):,} requests offered); "
        f"most a process fell behind its pace: {' '.join(f'{x} ms' for x in behind)}",
        f"windows over budget: {over_budget} of {len(per)}; windows with demand over the budget: {judged}, "
        f"of them under {UTILISATION_TARGET:.0%} utilisation: {under}  " + ("PASS" if ok else "MISS"),
    ]
    return out, ok


def run_shares(specs: list[dict[str, Any]], run_ms: int) -> list[dict[str, Any]]:
    """One ``tests/tk_fleet_client.py share`` process per spec, at once; their JSON reports."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "share", json.dumps(spec)], stdout=subprocess.PIPE, text=True
        )
        for spec in specs
    ]
    outs: list[dict[str, Any]] = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=run_ms / 1000 + 60)
            if p.returncode != 0:
                raise RuntimeError(f"a share worker exited with {p.returncode}")
            outs.append(json.loads(stdout))
    finally:
        for p in procs:  # our own children, by their Popen (a failure above leaves the others running)
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def per_window(outs: list[dict[str, Any]]) -> dict[int, dict[str, list[int]]]:
    """window end -> allowed / denied / granted -> one count per process."""
    per: dict[int, dict[str, list[int]]] = {}
    for i, o in enumerate(outs):
        for k, v in o["windows"].items():
            w = per.setdefault(int(k), {f: [0] * len(outs) for f in ("allowed", "denied", "granted")})
            for f in ("allowed", "denied", "granted"):
                w[f][i] += v[f]
    return per


# --- part 3 ------------------------------------------------------------------------------------------------


def part3(srv: ServerProcess, windows: int) -> tuple[list[str], bool]:
    rate = int(BUDGET * TENANT_OFFERED * 1000 / WINDOW_MS)
    now = int(time.time() * 1000)
    start = now - now % WINDOW_MS + 2 * WINDOW_MS
    end = start + windows * WINDOW_MS
    half = windows // 2 if windows >= 4 else windows  # tenant b stops after the first half
    base = {"target": srv.target, "policy": "tenants", "batch": BATCH, "start_ms": start, "end_ms": end}
    specs = [{**base, "domain": t, "rate": rate} for t, _ in TENANTS]
    specs[1]["end_ms"] = start + half * WINDOW_MS
    progress(f"part 3: {len(TENANTS)} tenants x {windows} windows")
    outs = run_shares(specs, end - start)
    per = per_window(outs)
    weights = [float(w) for _, w in TENANTS]
    phases = {"all three": weights, "after b stopped": [weights[0], 0.0, weights[2]]}
    rows = []
    ok = True
    totals = {name: [0] * len(TENANTS) for name in phases}
    for k in sorted(per):
        w = per[k]
        idx = (k - start) // WINDOW_MS - 1
        allowed, granted = sum(w["allowed"]), sum(w["granted"])
        within = allowed <= granted <= BUDGET
        util = allowed / BUDGET
        judged = idx != half  # the window b stops at: its share is held until it has been idle a window
        good = within and (util >= UTILISATION_TARGET or not judged)
        ok &= good
        if judged:
            name = "all three" if idx < half else "after b stopped"
            totals[name] = [a + b for a, b in zip(totals[name], w["allowed"], strict=True)]
        verdict = "PASS" if good else ("MISS (over budget)" if not within else "MISS (utilisation)")
        rows.append(
            [
                time.strftime("%H:%M:%S", time.gmtime(k / 1000 - WINDOW_MS / 1000)),
                f"{granted:,}",
                f"{allowed:,}",
                " + ".join(f"{x:,}" for x in w["allowed"]),
                " / ".join(f"{x / allowed * 100:.1f}" if allowed else "-" for x in w["allowed"]),
                f"{util * 100:.1f}%",
                verdict if judged else verdict + " (b stops: utilisation not judged)",
            ]
        )
    summary = []
    for name, ws in phases.items():
        got = totals[name]
        if not sum(got):
            continue
        share = [x / sum(got) for x in got]
        want = [x / sum(ws) for x in ws]
        fine = all(abs(g - x) <= SHARE_TOLERANCE for g, x in zip(share, want, strict=True))
        ok &= fine
        summary.append(
            f"{name}: {' / '.join(f'{t} {g * 100:.1f}%' for (t, _), g in zip(TENANTS, share, strict=True))} "
            f"(weights' shares {' / '.join(f'{x * 100:.0f}%' for x in want)}, target within "
            f"{SHARE_TOLERANCE * 100:.0f} points): " + ("PASS" if fine else "MISS")
        )
    ok &= len(summary) > 0
    names = " / ".join(f"{t} (w {w})" for t, w in TENANTS)
    out = [
        f"3. {len(TENANTS)} tenants x 1 policy (fairness: weights {':'.join(str(w) for _, w in TENANTS)}): "
        f"fixedWindow {BUDGET:,} per {WINDOW_MS} ms, each tenant one process offering {rate:,} requests/s "
        f"({TENANT_OFFERED:g}x the budget, paced) for {windows} windows (b for the first {half}), "
        f"LeasedLimiter(batch={BATCH}, domain=tenant)",
        "",
        table(
            ["window (UTC)", "granted", "allowed", f"allowed {names}", "shares %", "allowed/budget", ""], rows
        ),
        "",
        *summary,
        f"Fleet.Reserve round trips per tenant: {' '.join(str(o['reserves']) for o in outs)}; every window "
        f"allowed <= granted <= budget and >= {UTILISATION_TARGET:.0%} used: " + ("PASS" if ok else "MISS"),
    ]
    return out, ok


# --- the run -----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    prefix = f"tgbench-fleet-{os.getpid()}"
    probe = redis.Redis.from_url(args.redis)
    probe.ping()
    meta = machine_info(probe.info("server"))
    meta["redis url"] = args.redis
    meta["taskgate"] = taskgate.__version__
    meta["throttlekit-py"] = _throttlekit_version()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(POLICY_YAML)
    srv = ServerProcess("--config", f.name, "--redis", args.redis, "--prefix", prefix)
    t0 = time.monotonic()
    try:
        srv.start()
        print("machine: " + "; ".join(f"{k} {v}" for k, v in meta.items()), flush=True)
        parts = {x.strip() for x in args.parts.split(",")}
        none: tuple[list[str], bool] = ([], True)
        body1, ok1 = part1(srv, args.seconds, args.rounds) if "1" in parts else none
        body2, ok2 = part2(srv, args.windows, args.offered) if "2" in parts else none
        body3, ok3 = part3(srv, args.tenant_windows) if "3" in parts else none
    finally:
        srv.stop()
        os.unlink(f.name)
        deleted = delete_prefix(probe, prefix + ":")
        probe.close()
    progress(f"deleted {deleted} leftover keys")
    load_after = os.getloadavg()
    body = [
        *body1,
        "",
        *body2,
        "",
        *body3,
        "",
        f"(info) load average {' '.join(f'{x:.2f}' for x in load_before)} before the run, "
        f"{' '.join(f'{x:.2f}' for x in load_after)} after; run {time.monotonic() - t0:.0f} s",
    ]
    if (os.cpu_count() or 1) < 4:
        body.append(
            f"(note) nproc {os.cpu_count()}: the client processes, the server and Redis share these CPUs "
            "with whatever else runs on the machine"
        )
    text = "\n".join(body)
    print(text)
    if args.record:
        record("bench/fleet.py — Fleet leases", text, meta)
        print("appended to bench/RESULTS.md")
    return 0 if ok1 and ok2 and ok3 else 1


def _throttlekit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("throttlekit-py")
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
