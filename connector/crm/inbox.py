"""The inbox's encryption: AES-256-GCM with a random 96-bit nonce per event, the source and event id as
associated data (a sealed payload moved to another row does not open). Keys come from the config by id;
the current one seals, any listed one opens, so keys rotate by adding a new one, making it `current`, and
removing the old one once `retention` has purged what it sealed.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import TYPE_CHECKING, Any

from connector.errors import ConfigError, ConnectorError, Problem, ResourceError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from connector.config.sources import InboxConfig

NONCE = 12


class SealError(ConnectorError):
    """A stored event cannot be opened (wrong or missing key, tampered row)."""


class Keyring:
    def __init__(self, config: InboxConfig) -> None:
        # here, not at start-up: `cryptography` is needed only when an inbox is configured
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.current = config.current
        self._keys: dict[str, AESGCM] = {}
        for key_id, secret in config.keys.items():
            try:
                raw = base64.b64decode(secret.get_secret_value(), validate=True)
            except (binascii.Error, ValueError):
                raw = b""
            if len(raw) != 32:
                raise ConfigError(
                    [
                        Problem(
                            None,
                            None,
                            f"inbox.keys.{key_id}",
                            "must be base64 of 32 random bytes (e.g. `openssl rand -base64 32`)",
                        )
                    ]
                )
            self._keys[key_id] = AESGCM(raw)

    def seal(self, source: str, event_id: str, payload: dict[str, Any]) -> tuple[str, bytes]:
        nonce = os.urandom(NONCE)
        plain = json.dumps(payload, separators=(",", ":")).encode()
        return self.current, nonce + self._keys[self.current].encrypt(nonce, plain, _aad(source, event_id))

    def open(self, key_id: str, source: str, event_id: str, sealed: bytes) -> Any:
        """The stored JSON value (the caller checks its shape)."""
        key = self._keys.get(key_id)
        if key is None:
            raise SealError(f"inbox key {key_id!r} is no longer configured")
        from cryptography.exceptions import InvalidTag

        try:
            plain = key.decrypt(sealed[:NONCE], sealed[NONCE:], _aad(source, event_id))
        except InvalidTag:
            raise SealError("a stored event failed authentication (wrong key or altered row)") from None
        return json.loads(plain)


def _aad(source: str, event_id: str) -> bytes:
    return f"{source}\x00{event_id}".encode()


def open_event(keyring: Keyring, row: Any) -> dict[str, Any]:
    """The event an inbox row holds. Raises SealError (it does not open) or ResourceError (not an object)."""
    event: Any = keyring.open(row.key_id, row.source, row.event_id, row.sealed)
    if not isinstance(event, dict):
        raise ResourceError(f"CRM event {row.id} of {row.source!r} is not a JSON object")
    return event
