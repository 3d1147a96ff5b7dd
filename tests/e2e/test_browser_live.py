"""The page keeps the order it shows current (its event stream), and tells from an order's trail
why an order is not found and what became of each of its messages (the History panel).

The trail tests need `GET /order/{id}/trail`: they run when the service has that route, and are
skipped, saying so, when it answers as if the path were an order id or an unknown route.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from order_viewer.entrypoints.generate import make_order
from tests.conftest import (
    RunningService,
    ServiceProcess,
    Stack,
    new_topics,
    produce,
    wait_until,
)
from tests.e2e.conftest import Tab

# One worker runs the module, so that its tests share its one service.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("browser_live")]

_rng = random.Random(2324)


@pytest.fixture(scope="module")
def service(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """This module's service, in place of the shared one: tombstones delete their orders."""
    topics = new_topics("live")
    process = ServiceProcess(
        stack,
        topics,
        tmp_path_factory.mktemp("browser-live"),
        KAFKA_TOMBSTONES="delete",
        BATCH_MAX_WAIT_MS="20",
    ).start()
    try:
        yield RunningService(stack, process, topics)
    finally:
        process.terminate()


def renamed(order: dict[str, Any], name: str) -> dict[str, Any]:
    return {**order, "delivery": {**order["delivery"], "name": name}}


def send(service: RunningService, *messages: tuple[str, dict[str, Any] | None]) -> None:
    """Produce these messages (a key and an order, or None for a tombstone), acknowledged."""
    produce(
        service.stack,
        service.topics.orders,
        [(key.encode(), None if o is None else json.dumps(o).encode()) for key, o in messages],
    )


def show(tab: Tab, order_uid: str) -> None:
    """Open the page on the order and wait until its stream is open."""
    with tab.page.expect_response(lambda r: r.url.endswith(f"/order/{order_uid}/events")):
        tab.open(f"/?id={order_uid}")
    tab.wait_loaded()


def shown_new_order(tab: Tab, service: RunningService) -> tuple[dict[str, Any], str]:
    """A new order stored, and the page open on it with its stream."""
    order = make_order(_rng)
    service.ingest([order])
    show(tab, order["order_uid"])
    return order, order["order_uid"]


def test_a_new_version_produced_while_the_page_is_open_appears_within_two_seconds(
    tab: Tab, service: RunningService
) -> None:
    order, uid = shown_new_order(tab, service)
    expect(tab.by("section-delivery")).to_contain_text(order["delivery"]["name"])
    expect(tab.by("live-status")).to_be_hidden()
    for name in ("Second Version", "Third Version"):
        send(service, (uid, renamed(order, name)))
        acknowledged = time.monotonic()
        expect(tab.by("section-delivery")).to_contain_text(name, timeout=2000)
        print(f"\n{name} on the page {time.monotonic() - acknowledged:.2f} s after sent")
        expect(tab.by("live-status")).to_contain_text("Updated at")
    expect(tab.by("status")).to_have_attribute("data-state", "loaded")
    # One stream, without a token in its URL: the lookups and it are all the page asked for.
    assert [url for url in tab.requests if url.endswith("/events")] == [
        f"{tab.base_url}/order/{uid}/events"
    ]
    tab.assert_clean()


def test_a_tombstone_makes_the_page_say_the_order_was_deleted(
    tab: Tab, service: RunningService
) -> None:
    order, uid = shown_new_order(tab, service)
    send(service, (uid, None))
    expect(tab.by("live-status")).to_contain_text("This order was deleted", timeout=2000)
    expect(tab.by("live-status")).to_have_attribute("data-state", "deleted")
    # Stored again later, it comes back on the page (opened once it is stored: an
    # acknowledgement alone let the page ask first and be told it was deleted).
    service.ingest([renamed(order, "Back Again")])
    tab.open(f"/?id={uid}")
    tab.wait_loaded()
    expect(tab.by("section-delivery")).to_contain_text("Back Again")
    tab.assert_clean()


def test_a_lookup_of_another_order_ends_the_stream_of_the_first(
    tab: Tab, service: RunningService
) -> None:
    first, second = make_order(_rng), make_order(_rng)
    service.ingest([first, second])
    show(tab, first["order_uid"])
    tab.by("order-input").fill(second["order_uid"])
    tab.by("order-input").press("Enter")
    tab.wait_loaded()
    # The first order's new version does not replace the second order on screen.
    send(service, (first["order_uid"], renamed(first, "Not Shown")))
    send(service, (second["order_uid"], renamed(second, "Shown Now")))
    expect(tab.by("section-delivery")).to_contain_text("Shown Now", timeout=2000)
    expect(tab.by("section-summary")).to_contain_text(second["order_uid"])
    expect(tab.by("section-delivery")).not_to_contain_text("Not Shown")
    tab.assert_clean()


# ---------------------------------------------------------------- trails


def trail_route_present(base_url: str) -> bool:
    """Whether the service has `GET /order/{id}/trail`: without it, the path is taken for an
    order id (400), or, were the order route narrower, is an unknown route (404 Not Found)."""
    response = httpx.get(f"{base_url}/order/e2eprobe{uuid.uuid4().hex[:8]}/trail", timeout=10)
    body = response.json()
    if response.status_code == 400 and str(body.get("error", "")).startswith("an order id"):
        return False
    return not (response.status_code == 404 and body == {"detail": "Not Found"})


def counted(service: RunningService, order_uid: str, outcome: str) -> int:
    """How many of the order's messages had this outcome, as its trail counts them."""
    trail = httpx.get(f"{service.base_url}/order/{order_uid}/trail?limit=1", timeout=10)
    return int(trail.json()["counts"][outcome]) if trail.status_code == 200 else 0


@pytest.fixture
def trails(service: RunningService) -> None:
    if not trail_route_present(service.base_url):
        pytest.skip("needs the trail API (GET /order/{id}/trail), which this service lacks")


@pytest.mark.usefixtures("trails")
def test_a_not_found_order_is_explained_from_its_trail(tab: Tab, service: RunningService) -> None:
    never = f"e2enever{uuid.uuid4().hex[:12]}"
    tab.open(f"/?id={never}")
    expect(tab.by("status")).to_contain_text("was never seen")

    rejected = make_order(_rng)
    rejected["payment"]["amount"] = -1
    uid = rejected["order_uid"]
    send(service, (uid, rejected), (uid, rejected))
    wait_until(lambda: counted(service, uid, "dead_lettered") == 2, 30, "both dead letters")
    tab.open(f"/?id={uid}")
    expect(tab.by("status")).to_contain_text(
        "not stored: dead-lettered 2 times, last at ", timeout=15_000
    )
    expect(tab.by("status")).to_contain_text("payment.amount")

    deleted = make_order(_rng)
    service.ingest([deleted])
    send(service, (deleted["order_uid"], None))
    wait_until(lambda: counted(service, deleted["order_uid"], "deleted") == 1, 30, "the delete")
    tab.open(f"/?id={deleted['order_uid']}")
    expect(tab.by("status")).to_contain_text("not stored: it was deleted at ", timeout=15_000)
    tab.assert_clean()


@pytest.mark.usefixtures("trails")
def test_the_history_panel_pages_through_the_trail_of_the_order_shown(
    tab: Tab, service: RunningService
) -> None:
    order = make_order(_rng)
    uid = order["order_uid"]
    service.ingest([order])
    # 59 more: one new version, then 58 identical redeliveries of it: 60 entries, two pages.
    newer = renamed(order, "Newer")
    send(service, *[(uid, newer)] * 59)

    wait_until(
        lambda: sum(counted(service, uid, outcome) for outcome in ("stored", "unchanged")) == 60,
        30,
        "the 60 messages to be handled",
    )
    entries = tab.by("history-entry")
    show(tab, uid)
    expect(tab.by("section-delivery")).to_contain_text("Newer")
    expect(tab.by("history")).to_be_visible()
    expect(entries).to_have_count(50, timeout=15_000)
    expect(entries.first).to_have_attribute("data-outcome", "stored")
    tab.by("history-more").click()
    expect(entries).to_have_count(60)
    # However the copies fell into batches, one of them stored the new version.
    expect(entries.and_(tab.page.locator("[data-outcome=stored]"))).to_have_count(2)
    expect(entries.and_(tab.page.locator("[data-outcome=unchanged]"))).to_have_count(58)
    expect(tab.by("history-more")).to_be_hidden()
    expect(tab.by("history-status")).to_contain_text("all shown")
    tab.assert_clean()
