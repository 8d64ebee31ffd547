"""Opt-outs: who must not be written to, by patient identifier or email address.

Values are stored as SHA-256 digests with a masked hint for people ("r…@example.org", "urn:oid:…|1…5"),
never in clear, and compared case-insensitively for addresses.
"""

from __future__ import annotations

import hashlib
from typing import Literal

Kind = Literal["identifier", "email"]


def normalise(kind: Kind, value: str) -> str:
    value = value.strip()
    return value.lower() if kind == "email" else value


def digest(kind: Kind, value: str) -> str:
    return hashlib.sha256(f"{kind}:{normalise(kind, value)}".encode()).hexdigest()


def hint(kind: Kind, value: str) -> str:
    value = normalise(kind, value)
    if kind == "email":
        local, _, domain = value.partition("@")
        return f"{local[:1]}…@{domain}"
    system, _, code = value.rpartition("|")
    masked = code[:1] + "…" + code[-1:] if len(code) > 2 else "…"
    return f"{system}|{masked}" if system else masked


def candidates(identifiers: list[str], address: str | None) -> list[tuple[str, str]]:
    """(kind, digest) pairs to look up for a patient's identifiers and chosen address."""
    pairs = [("identifier", digest("identifier", i)) for i in identifiers]
    if address:
        pairs.append(("email", digest("email", address)))
    return pairs
