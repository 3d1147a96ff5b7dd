"""The HTTP app in-process, through httpx's ASGI transport, over the real PostgreSQL reader: the
answers to each case without a server process around them."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import Awaitable, Callable

import httpx
import pytest

from order_viewer.adapters.cache import CachedOrder, OrderCache
from order_viewer.adapters.http.api import create_app
from order_viewer.adapters.metrics import Metrics
from order_viewer.adapters.postgres.reader import PostgresOrderReader
from order_viewer.adapters.postgres.writer import PostgresOrderWriter
from order_viewer.domain.model import PreparedOrder, parse_order
from order_viewer.entrypoints.generate import make_order
from order_viewer.service.ingest import WriteTimeouts
from order_viewer.service.lookup import OrderLookup
from order_viewer.service.readiness import IngestHere, Liveness, Readiness
from tests.conftest import Stack, free_port
from tests.integration.test_api import HOSTILE_IDS

pytestmark = pytest.mark.integration

_rng = random.Random(77)


class App:
    def __init__(self, database_url: str) -> None:
        self.cache = OrderCache(100, absent_capacity=100)
        self.reader = PostgresOrderReader(database_url, 2)
        self.consuming = threading.Event()
        self.lookup = OrderLookup(self.reader, self.cache)
        self.listening = threading.Event()
        self.liveness = Liveness()
        self.metrics = Metrics(self.cache)
        self.readiness = Readiness(
            self.lookup.database_reachable,
            self.listening,
            IngestHere(self.consuming, WriteTimeouts(self.metrics), self.liveness),
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(create_app(self.lookup, self.readiness, self.metrics)),
            base_url="http://order-viewer",
        )


def run(database_url: str, scenario: Callable[[App], Awaitable[None]]) -> None:
    async def main() -> None:
        app = App(database_url)
        await app.reader.open()
        try:
            await scenario(app)
        finally:
            await app.client.aclose()
            await app.reader.close()

    asyncio.run(main())


def stored_order(stack: Stack) -> PreparedOrder:
    order = PreparedOrder.of(parse_order(json.dumps(make_order(_rng)).encode()), 0, 0)
    writer = PostgresOrderWriter(stack.database_url, "tests")
    try:
        writer.write([order])
    finally:
        writer.close()
    return order


def test_a_cached_order_is_served_with_its_etag_and_revalidated(stack: Stack) -> None:
    async def scenario(app: App) -> None:
        app.cache.put_written(
            {"cached-1": CachedOrder.of(b'{"order_uid":"cached-1"}', b"\x07" * 32)}
        )
        response = await app.client.get("/order/cached-1")
        assert response.status_code == 200
        assert response.content == b'{"order_uid":"cached-1"}'
        assert response.headers["cache-control"] == "no-cache"
        again = await app.client.get(
            "/order/cached-1", headers={"If-None-Match": response.headers["etag"]}
        )
        assert (again.status_code, again.content) == (304, b"")

    run(stack.database_url, scenario)


def test_a_miss_is_read_from_the_database_and_then_cached(stack: Stack) -> None:
    order = stored_order(stack)

    async def scenario(app: App) -> None:
        response = await app.client.get(f"/order/{order.order.order_uid}")
        assert response.status_code == 200
        assert response.content == order.document
        assert app.cache.get(order.order.order_uid) is not None

    run(stack.database_url, scenario)


def test_unknown_and_malformed_ids_get_their_own_answers(stack: Stack) -> None:
    async def scenario(app: App) -> None:
        missing = await app.client.get("/order/no-such-order")
        assert missing.status_code == 404
        assert missing.json() == {"error": "no order with this id", "order_uid": "no-such-order"}
        for hostile in HOSTILE_IDS:
            response = await app.client.get(f"/order/{hostile}")
            assert response.status_code == 400, hostile
            assert "error" in response.json(), hostile

    run(stack.database_url, scenario)


def test_an_id_found_absent_is_answered_from_memory_as_the_database_answered_it(
    stack: Stack,
) -> None:
    order = PreparedOrder.of(parse_order(json.dumps(make_order(_rng)).encode()), 0, 0)
    uid = order.order.order_uid

    async def scenario(app: App) -> None:
        first = await app.client.get(f"/order/{uid}")
        again = await app.client.get(f"/order/{uid}")
        for response in (first, again):
            assert response.status_code == 404
            assert response.json() == {"error": "no order with this id", "order_uid": uid}
            assert response.headers["content-type"] == "application/json"
        assert again.content == first.content
        assert app.cache.absent_hits == 1  # the second, without a query
        text = (await app.client.get("/metrics")).text
        assert "order_viewer_cache_absent_hits_total 1.0" in text
        assert 'route="/order/{order_uid}",status="404"} 2.0' in text
        writer = PostgresOrderWriter(stack.database_url, "another-instance")
        try:
            writer.write([order])
        finally:
            writer.close()
        app.cache.invalidate([uid])  # what the change listener does when it hears the store
        stored = await app.client.get(f"/order/{uid}")
        assert (stored.status_code, stored.content) == (200, order.document)

    run(stack.database_url, scenario)


def test_an_uncached_order_with_the_database_away_is_503_with_retry_after() -> None:
    url = f"postgresql://order_viewer:order_viewer@127.0.0.1:{free_port()}/order_viewer"

    async def scenario(app: App) -> None:
        response = await app.client.get("/order/anything")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        recent = await app.client.get("/orders")
        assert recent.status_code == 503
        ready = await app.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["not_ready"]["database"] == "unreachable"

    run(url, scenario)


def test_readiness_follows_the_listener_warm_up_and_consumption(stack: Stack) -> None:
    async def scenario(app: App) -> None:
        first = await app.client.get("/readyz")
        assert first.status_code == 503
        assert first.json()["not_ready"] == {
            "listener": "not listening for changes",
            "cache": "warming up",
            "consumer": "not consuming",
        }
        app.readiness.warmed.set()
        app.consuming.set()
        app.listening.set()
        ready = await app.client.get("/readyz")
        assert (ready.status_code, ready.json()["status"]) == (200, "ready")

    run(stack.database_url, scenario)


def test_liveness_fails_with_the_reason_while_a_part_is_stuck(stack: Stack) -> None:
    async def scenario(app: App) -> None:
        assert (await app.client.get("/livez")).json() == {"status": "ok"}
        app.liveness.stuck("consumer", "nothing fetched after 3 new consumers (orders/0 lag 7)")
        stuck = await app.client.get("/livez")
        assert stuck.status_code == 503
        assert stuck.json() == {
            "status": "stuck",
            "stuck": {"consumer": "nothing fetched after 3 new consumers (orders/0 lag 7)"},
        }
        # Liveness is not readiness: the orders are still served meanwhile.
        assert (await app.client.get("/order/no-such-order")).status_code == 404
        app.liveness.moving("consumer")
        live = await app.client.get("/livez")
        assert (live.status_code, live.json()) == (200, {"status": "ok"})

    run(stack.database_url, scenario)


def test_requests_are_counted_by_route_template_never_by_id(stack: Stack) -> None:
    async def scenario(app: App) -> None:
        await app.client.get("/order/counted-id")
        await app.client.get("/livez")
        text = (await app.client.get("/metrics")).text
        assert 'route="/order/{order_uid}",status="404"' in text
        assert 'route="/livez",status="200"' in text
        assert "counted-id" not in text

    run(stack.database_url, scenario)
