"""The console shows the one audit trail and the journal (SQLite and PostgreSQL): an action taken with the
CLI (`connector resolve`, a real process) appears in the notification's timeline and on the audit page next
to the console's own; the timeline lists the journal's events in order; the appointment page lists the
transitions intake saw."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from connector.ledger import SendResult
from connector.lifecycle import Snapshot
from connector.models import State
from connector.testing import sqlite_url
from tests.console_harness import NOW, OPERATOR, VIEWER, console_app, csrf_of, seed, write_console_config


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return sqlite_url(tmp_path / "ledger.db") if request.param == "sqlite" else request.getfixturevalue("pg_schema_url")


@asynccontextmanager
async def signed_in(app: Any, who: tuple[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://console.test") as client:
        page = await client.get("/console/login")
        answer = await client.post(
            "/console/login", data={"user": who[0], "password": who[1], "csrf": csrf_of(page.text)}
        )
        assert answer.status_code == 303, answer.text
        yield client


def _rows(html: str, table: str) -> list[str]:
    """The text of each row of the table with id `table`."""
    body = html.split(f'id="{table}"', 1)[1].split("</table>", 1)[0].split("<tbody>", 1)[1]
    return [re.sub(r"<[^>]+>", " ", r) for r in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


async def test_cli_and_console_actions_share_one_trail_shown_in_timeline_and_audit(tmp_path: Path, url: str) -> None:
    config = write_console_config(tmp_path, url)
    app, ledger = console_app(config)
    try:
        seeded = seed(ledger.engine)
        done = subprocess.run(
            [sys.executable, "-m", "connector", "resolve", str(seeded.in_doubt), "--sent", "--config", str(config)],
            cwd=tmp_path,
            text=True,
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        async with signed_in(app, OPERATOR) as client:
            page = await client.get(f"/console/notifications/{seeded.failed}")
            answer = await client.post(
                f"/console/notifications/{seeded.failed}/act",
                data={"csrf": csrf_of(page.text), "action": "retry", "reason": "the outage is over"},
            )
            assert answer.status_code == 303
            timeline = _rows((await client.get(f"/console/notifications/{seeded.in_doubt}")).text, "timeline")
            [cli] = [r for r in timeline if "resolve-sent" in r]
            assert "in_doubt → sent" in cli and "CLI; reason: resolved by an operator: it was sent" in cli
            assert "cli:" in cli
            audit = _rows((await client.get("/console/audit")).text, "audit")
        assert len(audit) == 2  # newest first: the console's retry, then the CLI's resolve
        assert "retry" in audit[0] and OPERATOR[0] in audit[0] and "failed → pending" in audit[0]
        assert "resolve-sent" in audit[1] and "cli:" in audit[1] and "in_doubt → sent" in audit[1]
        trail = ledger.operator.history(seeded.failed)  # the CLI's reading of the trail sees the console's action
        assert [(e.action, e.role, e.actor, e.reason) for e in trail] == [
            ("retry", "operator", OPERATOR[0], "the outage is over")
        ]
        assert ledger.console.detail(seeded.failed).record.state is State.PENDING  # type: ignore[union-attr]
    finally:
        ledger.dispose()


async def test_the_timeline_lists_the_journal_and_the_appointment_page_its_transitions(
    tmp_path: Path, url: str
) -> None:
    app, ledger = console_app(write_console_config(tmp_path, url))
    try:
        seed(ledger.engine)
        lease = NOW + timedelta(minutes=5)
        [first] = ledger.outbox.claim_due(NOW + timedelta(minutes=1), 1, "worker-1", lease, NOW)
        ledger.outbox.start_sending([first.id], "worker-1", lease)
        ledger.outbox.finish([SendResult(first.id, State.SENT, "accepted by Paubox", "trk-journal", NOW)])
        ledger.after_send.record_delivery(first.key, None, "delivered", 3, NOW)
        start = NOW + timedelta(days=3)
        booked = Snapshot("booked", start, start + timedelta(minutes=30), "1", ("pat-appt-0",), NOW)
        ledger.intake.record_page("ehr", [], [], None, {first.resource_id: booked})
        cancelled = Snapshot("cancelled", start, start + timedelta(minutes=30), "2", ("pat-appt-0",), NOW)
        ledger.intake.record_page("ehr", [], [], None, {first.resource_id: cancelled})
        async with signed_in(app, VIEWER) as client:
            timeline = _rows((await client.get(f"/console/notifications/{first.id}")).text, "timeline")
            story = (await client.get(f"/console/appointments/{first.resource_id}")).text
        whats = ["claimed: pending", "sending: sending", "outcome: sent", "delivery: delivered"]
        found = [next(i for i, r in enumerate(timeline) if w in r) for w in whats]
        assert found == sorted(found)
        assert "trk-journal" in timeline[found[2]] and "by webhook" in timeline[found[3]]
        transitions = _rows(story, "transitions")
        assert len(transitions) == 2
        assert "version 1: first seen" in transitions[0] and "version 2: booked → cancelled" in transitions[1]
    finally:
        ledger.dispose()
