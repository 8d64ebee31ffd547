"""The configuration file: pydantic models, secrets by reference, errors that name file, line and key.

A config file is YAML. Strings may use `${VAR}` to take a value from the environment. Secrets (API keys,
tokens, passwords) must be references, `${VAR}` or `{file: path}`, never inline values. Relative paths
(mappings folder, SQLite file, secret files) are resolved against the folder of the config file.
"""

from __future__ import annotations

import base64
import binascii
import re
import zoneinfo
from collections.abc import Sequence
from datetime import time, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from connector import references
from connector.errors import ConfigError, InfrastructureError, Problem
from connector.references import SecretRef, Unresolved, expand_env
from connector.urls import check_url
from connector.yamlfile import YamlDoc, load_yaml

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"


def parse_duration(value: Any) -> Any:
    """'90s', '5m', '48h', '2d', '250ms' or a number of seconds → timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    raise ValueError("expected a duration such as 250ms, 30s, 5m, 48h or 2d")


def _key_of_32_bytes(value: SecretRef) -> SecretRef:
    """A key given as base64 of exactly 32 bytes (AES-256, HMAC-SHA256), checked at load when it can be read
    then (else where it is used); the message never echoes it."""
    if value.problem() is not None:
        return value
    try:
        raw = base64.b64decode(value.get_secret_value(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError("must be base64 of exactly 32 random bytes (e.g. `openssl rand -base64 32`)")
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
EnvStr = Annotated[str, WrapValidator(expand_env)]  # ${VAR} expanded at load; unset: kept, refused where needed
Secret = SecretRef  # ${VAR} or {file: path}, read when first used
Key32 = Annotated[SecretRef, AfterValidator(_key_of_32_bytes)]


def _human(value: timedelta) -> str:
    """A duration as a config would write it: 250ms, 30s, 5m, 2h."""
    seconds = value.total_seconds()
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds * 1000:g}ms"


human_duration = _human  # messages elsewhere write durations the same way


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class NoAuth(Strict):
    type: Literal["none"] = "none"


class BearerAuth(Strict):
    type: Literal["bearer"]
    token: Secret


class BasicAuth(Strict):
    type: Literal["basic"]
    username: EnvStr
    password: Secret


class SmartAuth(Strict):
    """SMART Backend Services: client_credentials with a private_key_jwt assertion (RS384 or ES384)."""

    type: Literal["smart"]
    client_id: EnvStr
    private_key: Secret = Field(description="PEM private key (RSA or EC P-384), by reference")
    key_id: EnvStr
    algorithm: Literal["RS384", "ES384"] | None = None
    scope: str = "system/Appointment.rs system/Patient.rs"
    token_endpoint: EnvStr | None = None  # None: discovered from {base_url}/.well-known/smart-configuration

    @field_validator("token_endpoint")
    @classmethod
    def _token_endpoint_safe(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value, credentials=True)


Auth = Annotated[NoAuth | BearerAuth | BasicAuth | SmartAuth, Field(discriminator="type")]


def _zone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown IANA time zone {value!r}") from None
    return value


Zone = Annotated[str, AfterValidator(_zone)]


class ConsentCheck(Strict):
    """Before sending, read the patient's active Consents; a `deny` provision for `purpose` suppresses."""

    enabled: bool = False
    purpose: str | None = Field(None, description="a provision.purpose code; None: any deny provision counts")


class QuietHoursConfig(Strict):
    start: time
    end: time

    @field_validator("start", "end", mode="before")
    @classmethod
    def _clock_time(cls, value: object) -> object:
        if isinstance(value, int):  # YAML reads 21:00 as a sexagesimal integer (1260)
            return time(value // 60, value % 60)
        return value


class WindowScope(Strict):
    """Whose appointments a date-window search covers (servers that require one of these, like Oracle
    Health). Empty: one search for everything in the window."""

    patients: list[str] = Field(default_factory=list)
    practitioners: list[str] = Field(default_factory=list)
    locations: list[str] = Field(default_factory=list)


class WindowConfig(Strict):
    past: Duration = timedelta(days=1)
    future: Duration = timedelta(days=14)
    chunk: int = Field(10, ge=1, le=100, description="ids per request (comma list)")
    scope: WindowScope = WindowScope()


class ReadRetries(Strict):
    attempts: int = Field(4, ge=1, le=10)
    backoff: Duration = timedelta(seconds=1)
    backoff_max: Duration = timedelta(seconds=30)


class SubscriptionConfig(Strict):
    """FHIR Subscriptions pointing at `connector run` (`/fhir/<source>/notify`)."""

    enabled: bool = False
    kind: Literal["rest-hook", "backport"] = "backport"
    secret: Secret | None = None  # before `endpoint`, whose check depends on it
    endpoint: EnvStr | None = None  # the public URL the EHR calls; used by `connector subscribe`
    header: str = "Authorization"  # the caller sends `<header>: <secret>` (channel.header)
    topic: str | None = None  # backport: the SubscriptionTopic canonical URL
    criteria: str = "Appointment"  # classic criteria, or the backport filter (Appointment?location=...)
    payload: Literal["empty", "id-only", "full-resource"] = "id-only"
    heartbeat: Duration = timedelta(minutes=5)

    @field_validator("endpoint")
    @classmethod
    def _endpoint_safe(cls, value: str | None, info: ValidationInfo) -> str | None:
        # The EHR sends `secret` to this URL with every notification.
        return None if value is None else check_url(value, credentials=info.data.get("secret") is not None)


class SourceLimits(Strict):
    """What one poll of a source may read. A server that goes past a limit (a loop, invented pages, a
    huge or endless body) fails that poll with a SourceError naming the limit; its cursor stays where the
    last completed page left it and other sources carry on. The defaults are far above what EHRs send."""

    max_pages: int = Field(10_000, ge=1, description="pages per poll (500,000 appointments at page_size 50)")
    max_search_pages: int = Field(20, ge=1, description="pages per small search (a patient's Consents)")
    max_response_size: ByteSize = Field(
        ByteSize(32 * 1024 * 1024), ge=1024, description="bytes of one response body, after decompression"
    )


class FhirPollSourceConfig(Strict):
    """A FHIR R4 server: polled (strategy below) and, optionally, pushing Subscription notifications."""

    kind: Literal["fhir-poll"] = "fhir-poll"
    auth: Auth = NoAuth()  # before `base_url`, whose check depends on it
    base_url: EnvStr
    strategy: Literal["last-updated", "history", "date-window"] = "last-updated"
    on_ignored_filter: Literal["fail", "scan"] = "fail"
    window: WindowConfig = WindowConfig()
    max_connections: int = Field(4, ge=1, le=32)
    retries: ReadRetries = ReadRetries()
    subscription: SubscriptionConfig = SubscriptionConfig()
    interval: Duration = timedelta(seconds=60)
    page_size: int = Field(50, ge=1, le=1000)
    overlap: Duration = Field(
        timedelta(minutes=5),
        description="how far back a sweep reads again: changes "
        "committed late, with an older lastUpdated, are found by the next sweep",
    )
    sweep: Duration = Field(
        timedelta(minutes=1),
        description="how often a poll is a sweep; the polls in "
        "between start where the last one ended (0s: every poll is a sweep)",
    )
    start_from: Literal["now"] | AwareDatetime = "now"
    timeout: Duration = Field(
        timedelta(seconds=30),
        description="the whole of one request: connection, headers "
        "and body (a wall-clock deadline, not a time between reads)",
    )
    limits: SourceLimits = SourceLimits()
    timezone: Zone = "UTC"
    location_timezones: dict[Annotated[str, Field(pattern=r"^Location/[^/\s]+$")], Zone] = Field(default_factory=dict)
    consent: ConsentCheck = ConsentCheck()

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str, info: ValidationInfo) -> str:
        if isinstance(value, Unresolved):  # checked when its variable is set
            return value
        auth = info.data.get("auth")
        return check_url(value, credentials=auth is not None and not isinstance(auth, NoAuth)).rstrip("/")

    @model_validator(mode="after")
    def _sweeps_cover_the_overlap(self) -> FhirPollSourceConfig:
        # Between sweeps a late commit waits up to `sweep` + `interval`; by then it must still lie within
        # `overlap` of the cursor, or no poll would read it again.
        if self.sweep > self.interval and self.sweep + self.interval > self.overlap:
            raise ValueError(
                f"sweep ({_human(self.sweep)}) plus interval ({_human(self.interval)}) is longer than "
                f"overlap ({_human(self.overlap)}): a change committed late could fall behind the "
                "cursor before a sweep reads it; lengthen overlap, or shorten sweep (0s: every poll "
                "reads the overlap)"
            )
        return self


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
    concurrency: int = Field(4, ge=1, le=64)
    batch_size: int = Field(50, ge=1, le=1000)
    bulk: int = Field(0, ge=0, le=50, description="send up to this many per bulk_messages request; 0: one by one")
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

    @field_validator("header_timeout", "body_timeout")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if not timedelta(0) < value <= timedelta(hours=1):
            raise ValueError("must be more than 0s and at most 1h")
        return value


class CrmSourceConfig(Strict):
    """A CRM sending webhooks to `connector run` at /webhooks/crm/<name> (salesforce: /<name>/<path_token>)."""

    kind: Literal["standard-webhooks", "hubspot", "salesforce-outbound", "hmac-json"]
    secret: Secret | None = None  # the signing secret (not used by salesforce-outbound, which is unsigned)
    path_token: Secret | None = None  # salesforce-outbound: the secret last segment of the URL
    organization_id: str | None = None  # salesforce-outbound: refuse other orgs
    public_url: str | None = None  # hubspot: the URL HubSpot calls, as it signs it (behind a proxy)
    tolerance: Duration = timedelta(minutes=5)
    hmac_header: str = "X-Signature"
    hmac_prefix: str = "sha256="
    hmac_encoding: Literal["hex", "base64"] = "hex"
    id_path: str = "id"
    type_path: str = "type"
    rate_limit: float = Field(20.0, gt=0, description="requests per second, per source")
    burst: int = Field(40, ge=1)
    timezone: Zone = "UTC"
    # hubspot: read the changed object through the CRM API for mappings with `fetch_object: true`
    api_token: Secret | None = None  # a private app token with crm.objects.*.read scopes
    api_base: EnvStr = "https://api.hubapi.com"
    properties: list[str] = Field(default_factory=lambda: ["email", "firstname", "lastname"])

    @field_validator("api_base")
    @classmethod
    def _api_base_safe(cls, value: str, info: ValidationInfo) -> str:
        return check_url(value, credentials=info.data.get("api_token") is not None)

    @model_validator(mode="after")
    def _credentials(self) -> CrmSourceConfig:
        if self.kind == "salesforce-outbound" and self.path_token is None:
            raise ValueError("salesforce-outbound messages are not signed: give path_token (a secret URL segment)")
        if self.kind != "salesforce-outbound" and self.secret is None:
            raise ValueError(f"{self.kind} needs `secret` to verify signatures")
        return self


class InboxConfig(Strict):
    """Received CRM events are stored encrypted (AES-256-GCM) until processed and for `retention`."""

    keys: dict[Annotated[str, Field(pattern=NAME_PATTERN)], Key32] = Field(
        min_length=1, description="key id: base64 of 32 bytes"
    )
    current: str
    retention: Duration = timedelta(days=30)

    @model_validator(mode="after")
    def _current_exists(self) -> InboxConfig:
        if self.current not in self.keys:
            raise ValueError(f"inbox.current names {self.current!r}, which is not in inbox.keys")
        return self


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


class LedgerConfig(Strict):
    url: EnvStr = "sqlite:///connector.db"

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


class Config(Strict):
    sources: dict[Annotated[str, Field(pattern=NAME_PATTERN)], FhirPollSourceConfig] = Field(min_length=1)
    mappings: Path = Path("mappings")
    ledger: LedgerConfig = LedgerConfig()
    delivery: DeliveryConfig
    dispatch: DispatchConfig = DispatchConfig()
    server: ServerConfig | None = None
    crm: dict[Annotated[str, Field(pattern=NAME_PATTERN)], CrmSourceConfig] = Field(default_factory=dict)
    inbox: InboxConfig | None = None
    optout: OptOutConfig | None = None
    health: HealthConfig = HealthConfig()

    @model_validator(mode="after")
    def _bounces_need_an_optout_key(self) -> Config:
        if self.delivery.paubox.optout_on_hard_bounce and self.optout is None:
            raise ValueError("delivery.paubox.optout_on_hard_bounce needs `optout:` (keys for the opt-out digests)")
        return self

    @model_validator(mode="after")
    def _lease_outlasts_a_send(self) -> Config:
        paubox = self.delivery.paubox
        longest = (
            self.delivery.smtp.timeout
            if self.delivery.transport == "paubox-smtp"
            else paubox.connect_timeout + paubox.read_timeout
        )
        if self.dispatch.lease < longest + timedelta(seconds=10):
            raise ValueError(
                f"dispatch.lease must outlast a send: at least {longest + timedelta(seconds=10)} "
                "(the timeouts plus 10 s)"
            )
        return self

    @model_validator(mode="after")
    def _crm_needs_inbox(self) -> Config:
        if self.crm and self.inbox is None:
            raise ValueError("CRM sources need `inbox:` (an encryption key for the stored events)")
        clash = set(self.crm) & set(self.sources)
        if clash:
            raise ValueError(f"a CRM source and a FHIR source share the name {sorted(clash)[0]!r}")
        return self

    locale: str = "en_US"
    quiet_hours: QuietHoursConfig | None = None
    path: Path | None = Field(None, exclude=True, description="the file this config was read from")

    @field_validator("locale")
    @classmethod
    def _known_locale(cls, value: str) -> str:
        from babel import Locale, UnknownLocaleError

        try:
            Locale.parse(value)
        except (UnknownLocaleError, ValueError):
            raise ValueError(f"unknown locale {value!r}; use a code such as en_US or nl_NL") from None
        return value

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    @property
    def mappings_dir(self) -> Path:
        return self.mappings if self.mappings.is_absolute() else self.base_dir / self.mappings

    @property
    def ledger_url(self) -> str:
        """The ledger URL with a relative SQLite path resolved against the config folder."""
        url = self.ledger.url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and url != "sqlite://":
            return prefix + str(self.base_dir / url[len(prefix) :])
        return url


class Environment(BaseSettings):
    """Process settings from the environment (CONNECTOR_*), used as defaults for CLI options."""

    model_config = SettingsConfigDict(env_prefix="CONNECTOR_", extra="ignore")

    config: Path = Path("config.yaml")
    log_level: str = "info"  # checked by the CLI, which says what to do with a wrong value
    log_format: str = "console"


LEDGER: tuple[references.Loc, ...] = (("ledger",),)  # what the ledger commands touch


def load_config(path: Path, needs: Sequence[references.Loc] | None = None) -> Config:
    """Read and validate a config file. Raises ConfigError listing every problem with its line.

    Plain `${VAR}` strings must be set within `needs` (key paths such as ("ledger",); None: every part
    `connector run` reads). Secrets are not read here but on first use (`references`)."""
    if not path.exists():
        raise InfrastructureError(
            f"the config file {path} does not exist: give --config PATH or set "
            f"CONNECTOR_CONFIG (config.example.yaml shows every key)"
        )
    doc = load_yaml(path)
    if not isinstance(doc.data, dict):
        raise ConfigError([doc.problem((), "the config file must be a mapping of keys to values")])
    try:
        config = Config.model_validate(doc.data, context={"base_dir": path.parent})
    except ValidationError as exc:
        raise ConfigError(problems_from(exc, doc)) from None
    config = config.model_copy(update={"path": path})
    references.locate(config, doc)
    references.require(config, needs, secrets=False)
    return config


def problems_from(exc: ValidationError, doc: YamlDoc) -> list[Problem]:
    """Turn pydantic errors into problems with file, line and a readable key path (never the input)."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        loc = _readable_loc(error["loc"], doc)
        message = _message(error)
        if loc and loc[-1] == "[key]":
            loc, message = loc[:-1], "names may only use lowercase letters, digits, '-' and '_'"
        problems.append(doc.problem(loc, message))
    return problems


def _readable_loc(loc: tuple[Any, ...], doc: YamlDoc) -> tuple[str | int, ...]:
    """Drop the union-tag entries pydantic inserts, keeping keys the person actually wrote."""
    kept: list[str | int] = []
    for index, part in enumerate(loc):
        if (*kept, part) in doc.lines or index == len(loc) - 1 or isinstance(part, int):
            kept.append(part)
    return tuple(kept)


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key (check the spelling against config.example.yaml)"
    if kind == "missing":
        return "required key is missing"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")
