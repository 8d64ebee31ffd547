"""Counters for `GET /metrics` (Prometheus text format). Label values are names of states, events,
sources and mappings, never patient data."""

from __future__ import annotations

from collections import Counter

_COUNTS: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
_HELP = {
    "connector_notifications_total": "Notifications that reached a state, by state.",
    "connector_mailer_state_changes_total": "Mailer gate changes: paused (429), broken (circuit open), running.",
    "connector_webhook_events_total": "Paubox webhook events received, by event name and result.",
    "connector_requests_rejected_total": "Requests refused by the web endpoints, by endpoint and reason.",
    "connector_in_doubt_alerts_total": "In-doubt notifications reported to operators after the wait.",
    "connector_poll_failures_total": "Source polls that failed, by source.",
}


_REFUSED: Counter[tuple[str, str]] = Counter()  # not yet written to the ledger


def inc(name: str, amount: int = 1, **labels: str) -> None:
    _COUNTS[(name, tuple(sorted(labels.items())))] += amount


def refused(endpoint: str, reason: str) -> None:
    """A refused request: counted for /metrics and kept for the ledger (`connector status`)."""
    inc("connector_requests_rejected_total", endpoint=endpoint, reason=reason)
    _REFUSED[(endpoint, reason)] += 1


def take_refused() -> dict[tuple[str, str], int]:
    """The refusals counted since the last call (the daemon writes them to the ledger)."""
    taken = dict(_REFUSED)
    _REFUSED.clear()
    return taken


def value(name: str, **labels: str) -> int:
    return _COUNTS[(name, tuple(sorted(labels.items())))]


def exposition() -> str:
    lines: list[str] = []
    for name in sorted({n for n, _ in _COUNTS} | set(_HELP)):
        lines += [f"# HELP {name} {_HELP.get(name, name)}", f"# TYPE {name} counter"]
        for (metric, labels), count in sorted(_COUNTS.items()):
            if metric == name:
                rendered = ",".join(f'{k}="{v}"' for k, v in labels)
                lines.append(f"{name}{{{rendered}}} {count}" if rendered else f"{name} {count}")
    return "\n".join(lines) + "\n"
