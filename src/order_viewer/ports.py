"""What the service layer and the adapters share: the messages and results that cross between
them, the errors an adapter may raise, and the interfaces (ports) the service layer calls.

Nothing here knows PostgreSQL or Kafka: the adapters (`store`, `broker`, `consumer`) implement
these ports, the service layer (`service`) uses them, and the tests give it fakes of them.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from order_viewer.model import PreparedOrder, Rejection


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


@dataclass(frozen=True, slots=True)
class Deletion:
    """A tombstone: delete this order, unless a later message of it is what is stored."""

    order_uid: str
    partition: int
    offset: int


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
        self, batch: Sequence[PreparedOrder], deletions: Sequence[Deletion] = ()
    ) -> WriteResult:
        """Store every order of the batch and apply every deletion in one transaction, or none
        of them, and tell the other instances which of their cached orders changed when (and
        only if) it commits. The batch and the deletions hold each order_uid once between them;
        a stored order is replaced only as `model.supersedes` says, deleted only by a later
        tombstone (`model.later`), and an order is not stored again from a message older than
        its tombstone. Raises DatabaseUnavailable or RejectedByDatabase."""
        ...


@dataclass(frozen=True, slots=True)
class Expired:
    order_uids: tuple[str, ...]
    tombstones: int


class OrderExpirer(Protocol):
    def expire(self, before: datetime, limit: int) -> Expired:
        """Delete at most `limit` orders created before the instant and at most `limit`
        tombstones recorded before it, in one transaction that tells the other instances;
        skips rows a writer holds rather than waiting for them. Raises DatabaseUnavailable."""
        ...


class Changes(Protocol):
    """What an instance does when it hears of orders another instance changed."""

    def changed(self, order_uids: Sequence[str]) -> None:
        """These orders were replaced or deleted by a committed transaction."""
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
