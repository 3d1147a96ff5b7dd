"""Ingest: a batch of consumed messages parsed, stored and dead-lettered (`OrderIngest`), over the
ports of `ports` (the adapters implement them; the unit tests fake them)."""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

from order_viewer.domain.model import (
    DB_REJECTED,
    InvalidOrder,
    PreparedOrder,
    Rejection,
    consistency_problems,
    key_uid,
    parse_order,
    tombstone_uid,
)
from order_viewer.service.ports import (
    BatchTrace,
    CachedOrder,
    ConsumedMessage,
    DatabaseUnavailable,
    DeadLetters,
    DeadLetterTrail,
    Deletion,
    Handled,
    MessageTracing,
    OrderWriter,
    RejectedByDatabase,
    RejectedMessage,
    ServiceMetrics,
    SettledBatch,
    WriteTimedOut,
    WrittenOrders,
)
from order_viewer.service.retry import Patience, retry

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
    version in `orders` or a tombstone in `deletions`, and in `superseded` the valid messages
    that a later one of their order in the batch replaced."""

    messages: Sequence[ConsumedMessage]
    orders: dict[str, tuple[PreparedOrder, ConsumedMessage]]
    rejected: list[RejectedMessage]
    inconsistent: int
    deletions: dict[str, tuple[Deletion, ConsumedMessage]] = field(default_factory=dict)
    superseded: list[Handled] = field(default_factory=list)

    def handled(self) -> list[Handled]:
        """Every valid message of the batch, for the trails of their orders."""
        return [
            *(
                Handled(uid, message, prepared.sha256)
                for uid, (prepared, message) in self.orders.items()
            ),
            *(Handled(uid, message, None) for uid, (_, message) in self.deletions.items()),
            *self.superseded,
        ]

    # The messages' spans, when tracing is on.
    trace: BatchTrace | None = None


def prepare_batch(
    messages: Sequence[ConsumedMessage], delete_on_tombstone: bool = False
) -> PreparedBatch:
    """Validate and serialize a batch; the newest message of each order_uid is the one kept. A
    tombstone (a key without a value) deletes its order if `delete_on_tombstone`, and is
    rejected as `empty_value` otherwise."""
    batch = PreparedBatch(messages, {}, [], 0)
    for message in messages:
        try:
            if message.value is None and delete_on_tombstone:
                uid = tombstone_uid(message.key)
                _supersede(batch, uid)
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
        _supersede(batch, order.order_uid)
        batch.deletions.pop(order.order_uid, None)
        batch.orders[order.order_uid] = (
            PreparedOrder.of(order, message.partition, message.offset),
            message,
        )
    return batch


def _supersede(batch: PreparedBatch, uid: str) -> None:
    """The message of `uid` kept so far in the batch, if any, counted among those superseded
    (the caller puts the later one in its place)."""
    earlier = batch.orders.get(uid)
    if earlier is not None:
        batch.superseded.append(Handled(uid, earlier[1], earlier[0].sha256, superseded=True))
    deletion = batch.deletions.get(uid)
    if deletion is not None:
        batch.superseded.append(Handled(uid, deletion[1], None, superseded=True))


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
      acknowledged them (and their orders' trails have recorded them), let the caller
      acknowledge the whole batch (store its offsets), so that no message is acknowledged
      before it is either stored or dead-lettered.

    With `trail` (ORDER_TRAIL_ENABLED), every message whose order is known is added to its
    order's trail where its outcome is decided: the writer's transaction for what was stored,
    unchanged, older or deleted, `trail` for the dead letters.
    """

    def __init__(
        self,
        writers: Sequence[OrderWriter],
        cache: WrittenOrders,
        dead_letters: DeadLetters,
        database: Patience,
        metrics: ServiceMetrics,
        *,
        delete_on_tombstone: bool = False,
        trail: DeadLetterTrail | None = None,
        tracing: MessageTracing | None = None,
    ) -> None:
        if not writers:
            raise ValueError("an ingest needs at least one writer")
        self._writers = writers
        self._trail = trail
        self._cache = cache
        self._dead_letters = dead_letters
        self._database = database
        self._metrics = metrics
        self._delete_on_tombstone = delete_on_tombstone
        self._tracing = tracing
        self._since_report: Counter[str] = Counter()
        self._last_report = time.monotonic()
        self.write_timeouts = WriteTimeouts(metrics)

    @property
    def lanes(self) -> int:
        """How many batches may be stored at once: one per writer, the lane `store` is given;
        the caller keeps each partition's batches on one lane, one at a time, so that they are
        stored in order."""
        return len(self._writers)

    def prepare(self, messages: Sequence[ConsumedMessage]) -> PreparedBatch:
        # The messages' spans begin before their validation, and end when they are settled.
        trace = None if self._tracing is None else self._tracing.batch(messages)
        batch = prepare_batch(messages, self._delete_on_tombstone)
        batch.trace = trace
        return batch

    def store(self, batch: PreparedBatch, lane: int = 0) -> BatchOutcome:
        """The batch's valid orders stored and cached by the writer of `lane`, retrying the
        whole batch while the database is away (storing a batch again changes nothing). Raises
        Stopped if a stop comes first. Batches of one lane are stored one at a time; those of
        different lanes may be stored at once, from different threads."""

        def attempt() -> BatchOutcome:
            started = time.perf_counter()
            outcome = BatchOutcome(inconsistent=batch.inconsistent, rejected=list(batch.rejected))
            if batch.orders or batch.deletions:
                writing = (
                    nullcontext()
                    if batch.trace is None
                    else batch.trace.writing(len(batch.orders), len(batch.deletions))
                )
                try:
                    with writing:
                        self._write(
                            self._writers[lane],
                            [prepared for prepared, _ in batch.orders.values()],
                            [deletion for deletion, _ in batch.deletions.values()],
                            batch,
                            outcome,
                            handled=batch.handled() if self._trail is not None else [],
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
        *,
        handled: list[Handled],
    ) -> None:
        ticket = self._cache.ticket()
        try:
            result = writer.write(orders, deletions, handled)
        except RejectedByDatabase as refused:
            if len(orders) + len(deletions) > 1:
                # One order the validator passed but the database refuses must not sink the
                # others: write each alone (with its messages' trail) and dead-letter only the
                # ones refused.
                of_order: defaultdict[str, list[Handled]] = defaultdict(list)
                for entry in handled:
                    of_order[entry.order_uid].append(entry)
                for prepared in orders:
                    uid = prepared.order.order_uid
                    self._write(writer, [prepared], [], batch, outcome, handled=of_order[uid])
                for deletion in deletions:
                    uid = deletion.order_uid
                    self._write(writer, [], [deletion], batch, outcome, handled=of_order[uid])
                return
            rejection = Rejection(DB_REJECTED, f"the database refused the order: {refused}", None)
            message = (
                batch.orders[orders[0].order.order_uid][1]
                if orders
                else batch.deletions[deletions[0].order_uid][1]
            )
            outcome.rejected.append(RejectedMessage(message, rejection))
            return
        if batch.trace is not None:
            batch.trace.written(result)
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
        acknowledge: Callable[[Sequence[ConsumedMessage]], None],
    ) -> None:
        """Dead-letter the rejected messages, record them in their orders' trails, then
        acknowledge the batch. Raises Stopped (and acknowledges nothing) if a stop comes while
        the dead-letter topic or the database is away: the batch is then read again by whoever
        consumes next, and storing it again changes nothing (its trail gains the redelivery)."""
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
        trace = batch.trace
        if trace is not None:
            outcome.rejected = [
                RejectedMessage(entry.message, entry.rejection, trace.onward(entry.message))
                for entry in outcome.rejected
            ]
        if outcome.rejected:
            self._dead_letters.send(outcome.rejected)
            if self._trail is not None:
                self._record_dead_letters(self._trail, outcome.rejected)
        acknowledge(batch.messages)
        if trace is not None:
            kept = {uid: message for uid, (_, message) in batch.orders.items()}
            kept.update((uid, message) for uid, (_, message) in batch.deletions.items())
            trace.settled(kept, outcome.rejected)
        self._report(batch, outcome)

    def _record_dead_letters(
        self, trail: DeadLetterTrail, rejected: Sequence[RejectedMessage]
    ) -> None:
        """The dead letters whose key is an order_uid added to their orders' trails, waiting out
        database outages as a write does; the others are known to `dlq stats` alone."""
        keyed = [
            (uid, entry) for entry in rejected if (uid := key_uid(entry.message.key)) is not None
        ]
        if keyed:
            retry(
                partial(trail.dead_lettered, keyed),
                transient=(DatabaseUnavailable,),
                patience=self._database,
                on_retry=partial(self._metrics.retried, "database"),
            )

    def _report(self, batch: PreparedBatch, outcome: BatchOutcome) -> None:
        """Count the batch, and log the throughput every few seconds."""
        self._metrics.batch_settled(
            SettledBatch(
                outcome.inserted,
                outcome.replaced,
                outcome.deleted,
                tuple(entry.rejection.code for entry in outcome.rejected),
                max((p.order.date_created for p, _ in batch.orders.values()), default=None),
            )
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
