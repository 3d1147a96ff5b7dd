"""The batch writer the consumer uses: a batch COPYed, merged and its changes notified in one
transaction, under deadlines that say what held it up."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

import psycopg
from psycopg import sql

from order_viewer.adapters.postgres.connection import (
    WATCHDOG,
    DedicatedConnection,
    Unanswered,
    database_errors,
)
from order_viewer.adapters.postgres.listener import notify_changes
from order_viewer.adapters.postgres.tables import ORDERS, PARTS
from order_viewer.adapters.tracing import trace_id_of
from order_viewer.domain.model import PreparedOrder
from order_viewer.service.ports import (
    Deletion,
    Handled,
    RejectedByDatabase,
    TrailOutcome,
    WriteResult,
    WriteTimedOut,
)

# The order rows of a batch are COPYed (the fastest way into PostgreSQL) into a staging table
# that lives as long as the writer's connection and empties at every commit, then merged in one
# statement that says which orders were new or replaced. Only those orders' delivery, payment and
# items rows are then COPYed straight into their tables. The statements are composed once, here,
# from the declaration of the tables' columns.
_CREATE_STAGING = (
    "CREATE TEMP TABLE stage_orders (LIKE orders INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
_COPY_STAGED_ORDERS = (
    sql.SQL("COPY stage_orders ({columns}) FROM STDIN")
    .format(columns=ORDERS.column_list)
    .as_string()
)
_COPY_PARTS = tuple(
    (
        sql.SQL("COPY {table} ({columns}) FROM STDIN")
        .format(table=sql.Identifier(table.name), columns=table.column_list)
        .as_string(),
        table,
    )
    for table in PARTS
)

# model.supersedes in SQL: an existing order is replaced only by a different version from a later
# message, so an identical redelivery changes nothing and an older one redelivered loses; and an
# order is not stored again from a message older than its tombstone (model.later).
_MERGE_ORDERS = (
    sql.SQL("""
INSERT INTO orders ({columns})
SELECT {columns} FROM stage_orders s
WHERE NOT EXISTS (
    SELECT FROM order_tombstones t
    WHERE t.order_uid = s.order_uid
      AND t.kafka_partition = s.kafka_partition AND t.kafka_offset >= s.kafka_offset
)
ON CONFLICT (order_uid) DO UPDATE SET {updates}, stored_at = now()
WHERE orders.content_sha256 <> excluded.content_sha256
  AND (orders.kafka_partition <> excluded.kafka_partition
       OR orders.kafka_offset < excluded.kafka_offset)
RETURNING order_uid, xmax <> 0 AS replaced
""")
    .format(
        columns=ORDERS.column_list,
        updates=sql.SQL(", ").join(
            sql.SQL("{column} = excluded.{column}").format(column=sql.Identifier(column.name))
            for column in ORDERS.columns
            if column.name != "order_uid"
        ),
    )
    .as_string()
)

# The replaced orders' old parts go before their new ones are copied in.
_DELETE_PARTS = tuple(
    sql.SQL("DELETE FROM {table} WHERE order_uid = ANY(%(uids)s)")
    .format(table=sql.Identifier(table.name))
    .as_string()
    for table in PARTS
)


_TOMBSTONES = (
    "unnest(%(uids)s::text[], %(partitions)s::integer[], %(offsets)s::bigint[]) "
    "AS d(order_uid, kafka_partition, kafka_offset)"
)

# A tombstone is kept at the latest position seen, as a stored order is; those recorded now are
# returned, for the trails.
_RECORD_TOMBSTONES = f"""
INSERT INTO order_tombstones (order_uid, kafka_partition, kafka_offset)
SELECT order_uid, kafka_partition, kafka_offset FROM {_TOMBSTONES}
ON CONFLICT (order_uid) DO UPDATE SET
    kafka_partition = excluded.kafka_partition, kafka_offset = excluded.kafka_offset,
    deleted_at = now()
WHERE order_tombstones.kafka_partition <> excluded.kafka_partition
   OR order_tombstones.kafka_offset < excluded.kafka_offset
RETURNING order_uid
"""  # noqa: S608 (only the constant above is interpolated)

# Delivery, payment and items go with their order (ON DELETE CASCADE).
_DELETE_ORDERS = f"""
DELETE FROM orders o USING {_TOMBSTONES}
WHERE o.order_uid = d.order_uid
  AND (o.kafka_partition <> d.kafka_partition OR o.kafka_offset < d.kafka_offset)
RETURNING o.order_uid
"""  # noqa: S608 (only the constant above is interpolated)


# The trail of a batch: each valid message's outcome, read from what the transaction did, then
# COPYed into `order_trail`, oldest first. Most outcomes are known without asking: stored if
# the merge wrote its order, older if a later message of its order in the batch was written
# instead. Only the others (a redelivery or an older version: unchanged if its order is stored
# with its content, older otherwise; a tombstone: a deletion if recorded now with no order left
# stored, unchanged if it is the one recorded already, older otherwise) need what is stored,
# read for them alone, so that a batch of new orders pays one COPY and nothing more.
# In binary: a row then costs the client a third of its text form (0.7 against 2.1 µs in a
# micro-benchmark of these columns), and a trail row is written for every message.
_COPY_TRAIL = (
    "COPY order_trail (order_uid, topic, kafka_partition, kafka_offset, message_timestamp, "
    "outcome, content_sha256, replayed_from, trace_id) FROM STDIN (FORMAT BINARY)"
)
_TRAIL_TYPES = ("text", "text", "int4", "int8", "timestamptz", "text", "bytea", "text", "text")
_STORED_VERSIONS = "SELECT order_uid, content_sha256 FROM orders WHERE order_uid = ANY(%s)"
_TOMBSTONE_POSITIONS = (
    "SELECT order_uid, kafka_partition, kafka_offset FROM order_tombstones "
    "WHERE order_uid = ANY(%s)"
)
# A deletion leaves its order's trail only its own entry (and any of a later message of the
# same partition): the rest goes with the order, this batch's entries included.
_DELETE_EARLIER_TRAIL = f"""
DELETE FROM order_trail e USING {_TOMBSTONES}
WHERE e.order_uid = d.order_uid
  AND NOT (e.kafka_partition = d.kafka_partition AND e.kafka_offset >= d.kafka_offset)
"""  # noqa: S608 (only the constant above is interpolated)


# Who holds a lock that a write waited for: the oldest transaction, other than one waiting for
# a lock itself, that holds a lock on the order tables or a writer's partition lock. Its age is
# visible only to roles that may see other sessions' activity (pg_read_all_stats, or the same
# role); the pid always is. No query text, user or address: they may carry personal data.
_BLOCKER = """
SELECT a.pid, a.state, floor(extract(epoch FROM now() - a.xact_start))::bigint
FROM pg_stat_activity a
WHERE a.pid <> pg_backend_pid() AND a.datname = current_database()
  AND a.wait_event_type IS DISTINCT FROM 'Lock'
  AND EXISTS (
      SELECT FROM pg_locks l WHERE l.pid = a.pid AND l.granted
        AND (l.relation = ANY(%(tables)s::regclass[])
             OR (l.locktype = 'advisory' AND l.classid = %(lock_class)s::oid))
  )
ORDER BY a.xact_start NULLS LAST, a.pid
LIMIT 1
"""
_ORDER_TABLES = [
    ORDERS.name, *(table.name for table in PARTS), "order_tombstones", "order_trail",
]  # fmt: skip
# DATABASE_WRITE_TIMEOUT_SECONDS's default (the settings' test holds them equal): the largest
# batch that is valid (1,000 orders of the most items an order may have) must be written within
# it, not cut and retried for ever (its measured time is in docs/RELIABILITY.md).
DEFAULT_WRITE_TIMEOUT_SECONDS = 30


class PostgresOrderWriter:
    """Writes batches of orders, each batch in one transaction, over one dedicated connection.

    Every write has deadlines: a lock another session holds is waited for at most
    `timeout_seconds` (lock_timeout), a statement runs at most twice that (statement_timeout,
    which a lock wait close to its limit leaves time to run), and a write the server has not
    answered 10 s after that is cut by the client (`_Watchdog`), as a frozen server enforces
    nothing. Each raises WriteTimedOut, naming its cause and, for a lock, who held it.
    """

    def __init__(
        self, database_url: str, instance: str, timeout_seconds: int = DEFAULT_WRITE_TIMEOUT_SECONDS
    ) -> None:
        self._database_url = database_url
        self._instance = instance
        self._lock_timeout_ms = timeout_seconds * 1000
        self._unanswered_seconds = 2 * timeout_seconds + 10
        self._connection = DedicatedConnection(database_url, "order-viewer-writer", self._prepare)

    def _prepare(self, connection: psycopg.Connection[tuple[object, ...]]) -> None:
        # Set here rather than as connection `options`, which would replace any of the URL's.
        connection.execute(
            "SELECT set_config('lock_timeout', %s, false), "
            "set_config('statement_timeout', %s, false)",
            (f"{self._lock_timeout_ms}ms", f"{2 * self._lock_timeout_ms}ms"),
        )
        connection.execute(_CREATE_STAGING)

    def close(self) -> None:
        self._connection.close()

    def write(
        self,
        batch: Sequence[PreparedOrder],
        deletions: Sequence[Deletion] = (),
        handled: Sequence[Handled] = (),
    ) -> WriteResult:
        """Store every order of the batch and apply every deletion, or none of them, and add
        the `handled` messages to their orders' trails (`ports.OrderWriter`).

        The batch and the deletions must hold each order_uid once (its newest message).
        """
        written: dict[str, bool] = {}
        deleted: list[str] = []
        recorded: list[str] = []
        with database_errors(
            reset=self.close, refused=lambda error: RejectedByDatabase(_describe(error))
        ):
            connection = self._connection.get()
            with (
                self._deadlines(connection),
                connection.transaction(),
                connection.cursor() as cursor,
            ):
                _lock_partitions(
                    cursor, {p.partition for p in batch} | {d.partition for d in deletions}
                )
                if deletions:
                    tombstones = {
                        "uids": [d.order_uid for d in deletions],
                        "partitions": [d.partition for d in deletions],
                        "offsets": [d.offset for d in deletions],
                    }
                    cursor.execute(_RECORD_TOMBSTONES, tombstones)
                    recorded = [str(uid) for (uid,) in cursor.fetchall()]
                    cursor.execute(_DELETE_ORDERS, tombstones)
                    deleted = [str(uid) for (uid,) in cursor.fetchall()]
                if batch:
                    _copy_order_rows(cursor, batch)
                    cursor.execute(_MERGE_ORDERS)
                    written = {str(uid): bool(replaced) for uid, replaced in cursor.fetchall()}
                replaced = [uid for uid, was_replaced in written.items() if was_replaced]
                if replaced:
                    for statement in _DELETE_PARTS:
                        cursor.execute(statement, {"uids": replaced})
                if written:
                    _copy_parts(cursor, [p for p in batch if p.order.order_uid in written])
                if handled:
                    _record_trail(cursor, handled, set(written), set(recorded))
                # New orders too: another instance may remember their ids as absent.
                notify_changes(cursor, self._instance, [*written, *deleted])
        return WriteResult(
            inserted=tuple(uid for uid, was_replaced in written.items() if not was_replaced),
            replaced=tuple(replaced),
            deleted=tuple(deleted),
        )

    @contextlib.contextmanager
    def _deadlines(self, connection: psycopg.Connection[tuple[object, ...]]) -> Iterator[None]:
        """A write's deadlines, watched, and the errors they end it with as WriteTimedOut."""
        try:
            with WATCHDOG.watch(connection, self._unanswered_seconds):
                yield
        except Unanswered as error:
            raise WriteTimedOut(str(error), "unresponsive") from error
        except psycopg.errors.LockNotAvailable as error:
            raise WriteTimedOut(_describe(error), "lock", self._blocker()) from error
        except psycopg.errors.QueryCanceled as error:
            raise WriteTimedOut(_describe(error), "statement") from error

    def _blocker(self) -> str | None:
        """Who held the lock a write gave up on, if it can be told (and still holds it)."""
        try:
            with psycopg.connect(
                self._database_url,
                autocommit=True,
                connect_timeout=5,
                application_name="order-viewer-lock-lookup",
            ) as connection:
                row = connection.execute(
                    _BLOCKER, {"tables": _ORDER_TABLES, "lock_class": PARTITION_LOCK_CLASS}
                ).fetchone()
        except psycopg.Error:
            return None
        if row is None:
            return None
        pid, state, open_seconds = row
        age = "of unknown age" if open_seconds is None else f"open for {open_seconds} s"
        return f"pid {pid} ({state or 'state not visible'}, its transaction {age})"


# The class of the advisory locks that writers take per Kafka partition (the objid is the
# partition); two-key advisory locks never meet the migration's one-key lock.
PARTITION_LOCK_CLASS = 0x6F76  # "ov"


def _lock_partitions(cursor: psycopg.Cursor[tuple[object, ...]], partitions: set[int]) -> None:
    """Make the writers of one partition take turns until their transactions end. Two instances
    write one partition only while it moves between them (the old owner finishing a batch the
    new one re-reads), and then a tombstone's delete and the merge of an earlier version of the
    same order, each under READ COMMITTED, could miss each other's uncommitted rows and leave
    the order stored behind its later tombstone. Waiting here, the later writer's statements see
    what the earlier one committed. In ascending order, so that two writers never wait for each
    other in a cycle."""
    for partition in sorted(partitions):
        cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", (PARTITION_LOCK_CLASS, partition))


def _describe(error: psycopg.Error) -> str:
    diagnostic = error.diag
    detail = f"{diagnostic.message_primary or error}"
    if diagnostic.column_name or diagnostic.constraint_name:
        detail += f" ({diagnostic.column_name or diagnostic.constraint_name})"
    return detail


def _copy_order_rows(
    cursor: psycopg.Cursor[tuple[object, ...]], batch: Sequence[PreparedOrder]
) -> None:
    with cursor.copy(_COPY_STAGED_ORDERS) as copy:
        for row in ORDERS.rows(batch):
            copy.write_row(row)


def _record_trail(
    cursor: psycopg.Cursor[tuple[object, ...]],
    handled: Sequence[Handled],
    written: set[str],
    recorded: set[str],
) -> None:
    """The handled messages' outcomes added to their orders' trails (`_COPY_TRAIL`)."""
    pending = [h for h in handled if not h.superseded and h.order_uid not in written]
    # As the rows hold them (bytes, integers), compared with the messages' alone.
    stored: dict[str, object] = {}
    tombstones: dict[str, tuple[object, object]] = {}
    if pending:
        uids = [entry.order_uid for entry in pending]
        stored = {str(uid): sha for uid, sha in cursor.execute(_STORED_VERSIONS, (uids,))}
        tombstones = {
            str(uid): (partition, offset)
            for uid, partition, offset in cursor.execute(_TOMBSTONE_POSITIONS, (uids,))
        }
    deletions: list[Handled] = []

    def kept_outcome(entry: Handled) -> TrailOutcome:
        uid, message = entry.order_uid, entry.message
        if entry.sha256 is not None:
            if uid in written:
                return "stored"
            return "unchanged" if stored.get(uid) == entry.sha256 else "older"
        if uid in stored or tombstones.get(uid) != (message.partition, message.offset):
            return "older"
        if uid in recorded:
            deletions.append(entry)
            return "deleted"
        return "unchanged"

    # The newest message of each order in the batch, the one the write acted on.
    kept = {entry.order_uid: entry for entry in handled if not entry.superseded}
    decided = {uid: kept_outcome(entry) for uid, entry in kept.items()}

    def outcome(entry: Handled) -> TrailOutcome:
        if not entry.superseded:
            return decided[entry.order_uid]
        newest = kept.get(entry.order_uid)
        # A copy of the version the batch stored (or found stored) is a redelivery of it, which
        # changed nothing; any other earlier message of the order lost to the later one.
        if (
            newest is not None
            and entry.sha256 is not None
            and entry.sha256 == newest.sha256
            and decided[entry.order_uid] in ("stored", "unchanged")
        ):
            return "unchanged"
        return "older"

    with cursor.copy(_COPY_TRAIL) as copy:
        copy.set_types(_TRAIL_TYPES)
        for entry in sorted(handled, key=lambda h: (h.message.partition, h.message.offset)):
            message = entry.message
            copy.write_row(
                (
                    entry.order_uid,
                    message.topic,
                    message.partition,
                    message.offset,
                    None
                    if message.timestamp_ms is None
                    else datetime.fromtimestamp(message.timestamp_ms / 1000, UTC),
                    outcome(entry),
                    entry.sha256,
                    message.replayed_from,
                    trace_id_of(message.trace),
                )
            )
    if deletions:
        cursor.execute(
            _DELETE_EARLIER_TRAIL,
            {
                "uids": [d.order_uid for d in deletions],
                "partitions": [d.message.partition for d in deletions],
                "offsets": [d.message.offset for d in deletions],
            },
        )


def _copy_parts(cursor: psycopg.Cursor[tuple[object, ...]], batch: Sequence[PreparedOrder]) -> None:
    for statement, table in _COPY_PARTS:
        with cursor.copy(statement) as copy:
            for row in table.rows(batch):
                copy.write_row(row)
