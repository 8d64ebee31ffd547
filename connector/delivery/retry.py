"""Pure retry policy: exponential backoff with full jitter, never sooner than Retry-After, and limits on
attempts and age after which a notification is `failed` with its reason."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta


def backoff(
    attempt: int,
    base: timedelta,
    cap: timedelta,
    retry_after: float | None = None,
    rand: Callable[[float, float], float] = random.uniform,
) -> timedelta:
    """Delay before attempt `attempt + 1`: uniform in [0, min(cap, base·2^(attempt-1))], at least Retry-After."""
    ceiling = min(cap.total_seconds(), base.total_seconds() * 2 ** max(0, attempt - 1))
    delay = rand(0.0, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return timedelta(seconds=delay)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    max_age: timedelta
    base: timedelta
    cap: timedelta


@dataclass(frozen=True)
class RetryAt:
    due: datetime


@dataclass(frozen=True)
class GiveUp:
    reason: str


def next_try(
    policy: RetryPolicy,
    *,
    attempts: int,
    first_attempt_at: datetime | None,
    now: datetime,
    reason: str,
    retry_after: float | None,
    rand: Callable[[float, float], float] = random.uniform,
) -> RetryAt | GiveUp:
    """After a failed attempt that certainly did not reach Paubox: when to try again, or give up."""
    if attempts >= policy.max_attempts:
        return GiveUp(f"gave up after {attempts} attempts: {reason}")
    delay = backoff(attempts, policy.base, policy.cap, retry_after, rand)
    if first_attempt_at is not None and now + delay - first_attempt_at > policy.max_age:
        return GiveUp(f"gave up after {policy.max_age} of trying: {reason}")
    return RetryAt(now + delay)
