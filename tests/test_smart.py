"""SMART Backend Services: the client auth (connector.sources.smart) against the sandbox token server.

Keys are generated at test time. The token server and a tiny FHIR server run in-process through
httpx.ASGITransport; the FHIR server accepts only live tokens from the token server's state.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from structlog.testing import capture_logs

from connector.errors import SourceError
from connector.sandbox.smart_token import ASSERTION_TYPE, SmartTokenState, create_app
from connector.sources.smart import (
    SmartAuthError,
    SmartBackendAuth,
    algorithm_for_key,
    load_private_key,
    missing_scopes,
)

FHIR = "https://fhir.test"
AUTH = "https://auth.test"
CLIENT = "connector-test"


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def keys() -> dict[str, bytes]:
    return {
        "rsa": pem(rsa.generate_private_key(65537, 2048)),
        "ec": pem(ec.generate_private_key(ec.SECP384R1())),
        "other": pem(rsa.generate_private_key(65537, 2048)),
    }


class Clock:
    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    clock: Clock
    state: SmartTokenState
    fhir_log: list[tuple[str, int]] = field(default_factory=list)
    deny_all: bool = False
    revoke_after_page: int | None = None


def fhir_app(world: World) -> Starlette:
    async def read(request: Request) -> Response:
        ok = not world.deny_all and world.state.check(request.headers.get("authorization", "")) is not None
        world.fhir_log.append((request.url.path, 200 if ok else 401))
        if not ok:
            return JSONResponse({"resourceType": "OperationOutcome"}, 401, {"WWW-Authenticate": "Bearer"})
        if request.path_params["type"] == "_page":
            number = int(request.path_params["id"])
            if world.revoke_after_page == number:
                world.state.revoke()
            links = [{"relation": "next", "url": f"{FHIR}/_page/{number + 1}"}] if number < 3 else []
            return JSONResponse({"resourceType": "Bundle", "type": "searchset", "link": links, "id": str(number)})
        return JSONResponse({"resourceType": request.path_params["type"], "id": request.path_params["id"]})

    return Starlette(routes=[Route("/{type}/{id}", read)])


@pytest.fixture
def world(keys: dict[str, bytes]) -> World:
    clock = Clock()
    state = SmartTokenState(clock=clock)
    for kid, name in (("rsa-1", "rsa"), ("ec-1", "ec")):
        public = serialization.load_pem_private_key(keys[name], None).public_key()
        assert isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        state.register(CLIENT, kid, public)
    return World(clock=clock, state=state)


Connect = Callable[..., tuple[httpx.AsyncClient, SmartBackendAuth]]


@pytest.fixture
async def connect(world: World, keys: dict[str, bytes]) -> AsyncIterator[Connect]:
    opened: list[tuple[httpx.AsyncClient, SmartBackendAuth]] = []

    def make(key: str = "rsa", kid: str = "rsa-1", **options: Any) -> tuple[httpx.AsyncClient, SmartBackendAuth]:
        options.setdefault("transport", httpx.ASGITransport(create_app(world.state)))
        auth = SmartBackendAuth(
            fhir_base_url=FHIR, client_id=CLIENT, private_key_pem=keys[key], key_id=kid, clock=world.clock, **options
        )
        client = httpx.AsyncClient(base_url=FHIR, auth=auth, transport=httpx.ASGITransport(fhir_app(world)))
        opened.append((client, auth))
        return client, auth

    yield make
    for client, auth in opened:
        await client.aclose()
        await auth.aclose()


def assertion(key: bytes, kid: str = "rsa-1", alg: str = "RS384", now: float | None = None, **claims: Any) -> str:
    now = time.time() if now is None else now
    body = {"iss": CLIENT, "sub": CLIENT, "aud": f"{AUTH}/token", "exp": int(now) + 240, "jti": str(uuid.uuid4())}
    body.update(claims)
    return jwt.encode(
        {k: v for k, v in body.items() if v is not None}, key, algorithm=alg, headers={"kid": kid, "typ": "JWT"}
    )


async def post_token(world: World, signed: str, **form: str) -> httpx.Response:
    data = {
        "grant_type": "client_credentials",
        "scope": "system/Patient.rs",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": signed,
        **form,
    }
    async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(world.state)), base_url=AUTH) as client:
        return await client.post("/token", data=data)


@pytest.mark.parametrize(("key", "kid", "alg"), [("rsa", "rsa-1", "RS384"), ("ec", "ec-1", "ES384")])
async def test_both_algorithms_obtain_a_token_and_read(
    connect: Connect, world: World, key: str, kid: str, alg: str
) -> None:
    """An RSA key signs RS384 and an EC P-384 key ES384; either gets a token that reads a resource."""
    client, auth = connect(key, kid)
    response = await client.get("/Patient/p1")
    assert response.status_code == 200 and response.json()["id"] == "p1"
    assert auth.algorithm == alg
    assert [t.client_id for t in world.state.tokens.values()] == [CLIENT]


async def test_assertion_has_the_smart_header_and_claims(connect: Connect, world: World) -> None:
    """The assertion carries alg/kid/typ, iss = sub = client_id, aud = endpoint, exp ≤ now + 300, a new jti."""
    _, auth = connect("ec", "ec-1")
    first, second = auth.assertion("https://ehr.example/token"), auth.assertion("https://ehr.example/token")
    assert jwt.get_unverified_header(first) == {"alg": "ES384", "kid": "ec-1", "typ": "JWT"}
    claims = jwt.decode(first, options={"verify_signature": False})
    assert claims["iss"] == claims["sub"] == CLIENT and claims["aud"] == "https://ehr.example/token"
    assert world.clock.now < claims["exp"] <= world.clock.now + 300
    assert claims["jti"] != jwt.decode(second, options={"verify_signature": False})["jti"]


def test_algorithm_is_derived_from_the_key(keys: dict[str, bytes], tmp_path: Path) -> None:
    """RSA → RS384, EC P-384 → ES384; a P-256 key, a non-key file or a mismatched algorithm is refused."""
    assert algorithm_for_key(keys["rsa"]) == "RS384" and algorithm_for_key(keys["ec"]) == "ES384"
    with pytest.raises(SmartAuthError, match="RSA or EC P-384"):
        algorithm_for_key(pem(ec.generate_private_key(ec.SECP256R1())))
    (tmp_path / "key.pem").write_bytes(keys["ec"])
    assert load_private_key(tmp_path / "key.pem") == keys["ec"]
    (tmp_path / "bad.pem").write_text("not-a-key-secret-text")
    with pytest.raises(SmartAuthError, match="not an unencrypted PEM private key") as caught:
        load_private_key(tmp_path / "bad.pem")
    assert "secret-text" not in str(caught.value)
    with pytest.raises(SmartAuthError, match="use ES384"):
        SmartBackendAuth(
            fhir_base_url=FHIR, client_id=CLIENT, private_key_pem=keys["ec"], key_id="k", algorithm="RS384"
        )


@pytest.mark.parametrize(
    ("case", "description"),
    [
        ("bad signature", "signature does not verify"),
        ("wrong aud", "aud is not this token endpoint"),
        ("exp too far ahead", "exp is more than five minutes ahead"),
        ("expired", "client_assertion has expired"),
        ("RS256", "alg 'RS256' is not accepted"),
        ("unknown kid", "no RS384 key registered under this kid"),
        ("sub differs", "sub must equal iss"),
        ("no jti", "claim jti is missing"),
    ],
)
async def test_token_server_refuses_bad_assertions(
    world: World, keys: dict[str, bytes], case: str, description: str
) -> None:
    """Each broken assertion gets HTTP 400 {"error": "invalid_client"} with a description of the fault."""
    now = world.clock.now
    signed = {
        "bad signature": lambda: assertion(keys["other"], now=now),
        "wrong aud": lambda: assertion(keys["rsa"], now=now, aud="http://elsewhere.test/token"),
        "exp too far ahead": lambda: assertion(keys["rsa"], now=now, exp=int(now) + 301),
        "expired": lambda: assertion(keys["rsa"], now=now, exp=int(now) - 1),
        "RS256": lambda: assertion(keys["rsa"], alg="RS256", now=now),
        "unknown kid": lambda: assertion(keys["rsa"], kid="rsa-9", now=now),
        "sub differs": lambda: assertion(keys["rsa"], now=now, sub="someone-else"),
        "no jti": lambda: assertion(keys["rsa"], now=now, jti=None),
    }[case]()
    response = await post_token(world, signed)
    assert response.status_code == 400
    assert response.json() == {"error": "invalid_client", "error_description": description}
    assert world.state.tokens == {}


async def test_token_server_refuses_a_replayed_jti_and_wrong_grant(world: World, keys: dict[str, bytes]) -> None:
    """exp = now + 300 is accepted once; the same jti again is invalid_client; bad grant/assertion types too."""
    signed = assertion(keys["rsa"], now=world.clock.now, exp=int(world.clock.now) + 300)
    assert (await post_token(world, signed)).status_code == 200
    replay = await post_token(world, signed)
    assert (replay.status_code, replay.json()) == (
        400,
        {"error": "invalid_client", "error_description": "jti has been used before"},
    )
    fresh = assertion(keys["rsa"], now=world.clock.now)
    assert (await post_token(world, fresh, grant_type="password")).json()["error"] == "unsupported_grant_type"
    assert (await post_token(world, fresh, client_assertion_type="x")).json()["error"] == "invalid_client"
    assert len(world.state.tokens) == 1


async def test_token_is_cached_and_renewed_before_expiry(connect: Connect, world: World) -> None:
    """Several reads share one token; it is renewed `refresh_margin` seconds before `expires_in` runs out."""
    client, _ = connect(refresh_margin=30.0)
    for _ in range(3):
        assert (await client.get("/Patient/p1")).status_code == 200
    assert (world.state.token_requests, world.state.discovery_requests) == (1, 1)
    world.clock.now += 269
    assert (await client.get("/Patient/p1")).status_code == 200
    assert world.state.token_requests == 1
    world.clock.now += 2
    assert (await client.get("/Patient/p1")).status_code == 200
    assert (world.state.token_requests, world.state.discovery_requests, len(world.state.tokens)) == (2, 1, 2)


async def test_a_401_gets_one_new_token_and_one_retry(connect: Connect, world: World) -> None:
    """A token revoked between pages costs one token request and one retry; every page still arrives."""
    client, _ = connect()
    world.revoke_after_page = 1
    pages, url = [], "/_page/1"
    while url:
        response = await client.get(url)
        assert response.status_code == 200
        pages.append(response.json()["id"])
        url = next((link["url"] for link in response.json()["link"] if link["relation"] == "next"), "")
    assert pages == ["1", "2", "3"]
    assert world.state.token_requests == 2
    assert [status for _, status in world.fhir_log] == [200, 401, 200, 200]


async def test_a_second_401_is_returned_not_retried_again(connect: Connect, world: World) -> None:
    """When the new token is refused too, the 401 goes back to the caller after exactly one retry."""
    client, _ = connect()
    world.deny_all = True
    assert (await client.get("/Patient/p1")).status_code == 401
    assert world.state.token_requests == 2 and len(world.fhir_log) == 2


async def test_concurrent_requests_share_one_token_request(connect: Connect, world: World) -> None:
    """A burst of reads fetches one token; a burst refused after revocation fetches one replacement."""
    client, _ = connect()
    responses = await asyncio.gather(*(client.get(f"/Patient/p{i}") for i in range(20)))
    assert {r.status_code for r in responses} == {200} and world.state.token_requests == 1
    world.state.revoke()
    responses = await asyncio.gather(*(client.get(f"/Patient/p{i}") for i in range(20)))
    assert {r.status_code for r in responses} == {200} and world.state.token_requests == 2


async def test_a_narrower_grant_is_logged(connect: Connect, world: World) -> None:
    """A granted scope that does not cover the request is logged and kept on the auth object."""
    client, auth = connect()
    world.state.granted_scope = "system/Appointment.read"
    with capture_logs() as logs:
        assert (await client.get("/Patient/p1")).status_code == 200
    assert auth.missing_scopes == ["system/Patient.rs"]
    assert [e["missing"] for e in logs if e["event"] == "smart.scope_narrowed"] == [["system/Patient.rs"]]
    assert missing_scopes("system/Appointment.rs system/Patient.rs", "system/*.rs") == []
    assert missing_scopes("system/Patient.rs", "system/Patient.r") == ["system/Patient.rs"]


async def test_explicit_endpoint_skips_discovery(connect: Connect, world: World) -> None:
    """With token_endpoint given, no discovery request is made and aud is that URL."""
    world.state.token_endpoint = "https://login.example.test/token"
    client, _ = connect(token_endpoint="https://login.example.test/token")
    assert (await client.get("/Patient/p1")).status_code == 200
    assert (world.state.discovery_requests, world.state.token_requests) == (0, 1)


async def test_discovery_problems_are_clear(connect: Connect, world: World) -> None:
    """No smart-configuration (HTTP 404) or no accepted algorithm fails naming the host and the reason."""
    client, _ = connect(transport=httpx.MockTransport(lambda request: httpx.Response(404)))
    with pytest.raises(SmartAuthError, match=r"SMART discovery to fhir\.test answered HTTP 404$"):
        await client.get("/Patient/p1")
    world.state.algorithms = ("RS384",)
    client, _ = connect("ec", "ec-1")
    with pytest.raises(SmartAuthError, match="does not accept ES384"):
        await client.get("/Patient/p1")


async def test_errors_never_contain_the_key_assertion_or_token(
    connect: Connect, world: World, keys: dict[str, bytes]
) -> None:
    """Refusals and failures are SourceErrors naming host and status/OAuth code, and no secret."""
    client, auth = connect()
    assert (await client.get("/Patient/p1")).status_code == 200
    old_token = next(iter(world.state.tokens))
    world.state.revoke()
    world.state.token_status = [503]
    with capture_logs() as logs, pytest.raises(SourceError) as unavailable:
        await client.get("/Patient/p1")
    world.state.clients[CLIENT]["rsa-1"] = world.state.clients[CLIENT]["ec-1"]  # registered key no longer fits
    with pytest.raises(SmartAuthError) as refused:
        await client.get("/Patient/p1")
    assert str(unavailable.value) == "SMART token request to fhir.test answered HTTP 503 temporarily_unavailable"
    assert str(refused.value) == "SMART token request to fhir.test answered HTTP 400 invalid_client"
    key_lines = [line for line in keys["rsa"].decode().splitlines() if not line.startswith("-----")]
    for text in (str(unavailable.value), str(refused.value), repr(auth.__dict__.get("_token")), str(logs)):
        assert old_token not in text and "eyJ" not in text
        assert not any(line in text for line in key_lines)


async def test_tokens_go_only_to_the_fhir_server(connect: Connect, world: World) -> None:
    """A request to another host is refused before any token is fetched or sent."""
    client, _ = connect()
    with pytest.raises(
        SmartAuthError, match=r"refusing to send a token to http://evil\.test:80 \(not https://fhir\.test:443\)"
    ):
        await client.get("http://evil.test/Patient/p1")
    assert world.state.token_requests == 0


async def test_a_smart_source_polls_end_to_end(
    tmp_path: Path, keys: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auth: {type: smart}` in the config: the poller discovers the token endpoint, signs an assertion with
    the key file, and reads the FHIR server with the token; the email goes out."""
    from datetime import UTC, datetime, timedelta

    from starlette.types import Receive, Scope, Send

    from connector.config import load_config
    from connector.daemon import run_once
    from connector.delivery.paubox import PauboxRestMailer
    from connector.models import system_clock
    from connector.runtime import Runtime
    from connector.sandbox.fhir import FhirState
    from connector.sandbox.fhir import create_app as fhir_server
    from connector.sandbox.paubox import SandboxState
    from connector.sandbox.paubox import create_app as paubox_server
    from connector.sandbox.smart_token import SmartTokenState
    from connector.sandbox.smart_token import create_app as token_server
    from tests.conftest import BASIC, write_config
    from tests.factories import appointment, patient

    tokens = SmartTokenState()
    private = serialization.load_pem_private_key(keys["rsa"], password=None)
    tokens.register("connector-test", "rsa-1", private.public_key())  # type: ignore[arg-type]
    fhir = FhirState(authorizer=tokens.check)
    fhir.put(patient("p1", "Robin", email="robin@example.org"))
    fhir.put(appointment("a1", "p1", datetime.now(UTC) + timedelta(days=3)))
    auth_app, ehr_app = token_server(tokens), fhir_server(fhir)

    async def router(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        target = auth_app if path.startswith(("/.well-known/", "/token")) else ehr_app
        await target(scope, receive, send)

    (tmp_path / "client-key.pem").write_bytes(keys["rsa"])
    monkeypatch.setenv("PAUBOX_API_KEY", "k")
    smart = (
        "    auth:\n      type: smart\n      client_id: connector-test\n      key_id: rsa-1\n"
        "      private_key: {file: client-key.pem}\n"
    )
    config = load_config(
        write_config(tmp_path, "https://fhir.test", "https://paubox.test", mappings=BASIC, extra_source=smart)
    )
    sandbox = SandboxState(api_key="k", username="clinic")
    mailer = PauboxRestMailer(config.delivery.paubox, transport=httpx.ASGITransport(app=paubox_server(sandbox)))
    runtime = Runtime.open(config, system_clock, mailer=mailer, source_transport=httpx.ASGITransport(app=router))
    try:
        report = await run_once(runtime)
    finally:
        await runtime.aclose()
    assert report.polls[0].error is None
    assert [m["recipients"] for m in sandbox.messages] == [["robin@example.org"]]
    assert len(tokens.tokens) == 1
