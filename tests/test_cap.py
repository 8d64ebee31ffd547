"""The per-patient daily safety cap (`limits.per_patient_per_day`): the pure decision as a table, then the
dispatcher against the FHIR test server and the Paubox sandbox — a patient over the cap gets the rest the
next local day (deferred), or never (skipped, with the reason); other patients are not held up."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest

from connector.cap import Deferred, Skipped, local_day, over_cap
from connector.commands.ledger import status
from connector.config import load_config
from connector.crm.appointments import CONTACT
from connector.daemon import run_once
from connector.delivery.paubox import PauboxRestMailer
from connector.ledger import NotificationRecord
from connector.models import State
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import SandboxState
from connector.sandbox.paubox import create_app as paubox_app
from connector.timing import QuietHours
from tests.conftest import BASIC, write_config
from tests.factories import appointment, patient

ZONE = "America/New_York"
NY = ZoneInfo(ZONE)


@pytest.mark.parametrize(
    ("now", "count", "limit", "quiet", "start", "mode", "expected"),
    [
        # under the cap, or no cap
        (datetime(2026, 12, 1, 15, 0, tzinfo=NY), 2, 3, None, None, "defer", None),
        (datetime(2026, 12, 1, 15, 0, tzinfo=NY), 50, None, None, None, "defer", None),
        # at the cap: the next local midnight (New York), not the next UTC midnight
        (
            datetime(2026, 12, 1, 22, 30, tzinfo=NY),
            3,
            3,
            None,
            None,
            "defer",
            datetime(2026, 12, 2, 0, 0, tzinfo=NY),
        ),
        # ... past quiet hours that cover midnight
        (
            datetime(2026, 12, 1, 15, 0, tzinfo=NY),
            3,
            3,
            QuietHours(time(21, 0), time(8, 0)),
            None,
            "defer",
            datetime(2026, 12, 2, 8, 0, tzinfo=NY),
        ),
        # a day after a DST change is still the next calendar day
        (
            datetime(2026, 3, 7, 12, 0, tzinfo=NY),
            1,
            1,
            None,
            None,
            "defer",
            datetime(2026, 3, 8, 0, 0, tzinfo=NY),
        ),
        # skip mode, and a deferral that would reach the appointment start
        (datetime(2026, 12, 1, 15, 0, tzinfo=NY), 3, 3, None, None, "skip", "skip"),
        (
            datetime(2026, 12, 1, 15, 0, tzinfo=NY),
            3,
            3,
            None,
            datetime(2026, 12, 1, 23, 0, tzinfo=NY),
            "defer",
            "skip",
        ),
    ],
)
def test_the_cap_decision(
    now: datetime,
    count: int,
    limit: int | None,
    quiet: QuietHours | None,
    start: datetime | None,
    mode: str,
    expected: object,
) -> None:
    verdict = over_cap(count=count, limit=limit, now=now, zone=ZONE, quiet=quiet, start=start, mode=mode)  # type: ignore[arg-type]
    if expected is None:
        assert verdict is None
    elif expected == "skip":
        assert isinstance(verdict, Skipped) and f"limit {limit}" in verdict.reason
    else:
        assert isinstance(verdict, Deferred) and verdict.due == expected and "deferred" in verdict.reason


def test_a_local_day_is_23_hours_when_clocks_go_forward() -> None:
    since, until = local_day(datetime(2026, 3, 8, 12, 0, tzinfo=UTC), ZONE)
    assert until - since == timedelta(hours=23) and since.astimezone(NY).hour == 0


NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def fhir() -> FhirState:
    state = FhirState()
    state.load([patient("p1", "Capped", email="capped@example.org"), patient("p2", "Other", email="other@example.org")])
    for index in range(1, 5):  # four bookings of one patient, one of another
        state.put(appointment(f"a{index}", "p1", NOW + timedelta(days=3, hours=index)))
    state.put(appointment("b1", "p2", NOW + timedelta(days=3)))
    return state


@pytest.fixture
def paubox() -> SandboxState:
    return SandboxState(api_key="test-sandbox-key", username="clinic")


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
async def capped(
    tmp_path: Path, fhir: FhirState, paubox: SandboxState, api_key_env: str
) -> AsyncIterator[Callable[[str], tuple[Runtime, Clock]]]:
    runtimes: list[Runtime] = []

    def open_runtime(mode: str) -> tuple[Runtime, Clock]:
        path = write_config(
            tmp_path,
            "http://fhir.test",
            "https://paubox.test",
            mappings=BASIC,
            extra=f"limits:\n  per_patient_per_day: 2\n  over_cap: {mode}\n",
        )
        config = load_config(path)
        mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(paubox)))
        clock = Clock(NOW)
        runtime = Runtime.open(config, clock, mailer=mailer, source_transport=httpx.ASGITransport(app=fhir_app(fhir)))
        runtimes.append(runtime)
        return runtime, clock

    yield open_runtime
    for runtime in runtimes:
        await runtime.aclose()


def recipients(paubox: SandboxState) -> list[str]:
    return sorted(r for m in paubox.messages for r in m["recipients"])


async def test_over_the_cap_waits_for_the_next_local_day(
    capped: Callable[..., tuple[Runtime, Clock]], paubox: SandboxState
) -> None:
    runtime, clock = capped("defer")
    report = await run_once(runtime)
    assert report.dispatch is not None and report.dispatch.steps["deferred"] == 2
    assert recipients(paubox) == ["capped@example.org"] * 2 + ["other@example.org"]
    await run_once(runtime)  # the same day: nothing more
    assert len(paubox.messages) == 3
    waiting = [n for n in runtime.ledger.reports.notifications([State.PENDING], 10)]
    _, midnight = local_day(NOW, ZONE)
    assert len(waiting) == 2 and all(n.due_at == midnight and "daily cap" in (n.reason or "") for n in waiting)
    clock.now = midnight + timedelta(minutes=1)  # the next day: two more places
    await run_once(runtime)
    assert recipients(paubox) == ["capped@example.org"] * 4 + ["other@example.org"]


async def test_over_the_cap_is_skipped_with_the_reason_when_so_configured(
    capped: Callable[..., tuple[Runtime, Clock]], paubox: SandboxState
) -> None:
    runtime, clock = capped("skip")
    await run_once(runtime)
    clock.now = NOW + timedelta(days=1)
    await run_once(runtime)
    assert recipients(paubox) == ["capped@example.org"] * 2 + ["other@example.org"]
    skipped = status(runtime.config)["suppressed"]
    assert len(skipped) == 2 and all(n.state is State.SKIPPED and "daily cap" in (n.reason or "") for n in skipped)


def crm_record(notification_id: int, patient_id: str, kind: str = "CrmAppointment") -> NotificationRecord:
    return NotificationRecord(
        id=notification_id,
        key=f"crm|CrmEvent|{notification_id}|welcome",
        source="crm",
        mapping="welcome",
        event="contact.created",
        resource_type=kind,
        resource_id=str(notification_id),
        resource_version="1",
        patient_id=patient_id,
        state=State.PENDING,
        reason=None,
        attempts=0,
        due_at=NOW,
        tracking_id=None,
        updated_at=NOW,
    )


@pytest.mark.parametrize(("kind", "placeholder"), [("CrmEvent", ""), ("CrmAppointment", CONTACT)])
async def test_notifications_that_name_no_patient_are_not_capped_together(
    capped: Callable[..., tuple[Runtime, Clock]], kind: str, placeholder: str
) -> None:
    # A CRM event names no patient (""), nor does a CRM appointment without a `contact:` path ("contact"):
    # counted together, the cap would hold back every email of the source after the first two of the day.
    runtime, _ = capped("skip")
    cap = runtime.dispatcher.cap
    assert cap is not None
    verdicts = [await cap.check(crm_record(i, placeholder, kind), NOW) for i in range(1, 5)]
    assert verdicts == [None] * 4
    assert [await cap.check(crm_record(i, "contact-7"), NOW) for i in range(5, 8)][:2] == [None, None]
    assert isinstance(await cap.check(crm_record(8, "contact-7"), NOW), Skipped)
