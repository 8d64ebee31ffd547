"""Add to calendar: the iCalendar (RFC 5545) file a mapping with `attach_ics: true` sends (pure).

One VEVENT per appointment, its UID the same in every email about that appointment, so a calendar client
updates the entry it has: `METHOD:REQUEST` for a booked or moved appointment, `METHOD:CANCEL` with
`STATUS:CANCELLED` for a cancellation, and a SEQUENCE that grows with every change (the appointment's
version, which the EHR raises on each update). Times go in UTC; the zone the email writes times in is
named for display (X-WR-TIMEZONE). The summary is the email's subject: nothing the email does not show.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from email.utils import parseaddr
from typing import Any

from connector.fhir import parse_instant
from connector.models import Attachment

PRODID = "-//connector//patient notifications//EN"


def sequence(appointment: dict[str, Any], now: datetime) -> int:
    """The SEQUENCE of this version: `meta.versionId` when it is a number, else `meta.lastUpdated` in
    seconds (both grow with every change the EHR records); for an appointment known only from what the
    ledger remembered (deleted on the source), the current time in seconds, above either."""
    found = appointment.get("meta")
    meta: dict[str, Any] = found if isinstance(found, dict) else {}
    version = str(meta.get("versionId", ""))
    if version.isdigit():
        return int(version)
    updated = parse_instant(meta.get("lastUpdated"))
    return int((updated or now).timestamp())


def uid(source: str, appointment_id: str, domain: str) -> str:
    """The same for every email about one appointment; says nothing about it."""
    digest = hashlib.sha256(f"{source}/{appointment_id}".encode()).hexdigest()[:32]
    return f"{digest}@{domain}"


def invitation(
    appointment: dict[str, Any],
    *,
    source: str,
    cancelled: bool,
    summary: str,
    organizer: str,
    zone: str,
    now: datetime,
    attendee: str | None = None,
) -> Attachment | None:
    """The .ics file for this appointment, or None when it has no start. `attendee` is the address the
    email goes to: RFC 5546 wants the attendee in a REQUEST and in the CANCEL of a whole event (its address
    only, which the email already shows; no name)."""
    start = parse_instant(appointment.get("start"))
    if start is None:
        return None
    end = parse_instant(appointment.get("end")) or start + timedelta(minutes=30)
    method = "CANCEL" if cancelled else "REQUEST"
    from icalendar import Calendar, Event, vCalAddress, vText  # here: a run with nothing to attach never loads it

    name, address = parseaddr(organizer)
    domain = address.rpartition("@")[2] or "localhost"
    cal = Calendar()
    cal.add("prodid", PRODID)
    cal.add("version", "2.0")
    cal.add("method", method)
    cal.add("x-wr-timezone", zone)
    event = Event()
    event.add("uid", uid(source, str(appointment.get("id", "")), domain))
    event.add("sequence", sequence(appointment, now))
    event.add("dtstamp", now.astimezone(UTC))
    event.add("dtstart", start.astimezone(UTC))
    event.add("dtend", end.astimezone(UTC))
    event.add("summary", summary)
    event.add("status", "CANCELLED" if cancelled else "CONFIRMED")
    chair = vCalAddress(f"mailto:{address}")
    chair.params["cn"] = vText(name or domain)
    event.add("organizer", chair)
    if attendee:
        guest = vCalAddress(f"mailto:{parseaddr(attendee)[1] or attendee}")
        guest.params["role"] = vText("REQ-PARTICIPANT")
        guest.params["rsvp"] = vText("FALSE")
        event.add("attendee", guest)
    cal.add_component(event)
    return Attachment(filename="appointment.ics", content_type=f"text/calendar; method={method}", content=cal.to_ical())
