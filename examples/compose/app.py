"""The Celery app of the compose stack (``celery -A examples.compose.app worker``)."""

# mypy: disallow-untyped-decorators=False
from __future__ import annotations

import os
import random
import time
from pathlib import Path

from celery import Celery

import taskgate
import taskgate.celery

POLICIES = os.environ.get("TASKGATE_POLICIES", str(Path(__file__).with_name("policies.yaml")))
app = Celery("compose", broker=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/1"))
taskgate.celery.install(app, os.environ.get("TASKGATE_URL", "redis://localhost:6379/0"), policies=POLICIES)


@app.task(throttle="webhooks", key="tenant")
def deliver(tenant: str, event: int) -> int:
    return event


@app.task(throttle="llm", key="tenant", tokens=lambda document: len(document) // 4 + 300)
def summarize(tenant: str, document: str) -> str:
    time.sleep(random.uniform(0.05, 0.3))  # the LLM call
    taskgate.current().settle(len(document) // 4 + random.randint(50, 300))
    return document[:40]
