"""Jinja2 in a sandbox: the template environment, its date filters, and PHI-safe error text.

Templates see plain JSON (`appointment`, `patient`) plus a few prepared values (`start`, `end`,
`patient_name`, `vars`, ...). A missing optional FHIR element renders as empty text; a misspelt top-level
name is caught by `connector validate` (see `undeclared_names`).
"""

from __future__ import annotations

import functools
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from babel import Locale
from babel.dates import format_date, format_datetime, format_time
from jinja2 import ChainableUndefined, FileSystemLoader, Template, TemplateError, TemplateSyntaxError, meta
from jinja2 import nodes as jinja_nodes
from jinja2.runtime import Context, Undefined
from jinja2.sandbox import SandboxedEnvironment
from jinja2.utils import pass_context

from connector.fhir import parse_instant

# Names a message template may use, and the smaller set a notification key may use (the key is
# decided before the patient record is read, so it cannot depend on it).
MESSAGE_NAMES = frozenset(
    {
        "appointment",
        "patient",
        "patient_name",
        "start",
        "end",
        "event",
        "mapping",
        "source",
        "vars",
        "timezone",
        "locale",
        "language",
        "now",
        "confirm_url",  # patients' links (`links:` in the config; undefined without it)
        "cancel_url",
        "unsubscribe_url",
    }
)
KEY_NAMES = frozenset({"appointment", "patient_id", "event", "mapping", "source", "start"})
# The same for CRM event mappings: the event as stored (`payload` is what the CRM sent).
CRM_MESSAGE_NAMES = frozenset(
    {
        "payload",
        "event_id",
        "event_type",
        "object_id",
        "occurred_at",
        "object",
        "mapping",
        "source",
        "vars",
        "timezone",
        "locale",
        "language",
        "now",
        "unsubscribe_url",  # with `links:` in the config; undefined without it
    }
)
CRM_KEY_NAMES = frozenset({"payload", "event_id", "event_type", "object_id", "mapping", "source"})
# CRM appointments (`resource: CrmAppointment`): `appointment` is the view the source's declaration reads
# (id, status, start, end, payload, object, ...); `patient_name` comes from its `name` path, if any. Keys
# use the Appointment names.
CRM_APPOINTMENT_MESSAGE_NAMES = (MESSAGE_NAMES - {"patient"}) | {
    "payload",
    "object",
    "event_type",
    "event_id",
    "object_id",
    "occurred_at",
}


def make_environment(root: Path) -> SandboxedEnvironment:
    """Sandboxed; HTML files (.html, .htm) autoescaped; text and subjects not. Mappings are read once at
    start, so templates are not checked for changes on disk at every render (auto_reload off)."""
    env = SandboxedEnvironment(
        loader=FileSystemLoader(root),
        auto_reload=False,
        autoescape=lambda name: name is not None and name.lower().endswith((".html", ".htm")),
        undefined=ChainableUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(format_datetime=_format_datetime, format_date=_format_date, format_time=_format_time)
    return env


Source = str | jinja_nodes.Template  # a template's text, or its text parsed once by `env.parse` for several reads


def _parsed(env: SandboxedEnvironment, source: Source) -> jinja_nodes.Template:
    return source if isinstance(source, jinja_nodes.Template) else env.parse(source)


def undeclared_names(env: SandboxedEnvironment, source: Source) -> set[str]:
    """Top-level names a template reads but neither defines nor gets from the environment."""
    ast = _parsed(env, source)
    names = meta.find_undeclared_variables(ast)
    return {n for n in names if n not in env.globals}


def vars_used(env: SandboxedEnvironment, source: Source) -> list[tuple[str, int]]:
    """The `vars.NAME` and `vars['NAME']` a template reads, with their lines (names given by a variable are
    not known before rendering and are left out)."""
    found: list[tuple[str, int]] = []
    ast = _parsed(env, source)
    # `vars.get('name', default)` and the like call a method of the dict: not a var named `get`
    methods = {id(call.node) for call in ast.find_all(jinja_nodes.Call) if isinstance(call.node, jinja_nodes.Getattr)}
    for node in ast.find_all(jinja_nodes.Getattr):
        if id(node) in methods:
            continue
        if isinstance(node.node, jinja_nodes.Name) and node.node.name == "vars":
            found.append((node.attr, node.lineno))
    for item in ast.find_all(jinja_nodes.Getitem):
        if isinstance(item.node, jinja_nodes.Name) and item.node.name == "vars":
            key = item.arg
            if isinstance(key, jinja_nodes.Const) and isinstance(key.value, str):
                found.append((key.value, item.lineno))
    return found


def referenced_templates(env: SandboxedEnvironment, source: Source) -> list[str]:
    """Templates this one extends or includes by a constant name (a layout, a partial)."""
    ast = _parsed(env, source)
    names = []
    for node in ast.find_all((jinja_nodes.Extends, jinja_nodes.Include)):
        template = getattr(node, "template", None)
        if isinstance(template, jinja_nodes.Const) and isinstance(template.value, str):
            names.append(template.value)
    return names


def filters_used(env: SandboxedEnvironment, source: Source) -> set[str]:
    ast = _parsed(env, source)
    return {node.name for node in ast.find_all(jinja_nodes.Filter)}


def _when(value: Any, context: Context) -> datetime | None:
    if isinstance(value, Undefined) or value is None or value == "":
        return None
    moment = value if isinstance(value, datetime) else parse_instant(str(value))
    if moment is None:
        return None
    return moment.astimezone(ZoneInfo(str(context.get("timezone") or "UTC")))


def _locale(context: Context) -> str:
    return str(context.get("locale") or "en_US")


@pass_context
def _format_datetime(context: Context, value: Any, format: str = "medium") -> str:
    moment = _when(value, context)
    return "" if moment is None else _formatted("datetime", moment, format, _locale(context))


@pass_context
def _format_date(context: Context, value: Any, format: str = "long") -> str:
    moment = _when(value, context)
    return "" if moment is None else _formatted("date", moment, format, _locale(context))


@pass_context
def _format_time(context: Context, value: Any, format: str = "short") -> str:
    moment = _when(value, context)
    return "" if moment is None else _formatted("time", moment, format, _locale(context))


_FORMATTED: dict[tuple[str, ...], str] = {}
_FORMATTED_MAX = 8192


def _formatted(kind: str, moment: datetime, format: str, locale: str) -> str:
    """Babel's formatting, remembered: many appointments share a day or a time slot. A date is keyed by the
    local date alone, a time by the local time of day with its UTC offset and zone name (so that 9:00 on
    every day of a month formats once), a date and time by the local moment with both."""
    zone, offset = str(moment.tzinfo), str(moment.utcoffset())
    if kind == "date":
        key: tuple[str, ...] = (kind, moment.date().isoformat(), format, locale)
    elif kind == "time":
        key = (kind, moment.time().isoformat(), offset, zone, format, locale)
    else:
        key = (kind, moment.replace(tzinfo=None).isoformat(), offset, zone, format, locale)
    text = _FORMATTED.get(key)
    if text is None:
        if len(_FORMATTED) >= _FORMATTED_MAX:
            _FORMATTED.clear()
        text = _FORMATTED[key] = _babel(kind, moment, format, _babel_locale(locale))
    return text


@functools.lru_cache(maxsize=64)
def _babel_locale(name: str) -> Locale:
    return Locale.parse(name)


def _babel(kind: str, moment: datetime, format: str, locale: Locale) -> str:
    if kind == "date":
        return format_date(moment.date(), format, locale=locale)
    if kind == "time":
        return format_time(moment, format, tzinfo=moment.tzinfo, locale=locale)
    return format_datetime(moment, format, tzinfo=moment.tzinfo, locale=locale)


def error_line(exc: BaseException, template: Template | str | None = None) -> int | None:
    """The template line a failure happened on, when the traceback tells."""
    if isinstance(exc, TemplateSyntaxError):
        return exc.lineno
    name = template.name if isinstance(template, Template) else template
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if (name and frame.filename.endswith(str(name))) or frame.filename == "<template>":
            line = frame.lineno
    return line


def safe_error(exc: BaseException, template: Template | str | None = None) -> str:
    """Describe a template failure without quoting data: Jinja's own messages name templates and
    attributes; any other exception is reported by type and template line only."""
    if isinstance(exc, TemplateSyntaxError):
        return f"{exc.message} (line {exc.lineno})"
    line = error_line(exc, template)
    where = f" (line {line})" if line else ""
    if isinstance(exc, TemplateError):
        return f"{exc.message}{where}"
    return f"{type(exc).__name__} while rendering{where}"
