"""The orders the HTTP side asks for: the cache warmed at start, then each id from memory or
the database (`OrderLookup`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from order_viewer.service.ports import (
    Absent,
    Cache,
    CachedOrder,
    DatabaseBusy,
    DatabaseUnavailable,
    NewestDocuments,
    OrderReader,
    OrderSummary,
    OrderTrail,
    ServiceMetrics,
)
from order_viewer.service.retry import Patience, retry

log = logging.getLogger(__name__)


def warm_up(
    cache: Cache, newest: NewestDocuments, database: Patience, metrics: ServiceMetrics
) -> int:
    """Fill the cache with the newest stored orders until one of its bounds is met, waiting out
    database outages; how many orders were loaded. Raises Stopped if a stop comes first."""
    started = time.perf_counter()

    def attempt() -> int:
        loaded = 0
        # The read is one snapshot: what changed after it began is not put in the cache.
        ticket = cache.ticket()
        with contextlib.closing(newest(cache.capacity)) as chunks:
            for chunk in chunks:
                loaded += cache.warm(
                    {doc.order_uid: CachedOrder.of(doc.document, doc.sha256) for doc in chunk},
                    ticket,
                )
                if cache.warm_full:
                    break
        return loaded

    loaded = retry(attempt, transient=(DatabaseUnavailable,), patience=database)
    seconds = time.perf_counter() - started
    metrics.warmed_up(seconds)
    log.info("cache warmed with %d orders in %.2f s", loaded, seconds)
    return loaded


class OrderLookup:
    """Finds orders for the HTTP side: `cached` from memory (an order, or ABSENT for one known
    not to be stored); `load` from the database.

    Loads are gathered: every id asked for while the event loop runs one step goes to the
    database in one query, and an id already on its way is not asked again, so a burst of
    misses costs a few queries rather than one each. What the database returns fills the cache,
    and so do the ids it did not find: a client polling for an order not there yet, or a flood
    of made-up ids, then costs no query a request.
    """

    MAX_IDS_PER_QUERY = 200

    def __init__(self, reader: OrderReader, cache: Cache) -> None:
        self._reader = reader
        self._cache = cache
        self._in_flight: dict[str, asyncio.Future[CachedOrder | None]] = {}
        self._queued: list[str] = []
        # Running queries, referenced so that the event loop does not collect them midway.
        self._tasks: set[asyncio.Task[None]] = set()

    def cached(self, order_uid: str) -> CachedOrder | Absent | None:
        return self._cache.look_up(order_uid)

    async def load(self, order_uid: str) -> CachedOrder | None:
        """The stored order, or None; raises DatabaseUnavailable when the database cannot be
        reached and the cache kept no copy (it keeps them, without answering from them, while
        it cannot hear other instances' changes: with the database away, none can be made).
        A busy database (DatabaseBusy) gets no kept copy served: others may be committing."""
        future = self._in_flight.get(order_uid)
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._in_flight[order_uid] = loop.create_future()
            if not self._queued:
                loop.call_soon(self._send_queued)
            self._queued.append(order_uid)
        try:
            # Shielded: one request giving up must not cancel the query the others wait for.
            return await asyncio.shield(future)
        except DatabaseBusy:
            raise
        except DatabaseUnavailable:
            kept = self._cache.kept(order_uid)
            if kept is None:
                raise
            return kept

    def _send_queued(self) -> None:
        queued, self._queued = self._queued, []
        for start in range(0, len(queued), self.MAX_IDS_PER_QUERY):
            batch = queued[start : start + self.MAX_IDS_PER_QUERY]
            task = asyncio.get_running_loop().create_task(self._query(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _query(self, order_uids: list[str]) -> None:
        ticket = self._cache.ticket()
        try:
            stored = await self._reader.documents(order_uids)
        except Exception as error:
            for order_uid in order_uids:
                future = self._in_flight.pop(order_uid)
                future.set_exception(error)
                # Marked retrieved, so a failure whose waiter already left is not logged as lost.
                future.exception()
            return
        found = {doc.order_uid: CachedOrder.of(doc.document, doc.sha256) for doc in stored}
        self._cache.fill(found, ticket, [uid for uid in order_uids if uid not in found])
        for order_uid in order_uids:
            self._in_flight.pop(order_uid).set_result(found.get(order_uid))

    async def recent(self, limit: int) -> list[OrderSummary]:
        return await self._reader.recent(limit)

    async def trail(self, order_uid: str, limit: int, after: int) -> OrderTrail | None:
        """A page of the order's trail (`OrderReader.trail`), always from the database."""
        return await self._reader.trail(order_uid, limit, after)

    async def database_reachable(self) -> bool:
        return await self._reader.ping()
