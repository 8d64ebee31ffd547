"""The Paubox sandbox and the FHIR test server behave like the real services where the connector cares."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import SandboxState
from connector.sandbox.paubox import create_app as paubox_app
from tests.conftest import Server

MESSAGE = {
    "data": {
        "message": {
            "recipients": ["robin@example.org"],
            "headers": {"subject": "Hi", "from": "clinic@example.org", "X-Notification-Key": "k1"},
            "content": {"text/plain": "Hello", "text/html": "PHA+SGVsbG88L3A+"},
        }
    }
}


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sandbox.test")


async def test_paubox_sandbox_accepts_validates_and_keeps_messages() -> None:
    state = SandboxState(api_key="k", username="clinic")
    async with client(paubox_app(state)) as http:
        ok = await http.post("/v1/clinic/messages", json=MESSAGE, headers={"Authorization": "Token token=k"})
        assert ok.status_code == 200 and ok.json()["customHeaders"] == {"X-Notification-Key": "k1"}
        tracking = ok.json()["sourceTrackingId"]
        receipt = await http.get(
            f"/v1/clinic/message_receipt?sourceTrackingId={tracking}", headers={"Authorization": "Bearer k"}
        )
        assert receipt.json()["data"]["message"]["message_deliveries"][0]["status"]["deliveryStatus"] == "delivered"
        wrong_user = await http.post("/v1/other/messages", json=MESSAGE, headers={"Authorization": "Token token=k"})
        assert wrong_user.status_code == 401 and wrong_user.json()["errors"][0]["status"] == "invalid_access_token"
        real_address = json.loads(json.dumps(MESSAGE))
        real_address["data"]["message"]["recipients"] = ["someone@gmail.com"]
        refused = await http.post("/v1/clinic/messages", json=real_address, headers={"Authorization": "Bearer k"})
        assert refused.status_code == 400
        unrouted = await http.post("/v2/messages", json=MESSAGE)
        assert unrouted.status_code == 404 and unrouted.headers["content-type"].startswith("text/html")
        inbox = (await http.get("/_sandbox/messages")).json()["messages"]
    assert [m["html"] for m in inbox] == ["<p>Hello</p>"]


async def test_paubox_sandbox_emits_delivered_webhooks() -> None:
    received: list[dict[str, Any]] = []

    async def hook(request: Request) -> Response:
        received.append(json.loads(await request.body()))
        return Response(status_code=204)

    with Server(Starlette(routes=[Route("/hook", hook, methods=["POST"])])) as receiver:
        state = SandboxState(api_key="k", webhook_url=f"{receiver.url}/hook")
        async with client(paubox_app(state)) as http:
            ok = await http.post("/v1/email/messages", json=MESSAGE, headers={"Authorization": "Bearer k"})
            for _ in range(100):
                if received:
                    break
                await asyncio.sleep(0.02)
    [event] = received
    assert event["event_name"] == "api_mail_log_delivered"
    assert event["payload"]["source_tracking_id"] == ok.json()["sourceTrackingId"]
    assert event["payload"]["custom_headers"] == {"X-Notification-Key": "k1"}


async def test_fhir_server_versions_filters_and_pages() -> None:
    state = FhirState()
    for index in range(5):
        state.put({"resourceType": "Appointment", "id": f"a{index}", "status": "booked", "participant": []})
    first = state.current("Appointment", "a0")
    assert first is not None
    state.put({**first, "status": "cancelled"})
    async with client(fhir_app(state)) as http:
        page = (await http.get("/Appointment", params={"_count": "2", "_sort": "_lastUpdated"})).json()
        ids = [e["resource"]["id"] for e in page["entry"]]
        while next_link := next((link["url"] for link in page["link"] if link["relation"] == "next"), None):
            page = (await http.get(next_link)).json()
            ids += [e["resource"]["id"] for e in page["entry"]]
        assert ids == ["a1", "a2", "a3", "a4", "a0"]
        since = state.current("Appointment", "a4")["meta"]["lastUpdated"]  # type: ignore[index]
        recent = (await http.get("/Appointment", params={"_lastUpdated": f"gt{since}"})).json()
        assert [e["resource"]["meta"]["versionId"] for e in recent["entry"]] == ["2"]
        assert "_lastUpdated=gt" in recent["link"][0]["url"]
        state.ignore = {"_sort"}
        unsorted = (await http.get("/Appointment", params={"_sort": "_lastUpdated"})).json()
        assert "_sort" not in unsorted["link"][0]["url"]
        assert (await http.get("/Appointment/nope")).status_code == 404


async def test_paubox_sandbox_receipt_of_an_unknown_id_and_with_a_wrong_key() -> None:
    """What `connector check` relies on, as the API documents it: the key is checked first (401 with the
    `invalid_access_token` envelope), then an unknown tracking id is a JSON 404 that echoes the id."""
    state = SandboxState(api_key="k", username="clinic")
    unknown = "6e1cf9a4-7bde-4834-8200-ed424b50c8a7"
    async with client(paubox_app(state)) as http:
        missing = await http.get(
            "/v1/clinic/message_receipt", params={"sourceTrackingId": unknown}, headers={"Authorization": "Bearer k"}
        )
        wrong_key = await http.get(
            "/v1/clinic/message_receipt", params={"sourceTrackingId": unknown}, headers={"Authorization": "Bearer x"}
        )
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/json"
    assert missing.json() == {
        "errors": [
            {"code": 404, "title": "Message was not found", "details": "Message with this tracking id was not found"}
        ],
        "sourceTrackingId": unknown,
    }
    assert wrong_key.status_code == 401
    assert wrong_key.json()["errors"][0]["status"] == "invalid_access_token"
