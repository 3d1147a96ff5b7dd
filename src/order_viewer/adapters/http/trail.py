"""An order's trail as the API answers it (`GET /order/{order_uid}/trail`): the body's models,
made from the reader's page, and the opaque cursor that pages it."""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel

from order_viewer.service.ports import OrderTrail, TrailEntry, TrailOutcome

TRAIL_LIMIT = 100
MAX_TRAIL_LIMIT = 1000
# A cursor is a trail entry's key (a bigint that is not negative, 8 bytes big-endian) in
# URL-safe base64 without padding: 11 characters, the first within the 32 whose top bit is clear,
# the last within the 16 whose two low bits (beyond the 64 of the key) are clear. The pattern
# holds exactly the cursors `cursor_of` makes, and is published in the API's schema.
CURSOR_PATTERN = r"^[A-Za-f][A-Za-z0-9_-]{9}[AEIMQUYcgkosw048]$"
_CURSOR = re.compile(CURSOR_PATTERN)


class InvalidCursor(ValueError):
    """`after` is not a cursor this API made."""


def cursor_of(key: int) -> str:
    return base64.urlsafe_b64encode(key.to_bytes(8, "big")).rstrip(b"=").decode("ascii")


def key_of(cursor: str) -> int:
    """The entry key a cursor stands for; raises InvalidCursor for anything `cursor_of` would
    not have made (another alphabet or length, a key beyond a bigint, the same bytes written
    another way). Any key is harmless: the page is of the order asked for, after that key."""
    # fullmatch: the pattern's `$` alone would take a trailing newline.
    if not _CURSOR.fullmatch(cursor):
        raise InvalidCursor(cursor)
    return int.from_bytes(base64.urlsafe_b64decode(cursor + "="), "big")


class Reason(BaseModel):
    code: str
    detail: str | None


class TrailEntryBody(BaseModel):
    topic: str
    partition: int
    offset: int
    message_timestamp: datetime | None
    handled_at: datetime
    outcome: TrailOutcome
    sha256: str | None
    """The version's digest, hex, for stored, unchanged and older; else null."""
    reason: Reason | None
    """Why it was dead-lettered (the dead letter's own code and detail); else null."""
    replayed_from: str | None
    """The dead letter ("topic/partition/offset") it was replayed from, if it was."""
    trace_id: str | None
    """The trace its message's `traceparent` named (32 hex digits), if it had a valid one."""


class StoredVersionBody(BaseModel):
    sha256: str
    partition: int
    offset: int
    stored_at: datetime


class TrailState(BaseModel):
    status: Literal["stored", "deleted", "never_stored"]
    version: StoredVersionBody | None
    deleted_at: datetime | None


class TrailCounts(BaseModel):
    stored: int
    unchanged: int
    older: int
    dead_lettered: int
    deleted: int


class TrailBody(BaseModel):
    order_uid: str
    state: TrailState
    counts: TrailCounts
    """Of the whole trail, not only of this page."""
    latest: TrailEntryBody | None
    """The most recent entry of the whole trail."""
    entries: list[TrailEntryBody]
    """Oldest first."""
    next: str | None
    """The `after` of the next page; null on the last."""


def trail_body(trail: OrderTrail) -> TrailBody:
    stored = trail.stored
    if stored is not None:
        state = TrailState(
            status="stored",
            version=StoredVersionBody(
                sha256=stored.sha256.hex(),
                partition=stored.partition,
                offset=stored.offset,
                stored_at=_utc(stored.stored_at),
            ),
            deleted_at=None,
        )
    elif trail.deleted_at is not None:
        state = TrailState(status="deleted", version=None, deleted_at=_utc(trail.deleted_at))
    else:
        state = TrailState(status="never_stored", version=None, deleted_at=None)
    return TrailBody(
        order_uid=trail.order_uid,
        state=state,
        counts=TrailCounts(**trail.counts),
        latest=None if trail.latest is None else _entry(trail.latest),
        entries=[_entry(entry) for entry in trail.entries],
        next=cursor_of(trail.entries[-1].key) if trail.more and trail.entries else None,
    )


def _entry(entry: TrailEntry) -> TrailEntryBody:
    return TrailEntryBody(
        topic=entry.topic,
        partition=entry.partition,
        offset=entry.offset,
        message_timestamp=None
        if entry.message_timestamp is None
        else _utc(entry.message_timestamp),
        handled_at=_utc(entry.handled_at),
        outcome=entry.outcome,
        sha256=None if entry.sha256 is None else entry.sha256.hex(),
        reason=None
        if entry.reason_code is None
        else Reason(code=entry.reason_code, detail=entry.reason_detail),
        replayed_from=entry.replayed_from,
        trace_id=entry.trace_id,
    )


def _utc(moment: datetime) -> datetime:
    # As the session's time zone gave it: every time of the API is said in UTC.
    return moment.astimezone(UTC)
