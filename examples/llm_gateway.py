# mypy: disallow-untyped-decorators=False
"""An LLM gateway on Celery: per-tenant token budgets, a request rate and an in-flight cap, one declaration.

Summarizes documents for three tenants through a fake LLM client whose token usage is random and which
sometimes answers 429 (the provider is overloaded): the task then reports the slot as dropped (the
adaptive in-flight limit shrinks) and retries itself — taskgate never touches the task's own retries.

Run (embedded store, in-process worker, nothing else needed)::

    python examples/llm_gateway.py
    python examples/llm_gateway.py --redis redis://localhost:6379/0 --broker redis://localhost:6379/1
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from collections import Counter
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker

import taskgate
import taskgate.celery
from taskgate.llm import estimate

POLICIES = """
version: 1
limiters:
  llm:
    strategy: gcra          # requests per second, per tenant
    limit: 20
    period: 1s
    burst: 4
    concurrency: {minLimit: 2, maxLimit: 6, perKey: true}   # in flight per tenant, adaptive
    tokenBudget:
      - {budget: 6000, window: 2s}      # think "100k tokens/minute"
      - {budget: 200000, window: 1d}    # and a daily cap
    accounting: escrow
"""


class ProviderOverloaded(Exception):
    """The fake provider's HTTP 429."""


class FakeLLM:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.lock = threading.Lock()

    def complete(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        with self.lock:
            overloaded = self.rng.random() < 0.05
            latency = self.rng.uniform(0.02, 0.12)
            completion = self.rng.randint(max_tokens // 4, max_tokens)
        time.sleep(latency)
        if overloaded:
            raise ProviderOverloaded("429 Too Many Requests")
        return {
            "text": prompt[:30] + "...",
            "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": completion},
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis", help="taskgate store (default: the embedded memory:// store)")
    ap.add_argument("--broker", default="memory://", help="Celery broker (default: %(default)s)")
    ap.add_argument("--docs", type=int, default=60)
    args = ap.parse_args()

    app = Celery("llm_gateway", broker=args.broker, set_as_current=False)
    app.conf.update(task_ignore_result=True, broker_transport_options={"polling_interval": 0.01})
    taskgate.celery.install(app, args.redis or "memory://llm-gateway", policies=POLICIES)
    llm = FakeLLM(seed=1)
    used: Counter[str] = Counter()
    done: Counter[str] = Counter()
    overloads: Counter[str] = Counter()
    lock = threading.Lock()

    @app.task(
        bind=True,
        name="gateway.summarize",
        throttle="llm",
        key="tenant",
        tokens=lambda document, max_tokens: estimate(f"Summarize:\n{document}", max_tokens),
        max_retries=5,
        shared=False,
    )
    def summarize(self: Any, tenant: str, document: str, max_tokens: int = 200) -> str:
        try:
            out = llm.complete(f"Summarize:\n{document}", max_tokens)
        except ProviderOverloaded as e:
            with lock:
                overloads[tenant] += 1
            taskgate.current().settle(0)  # a 429 used no tokens: refund the reservation
            taskgate.current().release(dropped=True)  # an overload: the adaptive in-flight limit shrinks
            raise self.retry(exc=e, countdown=0.2) from e
        taskgate.current().settle(out["usage"])
        with lock:
            used[tenant] += out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
            done[tenant] += 1
        return str(out["text"])

    tenants = {
        "acme": args.docs // 2,
        "globex": args.docs // 3,
        "initech": args.docs - args.docs // 2 - args.docs // 3,
    }
    t0 = time.monotonic()
    with start_worker(app, pool="threads", concurrency=6, perform_ping_check=False, loglevel="ERROR"):
        for tenant, n in tenants.items():
            for i in range(n):
                summarize.delay(tenant, f"document {i} of {tenant}: " + "lorem ipsum dolor sit amet " * 40)
        while sum(done.values()) < sum(tenants.values()) and time.monotonic() - t0 < 120:
            time.sleep(0.1)
    took = time.monotonic() - t0
    print(f"{sum(done.values())}/{sum(tenants.values())} documents summarized in {took:.1f}s")
    for tenant in tenants:
        print(
            f"  {tenant:8} {done[tenant]:3} docs, {used[tenant]:6} tokens, "
            f"{overloads[tenant]} provider 429s retried"
        )
    return 0 if sum(done.values()) == sum(tenants.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
