"""`connector resolve` and `connector retry`: a person's decisions on notifications, named by the id that
`connector status` shows (or the full key), several at once, or chosen by filter (state, mapping, source,
a window on when they last changed). A dry run says what would change; a filter, or more than one
notification, asks for confirmation (`--yes` skips it). The work is connector.commands.ledger's (over the
ledger's operator role); this module parses and prints. Registered on the app by connector.cli."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from connector.commands import ledger
from connector.ledger.operator import Selection
from connector.models import State
from connector.report import console

if TYPE_CHECKING:
    from connector.config import Config

T = TypeVar("T")
OnLedger = Callable[[Path, Callable[["Config"], Any]], Any]

TargetsArgument = Annotated[
    list[str] | None,
    typer.Argument(
        help="Notification ids (the `id` column of `connector status`) or full keys.",
        show_default=False,
        metavar="ID|KEY",
    ),
]
StateOption = Annotated[
    list[str] | None, typer.Option("--state", help="Only notifications in this state (repeatable).", show_default=False)
]
MappingOption = Annotated[
    list[str] | None, typer.Option("--mapping", help="Only this mapping's notifications (repeatable).")
]
SourceOption = Annotated[
    list[str] | None, typer.Option("--source", help="Only this source's notifications (repeatable).")
]
SinceOption = Annotated[
    str | None, typer.Option("--since", help="Only those that last changed at or after this instant (ISO 8601).")
]
UntilOption = Annotated[str | None, typer.Option("--until", help="Only those that last changed before this instant.")]
DryRunOption = Annotated[bool, typer.Option("--dry-run", help="Show what would change; change nothing.")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Config file (env CONNECTOR_CONFIG).")]
WORDS = {"sent": "marked sent", "cancel": "cancelled", "resend": "queued to send again", "retry": "queued to retry"}


def _instant(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        instant = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO 8601 instant", param_hint=option) from None
    if instant.tzinfo is None:
        raise typer.BadParameter("give a time zone, e.g. 2026-11-22T08:00:00+01:00 or ...Z", param_hint=option)
    return instant.astimezone(UTC)


def selection(
    targets: list[str] | None,
    states: list[str] | None,
    mappings: list[str] | None,
    sources: list[str] | None,
    since: str | None,
    until: str | None,
) -> Selection:
    """The Selection the arguments describe: digits are ids, anything else a key; filters narrow it."""
    names = targets or []
    ids = tuple(int(t) for t in names if t.isdigit())
    keys = tuple(t for t in names if not t.isdigit())
    known = {s.value for s in State}
    for state in states or []:
        if state not in known:
            raise typer.BadParameter(
                f"{state!r} is not a state: use one of {', '.join(sorted(known))}", param_hint="--state"
            )
    chosen = Selection(
        ids=ids,
        keys=keys,
        states=tuple(State(s) for s in states or []),
        mappings=tuple(mappings or []),
        sources=tuple(sources or []),
        since=_instant(since, "--since"),
        until=_instant(until, "--until"),
    )
    if chosen.empty:
        raise typer.BadParameter(
            "name notifications by id (from `connector status`) or key, or choose them with a filter: "
            "--state, --mapping, --source, --since/--until"
        )
    return chosen


def act(
    on_ledger: OnLedger, config: Path, chosen: Selection, decision: ledger.Decision, dry_run: bool, yes: bool
) -> None:
    """Preview, confirm, apply; print what changed. Exit 1 when nothing applies. The change is limited to
    what had last changed before the preview was read: a notification that reaches the state afterwards
    (a send timing out meanwhile) was not shown, so it is not decided on."""
    shown_at = datetime.now(UTC)
    preview: ledger.Preview = on_ledger(config, lambda cfg: ledger.preview(cfg, chosen, decision))
    applies = " or ".join(s.value for s in ledger.APPLIES[decision])
    if preview.not_applicable:
        console.print(
            f"{preview.not_applicable} of the notifications named are not {applies}: left alone", markup=False
        )
    if not preview.total:
        console.print(f"nothing to change: no notification of that selection is {applies}", markup=False)
        raise typer.Exit(1)
    per_state = ", ".join(f"{count} {state.value}" for state, count in sorted(preview.counts.items()))
    verb = WORDS[decision]
    console.print(f"{preview.total} notification(s) would be {verb} ({per_state}):", markup=False)
    for n in preview.first:
        console.print(
            f"  {n.id}  {n.state.value}  {n.mapping}  {n.resource_type}/{n.resource_id}  {n.key}", markup=False
        )
    if preview.total > len(preview.first):
        console.print(f"  ... and {preview.total - len(preview.first)} more", markup=False)
    if dry_run:
        console.print("dry run: nothing changed", markup=False)
        return
    if not yes and (not chosen.by_name or preview.total > 1):
        typer.confirm(f"{verb.capitalize()}: {preview.total} notification(s)?", abort=True)
    seen = replace(chosen, until=shown_at if chosen.until is None else min(chosen.until, shown_at))
    changed = on_ledger(config, lambda cfg: ledger.decide(cfg, seen, decision))
    console.print(f"{len(changed.ids)} notification(s) {verb}", markup=False)
    if len(changed.ids) < preview.total:
        console.print(
            f"{preview.total - len(changed.ids)} changed state meanwhile (or are being sent) and were left alone",
            markup=False,
        )


def register(app: typer.Typer, on_ledger: OnLedger, config_default: Path) -> None:
    """Add `resolve` and `retry` to the app; `on_ledger` opens the ledger and turns errors into exit 2."""

    @app.command()
    def resolve(
        targets: TargetsArgument = None,
        sent: Annotated[
            bool, typer.Option("--sent", help="It did go out (you checked with the patient or Paubox).")
        ] = False,
        resend: Annotated[
            bool,
            typer.Option(
                "--resend", help="Send it again, under the same key (a duplicate is possible if the first one went)."
            ),
        ] = False,
        cancel: Annotated[bool, typer.Option("--cancel", help="Do not send it.")] = False,
        state: StateOption = None,
        mapping: MappingOption = None,
        source: SourceOption = None,
        since: SinceOption = None,
        until: UntilOption = None,
        dry_run: DryRunOption = False,
        yes: YesOption = False,
        config: ConfigOption = config_default,
    ) -> None:
        """Decide what happened to in_doubt notifications (--sent, --cancel), or send them again (--resend,
        which also takes failed ones). Name them by id or key, or choose them by filter."""
        if sum((sent, resend, cancel)) != 1:
            raise typer.BadParameter("give exactly one of --sent, --resend, --cancel")
        decision: ledger.Decision = "sent" if sent else "resend" if resend else "cancel"
        act(on_ledger, config, selection(targets, state, mapping, source, since, until), decision, dry_run, yes)

    @app.command()
    def retry(
        targets: TargetsArgument = None,
        state: StateOption = None,
        mapping: MappingOption = None,
        source: SourceOption = None,
        since: SinceOption = None,
        until: UntilOption = None,
        dry_run: DryRunOption = False,
        yes: YesOption = False,
        config: ConfigOption = config_default,
    ) -> None:
        """Queue failed notifications to be sent again now, under the same key (attempts start again). In_doubt
        ones are not retried: decide them with `connector resolve`. Name them by id or key, or by filter."""
        act(on_ledger, config, selection(targets, state, mapping, source, since, until), "retry", dry_run, yes)
