"""Debian's headless Chromium driven by Selenium through the system chromedriver: used by the page's
browser test and by scripts/serve_screenshot.py. Not a test module."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
INSTALL = "apt-get install -y chromium chromium-driver; pip install selenium"


class BrowserMissing(RuntimeError):
    """No Chromium, chromedriver or Selenium here."""


def chromium(profile: Path, width: int = 1280, height: int = 1100) -> Any:
    """A headless Chromium (Selenium WebDriver) with a fresh profile in ``profile`` and the browser
    console log kept; BrowserMissing says what to install when it cannot start."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BrowserMissing(f"selenium is not installed ({INSTALL})") from None
    if not (binary and driver):
        raise BrowserMissing(f"Debian's chromium and chromium-driver are not installed ({INSTALL})")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def upload(browser: Any, url: str, image: Path, timeout: float = 60) -> Any:
    """Open the page, choose ``image`` in its file picker and wait until its tags are shown; returns the
    WebDriverWait used."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, timeout)
    browser.get(url)
    wait.until(lambda b: b.execute_script("return document.body.dataset.ready") == "1")
    browser.find_element(By.ID, "file").send_keys(str(image))
    wait.until(lambda b: b.find_element(By.ID, "result").get_attribute("data-state") == "done")
    return wait


def show_heat_map(browser: Any, wait: Any, tag: str) -> Any:
    """Click ``tag`` in the list and wait for its heat map; returns the heat-map element."""
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, f'#tags .tag[data-tag="{tag}"]').click()
    wait.until(lambda b: b.find_element(By.ID, "heatmap").get_attribute("data-tag") == tag)
    return browser.find_element(By.ID, "heatmap")


def thumbnails_loaded(browser: Any) -> bool:
    return bool(browser.execute_script(
        "const imgs = [...document.querySelectorAll('#similar img')];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)"))
