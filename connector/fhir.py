"""Pure helpers over FHIR R4 JSON: validation, versions, search pages, participants, email choice.

Resources are validated with the fhir.resources R4B models (R4B reads R4 Appointment and Patient) and
then handled as plain JSON dicts, which is what FHIRPath and the templates see.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from connector import fhir_lean
from connector.addresses import usable
from connector.errors import ResourceError
from connector.logs import safe_text

Resource = dict[str, Any]

_MODELS: dict[str, Any] = {}
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # the FHIR `id` datatype
USE_ORDER = {"home": 0, "mobile": 1, "temp": 2, "work": 3}


def _model(resource_type: str) -> Any:
    if not _MODELS:
        from fhir.resources.R4B.appointment import Appointment
        from fhir.resources.R4B.patient import Patient

        _MODELS.update(Appointment=Appointment, Patient=Patient)
    return _MODELS.get(resource_type)


def _meta(resource: Any) -> dict[str, Any]:
    meta = resource.get("meta") if isinstance(resource, dict) else None
    return meta if isinstance(meta, dict) else {}


def describe(resource: Resource) -> str:
    """'Appointment/123 v4' — safe to log (type, id, version; no content; odd characters escaped)."""
    rtype = safe_text(resource.get("resourceType", "?"), 64) if isinstance(resource, dict) else "?"
    rid = safe_text(resource.get("id", "?"), 64) if isinstance(resource, dict) else "?"
    version = _meta(resource).get("versionId")
    return f"{rtype}/{rid}" + (f" v{safe_text(version, 32)}" if version else "")


def validate(resource: Any, lean: bool = False) -> Resource:
    """Check a resource against the R4 model for its type; raise ResourceError naming the bad elements.
    `lean`: check only the elements the connector reads (connector.fhir_lean), for Appointment and Patient."""
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise ResourceError("entry is not a FHIR resource (no resourceType)")
    if not isinstance(resource.get("id"), str) or not resource["id"]:
        raise ResourceError(f"{describe(resource)} has no id")
    if lean:
        where = fhir_lean.problems(resource)
        if where:
            shown = ", ".join(where[:5]) + (f" and {len(where) - 5} more" if len(where) > 5 else "")
            raise ResourceError(f"{describe(resource)} is not valid FHIR R4: check {shown}")
        if where is not None:
            return resource
    model = _model(resource["resourceType"])
    if model is None:
        return resource
    try:
        model.model_validate(resource)
    except ValidationError as exc:
        # Element paths and error kinds only: pydantic messages may quote the input, which is PHI.
        where = sorted({".".join(str(p) for p in e["loc"]) or "(resource)" for e in exc.errors()})
        shown = ", ".join(where[:5]) + (f" and {len(where) - 5} more" if len(where) > 5 else "")
        raise ResourceError(f"{describe(resource)} is not valid FHIR R4: check {shown}") from None
    return resource


def version_of(resource: Resource) -> str:
    """meta.versionId (odd characters escaped, see logs.safe_text), or a content hash for servers that do not
    version."""
    version = _meta(resource).get("versionId")
    if version:
        return safe_text(version, 128)
    canonical = json.dumps(resource, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(canonical).hexdigest()[:16]


def parse_instant(value: Any) -> datetime | None:
    """A FHIR instant/dateTime string → aware datetime (UTC when no zone is given); None when absent."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def in_utc(moment: datetime | None) -> datetime | None:
    """`moment` in UTC; None when it is None or its UTC time falls outside years 1-9999 (an offset at the
    edge of the calendar, such as 9999-12-31T20:00:00-14:00)."""
    if moment is None:
        return None
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        return None


def last_updated(resource: Resource) -> datetime | None:
    """meta.lastUpdated in UTC (None when absent, unreadable or beyond the calendar in UTC)."""
    return in_utc(parse_instant(_meta(resource).get("lastUpdated")))


@dataclass
class SearchPage:
    """One page of a search: matches, included resources by reference, and where to go next."""

    matches: list[Any] = field(default_factory=list)
    included: dict[str, Any] = field(default_factory=dict)  # "Patient/123" -> resource
    next_url: str | None = None
    self_url: str | None = None


def split_search_bundle(bundle: Any, match_type: str | None = None) -> SearchPage:
    """Split a searchset Bundle into matches and `_include`d resources. Entries without `search.mode`
    (it is optional) are matches when they are of `match_type`, included otherwise."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise ResourceError("the page is not a FHIR Bundle")
    page = SearchPage()
    links = bundle.get("link")
    for link in links if isinstance(links, list) else []:
        if isinstance(link, dict) and link.get("relation") == "next":
            page.next_url = link.get("url")
        if isinstance(link, dict) and link.get("relation") == "self":
            page.self_url = link.get("url")
    entries = bundle.get("entry")
    for entry in entries if isinstance(entries, list) else []:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        search = entry.get("search") if isinstance(entry, dict) else None
        mode = search.get("mode") if isinstance(search, dict) else None
        if mode is None:
            is_match = match_type is None or (isinstance(resource, dict) and resource.get("resourceType") == match_type)
            mode = "match" if is_match else "include"
        if mode == "include" and isinstance(resource, dict):
            page.included[f"{resource.get('resourceType')}/{resource.get('id')}"] = resource
        elif mode == "match":
            page.matches.append(resource)
    return page


def reference_parts(reference: Any, base: str | None = None) -> tuple[str, str] | None:
    """'Patient/123' (or '{base}/Patient/123/_history/2') → ('Patient', '123'), the id as written (check it
    with FHIR_ID). An absolute reference to another server is not ours to follow: None."""
    if not isinstance(reference, str):
        return None
    text: str = reference
    if "://" in text:
        if base is None or not text.startswith(base.rstrip("/") + "/"):
            return None
        text = text[len(base.rstrip("/")) + 1 :]
    parts = text.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-1]:
        return parts[-2], parts[-1]
    return None


def reference_id(reference: Any, resource_type: str, base: str | None = None) -> str | None:
    """'Patient/123' → '123' when it points at resource_type with a valid FHIR id; None otherwise."""
    parts = reference_parts(reference, base)
    if parts is None or parts[0] != resource_type or not FHIR_ID.fullmatch(parts[1]):
        return None
    return parts[1]


def patient_participants(appointment: Resource, base: str | None = None) -> list[str]:
    """Ids of the patients to email: not `information-only`, not `declined`, in document order."""
    ids: list[str] = []
    participants = appointment.get("participant")
    for participant in participants if isinstance(participants, list) else []:
        if not isinstance(participant, dict) or not isinstance(participant.get("actor") or {}, dict):
            continue
        patient_id = reference_id((participant.get("actor") or {}).get("reference"), "Patient", base)
        if patient_id is None or patient_id in ids:
            continue
        if participant.get("required") == "information-only" or participant.get("status") == "declined":
            continue
        ids.append(patient_id)
    return ids


def _period_contains(period: Any, now: datetime) -> bool:
    if not isinstance(period, dict):
        return True
    start, end = parse_instant(period.get("start")), parse_instant(period.get("end"))
    return (start is None or start <= now) and (end is None or now <= end)


def choose_email(patient: Resource, now: datetime) -> str | None:
    """The address to write to: system=email, not `old`, current period, lowest rank, home before work.
    A value that is not exactly one usable address (connector.addresses) is passed over, never repaired."""
    candidates = []
    for index, telecom in enumerate(patient.get("telecom") or []):
        if not isinstance(telecom, dict) or telecom.get("system") != "email":
            continue
        value = telecom.get("value")
        if not isinstance(value, str) or not usable(value) or telecom.get("use") == "old":
            continue
        if not _period_contains(telecom.get("period"), now):
            continue
        rank = telecom.get("rank") if isinstance(telecom.get("rank"), int) else 1 << 30
        candidates.append((rank, USE_ORDER.get(str(telecom.get("use")), 4), index, value))
    return min(candidates)[3] if candidates else None


def is_deceased(patient: Resource) -> bool:
    return patient.get("deceasedBoolean") is True or bool(patient.get("deceasedDateTime"))


def display_name(patient: Resource) -> str:
    """Name for a greeting: `usual`, then `official`, then the first; `text`, else given + family."""
    names = [n for n in patient.get("name") or [] if isinstance(n, dict)]
    if not names:
        return ""
    names.sort(key=lambda n: {"usual": 0, "official": 1}.get(str(n.get("use")), 2))
    name = names[0]
    if name.get("text"):
        return str(name["text"])
    return " ".join([*(str(g) for g in name.get("given") or []), str(name.get("family") or "")]).strip()


def replaced_by(patient: Resource) -> str | None:
    """The surviving record's id when this one says `link.type = replaced-by`. Raises ResourceError when the
    link names a Patient by an invalid id: the record must not be used as if it had no successor."""
    for link in patient.get("link") or []:
        if isinstance(link, dict) and link.get("type") == "replaced-by":
            other = link.get("other")
            reference = other.get("reference") if isinstance(other, dict) else None
            parts = reference_parts(reference)
            if parts is not None and parts[0] == "Patient" and not FHIR_ID.fullmatch(parts[1]):
                raise ResourceError(
                    f"{describe(patient)}: link.other.reference (replaced-by) is not a valid Patient reference"
                )
            return reference_id(reference, "Patient")
    return None


def identifiers(patient: Resource) -> list[str]:
    """'system|value' for each identifier (used for opt-out matching; never logged)."""
    found = []
    for identifier in patient.get("identifier") or []:
        if isinstance(identifier, dict) and identifier.get("value"):
            found.append(f"{identifier.get('system') or ''}|{identifier['value']}")
    return found


def preferred_languages(patient: Resource) -> list[str]:
    """BCP-47 codes from Patient.communication, the preferred one first (then document order)."""
    entries = [c for c in patient.get("communication") or [] if isinstance(c, dict)]
    entries.sort(key=lambda c: 0 if c.get("preferred") is True else 1)
    codes: list[str] = []
    for entry in entries:
        language = entry.get("language") or {}
        coded = [
            c.get("code")
            for c in language.get("coding") or []
            if isinstance(c, dict) and c.get("code") and c.get("system") in (None, "urn:ietf:bcp:47")
        ]
        text = language.get("text")
        for code in [*coded, text if isinstance(text, str) and re.fullmatch(r"[A-Za-z]{2,3}(-\w+)*", text) else None]:
            if isinstance(code, str) and code not in codes:
                codes.append(code)
    return codes


def _elements(value: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every JSON object inside `value` with its FHIR-style path ('Appointment.participant[0]')."""
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        where_, item = stack.pop()
        if isinstance(item, dict):
            yield where_, item
            stack += [(f"{where_}.{k}", v) for k, v in item.items() if isinstance(v, dict | list)]
        elif isinstance(item, list):
            stack += [(f"{where_}[{i}]", v) for i, v in enumerate(item) if isinstance(v, dict | list)]


def check_modifiers(resource: dict[str, Any]) -> None:
    """FHIR: a resource with a modifier extension (or implicit rules) that a system does not understand must
    not be processed as if it were absent. We understand none."""
    name = safe_text(resource.get("resourceType", "?"), 64)
    if resource.get("implicitRules"):
        raise ResourceError(
            f"{describe(resource)}: {name}.implicitRules is set; rules the connector does "
            "not know may change its meaning"
        )
    for path, element in _elements(resource, name):
        if element.get("modifierExtension"):
            raise ResourceError(
                f"{describe(resource)}: {safe_text(path, 120)}.modifierExtension is not "
                "understood by the connector, so the resource is not processed"
            )
