"""Pure: what the ledger records after a send, and after a preparation that crashed.

`recording(notification, outcome, policy, now)` turns a mailer's Outcome into one ledger step:

    outcome                                   step       ledger (SendResult)                      log
    sent                                      sent       sent, tracking id, when                  notification.sent
    failed                                    failed     failed, the outcome's reason             notification.failed
    in_doubt                                  in_doubt   in_doubt (sent if a webhook confirmed)   notification.in_doubt
    retry, blocking or rate limited           waiting    pending, due now, attempt given back     (mailer.paused)
    retry, the policy allows another try      retry      pending, due after the backoff           notification.retry
    retry, attempts or age used up            failed     failed, "gave up after ..."              notification.failed

`after_crash` does the same for a preparation that crashed: it counts as an attempt, like a send that
certainly did not leave.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from connector.delivery import Outcome, Signal, Verdict
from connector.delivery.retry import GiveUp, RetryAt, RetryPolicy, next_try
from connector.ledger import NotificationRecord, SendResult
from connector.models import State
from connector.results import Step


@dataclass(frozen=True)
class Recording:
    """One send's step, what the ledger records, and the log line (event, level, fields after the
    notification's own)."""

    step: Step
    result: SendResult
    event: str | None = None  # None: no line about the notification (it waits for the mailer)
    level: str = "info"
    fields: tuple[tuple[str, object], ...] = ()
    pause: str | None = None  # a blocking outcome: sending pauses, for this reason


def recording(
    n: NotificationRecord,
    outcome: Outcome,
    policy: RetryPolicy,
    now: datetime,
    rand: Callable[[float, float], float] = random.uniform,
) -> Recording:
    if outcome.verdict is Verdict.SENT:
        result = SendResult(n.id, State.SENT, tracking_id=outcome.tracking_id, when=now)
        return Recording(Step.SENT, result, "notification.sent")
    if outcome.verdict is Verdict.FAILED:
        result = SendResult(n.id, State.FAILED, outcome.reason)
        return Recording(Step.FAILED, result, "notification.failed", "error", (("reason", outcome.reason),))
    if outcome.verdict is Verdict.IN_DOUBT:
        result = SendResult(n.id, State.IN_DOUBT, outcome.reason)
        return Recording(Step.IN_DOUBT, result, "notification.in_doubt", "error", (("reason", outcome.reason),))
    if outcome.blocking or outcome.signal is Signal.RATE_LIMITED:
        # Not this notification's fault: it waits for the mailer, without spending an attempt.
        result = SendResult(n.id, State.PENDING, outcome.reason, due_at=now, count_attempt=False)
        return Recording(Step.WAITING, result, pause=outcome.reason if outcome.blocking else None)
    decision = next_try(
        policy,
        attempts=n.attempts + 1,
        first_attempt_at=n.first_attempt_at or now,
        now=now,
        reason=outcome.reason,
        retry_after=outcome.retry_after,
        rand=rand,
    )
    if isinstance(decision, GiveUp):
        result = SendResult(n.id, State.FAILED, decision.reason)
        return Recording(Step.FAILED, result, "notification.failed", "error", (("reason", decision.reason),))
    result = SendResult(n.id, State.PENDING, outcome.reason, due_at=decision.due)
    delay = round((decision.due - now).total_seconds())
    return Recording(
        Step.RETRY, result, "notification.retry", "warning", (("reason", outcome.reason), ("delay_s", delay))
    )


@dataclass(frozen=True)
class AfterCrash:
    step: Step  # retry or failed
    reason: str
    due: datetime | None  # when to try again; None: failed


def after_crash(
    n: NotificationRecord,
    problem: str,
    policy: RetryPolicy,
    now: datetime,
    rand: Callable[[float, float], float] = random.uniform,
) -> AfterCrash:
    """A preparation crashed (a bug, or data nothing refused earlier): one attempt spent against
    `max_attempts` and `max_age`, tried again after the backoff, then `failed` with the place of the error."""
    reason = f"preparation failed: {problem}"
    decision = next_try(
        policy,
        attempts=n.attempts + 1,
        first_attempt_at=n.first_attempt_at or now,
        now=now,
        reason=reason,
        retry_after=None,
        rand=rand,
    )
    if isinstance(decision, RetryAt):
        return AfterCrash(Step.RETRY, reason, decision.due)
    return AfterCrash(Step.FAILED, decision.reason, None)
