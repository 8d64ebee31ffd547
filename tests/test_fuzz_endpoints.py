"""Fuzz every HTTP endpoint of `connector run` (hypothesis): no answer is ever a 5xx.

In-process through httpx.ASGITransport, against the app the daemon serves (`daemon.web_app`) over a real
SQLite ledger. Bodies mix well-formed structure with hostile values: lone surrogate escapes, control
characters, extreme and impossible instants (year 1 and 9999, offsets of ±14:00), huge numbers, wrong types,
missing fields, deep nesting and raw bytes. CRM bodies are signed correctly, so they reach past the
signature checks into parsing and storage; FHIR ones carry the subscription secret, so they reach planning.

CONNECTOR_FUZZ_EXAMPLES scales the number of examples per test (default: the whole module in well under a
minute on two cores).
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from connector.delivery.status import WEBHOOK_EVENTS
from tests.web_harness import ORG, Endpoints, open_endpoints

SCALE = float(os.environ.get("CONNECTOR_FUZZ_EXAMPLES", "1"))


def fuzz(examples: int) -> Any:
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@pytest.fixture
async def endpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Endpoints]:
    async with open_endpoints(tmp_path, monkeypatch) as opened:
        yield opened


# -- hostile values -----------------------------------------------------------------------------------------


def mostly(usual: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], one_in: int = 5) -> st.SearchStrategy[Any]:
    """`rare` one time in `one_in`, so that a document with many fields is not always refused at the door."""
    return st.integers(1, one_in).flatmap(lambda n: rare if n == 1 else usual)


SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
NASTY = st.sampled_from(
    [
        "\ud800",
        "a\udfffb",
        "\udc00\ud800",
        "\x00",
        "\x1b[31m",
        "line\r\nX-Injected: 1",
        "\u2028",
        "\ufeff",
        "😀",
        "",
        " ",
        "%00",
        "../../etc",
        "Patient/\ud800",
        "Patient/p1\r\n",
        "\u202e",
    ]
)
HOSTILE = st.one_of(
    NASTY,
    st.text(SURROGATES, min_size=1, max_size=3),
    st.builds(lambda a, b, c: a + b + c, st.text(max_size=8), NASTY, st.text(max_size=8)),
)
TEXT = mostly(st.text(max_size=24), HOSTILE)
EXTREME = st.sampled_from(
    [
        "9999-12-31T20:00:00-14:00",
        "9999-12-31T23:59:59.999999+00:00",
        "0001-01-01T00:00:00+14:00",
        "0001-01-01T00:00:00Z",
        "0001-01-01",
        "9999-12-31",
        "2026-02-30T10:00:00Z",
        "2026-12-01T10:00:00+24:00",
        "2026-12-01T25:61:00Z",
        "20261201T100000Z",
        "1970-01-01T00:00:00Z",
        "2026-12-01T10:00:00",
        "2026-12-01T10:00:00.123456789Z",
        "2026-12-01T10:00:00Z\ud800",
    ]
)
INSTANTS = mostly(
    st.builds(
        lambda day, minute, sign, offset: (
            f"{day.isoformat()}T{minute // 60:02d}:{minute % 60:02d}:00{sign}{offset:02d}:00"
        ),
        st.dates(date(2026, 1, 1), date(2028, 12, 31)),
        st.integers(0, 1439),
        st.sampled_from("+-"),
        st.integers(0, 14),
    ),
    EXTREME,
    one_in=2,
)
NUMBERS = st.one_of(
    st.sampled_from([10**30, -(10**30), 2**63, 2**64, -(2**63) - 1, 1e308, -1e308, 5e-324, -0.0]),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
)
LEAVES = st.one_of(TEXT, INSTANTS, NUMBERS, st.none(), st.booleans())
VALUES = st.recursive(
    LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=12
)
IDS = mostly(st.text(string.ascii_letters + string.digits + "-.", min_size=1, max_size=64), TEXT, one_in=3)
REFERENCES = st.one_of(
    IDS.map(lambda i: f"Patient/{i}"),
    IDS.map(lambda i: f"http://fhir.test/Appointment/{i}"),
    st.just("Patient/p1"),
    TEXT,
)


@st.composite
def mangled(draw: st.DrawFn, base: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """`base` with some fields dropped and some replaced by values of any type."""
    document = dict(base)
    if draw(st.integers(1, 3)) == 1:
        for name in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=2)):
            document.pop(name, None)
    if draw(st.integers(1, 3)) == 1:
        document.update(draw(st.dictionaries(st.sampled_from(fields), VALUES, min_size=1, max_size=2)))
    return document


@st.composite
def appointments(draw: st.DrawFn) -> dict[str, Any]:
    base = {
        "resourceType": "Appointment",
        "id": draw(IDS),
        "status": draw(mostly(st.sampled_from(["booked", "cancelled", "noshow", "proposed"]), TEXT)),
        "start": draw(INSTANTS),
        "end": draw(INSTANTS),
        "serviceType": [{"text": "Check-up"}],
        "meta": {"versionId": draw(IDS), "lastUpdated": draw(INSTANTS)},
        "participant": [{"actor": {"reference": draw(REFERENCES)}, "status": "accepted"}],
    }
    return draw(
        mangled(
            base,
            [
                "id",
                "status",
                "start",
                "end",
                "meta",
                "participant",
                "minutesDuration",
                "extension",
                "modifierExtension",
                "resourceType",
            ],
        )
    )


def dumps(document: Any) -> bytes:
    return json.dumps(document).encode()  # ensure_ascii: lone surrogates travel as \ud800 escapes


def nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


RAW = st.one_of(
    st.binary(max_size=300),
    st.integers(10, 3000).map(nested),
    st.integers(10, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.sampled_from(
        [
            b"",
            b"null",
            b"[]",
            b"1" + b"0" * 5000,
            b'{"a": NaN}',
            b'{"a": 1e400}',
            b'"\\ud800"',
            b"\xff\xfe",
            b'{"a": "\xed\xa0\x80"}',
        ]
    ),
)


def ok(status: int) -> bool:
    event(f"HTTP {status}")  # pytest --hypothesis-show-statistics: how far the bodies got
    return status < 500


# -- the endpoints ------------------------------------------------------------------------------------------


@fuzz(300)
@given(
    body=st.one_of(
        st.builds(
            lambda name, payload: dumps({"event_name": name, "payload": payload}),
            st.sampled_from(sorted(WEBHOOK_EVENTS)) | TEXT,
            st.builds(
                lambda key, tracking, time, to: {
                    "custom_headers": {"X-Notification-Key": key},
                    "source_tracking_id": tracking,
                    "time": time,
                    "to": to,
                },
                TEXT | st.just("ehr:a1|booked"),
                TEXT,
                INSTANTS,
                TEXT | st.just("robin@example.org"),
            ).flatmap(lambda p: mangled(p, ["custom_headers", "source_tracking_id", "time", "to"])),
        ),
        VALUES.map(dumps),
        RAW,
    )
)
async def test_paubox_webhook_never_answers_5xx(endpoints: Endpoints, body: bytes) -> None:
    assert ok((await endpoints.paubox(body)).status_code)


@st.composite
def notifications(draw: st.DrawFn) -> dict[str, Any]:
    """A Subscriptions Backport notification Bundle with hostile parts."""
    kinds = mostly(st.sampled_from(["event-notification", "heartbeat", "handshake"]), TEXT)
    events = [
        {
            "name": "notification-event",
            "part": [
                {"name": "event-number", "valueString": draw(mostly(st.integers(0, 99).map(str), TEXT | NUMBERS))},
                {"name": "focus", "valueReference": {"reference": draw(REFERENCES)}},
            ],
        }
        for _ in range(draw(st.integers(0, 2)))
    ]
    parameters = [
        {"name": "type", "valueCode": draw(kinds)},
        {"name": "subscription", "valueReference": {"reference": draw(TEXT.map(lambda t: f"Subscription/{t}"))}},
        {"name": "status", "valueCode": draw(mostly(st.just("active"), TEXT))},
        {"name": "events-since-subscription-start", "valueString": draw(mostly(st.integers(0, 99), NUMBERS).map(str))},
        *events,
    ]
    entries = [
        {"resource": {"resourceType": "Parameters", "parameter": parameters}},
        *({"resource": a} for a in draw(st.lists(appointments(), max_size=2))),
    ]
    return draw(mangled({"resourceType": "Bundle", "type": "history", "entry": entries}, ["type", "entry"]))


@fuzz(250)
@given(body=st.one_of(notifications().map(dumps), appointments().map(dumps), VALUES.map(dumps), RAW))
async def test_fhir_notify_post_never_answers_5xx(endpoints: Endpoints, body: bytes) -> None:
    assert ok((await endpoints.notify(body)).status_code)


@fuzz(200)
@given(resource=appointments(), same_id=mostly(st.just(True), st.just(False)), raw=mostly(st.none(), RAW))
async def test_fhir_notify_put_appointment_never_answers_5xx(
    endpoints: Endpoints, resource: dict[str, Any], same_id: bool, raw: bytes | None
) -> None:
    path_id = str(resource.get("id")) if same_id else "a1"
    body = raw if raw is not None else dumps(resource)
    assert ok((await endpoints.put(quote(path_id.encode("utf-8", "surrogatepass"), safe=""), body)).status_code)


CRM_EVENT = st.builds(
    lambda event_id, kind, data: {"id": event_id, "type": kind, "timestamp": "2026-11-21T10:00:00Z", "data": data},
    mostly(IDS, NUMBERS),
    mostly(st.just("patient.registered"), TEXT),
    st.fixed_dictionaries({"id": IDS, "email": TEXT | st.just("robin@example.org")}) | VALUES,
)
HUBSPOT_EVENT = st.builds(
    lambda event_id, kind, object_id, at: {
        "eventId": event_id,
        "subscriptionType": kind,
        "objectId": object_id,
        "occurredAt": at,
    },
    mostly(st.integers(1, 10**12), NUMBERS | IDS),
    mostly(st.just("contact.creation"), TEXT),
    NUMBERS | IDS,
    mostly(st.integers(0, 2 * 10**12), NUMBERS | INSTANTS),
)
HEADER_IDS = st.binary(min_size=1, max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)


@fuzz(150)
@given(
    body=CRM_EVENT.flatmap(lambda e: mangled(e, ["id", "type", "data", "timestamp"])).map(dumps) | RAW,
    msg_id=HEADER_IDS | st.just(b"msg_1"),
)
async def test_crm_standard_webhooks_never_answer_5xx(endpoints: Endpoints, body: bytes, msg_id: bytes) -> None:
    assert ok((await endpoints.standard(body, msg_id)).status_code)


@fuzz(150)
@given(
    body=st.lists(
        HUBSPOT_EVENT.flatmap(lambda e: mangled(e, ["eventId", "subscriptionType", "occurredAt"])), max_size=3
    ).map(dumps)
    | VALUES.map(dumps)
    | RAW
)
async def test_crm_hubspot_never_answers_5xx(endpoints: Endpoints, body: bytes) -> None:
    assert ok((await endpoints.hubspot(body)).status_code)


@fuzz(150)
@given(
    body=st.one_of(
        CRM_EVENT.flatmap(lambda e: mangled(e, ["id", "type", "data"])).map(dumps),
        st.lists(CRM_EVENT, max_size=3).map(dumps),
        VALUES.map(dumps),
        RAW,
    )
)
async def test_crm_generic_hmac_never_answers_5xx(endpoints: Endpoints, body: bytes) -> None:
    assert ok((await endpoints.generic(body)).status_code)


def outbound(notification_id: str, sobject: str, fields: dict[str, str]) -> bytes:
    text = "".join(f"<sf:{name}>{escape(value)}</sf:{name}>" for name, value in fields.items())
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope '
        f'xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
        f'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>'
        f'<notifications xmlns="http://soap.sforce.com/2005/09/outbound"><OrganizationId>{ORG}</OrganizationId>'
        f"<ActionId>04k5g000000TestAAA</ActionId><Notification><Id>{escape(notification_id)}</Id>"
        f'<sObject xsi:type="sf:{escape(sobject)}" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">{text}'
        f"</sObject></Notification></notifications></soapenv:Body></soapenv:Envelope>"
    ).encode("utf-8", "surrogatepass")


@fuzz(150)
@given(
    body=st.builds(
        outbound,
        IDS,
        st.just("Event") | TEXT,
        st.dictionaries(
            st.sampled_from(["Id", "Patient_Email__c", "StartDateTime", "LastModifiedDate"]),
            TEXT | INSTANTS,
            max_size=4,
        ),
    )
    | RAW
)
async def test_crm_salesforce_outbound_never_answers_5xx(endpoints: Endpoints, body: bytes) -> None:
    assert ok((await endpoints.salesforce(body)).status_code)


@fuzz(60)
@given(
    path=st.sampled_from(["/healthz", "/metrics"]),
    query=st.text(max_size=30),
    method=st.sampled_from(["GET", "POST", "HEAD"]),
)
async def test_health_and_metrics_never_answer_500(endpoints: Endpoints, path: str, query: str, method: str) -> None:
    response = await endpoints.client.request(method, path, params={"q": query})
    assert response.status_code < 500 or (path == "/healthz" and response.status_code == 503)  # 503: not ready
