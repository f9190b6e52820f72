"""Celery integration (public names): ``taskgate.celery.install(app, url, policies=...)``, then
``@app.task(throttle="llm", key=...)``. The code and how it works: :mod:`taskgate.integrations.celery`."""

from __future__ import annotations

from taskgate.integrations.celery import (
    HEADER,
    ThrottledTask,
    configure,
    install,
    options_of,
    runtime,
    task_admitted,
    task_throttled,
)

__all__ = [
    "HEADER",
    "ThrottledTask",
    "configure",
    "install",
    "options_of",
    "runtime",
    "task_admitted",
    "task_throttled",
]
