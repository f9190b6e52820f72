"""The token-budget workload shared by tests/test_llm_budgets.py and bench/budgets.py.

A Celery worker (in-process, 4 threads, a Redis broker) runs LLM-like tasks for one tenant against a
per-tenant token budget with a short window; each task's actual usage is random up to its estimate. A
sampler polls the engine's own budget counter, so what is reported is what the engine charged.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

import taskgate
import taskgate.celery
from taskgate.engine.keys import keyset


@dataclass
class BudgetRun:
    mode: str
    budget: int
    window_ms: int
    workers: int
    max_cost: int
    tasks: int
    elapsed_s: float
    charged: dict[int, int]  # window start -> tokens charged at the window's end (engine counter)
    peak: dict[int, int]  # window start -> highest counter seen during the window
    actual: dict[int, int]  # window start -> actual usage of the tasks admitted in it

    @property
    def full_windows(self) -> list[int]:
        ws = sorted(self.charged)
        return ws[1:-1]  # the first and last windows are partial

    @property
    def overshoot(self) -> int:
        return max(0, max(self.peak.values(), default=0) - self.budget)

    @property
    def utilisation(self) -> float:
        ws = self.full_windows
        return min((self.charged[w] / self.budget for w in ws), default=0.0)


def run_workload(
    store: str, mode: str, *, budget: int = 20_000, window_s: int = 3, estimate: int = 400, windows: float = 5.0,
    workers: int = 4, seed: int = 7, broker: str = "redis://127.0.0.1:6379/5",
) -> BudgetRun:  # fmt: skip
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    rng = random.Random(seed)
    prefix = f"tgllm{uuid.uuid4().hex[:8]}"
    policies = {
        "llm": {
            "concurrency": {"maxLimit": workers, "leaseTtl": "10s"},
            "tokenBudget": {"budget": budget, "window": f"{window_s}s"},
            "accounting": mode,
        }
    }
    backend = taskgate.connect(store, policies, prefix=prefix)
    if not isinstance(backend, taskgate.RedisBackend):
        raise TypeError(
            f"the budget workload reads the engine's counters: it needs a Redis store, not {store}"
        )
    app = Celery(f"llm-{prefix}", broker=broker, set_as_current=False)
    app.conf.update(
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        task_default_queue=f"q-{prefix}",
        broker_transport_options={"polling_interval": 0.01},
    )
    taskgate.celery.install(app, backend, short_wait_ms=0)
    mean_actual = (estimate // 4 + estimate) / 2
    n = int(windows * budget / mean_actual)
    lock = threading.Lock()
    done = [0]
    actual: dict[int, int] = defaultdict(int)
    window_ms = window_s * 1000

    @app.task(name=f"llm.call.{prefix}", throttle="llm", key="tenant", tokens=estimate, shared=False)
    def call(tenant: str) -> int:
        started = int(time.time() * 1000)
        time.sleep(rng.uniform(0.01, 0.05))
        used = rng.randint(estimate // 4, estimate)
        taskgate.current().settle(used)
        with lock:
            actual[started - started % window_ms] += used
            done[0] += 1
        return used

    key = keyset(prefix, backend.policy("llm"), "t").budget(0)
    charged: dict[int, int] = {}
    peak: dict[int, int] = defaultdict(int)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            s, c = backend.client.hmget(key, "s", "c")
            if s is not None and c is not None:
                w, v = int(s), int(c)
                charged[w] = v
                peak[w] = max(peak[w], v)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    t0 = time.monotonic()
    with start_worker(app, pool="threads", concurrency=workers, perform_ping_check=False, loglevel="ERROR"):
        sampler.start()
        for _ in range(n):
            call.apply_async(args=("t",))
        while done[0] < n and time.monotonic() - t0 < 120:
            time.sleep(0.05)
        stop.set()
        sampler.join()
    backend.close()
    return BudgetRun(
        mode, budget, window_ms, workers, estimate, done[0], time.monotonic() - t0, charged, peak, actual
    )
