"""The asyncio door: the same decisions, awaited (e.g. in an async producer or a web handler).

Run::

    python examples/async_client.py
    python examples/async_client.py --url redis://localhost:6379/0
"""

from __future__ import annotations

import argparse
import asyncio

import taskgate

POLICIES = """
limiters:
  search: {strategy: slidingWindow, limit: 10, windowMs: 1s, buckets: 10}
  llm: {concurrency: {maxLimit: 2}, tokenBudget: {budget: 5000, window: 1m}}
"""


async def main(url: str) -> int:
    backend = taskgate.connect_async(url, POLICIES)
    try:
        decisions = [await backend.check("search", "user-1") for _ in range(12)]
        print(
            "search:",
            "".join("+" if d.allowed else "-" for d in decisions),
            f"retry in {decisions[-1].retry_after_ms} ms",
        )

        async def call(i: int) -> str:
            adm = await backend.admit("llm", "tenant", tokens=800)
            if not adm.allowed:
                return f"call {i}: wait {adm.retry_after_ms} ms ({adm.binding_axis})"
            async with adm:
                await asyncio.sleep(0.05)  # the LLM call
                await adm.settle(300)
            return f"call {i}: ok"

        for line in await asyncio.gather(*(call(i) for i in range(4))):
            print(line)
        many = await backend.check_many("search", [f"user-{i}" for i in range(5)])
        print("check_many:", [d.remaining for d in many])
    finally:
        await backend.aclose()
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="memory://async-example")
    raise SystemExit(asyncio.run(main(ap.parse_args().url)))
