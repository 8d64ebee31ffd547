"""`connector check`, the pure half: what each probe's answer means (a `Check`: passed or not, what was
seen, what to do), and the checks as lines or as JSON. The probes themselves (connector.commands.check)
hand their answers in as values; nothing here reads or writes.

A check's text names parts of the config, hosts, HTTP statuses and revisions, never a secret or patient data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from email.utils import parseaddr
from typing import Any
from urllib.parse import parse_qs, urlsplit

OK_MARK, FAIL_MARK = "✓", "✗"
RESERVED_DOMAINS = ("example.org", "example.com", "example.net")  # RFC 2606: never real mail


@dataclass(frozen=True)
class Check:
    """One line of `connector check`: `part` (ledger, source <name>, paubox, smtp, webhook <where>), what was
    checked, whether it passed, what was seen, and (when it failed) what to do."""

    part: str
    name: str
    ok: bool
    detail: str
    fix: str | None = None


def passed(checks: list[Check]) -> bool:
    return bool(checks) and all(c.ok for c in checks)


def line(check: Check) -> str:
    """`✓ ledger: migrated: at revision 0009 (head)` or `✗ ... — what to do`."""
    text = f"{OK_MARK if check.ok else FAIL_MARK} {check.part}: {check.name}: {check.detail}"
    return text + (f" — {check.fix}" if check.fix and not check.ok else "")


def summary(checks: list[Check]) -> str:
    failed = sum(not c.ok for c in checks)
    return f"all {len(checks)} checks passed" if not failed else f"{failed} of {len(checks)} checks failed"


def as_json(checks: list[Check]) -> dict[str, Any]:
    return {"ok": passed(checks), "checks": [asdict(c) for c in checks]}


def skipped(part: str, name: str, why: str) -> Check:
    """A check that could not run because an earlier one failed: it fails too (nothing was shown to work)."""
    return Check(part, name, False, f"not checked: {why}", "fix the check above first")


# -- the ledger ------------------------------------------------------------------------------------------


def revision(current: str | None, head: str, empty: bool) -> Check:
    if current == head:
        return Check("ledger", "migrated", True, f"schema at revision {head} (this version's head)")
    if current is None and empty:
        return Check("ledger", "migrated", False, "the database holds no ledger yet", "run `connector db upgrade`")
    return Check(
        "ledger",
        "migrated",
        False,
        f"schema at revision {current or 'none'}, this version needs {head}",
        "back up the database, then run `connector db upgrade`",
    )


# -- FHIR sources ----------------------------------------------------------------------------------------


def capability(part: str, statement: Any) -> Check:
    """The answer to `GET metadata`: a CapabilityStatement of FHIR R4."""
    if not isinstance(statement, dict) or statement.get("resourceType") != "CapabilityStatement":
        return Check(
            part,
            "CapabilityStatement",
            False,
            "GET metadata did not return a CapabilityStatement",
            f"check sources.{part.removeprefix('source ')}.base_url (it ends where /metadata and /Appointment start)",
        )
    version = str(statement.get("fhirVersion") or "")
    if version and not version.startswith("4.0"):
        return Check(
            part,
            "CapabilityStatement",
            False,
            f"the server speaks FHIR {version}, not R4 (4.0.x)",
            "point base_url at the server's R4 endpoint",
        )
    return Check(part, "CapabilityStatement", True, f"read (FHIR {version or 'version not stated'})")


def _appointment(statement: Any) -> dict[str, Any] | None:
    rests = statement.get("rest") if isinstance(statement, dict) else None
    for rest in rests if isinstance(rests, list) else []:
        resources = rest.get("resource") if isinstance(rest, dict) else None
        for resource in resources if isinstance(resources, list) else []:
            if isinstance(resource, dict) and resource.get("type") == "Appointment":
                return resource
    return None


NEEDS = {  # strategy: (interaction, search parameter the strategy relies on)
    "last-updated": ("search-type", "_lastUpdated"),
    "history": ("history-type", None),
    "date-window": ("search-type", "date"),
}
OTHERS = "choose another sources.{name}.strategy (last-updated, history, date-window)"


def strategy_declared(name: str, strategy: str, statement: Any) -> Check:
    """Whether the CapabilityStatement says the server can do what `strategy` asks. Only what it states
    clearly fails the check: a search parameter it does not list (common for `_lastUpdated`) is left to the
    one-page probe."""
    part, what = f"source {name}", f"strategy {strategy} declared"
    interaction, parameter = NEEDS[strategy]
    appointment = _appointment(statement)
    if appointment is None:
        return Check(
            part, what, False, "the CapabilityStatement lists no Appointment resource", OTHERS.format(name=name)
        )
    codes = {i.get("code") for i in appointment.get("interaction") or [] if isinstance(i, dict)}
    if interaction not in codes:
        return Check(
            part, what, False, f"Appointment does not list the {interaction} interaction", OTHERS.format(name=name)
        )
    params = {p.get("name") for p in appointment.get("searchParam") or [] if isinstance(p, dict)}
    if parameter is not None and parameter not in params:
        return Check(part, what, True, f"{interaction} listed; {parameter} not listed (the probe below decides)")
    return Check(part, what, True, f"{interaction}{f' with {parameter}' if parameter else ''} listed")


def probe(name: str, strategy: str, self_link: str | None, count: int, on_ignored_filter: str) -> Check:
    """The first page of a poll as `strategy` reads it. For last-updated, the page's self link must list
    `_lastUpdated` (a server that ignores it would make every poll read every appointment)."""
    part, what = f"source {name}", "one-page probe"
    seen = f"{count} appointment(s) on the first page"
    if strategy == "last-updated":
        used = parse_qs(urlsplit(self_link or "").query)
        if "_lastUpdated" not in used:
            if on_ignored_filter == "fail":
                return Check(
                    part,
                    what,
                    False,
                    f"{seen}, but the server ignored _lastUpdated (its self link does not list it)",
                    f"set sources.{name}.strategy: history or date-window, or on_ignored_filter: scan",
                )
            return Check(part, what, True, f"{seen}; _lastUpdated ignored, every poll reads everything (scan)")
        if not any(v.lower() == "_lastupdated" for v in used.get("_sort", [])):
            return Check(part, what, True, f"{seen}; _sort ignored (the cursor moves once per poll)")
    return Check(part, what, True, seen)


def smart_token(name: str, missing: list[str]) -> Check:
    part = f"source {name}"
    if missing:
        return Check(
            part,
            "SMART token",
            False,
            f"granted, without {' '.join(missing)}",
            "ask the EHR to register these scopes for the client, or remove them from the config",
        )
    return Check(part, "SMART token", True, "granted with every scope asked for")


# -- Paubox ------------------------------------------------------------------------------------------------


def paubox_key(status: int, json_body: bool) -> Check:
    """The answer to a receipt lookup of an id that cannot exist: 404 with Paubox's JSON error means the key
    was accepted and the message was (rightly) not found; 401/403 means the key was refused; a 404 that is
    not JSON comes from a gateway (a wrong base URL or username)."""
    what = "API key"
    if (status == 404 and json_body) or status == 200:
        return Check("paubox", what, True, f"accepted (a receipt lookup of an unknown id answered {status})")
    if status in (401, 403):
        return Check(
            "paubox",
            what,
            False,
            f"refused (HTTP {status})",
            "check delivery.paubox.api_key, and that delivery.paubox.username (or base_url) is the key's account",
        )
    if status == 404:
        return Check(
            "paubox",
            what,
            False,
            "not checked: the URL answered 404 without Paubox's JSON (no such API there)",
            "check delivery.paubox.base_url / username",
        )
    if status >= 500:
        return Check("paubox", what, False, f"Paubox answered HTTP {status}", "try again later; status.paubox.com")
    return Check("paubox", what, False, f"unexpected HTTP {status}", "check delivery.paubox.base_url and auth_scheme")


def sender(from_address: str, reply_to: str | None) -> Check:
    """`from` (and `reply_to`) are addresses of one domain: Paubox sends only from the verified domain of
    the key."""
    _, address = parseaddr(from_address)
    domain = address.rpartition("@")[2].lower() if "@" in address else ""
    if not domain or "." not in domain:
        return Check(
            "paubox",
            "sender domain",
            False,
            "delivery.from has no address with a domain",
            "e.g. from: Clinic <appointments@your-domain>",
        )
    if reply_to:
        _, other = parseaddr(reply_to)
        if other.rpartition("@")[2].lower() != domain:
            return Check(
                "paubox",
                "sender domain",
                False,
                f"delivery.reply_to is not on {domain}",
                "Paubox refuses a reply-to outside the verified domain: use an address on the from domain",
            )
    note = " (a reserved example domain: the sandbox only)" if domain.endswith(RESERVED_DOMAINS) else ""
    return Check("paubox", "sender domain", True, f"{domain}{note}; it must be the verified domain of the API key")


# -- webhooks ----------------------------------------------------------------------------------------------


def public_url(part: str, status: int) -> Check:
    """A GET to a webhook's public URL (the endpoints take POST): any answer but 404 or a gateway error
    means requests reach a server there."""
    what = "public URL"
    if status == 404:
        return Check(
            part, what, False, "answered 404", "check the path: /fhir/<source>/notify or /webhooks/crm/<source>"
        )
    if status in (502, 503, 504):
        return Check(
            part,
            what,
            False,
            f"a proxy answered {status}: connector behind it does not",
            "start `connector run` (server: configured), and check the proxy's upstream",
        )
    return Check(part, what, True, f"reachable (GET answered {status})")
