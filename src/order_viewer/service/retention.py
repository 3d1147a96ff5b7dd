"""The orders older than the retention deleted, from the database and the cache, with the
tombstones and trail entries recorded before it."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from functools import partial

from order_viewer.service.ports import (
    Cache,
    DatabaseUnavailable,
    OrderExpirer,
    ServiceMetrics,
)
from order_viewer.service.retry import Patience, retry

log = logging.getLogger(__name__)


def expire_orders(
    expirer: OrderExpirer,
    cache: Cache,
    metrics: ServiceMetrics,
    database: Patience,
    *,
    retention: timedelta,
    batch: int,
) -> int:
    """Delete the orders created more than `retention` ago, `batch` at a time (each batch its own
    short transaction, so that ingestion never waits long behind one), and drop them from the
    cache; waits out database outages. How many orders were deleted; raises Stopped if a stop
    comes first."""
    before = datetime.now(UTC) - retention
    total = 0
    while True:
        expired = retry(
            partial(expirer.expire, before, batch),
            transient=(DatabaseUnavailable,),
            patience=database,
            on_retry=partial(metrics.retried, "retention"),
        )
        if expired.order_uids:
            cache.invalidate(expired.order_uids)
            metrics.expired(len(expired.order_uids))
            total += len(expired.order_uids)
        if (
            len(expired.order_uids) < batch
            and expired.tombstones < batch
            and expired.trail_entries < batch
        ) or database.stop.is_set():
            break
    if total:
        log.info("deleted %d orders created before %s", total, before.isoformat())
    return total
