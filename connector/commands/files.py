"""Commands over files: `connector validate` (config, mappings, templates, references) and `connector
render` (one mapping over resource files); and the reading of Bundle / NDJSON files that `render` and
`replay --file` share."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from connector import config as configuration
from connector import fhir
from connector.config import Config, load_config
from connector.config.handoff import handoff_to
from connector.errors import ConfigError, Problem
from connector.handoff import to_tasks
from connector.intake.checks import examine
from connector.lifecycle import appointment_zone
from connector.mapping.engine import RenderRequest, render
from connector.mapping.loader import load_mappings

if TYPE_CHECKING:
    from connector.models import Email


@dataclass(frozen=True)
class Validation:
    config: Config
    mappings: list[str]
    errors: list[Problem]  # mappings, templates, and the references `run` needs but cannot read
    warnings: list[Problem]  # missing references of features that are off
    tasks: bool = False  # hand-offs are FHIR Tasks on the sources (their SMART scopes are asked for)


def validate(config_path: Path) -> Validation:
    """Check config, mappings and templates, and every environment variable and secret file the config
    refers to. A config file that does not parse raises ConfigError."""
    config = load_config(config_path, needs=())
    errors, warnings = configuration.report(config)
    try:
        mappings = load_mappings(
            config.mappings_dir, [*config.sources, *config.crm], config.appointment_sources, handoff_to(config.handoff)
        )
    except ConfigError as exc:
        return Validation(config, [], [*exc.problems, *errors], warnings, to_tasks(config.handoff, []))
    return Validation(config, mappings.names(), errors, warnings, to_tasks(config.handoff, mappings))


def read_resource_file(path: Path) -> fhir.SearchPage:
    """A Bundle, a single resource, or NDJSON (one resource per line) → one page of resources."""
    text = _read(path)
    try:
        documents = [json.loads(text)]
    except ValueError:
        documents = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                documents.append(json.loads(line))
            except ValueError:
                raise ConfigError([Problem(path, number, "", "line is not valid JSON")]) from None
    page = fhir.SearchPage()
    for resource in _flatten(documents):
        if resource.get("resourceType") == "Appointment":
            page.matches.append(resource)
        elif resource.get("id"):
            page.included[f"{resource.get('resourceType')}/{resource['id']}"] = resource
    if not page.matches:
        raise ConfigError([Problem(path, None, "", "no Appointment resources in the file")])
    return page


def _read(path: Path) -> str:
    """A file's text; one that cannot be read is a ConfigError naming it (not a traceback)."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError([Problem(path, None, "", f"cannot read the file ({why})")]) from None


def _flatten(documents: list[Any]) -> Iterator[dict[str, Any]]:
    for document in documents:
        if isinstance(document, dict) and document.get("resourceType") == "Bundle":
            yield from _flatten([e.get("resource") for e in document.get("entry") or [] if isinstance(e, dict)])
        elif isinstance(document, dict):
            yield document


@dataclass(frozen=True)
class RenderSettings:
    """What `connector render` renders with: from the config when there is one (as the daemon would send),
    each overridable on the command line."""

    mappings_dir: Path
    timezone: str = "UTC"
    location_timezones: dict[str, str] = field(default_factory=dict)
    locale: str = "en_US"
    default_from: str = "sender@example.org"
    default_reply_to: str | None = None
    language: str | None = None  # a language variant to render, instead of the patient's languages


def render_settings(
    config: Config | None,
    source: str | None,
    mappings_dir: Path | None,
    timezone: str | None,
    locale: str | None,
    language: str | None,
) -> RenderSettings:
    """The settings for `render`: the config's (the named source's zones, else the only or first source's),
    then the options given."""
    found = RenderSettings(mappings_dir or Path("mappings"), language=language)
    if config is not None:
        if source is not None and source not in config.sources:
            where = config.path or Path("config.yaml")
            known = ", ".join(config.sources)
            raise ConfigError([Problem(where, None, "sources", f"no FHIR source {source!r}; there are: {known}")])
        settings = config.sources[source or next(iter(config.sources))]
        found = replace(
            found,
            mappings_dir=mappings_dir or config.mappings_dir,
            timezone=settings.timezone,
            location_timezones=dict(settings.location_timezones),
            locale=config.locale,
            default_from=config.delivery.from_address,
            default_reply_to=config.delivery.reply_to,
        )
    return replace(found, timezone=timezone or found.timezone, locale=locale or found.locale)


def render_file(
    settings: RenderSettings,
    mapping_name: str,
    resource_file: Path,
    patient_file: Path | None,
    now: datetime,
) -> Email:
    """Render one mapping for an Appointment (and its Patient) read from files, as the daemon would."""
    mappings_dir = settings.mappings_dir
    mappings = load_mappings(mappings_dir)
    mapping = mappings.get(mapping_name)
    if mapping is None:
        raise ConfigError(
            [
                Problem(
                    mappings_dir,
                    None,
                    "",
                    f"no mapping named {mapping_name!r}; there are: {', '.join(mappings.names())}",
                )
            ]
        )
    if settings.language is not None and settings.language.lower() not in {v.lower() for v in mapping.variants}:
        have = ", ".join(sorted(mapping.variants))
        raise ConfigError(
            [Problem(mapping.path, None, "", f"no {settings.language!r} variant of {mapping_name}; there are: {have}")]
        )
    page = read_resource_file(resource_file)
    examined = examine(page, None)
    if any(s.problem for s in examined.seen):
        raise ConfigError([Problem(resource_file, None, "", s.problem or "") for s in examined.seen if s.problem])
    appointment = page.matches[0]
    patient_ids = fhir.patient_participants(appointment)
    if patient_file:
        try:
            patient = json.loads(_read(patient_file))
        except ValueError:
            raise ConfigError([Problem(patient_file, None, "", "not valid JSON")]) from None
    else:
        patient = next(
            (page.included.get(f"Patient/{p}") for p in patient_ids if f"Patient/{p}" in page.included), None
        )
    if patient is None:
        raise ConfigError(
            [
                Problem(
                    resource_file,
                    None,
                    "",
                    "no Patient for the appointment: put it in the Bundle or give --patient FILE",
                )
            ]
        )
    address = fhir.choose_email(patient, now) or "patient@example.org"
    languages = (settings.language,) if settings.language else tuple(fhir.preferred_languages(patient))
    request = RenderRequest(
        key=f"render:{mapping_name}:{appointment.get('id')}",
        to=address,
        appointment=appointment,
        patient=patient,
        event=mapping.spec.trigger.event[0],
        source="file",
        timezone=appointment_zone(appointment, settings.location_timezones, settings.timezone),
        locale=settings.locale,
        now=now,
        default_from=settings.default_from,
        default_reply_to=settings.default_reply_to,
        languages=languages,
    )
    return render(mapping, request)
