"""The operator console for tests: a config with an operator and a viewer (argon2 hashes in files, as
`connector console add-user` writes them), the console app over a real ledger (the app `connector console
serve` runs), and a ledger seeded with notifications in every state."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert

from connector.commands.console import build_app, console_config
from connector.ledger.engine import N
from connector.ledger.journal import J, entry
from connector.models import State
from connector.web.console.auth import hash_password
from tests.conftest import write_config

OPERATOR = ("olivia", "operator-password-1234")
VIEWER = ("victor", "viewer-password-12345")
SESSION_SECRET = "console-session-secret-for-tests-0123456789abcdef"
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def write_console_config(
    folder: Path, ledger_url: str, *, port: int = 9, secure_cookie: bool = False, sso: str = "",
    trusted: Sequence[str] = (), attempts: int = 5, fhir_url: str = "http://127.0.0.1:9",
) -> Path:  # fmt: skip
    """A config whose `console:` has the operator and the viewer (and `sso` lines, if given)."""
    (folder / "session.key").write_text(SESSION_SECRET)
    users = ""
    for (name, password), role in ((OPERATOR, "operator"), (VIEWER, "viewer")):
        (folder / f"{name}.hash").write_text(hash_password(password) + "\n")
        users += f"    {name}: {{role: {role}, password_hash: {{file: {name}.hash}}}}\n"
    extra = (
        "console:\n  session_secret: {file: session.key}\n"
        f"  secure_cookie: {'true' if secure_cookie else 'false'}\n  login_attempts: {attempts}\n"
        f"  page_size: 10\n  users:\n{users}{sso}"
    )
    server: dict[str, Any] = {"port": port}
    if trusted:
        server["trusted_proxies"] = "[" + ", ".join(trusted) + "]"
    return write_config(folder, fhir_url, "http://127.0.0.1:9", ledger_url=ledger_url, server=server, extra=extra)


def console_app(config_path: Path) -> tuple[Any, Any]:
    """(the app `connector console serve` runs, its ledger); dispose the ledger afterwards."""
    return build_app(console_config(config_path))


@dataclass(frozen=True)
class Seeded:
    in_doubt: int  # id of the in_doubt notification of appointment "appt-doubt"
    failed: int  # id of the failed notification of appointment "appt-failed"
    sent: int


def row(key: str, appointment: str, state: State, due: datetime, **extra: Any) -> dict[str, Any]:
    """Every column (a multi-row INSERT takes its columns from the first row)."""
    optional = ("tracking_id", "sent_at", "delivery_status", "delivery_updated_at", "first_attempt_at")
    return {
        **dict.fromkeys(optional),
        "key": key, "source": "ehr", "mapping": "appointment-booked", "event": "booked",
        "resource_type": "Appointment", "resource_id": appointment, "resource_version": "1",
        "patient_id": f"pat-{appointment}", "state": state.value, "reason": None, "attempts": 0, "due_at": due,
        "created_at": due - timedelta(days=2), "updated_at": due, "resends": 0, "delivery_rank": 0, **extra,
    }  # fmt: skip


def seed(engine: Engine, filler: int = 25) -> Seeded:
    """One notification in doubt, one failed, one sent (with a tracking id and a delivery status), and
    `filler` pending ones of other appointments (more than a page)."""
    rows = [row(f"ehr:booked:appt-{i}", f"appt-{i}", State.PENDING, NOW + timedelta(hours=i)) for i in range(filler)]
    rows += [
        row("ehr:booked:appt-doubt", "appt-doubt", State.IN_DOUBT, NOW - timedelta(hours=2),
            reason="the connection broke after the request was sent", first_attempt_at=NOW - timedelta(hours=2)),
        row("ehr:booked:appt-failed", "appt-failed", State.FAILED, NOW - timedelta(hours=3),
            reason="Paubox refused the message (400)", attempts=1, first_attempt_at=NOW - timedelta(hours=3)),
        row("ehr:booked:appt-sent", "appt-sent", State.SENT, NOW - timedelta(hours=5), tracking_id="trk-0001",
            sent_at=NOW - timedelta(hours=5), delivery_status="delivered", delivery_rank=3,
            delivery_updated_at=NOW - timedelta(hours=4), first_attempt_at=NOW - timedelta(hours=5), attempts=1),
        row("ehr:booked:appt-skip", "appt-skip", State.SKIPPED, NOW - timedelta(hours=1),
            reason="the patient has no email address"),
    ]  # fmt: skip
    with engine.begin() as conn:
        conn.execute(insert(N), rows)
        ids = {r.key: r.id for r in conn.execute(N.select())}
    return Seeded(ids["ehr:booked:appt-doubt"], ids["ehr:booked:appt-failed"], ids["ehr:booked:appt-sent"])


def seed_journal(engine: Engine, seeded: Seeded) -> None:
    """The journal the roles would have written for the seeded in-doubt notification (connector.ledger.journal):
    planned, claimed, sending, in doubt, reported; for the pictures of its timeline."""
    at = NOW - timedelta(hours=2)
    steps = [
        ("planned", "pending", "booked from Appointment version 1", at - timedelta(days=2)),
        ("claimed", "pending", "leased to host-a:4121", at),
        ("sending", "sending", "attempt 1", at + timedelta(seconds=1)),
        ("outcome", "in_doubt", "the connection broke after the request was sent", at + timedelta(seconds=31)),
        ("alerted", "in_doubt", "reported to the operators", at + timedelta(minutes=31)),
    ]
    with engine.begin() as conn:
        conn.execute(
            insert(J),
            [
                entry(event, seeded.in_doubt, state, detail, at=when, source="ehr")
                for event, state, detail, when in steps
            ],
        )


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def seed_history(engine: Engine, now: datetime, per_day: int = 40) -> None:
    """A month of finished notifications (sent, some failed, skipped, cancelled, in doubt), for the charts."""
    rows = []
    for day in range(30):
        for i in range(per_day + (day * 7) % 23):
            at = now - timedelta(days=day, minutes=37 * i % 1440)
            state = (State.SENT,) * 12 + (State.SKIPPED, State.SKIPPED, State.CANCELLED, State.FAILED, State.IN_DOUBT)
            chosen = state[(i * 7 + day) % len(state)]
            reason = {State.SKIPPED: "the patient has no email address", State.CANCELLED: "appointment cancelled"}
            sent = {"sent_at": at, "tracking_id": f"trk-{day}-{i}"} if chosen is State.SENT else {}
            rows.append(
                row(f"hist:{day}:{i}", f"hist-{day}-{i}", chosen, at, updated_at=at, reason=reason.get(chosen), **sent)
            )
    with engine.begin() as conn:
        conn.execute(insert(N), rows)
