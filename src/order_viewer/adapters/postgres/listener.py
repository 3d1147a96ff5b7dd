"""The channel of changes: the writer and the expirer notify the orders they stored, replaced or
deleted in their transactions, and every instance's listener hears the others'."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import psycopg

from order_viewer.adapters.postgres.connection import KEEPALIVES, WATCHDOG, database_errors
from order_viewer.service.ports import (
    Changes,
    DatabaseUnavailable,
    Stopped,
)
from order_viewer.service.retry import Patience, retry

# The channel on which every instance hears which orders the others stored, replaced or deleted.
CHANGES_CHANNEL = "order_viewer_changes"
# PostgreSQL refuses a notification payload of 8,000 bytes or more.
_LARGEST_PAYLOAD = 7900


def change_payloads(instance: str, order_uids: Sequence[str]) -> Iterator[str]:
    """The notifications that name these orders: the sending instance (which has updated its
    own cache already), then the ids, space-separated, each payload under PostgreSQL's limit."""
    payload = instance
    for uid in order_uids:
        if len(payload) + 1 + len(uid) > _LARGEST_PAYLOAD:
            yield payload
            payload = instance
        payload += " " + uid
    if payload != instance:
        yield payload


def notify_changes(
    cursor: psycopg.Cursor[tuple[object, ...]], instance: str, order_uids: Sequence[str]
) -> None:
    # Sent within the transaction: PostgreSQL delivers it when, and only if, it commits. One
    # statement for all the payloads: one round trip inside the transaction, not one each.
    payloads = list(change_payloads(instance, order_uids))
    if payloads:
        cursor.execute(
            "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p", (CHANGES_CHANNEL, payloads)
        )


class PostgresChangeListener:
    """Hears, on a connection of its own, which orders other instances stored, replaced or
    deleted, and tells `changes`: `listening` once LISTEN is in place, `changed` for each
    notification from another instance, `lost` as soon as the connection is (then it connects
    again, waiting out the database's outages). `every_change` is told the same of every
    notification, this instance's own included (the streams of orders' changes watch them all).
    Runs until the stop of its `patience`."""

    # How often the loop looks at the stop while no notification comes.
    STOP_CHECK_SECONDS = 0.5
    # After this long without a notification, a round trip tells a quiet server from a frozen
    # one (whose kernel still answers keepalives); unanswered in time, the connection is cut
    # and counts as lost: a freeze is noticed within about the sum of the two.
    PROBE_AFTER_SECONDS = 3.0
    ANSWER_SECONDS = 3.0

    def __init__(
        self,
        database_url: str,
        instance: str,
        changes: Changes,
        patience: Patience,
        every_change: Changes,
    ) -> None:
        self._database_url = database_url
        self._instance = instance
        self._changes = changes
        self._patience = patience
        self._every_change = every_change

    def run(self) -> None:
        stop = self._patience.stop
        while not stop.is_set():
            try:
                connection = retry(
                    self._listen, transient=(DatabaseUnavailable,), patience=self._patience
                )
            except Stopped:
                return
            try:
                self._changes.listening()
                self._every_change.listening()
                self._hear(connection, stop)
            except psycopg.Error as error:
                self._changes.lost()
                self._every_change.lost()
                self._patience.health.failed(f"change listener: {str(error).strip()}")
            finally:
                connection.close()

    def _listen(self) -> psycopg.Connection[tuple[object, ...]]:
        with database_errors():
            connection = psycopg.connect(
                self._database_url,
                autocommit=True,
                connect_timeout=5,
                application_name="order-viewer-listener",
                **KEEPALIVES,
            )
            connection.execute(f"LISTEN {CHANGES_CHANNEL}")
        return connection

    def _hear(
        self, connection: psycopg.Connection[tuple[object, ...]], stop: threading.Event
    ) -> None:
        answered = time.monotonic()
        while not stop.is_set():
            for notification in connection.notifies(timeout=self.STOP_CHECK_SECONDS):
                answered = time.monotonic()
                instance, _, ids = notification.payload.partition(" ")
                if not ids:
                    continue
                order_uids = ids.split(" ")
                self._every_change.changed(order_uids)
                if instance != self._instance:
                    self._changes.changed(order_uids)
            if time.monotonic() - answered >= self.PROBE_AFTER_SECONDS:
                # Notifications that arrive meanwhile wait for the next notifies().
                with WATCHDOG.watch(connection, self.ANSWER_SECONDS):
                    connection.execute("SELECT 1")
                answered = time.monotonic()
