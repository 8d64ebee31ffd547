"""The small pages behind patients' links, in English and Dutch (the email's language; English otherwise).

A page names the clinic, the appointment's local date and time and the action, as a button that POSTs; it
never shows the patient's name. Answers to refused links are friendly and say what to do.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel.dates import format_date, format_time, get_timezone_name
from jinja2 import Environment, select_autoescape
from starlette.responses import HTMLResponse

TEXT: dict[str, dict[str, str]] = {
    "en": {
        "title": "Your appointment",
        "appointment": "Appointment on {when}",
        "confirm.ask": "Will you come to this appointment?",
        "confirm.button": "Yes, I will come",
        "cancel.ask": "Do you want to cancel this appointment?",
        "cancel.button": "Cancel my appointment",
        "unsubscribe.ask": "Which emails do you no longer want to receive?",
        "unsubscribe.category": "Only emails like this one ({category})",
        "unsubscribe.all": "All emails that can be stopped",
        "unsubscribe.button": "Unsubscribe",
        "unsubscribe.essential": "Messages you must receive, such as a cancellation by the clinic, are still sent.",
        "done.confirm": "Thank you: your clinic knows you will come.",
        "done.cancel": "Your appointment is cancelled. Your clinic has been told.",
        "done.unsubscribe": "You are unsubscribed.",
        "started": "This appointment has already started or is over, so nothing was changed.",
        "cancelled": "This appointment was cancelled, so nothing was changed.",
        "superseded": "This appointment was moved since this email. Use the link in the newest email.",
        "gone": "This appointment is no longer known to us. Please contact your clinic.",
        "not_offered": "This cannot be done online. Please contact your clinic.",
        "unavailable": "This could not be done right now. Please try again later or contact your clinic.",
        "expired": "This link has expired. Please contact your clinic.",
        "invalid": "This link is not valid. Please use the link in your email, or contact your clinic.",
        "busy": "Too many requests. Please wait a moment and try again.",
    },
    "nl": {
        "title": "Uw afspraak",
        "appointment": "Afspraak op {when}",
        "confirm.ask": "Komt u naar deze afspraak?",
        "confirm.button": "Ja, ik kom",
        "cancel.ask": "Wilt u deze afspraak afzeggen?",
        "cancel.button": "Afspraak afzeggen",
        "unsubscribe.ask": "Welke e-mails wilt u niet meer ontvangen?",
        "unsubscribe.category": "Alleen e-mails zoals deze ({category})",
        "unsubscribe.all": "Alle e-mails die gestopt kunnen worden",
        "unsubscribe.button": "Afmelden",
        "unsubscribe.essential": (
            "Berichten die u moet ontvangen, zoals een afzegging door de praktijk, krijgt u nog wel."
        ),
        "done.confirm": "Dank u wel: uw praktijk weet dat u komt.",
        "done.cancel": "Uw afspraak is afgezegd. Uw praktijk is op de hoogte gebracht.",
        "done.unsubscribe": "U bent afgemeld.",
        "started": "Deze afspraak is al begonnen of voorbij; er is niets gewijzigd.",
        "cancelled": "Deze afspraak is geannuleerd; er is niets gewijzigd.",
        "superseded": "Deze afspraak is verplaatst na deze e-mail. Gebruik de link in de nieuwste e-mail.",
        "gone": "Deze afspraak is bij ons niet meer bekend. Neem contact op met uw praktijk.",
        "not_offered": "Dit kan niet online. Neem contact op met uw praktijk.",
        "unavailable": "Dit lukte nu niet. Probeer het later nog eens of neem contact op met uw praktijk.",
        "expired": "Deze link is verlopen. Neem contact op met uw praktijk.",
        "invalid": "Deze link is niet geldig. Gebruik de link in uw e-mail of neem contact op met uw praktijk.",
        "busy": "Te veel verzoeken. Wacht even en probeer het opnieuw.",
    },
}

_PAGE = """<!doctype html>
<html lang="{{ lang }}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<title>{{ t.title }}{% if clinic %} · {{ clinic }}{% endif %}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 32rem; margin: 2rem auto; padding: 0 1rem; color: #1a1a1a; }
h1 { font-size: 1.4rem; } .when { font-size: 1.1rem; font-weight: 600; }
button { font-size: 1.05rem; padding: .6rem 1.2rem; border-radius: .4rem; border: 1px solid #245; background: #245;
  color: #fff; cursor: pointer; } label { display: block; margin: .4rem 0; } .note { color: #555; font-size: .9rem; }
</style>
</head>
<body>
<main>
<h1 id="clinic">{{ clinic or t.title }}</h1>
{% if when %}<p class="when" id="when">{{ t.appointment.format(when=when) }}</p>{% endif %}
{% if message %}<p id="message">{{ message }}</p>{% endif %}
{% if action %}
<form method="post" id="action-form">
  <p>{{ t[action ~ ".ask"] }}</p>
  {% if action == "unsubscribe" %}
    {% if category %}
    <label><input type="radio" name="scope" value="category" checked>
      {{ t["unsubscribe.category"].format(category=category) }}</label>
    <label><input type="radio" name="scope" value="all"> {{ t["unsubscribe.all"] }}</label>
    {% else %}<input type="hidden" name="scope" value="all">{% endif %}
  {% endif %}
  <button type="submit" id="act">{{ t[action ~ ".button"] }}</button>
  {% if action == "unsubscribe" %}<p class="note">{{ t["unsubscribe.essential"] }}</p>{% endif %}
</form>
{% endif %}
</main>
</body>
</html>
"""

_TEMPLATE = Environment(autoescape=select_autoescape(default=True, default_for_string=True)).from_string(_PAGE)
HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",  # the token is in the URL
    "X-Robots-Tag": "noindex, nofollow",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
    "X-Frame-Options": "DENY",
}


def language(code: str) -> str:
    primary = code.lower().replace("_", "-").split("-")[0]
    return primary if primary in TEXT else "en"


def local_time(start: datetime | None, zone: str, lang: str) -> str | None:
    if start is None:
        return None
    try:
        tz = ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        tz = ZoneInfo("UTC")
    local = start.astimezone(tz)
    day = format_date(local.date(), "full", locale=lang)
    hour = format_time(local, "short", tzinfo=tz, locale=lang)
    zone_name = get_timezone_name(local, "long", locale=lang)
    return f"{day}, {hour} ({zone_name})".replace("\u202f", " ")


def page(
    status: int,
    lang: str,
    *,
    clinic: str = "",
    when: str | None = None,
    message_key: str | None = None,
    action: str | None = None,
    category: str | None = None,
) -> HTMLResponse:
    lang = language(lang)
    t = TEXT[lang]
    body = _TEMPLATE.render(
        lang=lang,
        t=t,
        clinic=clinic,
        when=when,
        message=t[message_key] if message_key else None,
        action=action,
        category=category,
    )
    return HTMLResponse(body, status_code=status, headers=HEADERS)
