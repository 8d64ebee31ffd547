"""Every HTTP endpoint of `connector run`, in-process: the app the daemon serves (`daemon.web_app`) over a real
SQLite ledger, with a Paubox webhook token, a FHIR Subscription endpoint and one CRM source of each kind,
and helpers that sign CRM bodies correctly so that hostile content reaches past the signature checks."""

from __future__ import annotations

import base64
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from connector.config import load_config
from connector.crm.verify import sign_hmac, sign_hubspot_v3, standard_webhook_headers
from connector.daemon import web_app
from connector.delivery.paubox import PauboxRestMailer
from connector.models import system_clock
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import SandboxState
from connector.sandbox.paubox import create_app as paubox_app
from tests.conftest import API_KEY, BASIC, write_config
from tests.factories import patient

PAUBOX_TOKEN = "paubox-webhook-path-token-0123456789"
SUBSCRIPTION_SECRET = "Bearer subscription-secret-for-tests"
STD_SECRET = "whsec_" + base64.b64encode(b"standard-webhooks-test-secret-32").decode()
HUB_SECRET = "hubspot-client-secret-for-tests"
GEN_SECRET = "generic-hmac-secret"
SF_TOKEN = "salesforce-path-token-0123456789"
HUB_URL = "https://connector.example.org/webhooks/crm/hubspot"
ORG = "00D5g000004ExAmPLE"
FHIR_BASE = "http://fhir.test"

SERVER = f"""server:
  port: 9
  max_body: 200000
crm:
  std: {{kind: standard-webhooks, secret: "${{STD_SECRET}}", rate_limit: 100000, burst: 100000}}
  hubspot: {{kind: hubspot, secret: "${{HUB_SECRET}}", public_url: "{HUB_URL}", rate_limit: 100000, burst: 100000}}
  salesforce: {{kind: salesforce-outbound, path_token: "${{SF_TOKEN}}", organization_id: {ORG},
                rate_limit: 100000, burst: 100000}}
  gen: {{kind: hmac-json, secret: "${{GEN_SECRET}}", rate_limit: 100000, burst: 100000}}
inbox:
  keys: {{k1: "${{INBOX_KEY}}"}}
  current: k1
"""


class Endpoints:
    """A client for each endpoint; every call returns the answer."""

    def __init__(self, runtime: Runtime, client: httpx.AsyncClient, fhir: FhirState) -> None:
        self.runtime, self.client, self.fhir = runtime, client, fhir

    async def paubox(self, body: bytes) -> httpx.Response:
        return await self.client.post(f"/webhooks/paubox/{PAUBOX_TOKEN}", content=body)

    async def notify(self, body: bytes) -> httpx.Response:
        return await self.client.post("/fhir/ehr/notify", content=body, headers=self._fhir_headers())

    async def put(self, appointment_id: str, body: bytes) -> httpx.Response:
        return await self.client.put(
            f"/fhir/ehr/notify/Appointment/{appointment_id}", content=body, headers=self._fhir_headers()
        )

    async def standard(self, body: bytes, msg_id: bytes = b"msg_1") -> httpx.Response:
        headers = standard_webhook_headers(STD_SECRET, msg_id.decode("latin-1"), int(time.time()), body)
        raw = {k: v.encode("latin-1") for k, v in headers.items()}
        return await self.client.post("/webhooks/crm/std", content=body, headers=raw)

    async def hubspot(self, body: bytes) -> httpx.Response:
        now = int(time.time() * 1000)
        return await self.client.post(
            "/webhooks/crm/hubspot",
            content=body,
            headers={
                "X-HubSpot-Signature-v3": sign_hubspot_v3(HUB_SECRET, "POST", HUB_URL, body, now),
                "X-HubSpot-Request-Timestamp": str(now),
            },
        )

    async def generic(self, body: bytes) -> httpx.Response:
        return await self.client.post(
            "/webhooks/crm/gen", content=body, headers={"X-Signature": sign_hmac(GEN_SECRET.encode(), body, "sha256=")}
        )

    async def salesforce(self, body: bytes) -> httpx.Response:
        return await self.client.post(
            f"/webhooks/crm/salesforce/{SF_TOKEN}", content=body, headers={"Content-Type": "text/xml"}
        )

    @staticmethod
    def _fhir_headers() -> dict[str, str]:
        return {"Authorization": SUBSCRIPTION_SECRET, "Content-Type": "application/fhir+json"}


@contextlib.asynccontextmanager
async def open_endpoints(
    folder: Path, monkeypatch: pytest.MonkeyPatch, ledger_url: str | None = None
) -> AsyncIterator[Endpoints]:
    for name, value in {
        "PAUBOX_API_KEY": API_KEY,
        "PAUBOX_TOKEN": PAUBOX_TOKEN,
        "SUB_SECRET": SUBSCRIPTION_SECRET,
        "STD_SECRET": STD_SECRET,
        "HUB_SECRET": HUB_SECRET,
        "GEN_SECRET": GEN_SECRET,
        "SF_TOKEN": SF_TOKEN,
        "INBOX_KEY": base64.b64encode(os.urandom(32)).decode(),
    }.items():
        monkeypatch.setenv(name, value)
    config = load_config(
        write_config(
            folder,
            FHIR_BASE,
            "https://paubox.test",
            mappings=BASIC,
            ledger_url=ledger_url,
            extra_source="    subscription:\n      enabled: true\n      secret: ${SUB_SECRET}\n",
            paubox_extra="    webhook_token: ${PAUBOX_TOKEN}\n    optout_on_hard_bounce: true\n",
            extra=SERVER,
        )
    )
    fhir = FhirState()
    fhir.put(patient("p1", "Robin", email="robin@example.org"))
    mailer = PauboxRestMailer(
        config.delivery.paubox,
        transport=httpx.ASGITransport(app=paubox_app(SandboxState(api_key=API_KEY, username="clinic"))),
    )
    runtime = Runtime.open(
        config, system_clock, mailer=mailer, source_transport=httpx.ASGITransport(app=fhir_app(fhir))
    )
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=web_app(runtime)), base_url="https://connector.example.org"
        ) as client:
            yield Endpoints(runtime, client, fhir)
    finally:
        await runtime.aclose()
