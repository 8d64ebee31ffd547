"""The ledger: the record of every notification under its unique key, and of each source's progress.

Rules every implementation keeps:
- duplicates are decided by the UNIQUE key at insert time (a conflict means "already there");
- a notification is committed as `sending` before its request leaves, so a crash leaves `in_doubt`;
- a source's cursor moves in the same transaction as the notifications it produced.

    pending ──claim (lease)──▶ pending+lease ──start_sending──▶ sending ──finish──▶ sent | failed | in_doubt
       │                          │ settle                        │ retry_later ──▶ pending (later due time)
       └─ (planned skipped)       └──▶ skipped | failed | cancelled └ crash/lease expiry ──▶ in_doubt
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from connector.lifecycle import Snapshot
from connector.models import PlannedNotification, State


@dataclass(frozen=True)
class SeenVersion:
    resource_type: str
    resource_id: str
    version: str
    last_updated: datetime | None
    problem: str | None = None


@dataclass(frozen=True)
class Withdrawal:
    """Cancel the pending notifications of these patients for one appointment."""

    appointment_id: str
    patients: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class OptOut:
    kind: str  # "identifier" or "email"
    digest: str
    hint: str
    note: str | None
    created_at: datetime


@dataclass(frozen=True)
class NotificationRecord:
    id: int
    key: str
    source: str
    mapping: str
    event: str
    resource_type: str
    resource_id: str
    resource_version: str
    patient_id: str
    state: State
    reason: str | None
    attempts: int
    due_at: datetime
    tracking_id: str | None
    updated_at: datetime
    appointment_start: datetime | None = None
    first_attempt_at: datetime | None = None
    resends: int = 0
    delivery_status: str | None = None


class Ledger(Protocol):
    def record_page(self, source: str, notifications: Sequence[PlannedNotification],
                    seen: Sequence[SeenVersion], cursor: datetime | None,
                    snapshots: Mapping[str, Snapshot | None] | None = None,
                    withdrawals: Sequence[Withdrawal] = ()) -> list[str]:
        """In one transaction: withdraw pending notifications, insert new ones (a key that exists is left
        alone, except a `cancelled` one planned again, which is re-armed), remember appointment states
        (None: deleted) and seen versions, and move the source's cursor forward (never backward).
        Returns the keys inserted or re-armed."""

    def new_versions(self, source: str, versions: Sequence[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
        """The (type, id, version) triples not seen before on `source`."""

    def cursor(self, source: str) -> datetime | None: ...

    def snapshots(self, source: str, appointment_ids: Sequence[str]) -> dict[str, Snapshot]:
        """Remembered states of these appointments (deleted ones are left out)."""

    def notified(self, source: str, appointment_ids: Sequence[str]) -> set[tuple[str, str]]:
        """(appointment id, patient id) pairs with a notification sent, being sent or in doubt."""

    def existing(self, keys: Sequence[str]) -> dict[str, NotificationRecord]: ...

    def claim_due(self, now: datetime, limit: int, owner: str, lease_until: datetime,
                  wall_now: datetime) -> list[NotificationRecord]:
        """Lease up to `limit` pending notifications due at `now` that no live lease holds."""

    def start_sending(self, notification_id: int, owner: str, lease_until: datetime) -> bool:
        """pending (leased by owner) → sending, committed, lease renewed. False if the lease was lost."""

    def finish(self, notification_id: int, state: State, reason: str | None, tracking_id: str | None,
               when: datetime) -> None:
        """sending → sent / failed / in_doubt."""

    def retry_later(self, notification_id: int, due_at: datetime, reason: str, count_attempt: bool) -> None:
        """sending → pending with a later due time (the request certainly did not reach Paubox)."""

    def settle(self, notification_id: int, owner: str, state: State, reason: str) -> None:
        """pending (leased by owner) → skipped / failed / cancelled, without sending."""

    def release(self, owner: str | None, notification_ids: Sequence[int] | None = None) -> int:
        """Drop `owner`'s leases (every owner's when None) on pending notifications (all, or the given ones)."""

    def mark_interrupted(self, wall_now: datetime, everything: bool) -> int:
        """sending → in_doubt where the lease expired (or every one, for a single-process ledger)."""

    def counts(self) -> dict[State, int]: ...

    def notifications(self, states: Sequence[State], limit: int) -> list[NotificationRecord]: ...

    def problems(self, limit: int) -> list[tuple[str, SeenVersion]]: ...
