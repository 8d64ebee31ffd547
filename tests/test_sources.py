"""Real EHR behaviours: each change turned into the right transition exactly once.

The FHIR test server plays a generic R4 server (history, late commits, flaky), an Epic-like one (no
_lastUpdated, no history, no _include) and an Oracle Health-like one (a practitioner list and a date range
per request); a Backport subscription drops an event and the resync recovers it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from connector.config import load_config
from connector.config.sources import FhirPollSourceConfig
from connector.daemon import run_once, web_server
from connector.delivery.paubox import PauboxRestMailer
from connector.models import Clock, State
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import SandboxState
from connector.sandbox.paubox import create_app as paubox_app
from connector.sources.fhir_poll import FhirPollSource, fhir_instant
from tests.conftest import API_KEY, Server, free_port, write_config
from tests.factories import patient

NOW = datetime.now(UTC).replace(microsecond=0)
MAPPINGS = ("appointment-booked", "appointment-cancelled", "appointment-rescheduled")


def visit(
    aid: str, start: datetime, status: str = "booked", practitioner: str = "Practitioner/dr1", pid: str = "p1"
) -> dict[str, Any]:
    return {
        "resourceType": "Appointment",
        "id": aid,
        "status": status,
        "start": start.isoformat(),
        "end": (start + timedelta(minutes=30)).isoformat(),
        "participant": [
            {"actor": {"reference": f"Patient/{pid}"}, "status": "accepted"},
            {"actor": {"reference": practitioner}, "status": "accepted"},
        ],
    }


class Ehr:
    def __init__(self, runtime: Runtime, fhir: FhirState, paubox: SandboxState) -> None:
        self.runtime, self.fhir, self.paubox = runtime, fhir, paubox

    async def cycle(self) -> None:
        await run_once(self.runtime)

    def sent(self) -> list[str]:
        return [
            r.mapping for r in sorted(self.runtime.ledger.reports.notifications([State.SENT], 100), key=lambda r: r.id)
        ]


async def make(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, mode: str = "full", clock: Clock = lambda: NOW
) -> Ehr:
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    fhir, paubox = FhirState(), SandboxState(api_key=API_KEY, username="clinic")
    fhir.mode = mode
    fhir.put(patient("p1", "Robin", email="robin@example.org"))
    fhir.put(patient("p2", "Sam", email="sam@example.org"))
    config = load_config(
        write_config(tmp_path, "http://fhir.test", "https://paubox.test", mappings=MAPPINGS, extra_source=source)
    )
    mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(paubox)))
    runtime = Runtime.open(config, clock, mailer=mailer, source_transport=httpx.ASGITransport(app=fhir_app(fhir)))
    return Ehr(runtime, fhir, paubox)


@pytest.fixture
async def history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Ehr]:
    ehr = await make(tmp_path, monkeypatch, "    strategy: history\n")
    yield ehr
    await ehr.runtime.aclose()


async def test_history_turns_versions_and_deletes_into_one_change_each(history: Ehr) -> None:
    history.fhir.put(visit("a1", NOW + timedelta(days=3)))
    await history.cycle()
    history.fhir.put(visit("a1", NOW + timedelta(days=4)))  # two updates between polls: one reschedule
    history.fhir.put(visit("a1", NOW + timedelta(days=5)))
    await history.cycle()
    history.fhir.delete("Appointment", "a1")
    await history.cycle()
    await history.cycle()
    assert history.sent() == ["appointment-booked", "appointment-rescheduled", "appointment-cancelled"]


async def test_a_late_commit_inside_the_overlap_is_found_by_the_next_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [NOW]
    ehr = await make(tmp_path, monkeypatch, "    interval: 1s\n    sweep: 1m\n", clock=lambda: now[0])
    ehr.fhir.put(visit("a1", NOW + timedelta(days=3)))
    await ehr.cycle()  # the first poll of a process is a sweep
    cursor = ehr.runtime.ledger.intake.cursor("ehr")
    assert cursor is not None
    # Committed late: visible only now, stamped a minute before what the cursor already passed.
    ehr.fhir.put(visit("late", NOW + timedelta(days=3), pid="p2"), when=cursor - timedelta(minutes=1))
    ehr.fhir.put(visit("new", NOW + timedelta(days=4), pid="p2"))
    ehr.fhir.requests.clear()
    now[0] += timedelta(seconds=30)
    await ehr.cycle()  # a quick poll: from where the last one ended, so it sees the new one only
    assert f"_lastUpdated=ge{fhir_instant(cursor)}" in unquote(ehr.fhir.requests[0])
    assert len(ehr.paubox.messages) == 2
    now[0] += timedelta(seconds=31)
    await ehr.cycle()  # a minute after the last sweep: the overlap is read again
    assert sorted(m["custom_headers"]["X-Notification-Key"].split("|")[0] for m in ehr.paubox.messages) == [
        "ehr:appointment-booked:a1",
        "ehr:appointment-booked:late",
        "ehr:appointment-booked:new",
    ]
    await ehr.runtime.aclose()


async def test_with_sweep_0s_every_poll_reads_the_overlap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ehr = await make(tmp_path, monkeypatch, "    sweep: 0s\n")
    ehr.fhir.put(visit("a1", NOW + timedelta(days=3)))
    await ehr.cycle()
    cursor = ehr.runtime.ledger.intake.cursor("ehr")
    assert cursor is not None
    ehr.fhir.put(visit("late", NOW + timedelta(days=3), pid="p2"), when=cursor - timedelta(minutes=1))
    await ehr.cycle()
    assert sorted(m["recipients"][0] for m in ehr.paubox.messages) == ["robin@example.org", "sam@example.org"]
    await ehr.runtime.aclose()


async def test_a_flaky_server_loses_and_duplicates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ehr = await make(tmp_path, monkeypatch, "")
    ehr.fhir.flaky, ehr.fhir.seed = 0.3, 7
    for index in range(8):
        ehr.fhir.put(visit(f"a{index}", NOW + timedelta(days=3, hours=index), pid="p1" if index % 2 else "p2"))
    for _ in range(6):
        await ehr.cycle()
    keys = [m["custom_headers"]["X-Notification-Key"] for m in ehr.paubox.messages]
    assert len(keys) == len(set(keys)) == 8
    await ehr.runtime.aclose()


EPIC = "    strategy: date-window\n    window:\n      past: 1d\n      future: 14d\n"
CERNER = EPIC + "      scope:\n        practitioners: [Practitioner/dr1, Practitioner/dr2]\n"


@pytest.mark.parametrize(("mode", "source"), [("epic", EPIC), ("cerner", CERNER)])
async def test_date_windows_see_new_changed_and_vanished_appointments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, source: str
) -> None:
    ehr = await make(tmp_path, monkeypatch, source, mode)
    ehr.fhir.put(visit("a1", NOW + timedelta(days=3)))
    ehr.fhir.put(visit("a2", NOW + timedelta(days=4), practitioner="Practitioner/dr2", pid="p2"))
    await ehr.cycle()
    ehr.fhir.put(visit("a1", NOW + timedelta(days=6)))  # moved
    ehr.fhir.delete("Appointment", "a2")  # vanished: read by id, gone
    await ehr.cycle()
    await ehr.cycle()
    assert sorted(ehr.sent()) == [
        "appointment-booked",
        "appointment-booked",
        "appointment-cancelled",
        "appointment-rescheduled",
    ]
    assert not [r for r in ehr.fhir.requests if "_lastUpdated" in r or "_history" in r]
    await ehr.runtime.aclose()


async def test_an_oracle_style_server_refusing_the_search_is_a_clear_source_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ehr = await make(tmp_path, monkeypatch, EPIC, "cerner")  # no practitioner/location list configured
    report = await run_once(ehr.runtime)
    assert report.polls[0].error is not None and "HTTP 400" in report.polls[0].error
    await ehr.runtime.aclose()


SUBSCRIPTION = (
    "    subscription:\n      enabled: true\n      kind: backport\n      secret: ${SUB_SECRET}\n"
    "      topic: http://fhir.test/SubscriptionTopic/appointment-changed\n"
    "      payload: id-only\n      endpoint: {endpoint}\n"
)


async def test_a_dropped_subscription_event_is_recovered_by_the_resync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUB_SECRET", "Bearer sub-secret")
    monkeypatch.setenv("PAUBOX_API_KEY", API_KEY)
    fhir, paubox = FhirState(), SandboxState(api_key=API_KEY, username="clinic")
    fhir.put(patient("p1", "Robin", email="robin@example.org"))
    fhir.put(patient("p2", "Sam", email="sam@example.org"))
    with Server(fhir_app(fhir)) as ehr_server:
        port = free_port()
        endpoint = f"http://127.0.0.1:{port}/fhir/ehr/notify"
        config = load_config(
            write_config(
                tmp_path,
                ehr_server.url,
                "https://paubox.test",
                mappings=MAPPINGS,
                extra_source=SUBSCRIPTION.replace("{endpoint}", endpoint),
                extra=f"server:\n  host: 127.0.0.1\n  port: {port}\n",
            )
        )
        mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(paubox)))
        runtime = Runtime.open(config, lambda: NOW, mailer=mailer)
        server = web_server(runtime)  # in this loop, as `connector run` serves it
        assert server is not None
        serving = asyncio.create_task(server.serve())
        try:
            while not server.started:
                await asyncio.sleep(0.02)
            reference, _ = await runtime.subscriptions.subscribe("ehr")
            assert reference.startswith("Subscription/")
            async with httpx.AsyncClient() as http:
                await http.post(f"{ehr_server.url}/_test/flush")  # the handshake
                fhir.put(visit("a1", NOW + timedelta(days=3)))
                await http.post(f"{ehr_server.url}/_test/flush")
                await runtime.dispatcher.run()
                assert len(paubox.messages) == 1
                fhir.drop_notifications = 1
                fhir.put(visit("a2", NOW + timedelta(days=3), pid="p2"))  # its notification is lost
                fhir.put(visit("a3", NOW + timedelta(days=4)))  # this one reveals the gap
                await http.post(f"{ehr_server.url}/_test/flush")
            task = runtime.subscriptions._resyncs.get("ehr")
            assert task is not None, "the gap was not noticed"
            await task
            await runtime.dispatcher.run()
            assert sorted(m["recipients"][0] for m in paubox.messages) == [
                "robin@example.org",
                "robin@example.org",
                "sam@example.org",
            ]
        finally:
            server.should_exit = True
            await serving
            await runtime.aclose()


async def test_polls_read_the_next_page_ahead_and_small_searches_do_not() -> None:
    fhir = FhirState()
    for index in range(5):
        fhir.put(patient(f"p{index}", f"Person{index}", email=f"p{index}@example.org"))
        fhir.put(visit(f"a{index}", NOW + timedelta(days=3), pid=f"p{index}"))
    config = FhirPollSourceConfig(base_url="http://fhir.test", page_size=2)
    source = FhirPollSource("ehr", config, transport=httpx.ASGITransport(app=fhir_app(fhir)))
    try:
        found = await source.search("Patient", [("_count", "2")], limit_pages=1)
        assert [p["id"] for p in found] == ["p0", "p1"] and len(fhir.requests) == 1
        fhir.requests.clear()
        pages = source.pages(None)
        await anext(pages)  # page 1 handed over: page 2 is already on its way
        await asyncio.sleep(0.05)
        assert len(fhir.requests) == 2
        await pages.aclose()  # type: ignore[attr-defined]
    finally:
        await source.aclose()
