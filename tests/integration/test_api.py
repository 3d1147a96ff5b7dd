"""The HTTP API of a running service over the real servers."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

import httpx
import pytest

from order_viewer.entrypoints.generate import SAMPLE_ORDER, make_order
from tests.conftest import ServiceProcess, Stack, Topics, produce_orders, served, wait_until

pytestmark = pytest.mark.integration

HOSTILE_IDS = [
    "a" * 65,
    "x" * 5000,
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2fetc",
    "a%00b",
    "a%0Ab",
    "a%20b",
    "%27%20OR%201=1--",
    "1;DROP%20TABLE%20orders",
    "a/b",
    "%C3%A9t%C3%A9",
    "<script>",
]


def dated_now(order: dict[str, Any]) -> dict[str, Any]:
    """The order stamped with the current time, so that it is among the newest however many
    orders earlier tests left in the database (the recent list and the warm-up take the newest)."""
    stamped = copy.deepcopy(order)
    stamped["date_created"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return stamped


# What the `publish` fixture gives: produce orders, then wait until each is served.
Publish = Callable[[list[dict[str, Any]]], None]


@pytest.fixture
def sample(topics: Topics) -> dict[str, Any]:
    order = dated_now(SAMPLE_ORDER)
    order["order_uid"] = f"sample-{topics.group[-10:]}"
    return order


@pytest.fixture
def service(start_service: Callable[..., ServiceProcess]) -> ServiceProcess:
    return start_service()


@pytest.fixture
def publish(stack: Stack, topics: Topics, service: ServiceProcess) -> Publish:
    """Produces orders to the topic and waits until `service` serves each of them."""

    def produce_until_served(orders: list[dict[str, Any]]) -> None:
        produce_orders(stack, topics.orders, orders)
        for order in orders:
            wait_until(partial(served, service, order["order_uid"]), 30, "the order to be served")

    return produce_until_served


def test_round_trip_of_the_sample_and_generated_orders(
    service: ServiceProcess, publish: Publish, sample: dict[str, Any]
) -> None:
    rng = random.Random(3)
    orders = [sample, *(make_order(rng) for _ in range(50))]
    publish(orders)
    for order in orders:
        response = service.get(f"/order/{order['order_uid']}")
        assert response.headers["content-type"] == "application/json"
        assert response.json() == order
        assert response.headers["etag"]
        assert "no-cache" in response.headers["cache-control"]

    recent = service.get("/orders", params={"limit": 100}).json()["orders"]
    by_uid = {summary["order_uid"]: summary for summary in recent}
    assert by_uid[sample["order_uid"]] == {
        "order_uid": sample["order_uid"],
        "date_created": sample["date_created"],
        "customer_id": "test",
        "amount": 1817,
        "currency": "USD",
        "item_count": 1,
    }


def test_errors_are_clear_and_never_500(service: ServiceProcess) -> None:
    unknown = service.get("/order/no-such-order")
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "no order with this id", "order_uid": "no-such-order"}

    for hostile in HOSTILE_IDS:
        response = httpx.get(f"{service.base_url}/order/{hostile}", timeout=10)
        assert response.status_code == 400, hostile
        assert "error" in response.json()

    for bad_limit in ("0", "101", "-1", "abc", "1e9"):
        response = service.get("/orders", params={"limit": bad_limit})
        assert response.status_code == 400, bad_limit
        assert "error" in response.json()

    assert service.get("/livez").json() == {"status": "ok"}
    assert service.get("/readyz").json() == {"status": "ready", "not_ready": {}}
    schema = service.get("/openapi.json").json()
    assert {"/order/{order_uid}", "/orders", "/livez", "/readyz"} <= set(schema["paths"])
    assert "Order" in schema["components"]["schemas"]
    assert service.get("/docs").status_code == 200


def test_etag_revalidation(
    service: ServiceProcess, publish: Publish, sample: dict[str, Any]
) -> None:
    publish([sample])
    first = service.get(f"/order/{sample['order_uid']}")
    again = service.get(
        f"/order/{sample['order_uid']}", headers={"If-None-Match": first.headers["etag"]}
    )
    assert again.status_code == 304
    assert again.content == b""
    stale = service.get(f"/order/{sample['order_uid']}", headers={"If-None-Match": '"other"'})
    assert stale.status_code == 200


def test_page_is_served_with_a_strict_policy(service: ServiceProcess) -> None:
    page = service.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self'" in policy
    assert service.get("/static/app.js").status_code == 200


def test_database_down_cached_orders_200_uncached_503(
    stack: Stack, service: ServiceProcess, publish: Publish, sample: dict[str, Any]
) -> None:
    publish([sample])
    stack.servers.pg_stop()
    try:
        cached = service.get(f"/order/{sample['order_uid']}")
        assert cached.status_code == 200
        assert cached.json() == sample
        uncached = service.get("/order/not-cached-anywhere")
        assert uncached.status_code == 503
        assert uncached.headers["retry-after"]
        assert "error" in uncached.json()
        ready = service.get("/readyz")
        assert ready.status_code == 503
        assert "database" in ready.json()["not_ready"]
    finally:
        stack.servers.pg_start()
    wait_until(lambda: service.get("/readyz").status_code == 200, 30, "readiness to return")


def test_restart_serves_stored_orders_from_the_warmed_cache(
    stack: Stack,
    start_service: Callable[..., ServiceProcess],
    service: ServiceProcess,
    publish: Publish,
    sample: dict[str, Any],
) -> None:
    rng = random.Random(8)
    orders = [sample, *(dated_now(make_order(rng)) for _ in range(20))]
    publish(orders)
    assert service.terminate() == 0

    restarted = start_service()
    stack.servers.pg_stop()
    try:
        for order in orders:
            response = restarted.get(f"/order/{order['order_uid']}")
            assert response.status_code == 200
            assert response.json() == order
    finally:
        stack.servers.pg_start()


def test_access_log_names_requests_without_their_headers(
    start_service: Callable[..., ServiceProcess],
) -> None:
    service = start_service(HTTP_ACCESS_LOG="true")
    service.get("/order/unknown-order", headers={"Authorization": "Bearer s3cret"})
    wait_until(lambda: "/order/unknown-order" in service.log(), 10, "the access log line")
    line = next(line for line in service.log().splitlines() if "/order/unknown-order" in line)
    assert '"GET /order/unknown-order HTTP/1.1" 404' in line
    assert "s3cret" not in service.log()
