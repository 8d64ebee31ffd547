"""Tables and summaries printed by the CLI (stdout). Keys and states, never message contents."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from connector.models import PlanNote, State

if TYPE_CHECKING:
    from connector.health import Finding
    from connector.ledger import NotificationRecord, OptOut, Rekeyed, SeenVersion
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
            console.print(f"[red]source {poll.source}: FAILED[/red] {poll.error}")
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
            console.print(f"[red]sending paused:[/red] {report.dispatch.paused}", markup=False)
        if report.dispatch.waiting:
            console.print(f"sending waits: {report.dispatch.waiting}", markup=False)


def _verdict(item: ReplayItem, final: NotificationRecord | None, verdicts: dict[str, str]) -> str:
    n = item.notification
    if item.inserted and final is not None:
        return final.state.value + (f": {final.reason}" if final.reason else "")
    if item.existing is not None and not (item.existing.state is State.CANCELLED and n.state is State.PENDING):
        return f"suppressed: already {item.existing.state.value}"
    if n.state is State.SKIPPED:
        return f"skipped: {n.reason}"
    return verdicts.get(n.key, "would send")


def _table(title: str, columns: tuple[str, ...]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def replay_items(
    items: list[ReplayItem],
    notes: list[tuple[str, PlanNote]],
    final: dict[str, NotificationRecord],
    verdicts: dict[str, str],
    title: str,
    quarantined: list[tuple[str, SeenVersion]],
) -> None:
    table = _table(title, ("mapping", "resource", "patient", "due", "key", "result"))
    counts: dict[str, int] = {}
    for item in items:
        n = item.notification
        verdict = _verdict(item, final.get(n.key), verdicts)
        counts[verdict.split(":")[0].split(" (")[0]] = counts.get(verdict.split(":")[0].split(" (")[0], 0) + 1
        table.add_row(
            n.mapping,
            f"{n.resource_type}/{n.resource_id} v{n.resource_version}",
            n.patient_id or "-",
            n.due_at.isoformat(timespec="minutes"),
            n.key,
            verdict,
        )
    for appointment_id, note in notes:
        table.add_row(note.mapping, f"Appointment/{appointment_id}", note.patient_id or "-", "", "", note.message)
        counts["not planned"] = counts.get("not planned", 0) + 1
    for _source, seen in quarantined:
        table.add_row("-", escape(_version(seen)), "-", "", "", escape(f"quarantined: {seen.problem}"))
        counts["quarantined"] = counts.get("quarantined", 0) + 1
    console.print(table)
    console.print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no notifications")


def replayed(result: Replayed, dry_run: bool) -> None:
    replay_items(
        result.items,
        result.notes,
        {} if dry_run else result.final,
        result.verdicts,
        "Replay (dry run: nothing is recorded or sent)" if dry_run else "Replay",
        result.quarantined,
    )


def dry_run(result: DryRun) -> None:
    for error in result.errors:
        console.print(f"[red]{error}[/red]", markup=False)
    replay_items(
        result.planned,
        result.notes,
        {},
        result.verdicts,
        "Next poll would plan (nothing committed)",
        result.quarantined,
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
                f"{n.resource_type}/{n.resource_id}",
                n.key,
                n.reason or "",
                n.updated_at.isoformat(timespec="seconds"),
            )
        console.print(table)
    if data["suppressed"]:
        table = _table(
            "Recently skipped or withdrawn (with reasons)", ("id", "state", "mapping", "resource", "patient", "reason")
        )
        for n in data["suppressed"]:
            table.add_row(
                str(n.id), n.state.value, n.mapping, f"{n.resource_type}/{n.resource_id}", n.patient_id, n.reason or ""
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
        table.add_row(source, patient, hint, reason or "", since.isoformat(timespec="minutes") if since else "")
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
    table = _table(f"Opt-outs ({len(entries)})", ("kind", "value (masked)", "added", "note", "key"))
    for entry in entries:
        table.add_row(
            entry.kind,
            entry.hint,
            entry.created_at.isoformat(timespec="minutes"),
            entry.note or "",
            entry.key_id or "none: run `connector optout rekey`",
        )
    console.print(table)


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
