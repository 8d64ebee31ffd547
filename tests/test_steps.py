"""What the ledger records after a send (connector.sending.steps), as a table: a mailer's outcome, the
notification's attempts so far, and the step, the ledger's record and the log line that follow."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from connector.delivery import Outcome, Signal, Verdict
from connector.delivery.retry import RetryPolicy
from connector.ledger import NotificationRecord
from connector.models import State
from connector.results import Step
from connector.sending.steps import after_crash, recording

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
POLICY = RetryPolicy(max_attempts=3, max_age=timedelta(hours=1), base=timedelta(seconds=30), cap=timedelta(hours=1))


def notification(attempts: int = 0, first_attempt_at: datetime | None = None) -> NotificationRecord:
    return NotificationRecord(
        id=7,
        key="k",
        source="ehr",
        mapping="m",
        event="booked",
        resource_type="Appointment",
        resource_id="a1",
        resource_version="1",
        patient_id="p1",
        state=State.SENDING,
        reason=None,
        attempts=attempts,
        due_at=NOW,
        tracking_id=None,
        updated_at=NOW,
        first_attempt_at=first_attempt_at,
    )


def top(low: float, high: float) -> float:
    return high  # the longest backoff the policy allows


CASES = [
    # (what happened, outcome, attempts so far, step, state recorded, due, attempt counted, log event)
    (
        "accepted",
        Outcome(Verdict.SENT, "ok", tracking_id="t-1"),
        0,
        Step.SENT,
        State.SENT,
        None,
        True,
        "notification.sent",
    ),
    (
        "refused for good",
        Outcome(Verdict.FAILED, "HTTP 400"),
        0,
        Step.FAILED,
        State.FAILED,
        None,
        True,
        "notification.failed",
    ),
    (
        "maybe accepted",
        Outcome(Verdict.IN_DOUBT, "read timeout"),
        0,
        Step.IN_DOUBT,
        State.IN_DOUBT,
        None,
        True,
        "notification.in_doubt",
    ),
    (
        "rate limited: everybody waits, no attempt spent",
        Outcome(Verdict.RETRY, "HTTP 429", signal=Signal.RATE_LIMITED),
        2,
        Step.WAITING,
        State.PENDING,
        NOW,
        False,
        None,
    ),
    (
        "a wrong key: sending pauses, no attempt spent",
        Outcome(Verdict.RETRY, "HTTP 401", blocking=True),
        2,
        Step.WAITING,
        State.PENDING,
        NOW,
        False,
        None,
    ),
    (
        "a server error with attempts left",
        Outcome(Verdict.RETRY, "HTTP 503", signal=Signal.SERVER_ERROR),
        0,
        Step.RETRY,
        State.PENDING,
        NOW + timedelta(seconds=30),
        True,
        "notification.retry",
    ),
    (
        "Retry-After is honoured",
        Outcome(Verdict.RETRY, "HTTP 503", retry_after=120),
        1,
        Step.RETRY,
        State.PENDING,
        NOW + timedelta(seconds=120),
        True,
        "notification.retry",
    ),
    (
        "the last attempt",
        Outcome(Verdict.RETRY, "HTTP 503", signal=Signal.SERVER_ERROR),
        2,
        Step.FAILED,
        State.FAILED,
        None,
        True,
        "notification.failed",
    ),
]


@pytest.mark.parametrize(
    ("outcome", "attempts", "step", "state", "due", "counted", "event"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_an_outcome_becomes_one_ledger_step(
    outcome: Outcome,
    attempts: int,
    step: Step,
    state: State,
    due: datetime | None,
    counted: bool,
    event: str | None,
) -> None:
    done = recording(notification(attempts), outcome, POLICY, NOW, rand=top)
    assert (done.step, done.result.state, done.result.due_at, done.result.count_attempt, done.event) == (
        step,
        state,
        due,
        counted,
        event,
    )
    assert done.result.notification_id == 7
    assert done.pause == (outcome.reason if outcome.blocking else None)


def test_a_send_given_up_says_why_and_a_retry_says_when() -> None:
    failed = recording(notification(2), Outcome(Verdict.RETRY, "HTTP 503"), POLICY, NOW, rand=top)
    assert failed.result.reason == "gave up after 3 attempts: HTTP 503" and failed.level == "error"
    retry = recording(notification(0), Outcome(Verdict.RETRY, "HTTP 503"), POLICY, NOW, rand=top)
    assert dict(retry.fields) == {"reason": "HTTP 503", "delay_s": 30} and retry.level == "warning"
    late = notification(1, first_attempt_at=NOW - timedelta(hours=1))
    aged = recording(late, Outcome(Verdict.RETRY, "HTTP 503"), POLICY, NOW, rand=top)
    assert aged.result.reason == "gave up after 1:00:00 of trying: HTTP 503"


@pytest.mark.parametrize(
    ("attempts", "step", "due", "reason"),
    [
        (0, Step.RETRY, NOW + timedelta(seconds=30), "preparation failed: KeyError at connector/x.py:1"),
        (2, Step.FAILED, None, "gave up after 3 attempts: preparation failed: KeyError at connector/x.py:1"),
    ],
)
def test_a_crashed_preparation_spends_an_attempt(attempts: int, step: Step, due: datetime | None, reason: str) -> None:
    crash = after_crash(notification(attempts), "KeyError at connector/x.py:1", POLICY, NOW, rand=top)
    assert (crash.step, crash.due, crash.reason) == (step, due, reason)
