"""The config's service parts: the HTTP server of `connector run`, the ledger database, and when health
checks call a part failing."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from pydantic import Field, IPvAnyNetwork, field_validator, model_validator

from connector.config.base import EnvStr, Key32, Strict
from connector.references import Unresolved
from connector.units import NAME_PATTERN, Duration
from connector.urls import is_loopback, parse_http_url


class ServerConfig(Strict):
    """The HTTP endpoint `connector run` serves for webhooks (Paubox, FHIR subscriptions, CRMs)."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    max_body: int = Field(1_000_000, ge=1024)
    trusted_proxies: list[IPvAnyNetwork] = Field(
        default_factory=list, description="whose X-Forwarded-For and X-Forwarded-Proto are believed; empty: nobody's"
    )
    header_timeout: Duration = Field(
        timedelta(seconds=10), description="a request's headers must arrive within this, or the connection is closed"
    )
    body_timeout: Duration = Field(
        timedelta(seconds=30),
        description="its body within this after the headers, or the answer is 408 and the connection is closed",
    )
    public_url: EnvStr | None = Field(
        None, description="where patients reach this server (https://…), the base of the links in emails"
    )

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # https, or http to this machine only (a laptop's trial): the same rule as for credentials
        if isinstance(value, Unresolved):
            return value
        url = parse_http_url(value)
        if url.scheme != "https" and not is_loopback(url.host):
            raise ValueError("patients' links need https:// (http:// only to 127.0.0.1 or localhost, for a trial)")
        return value.rstrip("/")

    @field_validator("header_timeout", "body_timeout")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if not timedelta(0) < value <= timedelta(hours=1):
            raise ValueError("must be more than 0s and at most 1h")
        return value


class LedgerConfig(Strict):
    url: EnvStr = "sqlite:///connector.db"
    journal_retention: Duration = Field(
        timedelta(days=90), description="the journal (what happened to each notification) is kept this long"
    )

    @field_validator("url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(value)
        except (ArgumentError, ValueError):  # their messages may quote the URL, and with it a password
            raise ValueError(
                "not a database URL: use sqlite:///connector.db or postgresql+psycopg://user@host/db"
            ) from None
        return value


class HealthConfig(Strict):
    """When `/healthz` (and `connector status`) call a part failing (connector.health)."""

    stale_after: float = Field(3, ge=1, description="a source fails after this many intervals without a completed poll")
    stale_floor: Duration = Field(timedelta(minutes=1), description="... and never sooner than this")
    ledger_timeout: Duration = Field(timedelta(seconds=2), description="the ledger fails when a read takes longer")

    @field_validator("ledger_timeout")
    @classmethod
    def _timeout_range(cls, value: timedelta) -> timedelta:
        if not timedelta(milliseconds=100) <= value <= timedelta(minutes=1):
            raise ValueError("give a timeout between 100ms and 1m")
        return value


class LinksConfig(Strict):
    """Links patients click in their email (connector.links): signed with `current`, accepted under every
    key listed (rotation: add a key, make it current, remove the old one once its links have expired)."""

    keys: dict[Annotated[str, Field(pattern=NAME_PATTERN)], Key32] = Field(
        min_length=1, description="key id: base64 of 32 bytes, by reference"
    )
    current: str
    ttl: Duration = Field(
        timedelta(days=60), description="how long an unsubscribe link works; confirm and cancel end at the start"
    )
    mailto: str | None = Field(None, description="an address for `List-Unsubscribe: <mailto:…>` as well")
    clinic_name: str = Field("", description="the name the link pages show (a mapping's vars.clinic_name wins)")
    rate_limit: float = Field(5.0, gt=0, description="requests per second to the link pages, per client address")
    burst: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _current_exists(self) -> LinksConfig:
        if self.current not in self.keys:
            raise ValueError(f"links.current names {self.current!r}, which is not in links.keys")
        return self
