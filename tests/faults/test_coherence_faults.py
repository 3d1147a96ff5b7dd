"""Faults in keeping instances in step and in deleting: the change listener's connection
terminated while versions flow, and a crash between a tombstone's delete and its commit."""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable
from functools import partial

import psycopg
import pytest

from order_viewer.entrypoints.generate import make_order
from tests.audit import orphan_rows, row_counts
from tests.coherence import INSTANCE_SETTINGS, Observer, update_in_rounds
from tests.conftest import (
    ServiceProcess,
    Stack,
    Topics,
    current_metric,
    metric_value,
    produce,
    produce_orders,
    scrape,
    served,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SETTINGS = {**INSTANCE_SETTINGS, "KAFKA_TOMBSTONES": "delete"}


def backends(stack: Stack, application: str) -> list[int]:
    with stack.connect() as connection:
        rows = connection.execute(
            "SELECT pid FROM pg_stat_activity "
            "WHERE application_name = %s AND datname = current_database()",
            (application,),
        ).fetchall()
    return [int(pid) for (pid,) in rows]


def terminate(stack: Stack, pids: list[int]) -> None:
    with stack.connect() as connection:
        for pid in pids:
            connection.execute("SELECT pg_terminate_backend(%s)", (pid,))


def listening(service: ServiceProcess) -> bool:
    return current_metric(service, "order_viewer_change_listener_connected") == 1


def test_a_terminated_listener_connection_never_leaves_a_stale_read(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    services = [start_service(**SETTINGS), start_service(**SETTINGS)]
    rng = random.Random(2002)
    orders = [make_order(rng) for _ in range(12)]
    killing = threading.Event()
    kills: list[int] = []

    def kill_listeners() -> None:
        # Over and over, so that changes are committed while a listener is away.
        while killing.is_set():
            pids = backends(stack, "order-viewer-listener")
            terminate(stack, pids)
            kills.extend(pids)
            time.sleep(0.3)

    with Observer(stack, services, [o["order_uid"] for o in orders]) as observer:
        update_in_rounds(stack, topics, observer, orders, range(3), pause=0.5)
        killing.set()
        killer = threading.Thread(target=kill_listeners)
        killer.start()
        try:
            update_in_rounds(stack, topics, observer, orders, range(3, 9), pause=0.5)
        finally:
            killing.clear()
            killer.join()
        for service in services:
            wait_until(partial(listening, service), 30, "the listener to listen again")
        update_in_rounds(stack, topics, observer, orders, range(9, 12), pause=1.2)
    assert len(kills) >= 2 * len(services)
    assert not observer.errors
    assert observer.stale_reads() == []
    print(
        f"\nlistener faults: {len(kills)} listener connections terminated over 6 rounds of "
        f"versions; {len(observer.reads)} reads over 2 instances, stale reads 0"
    )
    for service in services:
        samples = scrape(service)
        # One suspension as built, then one per lost connection.
        assert metric_value(samples, "order_viewer_cache_suspensions_total") >= 2
        assert service.get("/readyz").status_code == 200
        assert "the change listener lost its connection" in service.log()
        # Checked after a reconnection, and answering again.
        assert "the cache answers again" in service.log()
        assert metric_value(samples, "order_viewer_cache_suspended") == 0
        service.get(f"/order/{orders[0]['order_uid']}")  # cached now, if it was not
        hits = current_metric(service, "order_viewer_cache_hits_total")
        service.get(f"/order/{orders[0]['order_uid']}")
        assert current_metric(service, "order_viewer_cache_hits_total") == hits + 1


def test_a_crash_between_a_delete_and_its_commit_deletes_once_after_the_restart(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    service = start_service(**SETTINGS)
    rng = random.Random(2003)
    order, other = make_order(rng), make_order(rng)
    uid = order["order_uid"]
    produce_orders(stack, topics.orders, [order, other])
    wait_until(partial(served, service, uid), 30, "the order stored")
    with psycopg.connect(stack.database_url) as holder:
        # The row held, so that the tombstone's DELETE waits inside its transaction.
        holder.execute("SELECT 1 FROM orders WHERE order_uid = %s FOR UPDATE", (uid,))
        produce(stack, topics.orders, [(uid.encode(), None)])

        def delete_waiting() -> bool:
            with stack.connect() as connection:
                row = connection.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = 'order-viewer-writer' AND wait_event_type = 'Lock'"
                ).fetchone()
            return bool(row and row[0])

        wait_until(delete_waiting, 30, "the delete to wait for the held row")
        assert service.process is not None
        service.process.send_signal(signal.SIGKILL)
        service.process.wait()
        holder.rollback()
    wait_until(
        lambda: not backends(stack, "order-viewer-writer"), 30, "the killed writer's backend to end"
    )
    # Nothing of the uncommitted delete stayed.
    assert row_counts(stack, [uid])["orders"] == 1
    with stack.connect() as connection:
        tombstone = connection.execute(
            "SELECT count(*) FROM order_tombstones WHERE order_uid = %s", (uid,)
        ).fetchone()
    assert tombstone == (0,)

    restarted = start_service(**SETTINGS)
    wait_until(lambda: restarted.get(f"/order/{uid}").status_code == 404, 60, "the delete")
    assert row_counts(stack, [uid]) == {"orders": 0, "delivery": 0, "payment": 0, "items": 0}
    assert orphan_rows(stack) == 0
    assert current_metric(restarted, "order_viewer_orders_deleted_total") == 1
    restarted.terminate()

    # A new group reads the topic again from its start: the order's older message comes again
    # after its delete, and does not bring it back.
    again = start_service(**{**SETTINGS, "KAFKA_GROUP_ID": topics.group + "-again"})
    other_uid = other["order_uid"]
    wait_until(
        lambda: current_metric(again, "order_viewer_messages_consumed_total") == 3,
        60,
        "the topic read again",
    )
    wait_until(partial(served, again, other_uid), 30, "the other order")
    assert again.get(f"/order/{uid}").status_code == 404
    assert row_counts(stack, [uid])["orders"] == 0
    assert current_metric(again, "order_viewer_orders_deleted_total") == 0
