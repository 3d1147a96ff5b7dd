"""`order-viewer trail ID`: an order's whole trail, read from the database as the API pages it,
printed as a table after its state."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from order_viewer.adapters.postgres.reader import PostgresOrderReader
from order_viewer.domain.model import ORDER_UID_PATTERN
from order_viewer.service.ports import TRAIL_OUTCOMES, OrderTrail, TrailEntry

PAGE = 1000
# Wide enough that a row is one line when the output is not a terminal (a file, a pipe).
PIPED_WIDTH = 200
_ORDER_UID = re.compile(ORDER_UID_PATTERN)


def order_uid(text: str) -> str:
    """The argument as an order id; raises ValueError if it cannot be one."""
    if not _ORDER_UID.fullmatch(text):
        raise ValueError("an order id is 1 to 64 letters, digits, '-' or '_'")
    return text


def whole_trail(database_url: str, uid: str) -> tuple[OrderTrail, list[TrailEntry]] | None:
    """The order's first page (its state and counts) and every entry of its trail, oldest
    first; None if nothing is known of it. Raises DatabaseUnavailable."""

    async def read() -> tuple[OrderTrail, list[TrailEntry]] | None:
        reader = PostgresOrderReader(database_url, 1)
        await reader.open()
        try:
            first = page = await reader.trail(uid, PAGE, 0)
            if first is None:
                return None
            entries = list(first.entries)
            while page is not None and page.more:
                page = await reader.trail(uid, PAGE, entries[-1].key)
                entries.extend(page.entries if page is not None else ())
            return first, entries
        finally:
            await reader.close()

    return asyncio.run(read())


def print_trail(trail: OrderTrail, entries: list[TrailEntry], console: Console) -> None:
    console.print(Text(f"order {trail.order_uid}: {_state(trail)}"))
    counts = ", ".join(f"{trail.counts[outcome]} {outcome}" for outcome in TRAIL_OUTCOMES)
    console.print(Text(f"{len(entries)} messages handled: {counts}"))
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("handled at", "message", "message time", "outcome", "sha256", "reason"):
        table.add_column(column)
    for entry in entries:
        reason = f"{entry.reason_code}: {entry.reason_detail}" if entry.reason_code else ""
        message = f"{entry.topic}/{entry.partition}/{entry.offset}"
        if entry.replayed_from is not None:
            message += f" (replayed from {entry.replayed_from})"
        table.add_row(
            *(
                Text(cell)
                for cell in (
                    _time(entry.handled_at),
                    message,
                    _time(entry.message_timestamp),
                    entry.outcome,
                    entry.sha256.hex()[:16] if entry.sha256 is not None else "",
                    reason,
                )
            )
        )
    console.print(table)


def console(interactive: bool) -> Console:
    return Console() if interactive else Console(width=PIPED_WIDTH)


def _state(trail: OrderTrail) -> str:
    if trail.stored is not None:
        version = trail.stored
        return (
            f"stored, version {version.sha256.hex()[:16]} from partition {version.partition} "
            f"offset {version.offset}, stored at {_time(version.stored_at)}"
        )
    if trail.deleted_at is not None:
        return f"deleted at {_time(trail.deleted_at)}"
    return "never stored"


def _time(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).isoformat(timespec="milliseconds")
