"""The patients' link pages in a real headless Chromium (Debian's `chromium` and `chromium-driver`, which
scripts/browser installs), driven by Selenium, served over HTTP on 127.0.0.1 by the app `connector run`
serves, in the email's language: English for one patient, Dutch for the other."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.daemon import run_once, web_app
from connector.sandbox.fhir import FhirState
from connector.sandbox.paubox import SandboxState
from connector.testing import Server
from tests.browser import chromium, navigate, needs_chromium
from tests.factories import appointment
from tests.test_patient_links import PUBLIC, START, World, people

pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By

pytestmark = needs_chromium


@pytest.fixture
def served(tmp_path: Path, api_key_env: str) -> Iterator[tuple[str, World]]:
    fhir = FhirState()
    fhir.load(people())
    fhir.put(appointment("a1", "p1", START))
    fhir.put(appointment("a2", "p2", START))
    world = World(tmp_path, fhir, SandboxState(api_key="test-sandbox-key", username="clinic"), None)
    runtime = world.open()
    asyncio.run(run_once(runtime))
    with Server(web_app(runtime)) as server:
        yield server.url, world
    asyncio.run(runtime.aclose())


@pytest.fixture
def browser() -> Iterator[Any]:
    with chromium(800, 900) as driver:
        yield driver


@pytest.mark.parametrize(
    ("subject", "ask", "weekday_names", "done"),
    [
        ("Your appointment", "Will you come to this appointment?", ("day,",), "your clinic knows you will come"),
        ("Uw afspraak", "Komt u naar deze afspraak?", ("dag ",), "uw praktijk weet dat u komt"),
    ],
)
def test_the_confirm_page_in_the_emails_language_confirms_on_the_button_only(
    served: tuple[str, World], browser: Any, subject: str, ask: str, weekday_names: tuple[str, ...], done: str
) -> None:
    url, world = served
    link = world.links_of(subject)["confirm"].replace(PUBLIC, url)
    browser.get(link)
    assert browser.find_element(By.ID, "clinic").text == "Example Clinic"
    assert ask in browser.page_source
    when = browser.find_element(By.ID, "when").text
    assert any(name in when for name in weekday_names), when
    assert "Zebulon" not in browser.page_source and "Quixotica" not in browser.page_source
    assert world.responses() == []  # the page was shown: nothing written
    navigate(browser, browser.find_element(By.ID, "act"))
    assert done in browser.find_element(By.ID, "message").text
    [response] = world.responses()
    assert response["participantStatus"] == "accepted"


def test_the_unsubscribe_page_in_dutch_offers_the_category_or_everything(
    served: tuple[str, World], browser: Any
) -> None:
    url, world = served
    browser.get(world.links_of("Uw afspraak")["unsubscribe"].replace(PUBLIC, url))
    assert "Welke e-mails wilt u niet meer ontvangen?" in browser.page_source
    browser.find_element(By.CSS_SELECTOR, 'input[value="all"]').click()
    navigate(browser, browser.find_element(By.ID, "act"))
    assert browser.find_element(By.ID, "message").text == "U bent afgemeld."
    [entry] = world.runtimes[0].ledger.optouts.entries()
    assert entry.category == "" and entry.origin == "link"
