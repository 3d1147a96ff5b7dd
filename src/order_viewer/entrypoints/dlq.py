"""The dead-letter tools: what the dead-letter topic holds, by reason, and sending dead letters
back to the orders topic once what rejected them is fixed.

Both read the topic from its start (a replay with a time range: from where the range begins)
to its end as it is when they begin (or where the range ends), with partitions
assigned by hand under a consumer group of their own that commits nothing: the service's group
and its offsets are never touched. A replay sends back only genuine dead letters: those whose
original, the record their `source.*` headers name, is still in the orders topic with the same
key and value, and no later record of that key differs from it (anyone who can write the
dead-letter topic can write any record there, naming any earlier version of an order).
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from order_viewer.adapters.kafka.broker import DEAD_LETTER_PRODUCER, MessageProducer, enqueue
from order_viewer.adapters.kafka.consumer import REPLAYED_FROM
from order_viewer.adapters.tracing import TRACEPARENT, TRACESTATE, trace_headers
from order_viewer.config import Settings, kafka_client
from order_viewer.domain.model import DB_REJECTED, REASON_CODES

KNOWN_REASONS = (*REASON_CODES, DB_REJECTED)
# Said of a dead letter without an error.code header: not one this service wrote.
NO_REASON = "(none)"
# The headers the service writes on a dead letter to name its original.
SOURCE_HEADERS = ("source.topic", "source.partition", "source.offset")

# Why a dead letter is unverified: its original cannot be shown to be in the orders topic.
NO_SOURCE = "source headers missing or malformed"
OTHER_TOPIC = "source in another topic"
# Below the partition's first offset: removed by retention (or by deleting records).
ORIGINAL_REMOVED = "original removed"
# At or beyond the partition's end, in a partition the topic does not have, or an offset
# without a record (compacted away, a transaction marker, an aborted write).
ORIGINAL_MISSING = "original not in the topic"
NOT_THE_ORIGINAL = "key or value differ from the original"
# A later record of the original's key, with another value or none, is the last in the topic: sent
# back, the original would replace that later version of the order, or undo its deletion.
SUPERSEDED = "a later record of its key differs"

# Canonical decimals as the service writes them, short enough for a partition (int32) and an
# offset (int64): no sign, no leading zero, no spaces, underscores or non-ASCII digits, and
# never thousands of digits for int() to parse.
_PARTITION = re.compile(rb"0|[1-9][0-9]{0,9}")
_OFFSET = re.compile(rb"0|[1-9][0-9]{0,18}")
LARGEST_PARTITION = 2**31 - 1
LARGEST_OFFSET = 2**63 - 1

# Dead letters verified by one look-up: it holds them, and keeps none of the originals it reads
# (each is compared as it arrives), so memory stays bounded however large the topics are.
LOOKUP_LETTERS = 1000
LOOKUP_BYTES = 64 * 1024 * 1024
# How long a look-up waits for the next original to be read before it gives up.
LOOKUP_SECONDS = 30.0
# Originals further apart than this in a partition are reached by seeking, not read through.
SEEK_GAP = 500


class DeadLetterToolError(Exception):
    """The dead-letter topic cannot be read or the orders topic written; the message says why."""


def parse_time(text: str) -> datetime:
    """An ISO 8601 instant with its offset (`2026-11-30T10:00:00Z`); a time without a zone is
    refused rather than guessed."""
    try:
        instant = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO 8601 time: {text!r}") from None
    if instant.tzinfo is None:
        raise ValueError(f"give the time zone, e.g. {text}Z or {text}+03:00")
    return instant.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    partition: int
    offset: int
    timestamp: datetime | None
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    # Names of the headers that came more than once (`headers` keeps the last): the service
    # writes each once.
    repeated: frozenset[str] = frozenset()

    @property
    def trace(self) -> list[tuple[str, bytes]]:
        """The W3C headers of the trace the letter continues (the service writes those of the
        consumption that dead-lettered it), for its replay to go on with; a header that came
        more than once is none."""
        return list(
            trace_headers(
                [
                    (name, self.headers[name])
                    for name in (TRACEPARENT, TRACESTATE)
                    if name in self.headers and name not in self.repeated
                ]
            )
        )

    @property
    def reason(self) -> str:
        code = self.headers.get("error.code")
        return NO_REASON if code is None else code.decode(errors="replace")


@dataclass(slots=True)
class ReasonStats:
    count: int = 0
    first: datetime | None = None
    last: datetime | None = None


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters a replay sends: of one reason, and dead-lettered in [since, until)."""

    reason: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def __contains__(self, letter: DeadLetter) -> bool:
        if self.reason is not None and letter.reason != self.reason:
            return False
        if self.since is None and self.until is None:
            return True
        stamp = letter.timestamp
        return (
            stamp is not None
            and (self.since is None or stamp >= self.since)
            and (self.until is None or stamp < self.until)
        )


@dataclass(slots=True)
class ReplaySummary:
    # Dead letters read: with a time range, only those from where it begins to where it ends.
    read: int = 0
    selected: int = 0
    # Selected, not skipped: sent or failed, or in a dry run, what would be sent.
    sendable: int = 0
    sent: int = 0
    failed: int = 0
    # reason for not sending, unverified aside -> how many
    skipped: Counter[str] = field(default_factory=Counter)
    # why the original could not be confirmed -> how many (sendable only when asked for)
    unverified: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


def stats(settings: Settings, interactive: bool) -> dict[str, ReasonStats]:
    """How many dead letters of each reason code, and when the first and last were written."""
    by_reason: dict[str, ReasonStats] = {}
    with _progress(interactive) as progress:
        for letter in _read(settings, progress, "counting"):
            entry = by_reason.setdefault(letter.reason, ReasonStats())
            entry.count += 1
            if letter.timestamp is not None:
                if entry.first is None or letter.timestamp < entry.first:
                    entry.first = letter.timestamp
                if entry.last is None or letter.timestamp > entry.last:
                    entry.last = letter.timestamp
    return dict(sorted(by_reason.items()))


class Unverified(Exception):
    """A dead letter's original cannot be shown to be in the orders topic; the message says why."""


def source(letter: DeadLetter, orders_topic: str) -> tuple[int, int]:
    """The partition and offset of the record of `orders_topic` that `letter` says it is a copy
    of, read from the headers the service writes, each once and as the service writes it."""
    if any(name not in letter.headers or name in letter.repeated for name in SOURCE_HEADERS):
        raise Unverified(NO_SOURCE)
    topic, partition, offset = (letter.headers[name] for name in SOURCE_HEADERS)
    if topic != orders_topic.encode():
        raise Unverified(OTHER_TOPIC)
    if not (_PARTITION.fullmatch(partition) and _OFFSET.fullmatch(offset)):
        raise Unverified(NO_SOURCE)
    if int(partition) > LARGEST_PARTITION or int(offset) > LARGEST_OFFSET:
        raise Unverified(NO_SOURCE)
    return int(partition), int(offset)


class Reader(Protocol):
    """What a look-up of originals asks of a Kafka consumer."""

    def list_topics(self, topic: str, *, timeout: float) -> Any: ...

    def get_watermark_offsets(self, partition: Any, *, timeout: float) -> tuple[int, int]: ...

    def assign(self, partitions: list[Any]) -> None: ...

    def seek(self, partition: Any) -> None: ...

    def pause(self, partitions: list[Any]) -> None: ...

    def resume(self, partitions: list[Any]) -> None: ...

    def poll(self, timeout: float) -> Any: ...

    def consume(self, num_messages: int, *, timeout: float) -> list[Any]: ...

    def position(self, partitions: list[Any]) -> list[Any]: ...


class Originals:
    """Tells whether dead letters are genuine and still worth sending: the record each names is
    in the orders topic with the dead letter's key and value, and the last record of that key
    there (as the look-up begins) has that value too. A forged letter could otherwise name any
    earlier version of an order, stored and replaced since or deleted since, and a replay would
    bring it back; a genuine one would do the same once a later version was stored. A letter
    without a key cannot be told from other orders' records, and is checked against its
    original only. One consumer, assigned by hand, reads the named offsets of each partition in
    order, seeking over wide gaps until an original is found, then on to the partition's end,
    and pauses a partition once nothing more is wanted of it; a look-up that reads nothing
    wanted for `time_limit` seconds is an error."""

    def __init__(
        self, consumer: Reader, topic: str, progress: Progress, time_limit: float = LOOKUP_SECONDS
    ) -> None:
        self._consumer = consumer
        self._topic = topic
        self._progress = progress
        self._task = progress.add_task("verifying", total=0)
        self._asked = 0
        self._time_limit = time_limit

    def unverified(self, letters: Sequence[DeadLetter]) -> list[str | None]:
        """For each letter, why it is unverified, or None when its original is there."""
        self._asked += len(letters)
        self._progress.update(self._task, total=self._asked)
        lookup = _Lookup(letters, self._topic, lambda: self._progress.advance(self._task))
        if lookup.queues:
            lookup.bound(_partition_ends(self._consumer, self._topic))
        if lookup.queues:
            self._read(lookup)
        return lookup.verdicts

    def _read(self, lookup: _Lookup) -> None:
        queues = lookup.queues
        assigned = [TopicPartition(self._topic, p, queue[0]) for p, queue in queues.items()]
        self._consumer.assign(assigned)
        # An earlier look-up paused what it had finished reading; assigned again, it stays so.
        self._consumer.resume(assigned)

        def done(partition: int) -> None:
            del queues[partition]
            self._consumer.pause([TopicPartition(self._topic, partition)])

        deadline = time.monotonic() + self._time_limit
        while queues:
            moved = False
            timeout = min(1.0, max(0.0, deadline - time.monotonic()))
            for message in _arrived(self._consumer, timeout):
                if not _usable(message, self._topic) or message.partition() not in queues:
                    continue
                partition, offset = message.partition(), message.offset()
                moved = True
                lookup.read(partition, offset, message)
                queue = queues[partition]
                if lookup.finished(partition, offset + 1):
                    done(partition)
                elif queue and queue[0] - offset > SEEK_GAP and not lookup.watches(partition):
                    self._consumer.seek(TopicPartition(self._topic, partition, queue[0]))
            # By position too: offsets without a record, last in a partition, send nothing after.
            for position in self._consumer.position(
                [TopicPartition(self._topic, p) for p in queues]
            ):
                moved |= lookup.read(position.partition, position.offset, None) > 0
                if lookup.finished(position.partition, position.offset):
                    done(position.partition)
            if moved:
                deadline = time.monotonic() + self._time_limit
            elif queues and time.monotonic() >= deadline:
                partition = next(iter(queues))
                raise DeadLetterToolError(
                    f"looking up dead letters' originals in {self._topic}: nothing read for "
                    f"{self._time_limit:g} s (partition {partition} offset "
                    f"{lookup.awaited(partition)} awaited)"
                )


class _Lookup:
    """The dead letters of one look-up, by the partition and offset they name, and the verdicts
    on them as the records there are read."""

    def __init__(
        self, letters: Sequence[DeadLetter], topic: str, advance: Callable[[], object]
    ) -> None:
        self.letters = letters
        self.verdicts: list[str | None] = [None] * len(letters)
        self._advance = advance
        # partition -> offset -> the letters that name it (a message dead-lettered twice, when
        # a crash had it delivered again, has two)
        self._naming: dict[int, dict[int, list[int]]] = {}
        for index, letter in enumerate(letters):
            try:
                partition, offset = source(letter, topic)
            except Unverified as why:
                self.verdicts[index] = str(why)
                advance()
                continue
            self._naming.setdefault(partition, {}).setdefault(offset, []).append(index)
        # partition -> its named offsets still to read, in order
        self.queues = {p: deque(sorted(named)) for p, named in self._naming.items()}
        # partition -> key -> the letters whose original of that key was read there: each later
        # record of the key settles them again, as the last one read of it says
        self._watched: dict[int, dict[bytes, list[int]]] = {}
        # partition -> its next offset as the look-up begins: later records of a key are looked
        # for up to there
        self._ends: dict[int, int] = {}

    def bound(self, ends: dict[int, tuple[int, int]]) -> None:
        """Settle the offsets outside the partitions' `ends` (first, next): nothing to read."""
        for partition, queue in list(self.queues.items()):
            # A partition the topic does not have ends where it begins: nothing is in it.
            low, high = ends.get(partition, (0, 0))
            self._ends[partition] = high
            for offset in [o for o in queue if not low <= o < high]:
                self._settle(
                    partition, offset, ORIGINAL_REMOVED if offset < low else ORIGINAL_MISSING
                )
            self.queues[partition] = deque(o for o in queue if low <= o < high)
            if not self.queues[partition]:
                del self.queues[partition]

    def read(self, partition: int, offset: int, original: Any | None) -> int:
        """The consumer is at `offset` of `partition`, with the record there (`original`) or,
        from its position, without: settle the offsets passed and the one read. How many."""
        queue = self.queues[partition]
        settled = 0
        while queue and queue[0] < offset:
            self._settle(partition, queue.popleft(), ORIGINAL_MISSING)
            settled += 1
        if original is None:
            return settled
        key, value = original.key(), original.value()
        watched = self._watched.setdefault(partition, {})
        for index in watched.get(key, ()):
            self.verdicts[index] = None if self.letters[index].value == value else SUPERSEDED
        if queue and queue[0] == offset:
            queue.popleft()
            for index in self._naming[partition].pop(offset):
                letter = self.letters[index]
                if (letter.key, letter.value) != (key, value):
                    self.verdicts[index] = NOT_THE_ORIGINAL
                elif key is not None:
                    watched.setdefault(key, []).append(index)
                self._advance()
            settled += 1
        return settled

    def watches(self, partition: int) -> bool:
        """Whether later records of `partition` are to be read: an original was found there."""
        return bool(self._watched.get(partition))

    def finished(self, partition: int, position: int) -> bool:
        """Whether nothing more is wanted of `partition` once the consumer is at `position`."""
        if self.queues[partition]:
            return False
        return not self.watches(partition) or position >= self._ends[partition]

    def awaited(self, partition: int) -> int:
        """The offset of `partition` the look-up waits for."""
        queue = self.queues[partition]
        return queue[0] if queue else self._ends[partition]

    def _settle(self, partition: int, offset: int, why: str) -> None:
        for index in self._naming[partition].pop(offset):
            self.verdicts[index] = why
            self._advance()


class Sender(MessageProducer, Protocol):
    """What a replay asks of a Kafka producer."""

    def flush(self, timeout: float) -> int: ...


# How long a replay waits for the broker to acknowledge what it sent, at the end.
FLUSH_SECONDS = 60.0


class Verifier(Protocol):
    """What a replay asks of the look-up of originals."""

    def unverified(self, letters: Sequence[DeadLetter]) -> list[str | None]: ...


def replay(
    settings: Settings,
    selection: Selection,
    *,
    dry_run: bool,
    send_unverified: bool,
    interactive: bool,
) -> ReplaySummary:
    """Send the selected dead letters' original key and value back to the orders topic, each
    with a `replayed.from` header naming its dead letter (topic/partition/offset). Storing is
    idempotent, so replaying the same dead letters again stores nothing twice. Skipped: dead
    letters without a reason (not written by this service), those whose value was too large
    to keep (sent back, they would be tombstones) and, unless `send_unverified`, those whose
    original is not in the orders topic as they have it (`Originals`)."""
    lookups = _consumer(settings, **{"auto.offset.reset": "earliest"})
    try:
        with _progress(interactive) as progress:
            return send_back(
                _read(settings, progress, "replaying", selection.since, selection.until),
                selection,
                Originals(lookups, settings.kafka_topic, progress),
                None if dry_run else _producer(settings),
                send_unverified=send_unverified,
                orders_topic=settings.kafka_topic,
                dead_letter_topic=settings.kafka_dlq_topic,
            )
    finally:
        lookups.close()


def send_back(
    letters: Iterable[DeadLetter],
    selection: Selection,
    originals: Verifier,
    producer: Sender | None,
    *,
    send_unverified: bool,
    orders_topic: str,
    dead_letter_topic: str,
) -> ReplaySummary:
    """`replay` over dead letters already read; without a producer, a dry run, which verifies
    and counts alike. What the broker has not acknowledged when the final flush gives up counts
    as failed: it is dropped."""
    started = time.perf_counter()
    summary = ReplaySummary()

    def delivered(error: KafkaError | None, _: object) -> None:
        if error is None:
            summary.sent += 1
        else:
            summary.failed += 1

    def to_verify() -> Iterator[DeadLetter]:
        for letter in letters:
            summary.read += 1
            if letter not in selection:
                continue
            summary.selected += 1
            if letter.reason == NO_REASON:
                summary.skipped["no error.code header"] += 1
            elif "error.value_dropped" in letter.headers:
                summary.skipped["value not kept"] += 1
            else:
                yield letter

    for batch in _batches(to_verify()):
        for letter, why in zip(batch, originals.unverified(batch), strict=True):
            if why is not None:
                summary.unverified[why] += 1
                if not send_unverified:
                    continue
            summary.sendable += 1
            if producer is None:
                continue
            origin = f"{dead_letter_topic}/{letter.partition}/{letter.offset}"
            enqueue(
                producer,
                orders_topic,
                key=letter.key,
                value=letter.value,
                headers=[(REPLAYED_FROM, origin.encode()), *letter.trace],
                on_delivery=delivered,
            )
            producer.poll(0)
    if producer is not None:
        summary.failed += producer.flush(FLUSH_SECONDS)
    summary.seconds = time.perf_counter() - started
    return summary


def _batches(letters: Iterable[DeadLetter]) -> Iterator[list[DeadLetter]]:
    """The letters in lists of up to LOOKUP_LETTERS, and of LOOKUP_BYTES of keys and values
    unless one letter alone is larger."""
    batch: list[DeadLetter] = []
    size = 0
    for letter in letters:
        length = len(letter.key or b"") + len(letter.value or b"")
        if batch and (len(batch) == LOOKUP_LETTERS or size + length > LOOKUP_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(letter)
        size += length
    if batch:
        yield batch


def _producer(settings: Settings) -> Producer:
    return Producer({**kafka_client(settings), **DEAD_LETTER_PRODUCER, "linger.ms": 20})


def _consumer(settings: Settings, **extra: Any) -> Consumer:
    """A consumer of partitions assigned by hand, in a group of its own that commits nothing."""
    return Consumer(
        {
            **kafka_client(settings),
            "group.id": f"order-viewer-dlq-tool-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            **extra,
        }
    )


def _progress(interactive: bool) -> Progress:
    """A bar per task on stderr in a terminal; nothing otherwise."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), disable=not interactive, console=Console(stderr=True),
    )  # fmt: skip


def _read(
    settings: Settings,
    progress: Progress,
    verb: str,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Iterator[DeadLetter]:
    """The dead letters of the topic as it ends when the read begins; with `since` or `until`,
    each partition is read only from its first dead letter stamped `since` or later to its first
    stamped `until` or later (the broker finds them by its time index), so that a narrow range of
    a large topic is not read whole. Time stamps not in order within a partition may leave a
    letter of the range out of it: the dead-letter writer stamps each when it sends it."""
    topic = settings.kafka_dlq_topic
    consumer = _consumer(settings)
    try:
        ends = _partition_ends(consumer, topic)
        if not ends:
            raise DeadLetterToolError(f"the dead-letter topic {topic} does not exist")
        if since is not None:
            starts = _first_at(consumer, topic, ends, since)
            ends = {p: (max(low, starts[p]), high) for p, (low, high) in ends.items()}
        if until is not None:
            stops = _first_at(consumer, topic, ends, until)
            ends = {p: (low, min(high, stops[p])) for p, (low, high) in ends.items()}
        total = sum(high - low for low, high in ends.values())
        consumer.assign(
            [TopicPartition(topic, p, low) for p, (low, high) in ends.items() if high > low]
        )
        remaining = {p: high for p, (low, high) in ends.items() if high > low}
        read = 0
        task = progress.add_task(verb, total=total)
        while remaining:
            for message in _arrived(consumer, 1.0):
                if not _usable(message, topic):
                    continue
                partition, offset = message.partition(), message.offset()
                assert partition is not None
                assert offset is not None
                if partition not in remaining or offset >= remaining[partition]:
                    continue
                read += 1
                progress.update(task, completed=read)
                yield _dead_letter(message, partition, offset)
            # By position rather than by the last message's offset: offsets without a
            # message (transaction markers, compaction) would otherwise be waited for.
            for position in consumer.position([TopicPartition(topic, p) for p in remaining]):
                if position.offset >= remaining[position.partition]:
                    del remaining[position.partition]
    finally:
        consumer.close()


def _arrived(consumer: Reader, timeout: float) -> list[Any]:
    """The next message, waited for up to `timeout` seconds, with those already arrived behind
    it: a batch of `consume` would wait the whole timeout for a full batch, which a look-up that
    seeks from one original to the next, or the end of a topic, never fills."""
    first = consumer.poll(timeout)
    return [] if first is None else [first, *consumer.consume(499, timeout=0)]


def _usable(message: Any, topic: str) -> bool:
    """Whether `message` is a record rather than an error the client recovers from by itself;
    any other error ends the command."""
    error = message.error()
    if error is None:
        return True
    if error.fatal() or not error.retriable():
        raise DeadLetterToolError(f"reading {topic}: {error.str()}")
    return False


def _partition_ends(consumer: Reader, topic: str) -> dict[int, tuple[int, int]]:
    """Each partition's first and next offset, as the tool begins; none if the topic does not
    exist."""
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return {}
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            for p in sorted(metadata.partitions)
        }
    except KafkaException as error:
        raise DeadLetterToolError(f"cannot reach the broker: {error.args[0].str()}") from None


def _first_at(
    consumer: Consumer, topic: str, ends: dict[int, tuple[int, int]], instant: datetime
) -> dict[int, int]:
    """Each partition's offset of its first dead letter stamped at `instant` or later, or its
    end offset if there is none."""
    milliseconds = int(instant.timestamp() * 1000)
    try:
        found = consumer.offsets_for_times(
            [TopicPartition(topic, p, milliseconds) for p in ends], timeout=10
        )
    except KafkaException as error:
        raise DeadLetterToolError(f"cannot reach the broker: {error.args[0].str()}") from None
    # -1: no dead letter that late.
    return {
        position.partition: position.offset if position.offset >= 0 else ends[position.partition][1]
        for position in found
    }


def _dead_letter(message: Any, partition: int, offset: int) -> DeadLetter:
    kind, milliseconds = message.timestamp()
    stamp = (
        datetime.fromtimestamp(milliseconds / 1000, UTC)
        if kind != 0 and milliseconds >= 0
        else None
    )  # 0 is TIMESTAMP_NOT_AVAILABLE
    pairs = message.headers() or []
    headers = {name: value or b"" for name, value in pairs}
    repeated = (
        frozenset()
        if len(headers) == len(pairs)
        else frozenset(name for name, count in Counter(n for n, _ in pairs).items() if count > 1)
    )
    return DeadLetter(partition, offset, stamp, message.key(), message.value(), headers, repeated)


def quoted_if_unprintable(text: str) -> str:
    """`text` as it is if it is printable, else quoted with its escapes: a header anyone who
    can write the topic sets must not move the cursor, recolour or forge lines. For a person at a
    terminal, so a readable reason keeps its spaces, which a log line's fields escape
    (`logs.escaped_for_log`)."""
    return text if text.isprintable() else repr(text)


def print_stats(by_reason: dict[str, ReasonStats], topic: str) -> None:
    # A list, not a dict: a quoted reason may read like another, printable one.
    shown = [(quoted_if_unprintable(reason), entry) for reason, entry in by_reason.items()]
    width = max([len("reason"), *(len(reason) for reason, _ in shown)])
    print(f"{'reason':<{width}}  {'count':>8}  {'first':<25}  last")
    for reason, entry in shown:
        first = entry.first.isoformat(timespec="seconds") if entry.first else "-"
        last = entry.last.isoformat(timespec="seconds") if entry.last else "-"
        print(f"{reason:<{width}}  {entry.count:>8,}  {first:<25}  {last}")
    total = sum(entry.count for entry in by_reason.values())
    print(f"{total:,} dead letters in {topic}")
