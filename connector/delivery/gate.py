"""Pure: whether the mailer may send now. One gate for all workers of a process.

    running ──429──▶ paused (Retry-After, or `pause`) ──time──▶ probing
    running ──N consecutive server errors──▶ broken (`cooldown`) ──time──▶ probing
    probing: one request goes; success → running ("recovered"); failure → paused / broken again

Each change of state is returned once, for one log line and one metric, never one per attempt.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from connector.delivery import Outcome, Signal


class GateState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"  # rate limited (HTTP 429)
    BROKEN = "broken"  # circuit open after consecutive server errors
    PROBING = "probing"  # one request allowed to test the water


@dataclass
class MailerGate:
    failure_threshold: int = 5
    cooldown: timedelta = timedelta(seconds=30)
    pause: timedelta = timedelta(seconds=30)
    state: GateState = GateState.RUNNING
    until: datetime | None = None
    failures: int = 0
    probe_out: bool = False

    def ready(self, now: datetime) -> bool:
        """Could a request go now (without taking the probe)?"""
        if self.state is GateState.RUNNING:
            return True
        if self.state is GateState.PROBING:
            return not self.probe_out
        return self.until is not None and now >= self.until

    def allow(self, now: datetime) -> bool:
        """May one more request go now? (In probing, only one at a time.)"""
        if self.state is GateState.RUNNING:
            return True
        if self.state in (GateState.PAUSED, GateState.BROKEN) and self.until is not None and now >= self.until:
            self.state = GateState.PROBING
        if self.state is GateState.PROBING and not self.probe_out:
            self.probe_out = True
            return True
        return False

    def give_back(self) -> None:
        """The request allowed by `allow` did not go after all (its notification was withdrawn)."""
        self.probe_out = False

    def record(self, outcome: Outcome, now: datetime) -> GateState | None:
        """Note an answer; return the new state when it changed."""
        before = self.state
        self.probe_out = False
        if outcome.signal is Signal.RATE_LIMITED:
            wait = timedelta(seconds=outcome.retry_after) if outcome.retry_after is not None else self.pause
            self.state, self.until = GateState.PAUSED, now + wait
        elif outcome.signal is Signal.SERVER_ERROR:
            self.failures += 1
            if before is GateState.PROBING or self.failures >= self.failure_threshold:
                self.state, self.until = GateState.BROKEN, now + self.cooldown
        else:
            self.failures = 0
            if before is GateState.PROBING:  # only the probe ends a pause: answers already in flight do not
                self.state, self.until = GateState.RUNNING, None
        return self.state if self.state is not before else None
