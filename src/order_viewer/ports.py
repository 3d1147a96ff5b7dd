"""What the service layer and the adapters share: the messages and results that cross between
them, the errors an adapter may raise, and the interfaces (ports) the service layer calls.

Nothing here knows PostgreSQL or Kafka: the adapters (`store`, `broker`, `consumer`) implement
these ports, the service layer (`service`) uses them, and the tests give it fakes of them.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

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
class WriteResult:
    """Which orders of a written batch were new and which replaced a stored version; the rest
    were unchanged (an identical or older message)."""

    inserted: tuple[str, ...]
    replaced: tuple[str, ...]


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
    succeed later, and nothing of a write was kept."""


class RejectedByDatabase(Exception):
    """The database refused a batch for what is in it; retrying it unchanged cannot help."""


class Stopped(Exception):
    """A stop was requested while waiting for a dependency to come back."""


class OrderWriter(Protocol):
    def write(self, batch: Sequence[PreparedOrder]) -> WriteResult:
        """Store every order of the batch in one transaction, or none of them. The batch holds
        each order_uid once; a stored order is replaced only as `model.supersedes` says.
        Raises DatabaseUnavailable or RejectedByDatabase."""
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


class DeadLetters(Protocol):
    def send(self, rejected: Sequence[RejectedMessage]) -> None:
        """Returns once the dead-letter topic has acknowledged every one; raises Stopped if a
        stop comes first."""
        ...
