"""The producer of the compose stack: enqueues a mixed workload every few seconds, forever.

``python -m examples.compose.produce [--once]``
"""

from __future__ import annotations

import argparse
import time

from examples.compose.app import deliver, summarize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--once", action="store_true", help="enqueue one batch and exit")
    args = ap.parse_args()
    n = 0
    while True:
        for tenant in ("acme", "globex"):
            for i in range(10):
                deliver.delay(tenant, n + i)
            for _ in range(5):
                summarize.delay(tenant, "lorem ipsum dolor sit amet " * 50)
        n += 10
        print(f"enqueued batch {n // 10}", flush=True)
        if args.once:
            return
        time.sleep(5)


if __name__ == "__main__":
    main()
