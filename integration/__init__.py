"""taskgate's battle test: real Redis, RabbitMQ, a fleet of ``taskgate serve``, real Celery and RQ workers,
and injected faults (``python -m integration.battle``; ``--short`` for CI). See README.md, "Battle test"."""
