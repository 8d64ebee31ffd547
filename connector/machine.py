"""Machine-readable output of the CLI: the JSON shapes of `status --json` and `replay --json`, and the rows
of a replay written to a file (`--output`, JSON lines or CSV). The shapes are documented in the README
("Machine-readable output") and kept stable: fields are added, never renamed or removed.

Rows carry ids, keys, states and reasons, as the tables do; never an address, a name or a message."""

from __future__ import annotations

import csv
import io
import json
from typing import TYPE_CHECKING, Any

from connector.files import write_private
from connector.models import State

if TYPE_CHECKING:
    from pathlib import Path

    from connector.ledger import NotificationRecord, SeenVersion
    from connector.models import PlanNote
    from connector.results import Replayed, ReplayItem

ROW_FIELDS = ("mapping", "resource", "patient", "due", "key", "result", "detail")


def verdict(item: ReplayItem, final: NotificationRecord | None, verdicts: dict[str, str]) -> str:
    """What happened (a replay) or would happen (a dry run) to one planned notification, in words."""
    n = item.notification
    if item.inserted and final is not None:
        return final.state.value + (f": {final.reason}" if final.reason else "")
    if item.existing is not None and not (item.existing.state is State.CANCELLED and n.state is State.PENDING):
        return f"suppressed: already {item.existing.state.value}"
    if n.state is State.SKIPPED:
        return f"skipped: {n.reason}"
    return verdicts.get(n.key, "would send")


def category(detail: str) -> str:
    """The result a detail counts under: `skipped: no address` → `skipped`, `would send (now)` → `would send`."""
    return detail.split(":")[0].split(" (")[0]


def rows(
    items: list[ReplayItem],
    notes: list[tuple[str, PlanNote]],
    final: dict[str, NotificationRecord],
    verdicts: dict[str, str],
    quarantined: list[tuple[str, SeenVersion]],
) -> list[dict[str, str]]:
    """One row per planned notification, per mapping that chose not to send, per quarantined version."""
    found: list[dict[str, str]] = []
    for item in items:
        n = item.notification
        detail = verdict(item, final.get(n.key), verdicts)
        resource = f"{n.resource_type}/{n.resource_id} v{n.resource_version}"
        due = n.due_at.isoformat(timespec="minutes")
        found.append(_row(n.mapping, resource, n.patient_id, due, n.key, category(detail), detail))
    for appointment_id, note in notes:
        found.append(
            _row(note.mapping, f"Appointment/{appointment_id}", note.patient_id, "", "", "not planned", note.message)
        )
    for _source, seen in quarantined:
        resource = f"{seen.resource_type}/{seen.resource_id} v{seen.version}"
        found.append(_row("", resource, "", "", "", "quarantined", f"quarantined: {seen.problem}"))
    return found


def _row(
    mapping: str, resource: str, patient: str | None, due: str, key: str, result: str, detail: str
) -> dict[str, str]:
    return dict(zip(ROW_FIELDS, (mapping, resource, patient or "", due, key, result, detail), strict=True))


def summary(found: list[dict[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in found:
        counts[row["result"]] = counts.get(row["result"], 0) + 1
    return dict(sorted(counts.items()))


def replay_rows(result: Replayed, dry_run: bool) -> list[dict[str, str]]:
    return rows(result.items, result.notes, {} if dry_run else result.final, result.verdicts, result.quarantined)


def replay_json(result: Replayed, dry_run: bool) -> dict[str, Any]:
    found = replay_rows(result, dry_run)
    return {"dry_run": dry_run, "summary": summary(found), "items": found}


def write_rows(path: Path, found: list[dict[str, str]]) -> str:
    """Write rows to `path` (0600: they hold patient ids): CSV when it ends in .csv, else JSON lines.
    Returns the format written."""
    if path.suffix.lower() == ".csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=ROW_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(found)
        write_private(path, buffer.getvalue())
        return "CSV"
    write_private(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in found))
    return "JSON lines"


def notification_json(n: NotificationRecord) -> dict[str, Any]:
    return {
        "id": n.id,
        "key": n.key,
        "state": n.state.value,
        "source": n.source,
        "mapping": n.mapping,
        "event": n.event,
        "resource": f"{n.resource_type}/{n.resource_id}",
        "version": n.resource_version,
        "patient": n.patient_id,
        "reason": n.reason,
        "attempts": n.attempts,
        "resends": n.resends,
        "due_at": n.due_at.isoformat(),
        "updated_at": n.updated_at.isoformat(),
        "delivery_status": n.delivery_status,
    }


def status_json(data: dict[str, Any]) -> dict[str, Any]:
    """The shape of `connector status --json`."""
    return {
        "health": [{"component": f.component, **f.as_json()} for f in data["health"]],
        "counts": {state.value: count for state, count in data["counts"].items()},
        "cursors": {source: value.isoformat() for source, value in sorted(data["cursors"].items())},
        "quarantined": dict(sorted(data["quarantined"].items())),
        "attention": [notification_json(n) for n in data["attention"]],
        "suppressed": [notification_json(n) for n in data["suppressed"]],
        "problems": [
            {
                "source": source,
                "resource": f"{seen.resource_type}/{seen.resource_id}",
                "version": seen.version,
                "problem": seen.problem,
                "recorded": seen.seen_at.isoformat() if seen.seen_at else None,
            }
            for source, seen in data["problems"]
        ],
        "rejections": [
            {"endpoint": endpoint, "reason": reason, "count": total, "last": last.isoformat()}
            for endpoint, reason, total, last in data["rejections"]
        ],
    }
