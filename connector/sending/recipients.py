"""Who receives a notification, read when it is due: the surviving Patient record and its address, unless
a rule says not to write (deceased, no usable address, opted out, a Consent that denies). Also how the
resources a send needs are read: from the poller's cache, else from the source (a batch at a time)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from connector import fhir, optout
from connector.errors import ResourceError, SourceError
from connector.fhir import check_modifiers
from connector.ledger import NotificationRecord, OptOut
from connector.ledger.batching import Coalesced
from connector.models import State

if TYPE_CHECKING:
    from connector.bounces import Tally
    from connector.config.sources import ConsentCheck
    from connector.ledger.abc import Bounces, OptOuts
    from connector.optout import OptOutKeys
    from connector.sources.cache import ResourceCache
    from connector.sources.fhir_poll import FhirPollSource

MAX_LINK_HOPS = 3
PREFETCH = 50  # ids per `_id` search
log = structlog.get_logger("connector.recipients")

# The opt-out that stops an email of (category, essential) to one of a recipient's (kind, digest) candidates,
# if any (see optout_lookup and connector.optout.applies).
OptOutLookup = Callable[[list[tuple[str, str]], str | None, bool], Awaitable[OptOut | None]]


def optout_lookup(optouts: OptOuts) -> OptOutLookup:
    """Look-ups from concurrent tasks share one query (see connector.ledger.batching)."""
    many = Coalesced(optouts.matches_many)

    async def opted_out(candidates: list[tuple[str, str]], category: str | None, essential: bool) -> OptOut | None:
        return optout.first_applying((await many([candidates]))[0], category, essential)

    return opted_out


# The suppression (after bounces) of a recipient's address for a patient of a source, if any.
BounceLookup = Callable[[str, str, str], Awaitable["Tally | None"]]


def bounce_lookup(bounces: Bounces, keys: OptOutKeys | None) -> BounceLookup:
    """Look-ups from concurrent tasks share one query, as the opt-outs' (the address's digest under each key)."""
    many = Coalesced(bounces.suppressed_many)

    async def suppressed(source: str, patient_id: str, address: str) -> Tally | None:
        inner = optout.digest("email", address)
        digests = [digest for _, digest in optout.variants(keys, inner)]
        return (await many([(source, patient_id, digests)]))[0]

    return suppressed


@dataclass(frozen=True)
class Recipient:
    patient: dict[str, Any]
    address: str


@dataclass(frozen=True)
class NoRecipient:
    state: State  # skipped (a rule) or failed (invalid data)
    reason: str


async def read_cached(
    cache: ResourceCache, source: FhirPollSource, resource_type: str, resource_id: str, version: str | None = None
) -> dict[str, Any] | None:
    """A resource from the poller's cache when it holds it (at `version`, if given), else from the source."""
    cached = cache.get(source.name, resource_type, resource_id)
    if cached is not None and (version is None or fhir.version_of(cached) == version):
        return cached
    resource = await source.read(resource_type, resource_id)
    if resource is not None:
        cache.put(source.name, resource)
    return resource


async def prefetch(
    cache: ResourceCache, sources: dict[str, FhirPollSource], notifications: list[NotificationRecord]
) -> None:
    """Read what these notifications need and the cache lacks with `_id` searches (up to PREFETCH ids each),
    not one read per resource: reminders come due long after the poll that saw them. Best effort: whatever
    is still missing is read one by one by `read_cached`, and a read's failure is reported there."""
    wanted: dict[tuple[str, str], set[str]] = {}
    for n in notifications:
        if n.resource_type != "Appointment" or n.source not in sources:
            continue
        cached = cache.get(n.source, "Appointment", n.resource_id)
        if cached is None or fhir.version_of(cached) != n.resource_version:
            wanted.setdefault((n.source, "Appointment"), set()).add(n.resource_id)
        if n.patient_id and cache.get(n.source, "Patient", n.patient_id) is None:
            wanted.setdefault((n.source, "Patient"), set()).add(n.patient_id)
    searches = []
    for (name, resource_type), ids in wanted.items():
        listed = sorted(i for i in ids if "," not in i)
        chunks = [listed[i : i + PREFETCH] for i in range(0, len(listed), PREFETCH)]
        searches += [_search_ids(cache, sources[name], resource_type, chunk) for chunk in chunks if len(chunk) > 1]
    await asyncio.gather(*searches)


async def _search_ids(cache: ResourceCache, source: FhirPollSource, resource_type: str, ids: list[str]) -> None:
    try:
        found = await source.search(resource_type, [("_id", ",".join(ids)), ("_count", str(len(ids)))], limit_pages=1)
    except SourceError as exc:
        log.info("recipients.prefetch_failed", source=source.name, problem=str(exc))
        return
    wanted = set(ids)
    for resource in found:  # a server that ignored `_id` gave other resources: only the wanted ones count
        if resource.get("resourceType") == resource_type and resource.get("id") in wanted:
            cache.put(source.name, resource)


async def resolve(
    patient_id: str,
    *,
    source: FhirPollSource,
    cache: ResourceCache,
    opted_out: OptOutLookup,
    consent: ConsentCheck,
    now: datetime,
    category: str | None = None,
    essential: bool = False,
    lean: bool = False,
) -> Recipient | NoRecipient:
    """Follow `replaced-by` links to the surviving record, then apply the recipient rules.
    Raises SourceError when the source cannot be read (the notification waits for the next pass)."""
    chain: list[str] = []
    current_id = patient_id
    while True:
        patient = await read_cached(cache, source, "Patient", current_id)
        if patient is None:
            return NoRecipient(State.SKIPPED, f"Patient/{current_id} not found on source {source.name!r}")
        try:
            fhir.validate(patient, lean)
            check_modifiers(patient)
            successor = fhir.replaced_by(patient)
        except ResourceError as exc:
            return NoRecipient(State.FAILED, str(exc))
        chain.append(current_id)
        if successor is None:
            break
        if successor in chain or len(chain) > MAX_LINK_HOPS:
            return NoRecipient(
                State.SKIPPED,
                f"Patient/{patient_id}: replaced-by links loop or run longer than {MAX_LINK_HOPS} records",
            )
        current_id = successor
    survivor = f"Patient/{current_id}" + (f" (replacing Patient/{patient_id})" if current_id != patient_id else "")
    if fhir.is_deceased(patient):
        return NoRecipient(State.SKIPPED, f"{survivor} is recorded as deceased")
    address = fhir.choose_email(patient, now)
    if address is None:
        return NoRecipient(State.SKIPPED, f"{survivor} has no usable email address")
    identifiers = fhir.identifiers(patient)
    match = await opted_out(optout.candidates(identifiers, address), category, essential)
    if match is not None:
        which = f" of {match.category!r} email" if match.category else ""
        return NoRecipient(
            State.SKIPPED,
            f"{survivor} opted out{which} (by {match.kind}, {match.origin}, {match.created_at.date().isoformat()})",
        )
    if consent.enabled:
        denial = await _denying_consent(source, current_id, consent.purpose, now)
        if denial is not None:
            return NoRecipient(State.SKIPPED, f"{survivor}: Consent/{denial} denies this purpose")
    return Recipient(patient, address)


async def _denying_consent(source: FhirPollSource, patient_id: str, purpose: str | None, now: datetime) -> str | None:
    consents = await source.search("Consent", [("patient", f"Patient/{patient_id}"), ("status", "active")])
    for consent in consents:
        if consent.get("status", "active") != "active":
            continue
        provision = consent.get("provision") or {}
        if provision.get("type") != "deny":
            continue
        period = provision.get("period") or {}
        start, end = fhir.parse_instant(period.get("start")), fhir.parse_instant(period.get("end"))
        if (start and now < start) or (end and now > end):
            continue
        purposes = {p.get("code") for p in provision.get("purpose") or [] if isinstance(p, dict)}
        if purpose is None or not purposes or purpose in purposes:
            return str(consent.get("id"))
    return None
