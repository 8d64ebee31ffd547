"""Delivery in the real world: each sandbox fault mode and what it leaves in the ledger.

The connector runs in process against the FHIR test server and the Paubox sandbox; the sandbox's webhooks
reach the connector's own web receiver, served on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import structlog

from connector import logs, metrics
from connector.config import load_config
from connector.daemon import aftercare, run_once
from connector.delivery import Outcome, Signal, Verdict
from connector.delivery.gate import GateState, MailerGate
from connector.delivery.retry import GiveUp, RetryAt, RetryPolicy, next_try
from connector.models import State
from connector.runtime import Runtime
from connector.sandbox.fhir import FhirState
from connector.sandbox.fhir import create_app as fhir_app
from connector.sandbox.paubox import Fault, SandboxState, WebhookFaults
from connector.sandbox.paubox import create_app as paubox_app
from connector.web.app import create_app as web_app
from tests.conftest import BASIC, Server, write_config
from tests.factories import appointment, patient

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
TOKEN = "hook-token-0123456789"
MARKERS = (
    "robin@example.org",
    "sam@example.org",
    "kim@example.org",
    "lee@example.org",
    "Your appointment",
    "Dear Robin",
    "Robin",
    "Testperson",
)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


class Rig:
    def __init__(self, runtime: Runtime, fhir: FhirState, paubox: SandboxState, clock: Clock, server: Server) -> None:
        self.runtime, self.fhir, self.paubox, self.clock, self.server = runtime, fhir, paubox, clock, server

    async def close(self) -> None:
        await self.runtime.aclose()
        self.server.__exit__(None, None, None)

    async def cycle(self, after: timedelta = timedelta(0)) -> None:
        self.clock.now += after
        await run_once(self.runtime)

    def states(self) -> dict[str, State]:
        records = self.runtime.ledger.reports.notifications(list(State), 100)
        return {r.patient_id: r.state for r in records}

    def record(self, patient_id: str) -> object:
        [found] = [r for r in self.runtime.ledger.reports.notifications(list(State), 100) if r.patient_id == patient_id]
        return found

    def copies(self) -> list[int]:
        return sorted(self.paubox.requests.values())


def make_config(tmp_path: Path, paubox_url: str, extra: str, paubox_extra: str) -> Path:
    return write_config(
        tmp_path,
        "http://fhir.test",
        paubox_url,
        mappings=BASIC,
        extra=extra,
        paubox_extra="    read_timeout: 1s\n" + paubox_extra,
    )


@pytest.fixture(autouse=True)
def log_output() -> Iterator[io.StringIO]:
    """Everything the connector logs during each test here; none of it may carry an address, a subject or
    a body."""
    buffer = io.StringIO()
    logs.configure("debug", "console")
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=buffer))
    yield buffer
    for marker in MARKERS:
        assert marker not in buffer.getvalue(), f"a log line carries {marker!r}"


async def rig_for(tmp_path: Path, api_key: str, extra: str = "", people: int = 1, paubox_extra: str = "") -> Rig:
    fhir, clock = FhirState(), Clock()
    paubox = SandboxState(api_key=api_key, username="clinic")
    for index, (pid, name) in enumerate([("p1", "Robin"), ("p2", "Sam"), ("p3", "Kim"), ("p4", "Lee")][:people]):
        fhir.put(patient(pid, name, email=f"{name.lower()}@example.org"))
        fhir.put(appointment(f"a{index}", pid, T0 + timedelta(days=3)))
    # The sandbox listens on a real socket: timeouts and dropped connections need one.
    server = Server(paubox_app(paubox)).__enter__()
    config = load_config(make_config(tmp_path, server.url, extra, paubox_extra))
    runtime = Runtime.open(config, clock, source_transport=httpx.ASGITransport(app=fhir_app(fhir)))
    return Rig(runtime, fhir, paubox, clock, server)


@pytest.fixture
async def rig(tmp_path: Path, api_key_env: str, request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    extra, people = getattr(request, "param", ("", 1))
    made = await rig_for(tmp_path, api_key_env, extra, people)
    yield made
    await made.close()


RETRY_5XX = "    server_errors: retry\n"


async def test_429_pauses_then_resumes_and_sends_once(rig: Rig, log_output: io.StringIO) -> None:
    rig.paubox.faults = [Fault(status=429, retry_after=120)]
    before = metrics.value("connector_mailer_state_changes_total", state="paused")
    await rig.cycle()
    assert rig.states() == {"p1": State.PENDING}
    assert rig.record("p1").attempts == 0  # type: ignore[attr-defined]
    assert rig.runtime.dispatcher.gate.state is GateState.PAUSED
    await rig.cycle(timedelta(seconds=60))  # still paused: nothing goes
    assert rig.paubox.received == 1
    await rig.cycle(timedelta(seconds=61))  # the probe goes and succeeds
    assert rig.states() == {"p1": State.SENT} and rig.copies() == [1]
    assert rig.runtime.dispatcher.gate.state is GateState.RUNNING
    assert metrics.value("connector_mailer_state_changes_total", state="paused") == before + 1
    assert log_output.getvalue().count("mailer.paused") == 1


async def test_server_errors_in_retry_mode_are_retried_then_sent_once(tmp_path: Path, api_key_env: str) -> None:
    rig = await rig_for(tmp_path, api_key_env, paubox_extra=RETRY_5XX)
    rig.paubox.faults = [Fault(status=503)]
    await rig.cycle()
    assert rig.states() == {"p1": State.PENDING}
    await rig.cycle(timedelta(minutes=5))
    assert rig.states() == {"p1": State.SENT} and rig.copies() == [1]
    await rig.close()


async def test_retries_end_in_failed_with_the_reason(tmp_path: Path, api_key_env: str) -> None:
    rig = await rig_for(tmp_path, api_key_env, "  max_attempts: 2\n  circuit_failures: 50\n", paubox_extra=RETRY_5XX)
    rig.paubox.faults = [Fault(status=503, count=5)]
    await rig.cycle()
    await rig.cycle(timedelta(minutes=1))
    record = rig.record("p1")
    assert record.state is State.FAILED  # type: ignore[attr-defined]
    assert record.reason == "gave up after 2 attempts: HTTP 503 Service Unavailable: Fault injected by the sandbox"  # type: ignore[attr-defined]
    assert rig.paubox.messages == []
    await rig.close()


async def test_circuit_opens_after_consecutive_server_errors_and_probes(tmp_path: Path, api_key_env: str) -> None:
    rig = await rig_for(
        tmp_path,
        api_key_env,
        "  circuit_failures: 2\n  circuit_cooldown: 60s\n  concurrency: 1\n",
        people=3,
        paubox_extra=RETRY_5XX,
    )
    rig.paubox.faults = [Fault(status=502, count=2)]
    await rig.cycle()
    assert rig.runtime.dispatcher.gate.state is GateState.BROKEN
    assert rig.paubox.received == 2  # the third was not even tried
    await rig.cycle(timedelta(seconds=61))
    assert rig.runtime.dispatcher.gate.state is GateState.RUNNING
    assert sorted(rig.states().values()) == [State.SENT] * 3 and rig.copies() == [1, 1, 1]
    await rig.close()


@pytest.mark.parametrize(
    ("fault", "verdict"),
    [
        (Fault(hang=3, accept=True), State.IN_DOUBT),  # accepted, then no answer before the read timeout
        (Fault(close=True, accept=True), State.IN_DOUBT),  # accepted, then the connection dropped
        (Fault(status=500, accept=True), State.IN_DOUBT),
        (Fault(status=502, html=True), State.IN_DOUBT),
        (Fault(status=200), State.FAILED),  # 200 with an `errors` body
    ],
)
async def test_unclear_answers_are_in_doubt_and_clear_refusals_fail(
    tmp_path: Path, api_key_env: str, fault: Fault, verdict: State
) -> None:
    rig = await rig_for(tmp_path, api_key_env, "")
    rig.paubox.faults = [fault]
    await rig.cycle()
    assert rig.states() == {"p1": verdict}
    await rig.cycle(timedelta(hours=1))
    assert rig.states() == {"p1": verdict}  # never resent blindly
    assert len(rig.paubox.messages) == (1 if fault.accept else 0)
    await rig.close()


@pytest.fixture
async def hooked(
    tmp_path: Path, api_key_env: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> AsyncIterator[Rig]:
    """A rig whose sandbox posts webhooks to the connector's receiver on a real port."""
    monkeypatch.setenv("PAUBOX_WEBHOOK_TOKEN", TOKEN)
    policy = getattr(request, "param", "hold")
    extra = f"  in_doubt:\n    policy: {policy}\n    wait: 30m\n"
    rig = await rig_for(tmp_path, api_key_env, extra, paubox_extra="    webhook_token: ${PAUBOX_WEBHOOK_TOKEN}\n")
    app = web_app(rig.runtime.config, rig.runtime.aftercare)
    with Server(app) as receiver:
        rig.paubox.webhook_url = f"{receiver.url}/webhooks/paubox/{TOKEN}"
        yield rig
    await rig.close()


async def wait_for_webhooks(rig: Rig) -> None:
    from connector.sandbox.paubox import _PENDING_WEBHOOKS

    for _ in range(200):
        if not _PENDING_WEBHOOKS:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)


async def test_in_doubt_is_resolved_by_a_webhook(hooked: Rig) -> None:
    hooked.paubox.webhook_faults = WebhookFaults(delay=2)  # the event comes after we gave up waiting
    hooked.paubox.faults = [Fault(hang=3, accept=True)]
    await hooked.cycle()
    assert hooked.states() == {"p1": State.IN_DOUBT}
    await wait_for_webhooks(hooked)
    record = hooked.record("p1")
    assert record.state is State.SENT  # type: ignore[attr-defined]
    assert record.tracking_id == hooked.paubox.messages[0]["sourceTrackingId"]  # type: ignore[attr-defined]
    assert record.delivery_status == "delivered"  # type: ignore[attr-defined]
    assert hooked.copies() == [1]


async def test_a_webhook_during_the_send_means_sent_even_if_the_answer_is_lost(hooked: Rig) -> None:
    hooked.paubox.faults = [Fault(hang=3, accept=True)]  # its webhook arrives while we still wait
    await hooked.cycle()
    record = hooked.record("p1")
    assert (record.state, record.reason) == (State.SENT, "confirmed by a Paubox webhook")  # type: ignore[attr-defined]
    assert hooked.copies() == [1]


async def test_in_doubt_without_webhook_is_held_and_visible(hooked: Rig) -> None:
    hooked.paubox.webhook_faults = WebhookFaults(drop=10)
    hooked.paubox.faults = [Fault(hang=3, accept=True)]
    before = metrics.value("connector_in_doubt_alerts_total")
    await hooked.cycle()
    await hooked.cycle(timedelta(minutes=31))
    await hooked.cycle(timedelta(minutes=31))
    assert hooked.states() == {"p1": State.IN_DOUBT} and hooked.copies() == [1]
    assert metrics.value("connector_in_doubt_alerts_total") == before + 1  # alerted once, not every cycle
    [held] = hooked.runtime.ledger.reports.notifications([State.IN_DOUBT], 10)
    assert "no answer after sending: ReadTimeout" in (held.reason or "")


@pytest.mark.parametrize("hooked", ["resend"], indirect=True)
async def test_resend_policy_sends_exactly_one_more(hooked: Rig) -> None:
    hooked.paubox.webhook_faults = WebhookFaults(drop=10)
    hooked.paubox.faults = [Fault(hang=3, accept=True), Fault(hang=3, accept=True)]
    await hooked.cycle()
    await hooked.cycle(timedelta(minutes=31))  # resent, in doubt again
    await hooked.cycle(timedelta(minutes=31))
    await hooked.cycle(timedelta(minutes=31))  # held now: no third copy
    assert hooked.copies() == [2]
    assert hooked.states() == {"p1": State.IN_DOUBT}
    assert hooked.record("p1").resends == 1  # type: ignore[attr-defined]


async def test_duplicated_and_reordered_webhooks_are_harmless(hooked: Rig) -> None:
    hooked.paubox.webhook_events = ("api_mail_log_delivered", "api_mail_log_opened")
    hooked.paubox.webhook_faults = WebhookFaults(duplicate=True, reorder=True)
    await hooked.cycle()
    await wait_for_webhooks(hooked)
    record = hooked.record("p1")
    assert (record.state, record.delivery_status) == (State.SENT, "opened")  # type: ignore[attr-defined]


async def test_receipts_fill_in_delivery_status_when_no_webhook_came(rig: Rig) -> None:
    await rig.cycle()
    assert rig.record("p1").delivery_status is None  # type: ignore[attr-defined]
    rig.clock.now += timedelta(hours=2)
    await aftercare(rig.runtime)
    assert rig.record("p1").delivery_status == "delivered"  # type: ignore[attr-defined]


@pytest.mark.parametrize("rig", [("  bulk: 10\n", 4)], indirect=True)
async def test_bulk_sends_many_in_one_request_each_with_its_key(rig: Rig) -> None:
    await rig.cycle()
    assert rig.paubox.received == 0 and rig.paubox.bulk_requests == 1
    assert sorted(rig.states().values()) == [State.SENT] * 4 and rig.copies() == [1, 1, 1, 1]
    assert len({m["sourceTrackingId"] for m in rig.paubox.messages}) == 4


@pytest.mark.parametrize("rig", [("  bulk: 10\n", 3)], indirect=True)
async def test_a_lost_bulk_answer_puts_the_whole_batch_in_doubt(rig: Rig) -> None:
    rig.paubox.faults = [Fault(hang=3, accept=True)]
    await rig.cycle()
    assert sorted(rig.states().values()) == [State.IN_DOUBT] * 3
    assert len(rig.paubox.messages) == 3


async def test_webhook_receiver_refuses_bad_requests(hooked: Rig) -> None:
    url = hooked.paubox.webhook_url
    assert url is not None
    base = url.rsplit("/", 1)[0]
    async with httpx.AsyncClient() as client:
        assert (await client.post(f"{base}/wrong-token", json={})).status_code == 404
        assert (await client.post(url, content=b"{not json")).status_code == 400
        assert (await client.post(url, json={"hello": 1})).status_code == 400
        assert (await client.post(url, content=b"x" * 2_000_000)).status_code == 413
        unknown = await client.post(url, json={"event_name": "api_mail_log_clicked", "payload": {}})
        assert unknown.status_code == 200 and unknown.json() == {"result": "ignored"}
        foreign = await client.post(
            url,
            json={
                "event_name": "api_mail_log_delivered",
                "payload": {"custom_headers": {"X-Other": "1"}, "to": "x@example.org"},
            },
        )
        assert foreign.json() == {"result": "ignored"}


def test_a_probe_that_did_not_go_is_given_back() -> None:
    gate = MailerGate(failure_threshold=1, cooldown=timedelta(seconds=30))
    gate.record(Outcome(Verdict.IN_DOUBT, "HTTP 500", signal=Signal.SERVER_ERROR), T0)
    later = T0 + timedelta(seconds=31)
    assert gate.allow(later)
    gate.give_back()  # its notification was withdrawn before the request left
    assert gate.ready(later) and gate.allow(later)


def test_gate_and_policy_are_pure() -> None:
    gate = MailerGate(failure_threshold=2, cooldown=timedelta(seconds=30))
    error = Outcome(Verdict.IN_DOUBT, "HTTP 500", signal=Signal.SERVER_ERROR)
    assert gate.record(error, T0) is None and gate.record(error, T0) is GateState.BROKEN
    assert not gate.allow(T0 + timedelta(seconds=29))
    assert gate.allow(T0 + timedelta(seconds=30)) and not gate.allow(T0 + timedelta(seconds=30))  # one probe
    assert gate.record(Outcome(Verdict.SENT, "ok"), T0) is GateState.RUNNING
    policy = RetryPolicy(
        max_attempts=5, max_age=timedelta(hours=1), base=timedelta(seconds=30), cap=timedelta(minutes=10)
    )
    top = lambda low, high: high  # noqa: E731 - the largest jitter
    assert next_try(policy, attempts=2, first_attempt_at=T0, now=T0, reason="r", retry_after=None, rand=top) == RetryAt(
        T0 + timedelta(seconds=60)
    )
    assert isinstance(next_try(policy, attempts=5, first_attempt_at=T0, now=T0, reason="r", retry_after=None), GiveUp)
    assert next_try(
        policy, attempts=1, first_attempt_at=T0 - timedelta(hours=1), now=T0, reason="r", retry_after=None
    ) == GiveUp("gave up after 1:00:00 of trying: r")
