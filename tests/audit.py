"""Checks shared by the ingestion and fault tests: what PostgreSQL holds, and whether it is
exactly what was produced."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.conftest import Stack, Topics, committed_lag, produce_orders, wait_until


def stored_documents(stack: Stack, uids: list[str]) -> dict[str, Any]:
    """The orders as served, after checking each equals its rebuild from the normalized tables."""
    with stack.connect() as connection:
        rows = connection.execute(
            "SELECT o.order_uid, o.document, v.document FROM orders o "
            "JOIN order_documents v USING (order_uid) WHERE o.order_uid = ANY(%s)",
            (uids,),
        ).fetchall()
    for uid, served, rebuilt in rows:
        assert json.loads(rebuilt) == json.loads(served), uid
    return {uid: json.loads(served) for uid, served, _ in rows}


def stored_count(stack: Stack, uids: list[str]) -> int:
    with stack.connect() as connection:
        return count_of(
            connection.execute(
                "SELECT count(*) FROM orders WHERE order_uid = ANY(%s)", (uids,)
            ).fetchone()
        )


def count_of(row: tuple[Any, ...] | None) -> int:
    """The count a `SELECT count(*)` returned: it returns one row, always."""
    assert row is not None
    count: int = row[0]
    return count


def row_counts(stack: Stack, uids: list[str]) -> dict[str, int]:
    with stack.connect() as connection:
        return {
            table: count_of(
                connection.execute(
                    f"SELECT count(*) FROM {table} WHERE order_uid = ANY(%s)",
                    (uids,),
                ).fetchone()
            )
            for table in ("orders", "delivery", "payment", "items")
        }


def wait_stored(stack: Stack, uids: list[str], timeout: float = 60) -> None:
    wait_until(
        lambda: row_counts(stack, uids)["orders"] == len(set(uids)),
        timeout,
        f"{len(set(uids))} orders to be stored",
        interval=0.25,
    )


def orphan_rows(stack: Stack) -> int:
    with stack.connect() as connection:
        return sum(
            count_of(
                connection.execute(
                    f"SELECT count(*) FROM {table} t "
                    "WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.order_uid = t.order_uid)"
                ).fetchone()
            )
            for table in ("delivery", "payment", "items")
        ) + count_of(
            connection.execute(
                "SELECT count(*) FROM orders o WHERE NOT EXISTS "
                "(SELECT 1 FROM delivery d WHERE d.order_uid = o.order_uid) OR NOT EXISTS "
                "(SELECT 1 FROM payment p WHERE p.order_uid = o.order_uid) OR NOT EXISTS "
                "(SELECT 1 FROM items i WHERE i.order_uid = o.order_uid)"
            ).fetchone()
        )


def stream(stack: Stack, topic: str, orders: list[dict[str, Any]], seconds: float) -> None:
    """Produce the orders spread over about `seconds`, so that faults land mid-stream."""
    chunks = 20
    size = max(1, len(orders) // chunks)
    for start in range(0, len(orders), size):
        produce_orders(stack, topic, orders[start : start + size])
        time.sleep(seconds / chunks)


def assert_stored_exactly(stack: Stack, topics: Topics, orders: list[dict[str, Any]]) -> None:
    expected = {order["order_uid"]: order for order in orders}
    wait_stored(stack, list(expected), timeout=180)
    assert stored_documents(stack, list(expected)) == expected
    assert row_counts(stack, list(expected))["items"] == sum(
        len(order["items"]) for order in orders
    )
    assert orphan_rows(stack) == 0
    wait_until(lambda: committed_lag(stack, topics) == 0, 60, "offsets committed to the end")
