"""Signed action links in patients' email: what a token says, how it is signed and checked (pure).

A link is `{server.public_url}/links/{action}/{token}`. The token carries the notification's ledger id, the
action, an expiry, and the language and zone the page is shown in; nothing else: no patient data, no
notification key. It is signed (itsdangerous, HMAC-SHA256) with the current key of `links.keys` and names
that key by id, so keys rotate as the opt-out and inbox keys do: every listed key is accepted, a removed
(retired) one no longer is. A token is good for the action it was made for only: the action is inside the
signed part and must equal the one in the path.

    token = sign(keys, Claim(notification=42, action="confirm", expires=start, language="nl", zone=zone))
    claim = verify(keys, token, "confirm", now)    # or raises BadLink(reason)
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Literal

from itsdangerous import BadSignature, URLSafeSerializer

from connector.errors import ConnectorError

if TYPE_CHECKING:
    from connector.config.server import LinksConfig

Action = Literal["confirm", "cancel", "unsubscribe"]
ACTIONS: tuple[Action, ...] = ("confirm", "cancel", "unsubscribe")
_SALT = "connector.links.v1"


class BadLink(ConnectorError):
    """A link that must not act: `reason` is one of `malformed`, `unknown key`, `tampered`, `other action`,
    `expired` (safe to log and count: it says nothing about the patient)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"link refused: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Claim:
    notification: int
    action: Action
    expires: datetime
    language: str = "en"
    zone: str = "UTC"


@dataclass(frozen=True)
class LinkKeys:
    """The keys of `links.keys`: `current` signs, every one of them verifies."""

    keys: dict[str, bytes]
    current: str

    @classmethod
    def from_config(cls, config: LinksConfig) -> LinkKeys:
        # The config has checked that each is base64 of 32 bytes.
        return cls(
            {key_id: base64.b64decode(secret.get_secret_value()) for key_id, secret in config.keys.items()},
            config.current,
        )


def _serializer(key: bytes) -> URLSafeSerializer:
    return URLSafeSerializer(key, salt=_SALT)


def sign(keys: LinkKeys, claim: Claim) -> str:
    payload = {
        "n": claim.notification,
        "a": claim.action,
        "e": int(claim.expires.timestamp()),
        "l": claim.language,
        "z": claim.zone,
    }
    signed = _serializer(keys.keys[keys.current]).dumps(payload)
    return f"{keys.current}.{signed}"


def verify(keys: LinkKeys, token: str, action: str, now: datetime) -> Claim:
    """The claim of a token made for `action` that has not expired at `now`, or BadLink."""
    key_id, dot, signed = token.partition(".")
    if not dot or not signed or len(token) > 600:
        raise BadLink("malformed")
    key = keys.keys.get(key_id)
    if key is None:
        raise BadLink("unknown key")
    serializer = _serializer(key)
    try:
        payload = serializer.loads(signed)
    except BadSignature:
        raise BadLink("tampered") from None
    if serializer.dumps(payload) != signed:  # one spelling per token: no variant of a signature's last bits
        raise BadLink("tampered")
    if not isinstance(payload, dict) or not isinstance(payload.get("n"), int) or payload.get("a") not in ACTIONS:
        raise BadLink("malformed")
    if payload["a"] != action:
        raise BadLink("other action")
    expires = datetime.fromtimestamp(int(payload.get("e", 0)), UTC)
    if now >= expires:
        raise BadLink("expired")
    language = payload.get("l") if isinstance(payload.get("l"), str) else "en"
    zone = payload.get("z") if isinstance(payload.get("z"), str) else "UTC"
    return Claim(payload["n"], payload["a"], expires, str(language), str(zone))


def url(public_url: str, action: Action, token: str) -> str:
    return f"{public_url.rstrip('/')}/links/{action}/{token}"


@dataclass(frozen=True)
class EmailLinks:
    """What one email carries: template values (`confirm_url`, `cancel_url`, `unsubscribe_url`) and the
    RFC 2369 / RFC 8058 headers."""

    values: dict[str, str]
    headers: dict[str, str]


def for_email(
    keys: LinkKeys,
    public_url: str,
    *,
    notification: int,
    actions: list[str],
    start: datetime | None,
    now: datetime,
    ttl: timedelta,
    language: str,
    zone: str,
    mailto: str | None = None,
) -> EmailLinks:
    """The links of one email. Confirm and cancel work until the appointment starts; unsubscribe for `ttl`.
    Every email has the unsubscribe link and its one-click headers (RFC 8058 wants one https URI in
    List-Unsubscribe; a `mailto:` may follow)."""
    values: dict[str, str] = {}
    chosen: tuple[Action, ...] = ("confirm", "cancel")
    for action in chosen:
        if action in actions and start is not None:
            claim = Claim(notification, action, start, language, zone)
            values[f"{action}_url"] = url(public_url, claim.action, sign(keys, claim))
    claim = Claim(notification, "unsubscribe", now + ttl, language, zone)
    values["unsubscribe_url"] = url(public_url, "unsubscribe", sign(keys, claim))
    targets = [f"<{values['unsubscribe_url']}>"] + ([f"<mailto:{mailto}?subject=unsubscribe>"] if mailto else [])
    headers = {"List-Unsubscribe": ", ".join(targets), "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
    return EmailLinks(values, headers)


def write_identifier(notification_key: str, action: str) -> str:
    """The identifier value a write-back for this email and action carries: the same for every click, retry
    and replica (a conditional create finds the first), and no notification key in clear."""
    return hashlib.sha256(f"{notification_key}\n{action}".encode("utf-8", "surrogatepass")).hexdigest()[:40]
