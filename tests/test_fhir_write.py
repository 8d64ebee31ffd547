"""The write client (connector.sources.fhir_write) against the FHIR test server over real HTTP: conditional
creates stay single under retries and races, updates name their version and a stale one is refused, the
server's refusals and lost answers end differently, capabilities are read from the CapabilityStatement, and
the SMART token asks for the write scopes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from connector.config.sources import FhirPollSourceConfig
from connector.errors import SourceError
from connector.sandbox.fhir import FhirState, WriteFault, instant
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.smart_token import SmartTokenState
from connector.sandbox.smart_token import create_app as token_app
from connector.sources.fhir_poll import FhirPollSource
from connector.sources.fhir_write import (
    Capabilities,
    FhirWriter,
    StaleVersion,
    WriteRefused,
    capabilities_of,
)
from tests.conftest import Server

SYSTEM = "urn:example:connector:notification"
START = datetime(2026, 12, 10, 9, 0, tzinfo=UTC)


def appointment(status: str = "booked") -> dict[str, Any]:
    return {
        "resourceType": "Appointment",
        "id": "a1",
        "status": status,
        "start": instant(START),
        "end": instant(START + timedelta(minutes=30)),
        "participant": [{"actor": {"reference": "Patient/p1"}, "status": "accepted"}],
    }


def response(key: str, status: str = "accepted") -> dict[str, Any]:
    return {
        "resourceType": "AppointmentResponse",
        "identifier": [{"system": SYSTEM, "value": key}],
        "appointment": {"reference": "Appointment/a1"},
        "actor": {"reference": "Patient/p1"},
        "participantStatus": status,
    }


def condition(key: str) -> str:
    return f"identifier={SYSTEM}|{key}"


@pytest.fixture
async def writer(fhir_server: Server) -> AsyncIterator[FhirWriter]:
    source = FhirPollSource("ehr", FhirPollSourceConfig(base_url=fhir_server.url, timeout=timedelta(seconds=2)))
    try:
        yield FhirWriter(source)
    finally:
        await source.aclose()


async def test_a_conditional_create_creates_once_and_a_retry_finds_the_first(
    writer: FhirWriter, fhir_state: FhirState
) -> None:
    first = await writer.create(response("k-1"), if_none_exist=condition("k-1"), what="confirm")
    again = await writer.create(response("k-1"), if_none_exist=condition("k-1"), what="confirm")
    assert first.created and not again.created
    assert (again.resource_type, again.id, again.version) == ("AppointmentResponse", first.id, first.version)
    assert len(fhir_state.of_type("AppointmentResponse")) == 1


async def test_ten_identical_conditional_creates_at_once_store_one_resource(
    writer: FhirWriter, fhir_state: FhirState
) -> None:
    written = await asyncio.gather(
        *(writer.create(response("k-2"), if_none_exist=condition("k-2"), what="confirm") for _ in range(10))
    )
    assert sum(w.created for w in written) == 1 and len({w.id for w in written}) == 1
    assert len(fhir_state.of_type("AppointmentResponse")) == 1


async def test_an_answer_lost_after_the_write_is_a_source_error_and_the_retry_finds_it(
    writer: FhirWriter, fhir_state: FhirState
) -> None:
    """The server stores the resource, then answers 500: the write may or may not have happened (a plain
    SourceError, not a refusal); the conditional retry answers 200 with what was stored."""
    fhir_state.write_faults = [WriteFault(status=500, after_commit=True)]
    with pytest.raises(SourceError) as lost:
        await writer.create(response("k-3"), if_none_exist=condition("k-3"), what="confirm")
    assert not isinstance(lost.value, WriteRefused) and "may or may not" in str(lost.value)
    retried = await writer.create(response("k-3"), if_none_exist=condition("k-3"), what="confirm")
    assert not retried.created and len(fhir_state.of_type("AppointmentResponse")) == 1


async def test_a_write_that_hangs_past_the_deadline_is_a_source_error(
    writer: FhirWriter, fhir_state: FhirState
) -> None:
    fhir_state.write_faults = [WriteFault(hang=10, after_commit=True)]
    with pytest.raises(SourceError, match="did not complete within 2s"):
        await writer.create(response("k-4"), if_none_exist=condition("k-4"), what="confirm")
    assert len(fhir_state.of_type("AppointmentResponse")) == 1  # stored before the hang: a retry finds it


async def test_an_invalid_resource_is_refused_with_its_status_and_no_body_in_the_message(writer: FhirWriter) -> None:
    bad = response("k-5", status="maybe-later")
    with pytest.raises(WriteRefused) as refused:
        await writer.create(bad, if_none_exist=condition("k-5"), what="confirm")
    assert refused.value.status == 422
    assert "maybe-later" not in str(refused.value) and "HTTP 422" in str(refused.value)


async def test_an_update_names_the_version_it_read_and_a_stale_one_changes_nothing(
    writer: FhirWriter, fhir_state: FhirState
) -> None:
    fhir_state.put(appointment())
    read = await writer.read("Appointment", "a1")
    assert read is not None and read.version == "1"
    fhir_state.put(appointment())  # someone else changed it meanwhile: version 2
    cancelled = {**read.resource, "status": "cancelled"}
    with pytest.raises(StaleVersion, match="changed since version 1"):
        await writer.update(cancelled, version=read.version, what="cancel")
    current = await writer.read("Appointment", "a1")
    assert current is not None and current.resource["status"] == "booked" and current.version == "2"
    done = await writer.update({**current.resource, "status": "cancelled"}, version=current.version, what="cancel")
    assert (done.id, done.version, done.created) == ("a1", "3", False)
    assert fhir_state.current("Appointment", "a1")["status"] == "cancelled"  # type: ignore[index]


async def test_reading_a_resource_that_is_gone_gives_none(writer: FhirWriter) -> None:
    assert await writer.read("Appointment", "nowhere") is None


async def test_capabilities_come_from_the_capability_statement(writer: FhirWriter, fhir_server: Server) -> None:
    found = await writer.capabilities()
    assert "Communication" in found.conditional_create and "Appointment" in found.versioned_update
    assert found.can("Task", "create") and found.can("Appointment", "update")
    async with httpx.AsyncClient(base_url=fhir_server.url) as http:
        assert (await http.post("/_test/faults", json={"conditional_create": False})).json()["ok"]
    assert "Communication" in (await writer.capabilities()).conditional_create  # read once, remembered
    assert "Communication" not in (await FhirWriter(writer.source).capabilities()).conditional_create


def test_capabilities_of_anything_but_a_server_statement_are_none() -> None:
    assert capabilities_of(None) == Capabilities()
    assert capabilities_of({"rest": [{"mode": "client", "resource": [{"type": "Task"}]}]}) == Capabilities()
    statement = {"rest": [{"resource": [{"type": "Task", "conditionalCreate": True, "interaction": "read"}]}]}
    assert capabilities_of(statement) == Capabilities(frozenset({"Task"}), frozenset(), {"Task": frozenset()})


@pytest.mark.parametrize(
    "write_back",
    [{"scope": "system/AppointmentResponse.c"}, {"responses": True}],
    ids=["scope-given", "scope-derived-from-responses"],
)
async def test_a_smart_source_asks_for_its_write_scopes_and_writes_with_them(
    fhir_state: FhirState, monkeypatch: pytest.MonkeyPatch, write_back: dict[str, object]
) -> None:
    """`write_back.scope`, or when it is empty the scopes of the writes turned on, is added to the token
    request; the server enforcing SMART scopes accepts the create (it would answer 403 without
    `system/AppointmentResponse.c`)."""
    from cryptography.hazmat.primitives import serialization
    from starlette.types import Receive, Scope, Send

    key = ec.generate_private_key(ec.SECP384R1())
    tokens = SmartTokenState()
    tokens.register("connector-test", "ec-1", key.public_key())
    fhir_state.authorizer, fhir_state.enforce_scopes = tokens.check, True
    auth_app, ehr_app = token_app(tokens), fhir_app(fhir_state)

    async def router(scope: Scope, receive: Receive, send: Send) -> None:
        target = auth_app if scope.get("path", "").startswith(("/.well-known/", "/token")) else ehr_app
        await target(scope, receive, send)

    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    monkeypatch.setenv("TEST_CLIENT_KEY", pem.decode())
    config = FhirPollSourceConfig.model_validate(
        {
            "base_url": "https://fhir.test",
            "auth": {
                "type": "smart",
                "client_id": "connector-test",
                "key_id": "ec-1",
                "private_key": "${TEST_CLIENT_KEY}",
            },
            "write_back": write_back,
        }
    )
    source = FhirPollSource("ehr", config, httpx.ASGITransport(app=router))
    try:
        written = await FhirWriter(source).create(response("k-6"), if_none_exist=condition("k-6"), what="confirm")
    finally:
        await source.aclose()
    assert written.created
    granted = [token.scope for token in tokens.tokens.values()]
    assert granted == ["system/Appointment.rs system/Patient.rs system/AppointmentResponse.c"]


def _smart_source(scope: str, write_back: dict[str, object]) -> FhirPollSourceConfig:
    auth = {"type": "smart", "client_id": "c", "key_id": "k", "private_key": "${TEST_CLIENT_KEY}", "scope": scope}
    return FhirPollSourceConfig.model_validate(
        {"base_url": "https://fhir.test", "auth": auth, "write_back": write_back}
    )


@pytest.mark.parametrize(
    ("read", "write_back", "tasks", "expected"),
    [
        ("system/Appointment.rs system/Patient.rs", {}, False, ""),
        (
            "system/Appointment.rs system/Patient.rs",
            {"responses": True, "cancel_appointment": True},
            False,
            "system/AppointmentResponse.c system/Appointment.u",
        ),
        (
            "system/Appointment.rs system/Patient.rs",
            {"not_done": True},
            True,
            "system/Communication.c system/Communication.rs system/Task.c system/Task.rs system/Task.u",
        ),
        (
            "system/Appointment.read system/Patient.read",
            {"communication": True, "responses": True},
            True,
            "system/AppointmentResponse.write system/Communication.write system/Communication.read "
            "system/Task.write system/Task.read",
        ),
        ("system/*.rs", {"communication": True, "scope": "system/*.cruds"}, True, "system/*.cruds"),
    ],
    ids=["nothing-written", "links-v2", "chart-and-tasks-v2", "v1-style-follows-auth-scope", "given-scope-wins"],
)
def test_the_token_asks_for_the_scopes_of_the_writes_turned_on(
    monkeypatch: pytest.MonkeyPatch, read: str, write_back: dict[str, object], tasks: bool, expected: str
) -> None:
    monkeypatch.setenv("TEST_CLIENT_KEY", "unused here")
    scope = _smart_source(read, write_back).token_scope(tasks)
    assert scope == " ".join([read, expected]).strip()
