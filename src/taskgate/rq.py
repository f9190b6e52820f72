"""RQ integration (public names): ``@taskgate.rq.throttled("llm", key=...)`` jobs, and
``rq worker --worker-class taskgate.rq.Worker --job-class taskgate.rq.Job --with-scheduler``. The code and
how it works: :mod:`taskgate.integrations.rq`."""

from __future__ import annotations

from taskgate.integrations.rq import (
    ATTR,
    META,
    META_STATE,
    Job,
    SimpleWorker,
    Worker,
    configure,
    options,
    options_of,
    throttled,
)

__all__ = [
    "ATTR",
    "META",
    "META_STATE",
    "Job",
    "SimpleWorker",
    "Worker",
    "configure",
    "options",
    "options_of",
    "throttled",
]
