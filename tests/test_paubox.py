"""Paubox delivery: the wire format, and the classification of every documented answer."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import httpx
import pytest

from connector.config.delivery import PauboxConfig
from connector.delivery import Verdict
from connector.delivery.paubox import PauboxRestMailer, build_payload, classify
from connector.delivery.retry import backoff
from connector.models import Email
from connector.sandbox.paubox import SandboxState, create_app
from tests.conftest import Server

EMAIL = Email(
    notification_key="ehr:m:a1|booked",
    to="pat.one@example.org",
    from_address="Clinic <appointments@example.org>",
    subject="Your appointment",
    text="Hello",
    html="<p>Hëllo</p>",
)


def config(**overrides: object) -> PauboxConfig:
    values: dict[str, object] = {"username": "clinic", "api_key": "${TEST_KEY}"}
    values.update(overrides)
    return PauboxConfig.model_validate(values)


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_KEY", "k-123")


def test_payload_shape() -> None:
    message = build_payload(EMAIL)["data"]["message"]
    assert message["recipients"] == ["pat.one@example.org"]
    assert message["headers"]["X-Notification-Key"] == "ehr:m:a1|booked"
    assert base64.b64decode(message["content"]["text/html"]).decode() == "<p>Hëllo</p>"
    assert message["content"]["text/plain"] == "Hello"


async def test_send_to_sandbox_with_both_auth_schemes() -> None:
    state = SandboxState(api_key="k-123", username="clinic")
    for scheme in ("token", "bearer"):
        mailer = PauboxRestMailer(
            config(auth_scheme=scheme, base_url="https://paubox.test/v1/clinic"),
            transport=httpx.ASGITransport(app=create_app(state)),
        )
        outcome = await mailer.send(EMAIL)
        await mailer.aclose()
        assert outcome.verdict is Verdict.SENT and outcome.tracking_id
    assert [m["html"] for m in state.messages] == ["<p>Hëllo</p>"] * 2
    assert state.messages[0]["custom_headers"] == {"X-Notification-Key": "ehr:m:a1|booked"}


async def test_wrong_key_pauses_instead_of_failing() -> None:
    state = SandboxState(api_key="another", username="clinic")
    mailer = PauboxRestMailer(
        config(base_url="https://paubox.test/v1/clinic"), transport=httpx.ASGITransport(app=create_app(state))
    )
    outcome = await mailer.send(EMAIL)
    await mailer.aclose()
    assert (outcome.verdict, outcome.blocking) == (Verdict.RETRY, True)
    assert "HTTP 401 Invalid Access Token" in outcome.reason and "k-123" not in outcome.reason


def answer(status: int, body: object, headers: dict[str, str] | None = None) -> tuple[Verdict, str]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    outcome = classify(status, raw, httpx.Headers(headers or {}))
    return outcome.verdict, outcome.reason


@pytest.mark.parametrize(
    ("status", "body", "verdict"),
    [
        (200, {"sourceTrackingId": "3d38ab13", "customHeaders": {}, "data": "Service OK"}, Verdict.SENT),
        (200, {"sourceTrackingId": "3d38ab13", "data": {"message_id": "x"}}, Verdict.SENT),
        (200, {"errors": [{"code": 400, "title": "Bad Request"}]}, Verdict.FAILED),
        (200, {"data": "Service OK"}, Verdict.IN_DOUBT),
        (200, b"<html>ok</html>", Verdict.IN_DOUBT),
        (400, {"errors": [{"code": 400, "title": "Bad Request", "details": "Missing subject"}]}, Verdict.FAILED),
        (
            400,
            {"code": 400, "title": "Invalid Request", "details": {"title": "Missing values", "details": "x"}},
            Verdict.FAILED,
        ),
        (422, {"message": "from domain not verified"}, Verdict.FAILED),
        (429, {"errors": [{"code": 429, "title": "Too Many Requests"}]}, Verdict.RETRY),
        (500, {"errors": [{"code": 500, "title": "Internal Server Error"}]}, Verdict.IN_DOUBT),
        (502, b"<html><h1>502 Bad Gateway</h1></html>", Verdict.IN_DOUBT),
        (504, b"", Verdict.IN_DOUBT),
    ],
)
def test_classification(status: int, body: object, verdict: Verdict) -> None:
    assert answer(status, body)[0] is verdict


def test_error_text_never_carries_an_address() -> None:
    _, reason = answer(
        400, {"errors": [{"code": 400, "title": "Bad Request", "details": "Invalid recipient pat.one@example.org"}]}
    )
    assert "pat.one" not in reason and "<address>" in reason


def test_retry_after_is_read() -> None:
    outcome = classify(429, b"{}", httpx.Headers({"Retry-After": "7"}))
    assert outcome.retry_after == 7


async def test_timeout_after_sending_is_in_doubt_and_refused_connection_is_retry() -> None:
    def read_timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    verdicts = []
    for handler in (read_timeout, refused):
        mailer = PauboxRestMailer(config(), transport=httpx.MockTransport(handler))
        verdicts.append((await mailer.send(EMAIL)).verdict)
        await mailer.aclose()
    assert verdicts == [Verdict.IN_DOUBT, Verdict.RETRY]


async def test_unrouted_base_url_gives_html_404_and_pauses() -> None:
    state = SandboxState(api_key="k-123", username="clinic")
    mailer = PauboxRestMailer(
        config(base_url="https://paubox.test/v2/wrong"), transport=httpx.ASGITransport(app=create_app(state))
    )
    outcome = await mailer.send(EMAIL)
    await mailer.aclose()
    assert (outcome.verdict, outcome.blocking) == (Verdict.RETRY, True)
    assert "404" in outcome.reason


def test_backoff_is_bounded_and_honours_retry_after() -> None:
    top = lambda low, high: high  # noqa: E731 - the largest jitter
    assert backoff(1, timedelta(seconds=30), timedelta(hours=1), rand=top) == timedelta(seconds=30)
    assert backoff(4, timedelta(seconds=30), timedelta(hours=1), rand=top) == timedelta(seconds=240)
    assert backoff(30, timedelta(seconds=30), timedelta(hours=1), rand=top) == timedelta(hours=1)
    assert backoff(1, timedelta(seconds=30), timedelta(hours=1), 90, rand=top) == timedelta(seconds=90)


async def test_a_message_that_cannot_be_encoded_fails_and_is_never_in_doubt(
    paubox_server: Server, paubox_state: SandboxState
) -> None:
    """A lone surrogate in the subject or body makes the JSON body unencodable: nothing leaves, so the
    message is `failed` (not in doubt). In a bulk request it fails alone; the others are sent."""
    from dataclasses import replace

    mailer = PauboxRestMailer(config(base_url=f"{paubox_server.url}/v1/clinic", api_key="${TEST_KEY}"))
    paubox_state.api_key = "k-123"
    try:
        bad_subject = replace(EMAIL, notification_key="k1", subject="Your appointment \ud800")
        bad_text = replace(EMAIL, notification_key="k2", text="Hello \udfff")
        for email in (bad_subject, bad_text):
            outcome = await mailer.send(email)
            assert outcome.verdict is Verdict.FAILED and "cannot be encoded as JSON" in outcome.reason
        good = [replace(EMAIL, notification_key=f"g{i}") for i in range(2)]
        outcomes = await mailer.send_many([good[0], bad_subject, good[1]])
        assert [o.verdict for o in outcomes] == [Verdict.SENT, Verdict.FAILED, Verdict.SENT]
    finally:
        await mailer.aclose()
    assert sorted(m["custom_headers"]["X-Notification-Key"] for m in paubox_state.messages) == ["g0", "g1"]
