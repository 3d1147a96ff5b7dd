"""The Kafka consumer loop: batches of messages in, orders stored, offsets stored after."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any, Generic, Protocol, TypeVar, cast

from confluent_kafka import (
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka import Message as KafkaMessage
from confluent_kafka.admin import AdminClient

from order_viewer.adapters.metrics import Metrics
from order_viewer.adapters.tracing import KafkaHeaders, trace_headers
from order_viewer.service.ingest import BatchOutcome, OrderIngest, PreparedBatch
from order_viewer.service.ports import ConsumedMessage, Stopped
from order_viewer.service.readiness import Liveness
from order_viewer.service.retry import Health

log = logging.getLogger(__name__)

# How soon a batch gathering while the database writes the one before notices that it is done,
# and how soon a consumer waiting for a first message notices a stop.
BUSY_SLICE_SECONDS = 0.005
IDLE_SLICE_SECONDS = 0.1


# Fewer messages than this from one poll go in one batch, whatever their lanes: a transaction
# has a fixed cost (its statements' round trips, its commit) that a few orders do not outweigh,
# and splitting every small poll showed new orders later at a steady rate (docs/PERFORMANCE.md,
# Lanes).
SPLIT_FROM = 200


# Restarts of a stalled consumer in a row that bring no message before it is reported stuck:
# `/livez` then fails, so that the orchestrator restarts the whole process.
RESTARTS_BEFORE_STUCK = 3
# How long each request of a stall check (committed offsets, a partition's end) may take: a
# broker that does not answer within it counts as away, not as stalled. The loop waits for the
# check, so a stop asked meanwhile waits up to two of these while the broker is frozen.
CHECK_TIMEOUT_SECONDS = 5.0
# How long a consumer's close() is waited for. It commits the stored offsets and leaves the
# group, asking the group's coordinator, and librdkafka waits for an answer without a bound of
# its own: a broker that is frozen or gone would hold a stop, or a stall's restart, for ever.
CONSUMER_CLOSE_TIMEOUT_SECONDS = 20.0

# The header `dlq replay` puts on a message it sends back: its dead letter, as
# "topic/partition/offset".
REPLAYED_FROM = "replayed.from"
# As the replay writes it: a name Kafka allows for a topic, a partition and an offset in
# canonical decimal; anything else in the header (anyone who can produce can write it) is
# ignored, never an error.
_REPLAYED_FROM = re.compile(rb"[A-Za-z0-9._-]{1,249}/(0|[1-9][0-9]{0,9})/(0|[1-9][0-9]{0,18})")
_LARGEST_PARTITION = 2**31 - 1
_LARGEST_OFFSET = 2**63 - 1
# The last millisecond of year 9999: a producer may set any timestamp, and no later one is a
# moment a datetime (or the trail's column, read back) can hold.
LATEST_TIMESTAMP_MS = 253_402_300_799_999


@dataclass(frozen=True, slots=True)
class Batching:
    """How many messages, and how many bytes of them, make one batch, and how long the first
    of them waits for the rest; from how many messages a poll is split into a batch per lane."""

    max_messages: int
    max_bytes: int
    max_wait_seconds: float
    split_from: int = SPLIT_FROM


@dataclass(frozen=True, slots=True)
class _Write:
    """A batch being stored, and the outcome it will have."""

    batch: PreparedBatch
    outcome: Future[BatchOutcome]

    def done(self) -> bool:
        return self.outcome.done()


class UnderWay(Protocol):
    """A write as the lanes see it: under way until it is done."""

    def done(self) -> bool: ...


W = TypeVar("W", bound=UnderWay)


class Lanes(Generic[W]):
    """The lane schedule of the writes: which lane a partition belongs to, which writes are under
    way on which lanes, which lanes are free, and which writes must be settled before a batch
    may begin.

    A partition's messages all belong to one lane, and a lane holds one write at a time, so each
    partition's batches are stored, and their offsets stored, in order, while different lanes
    write at once. The writes are handed back for settling in the order they began. Pure: what a
    write is, and when it is done, is the caller's (a future, in the consumer).
    """

    def __init__(self, count: int, split_from: int = SPLIT_FROM) -> None:
        if count < 1:
            raise ValueError("the writes need at least one lane")
        self.count = count
        self._split_from = split_from
        self._under_way: list[tuple[frozenset[int], W]] = []  # in the order they began

    def of(self, partition: int) -> int:
        return partition % self.count

    def free(self, lane: int) -> bool:
        """No write on the lane, or only one that is done and waits to be settled."""
        return not any(lane in lanes and not write.done() for lanes, write in self._under_way)

    @property
    def under_way(self) -> bool:
        """Some write begun and not yet handed back for settling."""
        return bool(self._under_way)

    def batches(
        self, messages: list[ConsumedMessage]
    ) -> list[tuple[frozenset[int], list[ConsumedMessage]]]:
        """The batches a poll makes, each with its lanes, in the order they should begin: fewer
        than `split_from` messages make one batch; more make one per lane, the free lanes first,
        so that their batches begin before the consumer waits for a busy one. Each batch keeps
        its messages in the order they came."""
        by_lane: dict[int, list[ConsumedMessage]] = {}
        for message in messages:
            by_lane.setdefault(self.of(message.partition), []).append(message)
        if len(messages) < self._split_from or len(by_lane) < 2:
            return [(frozenset(by_lane), messages)] if messages else []
        return sorted(
            ((frozenset((lane,)), lane_messages) for lane, lane_messages in by_lane.items()),
            key=lambda batch: not all(self.free(lane) for lane in batch[0]),
        )

    def begin(self, lanes: frozenset[int], write: W) -> None:
        """A write holding `lanes` until it is handed back; none of them may be held already
        (`take_holding` hands back those that are)."""
        for held, _ in self._under_way:
            if held & lanes:
                raise ValueError(f"lanes {sorted(held & lanes)} are held by a write under way")
        self._under_way.append((lanes, write))

    def take_holding(self, lanes: frozenset[int]) -> list[W]:
        """The writes to settle before a batch on `lanes` begins: those holding any of them,
        done or not."""
        return self._take(lambda held, _: bool(held & lanes))

    def take_done(self) -> list[W]:
        return self._take(lambda _, write: write.done())

    def take_all(self) -> list[W]:
        return self._take(lambda _, __: True)

    def _take(self, taken: Callable[[frozenset[int], W], bool]) -> list[W]:
        """The writes `taken` picks, in the order they began, no longer under way from now."""
        writes, kept = [], []
        for held, write in self._under_way:
            if taken(held, write):
                writes.append(write)
            else:
                kept.append((held, write))
        self._under_way = kept
        return writes


class Verdict(Enum):
    """What to do after a stall check."""

    CARRY_ON = "carry on"  # nothing waits, or the broker did not answer
    RESTART = "restart"  # messages wait and none comes: close the consumer, make a new one
    STUCK = "stuck"  # the same, after RESTARTS_BEFORE_STUCK restarts that brought nothing


@dataclass(frozen=True)
class GroupProgress:
    """What a member without partitions sees of its group on the topic, per partition
    ("topic/partition"): the offset the group committed (-1 if none) and the messages beyond
    it."""

    committed: Mapping[str, int]
    waiting: Mapping[str, int]


class ProgressWatch:
    """Decides when the consumer has stalled: it has asked for messages for `timeout` seconds
    and got none, while the broker answers and holds messages beyond its position; or, with no
    partition assigned, while the group's committed offsets stayed where they were a check
    before though messages wait beyond them (a member left out of its group after a broker
    outage, which nobody else consumes for).

    Only time spent asking counts. A loop that waits for its writes (the database away or slow)
    or for the dead-letter topic asks for nothing, and its lag grows for that reason alone. A
    broker that does not answer the check is away: a new consumer would not bring it back, so
    that check counts for nothing and the next one, a timeout later, looks again. Pure: the
    clock is given, and the caller does what the verdicts say.
    """

    def __init__(self, timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._timeout = timeout
        self._clock = clock
        self._quiet_since = clock()
        self._restarts = 0  # in a row, without a message since
        # What the last check found of the group's offsets, while nothing was assigned.
        self._group_committed: Mapping[str, int] | None = None

    @property
    def stuck(self) -> bool:
        return self._restarts > RESTARTS_BEFORE_STUCK

    def moved(self) -> bool:
        """Messages came; True if the consumer was stuck until now."""
        was_stuck = self.stuck
        self._restarts = 0
        self._quiet_since = self._clock()
        self._group_committed = None
        return was_stuck

    def held(self) -> None:
        """The loop waited for something else than the broker: the quiet starts again."""
        self._quiet_since = self._clock()

    def due(self) -> bool:
        """Quiet for the timeout: time to check whether messages wait."""
        return self._clock() - self._quiet_since >= self._timeout

    def checked(self, waiting: Mapping[str, int] | None) -> Verdict:
        """The verdict on what a check found: the messages waiting beyond the consumer's
        position in each of its partitions, or None if the broker did not answer."""
        self._quiet_since = self._clock()
        self._group_committed = None
        if waiting is None or not any(count > 0 for count in waiting.values()):
            return Verdict.CARRY_ON
        return self._restart()

    def checked_unassigned(self, group: GroupProgress | None) -> Verdict:
        """The verdict for a consumer with no partition, on what a check found of its group
        (None if the broker did not answer): a restart if messages wait and the group committed
        nothing since the check before, a timeout ago. Another member consuming moves the
        offsets; one that stalled with its partitions is its own watchdog's to replace. A
        member left out cannot be told from one waiting for the group's other members, so it is
        restarted, never reported stuck: a new process would be left out no less."""
        self._quiet_since = self._clock()
        before, self._group_committed = (
            self._group_committed,
            None if group is None else group.committed,
        )
        if (
            group is None
            or before != group.committed
            or not any(count > 0 for count in group.waiting.values())
        ):
            return Verdict.CARRY_ON
        # The next check compares with what the new consumer's group commits from now on.
        self._group_committed = None
        return Verdict.RESTART

    def _restart(self) -> Verdict:
        self._restarts += 1
        return Verdict.STUCK if self._restarts == RESTARTS_BEFORE_STUCK + 1 else Verdict.RESTART


class OrderConsumer:
    """Consumes the orders topic until `stop` is set, handing each batch to the service layer.

    Offsets follow the pattern librdkafka documents for at-least-once delivery: automatic
    commits are on but only of offsets the loop has *stored*, and the service layer lets it store
    a batch's offsets only after its orders are committed in PostgreSQL and its dead letters
    acknowledged. A crash therefore re-delivers at most the unfinished batches, which the store
    absorbs.

    A consumer that stops fetching without a word (librdkafka's, after a broker restart, under
    KIP-848: confluentinc/librdkafka#5153) is closed and made again when the `ProgressWatch`
    says so, with the same group settings and from the offsets stored; after
    RESTARTS_BEFORE_STUCK restarts that brought nothing, `liveness` says it is stuck.
    """

    def __init__(
        self,
        *,
        client: dict[str, Any],
        topic: str,
        batching: Batching,
        ingest: OrderIngest,
        broker: Health,
        stop: threading.Event,
        metrics: Metrics,
        stall_timeout_seconds: float,
        liveness: Liveness,
        admin: AdminClient,
    ) -> None:
        self._client = client
        # Asks the group's committed offsets for a consumer left without partitions: the
        # consumer's own committed() goes through its group membership, the very part that may
        # be stuck, and then fails as if the broker were away.
        self._admin = admin
        self._topic = topic
        self._batching = batching
        self._ingest = ingest
        self._broker = broker
        self._stop = stop
        self._metrics = metrics
        self._stall_timeout = stall_timeout_seconds
        self._liveness = liveness
        self.consuming = threading.Event()

    def run(self) -> None:
        """Consume until stopped; raises KafkaException on an error no retry can cure (e.g.
        fenced by another instance with the same static member id)."""
        watch = ProgressWatch(self._stall_timeout)
        consumer = self._subscribed(watch)
        # The database writes batches while this thread polls and validates the next.
        lanes: Lanes[_Write] = Lanes(self._ingest.lanes, self._batching.split_from)
        writer = ThreadPoolExecutor(max_workers=lanes.count, thread_name_prefix="writer")
        try:
            while not self._stop.is_set():
                polled = self._poll(consumer, lanes)
                if polled:
                    if watch.moved():
                        self._liveness.moving("consumer")
                        log.info("the consumer consumes again: /livez passes again")
                elif lanes.under_way:
                    # Nothing came: the batches under way are settled as they end, so that
                    # their offsets are stored without waiting for more messages. Meanwhile
                    # the loop asked the broker for nothing.
                    self._settle(consumer, lanes.take_all())
                    watch.held()
                elif watch.due():
                    # Nothing is under way, so every offset of what was consumed is stored.
                    consumer = self._restarted_if_stalled(consumer, watch)
                for batch_lanes, messages in lanes.batches(polled):
                    for batch in by_size(messages, self._batching.max_bytes):
                        self._begin(consumer, lanes, writer, batch_lanes, batch)
                self._settle(consumer, lanes.take_done())
            self._settle(consumer, lanes.take_all())
        except Stopped:
            # The unsettled batches' offsets stay unstored: whoever consumes next re-reads them.
            pass
        finally:
            self.consuming.clear()
            writer.shutdown()
            # close() commits the stored offsets and leaves the group so partitions move at once
            # (a static member stays in it, for its restart to find them).
            closed_within(consumer, CONSUMER_CLOSE_TIMEOUT_SECONDS)
            log.info("consumer stopped")

    def _begin(
        self,
        consumer: Consumer,
        lanes: Lanes[_Write],
        writer: ThreadPoolExecutor,
        batch_lanes: frozenset[int],
        messages: list[ConsumedMessage],
    ) -> None:
        """Validate the batch (while the writes before it go on), settle the writes that hold
        its lanes, then hand it to the first lane's writer."""
        prepared = self._ingest.prepare(messages)
        self._settle(consumer, lanes.take_holding(batch_lanes))
        outcome = writer.submit(self._ingest.store, prepared, min(batch_lanes))
        lanes.begin(batch_lanes, _Write(prepared, outcome))

    def _settle(self, consumer: Consumer, writes: list[_Write]) -> None:
        """Each write's batch settled once it is stored, in the order given: its dead letters
        sent, then its offsets stored."""
        for write in writes:
            self._ingest.settle(
                write.batch, write.outcome.result(), partial(_store_offsets, consumer)
            )

    def _subscribed(self, watch: ProgressWatch) -> Consumer:
        """A new consumer of the topic, in the group. Partitions assigned start the watch's
        quiet time again: the time before, with nothing to fetch from (the group may take
        longer than the stall timeout to assign them), says nothing of their fetching."""
        consumer = Consumer(
            {
                **self._client,
                "enable.auto.commit": True,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "statistics.interval.ms": 5000,
                # librdkafka's default read-ahead is 64 MiB of messages, on top of the
                # batches held here (one per lane, and one being validated); two batches ahead
                # keep the database as busy.
                "queued.max.messages.kbytes": 2 * self._batching.max_bytes // 1024,
                "stats_cb": self._metrics.librdkafka_statistics,
            }
        )
        consumer.subscribe(
            [self._topic],
            on_assign=_log_assignment("assigned", watch.held),
            on_revoke=_log_assignment("revoked"),
        )
        self.consuming.set()
        log.info("consuming %s as group %s", self._topic, self._client["group.id"])
        return consumer

    def _restarted_if_stalled(self, consumer: Consumer, watch: ProgressWatch) -> Consumer:
        """The consumer, or a new one in its place if messages wait and it fetches none. The
        old one's close() commits the offsets stored (everything consumed before: nothing is
        under way) and leaves the group, or for a static member hands its place to the new
        one; the new one fetches from those offsets, so nothing is skipped or read twice."""
        if not consumer.assignment():
            return self._restarted_if_left_out(consumer, watch)
        waiting = messages_waiting(consumer, CHECK_TIMEOUT_SECONDS)
        verdict = watch.checked(waiting)
        if verdict is Verdict.CARRY_ON:
            return consumer
        assert waiting is not None
        lags = _lags(waiting)
        log.warning(
            "the consumer fetched nothing for %.0f s while messages wait (%s): closing it and "
            "consuming with a new one",
            self._stall_timeout,
            lags,
        )
        self._metrics.consumer_restarts.labels("stalled").inc()
        if verdict is Verdict.STUCK:
            reason = f"nothing fetched after {RESTARTS_BEFORE_STUCK} new consumers ({lags})"
            log.error("the consumer is stuck: %s; /livez fails so that it is restarted", reason)
            self._liveness.stuck("consumer", reason)
        return self._replaced(consumer, watch)

    def _restarted_if_left_out(self, consumer: Consumer, watch: ProgressWatch) -> Consumer:
        """The consumer with no partition, or a new one in its place if the group left messages
        waiting a whole check's interval without committing any."""
        group = group_progress(
            consumer, self._admin, self._client["group.id"], self._topic, CHECK_TIMEOUT_SECONDS
        )
        if watch.checked_unassigned(group) is Verdict.CARRY_ON:
            return consumer
        assert group is not None
        log.warning(
            "the consumer has had no partition, and its group has committed nothing, for "
            "%.0f s while messages wait (%s): closing it and joining with a new one",
            self._stall_timeout,
            _lags(group.waiting),
        )
        self._metrics.consumer_restarts.labels("unassigned").inc()
        return self._replaced(consumer, watch)

    def _replaced(self, consumer: Consumer, watch: ProgressWatch) -> Consumer:
        self.consuming.clear()
        closed_within(consumer, CONSUMER_CLOSE_TIMEOUT_SECONDS)
        return self._subscribed(watch)

    def _poll(self, consumer: Consumer, lanes: Lanes[_Write]) -> list[ConsumedMessage]:
        """The next batch: up to BATCH_MAX_ORDERS messages, gathered for at most
        BATCH_MAX_WAIT_MS, but only while the database is busy with the batches before. A
        message that finds its lane's writer free is written at once, with whatever arrived
        with it; under load the batches grow by themselves to what arrives during a write (the
        transaction's cost is shared when there is a queue, and no one waits for it when there
        is none)."""
        most = self._batching.max_messages
        deadline = time.monotonic() + self._batching.max_wait_seconds
        batch: list[ConsumedMessage] = []
        gathered: set[int] = set()  # the lanes of the messages gathered
        while len(batch) < most and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or any(lanes.free(lane) for lane in gathered):
                break
            if batch:
                # consume() returns when it has all it asked for or when its timeout ends, so
                # the database's being free again is noticed within one slice.
                polled = consumer.consume(
                    num_messages=most - len(batch), timeout=min(remaining, BUSY_SLICE_SECONDS)
                )
            else:
                # poll() returns at the first message; the rest already fetched come with it.
                first = consumer.poll(min(remaining, IDLE_SLICE_SECONDS))
                if first is None:
                    continue
                polled = [first, *consumer.consume(num_messages=most - 1, timeout=0)]
            messages = self._messages(polled)
            batch.extend(messages)
            gathered.update(lanes.of(message.partition) for message in messages)
        if batch:
            self._broker.recovered()
            self._metrics.messages_consumed.inc(len(batch))
            self._metrics.batch_size.observe(len(batch))
        return batch

    def _messages(self, polled: list[KafkaMessage]) -> list[ConsumedMessage]:
        batch = []
        for kafka_message in polled:
            error = kafka_message.error()
            if error is not None:
                # A fatal error arrives as an event whose code is _FATAL and whose fatal() is
                # false; the consumer can never consume again after one (e.g. fenced).
                if error.fatal() or error.code() == KafkaError._FATAL:
                    raise KafkaException(error)
                # librdkafka reconnects by itself; say so once, not at every attempt.
                self._broker.failed(str(error))
                continue
            topic, partition, offset = (
                kafka_message.topic(),
                kafka_message.partition(),
                kafka_message.offset(),
            )
            # A message without an error always has its position.
            assert topic is not None
            assert partition is not None
            assert offset is not None
            # A list for a consumed message (the client's type also allows a producer's dict).
            headers = kafka_message.headers()
            batch.append(
                ConsumedMessage(
                    topic,
                    partition,
                    offset,
                    kafka_message.key(),
                    kafka_message.value(),
                    timestamp_ms(*kafka_message.timestamp()),
                    # A consumed message's headers are a list of (name, bytes or None); read
                    # whether tracing is on or not: a dead letter passes the trace on.
                    replayed_from(headers if isinstance(headers, list) else None),
                    trace_headers(
                        cast(KafkaHeaders, headers) if isinstance(headers, list) else None
                    ),
                )
            )
        return batch


def timestamp_ms(kind: int, milliseconds: int) -> int | None:
    """A message's timestamp as the trail keeps it: None if it has none or one out of range."""
    if kind == TIMESTAMP_NOT_AVAILABLE or not 0 <= milliseconds <= LATEST_TIMESTAMP_MS:
        return None
    return milliseconds


def replayed_from(headers: Sequence[tuple[str, str | bytes | None]] | None) -> str | None:
    """The dead letter a message was replayed from, from its first `replayed.from` header;
    None if it has none, or one that is not a dead letter's position."""
    for name, value in headers or ():
        if name == REPLAYED_FROM:
            found = _REPLAYED_FROM.fullmatch(value) if isinstance(value, bytes) else None
            if (
                found is None
                or int(found[1]) > _LARGEST_PARTITION
                or int(found[2]) > _LARGEST_OFFSET
            ):
                return None
            return found[0].decode("ascii")
    return None


def messages_waiting(consumer: Consumer, timeout: float) -> dict[str, int] | None:
    """How many messages each assigned partition ("topic/partition") holds beyond the
    consumer's position, asked of the broker; None if it did not answer in time. The cached
    watermarks would not do: librdkafka learns a partition's end from its fetches, and the
    fetches are what may have stopped. A partition whose position is not known yet (nothing
    consumed since it was assigned) starts at its committed offset, or at its beginning
    (`auto.offset.reset=earliest`)."""
    try:
        assigned = consumer.position(consumer.assignment())
        unknown = [partition for partition in assigned if partition.offset < 0]
        committed = {
            (partition.topic, partition.partition): partition.offset
            for partition in (consumer.committed(unknown, timeout=timeout) if unknown else [])
        }
        starts = []
        for partition in assigned:
            stored = committed.get((partition.topic, partition.partition), -1)
            known = [offset for offset in (partition.offset, stored) if offset >= 0]
            starts.append(
                TopicPartition(partition.topic, partition.partition, known[0] if known else -1)
            )
        return _waiting_beyond(consumer, starts, timeout)
    except KafkaException:
        return None


def group_progress(
    consumer: Consumer, admin: AdminClient, group: str, topic: str, timeout: float
) -> GroupProgress | None:
    """The group's committed offset in each partition of the topic and the messages beyond it
    (from the beginning where it committed none: `auto.offset.reset=earliest`), asked of the
    broker; None if it did not answer in time. The offsets are asked by `admin`, whatever state
    the consumer's own membership of the group is in; the partitions' ends by the consumer."""
    try:
        described = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if described is None or described.error is not None:
            return None
        partitions = [TopicPartition(topic, number) for number in sorted(described.partitions)]
        asked = admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group, partitions)], request_timeout=timeout
        )
        answer = asked[group].result(timeout=timeout)
        committed = [partition for partition in answer.topic_partitions if partition.error is None]
        if len(committed) != len(partitions):
            return None
        waiting = _waiting_beyond(consumer, committed, timeout)
    except (KafkaException, FutureTimeout):
        return None
    if waiting is None:
        return None
    return GroupProgress(
        {f"{p.topic}/{p.partition}": max(p.offset, -1) for p in committed}, waiting
    )


def _waiting_beyond(
    consumer: Consumer, starts: list[TopicPartition], timeout: float
) -> dict[str, int] | None:
    """The messages each partition ("topic/partition") holds beyond its given offset (a
    negative one: its beginning), asked of the partition's leader; None if one did not answer
    in time. Raises KafkaException as the client does."""
    waiting = {}
    for partition in starts:
        watermarks = consumer.get_watermark_offsets(partition, timeout=timeout, cached=False)
        if watermarks is None:
            return None
        beginning, end = watermarks
        start = partition.offset if partition.offset >= 0 else beginning
        waiting[f"{partition.topic}/{partition.partition}"] = max(0, end - start)
    return waiting


def _lags(waiting: Mapping[str, int]) -> str:
    return ", ".join(f"{part} lag {count}" for part, count in waiting.items() if count > 0)


def closed_within(consumer: Consumer, seconds: float) -> bool:
    """Close the consumer, waiting at most `seconds`; False, with a warning, if it did not
    close in time. It is then left to finish in a thread of its own: the offsets it had not
    committed are read again by whoever consumes next (stored orders are idempotent), and its
    member leaves the group when its session times out."""
    closing = threading.Thread(target=consumer.close, name="consumer-close", daemon=True)
    closing.start()
    closing.join(seconds)
    if closing.is_alive():
        log.warning(
            "the consumer did not close within %.0f s (the broker does not answer): "
            "left to close by itself; what it had not committed is read again",
            seconds,
        )
        return False
    return True


def by_size(messages: list[ConsumedMessage], max_bytes: int) -> list[list[ConsumedMessage]]:
    """The messages in order, cut into batches of at most `max_bytes` of values (a message
    larger than that is a batch of its own): validated orders take several times the bytes of
    their messages, so a count alone would not bound the memory of a batch."""
    batches: list[list[ConsumedMessage]] = []
    size = 0
    for message in messages:
        length = len(message.value or b"")
        if not batches or (size + length > max_bytes and batches[-1]):
            batches.append([])
            size = 0
        batches[-1].append(message)
        size += length
    return batches


def _store_offsets(consumer: Consumer, batch: Sequence[ConsumedMessage]) -> None:
    next_offsets: dict[tuple[str, int], int] = {}
    for message in batch:
        position = (message.topic, message.partition)
        next_offsets[position] = max(next_offsets.get(position, 0), message.offset + 1)
    try:
        consumer.store_offsets(
            offsets=[
                TopicPartition(topic, partition, offset)
                for (topic, partition), offset in next_offsets.items()
            ]
        )
    except KafkaException as error:
        # The partition moved to another instance during a long batch; it will re-read the
        # batch, and the store makes that harmless.
        log.info("could not store offsets (%s); the new owner re-reads them", error.args[0])


def _log_assignment(verb: str, then: Callable[[], None] | None = None) -> Any:
    """A rebalance callback that logs the partitions and calls `then` if there are any."""

    def callback(_: Consumer, partitions: list[TopicPartition]) -> None:
        if partitions:
            log.info(
                "partitions %s: %s", verb, ", ".join(f"{p.topic}/{p.partition}" for p in partitions)
            )
            if then is not None:
                then()

    return callback
