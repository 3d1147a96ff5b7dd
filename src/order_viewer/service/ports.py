"""What the service layer and the adapters share: the messages and results that cross between
them, the errors an adapter may raise, and the interfaces (ports) the service layer calls.

Nothing here knows PostgreSQL or Kafka: the adapters (`store`, `broker`, `consumer`) implement
these ports, the service layer (`service`) uses them, and the tests give it fakes of them.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Final, Literal, Protocol

from order_viewer.domain.model import PreparedOrder, Rejection

# The W3C Trace Context headers of a message (`traceparent`, then `tracestate`), as it carried
# them: each at most once, within its bound (`adapters.tracing.trace_headers`).
TraceHeaders = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class ConsumedMessage:
    """One consumed message, as much of it as the service needs."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None
    """The message's own timestamp, in milliseconds since the epoch; None if it has none."""
    replayed_from: str | None = None
    """The dead letter it was sent back from ("topic/partition/offset"), if a replay sent it."""
    trace: TraceHeaders = ()


@dataclass(frozen=True, slots=True)
class RejectedMessage:
    message: ConsumedMessage
    rejection: Rejection
    # The trace its dead letter continues: the span of its consumption when traced; None, the
    # message's own headers, passed on.
    trace: TraceHeaders | None = None


@dataclass(frozen=True, slots=True)
class Deletion:
    """A tombstone: delete this order, unless a later message of it is what is stored."""

    order_uid: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class Handled:
    """A message of a batch being written, for its order's trail: `sha256` is its version's
    digest (None for a tombstone), and `superseded` says that a later message of the same order
    in the batch was written instead, which makes this one an older version, or, if it is a copy
    of that one, a redelivery that changed nothing."""

    order_uid: str
    message: ConsumedMessage
    sha256: bytes | None
    superseded: bool = False


@dataclass(frozen=True, slots=True)
class WriteResult:
    """Which orders of a written batch were new, which replaced a stored version and which were
    deleted; the rest were unchanged (an identical or older message, or a tombstone of an order
    not stored or stored from a later message)."""

    inserted: tuple[str, ...]
    replaced: tuple[str, ...]
    deleted: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StoredDocument:
    order_uid: str
    document: bytes
    sha256: bytes


@dataclass(frozen=True, slots=True)
class OrderSummary:
    order_uid: str
    date_created: datetime
    customer_id: str
    amount: int
    currency: str
    item_count: int


# What became of a message, as an order's trail records it.
TrailOutcome = Literal["stored", "unchanged", "older", "dead_lettered", "deleted"]
TRAIL_OUTCOMES: tuple[TrailOutcome, ...] = (
    "stored", "unchanged", "older", "dead_lettered", "deleted",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class TrailEntry:
    """One handled message of an order; `key` orders the trail (and pages it)."""

    key: int
    topic: str
    partition: int
    offset: int
    message_timestamp: datetime | None
    handled_at: datetime
    outcome: TrailOutcome
    sha256: bytes | None
    reason_code: str | None
    reason_detail: str | None
    replayed_from: str | None
    trace_id: str | None


@dataclass(frozen=True, slots=True)
class StoredVersion:
    sha256: bytes
    partition: int
    offset: int
    stored_at: datetime


@dataclass(frozen=True, slots=True)
class OrderTrail:
    """A page of an order's trail: its state (a stored version, or when it was deleted), the
    count of each outcome and the latest entry of the whole trail, and the page's entries;
    `more` says that entries follow the page's last."""

    order_uid: str
    stored: StoredVersion | None
    deleted_at: datetime | None
    counts: dict[TrailOutcome, int]
    latest: TrailEntry | None
    entries: tuple[TrailEntry, ...]
    more: bool


@dataclass(frozen=True, slots=True)
class CachedOrder:
    """An order as the API sends it: the JSON body and its entity tag, computed once."""

    body: bytes
    etag: str

    @classmethod
    def of(cls, body: bytes, sha256: bytes) -> CachedOrder:
        return cls(body, etag_of(sha256))


def etag_of(sha256: bytes) -> str:
    """The entity tag of a version: a prefix of its content's digest, so that the tag of a stored
    version can be told from its digest alone."""
    return f'"{sha256[:16].hex()}"'


class Absent(Enum):
    """What the cache answers for an id the database did not find, with no change of it since."""

    ABSENT = "absent"


ABSENT: Final = Absent.ABSENT


@dataclass(frozen=True, slots=True)
class CacheTicket:
    """Taken from the cache (`Cache.ticket`) before the database is asked, and handed back with
    its answer: the cache then keeps nothing of an order changed since, so that a read never
    puts back a version older than one written or heard meanwhile. `changes` is the cache's
    count of changes when the ticket was taken, read by the cache alone."""

    changes: int


class DatabaseUnavailable(Exception):
    """The database cannot answer now (down, unreachable, restarting); the same request may
    succeed later. A write it interrupted was kept only if the connection was lost during
    COMMIT after the server committed."""


class DatabaseBusy(DatabaseUnavailable):
    """The database is running but cannot answer now (no pooled connection free in time, out of
    a resource, a statement timed out): others may be committing meanwhile."""


# Why a write was cut: it waited too long for a lock another session held, one of its statements
# ran too long, or the server stopped answering altogether.
TimeoutCause = Literal["lock", "statement", "unresponsive"]


class WriteTimedOut(DatabaseUnavailable):
    """A write cut by its deadline, and rolled back: retried like an outage. `blocker` names
    what held it (a session's pid and how long its transaction had been open), when known."""

    def __init__(self, message: str, cause: TimeoutCause, blocker: str | None = None) -> None:
        super().__init__(message)
        self.cause: TimeoutCause = cause
        self.blocker = blocker


class RejectedByDatabase(Exception):
    """The database refused a batch for what is in it; retrying it unchanged cannot help."""


class Stopped(Exception):
    """A stop was requested while waiting for a dependency to come back."""


class OrderWriter(Protocol):
    def write(
        self,
        batch: Sequence[PreparedOrder],
        deletions: Sequence[Deletion] = (),
        handled: Sequence[Handled] = (),
    ) -> WriteResult:
        """Store every order of the batch and apply every deletion in one transaction, or none
        of them, and tell the other instances which of their cached orders changed when (and
        only if) it commits. The batch and the deletions hold each order_uid once between them;
        a stored order is replaced only as `model.supersedes` says, deleted only by a later
        tombstone (`model.later`), and an order is not stored again from a message older than
        its tombstone. With `handled` (the messages of the batch and the deletions, and those
        they superseded), each one's outcome is added to its order's trail in the same
        transaction, and a deletion leaves its order only the deletion's own entry. Raises
        DatabaseUnavailable or RejectedByDatabase."""
        ...


class DeadLetterTrail(Protocol):
    def dead_lettered(self, rejected: Sequence[tuple[str, RejectedMessage]]) -> None:
        """Add each rejected message, with the order_uid its key names, to that order's trail
        as dead-lettered, with its reason, and return once committed; a message older than its
        order's tombstone is left out, as the deletion left only its own entry. Raises
        DatabaseUnavailable."""
        ...


@dataclass(frozen=True, slots=True)
class Expired:
    order_uids: tuple[str, ...]
    tombstones: int
    trail_entries: int = 0


class OrderExpirer(Protocol):
    def expire(self, before: datetime, limit: int) -> Expired:
        """Delete at most `limit` orders created before the instant, and at most `limit`
        tombstones and `limit` trail entries recorded before it, in one transaction that tells
        the other instances; skips rows a writer holds rather than waiting for them. Raises
        DatabaseUnavailable."""
        ...


class Changes(Protocol):
    """What an instance does when it hears of orders another instance changed."""

    def changed(self, order_uids: Sequence[str]) -> None:
        """These orders were stored, replaced or deleted by a committed transaction."""
        ...

    def lost(self) -> None:
        """Changes may now go unheard (the connection that listens for them is gone)."""
        ...

    def listening(self) -> None:
        """Every change committed from now on will be heard."""
        ...


class OrderReader(Protocol):
    async def documents(self, order_uids: list[str]) -> list[StoredDocument]:
        """The stored orders of these ids (absent ids are left out); raises DatabaseUnavailable."""
        ...

    async def trail(self, order_uid: str, limit: int, after: int) -> OrderTrail | None:
        """A page of the order's trail: its state, the counts and latest entry of the whole
        trail, and up to `limit` entries whose key is above `after`, oldest first; None when
        nothing is known of the id. Raises DatabaseUnavailable."""
        ...

    async def recent(self, limit: int) -> list[OrderSummary]: ...

    async def ping(self) -> bool: ...


class NewestDocuments(Protocol):
    def __call__(self, limit: int) -> Generator[list[StoredDocument], None, None]:
        """The newest `limit` stored orders, newest first, in chunks; raises DatabaseUnavailable."""
        ...


class StoredVersions(Protocol):
    def __call__(self, order_uids: list[str]) -> dict[str, bytes]:
        """The content SHA-256 of each of these orders that is stored; raises
        DatabaseUnavailable."""
        ...


class DeadLetters(Protocol):
    def send(self, rejected: Sequence[RejectedMessage]) -> None:
        """Returns once the dead-letter topic has acknowledged every one; raises Stopped if a
        stop comes first."""
        ...


class WrittenOrders(Protocol):
    """Where the ingest puts what it committed: the serving process's cache (`cache.OrderCache`),
    or the link to it from the ingest process (`ingest_process.IngestLink`)."""

    def ticket(self) -> CacheTicket:
        """To take before the database is asked, and hand back with what it answered."""
        ...

    def put_written(
        self, entries: dict[str, CachedOrder], ticket: CacheTicket | None = None
    ) -> None:
        """Orders the database has just committed, replacing older copies, except those changed
        since the ticket."""
        ...

    def invalidate(self, order_uids: Iterable[str]) -> None:
        """Forget these orders (and that they were absent), and any read of them under way."""
        ...


class Cache(WrittenOrders, Protocol):
    """The bounded cache of orders the HTTP side answers from (`cache.OrderCache`): what the
    service layer puts in, takes out and keeps in step with the other instances' changes."""

    @property
    def capacity(self) -> int: ...

    @property
    def warm_full(self) -> bool:
        """Whether warm-up met a bound, so that it stops reading the database."""
        ...

    def __len__(self) -> int: ...

    def look_up(self, order_uid: str) -> CachedOrder | Absent | None:
        """The cached order; ABSENT for an id the database did not find, with no change of it
        since; None for a miss (and for every id while suspended)."""
        ...

    def kept(self, order_uid: str) -> CachedOrder | None:
        """The entry of an order, even while suspended: what is left to serve when the database
        cannot be reached."""
        ...

    def fill(
        self, entries: dict[str, CachedOrder], ticket: CacheTicket, absent: Iterable[str] = ()
    ) -> int:
        """Orders read from the database, and the ids it answered `absent` for, except those
        changed since the ticket; how many orders were kept."""
        ...

    def warm(self, entries: dict[str, CachedOrder], ticket: CacheTicket) -> int:
        """Orders read at warm-up, older than every one cached so far, except those changed since
        the ticket; how many were kept."""
        ...

    def etags(self) -> dict[str, str]: ...

    def verify(self, stored_etags: dict[str, str], checked: Iterable[str]) -> int:
        """Drop the checked entries whose tag is not the stored one; how many were dropped."""
        ...

    def suspend(self) -> None:
        """Answer no lookup and keep no read until `resume`."""
        ...

    def resume(self) -> None: ...


@dataclass(frozen=True, slots=True)
class SettledBatch:
    """What a batch stored and acknowledged did: the orders it stored, replaced and deleted, the
    reason code of each message it dead-lettered, and its newest order's date_created."""

    inserted: int
    replaced: int
    deleted: int
    dead_lettered: tuple[str, ...]
    newest: datetime | None


class BatchTrace(Protocol):
    """The spans of one batch of consumed messages (`tracing.KafkaBatchTrace`): one per message,
    continuing its producer's trace, and its write's."""

    def writing(self, orders: int, deletions: int) -> AbstractContextManager[None]:
        """One attempt at writing the batch, linked to every message's span."""
        ...

    def written(self, result: WriteResult) -> None: ...

    def settled(
        self, kept: Mapping[str, ConsumedMessage], rejected: Sequence[RejectedMessage]
    ) -> None:
        """Each message's span ended with what became of it: `kept` is the message of each
        order that was written (stored, deleted or unchanged as `written` said); any other
        message not rejected lost to a later one of its order in the batch."""
        ...

    def onward(self, message: ConsumedMessage) -> TraceHeaders:
        """The headers that continue the message's trace in its dead letter."""
        ...


class MessageTracing(Protocol):
    """Traces batches of consumed messages; only given to the service when tracing is on."""

    def batch(self, messages: Sequence[ConsumedMessage]) -> BatchTrace: ...


class ServiceMetrics(Protocol):
    """What the service layer counts and measures (`metrics.Metrics` exports it)."""

    def write_timed_out(self, cause: TimeoutCause) -> None: ...

    def batch_written(self, seconds: float) -> None:
        """One batch stored, in one transaction of this many seconds."""
        ...

    def retried(self, kind: str) -> None:
        """A retry after a transient failure of `kind` (what failed)."""
        ...

    def batch_settled(self, batch: SettledBatch) -> None:
        """A batch stored and acknowledged."""
        ...

    def warmed_up(self, seconds: float) -> None: ...

    def heard_changes(self, orders: int) -> None:
        """Orders other instances stored, replaced or deleted, as heard by this one."""
        ...

    def listener_state(self, listening: bool) -> None: ...

    def expired(self, orders: int) -> None:
        """Orders this instance deleted for being older than the retention."""
        ...


@dataclass(frozen=True, slots=True)
class OrderState:
    """What is stored of an order now, as the streams of its changes send it: its version and
    the offset of the message it came from, or, when none is stored, the offset of the tombstone
    that deleted it (None: retention deleted it, or it was never stored). One key's messages
    stay in one partition, so a later state of an order has a greater offset."""

    order: CachedOrder | None
    offset: int | None


class OrderStates(Protocol):
    async def __call__(self, order_uids: list[str]) -> dict[str, OrderState]:
        """The state of each of these orders that is stored or has a tombstone (the others are
        left out); raises DatabaseUnavailable."""
        ...
