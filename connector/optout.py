"""Opt-outs: who must not be written to, by patient identifier or email address.

A value is never stored. What is stored is a keyed digest, `HMAC-SHA256(key, hex(SHA-256("kind:value")))`
with the value normalised (addresses lowercased), under a key from `optout.keys` (by reference), plus a masked
hint for people ("r…@example.org", "urn:oid:…|1…5"). Without the key, a copy of the ledger does not tell
whether a given address is on the list: an unkeyed SHA-256 can be reversed by hashing a list of candidate
addresses.

Versions before 0.2 stored the inner SHA-256 alone (`key_id` empty). Because the keyed digest is built on
top of it, `connector optout rekey` converts such rows without knowing the values, and until then look-ups
match them too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from connector.config.delivery import OptOutConfig
    from connector.ledger import OptOut

Kind = Literal["identifier", "email"]


def normalise(kind: Kind, value: str) -> str:
    value = value.strip()
    return value.lower() if kind == "email" else value


def digest(kind: Kind, value: str) -> str:
    """The inner digest (hex SHA-256 of kind and normalised value): what the keyed digest is made from."""
    return hashlib.sha256(f"{kind}:{normalise(kind, value)}".encode("utf-8", "surrogatepass")).hexdigest()


def hint(kind: Kind, value: str) -> str:
    value = normalise(kind, value)
    if kind == "email":
        local, _, domain = value.partition("@")
        return f"{local[:1]}…@{domain}"
    system, _, code = value.rpartition("|")
    masked = code[:1] + "…" + code[-1:] if len(code) > 2 else "…"
    return f"{system}|{masked}" if system else masked


def candidates(identifiers: list[str], address: str | None) -> list[tuple[str, str]]:
    """(kind, inner digest) pairs to look up for a patient's identifiers and chosen address."""
    pairs = [("identifier", digest("identifier", i)) for i in identifiers]
    if address:
        pairs.append(("email", digest("email", address)))
    return pairs


@dataclass(frozen=True)
class OptOutKeys:
    """The keys of `optout.keys`: `current` keys new entries, every one of them matches."""

    keys: dict[str, bytes]
    current: str

    @classmethod
    def from_config(cls, config: OptOutConfig | None) -> OptOutKeys | None:
        if config is None:
            return None
        # The config has checked that each is base64 of 32 bytes.
        return cls(
            {key_id: base64.b64decode(secret.get_secret_value()) for key_id, secret in config.keys.items()},
            config.current,
        )

    def keyed(self, inner: str, key_id: str | None = None) -> str:
        """The stored digest of an inner digest under one key (default: the current one)."""
        key = self.keys[key_id or self.current]
        return hmac.new(key, inner.encode("ascii", "backslashreplace"), hashlib.sha256).hexdigest()

    def variants(self, inner: str) -> list[tuple[str | None, str]]:
        """(key id, stored digest) under every key, and the unkeyed form of rows not yet re-keyed (None)."""
        return [*((key_id, self.keyed(inner, key_id)) for key_id in self.keys), (None, inner)]


def variants(keys: OptOutKeys | None, inner: str) -> list[tuple[str | None, str]]:
    """What to look for in the ledger for one inner digest (only the unkeyed form without keys)."""
    return keys.variants(inner) if keys is not None else [(None, inner)]


def applies(entry: OptOut, category: str | None, essential: bool) -> bool:
    """Whether an opt-out stops an email of a mapping with this `category:` (None: none given) and
    `essential:` flag. An entry for every email (category '') stops them all; a category entry stops that
    category. An essential message (a cancellation: transactional) is sent despite the patient's own
    unsubscribe link; opt-outs an operator or a bounce put there stop it too."""
    if essential and entry.origin == "link":
        return False
    return entry.category == "" or entry.category == category


def first_applying(entries: list[OptOut], category: str | None, essential: bool) -> OptOut | None:
    return next((e for e in entries if applies(e, category, essential)), None)
