"""Queue integrations: the worker side of taskgate, for Celery and RQ.

- :mod:`.options`: a task's throttle options, validated when the task is declared.
- :mod:`._gate`: one decision per task attempt across all of its policies (admitted or deferred), and the
  deferral state that travels with a deferred task.
- :mod:`._runtime`: per Celery app or RQ worker, the backend of this process (made lazily, again after a
  fork), the gate, the settings, and what a task does once its deferrals are used up.
- :mod:`.celery` and :mod:`.rq` (a package): each queue's hooks. Their public names are re-exported by
  :mod:`taskgate.celery` and :mod:`taskgate.rq`.
"""
