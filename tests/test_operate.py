"""What an operator sees and does from the command line: `status --json`, `resolve` and `retry` by id, key
or filter (dry run, confirmation, --yes), `replay` summaries, `--json` and `--output`, and progress bars
that show on a terminal only."""

from __future__ import annotations

import csv
import json
import os
import pty
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from connector.commands.ledger import STATUS_STEPS
from connector.config import load_config
from connector.ledger.sql import open_ledger
from connector.models import PlannedNotification, State
from connector.sandbox.fhir import FhirState
from connector.sandbox.paubox import SandboxState
from tests.conftest import API_KEY, BASIC, Server, write_config
from tests.factories import appointment, patient

START = datetime.now(UTC).replace(microsecond=0)


def connector(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        cwd=cwd,
        text=True,
        input=stdin,
        capture_output=True,
        env={**os.environ, "PAUBOX_API_KEY": API_KEY, "COLUMNS": "400"},
        timeout=120,
    )


def _notification(key: str, state: State, mapping: str = "m") -> PlannedNotification:
    return PlannedNotification(
        key=key,
        source="ehr",
        mapping=mapping,
        event="booked",
        resource_type="Appointment",
        resource_id=key,
        resource_version="1",
        patient_id="p1",
        due_at=START,
        state=state,
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A config over a SQLite ledger holding three in_doubt and three failed notifications."""
    path = write_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9", mappings=BASIC)
    ledger = open_ledger(load_config(path))
    ledger.intake.add(
        [
            _notification("doubt-1", State.IN_DOUBT),
            _notification("doubt-2", State.IN_DOUBT),
            _notification("doubt-3", State.IN_DOUBT, mapping="reminder"),
            _notification("fail-1", State.FAILED),
            _notification("fail-2", State.FAILED),
            _notification("fail-3", State.FAILED, mapping="reminder"),
        ]
    )
    ledger.dispose()
    return path


def _states(config: Path) -> dict[str, State]:
    ledger = open_ledger(load_config(config))
    try:
        keys = ["doubt-1", "doubt-2", "doubt-3", "fail-1", "fail-2", "fail-3"]
        return {k: r.state for k, r in ledger.reports.existing(keys).items()}
    finally:
        ledger.dispose()


def _status(config: Path) -> dict[str, object]:
    result = connector("status", "--json", "--config", str(config), cwd=config.parent)
    assert result.returncode == 0, result.stderr
    document: dict[str, object] = json.loads(result.stdout)
    return document


def test_status_json_has_a_stable_shape_with_the_ids_to_act_on(config: Path) -> None:
    document = _status(config)
    assert set(document) == {
        "health",
        "counts",
        "cursors",
        "quarantined",
        "attention",
        "suppressed",
        "problems",
        "rejections",
    }
    assert document["counts"] == {
        "pending": 0,
        "sending": 0,
        "sent": 0,
        "failed": 3,
        "in_doubt": 3,
        "cancelled": 0,
        "skipped": 0,
    }
    attention = document["attention"]
    assert isinstance(attention, list) and len(attention) == 6
    first = attention[0]
    assert set(first) >= {"id", "key", "state", "source", "mapping", "resource", "reason", "updated_at"}
    assert isinstance(first["id"], int)
    health = document["health"]
    assert isinstance(health, list) and health[0]["component"] == "ledger" and health[0]["status"] == "ok"


def _ids(config: Path) -> dict[str, int]:
    attention = _status(config)["attention"]
    assert isinstance(attention, list)
    return {n["key"]: n["id"] for n in attention}


def test_resolve_several_ids_asks_first_and_does_nothing_on_no(config: Path) -> None:
    ids = _ids(config)
    targets = [str(ids["doubt-1"]), str(ids["doubt-2"])]
    refused = connector("resolve", *targets, "--cancel", "--config", str(config), cwd=config.parent, stdin="n\n")
    assert refused.returncode == 1
    assert "2 notification(s) would be cancelled (2 in_doubt)" in refused.stdout
    assert _states(config)["doubt-1"] is State.IN_DOUBT
    agreed = connector("resolve", *targets, "--cancel", "--config", str(config), cwd=config.parent, stdin="y\n")
    assert agreed.returncode == 0, agreed.stderr
    assert "2 notification(s) cancelled" in agreed.stdout
    states = _states(config)
    assert (states["doubt-1"], states["doubt-2"], states["doubt-3"]) == (
        State.CANCELLED,
        State.CANCELLED,
        State.IN_DOUBT,
    )


def test_resolve_one_id_or_key_needs_no_confirmation(config: Path) -> None:
    ids = _ids(config)
    by_id = connector("resolve", str(ids["doubt-3"]), "--sent", "--config", str(config), cwd=config.parent)
    assert by_id.returncode == 0, by_id.stderr
    assert "1 notification(s) marked sent" in by_id.stdout
    by_key = connector("resolve", "doubt-1", "--resend", "--config", str(config), cwd=config.parent)
    assert by_key.returncode == 0 and "1 notification(s) queued to send again" in by_key.stdout
    again = connector("resolve", str(ids["doubt-3"]), "--sent", "--config", str(config), cwd=config.parent)
    assert again.returncode == 1
    assert "1 of the notifications named are not in_doubt: left alone" in again.stdout
    assert _states(config)["doubt-3"] is State.SENT and _states(config)["doubt-1"] is State.PENDING


def test_retry_by_filter_dry_run_then_yes(config: Path) -> None:
    dry = connector(
        "retry", "--state", "failed", "--mapping", "m", "--dry-run", "--config", str(config), cwd=config.parent
    )
    assert dry.returncode == 0, dry.stderr
    assert "2 notification(s) would be queued to retry (2 failed)" in dry.stdout
    assert "fail-1" in dry.stdout and "fail-3" not in dry.stdout and "dry run: nothing changed" in dry.stdout
    assert _states(config)["fail-1"] is State.FAILED
    done = connector("retry", "--mapping", "m", "--yes", "--config", str(config), cwd=config.parent)
    assert done.returncode == 0, done.stderr
    assert "2 notification(s) queued to retry" in done.stdout
    states = _states(config)
    assert (states["fail-1"], states["fail-2"], states["fail-3"]) == (State.PENDING, State.PENDING, State.FAILED)
    assert states["doubt-1"] is State.IN_DOUBT  # retry never resends what may have gone
    ledger = open_ledger(load_config(config))
    try:
        record = ledger.reports.existing(["fail-1"])["fail-1"]
        [action] = ledger.operator.history(record.id)
    finally:
        ledger.dispose()
    assert (action.action, action.from_state, action.to_state) == ("retry", State.FAILED, State.PENDING)
    assert action.actor.startswith("cli:") and action.role == "cli"


def test_a_filter_by_window_and_source(config: Path) -> None:
    future = (START + timedelta(days=1)).isoformat()
    none = connector("retry", "--since", future, "--yes", "--config", str(config), cwd=config.parent)
    assert none.returncode == 1 and "nothing to change" in none.stdout
    elsewhere = connector("retry", "--source", "crm", "--yes", "--config", str(config), cwd=config.parent)
    assert elsewhere.returncode == 1
    assert _states(config)["fail-1"] is State.FAILED


def test_no_selection_or_a_bad_state_is_refused(config: Path) -> None:
    nothing = connector("retry", "--config", str(config), cwd=config.parent)
    assert nothing.returncode == 2 and "--state, --mapping, --source" in nothing.stderr
    bad = connector("resolve", "--state", "doubtful", "--cancel", "--config", str(config), cwd=config.parent)
    assert bad.returncode == 2 and "'doubtful' is not a state" in bad.stderr


def _on_a_terminal(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (stdout piped); returns (exit code, stdout, stderr)."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "connector", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=follower,
        env={**os.environ, "PAUBOX_API_KEY": API_KEY, "TERM": "xterm"},
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    stdout, _ = process.communicate(timeout=120)
    os.close(leader)
    return process.returncode, stdout.decode(), b"".join(chunks).decode(errors="replace")


def test_progress_shows_on_a_terminal_only(config: Path) -> None:
    code, stdout, stderr = _on_a_terminal(["status", "--json", "--config", str(config)], config.parent)
    assert code == 0
    steps = len(STATUS_STEPS)  # one per query of `connector status`
    assert "reading the ledger" in stderr and f"{steps}/{steps}" in stderr
    assert "reading the ledger" not in stdout and json.loads(stdout)["counts"]["failed"] == 3
    piped = connector("status", "--json", "--config", str(config), cwd=config.parent)
    assert "reading the ledger" not in piped.stderr


@pytest.fixture
def replay_config(
    tmp_path: Path, fhir_state: FhirState, fhir_server: Server, paubox_state: SandboxState, paubox_server: Server
) -> Path:
    """Sixty appointments (more than a table shows), one patient without an address."""
    people = [patient(f"p{i}", "Robin", email=f"robin.{i}@example.org") for i in range(59)]
    people.append(patient("p59", "Robin"))
    visits = [appointment(f"a{i}", f"p{i}", START + timedelta(days=2, minutes=i)) for i in range(60)]
    fhir_state.load([*people, *visits])
    return write_config(tmp_path, fhir_server.url, paubox_server.url, mappings=BASIC, source={"page_size": 50})


def test_replay_of_many_prints_counts_and_writes_the_list(replay_config: Path, paubox_state: SandboxState) -> None:
    since = (START - timedelta(days=1)).isoformat()
    args = ["replay", "--since", since, "--dry-run", "--config", str(replay_config)]
    summary = connector(*args, cwd=replay_config.parent)
    assert summary.returncode == 0, summary.stderr
    assert "1 skipped, 59 would send" in summary.stdout
    assert "give --output FILE" in summary.stdout
    assert "a17" not in summary.stdout  # no table of sixty rows
    assert "reading" not in summary.stderr  # stderr is not a terminal: no progress bar
    listed = connector(*args, "--output", "rows.jsonl", cwd=replay_config.parent)
    assert listed.returncode == 0, listed.stderr
    assert "60 row(s) written to rows.jsonl (JSON lines)" in listed.stdout
    rows = [json.loads(line) for line in (replay_config.parent / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and set(rows[0]) == {"mapping", "resource", "patient", "due", "key", "result", "detail"}
    assert {r["result"] for r in rows} == {"would send", "skipped"}
    assert oct((replay_config.parent / "rows.jsonl").stat().st_mode & 0o777) == "0o600"
    table = connector(*args, "--output", "rows.csv", cwd=replay_config.parent)
    assert table.returncode == 0 and "(CSV)" in table.stdout
    with (replay_config.parent / "rows.csv").open() as handle:
        read = list(csv.DictReader(handle))
    assert len(read) == 60 and read[0]["mapping"] == "appointment-booked"
    assert paubox_state.messages == []


def test_replay_dry_run_json(replay_config: Path) -> None:
    since = (START - timedelta(days=1)).isoformat()
    result = connector(
        "replay", "--since", since, "--dry-run", "--json", "--config", str(replay_config), cwd=replay_config.parent
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["dry_run"] is True
    assert document["summary"] == {"skipped": 1, "would send": 59}
    assert len(document["items"]) == 60
    skipped = next(i for i in document["items"] if i["result"] == "skipped")
    assert skipped["resource"].startswith("Appointment/a59") and "no usable email address" in skipped["detail"]


def test_replay_progress_on_a_terminal(replay_config: Path) -> None:
    since = (START - timedelta(days=1)).isoformat()
    code, stdout, stderr = _on_a_terminal(
        ["replay", "--since", since, "--dry-run", "--config", str(replay_config)], replay_config.parent
    )
    assert code == 0, stderr
    assert "checking recipients" in stderr and "60/60" in stderr
    assert "checking recipients" not in stdout


def test_run_dry_run_progress_on_a_terminal(replay_config: Path) -> None:
    code, stdout, stderr = _on_a_terminal(
        ["run", "--once", "--dry-run", "--config", str(replay_config)], cwd=replay_config.parent
    )
    assert code == 0, stderr
    assert "reading ehr (appointments)" in stderr and "checking recipients" in stderr and "60/60" in stderr
    assert "1 skipped, 59 would send" in stdout and "reading ehr" not in stdout


def test_a_filter_changes_only_what_was_shown_not_what_arrived_after(config: Path) -> None:
    """A notification that becomes in_doubt after the preview was shown (and confirmed) is not part of the
    decision: the operator never saw it, so it is not marked sent (or cancelled) behind their back."""
    from typing import Any

    from connector.config import LEDGER
    from connector.operate import act, selection

    calls: list[str] = []

    def on_ledger(path: Path, work: Any) -> Any:
        if calls:  # the decision, after the preview: a send times out meanwhile
            ledger = open_ledger(load_config(path))
            try:
                ledger.intake.add([_notification("doubt-late", State.IN_DOUBT)])
            finally:
                ledger.dispose()
        calls.append("called")
        return work(load_config(path, LEDGER))

    chosen = selection(None, ["in_doubt"], ["m"], None, None, None)
    act(on_ledger, config, chosen, "sent", dry_run=False, yes=True)
    ledger = open_ledger(load_config(config))
    try:
        found = ledger.reports.existing(["doubt-1", "doubt-2", "doubt-late"])
    finally:
        ledger.dispose()
    assert (found["doubt-1"].state, found["doubt-2"].state) == (State.SENT, State.SENT)
    assert found["doubt-late"].state is State.IN_DOUBT


def test_status_prints_reasons_as_text_never_as_markup(tmp_path: Path) -> None:
    """A reason carries what a server said (Paubox's error title): brackets in it are printed as they are,
    and a `[/…]` in it does not stop `connector status`."""
    from dataclasses import replace

    path = write_config(tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9", mappings=BASIC)
    ledger = open_ledger(load_config(path))
    said = "Paubox 400: Invalid [/to] field [bold]x[/bold]"
    ledger.intake.add(
        [
            replace(_notification("fail-odd", State.FAILED), reason=said),
            replace(_notification("skip-odd", State.SKIPPED), reason=said),
        ]
    )
    ledger.dispose()
    result = connector("status", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(said) == 2, result.stdout


def test_replay_refuses_an_output_file_it_could_not_write_before_sending(
    replay_config: Path, paubox_state: SandboxState
) -> None:
    """`--output` in a folder that does not exist is refused first: not a traceback after the replay sent."""
    since = (START - timedelta(days=1)).isoformat()
    args = ["replay", "--since", since, "--output", "absent/rows.jsonl", "--config", str(replay_config)]
    result = connector(*args, cwd=replay_config.parent)
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stderr and "absent" in result.stderr
    assert paubox_state.messages == []


def test_dry_runs_need_no_variable_of_the_delivery(replay_config: Path, paubox_state: SandboxState) -> None:
    """A dry run reads the sources and the ledger and sends nothing: a `${VAR}` of `delivery:` (the Paubox
    account, a reply-to) that is not set does not stop it."""
    text = replay_config.read_text()
    assert "delivery:\n" in text
    replay_config.write_text(text.replace("delivery:\n", "delivery:\n  reply_to: ${CLINIC_REPLY_TO}\n", 1))
    since = (START - timedelta(days=1)).isoformat()
    replayed = connector(
        "replay", "--since", since, "--dry-run", "--config", str(replay_config), cwd=replay_config.parent
    )
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "59 would send" in replayed.stdout
    planned = connector("run", "--dry-run", "--config", str(replay_config), cwd=replay_config.parent)
    assert planned.returncode == 0, planned.stdout + planned.stderr
    real = connector("run", "--once", "--config", str(replay_config), cwd=replay_config.parent)
    assert real.returncode == 2 and "CLINIC_REPLY_TO" in real.stdout + real.stderr  # sending needs it
    assert paubox_state.messages == []
