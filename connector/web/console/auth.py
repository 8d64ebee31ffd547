"""Who is using the console, and may they: local users (argon2 hashes) with signed session cookies, or a
single sign-on proxy's user header believed only from `server.trusted_proxies`; CSRF tokens for every POST;
failed sign-ins limited per user and address.

The sign-in form's token is bound to the browser it was given to: a random pre-session cookie
(`connector_console_login`, `HttpOnly`, `SameSite=Strict`, `Secure` like the session's, path `<console>/login`)
that the token is derived from. A forged page posting an attacker's own form token cannot sign a victim's
browser into the attacker's account (login CSRF): that browser lacks the matching cookie.

The session cookie is signed (itsdangerous), `HttpOnly`, `SameSite=Strict` and `Secure` (unless
`console.secure_cookie` is off for plain-HTTP tests); it carries the user name, the role, a CSRF token and
the time it was issued, nothing else. A signed-out session is recorded in the ledger (by a digest of its
CSRF token) and refused by every process serving the console, after a restart too.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadSignature, URLSafeTimedSerializer

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from connector.config.console import ConsoleConfig

COOKIE = "connector_console"
LOGIN_COOKIE = "connector_console_login"  # the pre-session cookie: the browser the sign-in form was given to
LOGIN_TTL = 3600  # seconds a sign-in form (its token and its pre-session cookie) stays good
_LOGIN_SALT = "connector-console-login"
_NONCE = re.compile(r"[A-Za-z0-9_-]{32}")
PEER = "connector.peer"  # the scope key holding the address of the immediate peer (before proxy headers)
_HASHER = PasswordHasher()


def hash_password(password: str) -> str:
    """An argon2id hash of `password` (argon2-cffi's defaults), for `connector console add-user`."""
    return _HASHER.hash(password)


@dataclass(frozen=True)
class User:
    name: str
    role: str  # viewer or operator
    csrf: str  # the token every POST of this session must carry
    sso: bool = False

    @property
    def operator(self) -> bool:
        return self.role == "operator"


class Limiter:
    """At most `attempts` failed sign-ins per (user, address) within `window` seconds."""

    def __init__(self, attempts: int, window: float) -> None:
        self.attempts, self.window = attempts, window
        self._failures: dict[tuple[str, str], deque[float]] = {}

    def blocked(self, key: tuple[str, str]) -> bool:
        failures = self._failures.get(key)
        if not failures:
            return False
        while failures and failures[0] < time.monotonic() - self.window:
            failures.popleft()
        return len(failures) >= self.attempts

    def failed(self, key: tuple[str, str]) -> None:
        if len(self._failures) > 10_000:  # a flood of made-up names must not grow this without end, ...
            recent = time.monotonic() - self.window
            self._failures = {  # ... nor lift a block: keys blocked now are kept, the rest forgotten
                k: f for k, f in self._failures.items() if len(f) >= self.attempts and f[-1] >= recent
            }
        self._failures.setdefault(key, deque()).append(time.monotonic())

    def forget(self, key: tuple[str, str]) -> None:
        self._failures.pop(key, None)


class Gate:
    """Sign-in, sessions and CSRF for one console."""

    def __init__(self, config: ConsoleConfig, trusted_proxies: list[Any]) -> None:
        self.config = config
        self.trusted = trusted_proxies
        self.limiter = Limiter(config.login_attempts, config.login_window.total_seconds())
        self._signer: URLSafeTimedSerializer | None = None

    @property
    def signer(self) -> URLSafeTimedSerializer:
        if self._signer is None:  # read the secret when first needed
            secret = self.config.session_secret.get_secret_value()
            self._signer = URLSafeTimedSerializer(secret, salt="connector-console-session")
        return self._signer

    def user(self, request: Request) -> User | None:
        """The signed-in user of this request (SSO header from a trusted proxy, else the session cookie).
        Whether that session was signed out is the ledger's to say (`session_id`; connector.web.console.pages)."""
        sso = self.config.sso
        if sso is not None and self._from_trusted_proxy(request):
            name = request.headers.get(sso.user_header, "").strip()
            if name:
                granted = "operator" if name in sso.operators else "viewer"
                # a CSRF token bound to the user and the secret: SSO sessions have no cookie of ours
                token = hmac.new(self.signer.secret_key, f"csrf:{name}".encode(), "sha256").hexdigest()
                return User(name[:64], granted, token, sso=True)
        cookie = request.cookies.get(COOKIE)
        if not cookie or not self.config.users:
            return None
        try:
            data = self.signer.loads(cookie, max_age=int(self.config.session_lifetime.total_seconds()))
        except BadSignature:
            return None
        if not isinstance(data, dict):
            return None
        who, role, csrf = data.get("u"), data.get("r"), data.get("c")
        configured = self.config.users.get(who) if isinstance(who, str) else None
        if configured is None or configured.role != role or not isinstance(csrf, str):
            return None  # a user removed or demoted since signing in loses the session
        return User(str(who), str(role), csrf)

    def sign_in(self, name: str, password: str, address: str) -> User | str:
        """The user, or why not (one line, the same for an unknown user and a wrong password)."""
        key = (name[:64], address)
        if self.limiter.blocked(key):
            return "too many failed sign-ins: wait a few minutes and try again"
        configured = self.config.users.get(name)
        try:
            ok = configured is not None and _HASHER.verify(configured.password_hash.get_secret_value(), password)
        except (VerificationError, InvalidHashError):
            ok = False
        if not ok or configured is None:
            if configured is None:  # spend the time a real check takes, so that names cannot be probed
                _spend()
            self.limiter.failed(key)
            return "unknown user or wrong password"
        self.limiter.forget(key)
        return User(name, configured.role, secrets.token_urlsafe(24))

    def start_session(self, response: Response, user: User, path: str) -> None:
        value = self.signer.dumps({"u": user.name, "r": user.role, "c": user.csrf})
        response.set_cookie(
            COOKIE,
            value,
            max_age=int(self.config.session_lifetime.total_seconds()),
            path=path,
            secure=self.config.secure_cookie,
            httponly=True,
            samesite="strict",
        )

    @staticmethod
    def session_id(user: User) -> str:
        """What names a session in the ledger's sign-outs: the SHA-256 of its CSRF token (unique to each
        sign-in), so that the ledger never holds a token a page would accept."""
        return hashlib.sha256(f"session:{user.csrf}".encode()).hexdigest()

    def end_session(self, response: Response, path: str) -> None:
        response.delete_cookie(COOKIE, path=path, secure=self.config.secure_cookie, httponly=True, samesite="strict")

    # the sign-in form's CSRF token, bound to the browser -------------------------------------------------

    def login_nonce(self, request: Request) -> tuple[str, bool]:
        """(this browser's pre-session value, whether it is new and must be set with `keep_login_nonce`)."""
        value = request.cookies.get(LOGIN_COOKIE, "")
        return (value, False) if _NONCE.fullmatch(value) else (secrets.token_urlsafe(24), True)

    def login_token(self, nonce: str) -> str:
        """The sign-in form's token: signed and timed, and good only beside the pre-session cookie `nonce`
        (a token taken from another browser, an attacker's own in particular, signs nobody in here)."""
        return self.signer.dumps(self._bound(nonce), salt=_LOGIN_SALT)

    def login_token_ok(self, request: Request, token: object) -> bool:
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if not isinstance(token, str) or not _NONCE.fullmatch(nonce):
            return False
        try:
            bound = self.signer.loads(token, salt=_LOGIN_SALT, max_age=LOGIN_TTL)
        except BadSignature:  # tampered, or expired (SignatureExpired is a BadSignature)
            return False
        return isinstance(bound, str) and hmac.compare_digest(bound, self._bound(nonce))

    def keep_login_nonce(self, response: Response, nonce: str, path: str) -> None:
        response.set_cookie(
            LOGIN_COOKIE, nonce, max_age=LOGIN_TTL, path=path + "/login", secure=self.config.secure_cookie,
            httponly=True, samesite="strict",
        )  # fmt: skip

    def drop_login_nonce(self, response: Response, path: str) -> None:
        response.delete_cookie(
            LOGIN_COOKIE, path=path + "/login", secure=self.config.secure_cookie, httponly=True, samesite="strict"
        )

    def _bound(self, nonce: str) -> str:
        return hmac.new(self.signer.secret_key, f"login:{nonce}".encode(), "sha256").hexdigest()

    @staticmethod
    def csrf_ok(user: User, token: object) -> bool:
        return isinstance(token, str) and bool(token) and hmac.compare_digest(user.csrf, token)

    def _from_trusted_proxy(self, request: Request) -> bool:
        peer = request.scope.get(PEER) or (request.client.host if request.client else "")
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self.trusted)


_DUMMY: list[str] = []


def _spend() -> None:
    if not _DUMMY:
        _DUMMY.append(_HASHER.hash(secrets.token_urlsafe(16)))
    with contextlib.suppress(VerificationError):
        _HASHER.verify(_DUMMY[0], "not the password")
