"""Prometheus metrics of a connector process (prometheus-client), in a registry the process owns.

Counters and histograms are updated where things happen (`metrics.inc`, `metrics.observe`); the gauges
that describe the ledger and the health of each part are computed when `/metrics` is read
(connector.monitor). Label values are names of states, events, sources, endpoints, reasons and mappings,
never patient data.

`Runtime.open` installs a fresh `Metrics` (its own `CollectorRegistry`, never prometheus-client's global
one), so each runtime, and each test, counts from zero.
"""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

COUNTERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "connector_notifications_total": ("Notifications that reached a state after a send, by state.", ("state",)),
    "connector_mailer_state_changes_total": (
        "Mailer gate changes: paused (429), broken (circuit open), probing, running.",
        ("state",),
    ),
    "connector_webhook_events_total": (
        "Paubox webhook events received, by event name and result.",
        ("event", "result"),
    ),
    "connector_requests_rejected_total": (
        "Requests refused by the web endpoints, by endpoint and reason.",
        ("endpoint", "reason"),
    ),
    "connector_in_doubt_alerts_total": ("In-doubt notifications reported to operators after the wait.", ()),
    "connector_patient_actions_total": (
        "Patients' link POSTs (confirm, cancel, unsubscribe), by action and outcome.",
        ("action", "outcome"),
    ),
    "connector_poll_failures_total": ("Source polls that failed, by source.", ("source",)),
    "connector_crm_events_total": ("CRM events committed to the inbox, by source.", ("source",)),
    "connector_write_backs_total": (
        "Writes to the EHR (Communications) by outcome: written, found (already there), retry, refused.",
        ("outcome",),
    ),
    "connector_quarantined_total": ("Resource versions or events set aside as unprocessable, by source.", ("source",)),
}
HISTOGRAMS: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = {
    "connector_poll_duration_seconds": (
        "How long source polls took (completed or failed; polls left to another replica are not counted).",
        ("source",),
        (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
    ),
    "connector_send_duration_seconds": (
        "How long requests to the mailer took (one message, or one bulk request).",
        (),
        (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    ),
}


class Metrics:
    """The counters and histograms of one process, in its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._counters = {
            name: Counter(name, text, labels, registry=self.registry) for name, (text, labels) in COUNTERS.items()
        }
        self._histograms = {
            name: Histogram(name, text, labels, buckets=buckets, registry=self.registry)
            for name, (text, labels, buckets) in HISTOGRAMS.items()
        }
        self._refused: Tally[tuple[str, str]] = Tally()  # not yet written to the ledger

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        counter = self._counters.get(name)
        if counter is None:  # a counter not declared above: declared on first use, with these labels
            counter = self._counters[name] = Counter(name, name, sorted(labels), registry=self.registry)
        (counter.labels(**labels) if labels else counter).inc(amount)

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        histogram = self._histograms[name]
        (histogram.labels(**labels) if labels else histogram).observe(seconds)

    def refused(self, endpoint: str, reason: str) -> None:
        self.inc("connector_requests_rejected_total", endpoint=endpoint, reason=reason)
        self._refused[(endpoint, reason)] += 1

    def take_refused(self) -> dict[tuple[str, str], int]:
        taken = dict(self._refused)
        self._refused.clear()
        return taken

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when never counted): `connector_notifications_total`, state=sent."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


_active = Metrics()


def install(fresh: Metrics) -> Metrics:
    """Make `fresh` the process's metrics (a runtime's); the module functions below count into it."""
    global _active  # one set of metrics per process, replaced as a whole by each runtime
    _active = fresh
    return fresh


def active() -> Metrics:
    return _active


def inc(name: str, amount: int = 1, **labels: str) -> None:
    _active.inc(name, amount, **labels)


def observe(name: str, seconds: float, **labels: str) -> None:
    _active.observe(name, seconds, **labels)


def refused(endpoint: str, reason: str) -> None:
    """A refused request: counted for /metrics and kept for the ledger (`connector status`)."""
    _active.refused(endpoint, reason)


def take_refused() -> dict[tuple[str, str], int]:
    """The refusals counted since the last call (the daemon writes them to the ledger)."""
    return _active.take_refused()


def value(name: str, **labels: str) -> float:
    return _active.value(name, **labels)
