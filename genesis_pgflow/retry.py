"""When a transient failure is retried through the queue, and when it is dead-lettered: pure."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryAfter:
    delay_s: float


@dataclass(frozen=True)
class DeadLetter:
    reason: str


def backoff(attempt: int, base_s: float, cap_s: float, rand: Callable[[], float] = random.random) -> float:
    """Exponential backoff with equal jitter: half of base * 2**(attempt-1) (capped) is fixed,
    the other half is random, so retries spread out but never come back at once."""
    ceiling = min(cap_s, base_s * 2 ** max(attempt - 1, 0))
    return ceiling / 2 + rand() * ceiling / 2


def decide(attempt: int, max_attempts: int, base_s: float, cap_s: float,
           rand: Callable[[], float] = random.random) -> RetryAfter | DeadLetter:
    """attempt is pgmq's read count of the message (1 on the first delivery)."""
    if attempt >= max_attempts:
        return DeadLetter(f"failed on attempt {attempt} of {max_attempts}")
    return RetryAfter(backoff(attempt, base_s, cap_s, rand))
