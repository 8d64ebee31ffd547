"""Health judgements (pure), and the gauges of /metrics for a small seeded ledger on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from connector.config import load_config
from connector.config.server import HealthConfig
from connector.daemon import poll, run_once
from connector.delivery import Outcome, Signal, Verdict
from connector.delivery.gate import MailerGate
from connector.health import MailerFacts, SourceFacts, mailer_facts, mailer_finding, report, source_finding
from connector.ledger import SeenVersion
from connector.models import PlannedNotification, State, system_clock
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState
from connector.sandbox.paubox import SandboxState
from connector.web.health import routes as health_routes
from tests.conftest import BASIC, Server, write_config
from tests.factories import appointment, marker_patients

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
SETTINGS = HealthConfig(stale_after=3, stale_floor=timedelta(seconds=30))
MINUTE = timedelta(minutes=1)


def test_a_source_is_well_within_its_interval_multiple_and_failing_after_it_with_the_last_error() -> None:
    facts = SourceFacts(last_ok=NOW - timedelta(minutes=2)).failed(NOW - MINUTE, "HTTP 503 from the server")
    well = source_finding("ehr", facts, MINUTE, SETTINGS, NOW, started=NOW - timedelta(hours=1))
    assert well.ok  # 2 minutes without a completed poll, the limit is 3 intervals
    late = source_finding("ehr", facts, MINUTE, SETTINGS, NOW + timedelta(minutes=2), NOW - timedelta(hours=1))
    assert not late.ok and late.since == NOW - timedelta(minutes=2)
    assert late.reason == "no poll completed for 4m (limit 3m); last error: HTTP 503 from the server"


def test_the_floor_keeps_short_intervals_from_flapping_and_a_fresh_daemon_gets_its_first_limit() -> None:
    started = NOW - timedelta(seconds=20)
    assert source_finding("ehr", SourceFacts(), timedelta(seconds=1), SETTINGS, NOW, started).ok
    never = source_finding("ehr", SourceFacts(), timedelta(seconds=1), SETTINGS, NOW + timedelta(seconds=11), started)
    assert not never.ok and never.since == started and never.reason == "no poll completed for 31s (limit 30s)"
    # `connector status` (no daemon start to count from) says so plainly
    assert source_finding("ehr", SourceFacts(), MINUTE, SETTINGS, NOW, None).reason == "no poll has completed yet"


def test_the_newest_success_of_any_replica_counts_and_the_first_failure_after_it_is_kept() -> None:
    mine = SourceFacts().failed(NOW - timedelta(minutes=5), "timeout").failed(NOW - MINUTE, "HTTP 500")
    assert mine.failing_since == NOW - timedelta(minutes=5) and mine.last_error == "HTTP 500"
    theirs = SourceFacts(last_ok=NOW - timedelta(seconds=10))  # another replica holds the lock and polls
    merged = mine.merged(theirs)
    assert merged.last_ok == NOW - timedelta(seconds=10) and not merged.failing and merged.failing_since is None
    assert source_finding("ehr", merged, MINUTE, SETTINGS, NOW, NOW - timedelta(hours=1)).ok


def test_the_mailer_fails_when_blocked_or_broken_but_not_while_a_429_pause_runs() -> None:
    gate = MailerGate(failure_threshold=1, cooldown=MINUTE)
    assert mailer_finding(mailer_facts(gate, None, None, None)).ok
    gate.record(Outcome(Verdict.RETRY, "HTTP 429", retry_after=5, signal=Signal.RATE_LIMITED), NOW)
    paused = mailer_finding(mailer_facts(gate, None, None, NOW))
    assert paused.ok and paused.details == {"state": "paused"}
    gate.record(Outcome(Verdict.IN_DOUBT, "HTTP 502", signal=Signal.SERVER_ERROR), NOW)
    broken = mailer_finding(mailer_facts(gate, None, None, NOW))
    assert not broken.ok and broken.since == NOW and broken.reason is not None and "circuit breaker" in broken.reason
    blocked = mailer_finding(MailerFacts("blocked", "HTTP 401: check delivery.paubox.api_key", NOW))
    assert (blocked.ok, blocked.reason) == (
        False,
        "sending paused by a configuration error: HTTP 401: check delivery.paubox.api_key",
    )


def test_the_report_names_each_failing_part() -> None:
    findings = [
        source_finding("a", SourceFacts(), MINUTE, SETTINGS, NOW, NOW - timedelta(hours=1)),
        source_finding("b", SourceFacts(NOW), MINUTE, SETTINGS, NOW, NOW),
        mailer_finding(MailerFacts("blocked", "HTTP 403", NOW)),
    ]
    ok, body = report(findings)
    assert not ok and body["status"] == "failing" and body["failing"] == ["source:a", "mailer"]
    assert body["components"]["source:b"] == {"status": "ok", "since": NOW.isoformat(), "last_success": NOW.isoformat()}


# -- /metrics ---------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return str(request.getfixturevalue("pg_schema_url"))


@pytest.fixture
async def runtime(
    tmp_path: Path, ledger_url: str, api_key_env: str, fhir_state: FhirState, fhir_server: Server, paubox_server: Server
) -> AsyncIterator[Runtime]:
    people = marker_patients()[:2]
    fhir_state.load(people)
    for index, person in enumerate(people, start=1):
        fhir_state.put(appointment(f"visit-{index}", person["id"], datetime.now(UTC) + timedelta(days=index)))
    config = write_config(tmp_path, fhir_server.url, paubox_server.url, ledger_url=ledger_url, mappings=BASIC)
    opened = Runtime.open(load_config(config), system_clock)
    yield opened
    await opened.aclose()


def seed(runtime: Runtime) -> None:
    """Beside the two sent by the cycle: 2 in doubt, 1 failed, 1 skipped, a pending one due 10 minutes ago,
    one due tomorrow, and two resource versions set aside with a problem."""
    now = datetime.now(UTC)

    def planned(key: str, state: State, due: datetime) -> PlannedNotification:
        return PlannedNotification(
            key=key,
            source="ehr",
            mapping="appointment-booked",
            event="booked",
            resource_type="Appointment",
            resource_id=key,
            resource_version="1",
            patient_id="p9",
            due_at=due,
            state=state,
        )

    runtime.ledger.intake.add(
        [
            planned("d1", State.IN_DOUBT, now),
            planned("d2", State.IN_DOUBT, now),
            planned("f1", State.FAILED, now),
            planned("s1", State.SKIPPED, now),
            planned("late", State.PENDING, now - timedelta(minutes=10)),
            planned("later", State.PENDING, now + timedelta(days=1)),
        ]
    )
    runtime.ledger.intake.record_page(
        "ehr",
        [],
        [
            SeenVersion("Appointment", "bad-1", "1", None, "bad date"),
            SeenVersion("Appointment", "bad-2", "3", None, "bad reference"),
        ],
        None,
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_parse_and_show_the_ledger_gauges_and_the_cycle(
    runtime: Runtime, paubox_state: SandboxState
) -> None:
    before = datetime.now(UTC).timestamp()
    await run_once(runtime)
    assert len(paubox_state.messages) == 2
    seed(runtime)
    app = Starlette(routes=health_routes(runtime.monitor))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://connector") as client:
        answer = await client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = samples(answer.text)

    def value(name: str, **labels: str) -> float:
        return found[(name, tuple(sorted(labels.items())))]

    expected = {"pending": 2, "sending": 0, "sent": 2, "failed": 1, "in_doubt": 2, "skipped": 1, "cancelled": 0}
    assert {state: value("connector_ledger_notifications", state=state) for state in expected} == expected
    assert value("connector_in_doubt_notifications") == 2
    assert 600 <= value("connector_oldest_due_pending_seconds") < 660
    assert value("connector_quarantined_resources", source="ehr") == 2
    assert before - 1 <= value("connector_last_successful_poll_timestamp_seconds", source="ehr") <= before + 60
    assert value("connector_poll_duration_seconds_count", source="ehr") == 1
    assert value("connector_send_duration_seconds_count") == 2
    assert value("connector_notifications_total", state="sent") == 2
    assert {
        s: value("connector_mailer_state", state=s) for s in ("running", "paused", "probing", "broken", "blocked")
    } == {"running": 1, "paused": 0, "probing": 0, "broken": 0, "blocked": 0}
    assert value("connector_ready") == 1 and value("connector_component_up", component="ledger") == 1
    assert value("connector_in_doubt_alerts_total") == 0  # today's counters keep their names


def test_each_runtime_counts_in_a_registry_of_its_own() -> None:
    from connector import metrics
    from connector.metrics import Metrics

    first = metrics.install(Metrics())
    metrics.inc("connector_poll_failures_total", source="ehr")
    second = metrics.install(Metrics())
    assert first.value("connector_poll_failures_total", source="ehr") == 1
    assert second.value("connector_poll_failures_total", source="ehr") == 0
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("connector_poll_failures_total", {"source": "ehr"}) is None


@pytest.mark.postgres
async def test_a_replica_that_skips_polls_another_holds_counts_the_others_completions(
    tmp_path: Path,
    pg_schema_url: str,
    api_key_env: str,
    fhir_state: FhirState,
    fhir_server: Server,
    paubox_server: Server,
) -> None:
    config = load_config(
        write_config(
            tmp_path,
            fhir_server.url,
            paubox_server.url,
            ledger_url=pg_schema_url,
            mappings=BASIC,
            extra_source="    interval: 1s\n",
            extra="health:\n  stale_after: 1\n  stale_floor: 2s\n",
        )
    )
    first, second = Runtime.open(config, system_clock), Runtime.open(config, system_clock)
    try:
        assert (await poll(first, "ehr")).error is None
        held = first.ledger.intake.try_lock_source("ehr")  # the first replica is polling (and, as it turns out, stuck)
        assert not isinstance(held, bool)
        assert (await poll(second, "ehr")).skipped
        [finding] = [f for f in await second.monitor.findings() if f.component == "source:ehr"]
        assert finding.ok and finding.details["last_success"] is not None  # the first replica's completion
        assert second.monitor.sources["ehr"] == SourceFacts()  # a skipped poll is neither success nor failure
        await asyncio.sleep(2.2)
        [finding] = [f for f in await second.monitor.findings() if f.component == "source:ehr"]
        assert not finding.ok and finding.reason is not None and "no poll completed for 2s" in finding.reason
        first.ledger.intake.unlock_source(held)
        assert (await poll(second, "ehr")).error is None
        await asyncio.sleep(1.1)  # the rows read by readiness are reused for a second
        assert all(f.ok for f in await first.monitor.findings())  # the second replica's completion counts
    finally:
        await first.aclose()
        await second.aclose()
