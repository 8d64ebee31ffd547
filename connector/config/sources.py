"""The config's sources: FHIR R4 servers (polled, optionally pushing Subscription notifications) and CRMs
sending webhooks, with the inbox their events wait in."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Literal

from pydantic import AwareDatetime, ByteSize, Field, ValidationInfo, field_validator, model_validator

from connector.config.base import EnvStr, Key32, Secret, Strict
from connector.config.crm_appointments import CrmAppointmentConfig
from connector.references import Unresolved
from connector.units import NAME_PATTERN, Duration, Zone, human_duration
from connector.urls import check_url


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


class ConsentCheck(Strict):
    """Before sending, read the patient's active Consents; a `deny` provision for `purpose` suppresses."""

    enabled: bool = False
    purpose: str | None = Field(None, description="a provision.purpose code; None: any deny provision counts")


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


class WriteBackConfig(Strict):
    """What the connector may write to this FHIR server (nothing unless a feature below is on). The SMART
    scopes the writes need are added to the source's token request."""

    scope: str = Field("", description="SMART scopes for writes, e.g. system/Communication.c system/Task.c")
    responses: bool = Field(
        False,
        description="patients' confirm and cancel links create AppointmentResponses (system/AppointmentResponse.c)",
    )
    cancel_appointment: bool = Field(
        False, description="a patient's cancel also sets the Appointment to cancelled (system/Appointment.u)"
    )

    # Communication write-back (connector.writeback builds it; connector.sending.writeback writes it).
    communication: bool = Field(False, description="a Communication in the chart for every email Paubox accepted")
    not_done: bool = Field(False, description="also a Communication (status not-done) for a skipped notification")
    content: Literal["none", "full"] = Field(
        "none", description="full: the email's text as the Communication's payload (kept in memory only until written)"
    )
    identifier_system: str = Field(
        "urn:connector:notification",
        min_length=1,
        pattern=r"^\S+$",
        description="the system of the identifiers the connector gives what it writes (one per notification)",
    )
    horizon: Duration = Field(
        timedelta(days=2),
        description="notifications settled longer ago than this are not written back (when write-back is "
        "first turned on, or after a long outage)",
    )
    retry_backoff: Duration = timedelta(seconds=30)
    retry_backoff_max: Duration = timedelta(hours=1)

    @model_validator(mode="after")
    def _cancel_needs_responses(self) -> WriteBackConfig:
        if self.cancel_appointment and not self.responses:
            raise ValueError("write_back.cancel_appointment needs write_back.responses: true")
        return self


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
    validation: Literal["lean", "full"] = Field(
        "lean",
        description="lean: check the elements the connector reads (their R4 types and codes); "
        "full: validate whole resources with the fhir.resources R4 models (about 0.3 ms more each)",
    )
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
    write_back: WriteBackConfig = WriteBackConfig()

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
                f"sweep ({human_duration(self.sweep)}) plus interval ({human_duration(self.interval)}) is longer than "
                f"overlap ({human_duration(self.overlap)}): a change committed late could fall behind the "
                "cursor before a sweep reads it; lengthen overlap, or shorten sweep (0s: every poll "
                "reads the overlap)"
            )
        return self

    def token_scope(self, tasks: bool = False) -> str:
        """The scopes of the SMART token request: `auth.scope` and what the writes turned on need —
        `write_back.scope` when it is set, otherwise derived from the features (`tasks`: hand-offs to
        staff are FHIR Tasks on this source) in the style of `auth.scope` (SMART v1 `.read`/`.write`
        when it uses those, v2 letters otherwise)."""
        read = self.auth.scope.split() if isinstance(self.auth, SmartAuth) else []
        writes = self.write_back.scope.split() or write_scopes(self.write_back, tasks, v1=_is_v1(read))
        return " ".join(dict.fromkeys([*read, *writes]))


_V2_WRITES = {
    "responses": ["AppointmentResponse.c"],
    "cancel_appointment": ["Appointment.u"],
    "communication": ["Communication.c", "Communication.rs"],
    "tasks": ["Task.c", "Task.rs", "Task.u"],
}
_V1_WRITES = {
    "responses": ["AppointmentResponse.write"],
    "cancel_appointment": ["Appointment.write"],
    "communication": ["Communication.write", "Communication.read"],
    "tasks": ["Task.write", "Task.read"],
}


def write_scopes(write_back: WriteBackConfig, tasks: bool, v1: bool = False) -> list[str]:
    """The SMART system scopes the writes of `write_back` (and Tasks for hand-offs) need: create for what
    is created (a conditional create searches first: read and search where the README says so), update
    for the cancelled Appointment and the Task a later reason is added to."""
    wanted = {
        "responses": write_back.responses,
        "cancel_appointment": write_back.cancel_appointment,
        "communication": write_back.communication or write_back.not_done,
        "tasks": tasks,
    }
    table = _V1_WRITES if v1 else _V2_WRITES
    return [f"system/{scope}" for feature, on in wanted.items() if on for scope in table[feature]]


def _is_v1(scopes: list[str]) -> bool:
    return any(scope.rsplit(".", 1)[-1] in ("read", "write", "*") for scope in scopes)


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
    # how this source's events describe an appointment (connector.config.crm_appointments); None: they don't
    appointment: CrmAppointmentConfig | None = None

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
        needs_api = self.appointment is not None and self.appointment.fetch_object
        if needs_api and (self.kind != "hubspot" or self.api_token is None):
            raise ValueError("appointment.fetch_object needs a hubspot source with api_token")
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
