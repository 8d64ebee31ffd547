"""Schema versions of the ledger (Alembic), applied by `connector db upgrade`."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

from connector.errors import LedgerError

_SCRIPTS = Path(__file__).with_name("migrations")


def _alembic() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(_SCRIPTS))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, target: str = "head") -> tuple[str | None, str]:
    """Bring the schema to the newest revision (or `target`); returns (before, after)."""
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
