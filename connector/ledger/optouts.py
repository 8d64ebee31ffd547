"""The opt-out list in the ledger: keyed digests (connector.optout), matched under every configured key.

Callers hand over the *inner* digest (`optout.digest(kind, value)`); this store keys it with the current
key to write it, and looks for it under every key in `optout.keys` and in the unkeyed form of rows written
before keys existed. `rekey` converts those rows to the current key (`connector optout rekey`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, bindparam, func, select, update

from connector import optout
from connector.errors import ConfigError, Problem
from connector.ledger import OptOut, Rekeyed
from connector.ledger.engine import OPT, SqlRole

_MISSING = object()


def _entry(row: Any) -> OptOut:
    return OptOut(row.kind, row.digest, row.hint, row.note, row.created_at, row.key_id, row.category, row.origin)


class SqlOptOuts(SqlRole):
    """The opt-out role. `keys` None: the list can be read (unkeyed rows) and matched, but not added to."""

    def __init__(self, engine: Engine, keys: optout.OptOutKeys | None = None) -> None:
        super().__init__(engine)
        self.optout_keys = keys

    def _keys(self) -> optout.OptOutKeys:
        if self.optout_keys is None:
            raise ConfigError(
                [
                    Problem(
                        None,
                        None,
                        "optout",
                        "opt-outs are stored as keyed digests: add `optout: "
                        "{keys: {k1: ${OPTOUT_KEY}}, current: k1}` with a key from "
                        "`openssl rand -base64 32` (see README, Security)",
                    )
                ]
            )
        return self.optout_keys

    def add(
        self, kind: str, digest: str, hint: str, note: str | None, category: str = "", origin: str = "operator"
    ) -> bool:
        """Add an entry (`digest`: the inner digest) for one `category` ('': every email). False when it is
        already on the list for that category, under any key."""
        keys = self._keys()
        with self.engine.begin() as conn:
            if conn.execute(
                select(OPT.c.id).where(
                    OPT.c.kind == kind,
                    OPT.c.digest.in_([d for _, d in keys.variants(digest)]),
                    OPT.c.category == category,
                )
            ).first():
                return False
            statement = self._insert(OPT).values(
                kind=kind,
                digest=keys.keyed(digest),
                key_id=keys.current,
                hint=hint,
                note=note,
                category=category,
                origin=origin,
                created_at=datetime.now(UTC),
            )
            return bool(conn.execute(statement.on_conflict_do_nothing()).rowcount)

    def remove(self, kind: str, digest: str, category: str | None = None) -> bool:
        """Take an entry off the list (re-subscribe): one category's, or (None) every one of them."""
        stored = [d for _, d in optout.variants(self.optout_keys, digest)]
        where = [OPT.c.kind == kind, OPT.c.digest.in_(stored)]
        if category is not None:
            where.append(OPT.c.category == category)
        with self.engine.begin() as conn:
            return bool(conn.execute(OPT.delete().where(*where)).rowcount)

    def entries(self) -> list[OptOut]:
        with self.engine.connect() as conn:
            return [_entry(r) for r in conn.execute(select(OPT).order_by(OPT.c.created_at))]

    def opted_out(self, candidates: Sequence[tuple[str, str]]) -> OptOut | None:
        """The first opt-out matching one of these (kind, inner digest) pairs."""
        return self.opted_out_many([candidates])[0]

    def opted_out_many(self, candidate_lists: Sequence[Sequence[tuple[str, str]]]) -> list[OptOut | None]:
        """`opted_out` for several recipients in one query: entries for every email (category '') only."""
        return [next((m for m in found if not m.category), None) for found in self.matches_many(candidate_lists)]

    def matches_many(self, candidate_lists: Sequence[Sequence[tuple[str, str]]]) -> list[list[OptOut]]:
        """Every entry (all categories) matching each recipient's (kind, inner digest) pairs, in one query;
        `optout.applies` says which of them stop a given email."""
        expected: dict[tuple[str, str], str | None] = {}  # (kind, stored digest) -> the key id that makes it
        for candidates in candidate_lists:
            for kind, inner in candidates:
                for key_id, stored in optout.variants(self.optout_keys, inner):
                    expected[(kind, stored)] = key_id
        digests = sorted({stored for _, stored in expected})
        found: dict[tuple[str, str], list[OptOut]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(digests), 500):
                for r in conn.execute(select(OPT).where(OPT.c.digest.in_(digests[start : start + 500]))):
                    if expected.get((r.kind, r.digest), _MISSING) == r.key_id:
                        found.setdefault((r.kind, r.digest), []).append(_entry(r))
        return [
            [
                entry
                for kind, inner in candidates
                for _, stored in optout.variants(self.optout_keys, inner)
                for entry in found.get((kind, stored), [])
            ]
            for candidates in candidate_lists
        ]

    def key_counts(self) -> dict[str | None, int]:
        """Entries per key id (None: unkeyed, written before keys existed)."""
        with self.engine.connect() as conn:
            return {
                r.key_id: r.n
                for r in conn.execute(select(OPT.c.key_id, func.count().label("n")).group_by(OPT.c.key_id))
            }

    def rekey(self) -> Rekeyed:
        """Key every unkeyed entry with the current key, in one transaction: HMAC(key, stored SHA-256), so
        no value is needed. An entry already there under the current key is merged (the unkeyed row goes)."""
        keys = self._keys()
        with self.engine.begin() as conn:
            legacy = conn.execute(select(OPT.c.id, OPT.c.kind, OPT.c.digest).where(OPT.c.key_id.is_(None))).all()
            taken = {
                (r.kind, r.digest)
                for r in conn.execute(select(OPT.c.kind, OPT.c.digest).where(OPT.c.key_id == keys.current))
            }
            converted: list[dict[str, Any]] = []
            merged: list[int] = []
            for row in legacy:
                stored = keys.keyed(row.digest)
                if (row.kind, stored) in taken:
                    merged.append(row.id)
                    continue
                taken.add((row.kind, stored))
                converted.append({"rid": row.id, "new": stored})
            if converted:
                conn.execute(
                    update(OPT)
                    .where(OPT.c.id == bindparam("rid"))
                    .values(digest=bindparam("new"), key_id=keys.current),
                    converted,
                )
            if merged:
                conn.execute(OPT.delete().where(OPT.c.id.in_(merged)))
        counts = self.key_counts()
        unknown = {k: n for k, n in counts.items() if k is not None and k not in keys.keys}
        return Rekeyed(keys.current, len(converted), len(merged), counts, unknown)
