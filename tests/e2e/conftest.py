"""A real (Debian) Chromium for the page tests, and tabs that record what the page did.

`tab` opens the page of the `service` fixture: tests/conftest.py's shared service, unless a test
module defines a `service` of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Dialog,
    Locator,
    Page,
    Request,
    expect,
    sync_playwright,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass
class Tab:
    """A page plus everything it did: requests, console messages, errors and dialogs."""

    page: Page
    base_url: str
    requests: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def open(self, path: str = "/") -> None:
        self.page.goto(self.base_url + path)

    def by(self, test_id: str) -> Locator:
        return self.page.get_by_test_id(test_id)

    def foreign_requests(self) -> list[str]:
        """Requests that left the service (data: and blob: URLs stay in the browser)."""
        return [
            url
            for url in self.requests
            if not url.startswith(("data:", "blob:", self.base_url + "/"))
        ]

    def order_requests(self) -> list[str]:
        """The lookups of orders, not the stream or the trail of the order shown."""
        return [
            url
            for url in self.requests
            if "/order/" in url and not url.endswith("/events") and "/trail?" not in url
        ]

    def wait_loaded(self) -> None:
        expect(self.by("status")).to_have_attribute("data-state", "loaded")

    def assert_clean(self) -> None:
        """No script error, no Content-Security-Policy violation, no dialog."""
        assert self.errors == [], f"uncaught errors in the page: {self.errors}"
        violations = [m for m in self.console if "Content Security Policy" in m]
        assert violations == [], f"CSP violations: {violations}"
        assert self.dialogs == [], f"dialogs opened: {self.dialogs}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()


@pytest.fixture
def tab(browser: Browser, service: Any) -> Iterator[Tab]:
    context = browser.new_context(
        locale="en-US", timezone_id="UTC", viewport={"width": 1280, "height": 900}
    )
    context.set_default_timeout(10_000)
    page = context.new_page()
    tab = Tab(page=page, base_url=service.base_url.rstrip("/"))

    def on_dialog(dialog: Dialog) -> None:
        tab.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def on_console(message: ConsoleMessage) -> None:
        tab.console.append(f"{message.type}: {message.text}")

    def on_request(request: Request) -> None:
        tab.requests.append(request.url)

    page.on("dialog", on_dialog)
    page.on("console", on_console)
    page.on("pageerror", lambda error: tab.errors.append(str(error)))
    page.on("request", on_request)
    yield tab
    context.close()
