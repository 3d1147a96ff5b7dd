"""The service layer: what the consumer and the HTTP app ask of orders, written once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from order_viewer.cache import CachedOrder, OrderCache
from order_viewer.model import InvalidOrder, Rejection, consistency_problems, parse_order
from order_viewer.store import (
    OrderSummary,
    PreparedOrder,
    RejectedByDatabase,
    StoredDocument,
    WriteResult,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Message:
    """One consumed message, as much of it as the service needs."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class RejectedMessage:
    message: Message
    rejection: Rejection


@dataclass(slots=True)
class BatchOutcome:
    inserted: int = 0
    replaced: int = 0
    unchanged: int = 0
    inconsistent: int = 0
    rejected: list[RejectedMessage] = field(default_factory=list)


class OrderWriter(Protocol):
    def write(self, batch: Sequence[PreparedOrder]) -> WriteResult: ...


class OrderReader(Protocol):
    async def documents(self, order_uids: list[str]) -> list[StoredDocument]: ...
    async def recent(self, limit: int) -> list[OrderSummary]: ...


@dataclass(slots=True)
class PreparedBatch:
    """A batch validated and serialized, ready to store: the newest message of each order."""

    messages: Sequence[Message]
    orders: dict[str, tuple[PreparedOrder, Message]]
    rejected: list[RejectedMessage]
    inconsistent: int


class OrderIngest:
    """Validates batches of messages (`prepare`), then stores their valid orders atomically and
    caches them (`store`): two steps, so that the consumer can prepare the next batch while the
    database writes this one."""

    def __init__(self, writer: OrderWriter, cache: OrderCache) -> None:
        self._writer = writer
        self._cache = cache

    def prepare(self, messages: Sequence[Message]) -> PreparedBatch:
        batch = PreparedBatch(messages, {}, [], 0)
        for message in messages:
            try:
                order = parse_order(message.value)
            except InvalidOrder as invalid:
                batch.rejected.append(RejectedMessage(message, invalid.rejection))
                continue
            if consistency_problems(order):
                batch.inconsistent += 1
            # Same key, same partition: a later message of an order_uid in the batch is newer.
            batch.orders[order.order_uid] = (
                PreparedOrder.of(order, message.partition, message.offset),
                message,
            )
        return batch

    def store(self, batch: PreparedBatch) -> BatchOutcome:
        """Raises TransientStoreError when the database is away: nothing of the batch was
        stored, and the caller retries the same batch."""
        outcome = BatchOutcome(inconsistent=batch.inconsistent, rejected=list(batch.rejected))
        if batch.orders:
            self._store([prepared for prepared, _ in batch.orders.values()], batch, outcome)
        return outcome

    def _store(
        self, orders: list[PreparedOrder], batch: PreparedBatch, outcome: BatchOutcome
    ) -> None:
        try:
            result = self._writer.write(orders)
        except RejectedByDatabase as refused:
            if len(orders) > 1:
                # One order the validator passed but the database refuses must not sink the
                # others: write each alone and dead-letter only the ones refused.
                for prepared in orders:
                    self._store([prepared], batch, outcome)
                return
            rejection = Rejection("db_rejected", f"the database refused the order: {refused}", None)
            outcome.rejected.append(
                RejectedMessage(batch.orders[orders[0].order.order_uid][1], rejection)
            )
            return
        outcome.inserted += len(result.inserted)
        outcome.replaced += len(result.replaced)
        outcome.unchanged += len(orders) - len(result.inserted) - len(result.replaced)
        self._cache.put_written(
            {
                uid: CachedOrder.of(batch.orders[uid][0].document, batch.orders[uid][0].sha256)
                for uid in (*result.inserted, *result.replaced)
            }
        )


class OrderLookup:
    """Finds orders for the HTTP side: `cached` from memory; `load` from the database.

    Loads are gathered: every id asked for while the event loop runs one step goes to the
    database in one query, and an id already on its way is not asked again, so a burst of
    misses costs a few queries rather than one each. What the database returns fills the cache.
    """

    MAX_IDS_PER_QUERY = 200

    def __init__(self, reader: OrderReader, cache: OrderCache) -> None:
        self._reader = reader
        self._cache = cache
        self._in_flight: dict[str, asyncio.Future[CachedOrder | None]] = {}
        self._queued: list[str] = []
        # Running queries, referenced so that the event loop does not collect them midway.
        self._tasks: set[asyncio.Task[None]] = set()

    def cached(self, order_uid: str) -> CachedOrder | None:
        return self._cache.get(order_uid)

    async def load(self, order_uid: str) -> CachedOrder | None:
        future = self._in_flight.get(order_uid)
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._in_flight[order_uid] = loop.create_future()
            if not self._queued:
                loop.call_soon(self._send_queued)
            self._queued.append(order_uid)
        # Shielded: one request giving up must not cancel the query the others wait for.
        return await asyncio.shield(future)

    def _send_queued(self) -> None:
        queued, self._queued = self._queued, []
        for start in range(0, len(queued), self.MAX_IDS_PER_QUERY):
            batch = queued[start : start + self.MAX_IDS_PER_QUERY]
            task = asyncio.get_running_loop().create_task(self._query(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _query(self, order_uids: list[str]) -> None:
        writes_before = self._cache.writes
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
        self._cache.fill(found, writes_before)
        for order_uid in order_uids:
            self._in_flight.pop(order_uid).set_result(found.get(order_uid))

    async def recent(self, limit: int) -> list[OrderSummary]:
        return await self._reader.recent(limit)
