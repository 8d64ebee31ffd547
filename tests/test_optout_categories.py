"""Opt-outs by category, with their origin (link, bounce, operator); re-subscribing; withdrawing what is
pending; the upgrade of a ledger written before categories (revision 0012). SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic import command

from connector import optout
from connector.ledger import OptOut, migrate
from connector.ledger.engine import make_engine
from connector.ledger.sql import SqlLedger
from connector.models import State
from connector.sandbox.fhir import FhirState
from connector.sandbox.paubox import SandboxState
from tests.conftest import API_KEY, BASIC, OPTOUT_KEYS, Server, write_config
from tests.factories import NOW, appointment, patient, planned

ADDRESS = "robin.lee@example.org"
PAIRS = optout.candidates([], ADDRESS)
INNER = optout.digest("email", ADDRESS)


def entry(category: str, origin: str) -> OptOut:
    return OptOut("email", "d", "r…", None, NOW, "t1", category, origin)


@pytest.mark.parametrize(
    ("category", "origin", "mapping_category", "essential", "stops"),
    [
        ("", "operator", None, False, True),  # every email
        ("", "operator", "reminders", False, True),
        ("reminders", "link", "reminders", False, True),
        ("reminders", "link", "changes", False, False),  # another category goes on
        ("reminders", "link", None, False, False),
        ("", "link", "changes", True, False),  # essential: the patient's own unsubscribe does not stop it
        ("", "operator", "changes", True, True),  # ... an operator's does
        ("", "bounce", "changes", True, True),  # ... and so does a bounce
    ],
)
def test_which_optouts_stop_which_email(
    category: str, origin: str, mapping_category: str | None, essential: bool, stops: bool
) -> None:
    assert optout.applies(entry(category, origin), mapping_category, essential) is stops


def test_categories_are_separate_entries_with_their_origin_and_time(ledger: SqlLedger) -> None:
    optouts = ledger.optouts
    assert optouts.add("email", INNER, "r…@example.org", None, "reminders", "link")
    assert not optouts.add("email", INNER, "r…@example.org", None, "reminders", "link")  # a second click
    assert optouts.add("email", INNER, "r…@example.org", None, "changes", "link")
    [found] = optouts.matches_many([PAIRS])
    assert sorted((e.category, e.origin) for e in found) == [("changes", "link"), ("reminders", "link")]
    assert optouts.opted_out(PAIRS) is None  # no entry for every email: callers without a category send
    assert optout.first_applying(found, "reminders", False) is not None
    assert optout.first_applying(found, "appointments", False) is None
    assert optouts.add("email", INNER, "r…@example.org", "ticket 12", "", "operator")
    everything = optouts.opted_out(PAIRS)
    assert everything is not None and everything.origin == "operator" and everything.created_at is not None


def test_resubscribing_removes_one_category_or_all(ledger: SqlLedger) -> None:
    optouts = ledger.optouts
    for category in ("reminders", "changes", ""):
        optouts.add("email", INNER, "r…@example.org", None, category, "link")
    assert optouts.remove("email", INNER, "reminders")
    assert sorted(e.category for e in optouts.entries()) == ["", "changes"]
    assert optouts.remove("email", INNER)
    assert optouts.entries() == []
    assert not optouts.remove("email", INNER)


def test_withdraw_cancels_only_the_pending_notifications_of_those_mappings(ledger: SqlLedger) -> None:
    later = NOW + timedelta(days=1)
    notes = [planned("r1", later), planned("r2", later), planned("other", later), planned("sent", later)]
    notes = [
        n.__class__(**{**n.__dict__, "mapping": m}) for n, m in zip(notes, ["rem", "rem", "booked", "rem"], strict=True)
    ]
    ledger.intake.record_page("ehr", notes, [], None)
    ids = {r.key: r.id for r in ledger.reports.notifications(list(State), 10)}
    claimed = ledger.outbox.claim_due(later, 10, "worker", later + timedelta(minutes=5), later)
    assert ids["sent"] in {r.id for r in claimed}
    ledger.outbox.settle(ids["sent"], "worker", State.SKIPPED, "already done")  # not pending any more
    ledger.outbox.release("worker")
    assert ledger.links.withdraw("ehr", "p1", ["rem"], "the patient unsubscribed (reminders)") == 2
    found = {r.key: (r.state, r.reason) for r in ledger.reports.notifications(list(State), 10)}
    assert found["r1"] == found["r2"] == (State.CANCELLED, "the patient unsubscribed (reminders)")
    assert found["other"][0] is State.PENDING
    assert ledger.links.withdraw("ehr", "p2", ["rem"], "x") == 0  # another patient: nothing
    assert ledger.links.notification(ids["r1"]) is not None and ledger.links.notification(10**9) is None


def test_an_unsubscribe_opts_out_the_recorded_address_once_and_withdraws_in_one_go(ledger: SqlLedger) -> None:
    later = NOW + timedelta(days=1)
    notes = [planned(k, later) for k in ("sent", "r1")]
    notes = [n.__class__(**{**n.__dict__, "mapping": m}) for n, m in zip(notes, ["booked", "rem"], strict=True)]
    ledger.intake.record_page("ehr", notes, [], None)
    ids = {r.key: r.id for r in ledger.reports.notifications(list(State), 10)}
    keys = OPTOUT_KEYS
    assert keys is not None
    stored = keys.keyed(INNER)
    ledger.links.remember(ids["sent"], "email", stored, keys.current, NOW)
    ledger.links.remember(ids["sent"], "email", stored, keys.current, NOW)  # a second preparation: one row
    assert ledger.links.recipients(ids["sent"]) == [("email", stored, keys.current)]
    reason = "the patient unsubscribed (reminders)"
    assert ledger.links.unsubscribe(ids["sent"], "reminders", ["rem"], reason, NOW, set(keys.keys)) == (1, 1)
    assert ledger.links.unsubscribe(ids["sent"], "reminders", ["rem"], reason, NOW, set(keys.keys)) == (0, 0)
    [found] = ledger.optouts.matches_many([PAIRS])
    assert [(e.category, e.origin, e.key_id) for e in found] == [("reminders", "link", keys.current)]
    assert ADDRESS not in repr(ledger.optouts.entries())
    # A digest keyed with a key no longer configured would match nobody (and stop the daemon): not added.
    assert ledger.links.unsubscribe(ids["sent"], "", ["rem"], reason, NOW, {"another"}) == (0, 0)
    assert ledger.links.unsubscribe(10**9, "", ["rem"], reason, NOW, set(keys.keys)) == (0, 0)


def test_where_an_email_went_is_forgotten_once_its_newest_link_has_expired(ledger: SqlLedger) -> None:
    ledger.intake.record_page("ehr", [planned("sent", NOW)], [], None)
    [n] = ledger.reports.notifications(list(State), 10)
    keys = OPTOUT_KEYS
    assert keys is not None
    ledger.links.remember(n.id, "email", keys.keyed(INNER), keys.current, NOW)
    ledger.links.remember(n.id, "email", keys.keyed(INNER), keys.current, NOW + timedelta(days=1))  # resent
    ledger.links.remember(n.id, "email", keys.keyed(INNER), keys.current, NOW)  # an older preparation: no change
    assert ledger.links.forget(NOW + timedelta(hours=12)) == 0
    assert ledger.links.recipients(n.id) != []
    assert ledger.links.forget(NOW + timedelta(days=1, seconds=1)) == 1
    assert ledger.links.recipients(n.id) == []


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_upgrading_keeps_every_optout_as_one_for_every_email_by_an_operator(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" else request.getfixturevalue("pg_schema_url")
    engine = make_engine(url)
    migrate.upgrade(engine, "0009")  # before categories
    stored = OPTOUT_KEYS.keyed(INNER)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO optout (kind, digest, key_id, hint, note, created_at) VALUES "
            f"('email', '{stored}', 't1', 'r…@example.org', NULL, '2026-01-01 00:00:00')"
        )
    migrate.upgrade(engine)
    ledger = SqlLedger(engine, OPTOUT_KEYS)
    [kept] = ledger.optouts.entries()
    assert (kept.category, kept.origin) == ("", "operator")
    assert ledger.optouts.opted_out(PAIRS) is not None
    assert ledger.optouts.add("email", INNER, "r…@example.org", None, "reminders", "link")  # a second entry now fits
    config = migrate._alembic()
    with engine.begin() as conn:  # category entries cannot go down: they would widen to every email
        config.attributes["connection"] = conn
        command.downgrade(config, "0009")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM optout").scalar() == 1
    engine.dispose()


def test_the_cli_adds_lists_and_resubscribes_by_category(tmp_path: Path) -> None:
    config = str(write_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9", mappings=BASIC))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "connector", "optout", *args, "--config", config],
            cwd=tmp_path,
            text=True,
            capture_output=True,
            env={**os.environ, "COLUMNS": "400"},
            timeout=120,
        )

    assert cli("add", "--email", ADDRESS, "--category", "reminders").returncode == 0
    assert cli("add", "--email", ADDRESS).returncode == 0  # every email: a second entry
    listed = cli("list").stdout
    assert "reminders" in listed and "every email" in listed and "operator" in listed
    assert ADDRESS not in listed
    assert cli("remove", "--email", ADDRESS, "--category", "reminders").returncode == 0
    listed = cli("list").stdout
    assert "reminders" not in listed and "every email" in listed
    assert cli("remove", "--email", ADDRESS).returncode == 0
    assert "Opt-outs (0)" in cli("list").stdout


def test_a_replay_dry_run_says_which_emails_a_category_optout_stops(
    tmp_path: Path, fhir_state: FhirState, fhir_server: Server, paubox_state: SandboxState, paubox_server: Server
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    start = now + timedelta(days=3)
    fhir_state.load([patient("p1", "Robin", email=ADDRESS), appointment("a1", "p1", start)])
    mappings = ("appointment-booked", "appointment-reminder-48h", "appointment-cancelled")
    config = str(write_config(tmp_path, fhir_server.url, paubox_server.url, mappings=mappings))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "connector", *args, "--config", config],
            cwd=tmp_path,
            text=True,
            capture_output=True,
            env={**os.environ, "COLUMNS": "400", "PAUBOX_API_KEY": API_KEY},
            timeout=120,
        )

    def dry_run() -> str:
        done = cli("replay", "--since", (now - timedelta(days=1)).isoformat(), "--dry-run")
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "opted out" not in dry_run()
    assert cli("optout", "add", "--email", ADDRESS, "--category", "reminders").returncode == 0
    shown = dry_run()
    reminder = next(line for line in shown.splitlines() if "reminder-48h" in line)
    booked = next(line for line in shown.splitlines() if "appointment-booked" in line)
    assert "skipped: Patient/p1 opted out of 'reminders' email (by email, operator," in reminder
    assert "would send" in booked
    assert paubox_state.messages == []
