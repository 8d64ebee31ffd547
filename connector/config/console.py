"""The `console:` section: the operator console in the browser (connector.web.console). Off when absent.

Two ways in, either or both: local users (argon2 hashes given by reference, like every secret) signing in
with a password, or a single sign-on reverse proxy that names the user in a header, believed only from
`server.trusted_proxies`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from connector.config.base import Secret, Strict
from connector.units import Duration

Role = Literal["viewer", "operator"]


def _long_enough(value: Secret) -> Secret:
    """A session secret short enough to guess would let anyone sign their own operator cookie: refused at
    load when it can be read then (the message never echoes it)."""
    if value.problem() is None and len(value.get_secret_value().strip()) < 32:
        raise ValueError("give 32 or more random characters (e.g. `openssl rand -base64 32`)")
    return value


USER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$"


class ConsoleUser(Strict):
    role: Role = "viewer"
    password_hash: Secret = Field(description="an argon2 hash (`connector console add-user`), by reference")


class SsoConfig(Strict):
    """A reverse proxy that has authenticated the user and names them in a header."""

    user_header: str = Field("X-Remote-User", pattern=r"^[A-Za-z0-9-]{1,64}$")
    operators: list[Annotated[str, Field(pattern=USER_PATTERN)]] = Field(
        default_factory=list, description="user names given the operator role; everyone else is a viewer"
    )


class ConsoleConfig(Strict):
    path: str = Field("/console", pattern=r"^/[a-z0-9-]{1,32}$", description="the console's path prefix")
    session_secret: Annotated[Secret, AfterValidator(_long_enough)] = Field(
        description="signs session cookies (32+ random characters), by reference"
    )
    session_lifetime: Duration = Field(timedelta(hours=8), description="a session ends this long after sign-in")
    secure_cookie: bool = Field(True, description="send the console's cookies over HTTPS only (keep on behind TLS)")
    users: dict[Annotated[str, Field(pattern=USER_PATTERN)], ConsoleUser] = Field(default_factory=dict)
    sso: SsoConfig | None = None
    login_attempts: int = Field(5, ge=1, le=100, description="failed sign-ins allowed per user and address ...")
    login_window: Duration = Field(timedelta(minutes=15), description="... within this window")
    page_size: int = Field(50, ge=10, le=500)

    @field_validator("session_lifetime")
    @classmethod
    def _lifetime(cls, value: timedelta) -> timedelta:
        if not timedelta(minutes=5) <= value <= timedelta(days=7):
            raise ValueError("give a session lifetime between 5m and 7d")
        return value

    @model_validator(mode="after")
    def _a_way_in(self) -> ConsoleConfig:
        if not self.users and self.sso is None:
            raise ValueError("the console needs `users:` (local sign-in) or `sso:` (a trusted proxy header)")
        return self
