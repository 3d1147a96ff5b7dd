"""ORDER_RETENTION_DAYS: orders older than the retention are deleted in bounded batches while
new ones keep being stored, in-process over the real adapters and in a running service."""

from __future__ import annotations

import json
import logging
import random
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest

from order_viewer.adapters.cache import CachedOrder, OrderCache
from order_viewer.adapters.metrics import Metrics
from order_viewer.adapters.postgres.expirer import PostgresOrderExpirer
from order_viewer.adapters.postgres.writer import PostgresOrderWriter
from order_viewer.domain.model import PreparedOrder, parse_order
from order_viewer.entrypoints.generate import make_order
from order_viewer.service.retention import expire_orders
from order_viewer.service.retry import Health, Patience
from tests.audit import orphan_rows, row_counts
from tests.conftest import (
    ServiceProcess,
    Stack,
    Topics,
    current_metric,
    produce_orders,
    served,
    wait_until,
)

pytestmark = pytest.mark.integration

_rng = random.Random(4004)


def aged(days: float) -> dict[str, Any]:
    order = make_order(_rng)
    created = datetime.now(UTC) - timedelta(days=days)
    order["date_created"] = created.isoformat().replace("+00:00", "Z")
    return order


def prepared(order: dict[str, Any], offset: int) -> PreparedOrder:
    return PreparedOrder.of(parse_order(json.dumps(order).encode()), 0, offset)


def store(stack: Stack, orders: list[dict[str, Any]]) -> None:
    writer = PostgresOrderWriter(stack.database_url, "seed")
    try:
        for start in range(0, len(orders), 500):
            chunk = orders[start : start + 500]
            writer.write([prepared(o, start + n) for n, o in enumerate(chunk)])
    finally:
        writer.close()


def test_expiry_deletes_exactly_the_old_orders_while_new_ones_are_written(stack: Stack) -> None:
    # Older than anything generated, so that other tests' orders in this database stay.
    old = [aged(20_000 + n / 100) for n in range(1500)]
    boundary = aged(19_000)  # younger than the retention below, but older than the generated
    store(stack, [*old, boundary])
    stop = threading.Event()
    written: list[str] = []

    def ingest() -> None:
        writer = PostgresOrderWriter(stack.database_url, "ingest")
        try:
            offset = 0
            while not stop.is_set():
                batch = [aged(1) for _ in range(50)]
                writer.write([prepared(o, offset + n) for n, o in enumerate(batch)])
                written.extend(o["order_uid"] for o in batch)
                offset += len(batch)
        finally:
            writer.close()

    cache = OrderCache(10_000)
    cached = prepared(old[0], 0)
    cache.put_written({old[0]["order_uid"]: CachedOrder.of(cached.document, cached.sha256)})
    metrics = Metrics(cache)
    database = Patience(Health("database", logging.getLogger("test.database")), stop, 0.1)
    expirer = PostgresOrderExpirer(stack.database_url, "sweeper")
    ingesting = threading.Thread(target=ingest)
    ingesting.start()
    try:
        wait_until(lambda: len(written) >= 100, 30, "ingestion to be under way")
        deleted = expire_orders(
            expirer, cache, metrics, database, retention=timedelta(days=19_500), batch=200
        )
        wait_until(lambda: len(written) >= 300, 30, "ingestion to go on")
    finally:
        stop.set()
        ingesting.join(30)
        expirer.close()
    assert deleted == len(old)
    assert cache.get(old[0]["order_uid"]) is None
    assert metrics.registry.get_sample_value("order_viewer_orders_expired_total") == len(old)
    assert row_counts(stack, [o["order_uid"] for o in old]) == {
        "orders": 0, "delivery": 0, "payment": 0, "items": 0,
    }  # fmt: skip
    assert row_counts(stack, [boundary["order_uid"], *written])["orders"] == 1 + len(written)
    assert orphan_rows(stack) == 0


def test_a_service_with_a_retention_deletes_old_orders_in_the_background(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    old = [aged(40 + n) for n in range(30)]
    recent = [aged(10) for _ in range(10)]
    store(stack, [*old, *recent])
    service = start_service(ORDER_RETENTION_DAYS="30", KAFKA_SESSION_TIMEOUT_MS="6000")
    fresh = [aged(0) for _ in range(20)]
    produce_orders(stack, topics.orders, fresh)
    wait_until(
        lambda: current_metric(service, "order_viewer_orders_expired_total") >= len(old),
        60,
        "the old orders to expire",
    )

    for order in fresh:
        wait_until(partial(served, service, order["order_uid"]), 30, "a new order to be served")
    for order in old[:5]:
        assert service.get(f"/order/{order['order_uid']}").status_code == 404
    assert row_counts(stack, [o["order_uid"] for o in old])["orders"] == 0
    assert row_counts(stack, [o["order_uid"] for o in recent])["orders"] == len(recent)
    # Other tests' generated orders, years old, go too.
    assert re.search(r"deleted \d+ orders created before", service.log())
