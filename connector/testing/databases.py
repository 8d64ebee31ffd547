"""Ledgers for a test: a private PostgreSQL schema (created, reached through `search_path`, dropped), a
SQLite file, and an engine with the ledger's schema migrated to the newest version."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from sqlalchemy.engine import Engine, make_url

from connector.ledger import migrate
from connector.ledger.engine import make_engine
from connector.testing.errors import HarnessError

# The PostgreSQL server of the tests: the `test` database on 127.0.0.1 (trust auth), or CONNECTOR_TEST_PG_URL.
PG_URL = os.environ.get("CONNECTOR_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _conninfo(server_url: str) -> str:
    url = make_url(server_url)
    password = f" password={url.password}" if url.password else ""
    return f"host={url.host} port={url.port or 5432} dbname={url.database} user={url.username}{password}"


def schema_url(server_url: str, schema: str) -> str:
    """`server_url` with every connection's `search_path` set to `schema`."""
    url = make_url(server_url).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


def create_schema(server_url: str = PG_URL, prefix: str = "t") -> str:
    """A new, empty schema `<prefix>_<random>`; its name. HarnessError when PostgreSQL cannot be reached."""
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(_conninfo(server_url), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
    except psycopg.OperationalError as exc:
        where = make_url(server_url).render_as_string(hide_password=True)
        raise HarnessError(
            f"PostgreSQL is not reachable at {where}: {type(exc).__name__}. "
            "./scripts/test starts it; or set CONNECTOR_TEST_PG_URL to another server."
        ) from None
    return schema


def drop_schema(schema: str, server_url: str = PG_URL) -> None:
    """Drop `schema` and everything in it (nothing when it is gone already)."""
    with psycopg.connect(_conninfo(server_url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@contextmanager
def pg_schema(server_url: str = PG_URL, prefix: str = "t", *, keep: bool = False) -> Iterator[str]:
    """A private, empty schema for the block; yields the ledger URL that uses it. Dropped at the end unless
    `keep`."""
    schema = create_schema(server_url, prefix)
    try:
        yield schema_url(server_url, schema)
    finally:
        if not keep:
            drop_schema(schema, server_url)


def sqlite_url(path: Path) -> str:
    """The ledger URL of a SQLite file."""
    return f"sqlite:///{path}"


@contextmanager
def migrated_engine(url: str) -> Iterator[Engine]:
    """The ledger's engine on `url` with its schema migrated to the newest version; disposed at the end."""
    engine = make_engine(url)
    try:
        migrate.upgrade(engine)
        yield engine
    finally:
        engine.dispose()


def ledger_engine(url: str) -> Engine:
    """The ledger's own engine on `url` (SQLite with its pragmas), as the daemon opens it; not migrated. The
    caller disposes of it."""
    return make_engine(url)
