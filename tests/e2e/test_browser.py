"""The web page at `/`, driven in a real (Debian) Chromium against the running service.

Needs the `service` fixture of tests/conftest.py: `service.base_url` and `service.ingest(orders)`;
the browser and its tabs come from tests/e2e/conftest.py.
"""

from __future__ import annotations

import copy
import json
import random
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from order_viewer.entrypoints.generate import SAMPLE_ORDER, make_order
from tests.conftest import RunningService
from tests.e2e.conftest import Tab

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = PROJECT_ROOT / "test-artifacts" / "order-page.png"
SAMPLE_ID = "b563feb7b2b84b6test"
HOSTILE_NAME = "<img src=x onerror=alert(1)>"
HOSTILE_ITEM = "<script>alert(2)</script>"

# One worker runs every browser test, so that they share one service and one browser.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("browser")]

expect.set_options(timeout=10_000)


def unique_id(tag: str) -> str:
    return f"e2e{tag}{uuid.uuid4().hex[:16]}"


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture(scope="module")
def sample(service: Any) -> dict[str, Any]:
    order = copy.deepcopy(SAMPLE_ORDER)
    service.ingest([order])
    return order


def test_page_is_served_with_a_strict_csp(tab: Tab) -> None:
    response = tab.page.goto(tab.base_url + "/")
    assert response is not None
    assert response.status == 200
    policy = response.headers.get("content-security-policy", "")
    assert "script-src 'self'" in policy, f"no strict Content-Security-Policy on /: {policy!r}"
    tab.assert_clean()


def test_typing_an_id_and_enter_shows_the_order(tab: Tab, sample: dict[str, Any]) -> None:
    page = tab.page
    tab.open("/")
    expect(tab.by("order-input")).to_be_focused()

    page.keyboard.type(SAMPLE_ID)
    page.keyboard.press("Enter")
    tab.wait_loaded()

    summary = tab.by("section-summary")
    expect(summary).to_contain_text(SAMPLE_ID)
    expect(summary).to_contain_text("WBILMTESTTRACK")
    expect(summary).to_contain_text("meest")
    expect(tab.by("section-delivery")).to_contain_text("Test Testov")
    expect(tab.by("section-delivery")).to_contain_text("Kiryat Mozkin")
    expect(tab.by("items-table")).to_contain_text("Mascaras")
    expect(tab.by("items-table")).to_contain_text("Vivienne Sabo")
    payment = tab.by("section-payment")
    expect(payment).to_contain_text(re.compile(r"(\$|USD)\s?18\.17"))  # amount 1817 cents
    expect(payment).to_contain_text(re.compile(r"(\$|USD)\s?15\.00"))  # delivery_cost 1500
    expect(payment).to_contain_text("wbpay")
    expect(page).to_have_url(re.compile(r"/\?id=b563feb7b2b84b6test$"))

    raw = tab.by("raw-json")
    expect(raw).to_be_hidden()
    tab.by("raw-json-toggle").click()
    expect(raw).to_be_visible()
    expect(raw).to_contain_text('"track_number": "WBILMTESTTRACK"')
    shown = json.loads(raw.text_content() or "")
    assert shown["order_uid"] == SAMPLE_ID
    assert shown["delivery"]["name"] == "Test Testov"
    assert shown["payment"]["amount"] == 1817
    tab.by("raw-json-toggle").click()
    expect(raw).to_be_hidden()
    tab.assert_clean()


def test_recent_orders_are_listed_and_open_on_click(tab: Tab, service: RunningService) -> None:
    rng = random.Random(20240601)
    orders = []
    for _ in range(2):
        order = make_order(rng, order_uid=unique_id("recent"))
        order["date_created"] = now_iso()  # newest of all, so in the first page of /orders
        orders.append(order)
    service.ingest(orders)

    page = tab.page
    tab.open("/")
    expect(tab.by("recent-orders")).to_have_attribute("data-state", "loaded")
    links = {o["order_uid"]: tab.by("recent-order").filter(has_text=o["order_uid"]) for o in orders}
    for link in links.values():
        expect(link).to_have_count(1)

    first, second = orders
    for order in (first, second):
        links[order["order_uid"]].click()
        tab.wait_loaded()
        expect(page).to_have_url(re.compile(rf"\?id={order['order_uid']}$"))
        expect(tab.by("section-summary")).to_contain_text(order["order_uid"])
        expect(tab.by("section-delivery")).to_contain_text(order["delivery"]["name"])
        expect(links[order["order_uid"]]).to_have_attribute("aria-current", "page")

    page.go_back()  # history follows the shown order
    expect(page).to_have_url(re.compile(rf"\?id={first['order_uid']}$"))
    expect(tab.by("section-summary")).to_contain_text(first["order_uid"])
    expect(tab.by("order-input")).to_have_value(first["order_uid"])
    page.go_forward()
    expect(tab.by("section-summary")).to_contain_text(second["order_uid"])
    tab.assert_clean()


def test_deep_link_opens_the_order(tab: Tab, service: RunningService) -> None:
    order = make_order(random.Random(7), order_uid=unique_id("deep"))
    service.ingest([order])

    tab.open(f"/?id={order['order_uid']}")
    tab.wait_loaded()
    expect(tab.by("section-summary")).to_contain_text(order["order_uid"])
    expect(tab.by("section-delivery")).to_contain_text(order["delivery"]["name"])
    expect(tab.by("items-table")).to_contain_text(order["items"][0]["name"])
    expect(tab.by("order-input")).to_have_value(order["order_uid"])
    assert tab.order_requests() == [f"{tab.base_url}/order/{order['order_uid']}"]
    tab.assert_clean()


def test_unknown_id_is_not_found_and_bad_ids_are_refused_without_a_request(
    tab: Tab, service: RunningService
) -> None:
    page = tab.page
    missing = unique_id("missing")
    tab.open("/")
    box = tab.by("order-input")
    box.fill(missing)
    box.press("Enter")
    status = tab.by("status")
    expect(status).to_have_attribute("data-state", "not-found")
    expect(status).to_contain_text(missing)
    expect(tab.by("section-summary")).to_be_hidden()
    expect(page).to_have_url(re.compile(rf"\?id={missing}$"))
    assert tab.order_requests() == [f"{tab.base_url}/order/{missing}"]

    for bad in ["../etc/passwd", "a b", "x" * 65, "<b>id</b>"]:
        box.fill(bad)
        box.press("Enter")
        expect(status).to_have_attribute("data-state", "bad-id")
        expect(status).to_contain_text(bad)
        expect(box).to_have_attribute("aria-invalid", "true")
    expect(page).to_have_url(re.compile(rf"\?id={missing}$"))  # a bad id is not pushed

    tab.open("/?id=..%2Fetc%2Fpasswd")
    expect(status).to_have_attribute("data-state", "bad-id")
    expect(status).to_contain_text("../etc/passwd")
    page.wait_for_timeout(300)  # room for a stray fetch to show up
    assert tab.order_requests() == [f"{tab.base_url}/order/{missing}"]
    tab.assert_clean()


def test_hostile_order_is_shown_as_text_and_runs_nothing(tab: Tab, service: RunningService) -> None:
    order = make_order(random.Random(666), order_uid=unique_id("hostile"))
    order["delivery"]["name"] = HOSTILE_NAME
    order["items"][0]["name"] = HOSTILE_ITEM
    service.ingest([order])

    page = tab.page
    tab.open(f"/?id={order['order_uid']}")
    tab.wait_loaded()
    expect(tab.by("section-delivery")).to_contain_text(HOSTILE_NAME)
    expect(tab.by("items-table")).to_contain_text(HOSTILE_ITEM)
    tab.by("raw-json-toggle").click()
    expect(tab.by("raw-json")).to_contain_text(HOSTILE_NAME)
    expect(page.locator("img")).to_have_count(0)
    expect(page.locator("script")).to_have_count(1)  # only /static/app.js
    page.wait_for_timeout(500)  # room for an onerror handler, were one injected

    assert tab.dialogs == []
    assert tab.foreign_requests() == [], f"requests outside {tab.base_url}"
    assert f"{tab.base_url}/x" not in tab.requests
    tab.assert_clean()


def test_a_deep_link_shows_a_person_every_part_of_the_order(
    tab: Tab, sample: dict[str, Any]
) -> None:
    """What someone sent a link to an order sees: the order's parts with their values, the
    summary on the first screen without scrolling, and nothing fetched from elsewhere. The
    screenshot is kept in test-artifacts/ for a person to look at."""
    tab.open(f"/?id={SAMPLE_ID}")
    tab.wait_loaded()
    expect(tab.by("recent-orders")).to_have_attribute("data-state", "loaded")
    expect(tab.by("section-summary")).to_be_in_viewport()
    for section, text in (
        ("section-summary", SAMPLE_ID),
        ("section-delivery", "Test Testov"),
        ("section-delivery", "+9720000000"),
        ("section-payment", "wbpay"),
        ("section-items", "Mascaras"),
    ):
        expect(tab.by(section)).to_be_visible()
        expect(tab.by(section)).to_contain_text(text)
    expect(tab.by("raw-json")).to_be_hidden()
    assert tab.foreign_requests() == [], f"requests outside {tab.base_url}"
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    tab.page.screenshot(path=str(SCREENSHOT), full_page=True)
    tab.assert_clean()


def test_api_docs_render_from_the_service_alone(tab: Tab) -> None:
    """Swagger UI comes with the package: a browser without internet access still shows the
    API to an operator."""
    tab.open("/docs")
    operation = tab.page.locator(".opblock-summary-path[data-path='/order/{order_uid}']")
    expect(operation).to_be_visible()
    assert tab.foreign_requests() == [], f"requests outside {tab.base_url}"
    tab.assert_clean()  # its Content-Security-Policy included
