"""Schema versions of the ledger (Alembic), applied by `connector db upgrade`.

Every start checks that the schema is current. That check reads the version table with plain SQL and finds
the newest revision by reading the `revision` and `down_revision` lines of the scripts, so that a start
(a cron `run --once` in particular) does not import Alembic; Alembic itself runs only to upgrade, or when the
scripts do not name one head plainly.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, inspect, text

from connector.errors import LedgerError

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

_SCRIPTS = Path(__file__).with_name("migrations")
_REVISION = re.compile(r"^revision\s*(?::[^=]*)?=\s*[\"']([^\"']+)[\"']", re.MULTILINE)
_DOWN = re.compile(r"^down_revision\s*(?::[^=]*)?=\s*(.+)$", re.MULTILINE)
_QUOTED = re.compile(r"[\"']([^\"']+)[\"']")


def _alembic() -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(_SCRIPTS))
    return config


@cache
def _plain_head() -> str | None:
    """The one revision no script names as its `down_revision`, read from the scripts' text; None when that
    is not plain (no script, several heads, a line written another way): then Alembic decides."""
    revisions: set[str] = set()
    below: set[str] = set()
    for script in sorted((_SCRIPTS / "versions").glob("*.py")):
        source = script.read_text(encoding="utf-8")
        revision, down = _REVISION.search(source), _DOWN.search(source)
        if revision is None or down is None:
            return None
        revisions.add(revision.group(1))
        below.update(_QUOTED.findall(down.group(1)))
    heads = revisions - below
    return heads.pop() if len(heads) == 1 else None


def head_revision() -> str:
    plain = _plain_head()
    if plain is not None:
        return plain
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision recorded in the ledger (Alembic's version table), None in an empty database."""
    if not inspect(engine).has_table("alembic_version"):
        return None
    with engine.connect() as conn:
        versions = [row[0] for row in conn.execute(text("SELECT version_num FROM alembic_version"))]
    if len(versions) > 1:
        raise LedgerError(f"the ledger records several schema revisions ({', '.join(sorted(versions))})")
    return versions[0] if versions else None


def upgrade(engine: Engine, target: str = "head") -> tuple[str | None, str]:
    """Bring the schema to the newest revision (or `target`); returns (before, after)."""
    from alembic import command

    before = current_revision(engine)
    config = _alembic()
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, target)
    return before, head_revision() if target == "head" else target


def ensure_current(engine: Engine) -> None:
    """Create the schema in an empty database; refuse to run on an out-of-date one."""
    current = current_revision(engine)
    if current is None and not inspect(engine).get_table_names():
        upgrade(engine)
        return
    head = head_revision()
    if current != head:
        raise LedgerError(
            f"the ledger schema is at revision {current or 'none'} but this version of connector "
            f"needs {head}: run `connector db upgrade` (back up the database first)"
        )
