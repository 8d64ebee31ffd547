"""Tables and summaries printed by the CLI (stdout). Keys and states, never message contents."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from connector.commands import DryRun
from connector.daemon import CycleReport
from connector.ledger import NotificationRecord
from connector.models import State
from connector.pipeline import ReplayItem

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def cycle(report: CycleReport) -> None:
    for poll in report.polls:
        if poll.error:
            console.print(f"[red]source {poll.source}: FAILED[/red] {poll.error}")
        else:
            console.print(f"source {poll.source}: {poll.pages} page(s), {poll.resources} appointment(s), "
                          f"{poll.new_versions} new version(s), {poll.invalid} invalid, "
                          f"{poll.inserted} new notification(s)")
    if report.dispatch:
        steps = ", ".join(f"{v} {k}" for k, v in report.dispatch.steps.items() if v) or "nothing due"
        console.print(f"dispatch: {steps}")
        if report.dispatch.paused:
            console.print(f"[red]sending paused:[/red] {report.dispatch.paused}")


def _verdict(item: ReplayItem, final: NotificationRecord | None) -> str:
    if item.existing is not None:
        return f"suppressed: already {item.existing.state.value}"
    if item.notification.state is State.SKIPPED:
        return f"skipped: {item.notification.reason}"
    if final is not None and item.inserted:
        return final.state.value + (f": {final.reason}" if final.reason else "")
    return "would send" if item.notification.state is State.PENDING else item.notification.state.value


def replay_items(items: list[ReplayItem], final: dict[str, NotificationRecord] | None, title: str) -> None:
    table = Table(title=title, title_justify="left")
    for column in ("mapping", "resource", "patient", "key", "result"):
        table.add_column(column, overflow="fold")
    for item in items:
        n = item.notification
        table.add_row(n.mapping, f"{n.resource_type}/{n.resource_id} v{n.resource_version}",
                      n.patient_id or "-", n.key, _verdict(item, (final or {}).get(n.key)))
    console.print(table)
    counts: dict[str, int] = {}
    for item in items:
        word = _verdict(item, (final or {}).get(item.notification.key)).split(":")[0]
        counts[word] = counts.get(word, 0) + 1
    console.print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no notifications")


def dry_run(result: DryRun) -> None:
    for error in result.errors:
        console.print(f"[red]{error}[/red]")
    replay_items(result.planned, None, "Next poll would plan (nothing committed)")
    table = Table(title="Due now, would be sent", title_justify="left")
    for column in ("id", "mapping", "resource", "key", "due"):
        table.add_column(column, overflow="fold")
    for n in result.due:
        table.add_row(str(n.id), n.mapping, f"{n.resource_type}/{n.resource_id}", n.key, n.due_at.isoformat())
    console.print(table)


def status(data: dict[str, Any]) -> None:
    table = Table(title="Notifications", title_justify="left")
    table.add_column("state")
    table.add_column("count", justify="right")
    for state, count in data["counts"].items():
        table.add_row(state.value, str(count))
    console.print(table)
    for source, value in sorted(data["cursors"].items()):
        console.print(f"source {source}: cursor (newest lastUpdated committed) {value.isoformat()}")
    if data["attention"]:
        table = Table(title="Needing attention (in_doubt, failed)", title_justify="left")
        for column in ("id", "state", "mapping", "resource", "key", "reason", "updated"):
            table.add_column(column, overflow="fold")
        for n in data["attention"]:
            table.add_row(str(n.id), n.state.value, n.mapping, f"{n.resource_type}/{n.resource_id}", n.key,
                          n.reason or "", n.updated_at.isoformat(timespec="seconds"))
        console.print(table)
    if data["problems"]:
        table = Table(title="Invalid resources (skipped)", title_justify="left")
        for column in ("source", "resource", "problem"):
            table.add_column(column, overflow="fold")
        for source, seen in data["problems"]:
            table.add_row(source, f"{seen.resource_type}/{seen.resource_id} v{seen.version}", seen.problem or "")
        console.print(table)
