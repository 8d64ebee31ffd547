"""A local SMART Backend Services authorisation server (SMART App Launch 2.2.0) for tests and the sandbox.

    GET  /.well-known/smart-configuration   token_endpoint, grant types, auth methods, RS384/ES384
    POST /token                             client_credentials grant with a private_key_jwt assertion

The assertion is verified as a real server does: `alg` RS384/ES384, `typ` JWT, a `kid` registered for the
client (`iss`), the signature, `sub == iss`, `aud` == this token endpoint URL, `exp` present, not past and
no more than five minutes ahead, and a `jti` never seen while the JWT could still be used (a replay gets
400 invalid_client). Every refusal is an RFC 6749 §5.2 error body. Issued tokens are random strings kept in
`SmartTokenState.tokens` with their expiry, so a FHIR test server can call `state.check(authorization)`;
tests register keys, drive `clock`, revoke tokens and inject failures on the state.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.types import Options
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_LIFETIME = 300  # seconds: "no more than five minutes in the future"
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
_KEY_TYPES: dict[str, type[rsa.RSAPublicKey] | type[ec.EllipticCurvePublicKey]] = {
    "RS384": rsa.RSAPublicKey,
    "ES384": ec.EllipticCurvePublicKey,
}


@dataclass(frozen=True)
class IssuedToken:
    client_id: str
    scope: str
    expires_at: float  # clock seconds


@dataclass
class SmartTokenState:
    """Everything the server knows; tests read and change it directly."""

    expires_in: int = 300
    token_endpoint: str | None = None  # the `aud` clients must use; None: this app's own /token URL
    granted_scope: str | None = None  # grant this instead of the requested scope (to test narrowing)
    clock: Callable[[], float] = time.time
    algorithms: tuple[str, ...] = ("RS384", "ES384")
    clients: dict[str, dict[str, PublicKey]] = field(default_factory=dict)  # client_id -> kid -> key
    tokens: dict[str, IssuedToken] = field(default_factory=dict)
    jtis: dict[str, float] = field(default_factory=dict)  # jti -> exp, forgotten once the JWT has expired
    token_status: list[int] = field(default_factory=list)  # injected statuses for the next token requests
    token_requests: int = 0
    discovery_requests: int = 0

    def register(self, client_id: str, key_id: str, public_key: bytes | PublicKey) -> None:
        """Register one public key (PEM or a cryptography key object) for a client under `key_id`."""
        key = load_pem_public_key(public_key) if isinstance(public_key, bytes) else public_key
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise ValueError(f"key {key_id!r}: only RSA and EC public keys can be registered")
        self.clients.setdefault(client_id, {})[key_id] = key

    def register_jwks(self, client_id: str, jwks: dict[str, Any]) -> None:
        """Register every key of a JWK Set (each needs `kid`), as a client registers with a JWKS value."""
        for jwk in jwt.PyJWKSet.from_dict(jwks).keys:
            if not jwk.key_id:
                raise ValueError("every JWK needs a kid")
            self.register(client_id, jwk.key_id, jwk.key)

    def check(self, authorization: str) -> IssuedToken | None:
        """The live token named by an `Authorization: Bearer …` header value, or None."""
        scheme, _, value = authorization.partition(" ")
        issued = self.tokens.get(value.strip()) if scheme.lower() == "bearer" else None
        return issued if issued is not None and self.clock() < issued.expires_at else None

    def revoke(self, token: str | None = None) -> None:
        """Forget one issued token, or all of them."""
        if token is None:
            self.tokens.clear()
        else:
            self.tokens.pop(token, None)


class OAuthError(Exception):
    """A refusal with its RFC 6749 error code."""

    def __init__(self, code: str, description: str, status: int = 400) -> None:
        super().__init__(f"{code}: {description}")
        self.code, self.description, self.status = code, description, status

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": self.code, "error_description": self.description},
            status_code=self.status,
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )


def verify_assertion(state: SmartTokenState, assertion: str, audience: str) -> str:
    """The client_id authenticated by `assertion`, or OAuthError invalid_client; records its jti."""
    try:
        header = jwt.get_unverified_header(assertion)
        unverified = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise OAuthError("invalid_client", "client_assertion is not a JWT") from None
    alg, kid, client_id = header.get("alg"), header.get("kid"), unverified.get("iss")
    if alg not in state.algorithms or not isinstance(alg, str):
        raise OAuthError("invalid_client", f"alg {alg!r} is not accepted")
    if header.get("typ") != "JWT":
        raise OAuthError("invalid_client", "typ must be JWT")
    keys = state.clients.get(client_id) if isinstance(client_id, str) else None
    if keys is None or not isinstance(client_id, str):
        raise OAuthError("invalid_client", "unknown client (iss)")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None or not isinstance(key, _KEY_TYPES[alg]):
        raise OAuthError("invalid_client", f"no {alg} key registered under this kid")
    options: Options = {
        "require": ["iss", "sub", "aud", "exp", "jti"],
        "verify_exp": False,
        "verify_iat": False,
        "verify_nbf": False,
    }
    try:
        claims = jwt.decode(assertion, key, algorithms=[alg], audience=audience, issuer=client_id, options=options)
    except jwt.InvalidSignatureError:
        raise OAuthError("invalid_client", "signature does not verify") from None
    except jwt.InvalidAudienceError:
        raise OAuthError("invalid_client", "aud is not this token endpoint") from None
    except jwt.MissingRequiredClaimError as exc:
        raise OAuthError("invalid_client", f"claim {exc.claim} is missing") from None
    except jwt.PyJWTError:
        raise OAuthError("invalid_client", "client_assertion is invalid") from None
    if claims["sub"] != client_id:
        raise OAuthError("invalid_client", "sub must equal iss")
    now, exp, jti = state.clock(), claims["exp"], claims["jti"]
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise OAuthError("invalid_client", "exp is not a number")
    if exp <= now:
        raise OAuthError("invalid_client", "client_assertion has expired")
    if exp > now + MAX_ASSERTION_LIFETIME:
        raise OAuthError("invalid_client", "exp is more than five minutes ahead")
    if not isinstance(jti, str) or not jti:
        raise OAuthError("invalid_client", "jti must be a non-empty string")
    for used, until in list(state.jtis.items()):
        if until <= now:
            del state.jtis[used]
    if jti in state.jtis:
        raise OAuthError("invalid_client", "jti has been used before")
    state.jtis[jti] = exp
    return client_id


def _form(body: bytes) -> dict[str, str]:
    try:
        fields = parse_qs(body.decode("ascii"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "the body is not a form") from None
    if any(len(values) > 1 for values in fields.values()):
        raise OAuthError("invalid_request", "a parameter is repeated")
    return {name: values[0] for name, values in fields.items()}


def create_app(state: SmartTokenState) -> Starlette:
    def endpoint_url(request: Request) -> str:
        return state.token_endpoint or str(request.url_for("token"))

    async def configuration(request: Request) -> Response:
        state.discovery_requests += 1
        return JSONResponse(
            {
                "token_endpoint": endpoint_url(request),
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                "token_endpoint_auth_signing_alg_values_supported": list(state.algorithms),
                "scopes_supported": ["system/*.rs", "system/*.read"],
                "capabilities": ["client-confidential-asymmetric", "permission-v2", "permission-v1"],
            }
        )

    async def token(request: Request) -> Response:
        state.token_requests += 1
        if state.token_status and (status := state.token_status.pop(0)) != 200:
            return OAuthError(
                "temporarily_unavailable" if status == 503 else "server_error", "injected failure", status
            ).response()
        try:
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
                raise OAuthError("invalid_request", "the body must be application/x-www-form-urlencoded")
            form = _form(await request.body())
            if form.get("grant_type") != "client_credentials":
                raise OAuthError("unsupported_grant_type", "only client_credentials is supported")
            if form.get("client_assertion_type") != ASSERTION_TYPE:
                raise OAuthError("invalid_client", "client_assertion_type must be jwt-bearer")
            if not form.get("client_assertion"):
                raise OAuthError("invalid_request", "client_assertion is missing")
            client_id = verify_assertion(state, form["client_assertion"], endpoint_url(request))
            scope = state.granted_scope if state.granted_scope is not None else form.get("scope", "")
            if not scope.strip():
                raise OAuthError("invalid_scope", "no scope requested")
        except OAuthError as refusal:
            return refusal.response()
        value = secrets.token_urlsafe(32)
        state.tokens[value] = IssuedToken(client_id, scope, state.clock() + state.expires_in)
        return JSONResponse(
            {"access_token": value, "token_type": "bearer", "expires_in": state.expires_in, "scope": scope},
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )

    return Starlette(
        routes=[
            Route("/.well-known/smart-configuration", configuration, methods=["GET"]),
            Route("/token", token, methods=["POST"], name="token"),
        ]
    )
