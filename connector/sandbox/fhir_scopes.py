"""SMART system scopes as the FHIR test server checks them per interaction (SMART App Launch 2, with the v1
forms accepted). Pure: a granted scope string and an interaction in, a yes or no out.

A scope is `system/{Type|*}.{permissions}`: v2 permissions are letters in the order `cruds` (create, read,
update, delete, search), e.g. `system/Appointment.rs`, `system/Communication.c`, `system/*.cruds`; v1's
`read` means `rs`, `write` means `cud`, `*` means all. Read covers read, vread and an instance's history;
search covers type searches, their next pages and type history; the whole server's history needs `*`.
Other contexts (`patient/`, `user/`) and granular scopes (`…?category=x`) grant nothing here.
"""

from __future__ import annotations

import re

PERMISSIONS = "cruds"
V1 = {"read": "rs", "write": "cud", "*": PERMISSIONS}
SCOPE = re.compile(r"system/(?P<type>\*|[A-Z][A-Za-z]+)\.(?P<permissions>[a-z*]+)")
INTERACTIONS = {"create": "c", "read": "r", "update": "u", "delete": "d", "search": "s"}


def _letters(permissions: str) -> str:
    """The v2 letters a permissions part grants ('' when it is not a valid v1 or v2 form)."""
    if permissions in V1:
        return V1[permissions]
    ordered = "".join(letter for letter in PERMISSIONS if letter in permissions)
    return permissions if ordered == permissions else ""


def grants(scope: str, resource_type: str | None, interaction: str) -> bool:
    """Whether the space-separated `scope` allows `interaction` (create|read|update|delete|search) on
    `resource_type` (None: every type, as the system-level history needs)."""
    letter = INTERACTIONS[interaction]
    for item in scope.split():
        matched = SCOPE.fullmatch(item)
        if matched is None:
            continue
        if matched["type"] != "*" and matched["type"] != resource_type:
            continue
        if letter in _letters(matched["permissions"]):
            return True
    return False


def needed(resource_type: str | None, interaction: str) -> str:
    """The v2 scope to name in a 403: `system/Communication.c`."""
    return f"system/{resource_type or '*'}.{INTERACTIONS[interaction]}"
