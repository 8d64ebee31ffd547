"""SMART Backend Services authorisation (SMART App Launch 2.2.0) as an `httpx.Auth` for the FHIR client.

    client = httpx.AsyncClient(base_url=url, auth=SmartBackendAuth(fhir_base_url=url, client_id=…,
                               private_key_pem=load_private_key(path), key_id=…))

For each access token: discover the token endpoint (`{fhir_base_url}/.well-known/smart-configuration`,
once), sign a fresh client assertion (RS384 or ES384, `exp` ≤ 5 min, a new `jti`), POST the
`client_credentials` grant, and cache the token until `refresh_margin` seconds before it expires. One
asyncio.Lock makes a burst of requests share one token request. A 401 from the FHIR server buys one new
token and one retry of that request. Errors are SmartAuthError (a SourceError: the poll is abandoned and
retried) naming the source, the host and the HTTP status or OAuth error code; never the key, the assertion
or a token. Discovery and token requests are bounded like the source's own (`max_bytes`, a `timeout` for
the whole exchange: SmartLimitError), and a token endpoint must be https (plain http only to loopback).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import httpx
import structlog

from connector import metrics
from connector.errors import SourceError
from connector.sources.bounded import BodyTooLarge, SourceLimitError, capped, fetch
from connector.urls import check_url, origin, show_origin

log = structlog.get_logger("connector.sources.smart")

Algorithm = Literal["RS384", "ES384"]
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Servers reject an `exp` more than five minutes ahead; stay a minute under so a server whose clock is a
# little behind ours still accepts the assertion.
ASSERTION_LIFETIME = 240
DEFAULT_SCOPE = "system/Appointment.rs system/Patient.rs"
_V1_PERMISSIONS = {"read": "rs", "write": "cud", "*": "cruds"}


class SmartAuthError(SourceError):
    """The SMART authorisation server could not be used, or refused this client."""


class SmartLimitError(SmartAuthError, SourceLimitError):
    """A discovery or token answer went past the source's limits (size, time)."""


if TYPE_CHECKING:  # `cryptography` is loaded when a key is read, not at start-up: only SMART needs it
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def load_private_key(path: str | Path) -> bytes:
    """The PEM bytes of an unencrypted private key file (RSA or EC P-384); checked, never echoed."""
    pem = Path(path).read_bytes()
    _parse_key(pem, where=f"private key file {Path(path).name!r}")
    return pem


def algorithm_for_key(private_key_pem: bytes) -> Algorithm:
    """RS384 for an RSA key, ES384 for an EC P-384 key; SmartAuthError for anything else."""
    return _algorithm(_parse_key(private_key_pem, where="private key"))


def _parse_key(pem: bytes, where: str) -> SigningKey:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise SmartAuthError(f"{where}: not an unencrypted PEM private key") from None
    if isinstance(key, rsa.RSAPrivateKey) or (
        isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
    ):
        return key
    raise SmartAuthError(f"{where}: SMART needs an RSA or EC P-384 key, not {type(key).__name__}")


def _algorithm(key: SigningKey) -> Algorithm:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return "RS384" if isinstance(key, rsa.RSAPrivateKey) else "ES384"


def scope_covers(granted: str, wanted: str) -> bool:
    """Whether one granted scope (`system/*.rs`, `system/Patient.read`) allows one wanted scope."""
    if granted == wanted:
        return True
    try:
        g_context, g_rest = granted.split("/", 1)
        w_context, w_rest = wanted.split("/", 1)
        g_type, g_perms = g_rest.split(".", 1)
        w_type, w_perms = w_rest.split(".", 1)
    except ValueError:
        return False
    g_perms = _V1_PERMISSIONS.get(g_perms, g_perms)
    w_perms = _V1_PERMISSIONS.get(w_perms, w_perms)
    return g_context == w_context and g_type in ("*", w_type) and "?" not in g_rest and set(w_perms) <= set(g_perms)


def missing_scopes(requested: str, granted: str) -> list[str]:
    """The requested scopes that no granted scope covers (empty when the grant is wide enough)."""
    grants = granted.split()
    return [w for w in requested.split() if not any(scope_covers(g, w) for g in grants)]


@dataclass(frozen=True)
class AccessToken:
    """A bearer token and when to stop using it (clock seconds). The value never appears in a repr."""

    value: str = field(repr=False)
    refresh_at: float
    scope: str


class SmartBackendAuth(httpx.Auth):
    """Adds `Authorization: Bearer …` from a SMART Backend Services token; for httpx.AsyncClient only."""

    def __init__(
        self,
        *,
        fhir_base_url: str,
        client_id: str,
        private_key_pem: bytes,
        key_id: str,
        algorithm: Algorithm | None = None,
        scope: str = DEFAULT_SCOPE,
        token_endpoint: str | None = None,
        clock: Callable[[], float] = time.time,
        refresh_margin: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        max_bytes: int = 32 * 1024 * 1024,
        source: str | None = None,
    ) -> None:
        self._key = _parse_key(private_key_pem, where=f"SMART client {client_id!r}: private key")
        derived = _algorithm(self._key)
        if algorithm is not None and algorithm != derived:
            raise SmartAuthError(
                f"SMART client {client_id!r}: algorithm {algorithm} does not fit the key (use {derived})"
            )
        self.algorithm: Algorithm = derived
        self.fhir_base_url = fhir_base_url.rstrip("/")
        self.client_id, self.key_id, self.scope = client_id, key_id, scope
        base = httpx.URL(self.fhir_base_url)
        self._origin, self._base = base.host, origin(base)
        self._token_endpoint = token_endpoint
        self._clock, self._margin = clock, refresh_margin
        self._source, self._timeout, self._max_bytes = source, timeout, max_bytes
        self._prefix = f"source {source!r}: " if source else ""
        self._http = httpx.AsyncClient(
            transport=transport, timeout=timeout, event_hooks={"response": [capped(max_bytes)]}
        )
        self._lock = asyncio.Lock()
        self._token: AccessToken | None = None
        self.granted_scope: str | None = None
        self.missing_scopes: list[str] = []

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        raise RuntimeError("SmartBackendAuth works with httpx.AsyncClient only")

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if origin(request.url) != self._base:
            raise SmartAuthError(
                f"{self._prefix}SMART client {self.client_id!r}: refusing to send a token to "
                f"{show_origin(request.url)} (not {show_origin(self.fhir_base_url)})"
            )
        await request.aread()  # a request retried after a 401 must be replayable
        token = await self.token()
        request.headers["Authorization"] = f"Bearer {token.value}"
        response = yield request
        if response.status_code == 401:  # revoked or expired early: one new token, one retry
            token = await self.token(stale=token)
            request.headers["Authorization"] = f"Bearer {token.value}"
            yield request

    async def token(self, stale: AccessToken | None = None) -> AccessToken:
        """The cached token, or a new one when it is due for renewal or is `stale` (refused by the server)."""
        async with self._lock:
            current = self._token
            if current is not None and current is not stale and self._clock() < current.refresh_at:
                return current
            self._token = await self._request_token()
            return self._token

    async def token_endpoint(self) -> str:
        """The configured token endpoint, else the one the FHIR server advertises (looked up once)."""
        if self._token_endpoint is None:
            url = f"{self.fhir_base_url}/.well-known/smart-configuration"
            config = await self._json("GET", url, "SMART discovery", headers={"Accept": "application/json"})
            endpoint = config.get("token_endpoint")
            if not isinstance(endpoint, str) or not endpoint:
                raise SmartAuthError(f"{self._prefix}SMART discovery at {self._origin}: no token_endpoint advertised")
            try:
                check_url(endpoint, credentials=True)
            except ValueError as exc:
                raise SmartAuthError(
                    f"{self._prefix}SMART discovery at {self._origin}: the advertised token_endpoint is refused: {exc}"
                ) from None
            algorithms = config.get("token_endpoint_auth_signing_alg_values_supported")
            if isinstance(algorithms, list) and algorithms and self.algorithm not in algorithms:
                raise SmartAuthError(
                    f"{self._prefix}SMART discovery at {self._origin}: the server does not accept "
                    f"{self.algorithm} assertions (it lists {', '.join(map(str, algorithms))})"
                )
            self._token_endpoint = endpoint
        return self._token_endpoint

    def assertion(self, audience: str) -> str:
        """A freshly signed client assertion JWT (new `jti`, `exp` ASSERTION_LIFETIME seconds ahead)."""
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": audience,
            "exp": int(self._clock()) + ASSERTION_LIFETIME,
            "jti": str(uuid.uuid4()),
        }
        import jwt  # here, not at start-up: PyJWT loads much of `cryptography`, needed only with SMART

        return jwt.encode(claims, self._key, algorithm=self.algorithm, headers={"kid": self.key_id, "typ": "JWT"})

    async def _request_token(self) -> AccessToken:
        endpoint = await self.token_endpoint()
        host = urlsplit(endpoint).netloc
        started = self._clock()
        form = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": self.assertion(endpoint),
        }
        body = await self._json("POST", endpoint, "SMART token request", data=form)
        value, kind = body.get("access_token"), body.get("token_type")
        if not isinstance(value, str) or not value or not isinstance(kind, str) or kind.lower() != "bearer":
            raise SmartAuthError(f"{self._prefix}SMART token endpoint {host}: the answer holds no bearer access_token")
        expires_in = body.get("expires_in", 300)
        if not isinstance(expires_in, int | float) or isinstance(expires_in, bool) or expires_in <= 0:
            raise SmartAuthError(f"{self._prefix}SMART token endpoint {host}: expires_in is not a positive number")
        granted = body.get("scope")
        if not isinstance(granted, str):  # RFC 6749 §5.1: omitted means exactly what was requested
            granted = self.scope
        self.granted_scope, self.missing_scopes = granted, missing_scopes(self.scope, granted)
        if self.missing_scopes:
            log.warning(
                "smart.scope_narrowed",
                client_id=self.client_id,
                token_endpoint=host,
                missing=self.missing_scopes,
                granted=granted,
            )
        log.info("smart.token", client_id=self.client_id, token_endpoint=host, expires_in=expires_in)
        margin = min(self._margin, expires_in / 2)  # a very short-lived token is still used for a while
        return AccessToken(value=value, refresh_at=started + expires_in - margin, scope=granted)

    async def _json(self, method: str, url: str, what: str, **kwargs: Any) -> dict[str, Any]:
        host = urlsplit(url).netloc
        try:
            reply = await fetch(
                self._http,
                self._http.build_request(method, url, **kwargs),
                max_bytes=self._max_bytes,
                deadline=self._timeout,
            )
        except httpx.HTTPError as exc:
            raise SmartAuthError(f"{self._prefix}{what} to {host} failed: {type(exc).__name__}") from exc
        except BodyTooLarge:
            raise self._breach(
                "max_response_size",
                f"{what} to {host}: the answer is larger than {self._max_bytes} bytes (limits.max_response_size)",
            ) from None
        except TimeoutError:
            raise self._breach(
                "timeout",
                f"{what} to {host} did not complete within {self._timeout:g} s "
                "(timeout: connection, headers and the whole body)",
            ) from None
        try:
            body = json.loads(reply.content)
        except ValueError:
            body = None
        if reply.status_code != 200:
            code = body.get("error") if isinstance(body, dict) else None
            oauth = (
                f" {code}"
                if isinstance(code, str) and code.isascii() and len(code) <= 40 and code.replace("_", "").isalpha()
                else ""
            )
            raise SmartAuthError(f"{self._prefix}{what} to {host} answered HTTP {reply.status_code}{oauth}")
        if not isinstance(body, dict):
            raise SmartAuthError(f"{self._prefix}{what} to {host}: the answer is not a JSON object")
        return body

    def _breach(self, limit: str, problem: str) -> SmartLimitError:
        metrics.inc("connector_source_limit_breaches_total", source=self._source or "-", limit=limit)
        return SmartLimitError(f"{self._prefix}{problem}", limit)

    async def aclose(self) -> None:
        """Close the HTTP client used for discovery and token requests."""
        await self._http.aclose()
