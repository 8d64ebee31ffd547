"""CRM webhooks, pure part: is this request authentic and fresh (`verify`), and which events does it carry (`parse`).

Both modules take values and return values: no I/O, no clock (the current time is a parameter), no logging.
The web receiver does, in order: read the raw body → `verify_*` → `parse_*` → hand the events to the pipeline.

    ConnectorError
    ├── SignatureError   the request is not authentic or not fresh: answer 401, process nothing.
    └── BodyError        the request is authentic but its body cannot be read: answer 400, process nothing.

Neither message ever quotes a header value or the body.
"""

from __future__ import annotations

from connector.crm.parse import (
    BodyError,
    CrmEvent,
    parse_hmac_json,
    parse_hubspot,
    parse_salesforce_outbound,
    parse_standard_webhook,
    salesforce_ack,
)
from connector.crm.verify import (
    SignatureError,
    hubspot_signed_uri,
    sign_hmac,
    sign_hubspot_v3,
    sign_standard_webhook,
    standard_webhook_headers,
    standard_webhook_key,
    verify_hmac,
    verify_hubspot_v3,
    verify_standard_webhook,
)

__all__ = [
    "BodyError",
    "CrmEvent",
    "SignatureError",
    "hubspot_signed_uri",
    "parse_hmac_json",
    "parse_hubspot",
    "parse_salesforce_outbound",
    "parse_standard_webhook",
    "salesforce_ack",
    "sign_hmac",
    "sign_hubspot_v3",
    "sign_standard_webhook",
    "standard_webhook_headers",
    "standard_webhook_key",
    "verify_hmac",
    "verify_hubspot_v3",
    "verify_standard_webhook",
]
