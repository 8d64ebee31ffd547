"""CRM webhooks: signatures (Standard Webhooks, HubSpot v3, generic HMAC) and body parsing (JSON, Salesforce SOAP).

Expected signatures are computed here independently with hmac/hashlib/base64 from each spec's wording, plus one
published known-answer vector for Standard Webhooks, so the module is never only checked against itself.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.crm.parse import (
    BodyError,
    CrmEvent,
    parse_hmac_json,
    parse_hubspot,
    parse_salesforce_outbound,
    parse_standard_webhook,
    salesforce_ack,
)
from connector.crm.verify import (
    SignatureError,
    hubspot_signed_uri,
    sign_hmac,
    sign_hubspot_v3,
    sign_standard_webhook,
    standard_webhook_headers,
    verify_hmac,
    verify_hubspot_v3,
    verify_standard_webhook,
)
from connector.errors import ConfigError, ConnectorError

pytestmark = pytest.mark.filterwarnings("error")

# No example database: it would write .hypothesis/ into the repository. No deadline: CI machines vary.
PROPERTY = settings(database=None, deadline=None, max_examples=150)

WH_KEY = b"connector-test-key-24-bytes!"
WH_SECRET = "whsec_" + base64.b64encode(WH_KEY).decode()
NOW = 1_714_572_000  # 2024-05-01T14:00:00Z
MSG_ID = "msg_2KWPBgLlAfxdpx2AI54pPJ85f4W"
WH_BODY = (
    b'{"type":"contact.updated","timestamp":"2024-05-01T13:59:58.120Z",'
    b'"data":{"id":"c_8842","email":"pat.doe@example.org"}}'
)

HS_SECRET = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"
HS_URI = "https://hooks.example.org/crm/hubspot"
NOW_MS = NOW * 1000
HS_BODY = (
    b'[{"eventId":1001,"subscriptionId":234567,"portalId":62515,"appId":54321,'
    b'"occurredAt":1714571998741,"subscriptionType":"contact.creation","attemptNumber":0,'
    b'"objectId":65059681032,"changeFlag":"CREATED","changeSource":"CRM_UI"},'
    b'{"eventId":"1002","subscriptionId":234568,"portalId":62515,"appId":54321,'
    b'"occurredAt":1714571999000,"subscriptionType":"contact.propertyChange","attemptNumber":1,'
    b'"objectId":65059681032,"propertyName":"email","propertyValue":"pat.doe@example.org",'
    b'"changeSource":"CRM_UI"}]'
)

ORG_ID = "00D5g000004ExAmPLE"  # 18 characters; the 15-character form is ORG_ID[:15]
SF_MESSAGE = b"""<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"
                  xmlns:xsd="http://www.w3.org/2001/XMLSchema"
                  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
 <soapenv:Body>
  <notifications xmlns="http://soap.sforce.com/2005/09/outbound">
   <OrganizationId>00D5g000004ExAmPLE</OrganizationId>
   <ActionId>04k5g000000TestAAA</ActionId>
   <SessionId xsi:nil="true"/>
   <EnterpriseUrl>https://example.org/services/Soap/c/60.0/00D5g000004ExAm</EnterpriseUrl>
   <PartnerUrl>https://example.org/services/Soap/u/60.0/00D5g000004ExAm</PartnerUrl>
   <Notification>
    <Id>04l5g00000AbCdEAAZ</Id>
    <sObject xsi:type="sf:Contact" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">
     <sf:Id>0035g00000XyZaBAAV</sf:Id>
     <sf:Email>pat.doe@example.org</sf:Email>
     <sf:FirstName>Pat</sf:FirstName>
     <sf:LastName>Doe &amp; Sons</sf:LastName>
     <sf:HasOptedOutOfEmail>false</sf:HasOptedOutOfEmail>
     <sf:LastModifiedDate>2024-05-01T13:59:41.000Z</sf:LastModifiedDate>
     <sf:MobilePhone xsi:nil="true"/>
    </sObject>
   </Notification>
   <Notification>
    <Id>04l5g00000AbCdFAAZ</Id>
    <sObject xsi:type="sf:Contact" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">
     <sf:Id>0035g00000XyZbCAAV</sf:Id>
     <sf:Email>sam.roe@example.org</sf:Email>
     <sf:SystemModstamp>2024-05-01T13:59:43.000Z</sf:SystemModstamp>
    </sObject>
   </Notification>
  </notifications>
 </soapenv:Body>
</soapenv:Envelope>
"""


# --- Independent reference computations (straight from each spec's wording) ---------------------------------


def standard_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def hubspot_signature(secret: str, method: str, uri: str, body: bytes, timestamp_ms: int) -> str:
    source = method.encode() + uri.encode() + body + str(timestamp_ms).encode()
    return base64.b64encode(hmac.new(secret.encode(), source, hashlib.sha256).digest()).decode()


def wh_headers(body: bytes = WH_BODY, timestamp: int = NOW, key: bytes = WH_KEY) -> dict[str, str]:
    return {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": standard_signature(key, MSG_ID, timestamp, body),
    }


def hs_headers(body: bytes = HS_BODY, timestamp_ms: int = NOW_MS, uri: str = HS_URI) -> dict[str, str]:
    return {
        "X-HubSpot-Signature-v3": hubspot_signature(HS_SECRET, "POST", uri, body, timestamp_ms),
        "X-HubSpot-Request-Timestamp": str(timestamp_ms),
    }


def reason(excinfo: pytest.ExceptionInfo[Any]) -> str:
    return str(excinfo.value.reason)


# --- Standard Webhooks -------------------------------------------------------------------------------------


def test_standard_webhooks_known_answer_vector() -> None:
    """The signature for the Standard Webhooks reference library's published vector is reproduced exactly."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    msg_id, timestamp, body = "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}'
    expected = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    assert sign_standard_webhook(secret, msg_id, timestamp, body) == expected
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": expected}
    verify_standard_webhook(secret, headers, body, now=timestamp)


def test_standard_webhook_signed_per_spec_passes() -> None:
    """A request signed over `{id}.{timestamp}.{body}` with the key inside `whsec_` passes, with or without prefix."""
    verify_standard_webhook(WH_SECRET, wh_headers(), WH_BODY, now=NOW)
    verify_standard_webhook(WH_SECRET.removeprefix("whsec_"), wh_headers(), WH_BODY, now=NOW)


def test_standard_webhook_sign_helpers_agree_with_the_spec() -> None:
    """`sign_standard_webhook` and `standard_webhook_headers` produce what the spec's formula produces."""
    assert standard_webhook_headers(WH_SECRET, MSG_ID, NOW, WH_BODY) == wh_headers()


def test_standard_webhook_header_names_are_case_insensitive() -> None:
    """Header names in any case are found."""
    headers = {name.title(): value for name, value in wh_headers().items()}
    verify_standard_webhook(WH_SECRET, headers, WH_BODY, now=NOW)


def test_standard_webhook_tampered_body_is_rejected() -> None:
    """One changed byte in the body makes the signature mismatch."""
    with pytest.raises(SignatureError) as excinfo:
        verify_standard_webhook(WH_SECRET, wh_headers(), WH_BODY.replace(b"c_8842", b"c_8843"), now=NOW)
    assert reason(excinfo) == "signature mismatch"


def test_standard_webhook_wrong_secret_is_rejected() -> None:
    """A request signed with another key mismatches."""
    with pytest.raises(SignatureError, match="signature mismatch"):
        verify_standard_webhook(WH_SECRET, wh_headers(key=b"another-key-of-24-bytes!"), WH_BODY, now=NOW)


def test_standard_webhook_tampered_id_or_timestamp_is_rejected() -> None:
    """The id and the timestamp are signed too: changing either one mismatches."""
    headers = wh_headers() | {"webhook-id": "msg_other"}
    with pytest.raises(SignatureError, match="signature mismatch"):
        verify_standard_webhook(WH_SECRET, headers, WH_BODY, now=NOW)
    headers = wh_headers() | {"webhook-timestamp": str(NOW + 1)}
    with pytest.raises(SignatureError, match="signature mismatch"):
        verify_standard_webhook(WH_SECRET, headers, WH_BODY, now=NOW)


@pytest.mark.parametrize(
    ("timestamp", "expected"),
    [
        (NOW - 301, "timestamp outside tolerance: too old"),
        (NOW + 301, "timestamp outside tolerance: in the future"),
    ],
)
def test_standard_webhook_stale_or_future_timestamp_is_rejected(timestamp: int, expected: str) -> None:
    """A correctly signed request more than 300 s from now, either side, is rejected before the signature."""
    with pytest.raises(SignatureError) as excinfo:
        verify_standard_webhook(WH_SECRET, wh_headers(timestamp=timestamp), WH_BODY, now=NOW)
    assert reason(excinfo) == expected


def test_standard_webhook_timestamp_exactly_at_tolerance_passes() -> None:
    """The tolerance is inclusive: exactly 300 s old or ahead still passes; a custom tolerance is honoured."""
    verify_standard_webhook(WH_SECRET, wh_headers(timestamp=NOW - 300), WH_BODY, now=NOW)
    verify_standard_webhook(WH_SECRET, wh_headers(timestamp=NOW + 300), WH_BODY, now=NOW)
    with pytest.raises(SignatureError, match="too old"):
        verify_standard_webhook(WH_SECRET, wh_headers(timestamp=NOW - 31), WH_BODY, now=NOW, tolerance=30)


def test_standard_webhook_nan_clock_rejects() -> None:
    """A NaN `now` (a caller bug) rejects instead of disabling the freshness check."""
    with pytest.raises(SignatureError, match="tolerance"):
        verify_standard_webhook(WH_SECRET, wh_headers(), WH_BODY, now=float("nan"))


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_standard_webhook_missing_header_is_named(missing: str) -> None:
    """A missing (or empty) header is rejected with its name."""
    headers = wh_headers()
    del headers[missing]
    with pytest.raises(SignatureError) as excinfo:
        verify_standard_webhook(WH_SECRET, headers, WH_BODY, now=NOW)
    assert reason(excinfo) == f"missing header {missing}"
    with pytest.raises(SignatureError, match=f"missing header {missing}"):
        verify_standard_webhook(WH_SECRET, wh_headers() | {missing: ""}, WH_BODY, now=NOW)


@pytest.mark.parametrize("raw", ["hello", "1714572000.5", " 1714572000", "-1714572000", "١٧١٤٥٧٢٠٠٠", "1_714_572_000"])
def test_standard_webhook_malformed_timestamp_is_rejected(raw: str) -> None:
    """Only ASCII digits are a timestamp (int() alone would accept spaces, underscores and Arabic digits)."""
    with pytest.raises(SignatureError, match="malformed header webhook-timestamp"):
        verify_standard_webhook(WH_SECRET, wh_headers() | {"webhook-timestamp": raw}, WH_BODY, now=NOW)


def test_standard_webhook_one_valid_signature_among_several_passes() -> None:
    """During key rotation the header holds several entries; one valid `v1` entry is enough."""
    valid = wh_headers()["webhook-signature"]
    bogus = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc="
    header = " ".join([bogus, "v1a,hnO3f9T8Ytu9HwrXslvumlUpqtNVqkhqw/enGzPCXe5Bdq==", valid, bogus])
    verify_standard_webhook(WH_SECRET, wh_headers() | {"webhook-signature": header}, WH_BODY, now=NOW)


def test_standard_webhook_valid_digest_under_another_version_is_rejected() -> None:
    """Only `v1` entries are HMAC: the right digest labelled `v2` or `v1a`, or without a label, does not pass."""
    digest = wh_headers()["webhook-signature"].removeprefix("v1,")
    for header in [f"v2,{digest}", f"v1a,{digest}", digest, f"v1 {digest}"]:
        with pytest.raises(SignatureError, match="signature mismatch"):
            verify_standard_webhook(WH_SECRET, wh_headers() | {"webhook-signature": header}, WH_BODY, now=NOW)


@pytest.mark.parametrize("secret", ["whsec_", "whsec_not base64!", "", "whsec_ünïcode"])
def test_standard_webhook_unusable_secret_is_a_config_error(secret: str) -> None:
    """A secret that is not base64 can never verify anything: it is a ConfigError, not a 401."""
    with pytest.raises(ConfigError):
        verify_standard_webhook(secret, wh_headers(), WH_BODY, now=NOW)


# --- HubSpot v3 --------------------------------------------------------------------------------------------


def test_hubspot_v3_signed_per_spec_passes() -> None:
    """base64(HMAC-SHA256(secret, method + uri + body + timestamp)) with a fresh timestamp passes."""
    verify_hubspot_v3(HS_SECRET, "POST", HS_URI, hs_headers(), HS_BODY, now_ms=NOW_MS)


def test_hubspot_v3_sign_helper_agrees_with_the_spec() -> None:
    """`sign_hubspot_v3` produces what the documented formula produces."""
    assert sign_hubspot_v3(HS_SECRET, "POST", HS_URI, HS_BODY, NOW_MS) == hs_headers()["X-HubSpot-Signature-v3"]


def test_hubspot_v3_header_names_are_case_insensitive() -> None:
    """HubSpot's mixed-case header names are found whatever case the server hands over."""
    headers = {name.lower(): value for name, value in hs_headers().items()}
    verify_hubspot_v3(HS_SECRET, "POST", HS_URI, headers, HS_BODY, now_ms=NOW_MS)


def test_hubspot_v3_tampered_body_wrong_secret_or_uri_is_rejected() -> None:
    """Changing the body, the secret, the method or the URI makes the signature mismatch."""
    cases = [
        (HS_SECRET, "POST", HS_URI, HS_BODY.replace(b"1001", b"1003")),
        ("zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz", "POST", HS_URI, HS_BODY),
        (HS_SECRET, "PUT", HS_URI, HS_BODY),
        (HS_SECRET, "POST", HS_URI + "/other", HS_BODY),
    ]
    for secret, method, uri, body in cases:
        with pytest.raises(SignatureError, match="signature mismatch"):
            verify_hubspot_v3(secret, method, uri, hs_headers(), body, now_ms=NOW_MS)


@pytest.mark.parametrize(
    ("timestamp_ms", "expected"),
    [(NOW_MS - 300_001, "too old"), (NOW_MS + 300_001, "in the future")],
)
def test_hubspot_v3_stale_or_future_timestamp_is_rejected(timestamp_ms: int, expected: str) -> None:
    """A correctly signed request older than 5 minutes (or as far ahead) is rejected; the edge passes."""
    headers = hs_headers(timestamp_ms=timestamp_ms)
    with pytest.raises(SignatureError, match=expected):
        verify_hubspot_v3(HS_SECRET, "POST", HS_URI, headers, HS_BODY, now_ms=NOW_MS)
    edge = NOW_MS - 300_000 if expected == "too old" else NOW_MS + 300_000
    verify_hubspot_v3(HS_SECRET, "POST", HS_URI, hs_headers(timestamp_ms=edge), HS_BODY, now_ms=NOW_MS)


@pytest.mark.parametrize("missing", ["X-HubSpot-Signature-v3", "X-HubSpot-Request-Timestamp"])
def test_hubspot_v3_missing_header_is_named(missing: str) -> None:
    """A missing header is rejected with its (lower-case) name."""
    headers = hs_headers()
    del headers[missing]
    with pytest.raises(SignatureError) as excinfo:
        verify_hubspot_v3(HS_SECRET, "POST", HS_URI, headers, HS_BODY, now_ms=NOW_MS)
    assert reason(excinfo) == f"missing header {missing.lower()}"


def test_hubspot_v3_seconds_timestamp_is_stale() -> None:
    """A timestamp in seconds instead of milliseconds reads as 1970 and is rejected as too old."""
    headers = hs_headers(timestamp_ms=NOW)
    with pytest.raises(SignatureError, match="too old"):
        verify_hubspot_v3(HS_SECRET, "POST", HS_URI, headers, HS_BODY, now_ms=NOW_MS)


def test_hubspot_uri_decodes_exactly_the_listed_escapes() -> None:
    """%3A %2F %3F %40 %21 %24 %27 %28 %29 %2A %2C %3B decode (any case); %20 %23 %26 %3D %2B %25 stay."""
    listed = "%3A%2F%3F%40%21%24%27%28%29%2A%2C%3B%3a%2f"
    assert hubspot_signed_uri(listed) == ":/?@!$'()*,;:/"
    kept = "%20%23%26%3D%2B%25%253A"
    assert hubspot_signed_uri(kept) == kept


def test_hubspot_v3_verifies_uri_with_encoded_characters() -> None:
    """HubSpot signs the URI with the listed escapes decoded; the request URI as received still verifies."""
    received = "https://hooks.example.org/crm/hubspot?portal=62515%3Aeu&tag=%28a%29&q=a%20b%26c"
    signed_form = "https://hooks.example.org/crm/hubspot?portal=62515:eu&tag=(a)&q=a%20b%26c"
    headers = hs_headers(uri=signed_form)
    verify_hubspot_v3(HS_SECRET, "POST", received, headers, HS_BODY, now_ms=NOW_MS)
    over_decoded = hs_headers(uri="https://hooks.example.org/crm/hubspot?portal=62515:eu&tag=(a)&q=a b&c")
    with pytest.raises(SignatureError, match="signature mismatch"):
        verify_hubspot_v3(HS_SECRET, "POST", received, over_decoded, HS_BODY, now_ms=NOW_MS)


def test_hubspot_v3_empty_secret_is_a_config_error() -> None:
    """An empty client secret is a configuration problem, not a 401."""
    with pytest.raises(ConfigError):
        verify_hubspot_v3("", "POST", HS_URI, hs_headers(), HS_BODY, now_ms=NOW_MS)


# --- Generic HMAC ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha256", "sha1"])
def test_hmac_hex_with_prefix_passes(algorithm: Any) -> None:
    """`sha256=<hex>` (or sha1) computed with hmac over the raw body passes, in lower or upper case hex."""
    digest = hmac.new(b"s3cret", WH_BODY, algorithm).hexdigest()
    verify_hmac(b"s3cret", f"{algorithm}={digest}", WH_BODY, prefix=f"{algorithm}=", algorithm=algorithm)
    verify_hmac(b"s3cret", f"{algorithm}={digest.upper()}", WH_BODY, prefix=f"{algorithm}=", algorithm=algorithm)
    assert sign_hmac(b"s3cret", WH_BODY, prefix=f"{algorithm}=", algorithm=algorithm) == f"{algorithm}={digest}"


def test_hmac_base64_passes() -> None:
    """A base64 digest without prefix passes when the encoding says base64."""
    value = base64.b64encode(hmac.new(b"s3cret", WH_BODY, hashlib.sha256).digest()).decode()
    verify_hmac(b"s3cret", value, WH_BODY, encoding="base64")
    assert sign_hmac(b"s3cret", WH_BODY, encoding="base64") == value


@pytest.mark.parametrize(
    ("header", "body", "expected"),
    [
        (None, WH_BODY, "missing signature header"),
        ("", WH_BODY, "missing signature header"),
        ("sha1=" + "0" * 64, WH_BODY, "malformed signature"),
        ("sha256=not-hex", WH_BODY, "malformed signature"),
        ("sha256=abc", WH_BODY, "malformed signature"),
        ("sha256=" + "0" * 64, WH_BODY, "signature mismatch"),
        (sign_hmac(b"s3cret", WH_BODY, prefix="sha256="), WH_BODY + b" ", "signature mismatch"),
        (sign_hmac(b"other", WH_BODY, prefix="sha256="), WH_BODY, "signature mismatch"),
    ],
)
def test_hmac_rejections(header: str | None, body: bytes, expected: str) -> None:
    """Missing, malformed, wrong-secret and tampered-body cases each give their reason."""
    with pytest.raises(SignatureError) as excinfo:
        verify_hmac(b"s3cret", header, body, prefix="sha256=")
    assert reason(excinfo) == expected


def test_hmac_empty_secret_is_a_config_error() -> None:
    """An empty shared secret is a configuration problem."""
    with pytest.raises(ConfigError):
        verify_hmac(b"", "00", WH_BODY)


def test_errors_are_connector_errors_without_body_or_secret() -> None:
    """Both error types sit under ConnectorError, and their messages quote neither the body nor the secret."""
    assert issubclass(SignatureError, ConnectorError)
    assert issubclass(BodyError, ConnectorError)
    with pytest.raises(SignatureError) as excinfo:
        verify_standard_webhook(WH_SECRET, wh_headers(), WH_BODY + b"x", now=NOW)
    assert "example.org" not in str(excinfo.value)
    assert WH_SECRET not in str(excinfo.value)


# --- Parsing: Standard Webhooks and generic JSON ------------------------------------------------------------


def test_parse_standard_webhook_reads_id_type_time_and_object() -> None:
    """The event id is the `webhook-id` header; type, timestamp and data.id come from the JSON body."""
    [event] = parse_standard_webhook({"Webhook-Id": MSG_ID}, WH_BODY)
    assert event == CrmEvent(
        source_kind="standard_webhook",
        event_id=MSG_ID,
        event_type="contact.updated",
        object_id="c_8842",
        occurred_at="2024-05-01T13:59:58.120Z",
        payload=json.loads(WH_BODY),
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"[]", "body: not a JSON object"),
        (b'{"data": {}}', "body: field 'type' missing or not a non-empty string"),
        (b'{"type": 3}', "body: field 'type' missing or not a non-empty string"),
        (b"{not json", "body is not valid JSON"),
        (b'{"type": "x", "n": NaN}', "body is not valid JSON"),
        (b"\xff\xfe\x00", "body is not valid JSON"),
        (b'{"type": "x", "d": ' + b"[" * 40 + b"]" * 40 + b"}", "body nests too deeply"),
        (b"[" * 100_000 + b"]" * 100_000, "body nests too deeply"),
    ],
)
def test_parse_standard_webhook_rejects_malformed_bodies(body: bytes, expected: str) -> None:
    """Non-objects, missing type, invalid JSON, NaN and deep nesting raise BodyError with a fixed reason."""
    with pytest.raises(BodyError) as excinfo:
        parse_standard_webhook({"webhook-id": MSG_ID}, body)
    assert reason(excinfo) == expected


def test_parse_standard_webhook_needs_the_id_header() -> None:
    """Without `webhook-id` there is no event id to deduplicate on."""
    with pytest.raises(BodyError, match="missing header webhook-id"):
        parse_standard_webhook({}, WH_BODY)


def test_parse_hmac_json_object_and_array() -> None:
    """An object gives one event, an array of objects one per element; ids may be integers."""
    [one] = parse_hmac_json(b'{"id": 7, "type": "contact.created"}')
    assert (one.source_kind, one.event_id, one.event_type, one.object_id) == ("hmac_json", "7", "contact.created", None)
    many = parse_hmac_json(b'[{"id": "a", "type": "t1"}, {"id": "b", "type": "t2"}]')
    assert [(e.event_id, e.event_type) for e in many] == [("a", "t1"), ("b", "t2")]


def test_parse_hmac_json_configurable_paths() -> None:
    """Dotted paths pick the id, type, object id and time from nested fields; the kind is configurable."""
    body = b'{"meta": {"event_id": "ev_1", "kind": "lead.updated", "at": "2024-05-01T13:00:00Z"}, "lead": {"id": 9}}'
    [event] = parse_hmac_json(
        body,
        id_path="meta.event_id",
        type_path="meta.kind",
        object_id_path="lead.id",
        occurred_at_path="meta.at",
        source_kind="pipedrive",
    )
    assert (event.source_kind, event.event_id, event.event_type) == ("pipedrive", "ev_1", "lead.updated")
    assert (event.object_id, event.occurred_at) == ("9", "2024-05-01T13:00:00Z")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"type": "t"}', "event 0: field 'id' missing or not a string or integer id"),
        (b'{"id": true, "type": "t"}', "event 0: field 'id' missing or not a string or integer id"),
        (b'[{"id": "a", "type": "t"}, 5]', "event 1: not a JSON object"),
        (b'{"id": "a"}', "event 0: field 'type' missing or not a non-empty string"),
        (b'"text"', "event 0: not a JSON object"),
    ],
)
def test_parse_hmac_json_rejections(body: bytes, expected: str) -> None:
    """Missing or mistyped id/type and non-object elements are named by position and field path."""
    with pytest.raises(BodyError) as excinfo:
        parse_hmac_json(body)
    assert reason(excinfo) == expected


# --- Parsing: HubSpot --------------------------------------------------------------------------------------


def test_parse_hubspot_array_gives_one_event_per_element() -> None:
    """Each element of the array is an event: eventId (as text), subscriptionType, objectId, occurredAt (UTC)."""
    events = parse_hubspot(HS_BODY)
    assert [(e.event_id, e.event_type, e.object_id, e.occurred_at) for e in events] == [
        ("1001", "contact.creation", "65059681032", "2024-05-01T13:59:58.741Z"),
        ("1002", "contact.propertyChange", "65059681032", "2024-05-01T13:59:59.000Z"),
    ]
    assert all(e.source_kind == "hubspot" for e in events)
    assert events[1].payload["propertyName"] == "email"


def test_parse_hubspot_empty_array_is_no_events() -> None:
    """An empty batch is valid and yields nothing."""
    assert parse_hubspot(b"[]") == []


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"eventId": 1}', "body is not a JSON array"),
        (b'[{"subscriptionType": "contact.creation"}]', "event 0: field 'eventId' missing"),
        (b'[{"eventId": false, "subscriptionType": "contact.creation"}]', "event 0: field 'eventId' missing"),
        (b'[{"eventId": 1}]', "event 0: field 'subscriptionType' missing"),
        (b'[{"eventId": 1, "subscriptionType": "c", "occurredAt": "yesterday"}]', "event 0: field 'occurredAt'"),
        (b'[{"eventId": 1, "subscriptionType": "c", "occurredAt": 1e400}]', "body is not valid JSON"),
        (b'[{"eventId": 1, "subscriptionType": "c", "occurredAt": 99999999999999999999}]', "out of range"),
    ],
)
def test_parse_hubspot_rejections(body: bytes, expected: str) -> None:
    """A non-array body and events without id or type, or with a bad time, raise BodyError."""
    with pytest.raises(BodyError, match=expected):
        parse_hubspot(body)


# --- Parsing: Salesforce Outbound Messaging ----------------------------------------------------------------


def test_parse_salesforce_outbound_message() -> None:
    """Each Notification becomes an event: its Id, the sObject type, the sObject Id and fields (nil → None)."""
    first, second = parse_salesforce_outbound(SF_MESSAGE, expected_org_id=ORG_ID)
    assert first == CrmEvent(
        source_kind="salesforce",
        event_id="04l5g00000AbCdEAAZ",
        event_type="Contact",
        object_id="0035g00000XyZaBAAV",
        occurred_at="2024-05-01T13:59:41.000Z",
        payload={
            "Id": "0035g00000XyZaBAAV",
            "Email": "pat.doe@example.org",
            "FirstName": "Pat",
            "LastName": "Doe & Sons",
            "HasOptedOutOfEmail": "false",
            "LastModifiedDate": "2024-05-01T13:59:41.000Z",
            "MobilePhone": None,
        },
    )
    assert (second.event_id, second.object_id, second.occurred_at) == (
        "04l5g00000AbCdFAAZ",
        "0035g00000XyZbCAAV",
        "2024-05-01T13:59:43.000Z",
    )


def test_parse_salesforce_org_id_forms() -> None:
    """The expected org id may be given in 15- or 18-character form, or not at all (no check)."""
    assert len(parse_salesforce_outbound(SF_MESSAGE, expected_org_id=ORG_ID[:15])) == 2
    assert len(parse_salesforce_outbound(SF_MESSAGE, expected_org_id=None)) == 2


@pytest.mark.parametrize("expected_org", ["00D5g000004OtHeRAA", "00D5g000004OtHe", "00d5g000004exampl", "00D"])
def test_parse_salesforce_org_id_mismatch(expected_org: str) -> None:
    """A message from another organization (ids are case-sensitive) is rejected."""
    with pytest.raises(BodyError) as excinfo:
        parse_salesforce_outbound(SF_MESSAGE, expected_org_id=expected_org)
    assert reason(excinfo) == "organization id mismatch"


XXE = b"""<?xml version="1.0"?>
<!DOCTYPE soapenv:Envelope [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>
<notifications xmlns="http://soap.sforce.com/2005/09/outbound"><OrganizationId>&xxe;</OrganizationId>
</notifications></soapenv:Body></soapenv:Envelope>"""

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<lolz>&lol3;</lolz>"""

HIDDEN_AFTER_COMMENT = b'<?xml version="1.0"?><!-- harmless --><!DOCTYPE x [<!ENTITY e "e">]><x>&e;</x>'


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (XXE, "DTD or entity declaration"),
        (BILLION_LAUGHS, "DTD or entity declaration"),
        (HIDDEN_AFTER_COMMENT, "DTD or entity declaration"),
        (b'<?xml version="1.0"?><x>&undeclared;</x>', "not well-formed XML"),
        (XXE.decode().encode("utf-16"), "not UTF-8"),
    ],
)
def test_parse_salesforce_rejects_entities_and_dtds(body: bytes, expected: str) -> None:
    """DOCTYPE/ENTITY declarations (XXE, billion laughs) are refused before parsing, in any encoding trick."""
    with pytest.raises(BodyError, match=expected):
        parse_salesforce_outbound(body, expected_org_id=None)


def test_parse_salesforce_accepts_comments_and_cdata() -> None:
    """Comments and CDATA are not DTDs: a message using them still parses."""
    body = SF_MESSAGE.replace(
        b"<sf:FirstName>Pat</sf:FirstName>", b"<!-- x --><sf:FirstName><![CDATA[Pat]]></sf:FirstName>"
    )
    assert parse_salesforce_outbound(body, expected_org_id=ORG_ID)[0].payload["FirstName"] == "Pat"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"not xml", "not well-formed XML"),
        (b"<Envelope/>", "not a SOAP envelope"),
        (SF_MESSAGE.replace(b"2005/09/outbound", b"2005/09/other"), "no Salesforce notifications"),
        (SF_MESSAGE.replace(b"<OrganizationId>00D5g000004ExAmPLE</OrganizationId>", b""), "missing OrganizationId"),
        (SF_MESSAGE.replace(b"<ActionId>04k5g000000TestAAA</ActionId>", b""), "missing ActionId"),
        (SF_MESSAGE.replace(b"<Id>04l5g00000AbCdFAAZ</Id>", b""), "notification 1: missing Id"),
        (SF_MESSAGE.replace(b' xsi:type="sf:Contact"', b"", 1), "notification 0: sObject has no xsi:type"),
        (SF_MESSAGE.replace(b"<sf:FirstName>Pat", b"<sf:Email>x</sf:Email><sf:FirstName>Pat"), "repeats a field"),
    ],
)
def test_parse_salesforce_rejects_malformed_messages(body: bytes, expected: str) -> None:
    """Broken envelopes and notifications raise BodyError naming the element, never its content."""
    with pytest.raises(BodyError, match=expected) as excinfo:
        parse_salesforce_outbound(body, expected_org_id=ORG_ID)
    assert "example.org" not in str(excinfo.value)


def test_parse_salesforce_no_notification_elements() -> None:
    """A notifications element without any Notification is rejected."""
    start, end = SF_MESSAGE.index(b"<Notification>"), SF_MESSAGE.rindex(b"</Notification>") + len(b"</Notification>")
    with pytest.raises(BodyError, match="no Notification element"):
        parse_salesforce_outbound(SF_MESSAGE[:start] + SF_MESSAGE[end:], expected_org_id=ORG_ID)


def test_parse_salesforce_nested_fields_are_bounded() -> None:
    """A field with child elements becomes a dict; nesting beyond the limit is rejected, not recursed."""
    nested = b"<sf:Account><sf:Name>Example Clinic</sf:Name></sf:Account>"
    body = SF_MESSAGE.replace(b"<sf:FirstName>Pat</sf:FirstName>", nested)
    assert parse_salesforce_outbound(body, ORG_ID)[0].payload["Account"] == {"Name": "Example Clinic"}
    deep = b"<sf:A>" * 50 + b"x" + b"</sf:A>" * 50
    with pytest.raises(BodyError, match="nests too deeply"):
        parse_salesforce_outbound(SF_MESSAGE.replace(b"<sf:FirstName>Pat</sf:FirstName>", deep), ORG_ID)


@pytest.mark.parametrize(("ok", "text"), [(True, "true"), (False, "false")])
def test_salesforce_ack_is_well_formed_soap(ok: bool, text: str) -> None:
    """The acknowledgement parses as XML: SOAP Envelope/Body/notificationsResponse/Ack with true or false."""
    root = ET.fromstring(salesforce_ack(ok))  # noqa: S314 -- our own constant output
    assert root.tag == "{http://schemas.xmlsoap.org/soap/envelope/}Envelope"
    ack = root.find(
        "{http://schemas.xmlsoap.org/soap/envelope/}Body"
        "/{http://soap.sforce.com/2005/09/outbound}notificationsResponse"
        "/{http://soap.sforce.com/2005/09/outbound}Ack"
    )
    assert ack is not None
    assert ack.text == text


def test_body_errors_never_quote_the_body() -> None:
    """Whatever fails, the message holds no text from the body (a sentinel standing in for patient data)."""
    sentinel = "Sentinel-Patient-Name"
    bodies = [
        f'{{"type": 1, "name": "{sentinel}"}}'.encode(),
        f'[{{"eventId": "{sentinel}"}}]'.encode(),
        f"<{sentinel}>".encode(),
        f'{{"{sentinel}": '.encode(),
    ]
    for body in bodies:
        for parse in (
            lambda b: parse_standard_webhook({"webhook-id": "m"}, b),
            parse_hubspot,
            lambda b: parse_salesforce_outbound(b, ORG_ID),
            parse_hmac_json,
        ):
            with pytest.raises(BodyError) as excinfo:
                parse(body)
            assert sentinel not in str(excinfo.value)
            assert excinfo.value.__cause__ is None


# --- Properties: only our two errors, whatever arrives ----------------------------------------------------

KNOWN_HEADERS = [
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "Webhook-Signature",
    "x-hubspot-signature-v3",
    "X-HubSpot-Request-Timestamp",
]
header_values = st.one_of(
    st.text(max_size=80),
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
    st.sampled_from([str(NOW), str(NOW_MS), str(NOW - 299), "v1,", "v1,AAAA v1,BBBB", " ", "v1a,x"]),
    st.text(alphabet="ABCDEFabcdef0123456789+/=", max_size=60).map(lambda s: "v1," + s),
)
headers_st = st.dictionaries(st.one_of(st.sampled_from(KNOWN_HEADERS), st.text(max_size=20)), header_values, max_size=6)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
hubspot_like = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "eventId": json_values,
            "subscriptionType": json_values,
            "objectId": json_values,
            "occurredAt": st.integers() | json_values,
        },
    ),
    max_size=4,
).map(lambda v: json.dumps(v).encode())
json_bodies = st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()), hubspot_like)


@st.composite
def mutated_salesforce(draw: st.DrawFn) -> bytes:
    """The realistic message with a random slice replaced by random bytes or XML-ish fragments."""
    start = draw(st.integers(0, len(SF_MESSAGE)))
    end = draw(st.integers(start, min(len(SF_MESSAGE), start + 80)))
    filler = draw(st.binary(max_size=40) | st.sampled_from([b"<!DOCTYPE x>", b"&lol;", b"<sf:Id/>", b"<", b"]]>"]))
    return SF_MESSAGE[:start] + filler + SF_MESSAGE[end:]


@PROPERTY
@given(headers=headers_st, body=st.binary(max_size=300), now=st.floats(allow_nan=True) | st.just(float(NOW)))
def test_property_verify_standard_webhook_raises_only_signature_error(
    headers: dict[str, str], body: bytes, now: float
) -> None:
    """Arbitrary headers, body and clock never raise anything but SignatureError."""
    with contextlib.suppress(SignatureError):
        verify_standard_webhook(WH_SECRET, headers, body, now=now)


@PROPERTY
@given(headers=headers_st, body=st.binary(max_size=300), method=st.text(max_size=8), uri=st.text(max_size=80))
def test_property_verify_hubspot_raises_only_signature_error(
    headers: dict[str, str], body: bytes, method: str, uri: str
) -> None:
    """Arbitrary method, URI, headers and body never raise anything but SignatureError."""
    with contextlib.suppress(SignatureError):
        verify_hubspot_v3(HS_SECRET, method, uri, headers, body, now_ms=NOW_MS)


@PROPERTY
@given(
    header=st.none() | st.text(max_size=100) | st.text(max_size=60).map(lambda s: "sha256=" + s),
    body=st.binary(max_size=300),
    prefix=st.sampled_from(["", "sha256=", "sha1="]),
    encoding=st.sampled_from(["hex", "base64"]),
    algorithm=st.sampled_from(["sha256", "sha1"]),
)
def test_property_verify_hmac_raises_only_signature_error(
    header: str | None, body: bytes, prefix: str, encoding: Any, algorithm: Any
) -> None:
    """Arbitrary header values and bodies, under every option, never raise anything but SignatureError."""
    with contextlib.suppress(SignatureError):
        verify_hmac(b"s3cret", header, body, prefix=prefix, encoding=encoding, algorithm=algorithm)


@PROPERTY
@given(msg_id=st.text(min_size=1, max_size=40), body=st.binary(max_size=300), flip=st.integers(min_value=0))
def test_property_standard_webhook_round_trip_and_tamper(msg_id: str, body: bytes, flip: int) -> None:
    """Whatever the id and body, a signed request verifies, and flipping any body bit makes it mismatch."""
    headers = standard_webhook_headers(WH_SECRET, msg_id, NOW, body)
    verify_standard_webhook(WH_SECRET, headers, body, now=NOW)
    if body:
        index = flip % len(body)
        tampered = body[:index] + bytes([body[index] ^ 0x01]) + body[index + 1 :]
        with pytest.raises(SignatureError, match="signature mismatch"):
            verify_standard_webhook(WH_SECRET, headers, tampered, now=NOW)


@PROPERTY
@given(uri=st.text(max_size=80), body=st.binary(max_size=300))
def test_property_hubspot_round_trip(uri: str, body: bytes) -> None:
    """Whatever the URI and body, what `sign_hubspot_v3` signs `verify_hubspot_v3` accepts."""
    headers = {
        "X-HubSpot-Signature-v3": sign_hubspot_v3(HS_SECRET, "POST", uri, body, NOW_MS),
        "X-HubSpot-Request-Timestamp": str(NOW_MS),
    }
    verify_hubspot_v3(HS_SECRET, "POST", uri, headers, body, now_ms=NOW_MS)


@PROPERTY
@given(headers=headers_st, body=json_bodies)
def test_property_json_parsers_raise_only_body_error(headers: dict[str, str], body: bytes) -> None:
    """Arbitrary bytes and JSON documents never make the JSON parsers raise anything but BodyError."""
    parsers: list[Callable[[], list[CrmEvent]]] = [
        lambda: parse_standard_webhook(headers, body),
        lambda: parse_hubspot(body),
        lambda: parse_hmac_json(body),
        lambda: parse_hmac_json(body, id_path="eventId", type_path="a.b", object_id_path="objectId"),
    ]
    for parse in parsers:
        with contextlib.suppress(BodyError):
            for event in parse():
                assert isinstance(event.event_id, str)
                assert event.event_id


@PROPERTY
@given(body=st.binary(max_size=300) | mutated_salesforce(), org=st.none() | st.just(ORG_ID) | st.text(max_size=18))
def test_property_salesforce_parser_raises_only_body_error(body: bytes, org: str | None) -> None:
    """Arbitrary bytes and mutated Salesforce messages never raise anything but BodyError."""
    with contextlib.suppress(BodyError):
        for event in parse_salesforce_outbound(body, expected_org_id=org):
            assert event.source_kind == "salesforce"
            assert event.event_id
