"""Add to calendar: the iCalendar (RFC 5545) file a mapping with `attach_ics: true` sends (pure).

One VEVENT per appointment, its UID the same in every email about that appointment, so a calendar client
updates the entry it has: `METHOD:REQUEST` for a booked or moved appointment, `METHOD:CANCEL` with
`STATUS:CANCELLED` for a cancellation, and a SEQUENCE that grows with every change (the appointment's
version, which the EHR raises on each update). Times go in UTC; the zone the email writes times in is
named for display (X-WR-TIMEZONE). The summary is the email's subject: nothing the email does not show.

The file is written directly, byte for byte what the `icalendar` package writes for the same calendar (its
property order, TEXT escaping, parameter quoting and line folding): building it through that package cost
more CPU than everything else about a send. Whatever falls outside the plain cases written here (control
characters, quotes or `^` in a name or address) is still built by `icalendar`; tests/test_calendar.py
compares the two on generated input.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
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
    name, address = address_parts(organizer)
    domain = address.rpartition("@")[2] or "localhost"
    guest = (address_parts(attendee)[1] or attendee) if attendee else None
    event = Event(
        method="CANCEL" if cancelled else "REQUEST",
        zone=zone,
        uid=uid(source, str(appointment.get("id", "")), domain),
        sequence=sequence(appointment, now),
        stamp=now.astimezone(UTC),
        start=start.astimezone(UTC),
        end=end.astimezone(UTC),
        summary=summary,
        cancelled=cancelled,
        chair=name or domain,
        chair_address=address,
        guest=guest,
    )
    plain = -(2**31) <= event.sequence < 2**31 and all(  # icalendar refuses a SEQUENCE beyond 32 bits
        _PLAIN.fullmatch(value) for value in (event.zone, event.chair, event.chair_address, event.guest or "")
    )
    content = written(event) if plain else with_icalendar(event)
    return Attachment(filename="appointment.ics", content_type=f"text/calendar; method={event.method}", content=content)


# An address with no name and a dot-atom local part, which `parseaddr` gives back as it is.
_SIMPLE = re.compile(
    r"[\w!#$%&'*+/=?^`{|}~-]+(?:\.[\w!#$%&'*+/=?^`{|}~-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*", re.ASCII
)


def address_parts(text: str) -> tuple[str, str]:
    """`email.utils.parseaddr`, without parsing a plain address, and remembered for the few `From:` lines."""
    return ("", text) if _SIMPLE.fullmatch(text) else _parsed(text)


@functools.lru_cache(maxsize=64)
def _parsed(text: str) -> tuple[str, str]:
    return parseaddr(text)


@dataclass(frozen=True)
class Event:
    """What the file says, decided; `written` and `with_icalendar` turn it into the same bytes."""

    method: str
    zone: str
    uid: str
    sequence: int
    stamp: datetime  # UTC, as the three below
    start: datetime
    end: datetime
    summary: str
    cancelled: bool
    chair: str  # the organizer's name (CN)
    chair_address: str
    guest: str | None  # the attendee's address


# A zone, name or address written as it is: no control character, no double quote, no `^` (RFC 6868).
_PLAIN = re.compile(r"[^\x00-\x1f\x7f\"^]*")


def written(event: Event) -> bytes:
    """The file, written directly (see the module's docstring)."""
    lines = [
        "BEGIN:VCALENDAR",
        "VERSION:2.0",
        f"PRODID:{_text(PRODID)}",
        f"METHOD:{_text(event.method)}",
        f"X-WR-TIMEZONE:{event.zone}",  # an unknown property to icalendar: as it is
        "BEGIN:VEVENT",
        f"SUMMARY:{_text(event.summary)}",
        f"DTSTART:{_utc(event.start)}",
        f"DTEND:{_utc(event.end)}",
        f"DTSTAMP:{_utc(event.stamp)}",
        f"UID:{_text(event.uid)}",
        f"SEQUENCE:{event.sequence}",
    ]
    if event.guest is not None:
        lines.append(f"ATTENDEE;ROLE=REQ-PARTICIPANT;RSVP=FALSE:mailto:{event.guest}")
    lines += [
        f"ORGANIZER;CN={_parameter(event.chair)}:mailto:{event.chair_address}",
        f"STATUS:{'CANCELLED' if event.cancelled else 'CONFIRMED'}",
        "END:VEVENT",
        "END:VCALENDAR",
    ]
    return "".join(_fold(line) + "\r\n" for line in lines).encode()


def _text(value: str) -> str:
    """RFC 5545 TEXT escaping, in the order `icalendar` applies it (a written `\\N` becomes a line break)."""
    return (
        value.replace("\\N", "\n")
        .replace("\\", "\\\\")
        .replace(";", "\\;")
        .replace(",", "\\,")
        .replace("\r\n", "\\n")
        .replace("\n", "\\n")
        .replace("\r", "\\n")
    )


def _parameter(value: str) -> str:
    """A CN value (already _PLAIN): in double quotes when it holds a space, an apostrophe, `,`, `;` or `:`."""
    return f'"{value}"' if any(c in value for c in " ',;:\u2019") else value


def _utc(moment: datetime) -> str:
    return (
        f"{moment.year:04d}{moment.month:02d}{moment.day:02d}T{moment.hour:02d}{moment.minute:02d}{moment.second:02d}Z"
    )


def _fold(line: str, limit: int = 75) -> str:
    """RFC 5545 folding as `icalendar` does it: pieces of fewer than `limit` octets (UTF-8), each after the
    first on a line of its own starting with a space; a `\\` or `^` that would end a piece begins the next."""
    if len(line) < limit and line.isascii():
        return line
    pieces: list[str] = []
    piece: list[str] = []
    size = 0
    for char in line:
        width = len(char.encode())
        if piece and size + width >= limit:
            carried = piece.pop() if len(piece) > 1 and piece[-1] in "\\^" else None
            pieces.append("".join(piece))
            piece = [carried] if carried is not None else []
            size = len(carried.encode()) if carried is not None else 0
        piece.append(char)
        size += width
    if piece:
        pieces.append("".join(piece))
    return "\r\n ".join(pieces)


def with_icalendar(event: Event) -> bytes:
    """The file built by the `icalendar` package: for what `written` does not cover."""
    import icalendar  # here: most runs never need it

    cal = icalendar.Calendar()
    cal.add("prodid", PRODID)
    cal.add("version", "2.0")
    cal.add("method", event.method)
    cal.add("x-wr-timezone", event.zone)
    vevent = icalendar.Event()
    vevent.add("uid", event.uid)
    vevent.add("sequence", event.sequence)
    vevent.add("dtstamp", event.stamp)
    vevent.add("dtstart", event.start)
    vevent.add("dtend", event.end)
    vevent.add("summary", event.summary)
    vevent.add("status", "CANCELLED" if event.cancelled else "CONFIRMED")
    chair = icalendar.vCalAddress(f"mailto:{event.chair_address}")
    chair.params["cn"] = icalendar.vText(event.chair)
    vevent.add("organizer", chair)
    if event.guest is not None:
        guest = icalendar.vCalAddress(f"mailto:{event.guest}")
        guest.params["role"] = icalendar.vText("REQ-PARTICIPANT")
        guest.params["rsvp"] = icalendar.vText("FALSE")
        vevent.add("attendee", guest)
    cal.add_component(vevent)
    content: bytes = cal.to_ical()
    return content
