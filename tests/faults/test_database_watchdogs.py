"""Faults that leave PostgreSQL up but stuck, or cut the listener silently: a row lock another
session holds for a minute, the whole server stopped (SIGSTOP) for 20 s, and the listener's
backend terminated while a change goes unannounced. The watchdogs must act in each, and each
ends with the audit of what is stored and what every instance serves."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import httpx
import psycopg
import pytest

from order_viewer.domain.model import PreparedOrder, parse_order
from order_viewer.entrypoints.generate import make_order
from tests.audit import assert_stored_exactly, stored_documents, stream, wait_stored
from tests.coherence import INSTANCE_SETTINGS, versioned
from tests.conftest import (
    Servers,
    ServiceProcess,
    Stack,
    Topics,
    children,
    current_metric,
    encode_orders,
    produce,
    wait_until,
)
from tests.faults.test_coherence_faults import backends, listening, terminate

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SETTINGS = {
    **INSTANCE_SETTINGS,
    # A lock is waited for 3 s, a statement runs 6 s, an unanswered write is cut after 16 s.
    "DATABASE_WRITE_TIMEOUT_SECONDS": "3",
}


def assert_served_newest(services: Sequence[ServiceProcess], orders: list[dict[str, Any]]) -> None:
    """Every instance answers every order with its stored version: nothing stale is cached."""
    for service in services:
        # One client for all: a client of its own per request costs tens of milliseconds.
        with httpx.Client(base_url=service.base_url, timeout=10) as client:
            for order in orders:
                response = client.get(f"/order/{order['order_uid']}")
                assert response.status_code == 200
                assert response.json() == order, f"{service.base_url} {order['order_uid']}"


def all_stored(stack: Stack, orders: list[dict[str, Any]]) -> bool:
    """Every order stored in the version given (the audit then checks the rest)."""
    return stored_documents(stack, [o["order_uid"] for o in orders]) == {
        o["order_uid"]: o for o in orders
    }


def not_listening(service: ServiceProcess) -> bool:
    return not listening(service)


def ready(service: ServiceProcess) -> bool:
    return service.get("/readyz").status_code == 200


def cache_metric(service: ServiceProcess, name: str) -> float:
    return current_metric(service, f"order_viewer_cache_{name}")


def suspended_since(service: ServiceProcess, suspensions: float) -> bool:
    return cache_metric(service, "suspensions_total") > suspensions


def answering(service: ServiceProcess) -> bool:
    return cache_metric(service, "suspended") == 0


def write_timeouts(service: ServiceProcess, cause: str) -> float:
    return current_metric(service, "order_viewer_database_write_timeouts_total", cause=cause)


def test_a_row_lock_held_for_a_minute_times_writes_out_until_it_is_released(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    service = start_service(**SETTINGS)
    rng = random.Random(2201)
    orders = [make_order(rng) for _ in range(400)]
    locked = orders[0]
    produce(stack, topics.orders, encode_orders([locked]))
    wait_stored(stack, [locked["order_uid"]])
    newer = versioned(locked, 2)
    with psycopg.connect(stack.database_url) as holder:
        # An operator's open transaction, holding the row that a new version must replace.
        holder.execute(
            "SELECT 1 FROM orders WHERE order_uid = %s FOR UPDATE", (locked["order_uid"],)
        )
        locked_at = time.monotonic()
        stream(stack, topics.orders, [*orders[1:200], newer, *orders[200:]], seconds=5)
        blocker = f"pid {holder.info.backend_pid} (idle in transaction, its transaction open for "

        def readiness_names_the_blocker() -> bool:
            response = service.get("/readyz")
            database = response.json()["not_ready"].get("database", "")
            return response.status_code == 503 and database.startswith(
                f"writes timing out: blocked by {blocker}"
            )

        wait_until(readiness_names_the_blocker, 30, "readiness to name the blocking session")
        # Its log line goes through the log's writer thread, a moment after readiness says it.
        wait_until(
            lambda: f"writes timing out: blocked by {blocker}" in service.log(),
            10,
            "the log to name the blocking session",
        )
        time.sleep(max(0.0, 60 - (time.monotonic() - locked_at)))
        # Cut every 3 s, then retried after a backoff that grows to 5 s.
        timed_out = write_timeouts(service, "lock")
        assert timed_out >= 5
        assert service.get("/readyz").status_code == 503
        holder.rollback()
    released = time.monotonic()
    wait_until(partial(ready, service), 30, "readiness again")
    final = [newer, *orders[1:]]
    assert_stored_exactly(stack, topics, final)
    print(
        f"\nrow lock: held 60 s; {timed_out:.0f} writes cut by the lock timeout, each naming "
        f"the holder; all {len(final)} orders stored {time.monotonic() - released:.1f} s "
        "after the release"
    )
    assert "writes get through again" in service.log()
    assert write_timeouts(service, "statement") == write_timeouts(service, "unresponsive") == 0
    assert_served_newest([service], final)


def postgres_processes(servers: Servers) -> list[int]:
    """The postmaster and every process it started (backends, background workers)."""
    postmaster = int((servers.settings.pg_data / "postmaster.pid").read_text().split()[0])
    return [postmaster, *children(postmaster)]


@contextmanager
def postgres_frozen(servers: Servers) -> Iterator[None]:
    """PostgreSQL stopped (SIGSTOP) for the block: it accepts TCP connections and keeps them
    open, as its kernel still answers, but answers nothing."""
    processes = postgres_processes(servers)
    for pid in processes:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in processes:
            os.kill(pid, signal.SIGCONT)


def test_postgres_frozen_for_20_seconds_is_noticed_and_waited_out(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    services = [start_service(**SETTINGS), start_service(**SETTINGS)]
    rng = random.Random(2202)
    orders = [make_order(rng) for _ in range(300)]
    produce(stack, topics.orders, encode_orders([versioned(o, 1) for o in orders]))
    wait_stored(stack, [o["order_uid"] for o in orders])
    # Cached by both instances.
    assert_served_newest(services, [versioned(o, 1) for o in orders])
    newest = [versioned(o, 2) for o in orders]
    producer = threading.Thread(target=stream, args=(stack, topics.orders, newest, 10))
    producer.start()
    time.sleep(1)
    with postgres_frozen(stack.servers):
        frozen_at = time.monotonic()
        for service in services:
            # /metrics reads no database: it answers while PostgreSQL is stopped.
            wait_until(
                partial(not_listening, service), 12, "the listener to notice the stopped server"
            )
        noticed = time.monotonic() - frozen_at
        time.sleep(max(0.0, 20 - (time.monotonic() - frozen_at)))
    thawed = time.monotonic()
    producer.join()
    wait_until(partial(all_stored, stack, newest), 120, "the new versions stored")
    stored_after = time.monotonic() - thawed
    assert_stored_exactly(stack, topics, newest)
    for service in services:
        wait_until(partial(listening, service), 30, "the listener to listen again")
        wait_until(partial(ready, service), 30, "readiness again")
    print(
        f"\nPostgreSQL stopped 20 s: both listeners lost it within {noticed:.1f} s; all "
        f"{len(newest)} new versions stored {stored_after:.1f} s after SIGCONT"
    )
    cut = sum(write_timeouts(service, "unresponsive") for service in services)
    assert cut >= 1, "no write was cut while the server answered nothing"
    for service in services:
        log = service.log()
        assert "the change listener lost its connection" in log
        assert "the cache answers again" in log
    assert_served_newest(services, newest)


def test_a_terminated_listener_is_noticed_and_its_cache_checked_for_what_it_did_not_hear(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    services = [start_service(**SETTINGS), start_service(**SETTINGS)]
    rng = random.Random(2203)
    orders = [versioned(make_order(rng), 1) for _ in range(20)]
    produce(stack, topics.orders, encode_orders(orders))
    wait_stored(stack, [o["order_uid"] for o in orders])
    assert_served_newest(services, orders)
    # A change that no notification announces (written as the writer would, without one): only
    # the check after a lost listener connection can catch it.
    changed = versioned(orders[0], 2)
    stored = orders[0]["order_uid"]
    prepared = PreparedOrder.of(parse_order(json.dumps(changed).encode()), 0, 0)
    with stack.connect() as connection, connection.transaction():
        connection.execute(
            "UPDATE orders SET document = %s, content_sha256 = %s WHERE order_uid = %s",
            (prepared.document.decode(), prepared.sha256, stored),
        )
        connection.execute(
            "UPDATE delivery SET name = %s WHERE order_uid = %s",
            (changed["delivery"]["name"], stored),
        )
    for service in services:
        # Still the cached copy: nothing told the instances.
        assert service.get(f"/order/{stored}").json() == orders[0]
    suspensions = [cache_metric(service, "suspensions_total") for service in services]
    listeners = backends(stack, "order-viewer-listener")
    assert len(listeners) == len(services)
    terminated_at = time.monotonic()
    terminate(stack, listeners)
    for service, before in zip(services, suspensions, strict=True):
        wait_until(
            partial(suspended_since, service, before),
            5,
            "the instance to stop answering from its cache",
            interval=0.05,
        )
    noticed = time.monotonic() - terminated_at
    for service in services:
        wait_until(partial(listening, service), 30, "the listener to listen again")
        wait_until(partial(answering, service), 30, "the cache checked and answering again")
    print(f"\nlisteners terminated: both instances stopped answering from cache in {noticed:.2f} s")
    final = [changed, *orders[1:]]
    assert_served_newest(services, final)
    assert_stored_exactly(stack, topics, final)
    for service in services:
        assert "had changed and were dropped" in service.log()
        assert service.get("/readyz").status_code == 200
