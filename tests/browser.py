"""A real headless Chromium (Debian's `chromium` + `chromium-driver`, driven by selenium) for the dashboard tests.

scripts/setup.sh installs both on a fresh Debian machine. Where the browser truly is missing the tests skip and say
how to install it; on CI (CI or SWARM_NODE_REQUIRE_BROWSER set) a missing browser fails instead: there it must run.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1400")


def _find(names: tuple[str, ...]) -> str | None:
    for n in names:
        path = shutil.which(n) or (n if os.path.isabs(n) and os.access(n, os.X_OK) else None)
        if path:
            return path
    return None


def _missing(why: str) -> None:
    msg = f"{why}; install it with `bash scripts/setup.sh` (apt-get install chromium chromium-driver)"
    if os.environ.get("CI") or os.environ.get("SWARM_NODE_REQUIRE_BROWSER"):
        pytest.fail(f"browser test required here: {msg}")
    pytest.skip(msg)


def chromium_driver(tmp: Path):
    """A selenium WebDriver on headless Chromium with a fresh profile under `tmp`; the caller quits it."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install -e '.[test]')")
    binary = _find(("chromium", "chromium-browser", "/usr/bin/chromium"))
    driver = _find(("chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"))
    if binary is None:
        _missing("no chromium binary on PATH")
    if driver is None:
        _missing("no chromedriver on PATH")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for f in FLAGS:
        opts.add_argument(f)
    opts.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-', dir=tmp)}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # an explicit driver path: selenium never runs its driver manager (which would try the network)
    return webdriver.Chrome(service=Service(driver), options=opts)
