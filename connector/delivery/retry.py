"""Pure retry policy: exponential backoff with full jitter, never sooner than Retry-After."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import timedelta


def backoff(attempt: int, base: timedelta, cap: timedelta, retry_after: float | None = None,
            rand: Callable[[float, float], float] = random.uniform) -> timedelta:
    """Delay before attempt `attempt + 1`: uniform in [0, min(cap, base·2^(attempt-1))], at least Retry-After."""
    ceiling = min(cap.total_seconds(), base.total_seconds() * 2 ** max(0, attempt - 1))
    delay = rand(0.0, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return timedelta(seconds=delay)
