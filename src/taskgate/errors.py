"""The one error tree. Denials are never exceptions: they are :class:`~taskgate.Decision` values.

::

    TaskgateError
    ├── InvalidPolicyError          (also a ValueError) a policy file or mapping is wrong
    ├── PolicyNotFoundError         (also a KeyError) no policy of that name
    ├── OperationNotSupportedError  the operation does not fit the policy's kind (debit on a rate policy ...)
    ├── BackendUnavailableError     the store or the service cannot be reached (wraps redis/grpc errors)
    └── ThrottledError              a task ran out of deferrals (``on_exhausted="fail"``)

Bad arguments (cost <= 0, an empty key) raise plain :class:`ValueError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskgate.types import Decision

__all__ = [
    "BackendUnavailableError",
    "InvalidPolicyError",
    "OperationNotSupportedError",
    "PolicyNotFoundError",
    "TaskgateError",
    "ThrottledError",
]


class TaskgateError(Exception):
    """Base of every error taskgate raises on purpose."""


class InvalidPolicyError(TaskgateError, ValueError):
    """A policy is malformed. The message names the policy, the field and the value."""

    def __init__(self, message: str, *, policy: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.policy = policy
        self.field = field


class PolicyNotFoundError(TaskgateError, KeyError):
    """No policy of that name is loaded."""

    def __init__(self, name: str, known: list[str] | None = None) -> None:
        known_txt = ", ".join(sorted(known)) if known else "none"
        super().__init__(f"unknown policy {name!r} (loaded: {known_txt})")
        self.name = name

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class OperationNotSupportedError(TaskgateError):
    """The operation does not apply to this policy (e.g. debit on a policy without a token budget)."""


class BackendUnavailableError(TaskgateError):
    """The store or service could not be reached. The message names the URL without its password."""


class ThrottledError(TaskgateError):
    """A task was deferred ``max_deferrals`` times and its ``on_exhausted`` policy is ``"fail"``."""

    def __init__(self, message: str, decision: Decision | None = None) -> None:
        super().__init__(message)
        self.decision = decision
