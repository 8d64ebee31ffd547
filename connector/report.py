"""Tables and summaries printed by the CLI (stdout). Keys and states, never message contents."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from connector import machine, preflight

if TYPE_CHECKING:
    from pathlib import Path

    from connector.health import Finding
    from connector.ledger import NotificationRecord, OptOut, Rekeyed, SeenVersion
    from connector.models import PlanNote
    from connector.preflight import Check
    from connector.results import CycleReport, DryRun, Replayed, ReplayItem


def _width() -> int | None:
    """The terminal's width; when piped, $COLUMNS or 160 (wide enough for keys and reasons)."""
    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    return None if sys.stdout.isatty() else 160


console = Console(highlight=False, width=_width())


def cycle(report: CycleReport) -> None:
    for poll in report.polls:
        if poll.error:
            console.print(styled(f"source {poll.source}: FAILED", "red", poll.error), soft_wrap=True)
        else:
            console.print(
                f"source {poll.source}: {poll.pages} page(s), {poll.resources} appointment(s), "
                f"{poll.new_versions} new version(s), {poll.quarantined} quarantined, "
                f"{poll.inserted} new notification(s)"
            )
    if report.dispatch:
        steps = ", ".join(f"{v} {k}" for k, v in report.dispatch.steps.items() if v) or "nothing due"
        console.print(f"dispatch: {steps}")
        if report.dispatch.paused:
            console.print(styled("sending paused:", "red", report.dispatch.paused), soft_wrap=True)
        if report.dispatch.waiting:
            console.print(f"sending waits: {report.dispatch.waiting}", markup=False)


def _table(title: str, columns: tuple[str, ...]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


TABLE_ROWS = 50  # more rows than this: a summary, and the full list in a file on request (--output)


def replay_items(
    items: list[ReplayItem],
    notes: list[tuple[str, PlanNote]],
    final: dict[str, NotificationRecord],
    verdicts: dict[str, str],
    title: str,
    quarantined: list[tuple[str, SeenVersion]],
    output: Path | None = None,
    limit: int | None = TABLE_ROWS,
) -> None:
    """A table of every row when there are at most `limit` (None: always); otherwise the counts by result
    only. With `output`, the full list goes to that file (JSON lines, or CSV for a name ending in .csv)."""
    found = machine.rows(items, notes, final, verdicts, quarantined)
    if (limit is None or len(found) <= limit) and output is None:
        table = _table(title, ("mapping", "resource", "patient", "due", "key", "result"))
        for row in found:
            table.add_row(
                row["mapping"] or "-",
                escape(row["resource"]),
                row["patient"] or "-",
                row["due"],
                row["key"],
                escape(row["detail"]),
            )
        console.print(table)
    else:
        console.print(title, markup=False)
    counts = machine.summary(found)
    console.print(", ".join(f"{v} {k}" for k, v in counts.items()) or "no notifications", markup=False)
    if output is not None:
        written = machine.write_rows(output, found)
        console.print(f"{len(found)} row(s) written to {output} ({written})", markup=False)
    elif limit is not None and len(found) > limit:
        console.print(f"{len(found)} rows: give --output FILE (.jsonl or .csv) for the full list", markup=False)


def replayed(result: Replayed, dry_run: bool, output: Path | None = None) -> None:
    replay_items(
        result.items,
        result.notes,
        {} if dry_run else result.final,
        result.verdicts,
        "Replay (dry run: nothing is recorded or sent)" if dry_run else "Replay",
        result.quarantined,
        output,
    )


def dry_run(result: DryRun) -> None:
    for error in result.errors:
        console.print(styled(error, "red"), soft_wrap=True)
    replay_items(
        result.planned,
        result.notes,
        {},
        result.verdicts,
        "Next poll would plan (nothing committed)",
        result.quarantined,
        limit=None,
    )
    table = _table("Already due, would be sent now", ("id", "mapping", "resource", "key", "due"))
    for n in result.due:
        table.add_row(str(n.id), n.mapping, f"{n.resource_type}/{n.resource_id}", n.key, n.due_at.isoformat())
    console.print(table)


def _ago(value: Any) -> str:
    return value.isoformat(timespec="seconds") if hasattr(value, "isoformat") else str(value)


def health(findings: list[Finding]) -> None:
    """The same facts as `/healthz`: each part, whether it is well, since when and why."""
    table = _table("Health", ("part", "status", "since", "detail"))
    for finding in findings:
        details = [
            f"{key.replace('_', ' ')}: {_ago(value)}"
            for key, value in finding.details.items()
            if value is not None and key != "last_error"
        ]
        if finding.details.get("last_error") and finding.ok:
            details.append(f"last error: {finding.details['last_error']}")
        detail = "; ".join([*([finding.reason] if finding.reason else []), *details])
        table.add_row(
            Text(finding.component),
            Text("ok" if finding.ok else "FAILING"),
            Text(_ago(finding.since) if finding.since else ""),
            Text(detail),
        )
    console.print(table)


def status(data: dict[str, Any]) -> None:
    health(data["health"])
    table = Table(title="Notifications", title_justify="left")
    table.add_column("state")
    table.add_column("count", justify="right")
    for state, count in data["counts"].items():
        table.add_row(state.value, str(count))
    console.print(table)
    for source, value in sorted(data["cursors"].items()):
        console.print(f"source {source}: cursor (newest lastUpdated committed) {value.isoformat()}")
    quarantined = data["quarantined"]
    if quarantined:
        per_source = ", ".join(f"{source} {count}" for source, count in sorted(quarantined.items()))
        console.print(
            f"quarantined (not processed; kept on record): {sum(quarantined.values())} ({per_source})", markup=False
        )
    if data["attention"]:
        table = Table(title="Needing attention (in_doubt, failed)", title_justify="left")
        for column in ("id", "state", "mapping", "resource", "key", "reason", "updated"):
            table.add_column(column, overflow="fold")
        for n in data["attention"]:
            table.add_row(
                str(n.id),
                n.state.value,
                n.mapping,
                escape(f"{n.resource_type}/{n.resource_id}"),
                escape(n.key),
                escape(n.reason or ""),  # what a server said, maybe with brackets: text, never markup
                n.updated_at.isoformat(timespec="seconds"),
            )
        console.print(table)
    if data["suppressed"]:
        table = _table(
            "Recently skipped or withdrawn (with reasons)", ("id", "state", "mapping", "resource", "patient", "reason")
        )
        for n in data["suppressed"]:
            table.add_row(
                str(n.id),
                n.state.value,
                n.mapping,
                escape(f"{n.resource_type}/{n.resource_id}"),
                escape(n.patient_id or ""),
                escape(n.reason or ""),
            )
        console.print(table)
    if data["rejections"]:
        table = _table("Refused webhook requests (endpoint, reason)", ("endpoint", "reason", "count", "last"))
        for endpoint, reason, total, last in data["rejections"]:
            table.add_row(endpoint, reason, str(total), last.isoformat(timespec="seconds"))
        console.print(table)
    write_back(data.get("write_back", {}), data.get("write_back_problems", []))
    if data.get("bounces"):
        bounces(data["bounces"])
    if data["problems"]:
        table = _table(
            "Quarantined: not processed (a new version is tried again)", ("source", "resource", "problem", "recorded")
        )
        for source, seen in data["problems"]:
            when = seen.seen_at.isoformat(timespec="seconds") if seen.seen_at else ""
            table.add_row(source, escape(_version(seen)), escape(seen.problem or ""), when)
        console.print(table)


def bounces(entries: list[Any]) -> None:
    """Addresses suppressed after bounces (masked), per source and patient."""
    table = _table(f"Suppressed after bounces ({len(entries)})", ("source", "patient", "address", "why", "since"))
    for source, patient, hint, reason, since in entries:
        when = since.isoformat(timespec="minutes") if since else ""
        table.add_row(source, escape(patient), escape(hint), escape(reason or ""), when)
    console.print(table)


def write_back(counts: dict[tuple[str, str], int], problems: list[Any]) -> None:
    """Writes to the EHR (Communications): counts by kind and state, then the refused and the retrying."""
    if counts:
        summary = ", ".join(f"{kind} {state} {count}" for (kind, state), count in sorted(counts.items()))
        console.print(f"write-back to the EHR: {summary}", markup=False)
    if problems:
        table = _table(
            "Write-back problems (refused, or retrying)", ("kind", "source", "state", "tries", "key", "reason")
        )
        for p in problems:
            table.add_row(
                p.kind, p.source, p.state, str(p.attempts), escape(p.notification_key), escape(p.reason or "")
            )
        console.print(table)


def _version(seen: SeenVersion) -> str:
    return f"{seen.resource_type}/{seen.resource_id} v{seen.version}"


def optouts(entries: list[OptOut]) -> None:
    columns = ("kind", "value (masked)", "category", "by", "added", "note", "key")
    table = _table(f"Opt-outs ({len(entries)})", columns)
    for entry in entries:
        table.add_row(
            entry.kind,
            entry.hint,
            entry.category or "every email",
            entry.origin,
            entry.created_at.isoformat(timespec="minutes"),
            escape(entry.note or ""),
            entry.key_id or "none: run `connector optout rekey`",
        )
    console.print(table)


def styled(label: str, style: str, rest: str = "") -> Text:
    """`label` in `style` then `rest`, as text (never read as markup): colour on a terminal, plain otherwise."""
    text = Text(label, style=style)
    if rest:
        text.append(" " + rest)
    return text


def checks(found: list[Check]) -> None:
    """`connector check`: one line per check, its mark green or red on a terminal, then the tally."""
    for check in found:
        text = Text(preflight.line(check))
        text.stylize("green" if check.ok else "red", 0, 1)
        console.print(text, soft_wrap=True)  # one line per check, however long, when piped
    console.print(styled(preflight.summary(found), "green" if preflight.passed(found) else "red"))


def rekeyed(result: Rekeyed) -> None:
    console.print(
        f"keyed {result.converted} opt-out(s) with {result.key_id!r}"
        + (f"; {result.merged} already there under it, merged" if result.merged else ""),
        markup=False,
    )
    for key_id, count in sorted(result.unknown.items()):
        console.print(
            f"warning: {count} opt-out(s) keyed with {key_id!r}, which optout.keys no longer lists: "
            "they match nobody until the key is put back",
            markup=False,
        )
