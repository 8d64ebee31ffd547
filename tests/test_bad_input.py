"""Bad input never gets a 5xx: lone surrogate escapes, control characters and instants that do not fit in
UTC, in CRM event ids and types, FHIR ids and references, and Paubox webhook fields, get a 4xx problem answer
(or are handled), and nothing is stored from a refused request."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from connector.ledger.engine import INBOX, N
from tests.web_harness import Endpoints, open_endpoints

SURROGATE = '"\\ud800"'  # as a sender's JSON encoder writes a lone surrogate


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def endpoints(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Endpoints]:
    """Every endpoint over a SQLite ledger, then over PostgreSQL (which refuses NUL in text)."""
    url = None if request.param == "sqlite" else request.getfixturevalue("pg_schema_url")
    async with open_endpoints(tmp_path, monkeypatch, url) as opened:
        yield opened


def stored(endpoints: Endpoints, table: object) -> int:
    with endpoints.runtime.ledger.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


def problem_json(body: bytes) -> dict[str, object]:
    answer = json.loads(body)
    assert isinstance(answer, dict)
    return answer


async def test_lone_surrogates_in_crm_event_ids_and_types_get_400_and_store_nothing(endpoints: Endpoints) -> None:
    answers = [
        await endpoints.standard(f'{{"type": {SURROGATE}, "data": {{"id": "c1"}}}}'.encode()),
        await endpoints.generic(f'{{"id": {SURROGATE}, "type": "booked"}}'.encode()),
        await endpoints.generic(f'{{"id": "e1", "type": "booked", "note": {SURROGATE}}}'.encode()),
        await endpoints.hubspot(f'[{{"eventId": {SURROGATE}, "subscriptionType": "contact.creation"}}]'.encode()),
        await endpoints.hubspot(f'[{{"eventId": 1, "subscriptionType": "a{SURROGATE[1:-1]}b"}}]'.encode()),
    ]
    assert [a.status_code for a in answers] == [400] * 5
    assert all(problem_json(a.content)["status"] == 400 for a in answers)
    assert stored(endpoints, INBOX) == 0


async def test_control_characters_in_crm_event_ids_get_400(endpoints: Endpoints) -> None:
    body = b'{"type": "patient.registered", "data": {"id": "c1"}}'
    assert (await endpoints.standard(body, msg_id=b"msg\x00one")).status_code == 400  # PostgreSQL refuses NUL
    assert (await endpoints.generic(b'{"id": "e\\u0000", "type": "booked"}')).status_code == 400
    assert (await endpoints.generic(b'{"id": "e1", "type": "book\\r\\ned"}')).status_code == 400
    assert stored(endpoints, INBOX) == 0
    assert (await endpoints.standard(body, msg_id=b"msg_\xe9t\xe9")).status_code == 204  # Latin-1 is fine


async def test_lone_surrogates_in_fhir_ids_and_references_get_400(endpoints: Endpoints) -> None:
    appointment = (
        f'{{"resourceType": "Appointment", "id": {SURROGATE}, "status": "booked", "participant": '
        f'[{{"actor": {{"reference": "Patient/p1"}}, "status": "accepted"}}]}}'
    ).encode()
    bundle = json.dumps(
        {
            "resourceType": "Bundle",
            "type": "history",
            "entry": [
                {
                    "resource": {
                        "resourceType": "Parameters",
                        "parameter": [
                            {"name": "type", "valueCode": "event-notification"},
                            {"name": "subscription", "valueReference": {"reference": "Subscription/\ud800"}},
                            {
                                "name": "notification-event",
                                "part": [{"name": "focus", "valueReference": {"reference": "Appointment/\udfff"}}],
                            },
                        ],
                    }
                }
            ],
        }
    ).encode()
    answers = [
        await endpoints.put("a1", appointment),
        await endpoints.notify(appointment),
        await endpoints.notify(bundle),
    ]
    assert [a.status_code for a in answers] == [400, 400, 400]
    assert all(problem_json(a.content)["resourceType"] == "OperationOutcome" for a in answers)


async def test_an_appointment_whose_start_does_not_fit_in_utc_gets_a_4xx_not_a_500(endpoints: Endpoints) -> None:
    appointment = {
        "resourceType": "Appointment",
        "id": "a9",
        "status": "booked",
        "start": "9999-12-31T20:00:00-14:00",
        "end": "9999-12-31T21:00:00-14:00",
        "participant": [{"actor": {"reference": "Patient/p1"}, "status": "accepted"}],
    }
    put = await endpoints.put("a9", json.dumps(appointment).encode())
    posted = await endpoints.notify(json.dumps({**appointment, "start": "0001-01-01T00:00:00+14:00"}).encode())
    assert put.status_code < 500 and posted.status_code < 500
    assert stored(endpoints, N) == 0


async def test_paubox_webhook_fields_that_cannot_be_stored_are_refused_or_ignored(endpoints: Endpoints) -> None:
    def event(key: str, time: str = "2026-11-21T10:00:00Z", to: str = "robin@example.org") -> bytes:
        return json.dumps(
            {
                "event_name": "api_mail_log_permanent_failure",
                "payload": {
                    "custom_headers": {"X-Notification-Key": key},
                    "source_tracking_id": key,
                    "time": time,
                    "to": to,
                },
            }
        ).encode()

    assert (await endpoints.paubox(event("ehr:key\ud800"))).status_code == 400
    ignored = await endpoints.paubox(event("ehr:key\x00"))  # NUL: no key of ours, and PostgreSQL refuses it
    assert ignored.status_code == 200 and ignored.json() == {"result": "ignored"}
    for when in ("9999-12-31T20:00:00-14:00", "0001-01-01T00:00:00+14:00"):  # not representable in UTC
        assert (await endpoints.paubox(event("ehr:a1|booked", when))).status_code == 200
    assert (await endpoints.paubox(event("ehr:a1|booked", to="robin\x00@example.org"))).status_code == 200


async def test_unusable_focus_ids_and_subscription_references_in_a_notification_get_400(endpoints: Endpoints) -> None:
    def notification(subscription: str, focus: str) -> bytes:
        return json.dumps(
            {
                "resourceType": "Bundle",
                "type": "history",
                "entry": [
                    {
                        "resource": {
                            "resourceType": "Parameters",
                            "parameter": [
                                {"name": "type", "valueCode": "event-notification"},
                                {"name": "status", "valueCode": "active"},
                                {"name": "subscription", "valueReference": {"reference": subscription}},
                                {
                                    "name": "notification-event",
                                    "part": [
                                        {"name": "event-number", "valueString": "1"},
                                        {"name": "focus", "valueReference": {"reference": focus}},
                                    ],
                                },
                            ],
                        }
                    }
                ],
            }
        ).encode()

    answers = [
        await endpoints.notify(notification("Subscription/s1", "http://fhir.test/Appointment/a\x001")),
        await endpoints.notify(notification("Subscription/s1", "Appointment/a 1?_format=xml")),
        await endpoints.notify(notification("Subscription/s\x001", "Appointment/a1")),
    ]  # PostgreSQL: NUL
    assert [a.status_code for a in answers] == [400, 400, 400]
