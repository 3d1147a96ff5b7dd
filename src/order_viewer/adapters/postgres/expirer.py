"""The retention's deletes: orders, tombstones and trail entries past it removed in bounded
transactions."""

from __future__ import annotations

from datetime import datetime

from order_viewer.adapters.postgres.connection import DedicatedConnection, database_errors
from order_viewer.adapters.postgres.listener import notify_changes
from order_viewer.service.ports import (
    Expired,
)

# Oldest first, so that an interrupted sweep has removed the most overdue; SKIP LOCKED leaves
# the rows a batch is writing to the next sweep instead of waiting for (or blocking) it.
_EXPIRE_ORDERS = """
DELETE FROM orders WHERE order_uid IN (
    SELECT order_uid FROM orders WHERE date_created < %(before)s
    ORDER BY date_created LIMIT %(limit)s FOR UPDATE SKIP LOCKED
)
RETURNING order_uid
"""
_EXPIRE_TOMBSTONES = """
DELETE FROM order_tombstones WHERE order_uid IN (
    SELECT order_uid FROM order_tombstones WHERE deleted_at < %(before)s
    LIMIT %(limit)s FOR UPDATE SKIP LOCKED
)
"""

# By the time each entry was recorded (the BRIN index of migration 0004): a deletion's entry
# goes when its tombstone does, both recorded in one transaction.
_EXPIRE_TRAIL = """
DELETE FROM order_trail WHERE id IN (
    SELECT id FROM order_trail WHERE handled_at < %(before)s LIMIT %(limit)s
)
"""


class PostgresOrderExpirer:
    """Deletes orders past their retention in bounded transactions, over its own connection."""

    def __init__(self, database_url: str, instance: str) -> None:
        self._instance = instance
        self._connection = DedicatedConnection(database_url, "order-viewer-retention")

    def expire(self, before: datetime, limit: int) -> Expired:
        with database_errors(reset=self.close):
            connection = self._connection.get()
            with connection.transaction(), connection.cursor() as cursor:
                cursor.execute(_EXPIRE_ORDERS, {"before": before, "limit": limit})
                expired = tuple(str(uid) for (uid,) in cursor.fetchall())
                cursor.execute(_EXPIRE_TOMBSTONES, {"before": before, "limit": limit})
                tombstones = cursor.rowcount
                cursor.execute(_EXPIRE_TRAIL, {"before": before, "limit": limit})
                trail_entries = cursor.rowcount
                # Under a sender name of its own, so that this instance's listener hears the
                # sweep too: a sweep whose COMMIT went through but whose answer was lost is
                # retried finding nothing, and only the notification drops what it deleted.
                notify_changes(cursor, f"{self._instance}-retention", expired)
        return Expired(expired, tombstones, trail_entries)

    def close(self) -> None:
        self._connection.close()
