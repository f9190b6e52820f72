"""The battle test: ``python -m integration.battle`` (about 7 minutes) or ``--short`` (about 2, for CI).

Starts, all on loopback: a store Redis of its own (RDB in a temp dir, restarted mid-run), a private Redis
(Celery broker of app B, RQ queues, the execution records; never restarted), three ``taskgate serve`` over
the store, four Celery workers (app A on RabbitMQ with the direct door, app B on the private Redis with the
service door), two RQ workers (direct door). Producers drive a mixed workload on every axis while faults
are injected: a Celery pool child and an RQ horse SIGKILLed while holding a slot, a ``taskgate serve``
SIGKILLed and restarted on its port, the store restarted (script cache emptied, state kept) and stopped
(SIGSTOP) for a few seconds, a Celery worker paused past its lease TTL. Then every check in
:mod:`integration.checks` runs; exit status 0 only if all hold. Logs: ``integration/logs/<run>/``.
Every process is stopped by PID (try/finally, atexit, SIGTERM/SIGHUP handlers), never by name.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any
from urllib.parse import urlsplit

import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry

import taskgate
from integration import checks, procs, room_phase
from integration.checks import Check, Evidence, Execution, Kill, Outage, Pause
from integration.procs import Proc, RedisServer, ServeProc
from taskgate.engine.keys import keyset
from taskgate.errors import TaskgateError
from taskgate.types import LeaseRef
from tests.fleet import CELERY_READY, RQ_READY, Starting, celery_argv, log_has, rq_argv, wait_ready

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "integration" / "logs"
AMQP_URL = os.environ.get("TASKGATE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
CLIENT_TIMEOUT_S = 0.5  # the doors' socket timeouts: a stopped store is noticed fast, fail modes apply
RECLAIMED_WARNING = "was reclaimed (missed heartbeats)"


@dataclass(frozen=True)
class Plan:
    name: str
    duration_s: float  # how long the producers run
    faults: tuple[tuple[float, str], ...]  # (seconds after the start, fault)
    victim_secs: float  # body of the tasks killed or paused while holding a slot
    pause_secs: float  # a Celery worker paused this long (> lease TTL)
    stop_secs: float  # the store stopped this long
    serve_down_s: float  # a taskgate serve down this long before its restart
    drain_timeout_s: float
    load: float  # multiplier of the offered load


FULL = Plan(
    "full",
    duration_s=300,
    faults=(
        (25, "celery_kill"),
        (55, "rq_kill"),
        (95, "serve_kill"),
        (140, "store_restart"),
        (185, "store_stop"),
        (235, "worker_pause"),
    ),
    victim_secs=4.0,
    pause_secs=6.0,
    stop_secs=5.0,
    serve_down_s=4.0,
    drain_timeout_s=240,
    load=1.0,
)
SHORT = Plan(
    "short",
    duration_s=75,
    faults=(
        (6, "celery_kill"),
        (13, "rq_kill"),
        (22, "serve_kill"),
        (34, "store_restart"),
        (45, "store_stop"),
        (58, "worker_pause"),
    ),
    victim_secs=3.0,
    pause_secs=6.0,
    stop_secs=5.0,
    serve_down_s=3.0,
    drain_timeout_s=120,
    load=0.8,
)

# Offered load, tasks/s per policy and tenant: (hot, calm). A 10 s cycle, hot for its first half: the hot
# tenant goes over its limits, the calm half lets the backlog drain.
OFFERED: dict[str, dict[str, tuple[float, float]]] = {
    "rate": {"t1": (8.0, 2.0), "t2": (2.0, 2.0), "t3": (1.0, 1.0)},
    "conc": {"t1": (3.0, 1.0), "t2": (1.0, 0.5), "t3": (0.5, 0.5)},
    "budget": {"t1": (6.0, 1.0), "t2": (1.0, 1.0), "t3": (0.5, 0.5)},
    "unified": {"t1": (3.0, 0.5), "t2": (0.7, 0.7), "t3": (0.3, 0.3)},
    "open_rate": {"t1": (4.0, 2.0), "t2": (1.0, 1.0)},
    "closed_rate": {"t1": (4.0, 2.0), "t2": (1.0, 1.0)},
}
DOORS = (("A", 0.4), ("B", 0.35), ("R", 0.25))

# One atomic look at the store (its own clock): live leases per lease set, then (window start, charged) per
# budget. ARGV[1] = how many of KEYS are lease sets.
SAMPLE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS do
  if i <= tonumber(ARGV[1]) then
    out[#out + 1] = redis.call('ZCOUNT', KEYS[i], '(' .. now, '+inf')
  else
    local v = redis.call('HMGET', KEYS[i], 's', 'c')
    out[#out + 1] = (v[1] or '') .. ':' .. (v[2] or '')
  end
end
return out
"""
# A lease's expiry (or -1 when it is gone) and the store's clock, ms
LEASE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local e = redis.call('ZSCORE', KEYS[1], ARGV[1])
return {tonumber(e or -1), now}
"""


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    limit, k, p = pow(2.718281828459045, -lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}{' + uncommitted changes' if dirty else ''}"


class Records:
    """The execution records in the private Redis, read incrementally."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self.starts: list[dict[str, Any]] = []
        self.ends: list[dict[str, Any]] = []
        self.ended_ids: set[str] = set()

    def poll(self) -> None:
        for kind, into in (("start", self.starts), ("end", self.ends)):
            raw = self.r.lrange(f"battle:{kind}", len(into), -1)
            for item in raw:
                rec = json.loads(item)
                into.append(rec)
                if kind == "end":
                    self.ended_ids.add(rec["id"])

    def failures(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.r.lrange("battle:failure", 0, -1)]

    def wait(self, what: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            got = what()
            if got:
                return got
            if time.monotonic() > deadline:
                return None
            time.sleep(step)

    def start_of(self, ident: str) -> dict[str, Any] | None:
        return next((s for s in self.starts if s["id"] == ident), None)


class Battle:
    def __init__(self, plan: Plan, logdir: Path, seed: int) -> None:
        self.plan = plan
        self.logdir = logdir
        self.rng = random.Random(seed)
        self.seed = seed
        self.run = f"{dt.datetime.now():%H%M%S}{os.getpid() % 1000:03d}"
        self.tmp = Path(tempfile.mkdtemp(prefix="taskgate-battle-"))
        self.t0 = time.time()
        self.enqueued: list[dict[str, Any]] = []
        self.kills: list[Kill] = []
        self.pauses: list[Pause] = []
        self.outages: list[Outage] = []
        self.store_stop: Outage | None = None
        self.store_restart: dict[str, Any] = {}
        self.serve_kill: dict[str, Any] = {}
        self.fault_errors: list[str] = []
        self.fault_log: list[str] = []
        self.sampled_leases: dict[str, int] = {}
        self.sampled_budgets: dict[str, int] = {}
        self.probe_log: list[tuple[float, int, bool]] = []
        self.stop = threading.Event()
        self.producing = threading.Event()
        self.enqueue_lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.celery_a: list[Proc] = []
        self.celery_b: list[Proc] = []
        self.rq: list[Proc] = []
        self.servers: list[ServeProc] = []
        self.wl: ModuleType | None = None

    # -- setup ---------------------------------------------------------------------------------------------

    def say(self, msg: str) -> None:
        line = f"[battle {time.time() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        with contextlib.suppress(OSError), (self.logdir / "battle.log").open("a") as f:
            f.write(line + "\n")

    def setup(self) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        amqp = urlsplit(AMQP_URL)
        try:
            socket.create_connection((amqp.hostname or "127.0.0.1", amqp.port or 5672), timeout=2).close()
        except OSError as e:
            raise RuntimeError(
                f"RabbitMQ is not reachable at {amqp.hostname}:{amqp.port or 5672}: {e}"
            ) from e
        self.store = RedisServer("store", self.tmp, self.logdir / "redis-store.log").start()
        self.private = RedisServer("private", self.tmp, self.logdir / "redis-private.log").start()
        self.say(
            f"store Redis on :{self.store.port} (pid {self.store.pid}), private Redis on :{self.private.port}"
        )
        store_url = self.store.url(
            0, f"socket_timeout={CLIENT_TIMEOUT_S}&socket_connect_timeout={CLIENT_TIMEOUT_S}"
        )
        env_common = {
            "TGB_RUN": self.run,
            "TGB_RECORD": self.private.url(0),
            "TGB_STORE": store_url,
            "TGB_BROKER_A": AMQP_URL,
            "TGB_BROKER_B": self.private.url(1),
            "TASKGATE_URL": store_url,
        }
        os.environ.update(env_common)
        wl = self.wl = importlib.import_module("integration.workload")
        policy_file = self.logdir / "policies.yaml"
        policy_file.write_text(yaml.safe_dump({"version": 1, "limiters": wl.POLICIES}, sort_keys=False))
        os.environ["TASKGATE_POLICIES"] = str(policy_file)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TASKGATE_POLICIES": str(policy_file)}
        for i in range(3):
            args = ["--redis", self.store.url(0), "--config", str(policy_file), "--store-timeout", "0.5"]
            self.servers.append(ServeProc(f"serve{i}", args, self.logdir / f"serve{i}.log", env).launch())
        for s in self.servers:
            s.wait_ready()
        self.say("3 x taskgate serve: " + ", ".join(s.url for s in self.servers))
        for i in range(2):
            self.celery_a.append(self._celery("A", i, {**env, "TGB_SERVICE": "memory://"}))
            self.celery_b.append(self._celery("B", i, {**env, "TGB_SERVICE": self.servers[i].url}))
        for i in range(2):
            name = f"rq{i}"
            cmd = rq_argv(
                wl.QUEUE_R, self.private.url(2), f"{name}-{self.run}", worker_class="taskgate.rq.Worker"
            )
            self.rq.append(Proc(name, cmd, self.logdir / f"{name}.log", env).start())
        self._wait_ready()
        self.rec = Records(self.private.client(10.0))
        self.rq_conn = redis.Redis.from_url(self.private.url(2))
        from rq import Queue

        self.rq_queue = Queue(wl.QUEUE_R, connection=self.rq_conn)
        self.direct = taskgate.connect(store_url, wl.POLICIES)
        self.say(
            f"4 Celery workers (A: RabbitMQ {wl.QUEUE_A}, direct door; B: Redis broker, service door), "
            f"2 RQ workers ({wl.QUEUE_R}, direct door): ready"
        )

    def _celery(self, app: str, i: int, env: dict[str, str]) -> Proc:
        assert self.wl is not None
        name = f"celery-{app.lower()}{i}"
        queue = self.wl.QUEUE_A if app == "A" else self.wl.QUEUE_B
        node = f"{app.lower()}{i}-{self.run}@%h"
        cmd = celery_argv(f"integration.workload:app_{app.lower()}", node, concurrency=2, queues=[queue])
        return Proc(name, cmd, self.logdir / f"{name}.log", env).start()

    def _wait_ready(self) -> None:
        starting = [
            Starting(p.name, p.log, log_has(p.log, RQ_READY if p in self.rq else CELERY_READY), p.alive)
            for p in self.celery_a + self.celery_b + self.rq
        ]
        wait_ready(starting, 90)

    # -- the workload --------------------------------------------------------------------------------------

    def enqueue(
        self, kind: str, tenant: str, door: str | None = None, args: tuple[Any, ...] | None = None
    ) -> str:
        wl = self.wl
        assert wl is not None
        if door is None:
            door = self.rng.choices([d for d, _ in DOORS], [w for _, w in DOORS])[0]
        if args is None:
            args = self._args(kind, tenant)
        from rq import Retry

        with self.enqueue_lock:
            if door == "R":
                job = self.rq_queue.enqueue(
                    wl.RQ_JOBS[kind], *args, retry=Retry(max=1), job_timeout=300, failure_ttl=86400
                )
                ident = str(job.id)
            else:
                tasks = wl.TASKS_A if door == "A" else wl.TASKS_B
                ident = str(tasks[kind].apply_async(args=args).id)
            self.enqueued.append(
                {
                    "id": ident,
                    "door": door,
                    "task": kind,
                    "policy": "conc" if kind == "victim" else kind,
                    "tenant": tenant,
                    "t": time.time(),
                }
            )
        return ident

    def _args(self, kind: str, tenant: str) -> tuple[Any, ...]:
        """A task's arguments: bodies of 0.2-1 s (conc) and 0.2-0.5 s (unified); 300 tokens estimated, less
        used (so escrow refunds; an actual above the estimate would be charged post hoc)."""
        r = self.rng
        if kind == "conc":
            return (tenant, round(r.uniform(0.2, 1.0), 2))
        if kind == "budget":
            return (tenant, 300, r.randint(100, 300))
        if kind == "unified":
            return (tenant, round(r.uniform(0.2, 0.5), 2), 300, r.randint(150, 300))
        return (tenant, r.randint(0, 10**6))  # rate, open_rate, closed_rate

    def _producer(self) -> None:
        tick = 0.1
        began = time.monotonic()
        nxt = began
        while not self.stop.is_set():
            elapsed = time.monotonic() - began
            if elapsed >= self.plan.duration_s:
                break
            hot = (elapsed % 10.0) < 5.0
            for kind, tenants in OFFERED.items():
                for tenant, (h, c) in tenants.items():
                    for _ in range(_poisson(self.rng, (h if hot else c) * self.plan.load * tick)):
                        try:
                            self.enqueue(kind, tenant)
                        except Exception as e:  # a broker hiccup must not stop the producer
                            self.say(f"producer: enqueue failed: {e!r}")
            nxt += tick
            time.sleep(max(0.0, nxt - time.monotonic()))
        self.producing.clear()

    def _sampler(self) -> None:
        wl = self.wl
        assert wl is not None
        lease_sets = [("conc:*", keyset(wl.PREFIX, wl.LOADED["conc"], "*").leases)]
        lease_sets += [
            (f"unified:{t}", keyset(wl.PREFIX, wl.LOADED["unified"], t).leases) for t in wl.TENANTS
        ]
        budgets = [(f"{p}:{t}", keyset(wl.PREFIX, wl.LOADED[p], t).budget(0)) for p in ("budget", "unified")
                   for t in wl.TENANTS]  # fmt: skip
        keys = [k for _, k in lease_sets] + [k for _, k in budgets]
        c = redis.Redis(
            host="127.0.0.1",
            port=self.store.port,
            socket_timeout=0.3,
            socket_connect_timeout=0.3,
            retry=RedisRetry(NoBackoff(), 0),
        )
        while not self.stop.is_set():
            try:
                out = c.eval(SAMPLE_LUA, len(keys), *keys, len(lease_sets))
            except (redis.RedisError, OSError):
                time.sleep(0.05)
                continue
            for (name, _), n in zip(lease_sets, out[: len(lease_sets)], strict=True):
                self.sampled_leases[name] = max(self.sampled_leases.get(name, 0), int(n))
            for (name, _), raw in zip(budgets, out[len(lease_sets) :], strict=True):
                s, _, charged = (raw.decode() if isinstance(raw, bytes) else str(raw)).partition(":")
                if s and charged:
                    k = f"{name}:{s}"
                    self.sampled_budgets[k] = max(self.sampled_budgets.get(k, 0), int(float(charged)))
            time.sleep(0.05)

    def _prober(self) -> None:
        assert self.wl is not None
        backends = [taskgate.connect(s.url, self.wl.POLICIES, timeout=0.5, retries=1) for s in self.servers]
        while not self.stop.is_set():
            for i, b in enumerate(backends):
                try:
                    b.peek("probe", "p")
                    ok = True
                except TaskgateError:
                    ok = False
                self.probe_log.append((time.time(), i, ok))
            time.sleep(0.25)

    # -- faults --------------------------------------------------------------------------------------------

    def _note(self, msg: str) -> None:
        self.fault_log.append(f"t+{time.time() - self.t0:.1f}s {msg}")
        self.say(msg)

    def _lease_where(self, lease_id: str) -> tuple[str, str]:
        assert self.wl is not None
        ref = LeaseRef.parse(lease_id)
        return keyset(self.wl.PREFIX, self.wl.LOADED[ref.policy], ref.key).leases, ref.member

    def _lease_state(self, key: str, member: str) -> tuple[float, float]:
        """(expiry ms or -1, store clock ms)."""
        e, now = self.store.client(1.0).eval(LEASE_LUA, 1, key, member)
        return float(e), float(now)

    def _wait_lease_gone(self, key: str, member: str, since: float, timeout: float) -> float | None:
        """Seconds after ``since`` when the lease stopped counting (expired or removed); None if not."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                e, now = self._lease_state(key, member)
            except (redis.RedisError, OSError):
                time.sleep(0.02)
                continue
            if e < 0 or e <= now:
                return now / 1000.0 - since
            time.sleep(0.02)
        return None

    def _victim_start(self, ident: str) -> dict[str, Any]:
        st = self.rec.wait(lambda: self.rec.start_of(ident), timeout=60)
        if st is None:
            raise RuntimeError(f"victim {ident} did not start within 60 s")
        assert isinstance(st, dict)
        return st

    def _kill_holder(self, kind: str, owners: list[Proc], door: str) -> None:
        ident = self.enqueue("victim", "t1", door=door, args=("t1", self.plan.victim_secs, False))
        st = self._victim_start(ident)
        pid = int(st["pid"])
        if not any(w.owns(pid) for w in owners):
            raise RuntimeError(f"{kind}: pid {pid} is not a process this battle started")
        if not st["leases"]:
            raise RuntimeError(f"{kind}: victim {ident} holds no lease")
        lease = st["leases"][0]
        key, member = self._lease_where(lease)
        time.sleep(max(0.0, float(st["t"]) + 1.3 - time.time()))  # past a heartbeat
        expiry, now = self._lease_state(key, member)
        at = time.time()
        os.kill(pid, signal.SIGKILL)
        left = (expiry - now) / 1000.0 if expiry > 0 else None
        freed = self._wait_lease_gone(key, member, at, timeout=self.plan.pause_secs + 5)
        self.kills.append(Kill(kind, ident, pid, at, lease, left, freed))
        self._note(
            f"SIGKILL {kind} pid {pid} holding a 'conc' slot (task {ident}); its lease stopped counting "
            + (f"{freed:.2f}s later" if freed is not None else "NEVER")
        )

    def fault_celery_kill(self) -> None:
        self._kill_holder("Celery pool child", self.celery_b, "B")

    def fault_rq_kill(self) -> None:
        self._kill_holder("RQ horse", self.rq, "R")

    def fault_serve_kill(self) -> None:
        srv = self.servers[0]
        killed = time.time()
        srv.kill()
        self._note(f"SIGKILL taskgate serve {srv.name} ({srv.url}, used by celery-b0)")
        time.sleep(self.plan.serve_down_s)
        srv.restart()
        up = time.time()
        self._note(f"restarted {srv.name} on the same port ({srv.url}), as a supervisor would")
        # door B's clients reconnect with a backoff of at most 5 s: fail-open decisions until then
        self.outages.append(Outage(f"{srv.name} down", killed, up + 5.0, frozenset({"B"})))
        self.serve_kill = {"name": srv.name, "killed": killed, "up": up}

    def fault_store_restart(self) -> None:
        c = self.store.client()
        first = self.direct.check("sentinel", "restart")
        second = self.direct.check("sentinel", "restart")
        keys_before = int(c.dbsize())
        down, up = self.store.restart()
        self.outages.append(Outage("store restart", down, up))
        self._note(f"restarted the store Redis (SHUTDOWN SAVE, down {up - down:.2f}s, same port, RDB kept)")
        time.sleep(3.0)
        c = self.store.client()
        stats = c.info("errorstats")
        noscript = int(stats.get("errorstat_NOSCRIPT", {}).get("count", 0))
        keys_after = int(c.dbsize())
        kept = not self.direct.check("sentinel", "restart").allowed
        self.store_restart = {
            "down": down,
            "up": up,
            "keys_before": keys_before,
            "keys_after": keys_after,
            "noscript": noscript,
            "sentinel_kept": kept and first.allowed and not second.allowed,
        }

    def fault_store_stop(self) -> None:
        t0 = time.time()
        self.store.pause()
        try:
            self._note(f"SIGSTOP the store Redis for {self.plan.stop_secs:.0f}s")
            time.sleep(self.plan.stop_secs)
        finally:
            self.store.resume()
        t1 = time.time()
        self._note("SIGCONT the store Redis")
        self.store_stop = Outage("store stopped", t0, t1)
        self.outages.append(self.store_stop)

    def fault_worker_pause(self) -> None:
        ident = self.enqueue("victim", "t2", door="A", args=("t2", self.plan.victim_secs, True))
        st = self._victim_start(ident)
        pid = int(st["pid"])
        worker = next((w for w in self.celery_a if w.owns(pid)), None)
        if worker is None:
            raise RuntimeError(f"pause: pid {pid} is not a process this battle started")
        lease = st["leases"][0]
        key, member = self._lease_where(lease)
        time.sleep(max(0.0, float(st["t"]) + 0.5 - time.time()))
        warnings_before = worker.log_text().count(RECLAIMED_WARNING)
        tree = worker.tree()
        at = time.time()
        for p, started in tree:
            procs._signal(p, signal.SIGSTOP, started)
        try:
            pids = [p for p, _ in tree]
            self._note(f"SIGSTOP Celery worker {worker.name} (pids {pids}) for {self.plan.pause_secs:.0f}s")
            freed = self._wait_lease_gone(key, member, at, timeout=self.plan.pause_secs - 0.3)
            time.sleep(max(0.0, at + self.plan.pause_secs - time.time()))
        finally:
            for p, started in tree:
                procs._signal(p, signal.SIGCONT, started)
        until = time.time()
        gone = f"{freed:.2f}s after SIGSTOP" if freed is not None else "NOT (still live)"
        self._note(f"SIGCONT {worker.name}; its lease had stopped counting {gone}")
        self.rec.wait(lambda: ident in self.rec.ended_ids, timeout=30)
        time.sleep(1.0)
        seen = worker.log_text().count(RECLAIMED_WARNING) > warnings_before
        self.pauses.append(Pause(worker.name, [p for p, _ in tree], at, until, ident, lease, freed, seen))

    # -- the run -------------------------------------------------------------------------------------------

    def execute(self) -> None:
        self.t0 = time.time()
        self.producing.set()
        for target in (self._producer, self._sampler, self._prober):
            t = threading.Thread(target=target, name=target.__name__, daemon=True)
            t.start()
            self.threads.append(t)
        self.say(f"workload started ({self.plan.name}: {self.plan.duration_s:.0f}s of producers)")
        for at, name in self.plan.faults:
            time.sleep(max(0.0, self.t0 + at - time.time()))
            try:
                getattr(self, f"fault_{name}")()
            except Exception as e:
                self.fault_errors.append(f"{name}: {type(e).__name__}: {e}")
                self.say(f"fault {name} FAILED: {e!r}")
        while self.producing.is_set():
            time.sleep(0.2)
        self.say(f"producers done: {len(self.enqueued)} tasks enqueued; draining")
        deadline = time.monotonic() + self.plan.drain_timeout_s
        last = -1
        while time.monotonic() < deadline:
            self.rec.poll()
            left = {e["id"] for e in self.enqueued} - self.rec.ended_ids
            if not left:
                break
            if len(left) != last and (last < 0 or len(left) % 25 == 0 or len(left) < 10):
                self.say(f"{len(left)} task(s) still to complete")
            last = len(left)
            time.sleep(0.5)
        time.sleep(3.0)  # anything run twice would show up by now
        self.stop.set()
        for t in self.threads:
            t.join(5)

    def evidence(self) -> Evidence:
        assert self.wl is not None
        self.rec.poll()
        ends = {e["ex"]: e for e in self.rec.ends}
        executions = [Execution.from_records(s, ends.get(s["ex"])) for s in self.rec.starts]
        for k in self.kills:
            for x in executions:
                if x.pid == k.pid and x.end is None and x.start <= k.at:
                    x.killed_at = k.at
        for p in self.pauses:
            for x in executions:
                if x.pid in p.pids and x.start <= p.at and (x.end is None or x.end > p.at):
                    x.paused_at = p.at
        if self.serve_kill:
            s = self.serve_kill
            downs = [t for t, i, ok in self.probe_log if i == 0 and not ok and t >= s["killed"]]
            ups = [t for t, i, ok in self.probe_log if i == 0 and ok and t >= s["up"]]
            s["seen_down"] = bool(downs)
            s["seen_up_again"] = bool(ups)
            s["back_after"] = round(ups[0] - s["killed"], 2) if ups else None
        return Evidence(
            variant=self.plan.name,
            policies=self.wl.LOADED,
            lease_ttl_s=self.wl.LEASE_TTL_S,
            enqueued=self.enqueued,
            executions=executions,
            failures=self.rec.failures(),
            kills=self.kills,
            pauses=self.pauses,
            outages=self.outages,
            store_stop=self.store_stop,
            store_restart=self.store_restart,
            serve_kill=self.serve_kill,
            sampled_leases=self.sampled_leases,
            sampled_budgets=self.sampled_budgets,
            fault_errors=self.fault_errors,
            started_at=self.t0,
            ended_at=time.time(),
        )

    def dump(self, ev: Evidence) -> None:
        with (self.logdir / "records.jsonl").open("w") as f:
            for kind, items in (
                ("enqueued", self.enqueued),
                ("start", self.rec.starts),
                ("end", self.rec.ends),
            ):
                for item in items:
                    f.write(json.dumps({"kind": kind, **item}) + "\n")

    def teardown(self) -> None:
        self.stop.set()
        with contextlib.suppress(Exception):
            if self.store.paused:
                self.store.resume()
        procs.stop_all()
        if self.wl is not None:  # the run's RabbitMQ queue and exchange
            with contextlib.suppress(Exception), self.wl.app_a.connection_for_write() as conn:
                ch = conn.default_channel
                ch.queue_delete(self.wl.QUEUE_A)
                ch.exchange_delete(self.wl.QUEUE_A)
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- the report ----------------------------------------------------------------------------------------------


def report(plan: Plan, battle: Battle, checks_: list[Check], fig: dict[str, Any], markdown: bool) -> str:
    ok = all(c.ok for c in checks_)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    h = "## " if markdown else ""
    b = "- " if markdown else "  "
    grace = os.environ.get("TGB_BOOKING_GRACE", "default")
    r, inf, bud = fig["rates"], fig["inflight"], fig["budgets"]
    rates = ", ".join(
        f"{k} max {v['max']} in 1 s vs limit {v['limit']} + burst {v['burst']}"
        for k, v in r.items()
        if isinstance(v, dict) and "max" in v
    )
    inflight = ", ".join(
        f"{k} {v['max']}/{v['limit']} (live leases sampled {v['sampled']})" for k, v in inf.items()
    )
    budgets = ", ".join(
        f"{k} most charged {v['max']}/{v['budget']} per window over {v['windows']} windows"
        for k, v in bud.items()
    )
    reclaim = ", ".join(f"{k} {v:.2f}s" if v is not None else f"{k} never" for k, v in fig["reclaim"].items())
    logs = battle.logdir.relative_to(ROOT) if battle.logdir.is_relative_to(ROOT) else battle.logdir
    lines = [
        f"{'# ' if markdown else ''}taskgate battle test ({plan.name}): {'PASS' if ok else 'FAIL'}",
        "",
        f"{b}date: {when}; commit: {git_commit()}; seed {battle.seed}; {fig['wall_s']}s of workload + drain; "
        "bookingGrace of the rate policies: "
        + ("taskgate default (one emission interval, >= 100 ms)" if grace == "default" else grace),
        f"{b}fleet: store Redis (RDB, restarted mid-run), private Redis (broker B, RQ, records), "
        "3 x taskgate serve, Celery app A (RabbitMQ, direct door) x 2 workers, app B (Redis broker, "
        "service door) x 2 workers, all -c 2 prefork, acks_late + reject_on_worker_lost; 2 RQ workers "
        "(taskgate.rq.Worker, --with-scheduler, direct door)",
        f"{b}tasks: {fig['enqueued']} enqueued (by door {fig['by_door']}; by policy {fig['by_policy']}); "
        f"{fig['executions']} executions; {fig['deferrals']} deferrals before admission; "
        f"lost = {fig['lost']}; run twice = {fig['redelivered']} (kill victims, redelivered)",
        f"{b}rate overshoot = {r['overshoot']} ({rates})",
        f"{b}max in-flight vs limit: {inflight}",
        f"{b}budgets (escrow): {budgets}",
        f"{b}reclaim latency (lease TTL 3 s): {reclaim}",
        "",
        f"{h}Faults injected",
        *[f"{b}{f}" for f in battle.fault_log],
        *[f"{b}FAILED to inject: {e}" for e in battle.fault_errors],
        "",
        f"{h}Checks",
    ]
    for c in checks_:
        lines.append(f"{b}{'PASS' if c.ok else 'FAIL'} {c.name}" + (f": {c.summary}" if c.summary else ""))
        lines += [f"{'  - ' if markdown else '      '}{d}" for d in c.details]
    lines += [
        "",
        f"RESULT: {'PASS' if ok else 'FAIL'} ({sum(c.ok for c in checks_)}/{len(checks_)} checks hold); "
        f"logs in {logs}",
    ]
    return "\n".join(lines) + "\n"


def _prune(keep: int = 10) -> None:
    if not LOGS.is_dir():
        return
    runs = sorted((p for p in LOGS.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in runs[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m integration.battle", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--short", action="store_true", help="the CI variant: ~2 minutes, the same faults and checks"
    )
    ap.add_argument("--seed", type=int, default=None, help="the workload's random seed")
    ap.add_argument(
        "--booking-grace",
        default="default",
        help="bookingGrace of the rate policies (e.g. 300ms); 'default' keeps taskgate's default",
    )
    ap.add_argument("--summary-md", type=Path, default=None, help="also write the summary as Markdown here")
    ap.add_argument("--no-room", action="store_true", help="skip the waiting-room phase")
    args = ap.parse_args(argv)
    plan = SHORT if args.short else FULL
    seed = args.seed if args.seed is not None else random.SystemRandom().randint(1, 10**6)
    _prune()
    logdir = LOGS / f"{dt.datetime.now():%Y%m%d-%H%M%S}-{plan.name}"
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)
    os.environ["TGB_BOOKING_GRACE"] = args.booking_grace
    battle = Battle(plan, logdir, seed)
    ok = False
    try:
        battle.setup()
        battle.execute()
        ev = battle.evidence()
        results, fig = checks.evaluate(ev)
        if not args.no_room:  # the waiting room's phase, on its own store with AOF
            room_checks, room_faults = room_phase.run(
                room_phase.SHORT if args.short else room_phase.FULL, battle.tmp, logdir, battle.say
            )
            results += room_checks
            battle.fault_log += room_faults
        battle.dump(ev)
        text = report(plan, battle, results, fig, markdown=False)
        (logdir / "summary.txt").write_text(text)
        md = report(plan, battle, results, fig, markdown=True)
        (logdir / "summary.md").write_text(md)
        if args.summary_md is not None:
            args.summary_md.write_text(md)
        print(text, flush=True)
        ok = all(c.ok for c in results)
    finally:
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        battle.say("stopping every process (by PID)")
        battle.teardown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
