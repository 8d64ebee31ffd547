"""The .ics file of `attach_ics: true`: written directly, it is byte for byte what the `icalendar` package
writes for the same calendar, which is still used for what the direct writer does not cover."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import parseaddr
from typing import TypeVar

from hypothesis import given, settings
from hypothesis import strategies as st

from connector import calendar
from connector.calendar import Event, with_icalendar, written

T = TypeVar("T")

moments = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC))
# names and addresses as the direct writer takes them (the rest goes to icalendar), and any text at all
plain = st.text(st.characters(blacklist_characters='"^', blacklist_categories=("Cc", "Cs")), max_size=90)
anything = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


def events(names: st.SearchStrategy[str]) -> st.SearchStrategy[Event]:
    return st.builds(
        Event,
        method=st.sampled_from(["REQUEST", "CANCEL"]),
        zone=st.one_of(st.sampled_from(["America/New_York", "UTC", "Europe/Amsterdam"]), names),
        uid=st.one_of(st.just("e2c09d08e038de0b62422b0e571a5f05@clinic.example.org"), anything),
        sequence=st.integers(min_value=-(2**31), max_value=2**31 - 1),
        stamp=moments,
        start=moments,
        end=moments,
        summary=st.one_of(anything, st.text(st.sampled_from("ab ,;\\^\r\nN’é€😀"), max_size=160)),
        cancelled=st.booleans(),
        chair=names,
        chair_address=names,
        guest=st.one_of(st.none(), names),
    )


@settings(max_examples=400, deadline=None)
@given(events(plain))
def test_the_direct_writer_writes_what_icalendar_writes(event: Event) -> None:
    assert written(event) == with_icalendar(event)


@settings(max_examples=200, deadline=None)
@given(
    summary=anything,
    organizer=st.one_of(st.just("Example Clinic <appointments@clinic.example.org>"), anything),
    attendee=st.one_of(st.none(), st.just("robin@example.org"), anything),
    zone=anything,
    cancelled=st.booleans(),
)
def test_an_invitation_is_what_icalendar_would_write_whatever_the_names(
    summary: str, organizer: str, attendee: str | None, zone: str, cancelled: bool
) -> None:
    """Names and addresses outside the direct writer's plain cases (quotes, control characters) go through
    icalendar itself: the file is the same either way."""
    now = datetime(2026, 12, 1, 12, 0, 0, 123456, tzinfo=UTC)
    appointment = {"id": "a1", "start": "2026-12-04T15:30:00Z", "meta": {"versionId": "3"}}
    kwargs = {"source": "ehr", "cancelled": cancelled, "summary": summary, "organizer": organizer, "zone": zone}
    made = _outcome(lambda: calendar.invitation(appointment, now=now, attendee=attendee, **kwargs))  # type: ignore[arg-type]
    name, address = calendar.parseaddr(organizer)
    domain = address.rpartition("@")[2] or "localhost"
    expected = Event(
        method="CANCEL" if cancelled else "REQUEST",
        zone=zone,
        uid=calendar.uid("ehr", "a1", domain),
        sequence=3,
        stamp=now,
        start=datetime(2026, 12, 4, 15, 30, tzinfo=UTC),
        end=datetime(2026, 12, 4, 15, 30, tzinfo=UTC) + timedelta(minutes=30),
        summary=summary,
        cancelled=cancelled,
        chair=name or domain,
        chair_address=address,
        guest=(calendar.parseaddr(attendee)[1] or attendee) if attendee else None,
    )
    wanted = _outcome(lambda: with_icalendar(expected))
    if isinstance(wanted, bytes):
        assert not isinstance(made, type) and made is not None
        assert made.content == wanted
        assert made.content_type == f"text/calendar; method={expected.method}"
    else:  # icalendar refuses it (a line break in an address or zone): the invitation fails the same way
        assert made is wanted


def _outcome(make: Callable[[], T]) -> T | type[Exception]:
    try:
        return make()
    except (ValueError, AssertionError) as exc:
        return type(exc)


def test_a_long_summary_is_folded_under_75_octets_and_an_escape_is_never_split() -> None:
    at = datetime(2026, 12, 4, 15, 30, tzinfo=UTC)
    summary = "é" * 30 + "," * 40
    event = Event("REQUEST", "UTC", "u@example.org", 1, at, at, at, summary, False, "Clinic", "a@example.org", None)
    content = written(event)
    assert content == with_icalendar(event)
    lines = content.split(b"\r\n")
    assert all(len(line) <= 75 for line in lines)
    assert not any(line.endswith(b"\\") for line in lines)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.from_regex(r"[A-Za-z0-9._%+!#$&'*/=?^`{|}~-]{1,20}@[A-Za-z0-9.-]{1,20}", fullmatch=True),
        st.emails().map(str),
        anything,
    )
)
def test_the_parts_of_an_address_are_what_parseaddr_gives(text: str) -> None:
    assert calendar.address_parts(text) == parseaddr(text)
