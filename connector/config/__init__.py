"""The configuration file: the sections (connector.config.sources, .delivery, .server) assembled into one
`Config`, read from YAML with secrets by reference, and errors that name file, line and key.

A config file is YAML. Strings may use `${VAR}` to take a value from the environment. Secrets (API keys,
tokens, passwords) must be references, `${VAR}` or `{file: path}`, never inline values. Relative paths
(mappings folder, SQLite file, secret files) are resolved against the folder of the config file.

Which references a command needs, and whether they can be read, is decided here too (`missing`,
`require`, `report`): a command reads only the parts it uses (see connector.references).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from connector.config.base import Strict
from connector.config.console import ConsoleConfig
from connector.config.delivery import (
    BouncesConfig,
    DeliveryConfig,
    DispatchConfig,
    LimitsConfig,
    OptOutConfig,
    QuietHoursConfig,
)
from connector.config.handoff import HandoffConfig
from connector.config.server import HealthConfig, LedgerConfig, LinksConfig, ServerConfig
from connector.config.sources import CrmSourceConfig, FhirPollSourceConfig, InboxConfig
from connector.errors import ConfigError, InfrastructureError, Problem
from connector.references import Loc, Unresolved, located, walk, with_next_step
from connector.units import NAME_PATTERN
from connector.yamlfile import YamlDoc, load_yaml, problems_from


def _start_only() -> list[Literal["start", "end"]]:
    return ["start"]


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
    links: LinksConfig | None = None
    health: HealthConfig = HealthConfig()
    console: ConsoleConfig | None = None
    limits: LimitsConfig = LimitsConfig()
    handoff: HandoffConfig | None = None
    bounces: BouncesConfig = BouncesConfig()

    @model_validator(mode="after")
    def _links_need_a_public_url(self) -> Config:
        if self.links is not None and (self.server is None or self.server.public_url is None):
            raise ValueError("`links:` needs `server.public_url` (where patients reach `connector run`)")
        if self.links is not None and self.optout is None:
            raise ValueError("`links:` needs `optout:` (keys for the opt-out digests its unsubscribe link adds)")
        return self

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

    @model_validator(mode="after")
    def _console_needs_a_server(self) -> Config:
        if self.console is not None and self.server is None:
            raise ValueError("`console:` needs `server:` (the address and port it is served on)")
        return self

    @property
    def appointment_sources(self) -> list[str]:
        """The CRM sources whose events describe appointments (`crm.<name>.appointment`): the only ones a
        CrmAppointment mapping hears from."""
        return [name for name, crm in self.crm.items() if crm.appointment is not None]

    locale: str = "en_US"
    quiet_hours: QuietHoursConfig | None = None
    # Which changes of a booked appointment's time are a reschedule (a mapping may say otherwise): the start
    # by default; an end-only change is remembered and sends nothing. [start, end]: the end counts too.
    reschedule_on: list[Literal["start", "end"]] = Field(default_factory=_start_only, min_length=1)
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


LEDGER: tuple[Loc, ...] = (("ledger",),)  # what the ledger commands touch


def load_config(path: Path, needs: Sequence[Loc] | None = None) -> Config:
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
    locate(config, doc)
    require(config, needs, secrets=False)
    return config


def locate(config: Config, doc: YamlDoc) -> None:
    """Tell each reference where it was written."""
    for loc, ref in walk(config):
        ref.origin = doc.problem(loc, "")


def features_off(config: Config) -> list[tuple[Loc, str]]:
    """Parts of the config that `connector run` does not read, and why: their references may be missing."""
    off: list[tuple[Loc, str]] = [
        (("sources", name, "subscription"), f"sources.{name}.subscription.enabled is false")
        for name, source in config.sources.items()
        if not source.subscription.enabled
    ]
    if config.server is None:
        off.append((("delivery", "paubox", "webhook_token"), "no `server:` is configured (no webhook endpoint)"))
    if not config.crm:
        off.append((("inbox",), "no `crm:` source is configured"))
    return off


def _within(loc: Loc, parts: Sequence[Loc]) -> bool:
    return any(loc[: len(part)] == part for part in parts)


def missing(
    config: Config, parts: Sequence[Loc] | None = None, *, secrets: bool = True, next_step: bool = True
) -> list[Problem]:
    """References that cannot be read, within `parts` (None: every part `connector run` reads).
    `secrets=False` checks only plain strings (secrets are read later, when used)."""
    off = [loc for loc, _ in features_off(config)]
    problems = []
    for loc, ref in walk(config):
        if (parts is None and _within(loc, off)) or (parts is not None and not _within(loc, parts)):
            continue
        problem = ref.problem if isinstance(ref, Unresolved) else ref.problem() if secrets else None
        if problem is not None:
            problems.append(located(ref.origin, with_next_step(problem) if next_step else problem))
    return problems


def report(config: Config) -> tuple[list[Problem], list[Problem]]:
    """(errors, warnings): missing references that `connector run` needs, and those of features that are off."""
    warnings = [
        Problem(p.file, p.line, p.where, f"{p.message}; not needed while {why}")
        for part, why in features_off(config)
        for p in missing(config, [part], next_step=False)
    ]
    return missing(config), warnings


def require(config: Config, parts: Sequence[Loc] | None = None, *, secrets: bool = True) -> None:
    """Raise ConfigError naming every missing reference within `parts` (None: what `run` reads)."""
    problems = missing(config, parts, secrets=secrets)
    if problems:
        raise ConfigError(problems)
