"""The verdict of a chaos run (pure): what the sandbox accepted, per key, against the ledger's rows, per
expected appointment; the printed table and the details of every problem."""

from __future__ import annotations

import csv
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SOURCE, MAPPING = "ehr", "appointment-booked"
FINAL = ("sent", "failed", "in_doubt", "skipped", "cancelled")
UNFINISHED = ("pending", "sending")
WEBHOOK_REASON = "confirmed by a Paubox webhook"
EXIT_OK, EXIT_DUPLICATE_OR_LOSS, EXIT_USAGE, EXIT_UNFINISHED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


@dataclass(frozen=True)
class Row:
    key: str
    state: str
    reason: str | None
    attempts: int
    resends: int
    tracking_id: str | None


def appointment_of(key: str) -> str | None:
    """The appointment id in a key `ehr:appointment-booked:<id>|booked|…`, or None for another key."""
    prefix = f"{SOURCE}:{MAPPING}:"
    return key[len(prefix) :].split("|", 1)[0] if key.startswith(prefix) else None


# -- the verdict (pure) --------------------------------------------------------------------------------


@dataclass
class Result:
    expected: int = 0
    sent_once: int = 0
    duplicates: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)
    in_doubt_accepted: int = 0
    in_doubt_not_accepted: int = 0
    in_doubt_reasons: Counter[str] = field(default_factory=Counter)
    resolved_by_webhook: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    failed_but_accepted: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    states: Counter[str] = field(default_factory=Counter)
    unexpected_keys: int = 0

    @property
    def in_doubt(self) -> int:
        return self.in_doubt_accepted + self.in_doubt_not_accepted

    def exit_status(self) -> int:
        if self.duplicates or self.lost:
            return EXIT_DUPLICATE_OR_LOSS
        return EXIT_UNFINISHED if self.unfinished else EXIT_OK


def _short(reason: str | None) -> str:
    return re.sub(r"\s+", " ", reason or "(no reason)")[:100]


def analyse(expected: Sequence[str], rows: Sequence[Row], per_key: dict[str, int]) -> Result:
    """Compare what the sandbox accepted (per key) with the ledger, per expected appointment id."""
    result = Result(expected=len(expected))
    wanted = set(expected)
    accepted: Counter[str] = Counter()
    for key, count in per_key.items():
        aid = appointment_of(key)
        if aid in wanted:
            accepted[aid] += count
        else:
            result.unexpected_keys += count
    by_appointment: dict[str, list[Row]] = {}
    for row in rows:
        aid = appointment_of(row.key)
        if aid in wanted:
            by_appointment.setdefault(aid, []).append(row)
    for aid in expected:
        times = accepted[aid]
        mine = by_appointment.get(aid, [])
        states = {r.state for r in mine}
        result.states.update(r.state for r in mine)
        for row in mine:
            if row.reason and row.reason.startswith(WEBHOOK_REASON):
                result.resolved_by_webhook += 1
            if row.state == "failed":
                result.failed[_short(row.reason)] += 1
                result.failed_but_accepted += times > 0
            elif row.state == "skipped":
                result.skipped[_short(row.reason)] += 1
            elif row.state == "in_doubt":
                result.in_doubt_reasons[_short(row.reason)] += 1
                if times:
                    result.in_doubt_accepted += 1
                else:
                    result.in_doubt_not_accepted += 1
        if times > 1:
            result.duplicates.append(aid)
        elif times == 1:
            result.sent_once += 1
        if states & set(UNFINISHED):
            result.unfinished.append(aid)
        elif times == 0 and not any(r.state == "in_doubt" or (r.state == "failed" and r.reason) for r in mine):
            result.lost.append(aid)
    return result


def table(
    result: Result,
    *,
    elapsed: float,
    kills: int,
    planned_kills: int,
    crashes: int,
    received: int,
    accepted: int,
    title: str,
) -> str:
    lines = [title, ""]

    def row(label: str, value: object, note: str = "") -> None:
        lines.append(f"  {label:<22}{value!s:>8}" + (f"   {note}" if note else ""))

    row("expected", result.expected)
    row("sent once", result.sent_once)
    row("duplicates", len(result.duplicates))
    row("lost", len(result.lost))
    row("unfinished", len(result.unfinished), "pending/sending when the run ended")
    row(
        "in_doubt",
        result.in_doubt,
        f"accepted by the sandbox: {result.in_doubt_accepted}, never accepted: {result.in_doubt_not_accepted}",
    )
    for reason, count in result.in_doubt_reasons.most_common():
        lines.append(f"  {'':<22}{count:>8}   {reason}")
    row("resolved by webhook", result.resolved_by_webhook)
    row(
        "failed",
        sum(result.failed.values()),
        f"of which the sandbox accepted: {result.failed_but_accepted}" if result.failed else "",
    )
    for reason, count in result.failed.most_common():
        lines.append(f"  {'':<22}{count:>8}   {reason}")
    row("skipped", sum(result.skipped.values()))
    for reason, count in result.skipped.most_common():
        lines.append(f"  {'':<22}{count:>8}   {reason}")
    row("ledger states", "", ", ".join(f"{s} {n}" for s, n in sorted(result.states.items())) or "no rows")
    row(
        "send requests",
        received,
        f"sandbox accepted {accepted} message(s)"
        + (f", {result.unexpected_keys} under unexpected keys" if result.unexpected_keys else ""),
    )
    row("elapsed seconds", f"{elapsed:.1f}")
    row(
        "kills done",
        kills,
        f"of {planned_kills}" + (f"; daemon exits the harness did not cause: {crashes}" if crashes else ""),
    )
    return "\n".join(lines)


def write_ledger_csv(path: Path, rows: Sequence[Row], per_key: dict[str, int]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "state", "reason", "attempts", "resends", "tracking_id", "sandbox_accepted"])
        for r in rows:
            writer.writerow(
                [r.key, r.state, r.reason or "", r.attempts, r.resends, r.tracking_id or "", per_key.get(r.key, 0)]
            )


def details(result: Result, rows: Sequence[Row], per_key: dict[str, int]) -> Iterator[str]:
    """The ledger rows and sandbox counts of every duplicate, lost or unfinished appointment (first 20 each)."""
    by_appointment: dict[str, list[Row]] = {}
    for row in rows:
        by_appointment.setdefault(appointment_of(row.key) or "", []).append(row)
    for label, ids in (("DUPLICATE", result.duplicates), ("LOST", result.lost), ("unfinished", result.unfinished)):
        for aid in ids[:20]:
            counts = {k: v for k, v in per_key.items() if appointment_of(k) == aid}
            ledger = [
                f"{r.key} state={r.state} attempts={r.attempts} resends={r.resends} reason={r.reason!r}"
                for r in by_appointment.get(aid, [])
            ] or ["no ledger row"]
            yield f"{label} Appointment/{aid}: sandbox accepted {counts or 0}; ledger: {'; '.join(ledger)}"
