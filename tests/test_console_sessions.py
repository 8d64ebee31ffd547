"""Console sessions end: signing out drops the cookie and is recorded in the ledger, so that no replica and no
restarted process takes a copy of it (SQLite and PostgreSQL; revision 0015), and a session of a user removed
from the config (or given another role) is no session any more."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from alembic import command
from sqlalchemy import inspect

from connector.config import load_config
from connector.errors import ConnectorError
from connector.ledger import migrate
from connector.ledger.engine import make_engine
from connector.testing import sqlite_url
from connector.web.console.auth import Limiter
from tests.console_harness import OPERATOR, console_app, csrf_of, write_console_config

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def _url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return sqlite_url(tmp_path / "ledger.db") if backend == "sqlite" else str(request.getfixturevalue("pg_schema_url"))


async def _status_with(app: object, cookie: str) -> int:
    """The status of the overview for a browser showing `cookie` (a copy of someone's session cookie)."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://console.test") as copy:  # type: ignore[arg-type]
        copy.cookies.set("connector_console", cookie)
        return (await copy.get("/console")).status_code


async def _signed_in(app: object) -> tuple[httpx.AsyncClient, str]:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://console.test")  # type: ignore[arg-type]
    token = csrf_of((await client.get("/console/login")).text)
    answer = await client.post("/console/login", data={"user": OPERATOR[0], "password": OPERATOR[1], "csrf": token})
    assert answer.status_code == 303
    return client, answer.cookies["connector_console"]


async def test_signing_out_ends_the_session(tmp_path: Path) -> None:
    app, ledger = console_app(write_console_config(tmp_path, sqlite_url(tmp_path / "ledger.db")))
    try:
        client, cookie = await _signed_in(app)
        page = await client.get("/console")
        assert page.status_code == 200
        out = await client.post("/console/logout", data={"csrf": csrf_of(page.text)})
        assert (out.status_code, out.headers["location"]) == (303, "/console/login")
        assert (await client.get("/console")).status_code == 303
        await client.aclose()
        # a copy of the signed-out cookie (kept by someone else) is no session either
        assert await _status_with(app, cookie) == 303
        again, _ = await _signed_in(app)  # signing in again gives a new session
        assert (await again.get("/console")).status_code == 200
        await again.aclose()
    finally:
        ledger.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_sign_out_holds_on_every_replica_and_after_a_restart(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two processes serving the console over one ledger: a session signed out on one is refused by the
    other and by a process started afterwards; the user's other sessions go on."""
    path = write_console_config(tmp_path, _url(backend, tmp_path, request))
    (one, one_ledger), (two, two_ledger) = console_app(path), console_app(path)
    ledgers = [one_ledger, two_ledger]
    try:
        client, cookie = await _signed_in(one)
        other, other_cookie = await _signed_in(one)
        await other.aclose()
        assert await _status_with(two, cookie) == 200  # one session, good on every replica
        page = await client.get("/console")
        assert (await client.post("/console/logout", data={"csrf": csrf_of(page.text)})).status_code == 303
        await client.aclose()
        assert await _status_with(two, cookie) == 303
        restarted, restarted_ledger = console_app(path)
        ledgers.append(restarted_ledger)
        assert await _status_with(restarted, cookie) == 303
        assert await _status_with(restarted, other_cookie) == 200  # only the session signed out ends
    finally:
        for ledger in ledgers:
            ledger.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_revision_0015_adds_and_removes_the_sign_out_table(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    engine = make_engine(_url(backend, tmp_path, request))
    try:
        migrate.upgrade(engine, "0014")
        assert not inspect(engine).has_table("console_signout")
        assert migrate.upgrade(engine, "0015") == ("0014", "0015")
        assert inspect(engine).has_table("console_signout")
        config = migrate._alembic()
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.downgrade(config, "0014")
        assert not inspect(engine).has_table("console_signout")
        assert migrate.current_revision(engine) == "0014"
    finally:
        engine.dispose()


async def test_a_user_removed_or_demoted_in_the_config_loses_the_session(tmp_path: Path) -> None:
    path = write_console_config(tmp_path, sqlite_url(tmp_path / "ledger.db"))
    app, ledger = console_app(path)
    client, cookie = await _signed_in(app)
    await client.aclose()
    ledger.dispose()
    text = path.read_text()
    for changed in (
        text.replace("olivia: {role: operator", "olivia: {role: viewer"),
        text.replace("    olivia:", "    # olivia:"),
    ):
        path.write_text(changed)
        again, ledger = console_app(path)
        try:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=again), base_url="http://console.test"
            ) as other:
                other.cookies.set("connector_console", cookie)
                assert (await other.get("/console")).status_code == 303
        finally:
            ledger.dispose()


def test_a_session_secret_short_enough_to_guess_is_refused_at_load(tmp_path: Path) -> None:
    """With a guessable secret anyone could sign an operator's cookie offline: the config is refused, and the
    message does not echo the secret."""
    path = write_console_config(tmp_path, sqlite_url(tmp_path / "ledger.db"))
    (tmp_path / "session.key").write_text("changeme\n")
    with pytest.raises(ConnectorError) as refused:
        load_config(path)
    assert "session_secret" in str(refused.value) and "32 or more" in str(refused.value)
    assert "changeme" not in str(refused.value)
    (tmp_path / "session.key").write_text("x" * 32 + "\n")
    assert load_config(path).console is not None


def test_a_flood_of_made_up_names_does_not_lift_a_block() -> None:
    """The limiter forgets keys when it holds too many, but never one that is blocked now."""
    limiter = Limiter(5, 900)
    target = ("olivia", "203.0.113.9")
    for _ in range(5):
        limiter.failed(target)
    assert limiter.blocked(target)
    for i in range(10_002):
        limiter.failed((f"made-up-{i}", "203.0.113.9"))
    assert limiter.blocked(target)
    assert not limiter.blocked(("made-up-1", "203.0.113.9"))
