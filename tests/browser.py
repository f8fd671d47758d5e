"""Headless Chromium for tests that look at pages as a person would (the checkout flow here;
screenshot tests of the batch summary later).

Debian's `chromium` driven by Debian's `chromedriver` through selenium: the system browser,
never a browser download (`scripts/ensure-chromium.sh`, run by `make test`, installs both).
Each browser gets a fresh profile directory and the flags that keep it from calling home, so
it only ever talks to the loopback servers a test starts.

    with chromium() as browser:
        browser.get(url)
        wait_for_element(browser, "#submit-order").click()
        screenshot(browser, tmp_path / "page.png")
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


def executables() -> tuple[str, str]:
    """(chromium, chromedriver), or a clear error saying how to get them."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        raise RuntimeError("headless Chromium not found; run `make test` or `bash scripts/ensure-chromium.sh` "
                           "(Debian packages chromium and chromium-driver)")
    return browser, driver


@contextmanager
def chromium(*, width: int = 1280, height: int = 900, timeout: float = 60.0) -> Iterator:
    """A selenium WebDriver on a freshly started headless Chromium; quit and cleaned up after."""
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium's manager: never download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = executables()
    profile = tempfile.mkdtemp(prefix="labsync-chromium-")
    options = Options()
    options.binary_location = browser
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(timeout)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for_element(driver, css: str, timeout: float = 30.0):
    """The first element matching `css`, once it is there (waits on the condition, not a sleep)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def wait_until(driver, predicate, timeout: float = 30.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: predicate(d))


def screenshot(driver, path: Path) -> Path:
    """The visible page as a PNG (the file tool and issue 13's screenshot tests read these)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not driver.save_screenshot(str(path)):
        raise RuntimeError(f"could not save a screenshot to {path}")
    return path
