"""Retry policies: how often and how patiently a failing handler is tried again before its event is parked."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Retry transient errors with exponential backoff and full jitter, then park the event.

    `retry_on` lists the exception types that count as transient; by default every
    exception does (except `StepFailed`, which is a business failure and compensates).
    Any other exception parks the event at once.
    """

    max_attempts: int = 3
    base_delay: float = 0.05
    max_delay: float = 2.0
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base_delay < 0 or self.max_delay < 0:
            raise ValueError(f"invalid retry policy {self!r}: max_attempts >= 1, delays >= 0")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (exponential, with full jitter)."""
        return random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))

    def is_transient(self, error: BaseException) -> bool:
        """Whether `error` is worth another attempt."""
        return isinstance(error, self.retry_on)
