"""Is a CRM webhook request authentic and fresh? Pure checks over the RAW body bytes.

Each `verify_*` returns None when the request passes and raises `SignatureError` otherwise; a secret that
cannot be used at all (empty, not base64) raises `ConfigError`, because no request could ever pass.
Each `sign_*` computes the same signature, for tests and for our own test senders.

Schemes:
- Standard Webhooks (https://www.standardwebhooks.com): `webhook-id`, `webhook-timestamp` (unix seconds),
  `webhook-signature` = space-separated `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, where the
  key is the base64 after the `whsec_` prefix. Other versions (e.g. `v1a`, asymmetric) are ignored.
- HubSpot v3: `X-HubSpot-Signature-v3` = base64 HMAC-SHA256(client secret, method + uri + body + timestamp),
  `X-HubSpot-Request-Timestamp` in milliseconds; the uri is the full URL HubSpot called, with a fixed set of
  percent-escapes decoded (see `hubspot_signed_uri`).
- Generic HMAC: one header holding `<prefix><hex or base64 HMAC(secret, body)>`, e.g. `sha256=<hex>`.

All comparisons use `hmac.compare_digest`. Header names are matched case-insensitively.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Literal

from connector.errors import ConfigError, ConnectorError, Problem

Encoding = Literal["hex", "base64"]
Algorithm = Literal["sha256", "sha1"]

_ALGORITHMS = frozenset({"sha256", "sha1"})
# ASCII digits only: int() would also accept " 12", "1_2" and non-ASCII digits such as "١٢".
_DIGITS = re.compile(r"[0-9]{1,16}")
# HubSpot v3: decode exactly these escapes in the request URI, and no others (not %20, %23, %26, %3D, %2B).
_HUBSPOT_ESCAPES = re.compile(r"%(3A|2F|3F|40|21|24|27|28|29|2A|2C|3B)", re.IGNORECASE)

WEBHOOK_ID = "webhook-id"
WEBHOOK_TIMESTAMP = "webhook-timestamp"
WEBHOOK_SIGNATURE = "webhook-signature"
HUBSPOT_SIGNATURE = "x-hubspot-signature-v3"
HUBSPOT_TIMESTAMP = "x-hubspot-request-timestamp"


class SignatureError(ConnectorError):
    """The request is not authentic or not fresh; answer 401 and process nothing.

    `reason` is short and fixed ("signature mismatch", "missing header webhook-id", ...): it never quotes a
    header value or the body.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


# --- Standard Webhooks -------------------------------------------------------------------------------------


def standard_webhook_key(secret: str) -> bytes:
    """The HMAC key inside a Standard Webhooks secret (`whsec_<base64>`; the prefix is optional)."""
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not key:
        raise _secret_problem("Standard Webhooks secret", "expected 'whsec_' followed by non-empty base64")
    return key


def sign_standard_webhook(secret: str, msg_id: str, timestamp: int | str, body: bytes) -> str:
    """The `v1,<base64>` entry a Standard Webhooks sender puts in `webhook-signature`."""
    digest = _standard_digest(standard_webhook_key(secret), msg_id, str(timestamp), body)
    return "v1," + digest.decode("ascii")


def standard_webhook_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three headers a Standard Webhooks sender attaches to `body`."""
    return {
        WEBHOOK_ID: msg_id,
        WEBHOOK_TIMESTAMP: str(timestamp),
        WEBHOOK_SIGNATURE: sign_standard_webhook(secret, msg_id, timestamp, body),
    }


def verify_standard_webhook(
    secret: str, headers: Mapping[str, str], body: bytes, now: float, tolerance: float = 300
) -> None:
    """Pass if one `v1` entry of `webhook-signature` signs this id, timestamp and body, and the timestamp is
    within `tolerance` seconds of `now` (either side)."""
    key = standard_webhook_key(secret)
    lowered = _lowered(headers)
    msg_id = _required(lowered, WEBHOOK_ID)
    raw_timestamp = _required(lowered, WEBHOOK_TIMESTAMP)
    signatures = _required(lowered, WEBHOOK_SIGNATURE)
    _check_window(_timestamp(raw_timestamp, WEBHOOK_TIMESTAMP), now, tolerance)
    expected = _standard_digest(key, msg_id, raw_timestamp, body)
    for entry in signatures.split(" "):
        version, comma, candidate = entry.partition(",")
        if version == "v1" and comma and _same(candidate, expected):
            return
    raise SignatureError("signature mismatch")


def _standard_digest(key: bytes, msg_id: str, timestamp: str, body: bytes) -> bytes:
    signed = _utf8(msg_id) + b"." + _utf8(timestamp) + b"." + body
    return base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())


# --- HubSpot v3 --------------------------------------------------------------------------------------------


def hubspot_signed_uri(uri: str) -> str:
    """The URI as HubSpot signs it: %3A %2F %3F %40 %21 %24 %27 %28 %29 %2A %2C %3B decoded, nothing else.

    One pass, so "%253A" stays "%253A". Pass the full URL HubSpot called (scheme, host, path, query): behind a
    proxy, rebuild it from the public URL, not from what the proxy forwarded.
    """
    return _HUBSPOT_ESCAPES.sub(lambda m: chr(int(m.group(1), 16)), uri)


def sign_hubspot_v3(client_secret: str, method: str, uri: str, body: bytes, timestamp_ms: int | str) -> str:
    """The value HubSpot puts in `X-HubSpot-Signature-v3`."""
    return _hubspot_digest(client_secret, method, uri, body, str(timestamp_ms)).decode("ascii")


def verify_hubspot_v3(
    client_secret: str,
    method: str,
    uri: str,
    headers: Mapping[str, str],
    body: bytes,
    now_ms: int,
    tolerance_ms: int = 300_000,
) -> None:
    """Pass if `X-HubSpot-Signature-v3` signs method, uri, body and `X-HubSpot-Request-Timestamp`, and that
    timestamp (milliseconds) is within `tolerance_ms` of `now_ms` (HubSpot: reject older than 5 minutes; we also
    reject as far in the future)."""
    if not client_secret:
        raise _secret_problem("HubSpot client secret", "must not be empty")
    lowered = _lowered(headers)
    signature = _required(lowered, HUBSPOT_SIGNATURE)
    raw_timestamp = _required(lowered, HUBSPOT_TIMESTAMP)
    _check_window(_timestamp(raw_timestamp, HUBSPOT_TIMESTAMP), now_ms, tolerance_ms)
    if not _same(signature, _hubspot_digest(client_secret, method, uri, body, raw_timestamp)):
        raise SignatureError("signature mismatch")


def _hubspot_digest(client_secret: str, method: str, uri: str, body: bytes, timestamp: str) -> bytes:
    signed = _utf8(method) + _utf8(hubspot_signed_uri(uri)) + body + _utf8(timestamp)
    return base64.b64encode(hmac.new(_utf8(client_secret), signed, hashlib.sha256).digest())


# --- Generic HMAC ------------------------------------------------------------------------------------------


def sign_hmac(
    secret: bytes, body: bytes, prefix: str = "", encoding: Encoding = "hex", algorithm: Algorithm = "sha256"
) -> str:
    """The header value a generic sender would send: `prefix` + hex or base64 HMAC of the body."""
    digest = _hmac_digest(secret, body, algorithm)
    if encoding == "hex":
        return prefix + digest.hex()
    if encoding == "base64":
        return prefix + base64.b64encode(digest).decode("ascii")
    raise _secret_problem("HMAC encoding", "must be 'hex' or 'base64'")


def verify_hmac(
    secret: bytes,
    header_value: str | None,
    body: bytes,
    prefix: str = "",
    encoding: Encoding = "hex",
    algorithm: Algorithm = "sha256",
) -> None:
    """Pass if `header_value` is `prefix` followed by the HMAC of the body (hex in either case, or base64).

    This scheme carries no timestamp: it proves origin, not freshness. Deduplicate on the event id.
    """
    expected = _hmac_digest(secret, body, algorithm)
    if not header_value:
        raise SignatureError("missing signature header")
    if not header_value.startswith(prefix):
        raise SignatureError("malformed signature")
    given = _decode_digest(header_value[len(prefix) :], encoding)
    if given is None:
        raise SignatureError("malformed signature")
    if not hmac.compare_digest(given, expected):
        raise SignatureError("signature mismatch")


def _hmac_digest(secret: bytes, body: bytes, algorithm: str) -> bytes:
    if not secret:
        raise _secret_problem("HMAC secret", "must not be empty")
    if algorithm not in _ALGORITHMS:
        raise _secret_problem("HMAC algorithm", "must be 'sha256' or 'sha1'")
    return hmac.new(secret, body, algorithm).digest()


def _decode_digest(text: str, encoding: str) -> bytes | None:
    if not text.isascii():
        return None
    if encoding == "hex":
        return bytes.fromhex(text) if re.fullmatch(r"(?:[0-9a-fA-F]{2})+", text) else None
    if encoding == "base64":
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return None
    raise _secret_problem("HMAC encoding", "must be 'hex' or 'base64'")


# --- Shared ------------------------------------------------------------------------------------------------


def _lowered(headers: Mapping[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


def _required(lowered: Mapping[str, str], name: str) -> str:
    value = lowered.get(name)
    if not value:
        raise SignatureError(f"missing header {name}")
    return value


def _timestamp(raw: str, name: str) -> int:
    if not _DIGITS.fullmatch(raw):
        raise SignatureError(f"malformed header {name}")
    return int(raw)


def _check_window(timestamp: int, now: float, tolerance: float) -> None:
    age = now - timestamp
    # Written as "not <=" so that a NaN clock or tolerance rejects instead of accepting everything.
    if not age <= tolerance:
        raise SignatureError("timestamp outside tolerance: too old")
    if not -age <= tolerance:
        raise SignatureError("timestamp outside tolerance: in the future")


def _same(candidate: str, expected: bytes) -> bool:
    """Constant-time equality of a header's text with an ASCII digest; non-ASCII text never matches."""
    return candidate.isascii() and hmac.compare_digest(candidate.encode("ascii"), expected)


def _utf8(text: str) -> bytes:
    # "surrogatepass": header text from a test or a fuzzer may hold lone surrogates; encoding must not fail.
    return text.encode("utf-8", "surrogatepass")


def _secret_problem(where: str, message: str) -> ConfigError:
    return ConfigError([Problem(file=None, line=None, where=where, message=message)])
