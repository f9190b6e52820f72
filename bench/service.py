"""Throughput and latency through the gRPC door, against its floor, and ``--workers 2`` against one worker.

    .venv/bin/python bench/service.py [--redis URL] [--seconds S] [--rounds N] [--record]

In one run, on the same Redis, with the same asyncio client (:class:`taskgate.AsyncServiceBackend`, one
channel per client process, C concurrent callers each awaiting one call at a time, distinct keys):

- ``taskgate serve`` (one process, over Redis): ``check`` (gcra) with 1, 16 and 64 callers, and
  ``check_many`` with 100 keys per call (16 callers);
- the floor: a bare grpc.aio server (this file, ``--floor-server``) implementing the same ``Check`` RPC
  with one redis.asyncio ``EVALSHA`` of a minimal GCRA script per call and nothing else (no validation, no
  policies, no interceptors), driven by the same client;
- ``taskgate serve --workers 2`` against ``--workers 1``, each driven by two client processes of 32 callers,
  and, when ``h2load`` (Debian/Ubuntu package ``nghttp2-client``) is installed, by ``h2load`` (16 HTTP/2
  connections, 8 streams each, the same ``Check`` request on one key): a load generator in C that costs
  ~40 µs of CPU per call where the Python client costs ~300 µs, so on a small machine the servers, not the
  client, get the cores. The ``--workers`` target is read from the h2load pair when there is one; the
  same h2load pair is run on the floor (two floor processes on one port, ``SO_REUSEPORT``, against one), so
  the report shows what two bare grpc.aio processes gain on the same machine next to what taskgate gains.

Target: taskgate >= 0.8x the floor per server process (64 callers). ``--workers 2`` against one worker is
reported for information (its former ">= 1.3x" target is retired).
Each measurement runs in several rounds in alternating order and the best round is kept (bench/_common.py);
the ``--workers`` ratio is the median over the rounds of the two sides' calls/s in the same round (they ran
back to back), as bench/decisions.py reads its ratios.
The client runs in its own processes (``--client``); on a small machine client, servers and Redis share the
CPUs, which the header reports (nproc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import redis
import redis.asyncio

import taskgate
from bench._common import (
    Measurement,
    Result,
    Selection,
    delete_prefix,
    fmt_rate,
    machine_info,
    ratio_line,
    record,
    run_rounds,
    table,
)
from taskgate._proto import throttlekit_pb2 as pb
from taskgate._proto import throttlekit_pb2_grpc as pbg
from taskgate.backends.service import AsyncServiceBackend
from taskgate.server.testing import ServerProcess

DEFAULT_URL = "redis://127.0.0.1:6379/10"
LIMIT, PERIOD_MS, BURST = 100_000, 1000, 1000  # every call is allowed and writes state (the dearer path)
MANY = 100
N_KEYS = 100_000
_SPEC = f"{{strategy: gcra, limit: {LIMIT}, period: {PERIOD_MS}ms, burst: {BURST}}}"
POLICY = f"version: 1\nlimiters:\n  bench: {_SPEC}\n"
FLOOR_TARGET = 0.8
READY = "floor: ready on"

# The floor's script: the least a GCRA decision costs (Redis TIME, GET, SET PX); same as bench/decisions.py.
BARE_GCRA = """\
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local T = tonumber(ARGV[1]) / tonumber(ARGV[2])
local tau = T * tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + T
if new_tat - tau > now then return {0, math.ceil(new_tat - tau - now)} end
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', math.max(1, math.ceil(new_tat - now)))
return {1, 0}
"""


# --- the floor server --------------------------------------------------------------------------------------


class FloorServicer(pbg.RateLimiterServicer):
    """Check = one EVALSHA; every other RPC is UNIMPLEMENTED (the generated base)."""

    def __init__(self, client: redis.asyncio.Redis, sha: str, prefix: str) -> None:
        self.client = client
        self.sha = sha
        self.prefix = prefix

    async def Check(self, request: pb.CheckRequest, context: Any) -> pb.CheckResponse:
        key = f"{self.prefix}:floor:{request.key}"
        allowed, retry = await self.client.evalsha(self.sha, 1, key, PERIOD_MS, LIMIT, BURST)
        return pb.CheckResponse(decision=pb.Decision(allowed=allowed == 1, limit=BURST, retry_after_ms=retry))


async def floor_server(listen: str, url: str, prefix: str, reuseport: bool = False) -> None:
    client = redis.asyncio.Redis.from_url(url)
    sha = await client.script_load(BARE_GCRA)
    # --reuseport: a second floor process on the first one's port (the floor of `--workers 2`)
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuseport))])
    floor = FloorServicer(client, sha, prefix)  # type: ignore[abstract]  # only Check is served
    pbg.add_RateLimiterServicer_to_server(floor, server)
    port = server.add_insecure_port(listen)
    await server.start()
    print(f"{READY} 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


# --- the client --------------------------------------------------------------------------------------------


async def load(target: str, op: str, concurrency: int, seconds: float, tag: str) -> dict[str, Any]:
    """C callers, each awaiting one call at a time, for ``seconds`` after a warm-up; latencies in ns."""
    b = AsyncServiceBackend(target, timeout=30.0)
    lat: list[int] = []
    measuring = False
    stop = False
    clock = time.perf_counter_ns
    total = 0

    async def caller(c: int) -> None:
        nonlocal total
        i = 0
        keys = [f"{tag}{c}:{j}" for j in range(N_KEYS // concurrency)]
        n = len(keys)
        while not stop:
            if op == "many":
                batch = [keys[(i + j) % n] for j in range(MANY)]
                t0 = clock()
                await b.check_many("bench", batch)
            else:
                t0 = clock()
                await b.check("bench", keys[i % n])
            if measuring:
                lat.append(clock() - t0)
            total += 1
            i += MANY if op == "many" else 1

    tasks = [asyncio.create_task(caller(c)) for c in range(concurrency)]
    await asyncio.sleep(0.5)
    measuring, start = True, clock()
    await asyncio.sleep(seconds)
    measuring, end = False, clock()
    stop = True
    await asyncio.gather(*tasks)
    await b.aclose()
    return {"calls": len(lat), "all_calls": total, "elapsed_ns": end - start, "lat": lat}


@dataclass
class ServiceResult(Result):
    """A :class:`Result` plus the CPU time the server process(es) spent per call (µs)."""

    server_cpu_us: float = 0.0


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of these processes so far."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def run_clients(
    target: str, pids: Sequence[int], op: str, concurrency: int, procs: int, seconds: float, name: str
) -> ServiceResult:
    """``procs`` client processes of ``concurrency`` callers each; their results merged."""
    cmd = [sys.executable, __file__, "--client", target, "--op", op, "--seconds", str(seconds)]
    cpu0 = cpu_seconds(pids)
    children = [
        subprocess.Popen(
            [*cmd, "--concurrency", str(concurrency), "--tag", f"p{i}x{time.monotonic_ns()}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(procs)
    ]
    outs = [json.loads(c.communicate(timeout=seconds + 60)[0]) for c in children]
    cpu = cpu_seconds(pids) - cpu0
    lat = sorted(x for o in outs for x in o["lat"])
    items = MANY if op == "many" else 1
    calls = sum(o["calls"] for o in outs)
    per_call = cpu * 1e6 / max(1, sum(o["all_calls"] for o in outs))
    return ServiceResult(name, calls, max(o["elapsed_ns"] for o in outs), lat, items, per_call)


H2LOAD_CONNS, H2LOAD_STREAMS = 16, 8
H2LOAD_LABEL = f"h2load {H2LOAD_CONNS}x{H2LOAD_STREAMS} streams"


def info_line(label: str, num: float, den: float) -> str:
    """``(info) label: 1.21x`` (no target: the former ``--workers 2 >= 1.3x`` one is retired)."""
    return f"(info) {label}: {num / den if den else 0.0:.2f}x (no target)"


def run_h2load(target: str, pids: Sequence[int], seconds: float, name: str) -> ServiceResult:
    """``h2load`` sending one ``Check`` (a gRPC frame: flag, length, message) over and over for ``seconds``
    after a 1 s warm-up; one latency per request from its log. The request is checked once through a
    gRPC stub first (h2load sees HTTP statuses only, not gRPC's)."""
    key = f"h2load-{time.monotonic_ns()}"
    msg = pb.CheckRequest(policy="bench", key=key, cost=1)
    with grpc.insecure_channel(target) as ch:
        reply = pbg.RateLimiterStub(ch).Check(msg, timeout=10)
    if not reply.decision.allowed:
        raise RuntimeError(f"h2load's request is not allowed: {reply}")
    body = msg.SerializeToString()
    with tempfile.TemporaryDirectory() as d:
        data, log = Path(d) / "req.bin", Path(d) / "h2load.log"
        data.write_bytes(b"\x00" + len(body).to_bytes(4, "big") + body)
        cmd = ["h2load", "-D", f"{seconds:g}", "--warm-up-time", "1", "-c", str(H2LOAD_CONNS),
               "-m", str(H2LOAD_STREAMS), "-H", "content-type: application/grpc", "-H", "te: trailers",
               "-d", str(data), "--log-file", str(log),
               f"http://{target}/throttlekit.v1.RateLimiter/Check"]  # fmt: skip
        cpu0 = cpu_seconds(pids)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
        cpu = cpu_seconds(pids) - cpu0
        rows = [line.split() for line in log.read_text().splitlines() if line.strip()]
    ok = [int(r[2]) * 1000 for r in rows if r[1] == "200"]
    if len(ok) != len(rows) or not ok:
        raise RuntimeError(f"h2load: {len(rows) - len(ok)} of {len(rows)} requests failed:\n{out}")
    starts = [int(r[0]) for r in rows]
    elapsed_ns = (max(starts) - min(starts)) * 1000 or 1
    # the server's CPU ran through the 1 s warm-up too, which h2load neither logs nor counts
    calls = len(ok) * (seconds + 1.0) / seconds
    return ServiceResult(name, len(ok), elapsed_ns, sorted(ok), 1, cpu * 1e6 / max(1.0, calls))


# --- the run -----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--redis", default=DEFAULT_URL, help="default: %(default)s (db 10; own key prefix)")
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (default: %(default)s)")
    p.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    # internal roles (this file runs itself as the floor server and as the client processes)
    p.add_argument("--floor-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--listen", default="127.0.0.1:0", help=argparse.SUPPRESS)
    p.add_argument("--prefix", default="", help=argparse.SUPPRESS)
    p.add_argument("--reuseport", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--client", metavar="TARGET", help=argparse.SUPPRESS)
    p.add_argument("--op", default="check", help=argparse.SUPPRESS)
    p.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--tag", default="k", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _worker_pids(srv: ServerProcess) -> list[int]:
    """The worker pids a ``--workers N`` parent prints on its ready line."""
    line = next(x for x in srv.log_text().splitlines() if "ready on" in x)
    return [int(p) for p in line.split("pids ", 1)[1].split(";", 1)[0].split()]


class FloorProcess(ServerProcess):
    def command(self) -> list[str]:
        return [sys.executable, __file__, "--floor-server", "--listen", self.listen, *self.args]


def _ready(proc: ServerProcess, marker: str) -> ServerProcess:
    deadline = time.monotonic() + 30
    while marker not in proc.log_text():
        if (proc.proc is not None and proc.proc.poll() is not None) or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start:\n{proc.log_text()}")
        time.sleep(0.05)
    proc.listen = proc.log_text().split(marker, 1)[1].split()[0]
    return proc


def _paired(num: str, den: str, sel: Selection) -> list[float]:
    """The h2load pair ``num / den`` round by round (each round ran the two back to back)."""
    a, b = sel.rounds[f"{num}, {H2LOAD_LABEL}"], sel.rounds[f"{den}, {H2LOAD_LABEL}"]
    return [x / y for x, y in zip(a, b, strict=True) if y] or [0.0]


def _listed(ratios: Sequence[float]) -> str:
    return " ".join(f"{r:.2f}x" for r in ratios)


def _best_ratio(sel: Selection) -> str:
    w1, w2 = (sel.best[f"taskgate --workers {n}, {H2LOAD_LABEL}"].ops for n in (1, 2))
    return f"{w2 / w1 if w1 else 0:.2f}x"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.floor_server:
        asyncio.run(floor_server(args.listen, args.redis, args.prefix, args.reuseport))
        return 0
    if args.client:
        out = asyncio.run(load(args.client, args.op, args.concurrency, args.seconds, args.tag))
        print(json.dumps(out))
        return 0

    load_before = os.getloadavg()[0]
    h2load = shutil.which("h2load") is not None
    prefix = f"tgbench-svc-{os.getpid()}"
    probe = redis.Redis.from_url(args.redis)
    probe.ping()
    meta = machine_info(probe.info("server"))
    meta.update({"redis url": args.redis, "taskgate": taskgate.__version__, "grpcio": grpc.__version__})
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(POLICY)
    serve = ("--config", f.name, "--redis", args.redis, "--prefix", prefix)
    floor = FloorProcess("--redis", args.redis, "--prefix", prefix).launch()
    one = ServerProcess(*serve).launch()
    two = ServerProcess(*serve, "--workers", "2").launch()
    servers = [floor, one, two]
    floor_pair: list[ServerProcess] = []  # two floor processes on one port: the floor of `--workers 2`
    try:
        _ready(floor, READY)
        if h2load:
            floor_args = ("--redis", args.redis, "--prefix", prefix, "--reuseport")
            for i in range(2):  # the second one on the first one's port
                fp = FloorProcess(*floor_args, listen=floor_pair[0].listen if i else None).launch()
                servers.append(fp)  # (stopped below whatever happens next)
                floor_pair.append(_ready(fp, READY))
        for s in (one, two):
            s.wait_ready()
        print("machine: " + "; ".join(f"{k} {v}" for k, v in meta.items()), flush=True)
        m: list[Measurement] = []
        two_pids = [two.pid, *_worker_pids(two)]

        def add(name: str, srv: ServerProcess, pids: list[int], op: str, c: int, procs: int = 1) -> None:
            m.append(Measurement(name, lambda s: run_clients(srv.target, pids, op, c, procs, s, name)))

        for c in (1, 16, 64):
            add(f"floor check, {c} callers", floor, [floor.pid], "check", c)
            add(f"taskgate check, {c} callers", one, [one.pid], "check", c)
        add(f"taskgate check_many x{MANY}, 16 callers", one, [one.pid], "many", 16)
        add("taskgate --workers 1, 2x32 callers", one, [one.pid], "check", 32, procs=2)
        add("taskgate --workers 2, 2x32 callers", two, two_pids, "check", 32, procs=2)
        if h2load:

            def h2(name: str, srv: ServerProcess, pids: list[int]) -> None:
                m.append(Measurement(name, lambda s: run_h2load(srv.target, pids, s, name)))

            h2(f"taskgate --workers 1, {H2LOAD_LABEL}", one, [one.pid])
            h2(f"taskgate --workers 2, {H2LOAD_LABEL}", two, two_pids)
            h2(f"floor 1 process, {H2LOAD_LABEL}", floor, [floor.pid])
            h2(f"floor 2 processes, {H2LOAD_LABEL}", floor_pair[0], [p.pid for p in floor_pair])

        def progress(msg: str) -> None:
            print(f"  .. {msg}", file=sys.stderr, flush=True)

        sel = run_rounds(m, args.seconds, args.rounds, progress=progress)
    finally:
        for s in servers:
            s.stop()
        os.unlink(f.name)
        deleted = delete_prefix(probe, prefix)
        probe.close()
    print(f"  .. deleted {deleted} leftover keys", file=sys.stderr)

    rows = []
    best: dict[str, ServiceResult] = {k: v for k, v in sel.best.items() if isinstance(v, ServiceResult)}
    for x in m:
        r = best[x.name]
        rate = f"{fmt_rate(r.item_rate)} keys/s" if r.items > 1 else f"{fmt_rate(r.ops)} calls/s"
        cpu = f"{r.server_cpu_us:,.0f}"
        rows.append([x.name, rate, f"{r.p50_us:,.0f}", f"{r.p99_us:,.0f}", cpu, sel.spread(x.name)])
    headers = ["measurement", "rate", "p50 µs", "p99 µs", "server CPU µs/call", "spread"]
    body = [
        f"{args.seconds:g} s per measurement x {args.rounds} rounds (best kept); asyncio client "
        "(AsyncServiceBackend) in separate processes; distinct keys; gcra.\nServer CPU: user+system time of "
        "the server process(es) per call (/proc): a process's capacity whatever else shares the CPUs.",
        "",
        table(headers, rows),
        "",
    ]
    floor_cpu, tg_cpu = (
        best["floor check, 64 callers"].server_cpu_us,
        best["taskgate check, 64 callers"].server_cpu_us,
    )
    ok = True
    for c in (1, 16, 64):
        line, passed = ratio_line(
            f"taskgate / floor, {c} callers",
            sel.best[f"taskgate check, {c} callers"].ops,
            sel.best[f"floor check, {c} callers"].ops,
            FLOOR_TARGET,
        )
        if c == 64:
            ok &= passed
            body.append(line + "   <- the target (per server process, saturated)")
        else:
            body.append(line.replace("PASS", "(info)").replace("MISS", "(info)"))
    client_pair = info_line(
        "--workers 2 / --workers 1, 2x32 callers",
        sel.best["taskgate --workers 2, 2x32 callers"].ops,
        sel.best["taskgate --workers 1, 2x32 callers"].ops,
    )
    if not h2load:
        body.append(client_pair)
        body.append("(info) --workers 2 / --workers 1 with h2load: not measured (no h2load here)")
    else:
        body.append(client_pair + " (client-bound)")
        # the target reads the pairs the way bench/decisions.py reads every ratio: the two sides back to back
        # in each round, the median over the rounds (a best-of-rounds ratio pairs two rounds' outliers)
        ratios = _paired("taskgate --workers 2", "taskgate --workers 1", sel)
        body.append(
            info_line(
                f"--workers 2 / --workers 1, {H2LOAD_LABEL}, median of {len(ratios)} paired rounds",
                statistics.median(ratios),
                1.0,
            )
        )
        body.append(
            f"(info) the rounds' ratios: {_listed(ratios)}; best round / best round: " + _best_ratio(sel)
        )
    if h2load:
        f = _paired("floor 2 processes", "floor 1 process", sel)
        body.append(
            "(info) the same pair for the floor (two bare grpc.aio processes on one port against one): "
            f"median {statistics.median(f):.2f}x, rounds {_listed(f)}"
        )
    body.append(
        f"(info) server CPU per call, 64 callers: floor {floor_cpu:,.0f} µs, taskgate {tg_cpu:,.0f} µs: one "
        f"taskgate process has {floor_cpu / tg_cpu if tg_cpu else 0:.2f}x the floor's capacity"
    )
    body.append(
        f"(info) load average (1 min) {load_before:.2f} before the run, {os.getloadavg()[0]:.2f} after "
        "(the benchmark itself accounts for ~2; more means other work shared the machine)"
    )
    if (os.cpu_count() or 1) < 4:
        body.append(
            f"(note) nproc {os.cpu_count()}: the client processes, the servers and Redis share these CPUs, "
            "so the throughput ratios are bounded by the whole machine, not by the server under test"
        )
    text = "\n".join(body)
    print(text)
    if args.record:
        record("bench/service.py — the gRPC door", text, meta)
        print("appended to bench/RESULTS.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
