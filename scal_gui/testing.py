"""Running the app as a subprocess, for the browser tests and the startup benchmark."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

ROOT = Path(__file__).resolve().parent.parent
_URL_LINE = re.compile(r"Running on local URL:\s+http://[^:/\s]+:(\d+)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _served(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_until_served(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if _served(url):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{url} was not served within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _announced_port(process: subprocess.Popen, log: Path, timeout: float) -> int:
    """The port the app says it serves on (it moves on from a taken one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = _URL_LINE.search(log.read_text())
        if match:
            return int(match.group(1))
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"the app announced no URL within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextmanager
def app_server(*args: str, env: Optional[dict] = None, timeout: float = 60) -> Iterator[str]:
    """Start `python app.py ARGS` (on a free port unless ARGS name one), wait until its page is served on
    127.0.0.1 and yield that URL; stop the app afterwards."""
    if "--port" not in args:
        args = ("--port", str(free_port()), *args)
    with tempfile.TemporaryDirectory(prefix="scal-app-log-") as folder:
        log = Path(folder) / "app.log"
        with open(log, "w") as sink:
            process = subprocess.Popen([sys.executable, "app.py", *args], cwd=ROOT,
                                       env={**os.environ, **(env or {})}, stdout=sink, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{_announced_port(process, log, timeout)}/"
            wait_until_served(url, process, timeout, log)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


CHROMIUM = "/usr/bin/chromium"  # Debian's: Playwright's own browser downloads are not used
# headless without the sandbox (the tests may run as root), the GPU or background traffic
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@contextmanager
def chromium() -> Iterator:
    """Debian's Chromium driven by Playwright, for the block."""
    from playwright.sync_api import expect, sync_playwright

    # The suite runs two test processes at once: a page's update can wait seconds for the other's CPU,
    # so assertions wait longer than playwright's 5 s before they fail.
    expect.set_options(timeout=20_000)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_tab(browser, url: str, tab: str, viewport: dict):
    """A new page of the app at url, on its tab named tab."""
    page = browser.new_page(viewport=viewport)
    page.set_default_timeout(30_000)
    page.goto(url)
    page.get_by_role("tab", name=tab).click()
    return page

