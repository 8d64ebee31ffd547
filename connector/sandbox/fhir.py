"""A local FHIR R4 test server that versions, searches, pages, keeps history, writes and notifies like a real one.

Search `GET [base]/{type}?…`: `_id`, `_count`, `_lastUpdated` (ge/gt/le/lt/eq, repeatable), `_sort=
[-]_lastUpdated`, `_include=Appointment:patient`, and per type (see `fhir_search.SEARCH`): on Appointment
`date` (on `start`, prefixed and repeatable to form a range), `patient`, `practitioner`, `location`
(participant actors; comma lists), `status`, `identifier`; on AppointmentResponse `appointment`, `actor`,
`patient`, `part-status`, `identifier`; on Communication `about`, `subject`, `patient`, `recipient`,
`based-on`, `status`, `identifier`; on Task `focus`, `subject`/`patient` (`for`), `owner`, `status`,
`intent`, `identifier`; on Consent `patient`, `status`, `identifier`; on Patient `identifier`. Result sets
are snapshotted and paged with opaque `next` links; the `self` link lists only the parameters that were
honoured. `FhirState.mode` imitates a vendor's read API: `epic` honours only `patient`, `date`, `status`,
`_count`, `_id` on Appointment and has no history and no Subscription; `cerner` requires `_id` or one of
patient|practitioner|location with `date` (400 otherwise), sorts by `start` and has no history and no
Subscription; both search only Appointment, Patient and Consent and ignore `_lastUpdated`, `_sort` and
`_include`.

History `GET [base]/{type}/_history?_since=&_count=` (and `[base]/_history`, `[base]/{type}/{id}/_history`):
newest first, one entry per version or deletion, paged like search; `GET [base]/{type}/{id}/_history/{vid}`
reads one version. Reads answer `ETag: W/"vid"` and `Last-Modified`.

Writes (`fhir_writes`) work for every R4 resource type: `POST` (create, conditional create with
`If-None-Exist`), `PUT` (with `If-Match` for a version-aware update), `DELETE`; bodies are validated and
answers carry `Location`, `ETag` and `Last-Modified` as a server's do. `FhirState.put(resource, when=…)`
writes from Python without validation (tests plant invalid resources) and may write an older
`lastUpdated` than what is visible (a late commit). With `FhirState(authorizer=…, enforce_scopes=True)`
each interaction needs its SMART system scope (`fhir_scopes`), else 403. Subscriptions (R4 classic and
Backport): see `fhir_subscriptions`.

Test controls (not FHIR):
    POST /_test/faults     replaces the whole fault profile; absent knobs return to their defaults:
                           {"malformed_pages": 1, "page_status": [200, 503], "ignore": ["_sort"],
                            "latency_ms": 0, "read_status": 0, "mode": "full", "flaky": 0.0, "seed": null,
                            "fail_next": [503], "drop_notifications": 0, "subscription_error": false,
                            "write_faults": [{"status": 503}, {"status": 500, "after_commit": true},
                                             {"hang_s": 30, "after_commit": true}],
                            "conditional_create": true,
                            "next_loop": false, "endless_pages": false, "huge_bundle_mb": 0,
                            "drip_seconds": 0, "next_origin": null}
                           (`write_faults`: how the next write requests fail, see `fhir_writes`;
                            the last five are hostile pages: see `fhir_hostile`)
    POST /_test/reset      forget every resource, version, subscription, queued notification and write record
    POST /_test/flush      wait until every queued notification has been sent (or failed)
    POST /_test/heartbeat  send a heartbeat to every active Backport subscription

Modules by role: `fhir_store` (the state: versions, history, the lock, accessors for tests),
`fhir_search` (pure: parameters and vendor rules), `fhir_pages` (Bundles, paging, CapabilityStatement),
`fhir_responses`, `fhir_writes`, `fhir_scopes` (pure), `fhir_app` (routes), `fhir_subscriptions` with
`fhir_outbox`, `fhir_hostile`. This module is their front door: `FhirState`, `create_app` and `instant`
are imported from here.
"""

from __future__ import annotations

from connector.sandbox.fhir_app import create_app
from connector.sandbox.fhir_store import Change, FhirState, PreconditionFailed, WriteFault, WriteRecord, instant

__all__ = ["Change", "FhirState", "PreconditionFailed", "WriteFault", "WriteRecord", "create_app", "instant"]
