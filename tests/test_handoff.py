"""Hand-off to staff when email cannot reach a patient: one FHIR Task per appointment and patient on the FHIR
test server (a later reason is added to it as a note, by a version-aware update), only for the configured
reasons; or a signed Standard Webhooks POST, retried under the same webhook-id until the receiver takes it."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from connector import optout
from connector.bounces import Tally, skip_reason
from connector.commands.ledger import status
from connector.config import load_config
from connector.config.handoff import HandoffConfig
from connector.config.sources import FhirPollSourceConfig
from connector.crm.verify import verify_standard_webhook
from connector.daemon import run_once
from connector.delivery.paubox import PauboxRestMailer
from connector.errors import ConfigError, SourceError
from connector.handoff import Rules, category_optout, reason_of, rules_for, task_identifier, wanted
from connector.ledger.writeback import WriteBackJob
from connector.mapping.loader import MappingSet, load_mappings
from connector.mapping.spec import HandoffSpec
from connector.models import State
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import Fault, SandboxState
from connector.sandbox.paubox import create_app as paubox_app
from connector.sending.handoff import HandOff
from connector.sources.fhir_poll import FhirPollSource
from connector.sources.fhir_write import FhirWriter
from tests.conftest import Server, write_config
from tests.factories import appointment, patient

NOW = datetime.now(UTC).replace(microsecond=0)
SECRET = "whsec_" + base64.b64encode(b"hand-off signing secret, made up").decode()
MAPPINGS = ("appointment-booked", "appointment-reminder-48h")


@pytest.fixture
def fhir() -> FhirState:
    state = FhirState()
    state.load([patient("p1", "Reachable", email="reachable@example.org"), patient("p9", "Unreachable")])
    state.put(appointment("a1", "p1", NOW + timedelta(days=3)))
    state.put(appointment("a9", "p9", NOW + timedelta(days=3)))
    return state


@pytest.fixture
def paubox() -> SandboxState:
    return SandboxState(api_key="test-sandbox-key", username="clinic")


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Receiver:
    """A work queue's webhook endpoint: answers `statuses` in turn (then 204), keeps what it received."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.app = Starlette(routes=[Route("/queue", self.take, methods=["POST"])])

    async def take(self, request: Request) -> Response:
        self.received.append((dict(request.headers), await request.body()))
        return Response(status_code=self.statuses.pop(0) if self.statuses else 204)


Opener = Callable[..., tuple[Runtime, Clock]]


@pytest.fixture
async def opened(tmp_path: Path, fhir: FhirState, paubox: SandboxState, api_key_env: str) -> AsyncIterator[Opener]:
    runtimes: list[Runtime] = []

    def open_runtime(
        handoff: str | None,
        receiver: Receiver | None = None,
        mapping_extra: dict[str, str] | None = None,
        handoff_transport: httpx.AsyncBaseTransport | None = None,
    ) -> tuple[Runtime, Clock]:
        """`handoff`: the section's keys (None: no `handoff:` section); `mapping_extra`: lines added to
        these mapping files; `handoff_transport`: the webhook's transport (else the receiver's app)."""
        path = write_config(
            tmp_path,
            "http://fhir.test",
            "https://paubox.test",
            mappings=MAPPINGS,
            source={"write_back": {"identifier_system": "urn:example:connector", "retry_backoff": "10ms"}},
            extra="" if handoff is None else f"handoff:\n{handoff}",
        )
        for name, lines in (mapping_extra or {}).items():
            with (tmp_path / "mappings" / f"{name}.yaml").open("a") as file:
                file.write(lines)
        config = load_config(path)
        mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_app(paubox)))
        clock = Clock(NOW)
        runtime = Runtime.open(
            config,
            clock,
            mailer=mailer,
            source_transport=httpx.ASGITransport(app=fhir_app(fhir)),
            handoff_transport=handoff_transport or (httpx.ASGITransport(app=receiver.app) if receiver else None),
        )
        runtimes.append(runtime)
        return runtime, clock

    yield open_runtime
    for runtime in runtimes:
        await runtime.aclose()


def tasks(fhir: FhirState) -> list[dict[str, Any]]:
    return list(fhir.of_type("Task"))


TASK = "  to: task\n  owner: Organization/front-desk\n"


async def test_no_usable_address_gives_one_task_and_a_later_reason_is_added_to_it(
    opened: Opener, fhir: FhirState, paubox: SandboxState
) -> None:
    runtime, clock = opened(TASK)
    await run_once(runtime)
    await run_once(runtime)
    assert [m["recipients"] for m in paubox.messages] == [["reachable@example.org"]]
    [one] = tasks(fhir)
    assert (one["status"], one["intent"]) == ("requested", "order")
    assert one["focus"] == {"reference": "Appointment/a9"} and one["for"] == {"reference": "Patient/p9"}
    assert one["owner"] == {"reference": "Organization/front-desk"}
    assert one["identifier"] == [{"system": "urn:example:connector", "value": task_identifier("ehr", "a9", "p9")}]
    assert "no usable email address" in one["description"] and "appointment-booked" in one["description"]
    assert len(one["note"]) == 1
    # Two days later the 48-hour reminder is skipped too: the same Task, with a second note.
    clock.now = NOW + timedelta(days=1, hours=1)
    await run_once(runtime)
    await run_once(runtime)
    [same] = tasks(fhir)
    assert same["id"] == one["id"] and len(same["note"]) == 2
    assert "appointment-reminder-48h" in same["note"][1]["text"]
    assert len(fhir.writes) == 3  # a create, a conditional create that found it, an update
    assert status(runtime.config)["write_back"] == {
        ("handoff", "done"): 2,
    }


async def test_only_the_configured_reasons_are_handed_off(opened: Opener, fhir: FhirState) -> None:
    runtime, _ = opened(TASK + "  reasons: [failed, bounce]\n")
    await run_once(runtime)
    assert tasks(fhir) == []
    skipped = runtime.ledger.reports.notifications([State.SKIPPED], 10)
    assert len(skipped) == 1  # it was skipped, and nobody is asked to call


async def test_a_webhook_hand_off_is_signed_and_retried_under_one_id(
    opened: Opener, fhir: FhirState, tmp_path: Path
) -> None:
    receiver = Receiver([503])
    (tmp_path / "handoff.secret").write_text(SECRET)
    runtime, _ = opened(
        "  to: webhook\n  url: https://queue.example.org/queue\n  secret: {file: handoff.secret}\n", receiver
    )
    await run_once(runtime)
    await asyncio.sleep(0.05)  # past the backoff
    await run_once(runtime)
    await run_once(runtime)
    assert len(receiver.received) == 2 and tasks(fhir) == []
    (first_headers, _), (headers, body) = receiver.received
    assert first_headers["webhook-id"] == headers["webhook-id"]
    verify_standard_webhook(SECRET, headers, body, time.time())
    event = json.loads(body)
    assert event["type"] == "handoff.requested" and event["reason"] == "no-address"
    assert event["resource"] == "Appointment/a9" and event["patient"] == "Patient/p9"
    assert b"example.org" not in body  # no address in the event


async def test_a_webhook_receivers_endless_reply_is_read_only_up_to_a_bound(opened: Opener, tmp_path: Path) -> None:
    """A receiver that takes the event and answers 2xx with a body of 8 MiB: at most 64 KiB of it is read,
    and the hand-off is written (not tried again)."""
    pulled: list[int] = []
    posts: list[bytes] = []

    async def reply_body() -> AsyncIterator[bytes]:
        for _ in range(512):
            pulled.append(16384)
            yield b"x" * 16384

    def handler(request: httpx.Request) -> httpx.Response:
        posts.append(request.content)
        return httpx.Response(200, content=reply_body())

    (tmp_path / "handoff.secret").write_text(SECRET)
    runtime, _ = opened(
        "  to: webhook\n  url: https://queue.example.org/queue\n  secret: {file: handoff.secret}\n",
        handoff_transport=httpx.MockTransport(handler),
    )
    await run_once(runtime)
    await asyncio.sleep(0.05)  # past any backoff
    await run_once(runtime)
    assert len(posts) == 1  # taken at the first try
    assert 0 < sum(pulled) <= 64 * 1024 + 16384
    assert status(runtime.config)["write_back"] == {("handoff", "done"): 1}


async def test_a_webhook_receiver_that_answers_without_end_in_time_is_tried_again(
    opened: Opener, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply trickling a chunk per second (each read within the client's timeout) is given up at the POST's
    deadline and the hand-off tried again later, rather than holding the write-back forever."""
    monkeypatch.setattr("connector.sending.handoff.DEADLINE", 0.3)

    async def trickle() -> AsyncIterator[bytes]:
        for _ in range(30):
            await asyncio.sleep(1)
            yield b"x"

    (tmp_path / "handoff.secret").write_text(SECRET)
    runtime, _ = opened(
        "  to: webhook\n  url: https://queue.example.org/queue\n  secret: {file: handoff.secret}\n",
        handoff_transport=httpx.MockTransport(lambda request: httpx.Response(200, content=trickle())),
    )
    started = time.monotonic()
    await run_once(runtime)
    assert time.monotonic() - started < 10
    assert status(runtime.config)["write_back"] == {("handoff", "pending"): 1}


@pytest.mark.parametrize(
    ("state", "reason", "expected"),
    [
        (State.SKIPPED, "Patient/p9 has no usable email address", "no-address"),
        (State.SKIPPED, "Patient/p9 not found on source 'ehr'", "no-address"),
        (State.SKIPPED, "Patient/p9 opted out (by email, 2026-11-30)", "opted-out"),
        (State.SKIPPED, skip_reason("p9", Tally(0, None, NOW, "hard bounce", None)), "bounce"),
        (State.FAILED, "gave up after 5 attempts", "failed"),
        (State.SKIPPED, "Patient/p9 is recorded as deceased", None),  # nobody should call
        (State.SKIPPED, "Patient/p9: Consent/c1 denies this purpose", None),
        (State.CANCELLED, "the appointment was cancelled", None),
        (State.SENT, None, None),
    ],
)
def test_which_endings_are_handed_off(state: State, reason: str | None, expected: str | None) -> None:
    assert reason_of(state, reason) == expected


async def test_an_email_paubox_refuses_is_handed_off_as_failed(
    opened: Opener, fhir: FhirState, paubox: SandboxState
) -> None:
    paubox.faults = [Fault(status=400)]
    runtime, _ = opened(TASK + "  reasons: [failed]\n")
    await run_once(runtime)
    await run_once(runtime)
    [failed] = runtime.ledger.reports.notifications([State.FAILED], 10)
    [one] = tasks(fhir)
    assert one["focus"] == {"reference": f"Appointment/{failed.resource_id}"}
    assert "the email could not be sent" in one["description"]


async def test_hand_offs_racing_for_one_appointment_leave_one_task_with_every_reason(
    tmp_path: Path, fhir_state: FhirState, fhir_server: Server
) -> None:
    """Five skipped notifications of one appointment handed off at once (as replicas would): one Task, five
    notes; the updates that lost the race (412) read the Task again and add their note."""
    path = write_config(tmp_path, fhir_server.url, "https://paubox.test", mappings=MAPPINGS, extra=f"handoff:\n{TASK}")
    config = load_config(path)
    assert config.handoff is not None
    source = FhirPollSource("ehr", FhirPollSourceConfig(base_url=fhir_server.url, timeout=timedelta(seconds=5)))
    writers = [FhirWriter(source) for _ in range(5)]
    handoffs = [HandOff(config, config.handoff, MappingSet([])) for _ in range(5)]

    def job(index: int) -> WriteBackJob:
        return WriteBackJob(
            index, "handoff", "ehr", 0, index, f"key-{index}", f"mapping-{index}", "booked", "Appointment",
            "a9", "p9", State.SKIPPED, "Patient/p9 has no usable email address", None,
        )  # fmt: skip

    try:
        first = await asyncio.gather(
            *(h.write(job(i), w) for i, (h, w) in enumerate(zip(handoffs, writers, strict=True))),
            return_exceptions=True,
        )
        # Those that lost the race too often end as SourceError: the daemon tries them again later.
        outcomes = [
            result if not isinstance(result, BaseException) else await handoffs[i].write(job(i), writers[i])
            for i, result in enumerate(first)
        ]
    finally:
        await source.aclose()
    assert all(not isinstance(r, BaseException) or isinstance(r, SourceError) for r in first)
    assert sorted(o for o, _ in outcomes) == ["written"] * 5 and len({t for _, t in outcomes}) == 1
    [one] = fhir_state.of_type("Task")
    assert sorted(n["text"].split("(")[1].split(")")[0] for n in one["note"]) == [f"mapping-{i}" for i in range(5)]
    assert any(w.status == 412 for w in fhir_state.writes)  # the race did happen


# --- A mapping's own `handoff:` ------------------------------------------------------------------------------


async def test_a_mapping_can_turn_its_hand_off_off(opened: Opener, fhir: FhirState) -> None:
    runtime, clock = opened(TASK, mapping_extra={"appointment-booked": "handoff: false\n"})
    await run_once(runtime)
    await run_once(runtime)
    assert tasks(fhir) == []  # the booking confirmation to p9 was skipped, and not handed off
    clock.now = NOW + timedelta(days=1, hours=1)
    await run_once(runtime)
    await run_once(runtime)
    [one] = tasks(fhir)  # the 48-hour reminder is handed off as the config says
    assert [n["text"].split("(")[1].split(")")[0] for n in one["note"]] == ["appointment-reminder-48h"]


async def test_a_mapping_can_turn_a_hand_off_on_without_a_handoff_section(opened: Opener, fhir: FhirState) -> None:
    own = "handoff:\n  owner: Organization/nurses\n"
    runtime, clock = opened(None, mapping_extra={"appointment-reminder-48h": own})
    await run_once(runtime)
    await run_once(runtime)
    assert tasks(fhir) == []  # appointment-booked has no hand-off
    clock.now = NOW + timedelta(days=1, hours=1)
    await run_once(runtime)
    await run_once(runtime)
    [one] = tasks(fhir)
    assert one["owner"] == {"reference": "Organization/nurses"} and one["for"] == {"reference": "Patient/p9"}
    assert "appointment-reminder-48h" in one["description"]


@pytest.mark.parametrize(
    ("handoff", "mapping", "handed_off"),
    [
        (TASK + "  mappings: [appointment-reminder-48h]\n", "handoff: true\n", True),  # on over the list
        (TASK, "handoff:\n  reasons: [failed]\n", False),  # the mapping's reasons over the config's
        (TASK + "  reasons: [failed]\n", "handoff:\n  reasons: [no-address]\n", True),
        (TASK, "handoff:\n  owner: Organization/nurses\n", True),
    ],
)
async def test_a_mappings_hand_off_keys_override_the_configs(
    opened: Opener, fhir: FhirState, handoff: str, mapping: str, handed_off: bool
) -> None:
    runtime, _ = opened(handoff, mapping_extra={"appointment-booked": mapping})
    await run_once(runtime)
    await run_once(runtime)
    found = tasks(fhir)
    assert len(found) == (1 if handed_off else 0)
    if "nurses" in mapping:
        assert found[0]["owner"] == {"reference": "Organization/nurses"}  # the mapping's owner over the config's


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("handoff: sometimes", "line 9 (handoff): expected true, false, or hand-off keys"),
        ("handoff:\n  reasons: [maybe]", "line 10 (handoff.reasons.0): Input should be 'no-address'"),
        ("handoff:\n  owner: Patient/p1", "line 10 (handoff.owner): String should match pattern"),
        ("handoff:\n  to: webhook", "line 9 (handoff): to: set in the config's `handoff:` section"),
    ],
)
def test_a_mappings_hand_off_is_checked_with_file_and_line(tmp_path: Path, value: str, problem: str) -> None:
    folder = tmp_path / "mappings"
    folder.mkdir()
    (folder / "reminder.txt").write_text("Hi")
    (folder / "reminder.yaml").write_text(
        "name: reminder\ntrigger:\n  resource: Appointment\n  event: booked\n"
        f'templates:\n  subject: "Hello"\n  text: reminder.txt\ncategory: reminders\n{value}\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_mappings(folder)
    [found] = [str(p) for p in caught.value.problems]
    assert found.startswith(str(folder / "reminder.yaml")) and problem in found, found


# --- Opt-outs of a category ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("handoff", "mapping", "category", "handed_off"),
    [
        (TASK, "", "reminders", False),  # the patient chose not to get reminders: nobody calls
        (TASK + "  category_optouts: true\n", "", "reminders", True),
        (TASK, "handoff:\n  category_optouts: true\n", "reminders", True),  # the mapping's over the config's
        (TASK + "  category_optouts: true\n", "handoff:\n  category_optouts: false\n", "reminders", False),
        (TASK, "", "", True),  # an opt-out of every email is handed off
    ],
)
async def test_an_opt_out_of_a_category_is_handed_off_only_when_configured(
    opened: Opener, fhir: FhirState, paubox: SandboxState, handoff: str, mapping: str, category: str, handed_off: bool
) -> None:
    runtime, clock = opened(handoff, mapping_extra={"appointment-reminder-48h": mapping})
    address = "reachable@example.org"
    runtime.ledger.optouts.add(
        "email", optout.digest("email", address), optout.hint("email", address), None, category=category, origin="link"
    )
    await run_once(runtime)
    clock.now = NOW + timedelta(days=1, hours=1)
    await run_once(runtime)
    await run_once(runtime)
    skipped = [n for n in runtime.ledger.reports.notifications([State.SKIPPED], 10) if n.resource_id == "a1"]
    assert {n.mapping for n in skipped} == (
        {"appointment-reminder-48h"} if category else {"appointment-booked", "appointment-reminder-48h"}
    )
    about_a1 = [t for t in tasks(fhir) if t["focus"] == {"reference": "Appointment/a1"}]
    assert len(about_a1) == (1 if handed_off else 0)
    if handed_off:
        assert "opted out of email" in about_a1[0]["description"]
    assert address not in str(tasks(fhir))
    assert len([t for t in tasks(fhir) if t["focus"] == {"reference": "Appointment/a9"}]) == 1  # no address: always


CATEGORY_OPTOUT = "Patient/p1 opted out of 'reminders' email (by email, operator, 2026-11-30)"
EVERY_OPTOUT = "Patient/p1 opted out (by email, link, 2026-11-30)"


@pytest.mark.parametrize(
    ("reason", "categories", "essential", "expected"),
    [
        (CATEGORY_OPTOUT, False, False, None),
        (CATEGORY_OPTOUT, True, False, "opted-out"),
        (CATEGORY_OPTOUT, False, True, "opted-out"),  # an essential message stopped: someone must call
        (EVERY_OPTOUT, False, False, "opted-out"),
        ("Patient/p1 opted out (by email, bounce, 2026-11-30)", False, False, "bounce"),
        ("Patient/p1 has no usable email address", False, False, "no-address"),
    ],
)
def test_which_opt_outs_are_handed_off(reason: str, categories: bool, essential: bool, expected: str | None) -> None:
    rules = Rules(("no-address", "opted-out", "bounce", "failed"), None, categories)
    assert wanted(State.SKIPPED, reason, rules, essential=essential) == expected
    assert category_optout(reason) == (reason == CATEGORY_OPTOUT)


def test_how_a_mappings_hand_off_and_the_configs_combine() -> None:
    config = HandoffConfig(mappings=["a"], reasons=["bounce"], owner="Organization/desk")
    assert rules_for("a", config, None) == Rules(("bounce",), "Organization/desk", False)
    assert rules_for("b", config, None) is None  # not in handoff.mappings
    assert rules_for("b", config, HandoffSpec()) == Rules(("bounce",), "Organization/desk", False)
    assert rules_for("a", config, HandoffSpec(enabled=False)) is None
    assert rules_for("a", None, None) is None
    assert rules_for("a", None, HandoffSpec(category_optouts=True)) == Rules(
        ("no-address", "opted-out", "bounce", "failed"), None, True
    )


@pytest.mark.parametrize(("handoff_to", "refused"), [("task", True), ("webhook", False), (None, False)])
def test_a_crm_mappings_own_hand_off_needs_a_webhook(tmp_path: Path, handoff_to: str | None, refused: bool) -> None:
    folder = tmp_path / "mappings"
    folder.mkdir()
    (folder / "request.txt").write_text("We have your request.")
    (folder / "request.yaml").write_text(
        "name: request\ntrigger:\n  resource: CrmEvent\n  event: contact.creation\n"
        'recipient:\n  path: payload.email\ntemplates:\n  subject: "Thanks"\n  text: request.txt\n'
        'key: "{{ event_id }}"\nhandoff: true\n'
    )
    if not refused:
        assert load_mappings(folder, handoff_to=handoff_to).names() == ["request"]
        return
    with pytest.raises(ConfigError) as caught:
        load_mappings(folder, handoff_to=handoff_to)
    [found] = [str(p) for p in caught.value.problems]
    assert f"{folder / 'request.yaml'} line 11 (handoff): a CRM mapping is handed off only to a webhook" in found


@pytest.mark.parametrize(
    ("section", "mapping_says", "tasks"),
    [
        (None, None, False),  # nothing hands off: no Task scopes asked for
        (None, "true", True),  # a mapping alone turns Tasks on
        ({}, None, True),
        ({}, "false", True),  # another mapping may still be handed off by the section
        ({"to": "webhook", "url": "https://queue.example.org/in", "secret": "${HANDOFF_SECRET}"}, "true", False),
    ],
)
def test_hand_offs_are_tasks_when_a_section_or_a_mapping_turns_them_on(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    section: dict[str, str] | None,
    mapping_says: str | None,
    tasks: bool,
) -> None:
    from connector.handoff import to_tasks

    monkeypatch.setenv("HANDOFF_SECRET", "whsec_dGVzdA==")
    folder = tmp_path / "mappings"
    folder.mkdir()
    (folder / "booked.txt").write_text("See you soon.")
    own = f"handoff: {mapping_says}\n" if mapping_says else ""
    (folder / "booked.yaml").write_text(
        "name: booked\ntrigger:\n  resource: Appointment\n  event: booked\nrecipient: patient\n"
        f'templates:\n  subject: "Soon"\n  text: booked.txt\n{own}'
    )
    settings = None if section is None else HandoffConfig.model_validate(section)
    mappings = load_mappings(folder, handoff_to="task" if settings is None else settings.to)
    assert to_tasks(settings, mappings) is tasks
