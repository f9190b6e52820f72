"""Queue integrations (Celery: :mod:`taskgate.celery`, RQ: :mod:`taskgate.rq`) over one shared gate."""
