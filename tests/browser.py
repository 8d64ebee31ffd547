"""What the browser tests share: Debian's headless Chromium driven by Selenium, and a way to follow a click to
the next page that does not race the browser.

`scripts/browser` installs `chromium` and `chromium-driver` when they are missing (`scripts/test` calls it)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

needs_chromium = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and shutil.which(DRIVER)),
        reason="needs Debian's chromium and chromium-driver (scripts/browser installs them)",
    ),
]


@contextmanager
def chromium(width: int, height: int) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.implicitly_wait(5)
    try:
        yield driver
    finally:
        driver.quit()


def navigate(driver: Any, element: Any) -> None:
    """Click `element` and wait until another document has loaded in its place."""
    leave(driver, element.click)


def leave(driver: Any, act: Callable[[], object]) -> None:
    """Do `act` (a click, a script that submits a form) and wait until another document has loaded.

    The page being left is marked with a window property first; the wait ends when a document without the
    mark has loaded. (Watching the old `<html>` element go stale instead races the browser: a query sent
    while the document is being replaced can fail with an "unknown error" rather than the stale reference
    it waits for.) Driver errors met while the page changes are retried until the timeout."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.wait import WebDriverWait

    driver.execute_script("window.leftByTest = true;")
    act()
    WebDriverWait(driver, 10, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script("return window.leftByTest !== true && document.readyState === 'complete';")
    )
