"""The operator console in a real headless Chromium (Debian's `chromium` and `chromium-driver`, which
scripts/test installs when missing), driven by Selenium, against the console served over HTTP on 127.0.0.1
with a real SQLite ledger.

Set CONNECTOR_CONSOLE_SCREENSHOTS=<folder> to save the overview and the detail page as PNG files there
(`scripts/console-screenshots` does it for the README's pictures in docs/).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connector.models import State
from connector.testing import Server, sqlite_url
from tests.browser import chromium, leave, navigate, needs_chromium
from tests.console_harness import (
    OPERATOR,
    VIEWER,
    Seeded,
    console_app,
    seed,
    seed_history,
    seed_journal,
    write_console_config,
)

pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By

pytestmark = needs_chromium
SHOTS = os.environ.get("CONNECTOR_CONSOLE_SCREENSHOTS")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Seeded, object]]:
    app, ledger = console_app(write_console_config(tmp_path, sqlite_url(tmp_path / "ledger.db"), secure_cookie=True))
    seeded = seed(ledger.engine)
    seed_journal(ledger.engine, seeded)
    seed_history(ledger.engine, datetime.now(UTC))
    with Server(app) as server:
        yield server.url, seeded, ledger
    ledger.dispose()


@pytest.fixture
def browser() -> Iterator[object]:
    with chromium(1280, 1400) as driver:
        yield driver


def sign_in(driver: object, url: str, who: tuple[str, str]) -> None:
    driver.get(f"{url}/console/notifications")  # type: ignore[attr-defined]
    assert driver.current_url == f"{url}/console/login"  # type: ignore[attr-defined]  # no session: sent to sign in
    driver.find_element(By.ID, "user").send_keys(who[0])  # type: ignore[attr-defined]
    driver.find_element(By.ID, "password").send_keys(who[1])  # type: ignore[attr-defined]
    navigate(driver, driver.find_element(By.ID, "sign-in"))  # type: ignore[attr-defined]
    assert driver.current_url == f"{url}/console"  # type: ignore[attr-defined]


def test_an_operator_finds_a_notification_resolves_it_and_sees_the_audit_entry(served, browser) -> None:  # type: ignore[no-untyped-def]
    url, seeded, ledger = served
    driver = browser
    sign_in(driver, url, OPERATOR)
    assert "Sources and mailer" in driver.page_source and driver.find_elements(By.CSS_SELECTOR, "svg.chart rect")
    if SHOTS:
        driver.save_screenshot(str(Path(SHOTS) / "console-overview.png"))

    navigate(driver, driver.find_element(By.LINK_TEXT, "Notifications"))
    driver.find_element(By.ID, "appointment_id").send_keys("appt-doubt")
    navigate(driver, driver.find_element(By.ID, "search"))
    rows = driver.find_elements(By.CSS_SELECTOR, "a.open")
    assert [r.text for r in rows] == [str(seeded.in_doubt)]
    navigate(driver, rows[0])
    assert driver.find_element(By.ID, "state").text == "in_doubt"
    assert "planned" in driver.find_element(By.ID, "timeline").text

    driver.find_element(By.CSS_SELECTOR, "input[value='resolve-sent']").click()
    driver.find_element(By.ID, "reason").send_keys("Paubox support found the message: it was sent")
    navigate(driver, driver.find_element(By.ID, "apply"))
    assert driver.find_element(By.ID, "state").text == "sent"
    timeline = driver.find_element(By.ID, "timeline").text
    assert "resolve-sent" in timeline and "Paubox support found the message" in timeline and OPERATOR[0] in timeline
    assert timeline.index("sending: sending") < timeline.index("outcome: in_doubt") < timeline.index("resolve-sent")
    assert ledger.console.detail(seeded.in_doubt).record.state is State.SENT  # type: ignore[attr-defined]
    if SHOTS:
        driver.save_screenshot(str(Path(SHOTS) / "console-detail.png"))

    navigate(driver, driver.find_element(By.LINK_TEXT, "Audit"))
    audit = driver.find_element(By.ID, "audit").text
    assert "resolve-sent" in audit and OPERATOR[0] in audit and "Paubox support found the message" in audit


def test_a_viewer_cannot_act_and_a_forged_post_is_refused(served, browser) -> None:  # type: ignore[no-untyped-def]
    url, seeded, ledger = served
    driver = browser
    sign_in(driver, url, VIEWER)
    driver.get(f"{url}/console/notifications/{seeded.failed}")
    assert not driver.find_elements(By.ID, "act") and driver.find_element(By.ID, "viewer-note")
    own_token = driver.find_element(By.CSS_SELECTOR, "input[name=csrf]").get_attribute("value")

    def post(fields: dict[str, str]) -> str:
        """Submit a form the page does not offer, as a forged page or a curious viewer would."""
        leave(
            driver,
            lambda: driver.execute_script(
                "const f = document.createElement('form'); f.method = 'post'; f.action = arguments[0];"
                "for (const [k, v] of Object.entries(arguments[1])) { const i = document.createElement('input');"
                " i.name = k; i.value = v; f.appendChild(i); } document.body.appendChild(f); f.submit();",
                f"{url}/console/notifications/{seeded.failed}/act",
                fields,
            ),
        )
        return str(driver.find_element(By.ID, "message").text)

    assert "viewers cannot act" in post({"csrf": own_token, "action": "retry", "reason": "let me try"})
    driver.get(f"{url}/console")
    assert "CSRF token is missing" in post({"action": "retry", "reason": "forged"})
    assert ledger.console.detail(seeded.failed).record.state is State.FAILED  # type: ignore[attr-defined]
