"""The config's delivery: the Paubox account (REST or SMTP relay), how the dispatcher sends and retries,
opt-out keys and quiet hours."""

from __future__ import annotations

from datetime import time, timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, IPvAnyNetwork, field_validator, model_validator

from connector.config.base import EnvStr, Key32, Secret, Strict
from connector.references import Unresolved
from connector.units import NAME_PATTERN, Duration
from connector.urls import check_url


class PauboxConfig(Strict):
    username: EnvStr | None = None
    base_url: EnvStr | None = None
    api_key: Secret
    auth_scheme: Literal["token", "bearer"] = "token"
    connect_timeout: Duration = timedelta(seconds=5)
    read_timeout: Duration = timedelta(seconds=30)
    server_errors: Literal["in_doubt", "retry"] = "in_doubt"
    webhook_token: Secret | None = None
    webhook_allow_ips: list[IPvAnyNetwork] = Field(default_factory=list)
    optout_on_hard_bounce: bool = False

    @field_validator("base_url")
    @classmethod
    def _base_url_safe(cls, value: str | None) -> str | None:
        if value is None or isinstance(value, Unresolved):  # checked once its variable is set
            return value
        return check_url(value, credentials=True)  # the API key goes with every request

    @property
    def endpoint(self) -> str:
        return (self.base_url or f"https://api.paubox.net/v1/{self.username}").rstrip("/")


class SmtpConfig(Strict):
    """Paubox's SMTP relay (transport: paubox-smtp). The password is delivery.paubox.api_key."""

    host: str = "smtp.paubox.com"
    port: int = 587
    security: Literal["starttls", "tls"] = "starttls"  # 587 STARTTLS; 465 implicit TLS
    username: str = "apikey"
    timeout: Duration = timedelta(seconds=30)
    ca_file: Path | None = None  # trust this CA (a private relay); default: the system's CAs
    max_connections: int = Field(2, ge=1, le=16)


class DeliveryConfig(Strict):
    transport: Literal["paubox-rest", "paubox-smtp"] = "paubox-rest"
    paubox: PauboxConfig
    smtp: SmtpConfig = SmtpConfig()
    from_address: EnvStr = Field(alias="from")
    reply_to: EnvStr | None = None

    @model_validator(mode="after")
    def _rest_needs_an_endpoint(self) -> DeliveryConfig:
        if self.transport == "paubox-rest" and not self.paubox.base_url and not self.paubox.username:
            raise ValueError(
                "give delivery.paubox.username (for https://api.paubox.net/v1/<username>) or delivery.paubox.base_url"
            )
        return self


class InDoubtConfig(Strict):
    """What happens to a notification nobody could confirm (no webhook) after `wait`."""

    policy: Literal["hold", "resend"] = "hold"
    wait: Duration = timedelta(minutes=30)


class DispatchConfig(Strict):
    interval: Duration = timedelta(seconds=10)
    # Defaults: why these, in README "Fast by default". A lost answer puts one request's notifications in
    # doubt (`bulk`); a crash, at most concurrency × bulk.
    concurrency: int = Field(16, ge=1, le=64)
    batch_size: int = Field(100, ge=1, le=1000)
    bulk: int = Field(5, ge=0, le=50, description="send up to this many per bulk_messages request; 0 or 1: one by one")
    max_attempts: int = Field(5, ge=1, le=100)
    max_age: Duration = timedelta(hours=24)
    retry_backoff: Duration = timedelta(seconds=30)
    retry_backoff_max: Duration = timedelta(hours=1)
    circuit_failures: int = Field(5, ge=1)
    circuit_cooldown: Duration = timedelta(seconds=30)
    rate_limit_pause: Duration = timedelta(seconds=30)
    in_doubt: InDoubtConfig = InDoubtConfig()
    receipts_after: Duration = timedelta(hours=1)
    lease: Duration = Field(
        timedelta(minutes=5),
        description="how long a claim stays with a daemon that may have died (several daemons on PostgreSQL)",
    )
    affinity: Duration = Field(
        timedelta(seconds=10),
        description="several daemons on PostgreSQL: what a daemon planned is its own to send for this long "
        "(its poll cache holds the resources), then any daemon's; 0s: any daemon's at once",
    )


class OptOutConfig(Strict):
    """Opt-outs are stored as HMAC-SHA256 digests under these keys: without the key, a stolen ledger does not
    tell whether an address is on the list. `current` keys new entries; every listed key still matches."""

    keys: dict[Annotated[str, Field(pattern=NAME_PATTERN)], Key32] = Field(
        min_length=1, description="key id: base64 of 32 bytes"
    )
    current: str

    @model_validator(mode="after")
    def _current_exists(self) -> OptOutConfig:
        if self.current not in self.keys:
            raise ValueError(f"optout.current names {self.current!r}, which is not in optout.keys")
        return self


class QuietHoursConfig(Strict):
    start: time
    end: time

    @field_validator("start", "end", mode="before")
    @classmethod
    def _clock_time(cls, value: object) -> object:
        if isinstance(value, int):  # YAML reads 21:00 as a sexagesimal integer (1260)
            return time(value // 60, value % 60)
        return value


class BouncesConfig(Strict):
    """What bounces do to a patient's address (connector.bounces): a hard bounce suppresses it for that
    patient, and `soft_limit` soft bounces within `soft_window` count as a hard one. A new address in the EHR
    is tried; the bounced one is not, until an operator clears it. Needs `optout.keys` (digests are keyed)."""

    suppress: bool = True
    soft_limit: int = Field(3, ge=1)
    soft_window: Duration = timedelta(days=7)


class LimitsConfig(Strict):
    """Safety limits on what one person receives (connector.cap)."""

    per_patient_per_day: int | None = Field(
        None, ge=1, description="emails per patient per local day (the source's zone); None: no cap"
    )
    over_cap: Literal["defer", "skip"] = Field(
        "defer", description="a notification over the cap: deferred to the next local day, or skipped"
    )
