"""`connector render`: one mapping's email for an appointment read from files, rendered as the daemon would
send it. The config (when there is one) gives the mappings folder, the source's time zones (and those of
its Locations), the locale and the sender; options override each; `--language` picks a language variant.
Errors are one line each, naming the file and line (a traceback only with `--debug`). Registered on the app
by connector.cli; the work is connector.commands.files'."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from connector.commands import files
from connector.config import load_config
from connector.errors import ConfigError, ConnectorError
from connector.files import write_private
from connector.mapping.engine import RenderError
from connector.models import fixed_clock, system_clock

ResourceOption = Annotated[
    Path, typer.Option(help="Appointment JSON, or a Bundle with the Appointment and its Patient.")
]
PatientOption = Annotated[Path | None, typer.Option(help="Patient JSON, when not in the resource file.")]
HtmlOption = Annotated[Path, typer.Option(help="Where to write the HTML part.")]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Config to render with (mappings, time zones, locale, sender). Default: CONNECTOR_CONFIG or "
        "config.yaml, when it exists.",
        show_default=False,
    ),
]
SourceOption = Annotated[str | None, typer.Option(help="The source whose time zones apply (default: the first).")]
LanguageOption = Annotated[
    str | None,
    typer.Option(help="Render this language variant (e.g. nl), instead of the patient's communication languages."),
]
MappingsOption = Annotated[Path | None, typer.Option(help="Mappings folder (default: the config's).")]
ZoneOption = Annotated[str | None, typer.Option(help="IANA zone for dates and times (default: the source's).")]
LocaleOption = Annotated[str | None, typer.Option(help="Locale for dates and times (default: the config's).")]
NowOption = Annotated[str | None, typer.Option("--now", help="Render as if it were this instant (ISO 8601).")]


def _say(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def _stop(exc: ConnectorError, debug: bool) -> typer.Exit:
    """One line per problem, naming file and line; the traceback only with --debug."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, RenderError) and exc.file is not None:
        place = f"{exc.file}" + (f" line {exc.line}" if exc.line else "") + (f" ({exc.what})" if exc.what else "")
        _say(f"{place}: {exc}")
    elif isinstance(exc, ConfigError):
        for problem in exc.problems:
            _say(str(problem))
    else:
        _say(str(exc))
    return typer.Exit(2)


def register(
    app: typer.Typer,
    default_config: Path,
    debug: Callable[[], bool],
    instant: Callable[[str | None, str], datetime | None],
) -> None:
    """Add `render` to the app. `instant(text, option)` parses --now as the other commands do."""

    @app.command()
    def render(
        mapping: Annotated[str, typer.Argument(help="Mapping name, e.g. appointment-booked.")],
        resource: ResourceOption,
        patient: PatientOption = None,
        html_out: HtmlOption = Path("rendered.html"),
        config: ConfigOption = None,
        source: SourceOption = None,
        language: LanguageOption = None,
        mappings: MappingsOption = None,
        timezone: ZoneOption = None,
        locale: LocaleOption = None,
        now: NowOption = None,
    ) -> None:
        """Render one mapping for a resource file as the daemon would send it: print subject and text, write
        the HTML to a file."""
        moment = instant(now, "--now")
        clock = system_clock if moment is None else fixed_clock(moment)
        path = config if config is not None else default_config if default_config.exists() else None
        try:
            cfg = load_config(path, needs=()) if path is not None else None
            settings = files.render_settings(cfg, source, mappings, timezone, locale, language)
            email = files.render_file(settings, mapping, resource, patient, clock())
        except ConnectorError as exc:
            raise _stop(exc, debug()) from None
        print(f"Subject: {email.subject}\n\n{email.text}")
        if email.html is not None:
            write_private(html_out, email.html)  # it holds patient data: 0600
            print(f"(HTML part written to {html_out})", file=sys.stderr)
