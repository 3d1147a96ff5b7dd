"""Fakes of the service layer's ports (`order_viewer.service.ports`), for the unit tests. The writer
contract tests (tests/integration/test_writer_contract.py, as they need PostgreSQL) run the fake
writer and the PostgreSQL one through the same cases, so the two cannot drift apart."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from order_viewer.adapters.kafka.broker import Delivered, Headers
from order_viewer.domain.model import PreparedOrder, later, supersedes
from order_viewer.service.ports import (
    DatabaseUnavailable,
    Deletion,
    Expired,
    Handled,
    OrderState,
    OrderSummary,
    OrderTrail,
    RejectedByDatabase,
    RejectedMessage,
    Stopped,
    StoredDocument,
    WriteResult,
    WriteTimedOut,
)


class FakeWriter:
    """Keeps orders in a dict; can be told to fail like the database would."""

    def __init__(self) -> None:
        self.stored: dict[str, PreparedOrder] = {}
        # order_uid -> (partition, offset) of its latest tombstone
        self.tombstones: dict[str, tuple[int, int]] = {}
        self.batches: list[list[str]] = []
        self.refuse: set[str] = set()
        # How many of the next writes fail as if the database were down.
        self.unavailable_for = 0
        # How many of the next writes commit, then fail as a connection lost during COMMIT does.
        self.lost_after_commit_for = 0
        # Raised by the next writes, one each, before anything is written (a deadline's cut).
        self.timeouts: list[WriteTimedOut] = []
        # The messages handed over for the trails by the writes that committed.
        self.handled: list[Handled] = []

    def write(
        self,
        batch: Sequence[PreparedOrder],
        deletions: Sequence[Deletion] = (),
        handled: Sequence[Handled] = (),
    ) -> WriteResult:
        if self.unavailable_for:
            self.unavailable_for -= 1
            raise DatabaseUnavailable("connection refused")
        if self.timeouts:
            raise self.timeouts.pop(0)
        uids = [prepared.order.order_uid for prepared in batch]
        if any(uid in self.refuse for uid in [*uids, *(d.order_uid for d in deletions)]):
            raise RejectedByDatabase("value too long for type")
        self.batches.append(uids)
        self.handled.extend(handled)
        result = self._apply(batch, deletions)
        if self.lost_after_commit_for:
            self.lost_after_commit_for -= 1
            raise DatabaseUnavailable("server closed the connection unexpectedly")
        return result

    def _apply(self, batch: Sequence[PreparedOrder], deletions: Sequence[Deletion]) -> WriteResult:
        deleted = []
        for deletion in deletions:
            uid, position = deletion.order_uid, (deletion.partition, deletion.offset)
            if uid not in self.tombstones or later(position, self.tombstones[uid]):
                self.tombstones[uid] = position
            old = self.stored.get(uid)
            if old is not None and later(position, (old.partition, old.offset)):
                del self.stored[uid]
                deleted.append(uid)
        inserted, replaced = [], []
        for prepared in batch:
            uid = prepared.order.order_uid
            tombstone = self.tombstones.get(uid)
            if tombstone is not None and not later(
                (prepared.partition, prepared.offset), tombstone
            ):
                continue
            old = self.stored.get(uid)
            if old is None:
                inserted.append(uid)
            elif supersedes(version(prepared), version(old)):
                replaced.append(uid)
            else:
                continue
            self.stored[uid] = prepared
        return WriteResult(tuple(inserted), tuple(replaced), tuple(deleted))

    def newest(self, limit: int) -> Generator[list[StoredDocument], None, None]:
        newest_first = sorted(
            self.stored.values(),
            key=lambda p: (-p.order.date_created.timestamp(), p.order.order_uid),
        )[:limit]
        for start in range(0, len(newest_first), 2):
            yield [
                StoredDocument(p.order.order_uid, p.document, p.sha256)
                for p in newest_first[start : start + 2]
            ]


def version(prepared: PreparedOrder) -> tuple[bytes, int, int]:
    return prepared.sha256, prepared.partition, prepared.offset


class FakeReader:
    def __init__(self, stored: dict[str, bytes]) -> None:
        self.stored = stored
        self.asked: list[list[str]] = []
        self.queries = 0
        self.unavailable = False
        # Raised instead of the default when `unavailable` (a subclass: DatabaseBusy).
        self.unavailable_as: type[DatabaseUnavailable] = DatabaseUnavailable
        self.release = asyncio.Event()
        self.release.set()

    async def documents(self, order_uids: list[str]) -> list[StoredDocument]:
        self.queries += 1
        self.asked.append(order_uids)
        await self.release.wait()
        if self.unavailable:
            raise self.unavailable_as("connection refused")
        return [
            # The digest a real store keeps, so that each version has its own tag.
            StoredDocument(uid, self.stored[uid], hashlib.sha256(self.stored[uid]).digest())
            for uid in order_uids
            if uid in self.stored
        ]

    async def recent(self, limit: int) -> list[OrderSummary]:
        return []

    async def trail(self, order_uid: str, limit: int, after: int) -> OrderTrail | None:
        return None

    async def ping(self) -> bool:
        return not self.unavailable


class FakeDeadLetters:
    """Records what was sent, and the order of sends and acknowledgements in `events`."""

    def __init__(self, events: list[str]) -> None:
        self.sent: list[RejectedMessage] = []
        self.events = events
        self.stopped = False

    def send(self, rejected: Sequence[RejectedMessage]) -> None:
        if self.stopped:
            raise Stopped
        self.sent.extend(rejected)
        self.events.append(f"dead-lettered {[entry.message.offset for entry in rejected]}")


class FakeDeadLetterTrail:
    """Records the dead letters it was given, and when, in the same `events` as the dead-letter
    topic's sends and the acknowledgements; can be told to fail like the database would."""

    def __init__(self, events: list[str]) -> None:
        self.recorded: list[tuple[str, RejectedMessage]] = []
        self.events = events
        self.unavailable_for = 0

    def dead_lettered(self, rejected: Sequence[tuple[str, RejectedMessage]]) -> None:
        if self.unavailable_for:
            self.unavailable_for -= 1
            raise DatabaseUnavailable("connection refused")
        self.recorded.extend(rejected)
        self.events.append(f"trail {[(uid, entry.message.offset) for uid, entry in rejected]}")


class FakeExpirer:
    """Expires from a FakeWriter's orders, oldest first, as the PostgreSQL expirer does."""

    def __init__(self, writer: FakeWriter) -> None:
        self.writer = writer
        self.limits: list[int] = []
        self.unavailable_for = 0

    def expire(self, before: datetime, limit: int) -> Expired:
        if self.unavailable_for:
            self.unavailable_for -= 1
            raise DatabaseUnavailable("connection refused")
        self.limits.append(limit)
        old = sorted(
            (p for p in self.writer.stored.values() if p.order.date_created < before),
            key=lambda p: p.order.date_created,
        )[:limit]
        for prepared in old:
            del self.writer.stored[prepared.order.order_uid]
        return Expired(tuple(p.order.order_uid for p in old), 0)


@dataclass(frozen=True, slots=True)
class Queued:
    """A message as a producer was given it."""

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int
    on_delivery: Delivered | None
    timestamp: int
    headers: Headers | None


class StalledProducer:
    """A Kafka producer (`broker.MessageProducer`) whose broker never acknowledges: it keeps
    each message it is given, its local queue is full until it has been polled `full` times,
    `produce` raises `error` instead when one is given, and `flush` gives up with everything
    still queued."""

    def __init__(self, full: int = 0, error: Exception | None = None) -> None:
        self.full = full
        self.error = error
        self.polls: list[float] = []
        self.queued: list[Queued] = []

    def produce(self, topic: str, **message: Any) -> None:
        if self.error is not None:
            raise self.error
        if len(self.polls) < self.full:
            raise BufferError("Local: Queue full")
        self.queued.append(Queued(topic=topic, **message))

    def poll(self, timeout: float) -> int:
        self.polls.append(timeout)
        return 0

    def flush(self, timeout: float) -> int:
        return len(self.queued)


class FakeOrderStates:
    """The states of orders as the hub of their streams reads them (`ports.OrderStates`): set
    `states` by hand; `unavailable` fails the reads as a database away would."""

    def __init__(self) -> None:
        self.states: dict[str, OrderState] = {}
        self.reads: list[list[str]] = []
        self.unavailable = False

    async def __call__(self, order_uids: list[str]) -> dict[str, OrderState]:
        self.reads.append(sorted(order_uids))
        if self.unavailable:
            raise DatabaseUnavailable("connection refused")
        return {uid: self.states[uid] for uid in order_uids if uid in self.states}
