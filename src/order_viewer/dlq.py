"""The dead-letter tools: what the dead-letter topic holds, by reason, and sending dead letters
back to the orders topic once what rejected them is fixed.

Both read the topic from its start (a replay with a time range: from where the range begins)
to its end as it is when they begin (or where the range ends), with partitions
assigned by hand under a consumer group of their own that commits nothing: the service's group
and its offsets are never touched.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from order_viewer.broker import DEAD_LETTER_PRODUCER, client_config
from order_viewer.config import Settings
from order_viewer.model import DB_REJECTED, REASON_CODES

KNOWN_REASONS = (*REASON_CODES, DB_REJECTED)
REPLAYED_FROM = "replayed.from"
# Said of a dead letter without an error.code header: not one this service wrote.
NO_REASON = "(none)"


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
    sent: int = 0
    failed: int = 0
    # reason for not sending -> how many
    skipped: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


def stats(settings: Settings, interactive: bool) -> dict[str, ReasonStats]:
    """How many dead letters of each reason code, and when the first and last were written."""
    by_reason: dict[str, ReasonStats] = {}
    for letter in _read(settings, "counting", interactive):
        entry = by_reason.setdefault(letter.reason, ReasonStats())
        entry.count += 1
        if letter.timestamp is not None:
            if entry.first is None or letter.timestamp < entry.first:
                entry.first = letter.timestamp
            if entry.last is None or letter.timestamp > entry.last:
                entry.last = letter.timestamp
    return dict(sorted(by_reason.items()))


class Sender(Protocol):
    """What a replay asks of a Kafka producer."""

    def produce(
        self,
        topic: str,
        *,
        value: bytes | None,
        key: bytes | None,
        on_delivery: Callable[[KafkaError | None, Any], None],
        headers: list[tuple[str, str | bytes | None]],
    ) -> None: ...

    def poll(self, timeout: float) -> int: ...

    def flush(self, timeout: float) -> int: ...


# How long a replay waits for the broker to acknowledge what it sent, at the end.
FLUSH_SECONDS = 60.0


def replay(
    settings: Settings, selection: Selection, *, dry_run: bool, interactive: bool
) -> ReplaySummary:
    """Send the selected dead letters' original key and value back to the orders topic, each
    with a `replayed.from` header naming its dead letter (topic/partition/offset). Storing is
    idempotent, so replaying the same dead letters again stores nothing twice. Skipped: dead
    letters without a reason (not written by this service) and those whose value was too large
    to keep (sent back, they would be tombstones)."""
    return send_back(
        _read(settings, "replaying", interactive, selection.since, selection.until),
        selection,
        None if dry_run else _producer(settings),
        orders_topic=settings.kafka_topic,
        dead_letter_topic=settings.kafka_dlq_topic,
    )


def send_back(
    letters: Iterable[DeadLetter],
    selection: Selection,
    producer: Sender | None,
    *,
    orders_topic: str,
    dead_letter_topic: str,
) -> ReplaySummary:
    """`replay` over dead letters already read; without a producer, a dry run. What the broker
    has not acknowledged when the final flush gives up counts as failed: it is dropped."""
    started = time.perf_counter()
    summary = ReplaySummary()

    def delivered(error: KafkaError | None, _: object) -> None:
        if error is None:
            summary.sent += 1
        else:
            summary.failed += 1

    for letter in letters:
        summary.read += 1
        if letter not in selection:
            continue
        summary.selected += 1
        if letter.reason == NO_REASON:
            summary.skipped["no error.code header"] += 1
            continue
        if "error.value_dropped" in letter.headers:
            summary.skipped["value not kept"] += 1
            continue
        if producer is None:
            continue
        origin = f"{dead_letter_topic}/{letter.partition}/{letter.offset}"
        while True:
            try:
                producer.produce(
                    orders_topic,
                    key=letter.key,
                    value=letter.value,
                    headers=[(REPLAYED_FROM, origin.encode())],
                    on_delivery=delivered,
                )
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer is not None:
        summary.failed += producer.flush(FLUSH_SECONDS)
    summary.seconds = time.perf_counter() - started
    return summary


def _producer(settings: Settings) -> Producer:
    return Producer(client_config(settings, **DEAD_LETTER_PRODUCER, **{"linger.ms": 20}))


def _read(
    settings: Settings,
    verb: str,
    interactive: bool,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Iterator[DeadLetter]:
    """The dead letters of the topic as it ends when the read begins; with `since` or `until`,
    each partition is read only from its first dead letter stamped `since` or later to its first
    stamped `until` or later (the broker finds them by its time index), so that a narrow range of
    a large topic is not read whole. Time stamps not in order within a partition may leave a
    letter of the range out of it: the dead-letter writer stamps each when it sends it."""
    topic = settings.kafka_dlq_topic
    consumer = Consumer(
        client_config(
            settings,
            **{
                "group.id": f"order-viewer-dlq-tool-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
            },
        )
    )
    try:
        ends = _partition_ends(consumer, topic)
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
        with Progress(
            TextColumn(verb), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            disable=not interactive, console=Console(stderr=True),
        ) as progress:  # fmt: skip
            task = progress.add_task(topic, total=total)
            while remaining:
                for message in consumer.consume(500, timeout=1.0):
                    error = message.error()
                    if error is not None:
                        if error.fatal() or not error.retriable():
                            raise DeadLetterToolError(f"reading {topic}: {error.str()}")
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


def _partition_ends(consumer: Consumer, topic: str) -> dict[int, tuple[int, int]]:
    """Each partition's first and next offset, as the tool begins."""
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise DeadLetterToolError(f"the dead-letter topic {topic} does not exist")
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
    headers = {name: value or b"" for name, value in message.headers() or []}
    return DeadLetter(partition, offset, stamp, message.key(), message.value(), headers)


def printable(text: str) -> str:
    """`text` as it is if it is printable, else quoted with its escapes: a header anyone who
    can write the topic sets must not move the cursor, recolour or forge lines."""
    return text if text.isprintable() else repr(text)


def print_stats(by_reason: dict[str, ReasonStats], topic: str) -> None:
    # A list, not a dict: a quoted reason may read like another, printable one.
    shown = [(printable(reason), entry) for reason, entry in by_reason.items()]
    width = max([len("reason"), *(len(reason) for reason, _ in shown)])
    print(f"{'reason':<{width}}  {'count':>8}  {'first':<25}  last")
    for reason, entry in shown:
        first = entry.first.isoformat(timespec="seconds") if entry.first else "-"
        last = entry.last.isoformat(timespec="seconds") if entry.last else "-"
        print(f"{reason:<{width}}  {entry.count:>8,}  {first:<25}  {last}")
    total = sum(entry.count for entry in by_reason.values())
    print(f"{total:,} dead letters in {topic}")
