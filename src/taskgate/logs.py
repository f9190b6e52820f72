"""The ``taskgate`` logger, and keys in what it (or an error message that may end up in a log) says.

Throttle keys are often personal data (a user id, an e-mail address, a tenant's name), so taskgate's log
lines and error messages never show one unless asked: ``TASKGATE_LOG_KEYS=1`` in the environment, or
``taskgate.log_keys(True)``. Otherwise :func:`key_text` gives a short digest in its place (the same key gives
the same digest, so lines about one key can still be told apart and matched)::

    taskgate: ... key <key #1f0c9a2e> ...      # default
    taskgate: ... key 'alice@example.com' ...  # TASKGATE_LOG_KEYS=1

Operator tools that exist to show keys (``taskgate top``, ``peek``, the Monitor door) are not logs and show
them.
"""

from __future__ import annotations

import hashlib
import logging
import os

__all__ = ["key_text", "log", "log_keys"]

log = logging.getLogger("taskgate")
_show: bool | None = None


def log_keys(enabled: bool | None = None) -> bool:
    """Show keys in log lines and error messages (``True``) or not (``False``, the default unless
    ``TASKGATE_LOG_KEYS=1``); ``None`` only reads the setting. Returns the setting in force."""
    global _show
    if enabled is not None:
        _show = bool(enabled)
    if _show is None:
        return os.environ.get("TASKGATE_LOG_KEYS", "").strip().lower() in ("1", "true", "yes", "on")
    return _show


def key_text(key: object, width: int = 40) -> str:
    """``repr(key)`` (cut to ``width``) if keys may be shown, else a stable digest that does not reveal it."""
    if log_keys():
        r = repr(key)
        return r if len(r) <= width else r[: width - 3] + "..."
    raw = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else repr(key).encode()
    return f"<key #{hashlib.blake2b(raw, digest_size=4).hexdigest()}>"
