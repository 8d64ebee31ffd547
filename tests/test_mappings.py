"""Mappings: loading with file/line problems, FHIRPath conditions, planning and rendering."""

from __future__ import annotations

import shutil
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from connector.errors import ConfigError
from connector.lifecycle import snapshot, transitions
from connector.mapping.engine import RenderRequest, Situation, plan, render
from connector.mapping.loader import MappingSet, load_mappings
from connector.models import PlannedNotification, State
from tests.factories import appointment, hl7, patient

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)

BASE = """\
name: reminder
trigger:
  resource: Appointment
  event: booked
{condition}
templates:
  subject: "{subject}"
  text: reminder.txt
"""


def folder_with(
    tmp_path: Path,
    *,
    condition: str = "",
    subject: str = "Hello",
    text: str = "Hi {{ patient_name }}",
    html: str | None = None,
) -> Path:
    folder = tmp_path / "mappings"
    folder.mkdir(exist_ok=True)
    body = BASE.format(condition=f'  condition: "{condition}"' if condition else "", subject=subject)
    if html is not None:
        body += "  html: reminder.html\n"
        (folder / "reminder.html").write_text(html)
    (folder / "reminder.yaml").write_text(body)
    (folder / "reminder.txt").write_text(text)
    return folder


def first_sight(
    mappings: MappingSet, resource: dict[str, object], version: str = "1", notified: frozenset[str] = frozenset()
) -> list[PlannedNotification]:
    """What the mappings plan when this appointment is seen for the first time."""
    situation = Situation("ehr", resource, version, "UTC", None, notified, NOW)
    planned = []
    for change in transitions(None, snapshot(resource, version, None)):
        planned += plan(mappings, change, situation).notifications
    return planned


def load_problems(folder: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_mappings(folder)
    return [str(p) for p in caught.value.problems]


def test_shipped_mappings_load() -> None:
    mappings = load_mappings(ROOT / "mappings")
    assert mappings.names() == [
        "appointment-booked",
        "appointment-cancelled",
        "appointment-reminder-2h",
        "appointment-reminder-48h",
        "appointment-rescheduled",
    ]
    assert all(sorted(mappings.get(n).variants) == ["en", "nl"] for n in mappings.names())  # type: ignore[union-attr]


def test_jinja_syntax_error_names_template_file_and_line(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, text="line one\nline two {{ patient_name \n")
    [problem] = load_problems(folder)
    assert problem.startswith(f"{(folder / 'reminder.txt').resolve()} line 2")
    assert "template error" in problem


def test_syntax_error_in_inline_subject_names_mapping_line(tmp_path: Path) -> None:
    [problem] = load_problems(folder_with(tmp_path, subject="{% if %}"))
    assert "reminder.yaml line 7 (templates.subject): template error" in problem


def test_unknown_fhirpath_function_is_reported(tmp_path: Path) -> None:
    [problem] = load_problems(folder_with(tmp_path, condition="Appointment.status.shout()"))
    assert "reminder.yaml line 5 (trigger.condition): FHIRPath error" in problem
    assert "shout" in problem


def test_condition_that_is_not_boolean_is_reported(tmp_path: Path) -> None:
    [problem] = load_problems(folder_with(tmp_path, condition="Appointment.status"))
    assert "must give true or false" in problem


def test_unknown_template_variable_is_reported(tmp_path: Path) -> None:
    [problem] = load_problems(folder_with(tmp_path, text="Dear {{ patient_nam }}"))
    assert "unknown variable 'patient_nam'" in problem


def test_key_may_not_depend_on_the_patient_record(tmp_path: Path) -> None:
    folder = folder_with(tmp_path)
    with (folder / "reminder.yaml").open("a") as f:
        f.write('key: "{{ patient.name }}"\n')
    [problem] = load_problems(folder)
    assert "(key): unknown variable 'patient'" in problem


def test_unknown_event_and_missing_template_file(tmp_path: Path) -> None:
    folder = folder_with(tmp_path)
    (folder / "reminder.yaml").write_text(
        (folder / "reminder.yaml")
        .read_text()
        .replace("event: booked", "event: confirmed")
        .replace("reminder.txt", "missing.txt")
    )
    found = load_problems(folder)
    assert any("line 4 (trigger.event): unknown event 'confirmed'" in p for p in found)


@pytest.mark.parametrize(
    ("change", "added", "expected"),
    [
        (
            ("resource: Appointment", "resource: CrmEvent"),
            "recipient: {path: payload.email}\nat: start - 2h\n",
            "describe the appointment under crm.<name>.appointment and use resource: CrmAppointment",
        ),
        (("", ""), "reschedule_on: [start, end]\n", "triggered on `rescheduled`"),
        (("event: booked", "event: rescheduled"), "reschedule_on: [begin]\n", "reschedule_on.0"),
        (("resource: Appointment", "resource: CrmAppointment\n  sources: [crm]"), "", "no source named 'crm'"),
    ],
)
def test_crm_reminders_and_reschedule_on_are_checked(
    tmp_path: Path, change: tuple[str, str], added: str, expected: str
) -> None:
    folder = folder_with(tmp_path)
    (folder / "reminder.yaml").write_text((folder / "reminder.yaml").read_text().replace(*change) + added)
    with pytest.raises(ConfigError) as caught:
        load_mappings(folder, ["ehr"])
    assert expected in str(caught.value)


def test_a_crm_appointment_mapping_may_have_reminders_and_sees_no_fhir_patient(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, text="Hi {{ patient_name }} {{ payload.Name }}")
    text = (folder / "reminder.yaml").read_text().replace("resource: Appointment", "resource: CrmAppointment")
    (folder / "reminder.yaml").write_text(text + "at: [start - 48h, start - 2h]\n")
    [mapping] = load_mappings(folder)
    assert mapping.spec.is_crm_appointment and mapping.spec.is_reminder and not mapping.spec.is_crm
    (folder / "reminder.txt").write_text("Hi {{ patient.name }}")
    assert "unknown variable 'patient'" in str(load_problems(folder))


def test_condition_filters_events(tmp_path: Path) -> None:
    condition = "Appointment.serviceType.where(text = 'Check-up').exists()"
    mappings = load_mappings(folder_with(tmp_path, condition=condition))
    booked = appointment("a1", "p1", NOW + timedelta(days=2))
    other = appointment("a2", "p1", NOW + timedelta(days=2), serviceType=[{"text": "Surgery"}])
    assert len(first_sight(mappings, booked)) == 1
    assert first_sight(mappings, other) == []


def test_plan_one_per_patient_skipping_information_only_and_past() -> None:
    mappings = load_mappings(ROOT / "mappings")
    group = appointment("a1", "p1", NOW + timedelta(days=1))
    group["participant"] += [
        {"actor": {"reference": "Patient/p2"}, "status": "accepted"},
        {"actor": {"reference": "Patient/p3"}, "required": "information-only", "status": "accepted"},
        {"actor": {"reference": "Patient/p4"}, "status": "declined"},
    ]
    planned = [p for p in first_sight(mappings, group) if p.mapping == "appointment-booked"]
    assert [p.patient_id for p in planned] == ["p1", "p2"]
    assert all(p.key.startswith("ehr:appointment-booked:a1|booked|") for p in planned)
    past = [p for p in first_sight(mappings, hl7("Appointment-example")) if p.mapping == "appointment-booked"]
    assert [(p.state, p.reason) for p in past] == [(State.SKIPPED, "the appointment start has already passed")]


def test_keys_do_not_depend_on_how_the_server_writes_the_start() -> None:
    mappings = load_mappings(ROOT / "mappings")
    first = appointment("a1", "p1", NOW + timedelta(days=1))
    second = {**first, "start": (NOW + timedelta(days=1)).astimezone(ZoneInfo("Europe/Amsterdam")).isoformat()}
    keys = [sorted(p.key for p in first_sight(mappings, a, v)) for a, v in ((first, "1"), (second, "2"))]
    assert keys[0] == keys[1]


def test_render_text_and_autoescaped_html(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "mappings", tmp_path / "m")
    mappings = load_mappings(tmp_path / "m")
    visit = appointment("a1", "p1", datetime(2026, 12, 1, 14, 30, tzinfo=UTC))
    person = patient("p1", "<script>alert(1)</script>", email="x@example.org")
    request = RenderRequest(
        key="k",
        to="x@example.org",
        appointment=visit,
        patient=person,
        event="booked",
        source="ehr",
        timezone="America/New_York",
        locale="en_US",
        now=NOW,
        default_from="c@example.org",
    )
    email = render(mappings.get("appointment-booked"), request)  # type: ignore[arg-type]
    assert email.subject == "Your appointment at Example Clinic on December 1, 2026"
    assert "Tuesday, December 1, 2026" in email.text and "9:30 AM EST" in email.text
    assert "<script>" in email.text  # plain text is not HTML
    assert email.html is not None and "<script>" not in email.html and "&lt;script&gt;" in email.html


def test_render_in_another_locale(tmp_path: Path) -> None:
    mappings = load_mappings(ROOT / "mappings")
    visit = appointment("a1", "p1", datetime(2026, 12, 1, 14, 30, tzinfo=UTC))
    request = RenderRequest(
        key="k",
        to="x@example.org",
        appointment=visit,
        patient=patient("p1", "A"),
        event="booked",
        source="ehr",
        timezone="Europe/Amsterdam",
        locale="nl_NL",
        now=NOW,
        default_from="c@example.org",
    )
    email = render(mappings.get("appointment-booked"), request)  # type: ignore[arg-type]
    assert "dinsdag 1 december 2026" in email.text


VISIT = appointment("a1", "p1", datetime(2026, 12, 1, 14, 30, tzinfo=UTC))
ROBIN = patient("p1", "Robin", email="robin@example.org")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # What the templates see of a request: the start and end as instants, the patient's display name.
        ({}, {"start": datetime(2026, 12, 1, 14, 30, tzinfo=UTC), "patient_name": "Robin Testperson"}),
        (
            {"appointment": {**VISIT, "start": "not a time"}},
            {"start": None, "end": datetime(2026, 12, 1, 15, 0, tzinfo=UTC)},
        ),
        ({"event": "rescheduled", "source": "west"}, {"event": "rescheduled", "source": "west"}),
        ({"timezone": "Europe/Amsterdam"}, {"timezone": "Europe/Amsterdam", "now": NOW}),
    ],
)
def test_a_render_request_is_what_the_templates_see(changes: dict[str, object], expected: dict[str, object]) -> None:
    base = RenderRequest(
        key="k",
        to="robin@example.org",
        appointment=VISIT,
        patient=ROBIN,
        event="booked",
        source="ehr",
        timezone="UTC",
        locale="en_US",
        now=NOW,
        default_from="clinic@example.org",
    )
    context = replace(base, **changes).context()  # type: ignore[arg-type]
    assert {key: context[key] for key in expected} == expected


@pytest.mark.parametrize(
    ("languages", "reply_to", "subject_starts", "sender", "replies"),
    [
        ((), None, "Your appointment", "clinic@example.org", None),
        (("nl",), "desk@example.org", "Uw afspraak", "clinic@example.org", "desk@example.org"),
        (("fr", "nl-NL"), None, "Uw afspraak", "clinic@example.org", None),  # the first language it has
        (("fr",), None, "Your appointment", "clinic@example.org", None),  # none: the mapping's own
    ],
)
def test_a_render_request_chooses_language_and_envelope(
    languages: tuple[str, ...], reply_to: str | None, subject_starts: str, sender: str, replies: str | None
) -> None:
    mappings = load_mappings(ROOT / "mappings")
    request = RenderRequest(
        key="k",
        to="robin@example.org",
        appointment=VISIT,
        patient=ROBIN,
        event="booked",
        source="ehr",
        timezone="UTC",
        locale="en_US",
        now=NOW,
        default_from="clinic@example.org",
        default_reply_to=reply_to,
        languages=languages,
    )
    email = render(mappings.get("appointment-booked"), request)  # type: ignore[arg-type]
    assert email.subject.startswith(subject_starts)
    assert (email.notification_key, email.to, email.from_address, email.reply_to) == (
        "k",
        "robin@example.org",
        sender,
        replies,
    )


def test_an_unknown_vars_name_is_reported_with_file_and_line(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, text="Dear {{ patient_name }},\ncall us on {{ vars.clinic_phon }}\n")
    (folder / "reminder.yaml").write_text((folder / "reminder.yaml").read_text() + "vars: {clinic_phone: '0'}\n")
    [problem] = load_problems(folder)
    assert problem.startswith(f"{(folder / 'reminder.txt').resolve()} line 2")
    assert "vars.clinic_phon is not in the `vars:` of reminder.yaml" in problem
    assert "defined there: clinic_phone" in problem


def test_an_unknown_vars_name_in_a_subject_or_a_layout(tmp_path: Path) -> None:
    folder = folder_with(
        tmp_path,
        subject="At {{ vars['clinic'] }}",
        html='{% extends "_base.html" %}{% block body %}{{ vars.name }}{% endblock %}',
    )
    (folder / "_base.html").write_text("<p>\n{{ vars.adress }}</p>{% block body %}{% endblock %}\n")
    (folder / "reminder.yaml").write_text((folder / "reminder.yaml").read_text() + "vars: {name: Example}\n")
    problems = load_problems(folder)
    assert any("reminder.yaml line 7 (templates.subject): vars.clinic is not in" in p for p in problems)
    assert any(p.startswith(f"{folder / '_base.html'} line 2") and "vars.adress" in p for p in problems)
    assert not any("vars.name " in p for p in problems)
    assert len(problems) == 2


@pytest.mark.parametrize(
    ("condition", "said"),
    [
        ("Appointment..status = 'booked'", "column 13: extraneous input '.'"),
        ("Appointment.where(status = 'booked'", "missing ')'"),
        ("Appointment.status = 'booked' and (", "the expression ends too soon"),
        ("Appointment.status booked", "unexpected 'booked' after a complete expression"),
    ],
)
def test_fhirpath_that_does_not_parse_is_reported(tmp_path: Path, condition: str, said: str) -> None:
    [problem] = load_problems(folder_with(tmp_path, condition=condition))
    assert "reminder.yaml line 5 (trigger.condition): FHIRPath does not parse, " in problem
    assert said in problem


def test_an_offset_after_the_start_says_how_to_write_it(tmp_path: Path) -> None:
    folder = folder_with(tmp_path)
    body = (folder / "reminder.yaml").read_text().replace("  event: booked\n", "  event: booked\nat: start + 2h\n")
    (folder / "reminder.yaml").write_text(body)
    [problem] = load_problems(folder)
    assert "reminder.yaml line 5 (at)" in problem
    assert "'start + 2h' is after the appointment starts" in problem and "`start - 2h`" in problem
