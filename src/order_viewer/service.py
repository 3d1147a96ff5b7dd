"""The service layer: what the consumer and the HTTP app ask of orders, written once, over the
ports of `ports` (the adapters implement them; the unit tests fake them)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial

from order_viewer.model import (
    DB_REJECTED,
    InvalidOrder,
    PreparedOrder,
    Rejection,
    consistency_problems,
    parse_order,
    tombstone_uid,
)
from order_viewer.ports import (
    Cache,
    CachedOrder,
    DatabaseBusy,
    DatabaseUnavailable,
    DeadLetters,
    Deletion,
    Message,
    NewestDocuments,
    OrderExpirer,
    OrderReader,
    OrderSummary,
    OrderWriter,
    RejectedByDatabase,
    RejectedMessage,
    ServiceMetrics,
    Stopped,
    StoredVersions,
    WriteTimedOut,
    etag_of,
)
from order_viewer.retry import Health, Patience, retry

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_SECONDS = 10.0


@dataclass(slots=True)
class BatchOutcome:
    inserted: int = 0
    replaced: int = 0
    deleted: int = 0
    unchanged: int = 0
    inconsistent: int = 0
    rejected: list[RejectedMessage] = field(default_factory=list)


@dataclass(slots=True)
class PreparedBatch:
    """A batch validated and serialized, ready to store: the newest message of each order, a
    version in `orders` or a tombstone in `deletions`."""

    messages: Sequence[Message]
    orders: dict[str, tuple[PreparedOrder, Message]]
    rejected: list[RejectedMessage]
    inconsistent: int
    deletions: dict[str, tuple[Deletion, Message]] = field(default_factory=dict)


def prepare_batch(messages: Sequence[Message], delete_on_tombstone: bool = False) -> PreparedBatch:
    """Validate and serialize a batch; the newest message of each order_uid is the one kept. A
    tombstone (a key without a value) deletes its order if `delete_on_tombstone`, and is
    rejected as `empty_value` otherwise."""
    batch = PreparedBatch(messages, {}, [], 0)
    for message in messages:
        try:
            if message.value is None and delete_on_tombstone:
                uid = tombstone_uid(message.key)
                batch.orders.pop(uid, None)
                batch.deletions[uid] = (Deletion(uid, message.partition, message.offset), message)
                continue
            order = parse_order(message.value)
        except InvalidOrder as invalid:
            batch.rejected.append(RejectedMessage(message, invalid.rejection))
            continue
        if consistency_problems(order):
            batch.inconsistent += 1
        # Same key, same partition: a later message of an order_uid in the batch is newer.
        batch.deletions.pop(order.order_uid, None)
        batch.orders[order.order_uid] = (
            PreparedOrder.of(order, message.partition, message.offset),
            message,
        )
    return batch


class WriteTimeouts:
    """The writes that the database's deadlines cut: each counted by cause and logged with what
    blocked it, and the last one shown by readiness until a write gets through again."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics
        # Read by the event loop, replaced whole by the writing threads.
        self.failing: str | None = None

    def timed_out(self, timeout: WriteTimedOut) -> None:
        self._metrics.write_timed_out(timeout.cause)
        if timeout.blocker is not None:
            self.failing = f"writes timing out: blocked by {timeout.blocker}"
        else:
            self.failing = f"writes timing out ({timeout.cause}): {timeout}"
        log.warning("%s; the write is rolled back and retried", self.failing)

    def got_through(self) -> None:
        if self.failing is not None:
            self.failing = None
            log.info("writes get through again")


class OrderIngest:
    """A batch of messages goes through three steps, in this order:

    - `prepare_batch`: validate and serialize (the consumer does this for batch n+1 while the
      database writes batch n);
    - `store`: write the valid orders in one transaction, waiting out database outages, then
      cache them;
    - `settle`: send the rejected messages to the dead-letter topic and, only once it has
      acknowledged them, let the caller acknowledge the whole batch (store its offsets), so that
      no message is acknowledged before it is either stored or dead-lettered.
    """

    def __init__(
        self,
        writers: Sequence[OrderWriter],
        cache: Cache,
        dead_letters: DeadLetters,
        database: Patience,
        metrics: ServiceMetrics,
        *,
        delete_on_tombstone: bool = False,
    ) -> None:
        if not writers:
            raise ValueError("an ingest needs at least one writer")
        self._writers = writers
        self._cache = cache
        self._dead_letters = dead_letters
        self._database = database
        self._metrics = metrics
        self._delete_on_tombstone = delete_on_tombstone
        self._since_report: Counter[str] = Counter()
        self._last_report = time.monotonic()
        self.write_timeouts = WriteTimeouts(metrics)

    @property
    def lanes(self) -> int:
        """How many batches may be stored at once: one per writer, the lane `store` is given;
        the caller keeps each partition's batches on one lane, one at a time, so that they are
        stored in order."""
        return len(self._writers)

    def prepare(self, messages: Sequence[Message]) -> PreparedBatch:
        return prepare_batch(messages, self._delete_on_tombstone)

    def store(self, batch: PreparedBatch, lane: int = 0) -> BatchOutcome:
        """The batch's valid orders stored and cached by the writer of `lane`, retrying the
        whole batch while the database is away (storing a batch again changes nothing). Raises
        Stopped if a stop comes first. Batches of one lane are stored one at a time; those of
        different lanes may be stored at once, from different threads."""

        def attempt() -> BatchOutcome:
            started = time.perf_counter()
            outcome = BatchOutcome(inconsistent=batch.inconsistent, rejected=list(batch.rejected))
            if batch.orders or batch.deletions:
                try:
                    self._write(
                        self._writers[lane],
                        [prepared for prepared, _ in batch.orders.values()],
                        [deletion for deletion, _ in batch.deletions.values()],
                        batch,
                        outcome,
                    )
                except WriteTimedOut as timeout:
                    self.write_timeouts.timed_out(timeout)
                    raise
                self.write_timeouts.got_through()
            self._metrics.batch_written(time.perf_counter() - started)
            return outcome

        def forget_batch() -> None:
            # A connection lost during COMMIT leaves the attempt's fate unknown: if the server
            # committed, the retry finds nothing left to replace or delete, and this instance's
            # listener skips its own notifications, so no cached copy of the batch may outlive it.
            self._cache.invalidate([*batch.orders, *batch.deletions])
            self._metrics.retried("database")

        return retry(
            attempt,
            transient=(DatabaseUnavailable,),
            patience=self._database,
            on_retry=forget_batch,
        )

    def _write(
        self,
        writer: OrderWriter,
        orders: list[PreparedOrder],
        deletions: list[Deletion],
        batch: PreparedBatch,
        outcome: BatchOutcome,
    ) -> None:
        ticket = self._cache.ticket()
        try:
            result = writer.write(orders, deletions)
        except RejectedByDatabase as refused:
            if len(orders) + len(deletions) > 1:
                # One order the validator passed but the database refuses must not sink the
                # others: write each alone and dead-letter only the ones refused.
                for prepared in orders:
                    self._write(writer, [prepared], [], batch, outcome)
                for deletion in deletions:
                    self._write(writer, [], [deletion], batch, outcome)
                return
            rejection = Rejection(DB_REJECTED, f"the database refused the order: {refused}", None)
            message = (
                batch.orders[orders[0].order.order_uid][1]
                if orders
                else batch.deletions[deletions[0].order_uid][1]
            )
            outcome.rejected.append(RejectedMessage(message, rejection))
            return
        outcome.inserted += len(result.inserted)
        outcome.replaced += len(result.replaced)
        outcome.deleted += len(result.deleted)
        outcome.unchanged += (
            len(orders) + len(deletions)
            - len(result.inserted) - len(result.replaced) - len(result.deleted)
        )  # fmt: skip
        self._cache.put_written(
            {
                uid: CachedOrder.of(batch.orders[uid][0].document, batch.orders[uid][0].sha256)
                for uid in (*result.inserted, *result.replaced)
            },
            ticket,
        )
        if result.deleted:
            self._cache.invalidate(result.deleted)

    def settle(
        self,
        batch: PreparedBatch,
        outcome: BatchOutcome,
        acknowledge: Callable[[Sequence[Message]], None],
    ) -> None:
        """Dead-letter the rejected messages, then acknowledge the batch. Raises Stopped (and
        acknowledges nothing) if a stop comes while the dead-letter topic is away: the batch is
        then read again by whoever consumes next, and storing it again changes nothing."""
        for entry in outcome.rejected:
            message, rejection = entry.message, entry.rejection
            log.warning(
                "rejected message %s/%d@%d: %s (%s%s)",
                message.topic, message.partition, message.offset, rejection.code,
                rejection.message, f", field {rejection.field}" if rejection.field else "",
                extra={
                    "topic": message.topic, "partition": message.partition,
                    "offset": message.offset, "reason": rejection.code, "field": rejection.field,
                },
            )  # fmt: skip
        if outcome.rejected:
            self._dead_letters.send(outcome.rejected)
        acknowledge(batch.messages)
        self._report(batch, outcome)

    def _report(self, batch: PreparedBatch, outcome: BatchOutcome) -> None:
        """Count the batch, and log the throughput every few seconds."""
        self._metrics.batch_settled(
            outcome.inserted,
            outcome.replaced,
            outcome.deleted,
            (entry.rejection.code for entry in outcome.rejected),
            max((p.order.date_created for p, _ in batch.orders.values()), default=None),
        )
        since = self._since_report
        since.update(
            stored=outcome.inserted + outcome.replaced, dead_lettered=len(outcome.rejected)
        )
        elapsed = time.monotonic() - self._last_report
        if elapsed >= PROGRESS_INTERVAL_SECONDS:
            if since:
                log.info(
                    "stored %d orders (%.0f/s) and dead-lettered %d messages in the last %.0f s",
                    since["stored"], since["stored"] / elapsed, since["dead_lettered"], elapsed,
                )  # fmt: skip
            since.clear()
            self._last_report = time.monotonic()


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
    """Finds orders for the HTTP side: `cached` from memory; `load` from the database.

    Loads are gathered: every id asked for while the event loop runs one step goes to the
    database in one query, and an id already on its way is not asked again, so a burst of
    misses costs a few queries rather than one each. What the database returns fills the cache.
    """

    MAX_IDS_PER_QUERY = 200

    def __init__(self, reader: OrderReader, cache: Cache) -> None:
        self._reader = reader
        self._cache = cache
        self._in_flight: dict[str, asyncio.Future[CachedOrder | None]] = {}
        self._queued: list[str] = []
        # Running queries, referenced so that the event loop does not collect them midway.
        self._tasks: set[asyncio.Task[None]] = set()

    def cached(self, order_uid: str) -> CachedOrder | None:
        return self._cache.get(order_uid)

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
        self._cache.fill(found, ticket)
        for order_uid in order_uids:
            self._in_flight.pop(order_uid).set_result(found.get(order_uid))

    async def recent(self, limit: int) -> list[OrderSummary]:
        return await self._reader.recent(limit)

    async def database_reachable(self) -> bool:
        return await self._reader.ping()


class CacheCoherence:
    """Keeps this instance's cache in step with what the other instances commit (the `Changes`
    the change listener reports): a replaced or deleted order is dropped from the cache, and any
    read of it under way is not kept.

    While changes cannot be heard, the cache answers nothing (every lookup reads the database,
    or, if that cannot be reached either, gets what the cache kept). Once the listener listens
    again, every cached entry is checked against the stored version's digest, those that changed
    meanwhile are dropped, and only then does the cache answer again; this runs beside the
    listener (`in_background`), so changes are heard while it reads.
    """

    def __init__(
        self,
        cache: Cache,
        metrics: ServiceMetrics,
        stored_versions: StoredVersions,
        database: Patience,
        in_background: Callable[[Callable[[], object]], object],
    ) -> None:
        self._cache = cache
        self._metrics = metrics
        self._stored_versions = stored_versions
        self._database = database
        self._in_background = in_background
        self.listening_now = threading.Event()
        self._lock = threading.Lock()
        # Nothing is answered before the first LISTEN (a copy kept before could change unheard):
        # the start counts as a loss, so the first `listening` resumes the way any other does.
        cache.suspend()
        self._losses = 1
        # Failures of the check that are not the database being away (retried all the same).
        self._check = Patience(
            Health("the cache check", log), database.stop, database.max_backoff_seconds
        )

    def changed(self, order_uids: Sequence[str]) -> None:
        self._cache.invalidate(order_uids)
        self._metrics.heard_changes(len(order_uids))

    def lost(self) -> None:
        with self._lock:
            self._losses += 1
            self._cache.suspend()
        self.listening_now.clear()
        self._metrics.listener_state(listening=False)
        log.warning(
            "the change listener lost its connection: the cache answers nothing until it is "
            "listening again and the cached orders are checked"
        )

    def listening(self) -> None:
        self.listening_now.set()
        self._metrics.listener_state(listening=True)
        with self._lock:
            losses = self._losses
            if len(self._cache) == 0:
                # Nothing cached (at start, say): nothing to check.
                self._cache.resume()
                return
        self._in_background(partial(self._verify, losses))

    def _verify(self, losses: int) -> None:
        """Check the cached entries and let the cache answer again; the check is retried until
        it succeeds, a stop comes or the listener is lost again (whose reconnection checks
        anew): a cache left suspended for good would read the database for every lookup."""

        def attempt() -> tuple[int, int] | None:
            if self._lost_since(losses):
                return None
            etags = self._cache.etags()
            try:
                stored = retry(
                    partial(self._stored_versions, list(etags)),
                    transient=(DatabaseUnavailable,),
                    patience=self._database,
                )
            except Stopped:
                raise
            except Exception as error:
                raise _CheckFailed(f"{type(error).__name__}: {error}") from error
            stored_etags = {uid: etag_of(sha) for uid, sha in stored.items()}
            return len(etags), self._cache.verify(stored_etags, etags)

        checked = retry(attempt, transient=(_CheckFailed,), patience=self._check)
        with self._lock:
            if checked is None or self._losses != losses:
                return  # lost again meanwhile: the next reconnection checks again
            self._cache.resume()
        log.info(
            "the change listener is listening again: %d cached orders checked, %d had changed "
            "and were dropped; the cache answers again",
            *checked,
        )

    def _lost_since(self, losses: int) -> bool:
        with self._lock:
            return self._losses != losses


class _CheckFailed(Exception):
    """The cache check failed for another reason than the database being away."""


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
            len(expired.order_uids) < batch and expired.tombstones < batch
        ) or database.stop.is_set():
            break
    if total:
        log.info("deleted %d orders created before %s", total, before.isoformat())
    return total


class Liveness:
    """The loops that stopped moving and that the process cannot set going again by itself, each
    with the reason: `/livez` fails while there is one, so that the orchestrator restarts the
    process. A loop reports from its own thread; the event loop reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stuck: dict[str, str] = {}

    def stuck(self, part: str, reason: str) -> None:
        with self._lock:
            self._stuck[part] = reason

    def moving(self, part: str) -> None:
        with self._lock:
            self._stuck.pop(part, None)

    def not_live(self) -> dict[str, str]:
        with self._lock:
            return dict(self._stuck)


class Readiness:
    """What `/readyz` reports: the database reachable and writes getting through, the change
    listener listening, the cache warmed, the consumer consuming; and what `/livez` reports, the
    parts stuck for good. The start-up, listener and writing threads set the events and the write
    timeouts, and the event loop reads them."""

    def __init__(
        self,
        database_reachable: Callable[[], Awaitable[bool]],
        consuming: threading.Event,
        listening: threading.Event,
        write_timeouts: WriteTimeouts,
        liveness: Liveness,
    ) -> None:
        self._database_reachable = database_reachable
        self._consuming = consuming
        self._listening = listening
        self._write_timeouts = write_timeouts
        self._liveness = liveness
        self.warmed = threading.Event()
        # Set when a start-up step or the consumer failed for good: the process is stopping.
        self.failed = threading.Event()

    async def not_ready(self) -> dict[str, str]:
        not_ready = {}
        if not await self._database_reachable():
            not_ready["database"] = "unreachable"
        elif (failing := self._write_timeouts.failing) is not None:
            not_ready["database"] = failing
        if not self._listening.is_set():
            not_ready["listener"] = "not listening for changes"
        if not self.warmed.is_set():
            not_ready["cache"] = "warming up"
        if not self._consuming.is_set():
            not_ready["consumer"] = "not consuming"
        return not_ready

    def not_live(self) -> dict[str, str]:
        return self._liveness.not_live()
