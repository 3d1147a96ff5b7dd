"""The orders' trails: the dead letters recorded before their batch is acknowledged, and a page
of an order's trail read in one statement.

The writer records the other outcomes in its own transaction (`writer`); the table and why it
is shaped so are in the migration 0004.
"""

from __future__ import annotations

from collections.abc import Sequence

from order_viewer.adapters.postgres.connection import (
    WATCHDOG,
    DedicatedConnection,
    database_errors,
)
from order_viewer.adapters.tracing import trace_id_of
from order_viewer.service.ports import (
    TRAIL_OUTCOMES,
    OrderTrail,
    RejectedMessage,
    StoredVersion,
    TrailEntry,
    TrailOutcome,
)

_RECORD_DEAD_LETTERS = """
INSERT INTO order_trail (
    order_uid, topic, kafka_partition, kafka_offset, message_timestamp, outcome,
    reason_code, reason_detail, replayed_from, trace_id
)
SELECT order_uid, topic, kafka_partition, kafka_offset, to_timestamp(timestamp_ms / 1000.0),
       'dead_lettered', reason_code, reason_detail, replayed_from, trace_id
FROM unnest(
    %(uids)s::text[], %(topics)s::text[], %(partitions)s::integer[], %(offsets)s::bigint[],
    %(timestamps)s::bigint[], %(codes)s::text[], %(details)s::text[], %(replayed)s::text[],
    %(traces)s::text[]
) AS d(order_uid, topic, kafka_partition, kafka_offset, timestamp_ms, reason_code,
       reason_detail, replayed_from, trace_id)
ORDER BY kafka_partition, kafka_offset
"""
# As long as a write may go unanswered by default (writer.DEFAULT_WRITE_TIMEOUT_SECONDS twice,
# plus 10 s): a frozen server must not hold the consumer for ever, nor a slow one be cut early.
UNANSWERED_SECONDS = 70


class PostgresDeadLetterTrail:
    """Records dead letters in their orders' trails over a connection of its own (`settle`
    runs on the consumer's thread, beside the writers')."""

    def __init__(self, database_url: str) -> None:
        self._connection = DedicatedConnection(database_url, "order-viewer-trail")

    def dead_lettered(self, rejected: Sequence[tuple[str, RejectedMessage]]) -> None:
        messages = [entry.message for _, entry in rejected]
        with database_errors(reset=self.close):
            connection = self._connection.get()
            with WATCHDOG.watch(connection, UNANSWERED_SECONDS):
                connection.execute(
                    _RECORD_DEAD_LETTERS,
                    {
                        "uids": [uid for uid, _ in rejected],
                        "topics": [message.topic for message in messages],
                        "partitions": [message.partition for message in messages],
                        "offsets": [message.offset for message in messages],
                        "timestamps": [message.timestamp_ms for message in messages],
                        "codes": [entry.rejection.code for _, entry in rejected],
                        "details": [entry.rejection.message for _, entry in rejected],
                        "replayed": [message.replayed_from for message in messages],
                        "traces": [trace_id_of(message.trace) for message in messages],
                    },
                )

    def close(self) -> None:
        self._connection.close()


_ENTRY_COLUMNS = """id, topic, kafka_partition, kafka_offset, message_timestamp, handled_at,
    outcome, content_sha256, reason_code, reason_detail, replayed_from, trace_id"""
# One statement, so that the page, the counts, the latest entry and the state are of one
# snapshot: each part a set of rows of the same columns, told apart by the first. The page and
# the latest entry each read the index on (order_uid, id) for the rows they return; the counts
# read the order's whole trail, which retention and deletions bound.
TRAIL_PAGE = f"""
(SELECT 'entry', {_ENTRY_COLUMNS} FROM order_trail
 WHERE order_uid = %(uid)s AND id > %(after)s ORDER BY id LIMIT %(limit)s + 1)
UNION ALL
(SELECT 'latest', {_ENTRY_COLUMNS} FROM order_trail
 WHERE order_uid = %(uid)s ORDER BY id DESC LIMIT 1)
UNION ALL
(SELECT 'count', count(*), NULL, NULL, NULL, NULL, NULL, outcome, NULL, NULL, NULL, NULL, NULL
 FROM order_trail WHERE order_uid = %(uid)s GROUP BY outcome)
UNION ALL
(SELECT 'stored', NULL, NULL, kafka_partition, kafka_offset, NULL, stored_at, NULL,
        content_sha256, NULL, NULL, NULL, NULL
 FROM orders WHERE order_uid = %(uid)s)
UNION ALL
(SELECT 'deleted', NULL, NULL, NULL, NULL, NULL, deleted_at, NULL, NULL, NULL, NULL, NULL, NULL
 FROM order_tombstones WHERE order_uid = %(uid)s)
"""  # noqa: S608 (only the constant above is interpolated)


def trail_page(order_uid: str, limit: int, rows: Sequence[tuple[object, ...]]) -> OrderTrail | None:
    """The page TRAIL_PAGE's rows make (asked for `limit` entries); None if they hold nothing."""
    if not rows:
        return None
    entries: list[TrailEntry] = []
    counts: dict[TrailOutcome, int] = dict.fromkeys(TRAIL_OUTCOMES, 0)
    latest: TrailEntry | None = None
    stored: StoredVersion | None = None
    deleted_at = None
    for part, *columns in rows:
        if part == "entry":
            entries.append(TrailEntry(*columns))  # type: ignore[arg-type]
        elif part == "latest":
            latest = TrailEntry(*columns)  # type: ignore[arg-type]
        elif part == "count":
            counts[columns[6]] = columns[0]  # type: ignore[index, assignment]
        elif part == "stored":
            _, _, partition, offset, _, stored_at, _, sha256, *_ = columns
            stored = StoredVersion(sha256, partition, offset, stored_at)  # type: ignore[arg-type]
        else:
            deleted_at = columns[5]
    return OrderTrail(
        order_uid,
        stored,
        deleted_at,  # type: ignore[arg-type]
        counts,
        latest,
        tuple(entries[:limit]),
        more=len(entries) > limit,
    )
