"""Pure: is each part of the connector well? Facts in, findings out (connector.monitor gathers the facts).

    source:<name>  failing when no poll of it completed for `health.stale_after` intervals (never sooner than
                   `health.stale_floor`), counted from its last completed poll by any replica (kept in the
                   ledger), or from this process's start. A poll left to another replica that holds the
                   source's lock is neither a success nor a failure.
    mailer         failing while a configuration error pauses sending (401, 403, 404, 3xx: `blocked`) and
                   while the circuit breaker is open or waits for its probe (`broken`, `probing`); a 429
                   pause (`paused`) is the normal way to wait and is not a failure.
    ledger         failing when it does not answer a read within `health.ledger_timeout`.

Findings carry names, states, times, HTTP statuses and error descriptions, never patient data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from connector.delivery.gate import GateState, MailerGate

if TYPE_CHECKING:
    from connector.config.server import HealthConfig

MAILER_STATES = ("running", "paused", "probing", "broken", "blocked")
MAILER_FAILING = {
    "probing": "waiting for a probe to show the mailer works again after server errors",
    "broken": "circuit breaker open after consecutive server errors",
    "blocked": "sending paused by a configuration error",
}


@dataclass(frozen=True)
class SourceFacts:
    """What is known of a source's polls: the last one that completed, and the last error."""

    last_ok: datetime | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    failing_since: datetime | None = None  # the first failure after the last completed poll

    @property
    def failing(self) -> bool:
        return self.last_error_at is not None and (self.last_ok is None or self.last_error_at > self.last_ok)

    def completed(self, when: datetime) -> SourceFacts:
        return SourceFacts(when, self.last_error, self.last_error_at, None)

    def failed(self, when: datetime, error: str) -> SourceFacts:
        return SourceFacts(self.last_ok, error[:500], when, self.failing_since if self.failing else when)

    def merged(self, other: SourceFacts) -> SourceFacts:
        """Both observers' facts (this process and the ledger): the newest success and the newest error."""
        last_ok = _latest(self.last_ok, other.last_ok)
        newer = other if _before(self.last_error_at, other.last_error_at) else self
        failing_since = [
            f for f in (self.failing_since, other.failing_since) if f is not None and (last_ok is None or f > last_ok)
        ]
        return SourceFacts(last_ok, newer.last_error, newer.last_error_at, min(failing_since, default=None))


@dataclass(frozen=True)
class MailerFacts:
    state: str  # one of MAILER_STATES
    reason: str | None = None
    since: datetime | None = None


@dataclass(frozen=True)
class Finding:
    component: str  # "ledger", "source:<name>", "mailer"
    ok: bool
    since: datetime | None = None  # failing: since when; ok: when it was last known well, if known
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": "ok" if self.ok else "failing"}
        if self.since is not None:
            body["since"] = _iso(self.since)
        if self.reason:
            body["reason"] = self.reason
        body.update({k: _iso(v) if isinstance(v, datetime) else v for k, v in self.details.items() if v is not None})
        return body


def stale_limit(interval: timedelta, settings: HealthConfig) -> timedelta:
    return max(interval * settings.stale_after, settings.stale_floor)


def source_finding(
    name: str, facts: SourceFacts, interval: timedelta, settings: HealthConfig, now: datetime, started: datetime | None
) -> Finding:
    """`started`: when the observing daemon started (None for `connector status`, which observes nothing
    itself): a daemon gives a source its first `limit` before calling it failing."""
    limit = stale_limit(interval, settings)
    details: dict[str, Any] = {"last_success": facts.last_ok}
    if facts.last_error:
        details.update(last_error=facts.last_error, last_error_at=facts.last_error_at)
    reference = _latest(facts.last_ok, started)
    if reference is not None and now - reference <= limit:
        return Finding(f"source:{name}", True, facts.last_ok, None, details)
    since = facts.last_ok or facts.failing_since or started
    if reference is None:
        reason = "no poll has completed yet"
    else:
        reason = f"no poll completed for {_human(now - reference)} (limit {_human(limit)})"
    if facts.failing:
        reason += f"; last error: {facts.last_error}"
    return Finding(f"source:{name}", False, since, reason, details)


def mailer_finding(facts: MailerFacts) -> Finding:
    details = {"state": facts.state}
    if facts.state not in MAILER_FAILING:
        return Finding("mailer", True, None, facts.reason if facts.state == "paused" else None, details)
    reason = MAILER_FAILING[facts.state] + (f": {facts.reason}" if facts.reason else "")
    return Finding("mailer", False, facts.since, reason, details)


def ledger_finding(problem: str | None, since: datetime | None) -> Finding:
    return Finding("ledger", problem is None, since if problem else None, problem)


def mailer_facts(
    gate: MailerGate, blocked: str | None, blocked_since: datetime | None, gate_since: datetime | None
) -> MailerFacts:
    """The mailer's state: `blocked` (a configuration error, until a send gets through) before the gate's."""
    if blocked is not None:
        return MailerFacts("blocked", blocked, blocked_since)
    if gate.state is GateState.RUNNING:
        return MailerFacts("running", None, gate_since)
    until = f"until {_iso(gate.until)}" if gate.until is not None and gate.state is not GateState.PROBING else None
    return MailerFacts(gate.state.value, until, gate_since)


def report(findings: list[Finding]) -> tuple[bool, dict[str, Any]]:
    """The `/healthz` answer: all well, and a JSON body naming each failing component."""
    ok = all(f.ok for f in findings)
    return ok, {
        "status": "ok" if ok else "failing",
        "failing": [f.component for f in findings if not f.ok],
        "components": {f.component: f.as_json() for f in findings},
    }


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None or (b is not None and b > a) else a


def _before(a: datetime | None, b: datetime | None) -> bool:
    return b is not None and (a is None or a < b)


def _iso(value: datetime) -> str:
    return value.isoformat(timespec="seconds")


def _human(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
