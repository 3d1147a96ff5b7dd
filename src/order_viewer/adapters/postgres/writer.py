"""PostgreSQL adapters: the batch writer the consumer uses, the reader the HTTP side uses, and
what keeps instances in step: the change listener, the cache check and the retention expirer."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import TypedDict

import psycopg
from alembic import command
from alembic.config import Config as AlembicConfig
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from order_viewer.adapters.postgres.tables import ORDERS, PARTS
from order_viewer.domain.model import PreparedOrder
from order_viewer.service.ports import (
    Changes,
    DatabaseBusy,
    DatabaseUnavailable,
    Deletion,
    Expired,
    OrderSummary,
    RejectedByDatabase,
    Stopped,
    StoredDocument,
    WriteResult,
    WriteTimedOut,
)
from order_viewer.service.retry import Patience, retry

# SQLSTATE classes that mean "try again": connection exceptions, resource shortage, operator
# intervention (shutdown, crash recovery), and the transaction rollbacks (serialization, deadlock).
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "40")


def is_transient(error: psycopg.Error) -> bool:
    if isinstance(error, psycopg.OperationalError | psycopg.InterfaceError):
        return True
    return error.sqlstate is not None and error.sqlstate.startswith(_TRANSIENT_SQLSTATE_CLASSES)


# Resource shortage and a statement timeout: the server is up, only too busy to answer.
_BUSY_SQLSTATE_CLASS = "53"
_QUERY_CANCELED = "57014"


def unavailable(error: psycopg.Error) -> DatabaseUnavailable:
    """What a transient error says to the service: busy if the server is up and answering
    others, unavailable otherwise."""
    sqlstate = error.sqlstate or ""
    busy = (
        isinstance(error, PoolTimeout)
        or sqlstate.startswith(_BUSY_SQLSTATE_CLASS)
        or sqlstate == _QUERY_CANCELED
    )
    return (DatabaseBusy if busy else DatabaseUnavailable)(str(error).strip())


@contextlib.contextmanager
def _database_errors(
    *,
    reset: Callable[[], object] = lambda: None,
    refused: Callable[[psycopg.Error], Exception] | None = None,
) -> Iterator[None]:
    """psycopg's errors as the ports say them: a transient one is DatabaseUnavailable (or
    DatabaseBusy), after `reset` so that the next attempt connects anew; any other is
    `refused(error)` if given, else raised as it is."""
    try:
        yield
    except psycopg.Error as error:
        if is_transient(error):
            reset()
            raise unavailable(error) from error
        if refused is None:
            raise
        raise refused(error) from error


def migrate(database_url: str) -> None:
    """Bring the schema to the newest version (a no-op when it is there already)."""
    config = AlembicConfig()
    config.set_main_option(
        "script_location", str(resources.files("order_viewer.adapters.postgres") / "migrations")
    )
    config.set_main_option(
        "sqlalchemy.url", database_url.replace("postgresql://", "postgresql+psycopg://", 1)
    )
    command.upgrade(config, "head")


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

# A tombstone is kept at the latest position seen, as a stored order is.
_RECORD_TOMBSTONES = f"""
INSERT INTO order_tombstones (order_uid, kafka_partition, kafka_offset)
SELECT order_uid, kafka_partition, kafka_offset FROM {_TOMBSTONES}
ON CONFLICT (order_uid) DO UPDATE SET
    kafka_partition = excluded.kafka_partition, kafka_offset = excluded.kafka_offset,
    deleted_at = now()
WHERE order_tombstones.kafka_partition <> excluded.kafka_partition
   OR order_tombstones.kafka_offset < excluded.kafka_offset
"""  # noqa: S608 (only the constant above is interpolated)

# Delivery, payment and items go with their order (ON DELETE CASCADE).
_DELETE_ORDERS = f"""
DELETE FROM orders o USING {_TOMBSTONES}
WHERE o.order_uid = d.order_uid
  AND (o.kafka_partition <> d.kafka_partition OR o.kafka_offset < d.kafka_offset)
RETURNING o.order_uid
"""  # noqa: S608 (only the constant above is interpolated)

# The channel on which every instance hears which orders the others replaced or deleted.
CHANGES_CHANNEL = "order_viewer_changes"
# PostgreSQL refuses a notification payload of 8,000 bytes or more.
_LARGEST_PAYLOAD = 7900


def change_payloads(instance: str, order_uids: Sequence[str]) -> Iterator[str]:
    """The notifications that name these orders: the sending instance (which has updated its
    own cache already), then the ids, space-separated, each payload under PostgreSQL's limit."""
    payload = instance
    for uid in order_uids:
        if len(payload) + 1 + len(uid) > _LARGEST_PAYLOAD:
            yield payload
            payload = instance
        payload += " " + uid
    if payload != instance:
        yield payload


def _notify_changes(
    cursor: psycopg.Cursor[tuple[object, ...]], instance: str, order_uids: Sequence[str]
) -> None:
    # Sent within the transaction: PostgreSQL delivers it when, and only if, it commits. One
    # statement for all the payloads: one round trip inside the transaction, not one each.
    payloads = list(change_payloads(instance, order_uids))
    if payloads:
        cursor.execute(
            "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p", (CHANGES_CHANNEL, payloads)
        )


class _Keepalives(TypedDict):
    keepalives: int
    keepalives_idle: int
    keepalives_interval: int
    keepalives_count: int


# A peer that vanished without closing the connection (a network cut, its machine gone) is
# noticed in seconds, not after the system's two-hour keepalive default.
_KEEPALIVES = _Keepalives(
    keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=2
)


class _Unanswered(psycopg.OperationalError):
    """The server did not answer a call within its deadline, so its connection was cut."""


@dataclass(eq=False, slots=True)
class _Watched:
    deadline: float
    # A duplicate of the connection's socket: shutting it down acts on the socket both share,
    # even if psycopg has closed its own descriptor (whose number may be reused) meanwhile.
    socket: socket.socket
    cut: bool = False


class _Watchdog:
    """Cuts the connection of a call that outlives its deadline.

    A server that accepts connections but answers nothing (its processes stopped, its machine
    frozen) cannot enforce its own timeouts, and its kernel still acknowledges TCP, so neither
    libpq's keepalives nor tcp_user_timeout notice it: a query to a SIGSTOPped PostgreSQL waited
    for as long as it was stopped. Shutting the socket down from another thread wakes the waiting
    call with the connection lost (psycopg waits in short polls), as `_Unanswered`, and the
    connection is closed. One thread serves every watched call of the process, asleep until the
    earliest deadline; watching costs a call a descriptor duplicated and a lock taken twice."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._watched: set[_Watched] = set()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(
        self, connection: psycopg.Connection[tuple[object, ...]], seconds: float
    ) -> Iterator[None]:
        watched = _Watched(
            time.monotonic() + seconds, socket.socket(fileno=os.dup(connection.pgconn.socket))
        )
        with self._condition:
            self._watched.add(watched)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._cut_overdue, name="connection-watchdog", daemon=True
                )
                self._thread.start()
            self._condition.notify()
        try:
            yield
        except psycopg.Error as error:
            if watched.cut:
                raise _Unanswered(f"no answer from PostgreSQL within {seconds:g} s") from error
            raise
        finally:
            with self._condition:
                self._watched.discard(watched)
            watched.socket.close()
            if watched.cut:
                # Cut as the call ended, it may have ended well: the connection is unusable all
                # the same.
                connection.close()

    def _cut_overdue(self) -> None:
        with self._condition:
            while True:
                now = time.monotonic()
                for watched in [w for w in self._watched if w.deadline <= now]:
                    self._watched.discard(watched)
                    watched.cut = True
                    with contextlib.suppress(OSError):
                        watched.socket.shutdown(socket.SHUT_RDWR)
                earliest = min((w.deadline for w in self._watched), default=None)
                self._condition.wait(None if earliest is None else earliest - now)


_WATCHDOG = _Watchdog()


class _DedicatedConnection:
    """One connection kept for one writing part, made again (and `prepare`d) when it was closed
    or broke."""

    def __init__(
        self,
        database_url: str,
        name: str,
        prepare: Callable[[psycopg.Connection[tuple[object, ...]]], object] = lambda _: None,
    ) -> None:
        self._database_url = database_url
        self._name = name
        self._prepare = prepare
        self._connection: psycopg.Connection[tuple[object, ...]] | None = None

    def get(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._connection is None or self._connection.closed or self._connection.broken:
            connection = psycopg.connect(
                self._database_url,
                autocommit=True,
                connect_timeout=5,
                application_name=self._name,
                **_KEEPALIVES,
            )
            self._prepare(connection)
            self._connection = connection
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


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
_ORDER_TABLES = [ORDERS.name, *(table.name for table in PARTS), "order_tombstones"]
# DATABASE_WRITE_TIMEOUT_SECONDS's default (the settings' test holds them equal). One batch of
# 1,000 orders of 1,000 items each, the most items an order may have (217 MB), took 28.8 s to
# write, so its statements stay well within twice this; batches under the default
# BATCH_MAX_BYTES (4 MiB) take under a second.
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
        self._connection = _DedicatedConnection(database_url, "order-viewer-writer", self._prepare)

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
        self, batch: Sequence[PreparedOrder], deletions: Sequence[Deletion] = ()
    ) -> WriteResult:
        """Store every order of the batch and apply every deletion, or none of them.

        The batch and the deletions must hold each order_uid once (its newest message).
        """
        written: dict[str, bool] = {}
        deleted: list[str] = []
        with _database_errors(
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
                # New orders need no word: no instance can hold a copy of what did not exist.
                _notify_changes(cursor, self._instance, [*replaced, *deleted])
        return WriteResult(
            inserted=tuple(uid for uid, was_replaced in written.items() if not was_replaced),
            replaced=tuple(replaced),
            deleted=tuple(deleted),
        )

    @contextlib.contextmanager
    def _deadlines(self, connection: psycopg.Connection[tuple[object, ...]]) -> Iterator[None]:
        """A write's deadlines, watched, and the errors they end it with as WriteTimedOut."""
        try:
            with _WATCHDOG.watch(connection, self._unanswered_seconds):
                yield
        except _Unanswered as error:
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


# Oldest first, so that an interrupted sweep has removed the most overdue; SKIP LOCKED leaves
# the rows a batch is writing to the next sweep instead of waiting for (or blocking) it.
_EXPIRE_ORDERS = """
DELETE FROM orders WHERE order_uid IN (
    SELECT order_uid FROM orders WHERE date_created < %(before)s
    ORDER BY date_created LIMIT %(limit)s FOR UPDATE SKIP LOCKED
)
RETURNING order_uid
"""
_EXPIRE_TOMBSTONES = """
DELETE FROM order_tombstones WHERE order_uid IN (
    SELECT order_uid FROM order_tombstones WHERE deleted_at < %(before)s
    LIMIT %(limit)s FOR UPDATE SKIP LOCKED
)
"""


class PostgresOrderExpirer:
    """Deletes orders past their retention in bounded transactions, over its own connection."""

    def __init__(self, database_url: str, instance: str) -> None:
        self._instance = instance
        self._connection = _DedicatedConnection(database_url, "order-viewer-retention")

    def expire(self, before: datetime, limit: int) -> Expired:
        with _database_errors(reset=self.close):
            connection = self._connection.get()
            with connection.transaction(), connection.cursor() as cursor:
                cursor.execute(_EXPIRE_ORDERS, {"before": before, "limit": limit})
                expired = tuple(str(uid) for (uid,) in cursor.fetchall())
                cursor.execute(_EXPIRE_TOMBSTONES, {"before": before, "limit": limit})
                tombstones = cursor.rowcount
                # Under a sender name of its own, so that this instance's listener hears the
                # sweep too: a sweep whose COMMIT went through but whose answer was lost is
                # retried finding nothing, and only the notification drops what it deleted.
                _notify_changes(cursor, f"{self._instance}-retention", expired)
        return Expired(expired, tombstones)

    def close(self) -> None:
        self._connection.close()


class PostgresChangeListener:
    """Hears, on a connection of its own, which orders other instances replaced or deleted, and
    tells `changes`: `listening` once LISTEN is in place, `changed` for each notification from
    another instance, `lost` as soon as the connection is (then it connects again, waiting out
    the database's outages). Runs until the stop of its `patience`."""

    # How often the loop looks at the stop while no notification comes.
    STOP_CHECK_SECONDS = 0.5
    # After this long without a notification, a round trip tells a quiet server from a frozen
    # one (whose kernel still answers keepalives); unanswered in time, the connection is cut
    # and counts as lost: a freeze is noticed within about the sum of the two.
    PROBE_AFTER_SECONDS = 3.0
    ANSWER_SECONDS = 3.0

    def __init__(
        self, database_url: str, instance: str, changes: Changes, patience: Patience
    ) -> None:
        self._database_url = database_url
        self._instance = instance
        self._changes = changes
        self._patience = patience

    def run(self) -> None:
        stop = self._patience.stop
        while not stop.is_set():
            try:
                connection = retry(
                    self._listen, transient=(DatabaseUnavailable,), patience=self._patience
                )
            except Stopped:
                return
            try:
                self._changes.listening()
                self._hear(connection, stop)
            except psycopg.Error as error:
                self._changes.lost()
                self._patience.health.failed(f"change listener: {str(error).strip()}")
            finally:
                connection.close()

    def _listen(self) -> psycopg.Connection[tuple[object, ...]]:
        with _database_errors():
            connection = psycopg.connect(
                self._database_url,
                autocommit=True,
                connect_timeout=5,
                application_name="order-viewer-listener",
                **_KEEPALIVES,
            )
            connection.execute(f"LISTEN {CHANGES_CHANNEL}")
        return connection

    def _hear(
        self, connection: psycopg.Connection[tuple[object, ...]], stop: threading.Event
    ) -> None:
        answered = time.monotonic()
        while not stop.is_set():
            for notification in connection.notifies(timeout=self.STOP_CHECK_SECONDS):
                answered = time.monotonic()
                instance, _, ids = notification.payload.partition(" ")
                if instance != self._instance and ids:
                    self._changes.changed(ids.split(" "))
            if time.monotonic() - answered >= self.PROBE_AFTER_SECONDS:
                # Notifications that arrive meanwhile wait for the next notifies().
                with _WATCHDOG.watch(connection, self.ANSWER_SECONDS):
                    connection.execute("SELECT 1")
                answered = time.monotonic()


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


def _copy_parts(cursor: psycopg.Cursor[tuple[object, ...]], batch: Sequence[PreparedOrder]) -> None:
    for statement, table in _COPY_PARTS:
        with cursor.copy(statement) as copy:
            for row in table.rows(batch):
                copy.write_row(row)


class PostgresOrderReader:
    """Reads order documents for the HTTP side over a small pool of connections."""

    def __init__(self, database_url: str, pool_size: int) -> None:
        self._database_url = database_url
        self._pool = AsyncConnectionPool(
            database_url,
            min_size=1,
            max_size=pool_size,
            open=False,
            timeout=2.0,
            kwargs={"autocommit": True, "application_name": "order-viewer-reader"},
        )

    async def open(self) -> None:
        await self._pool.open(wait=False)

    async def close(self) -> None:
        await self._pool.close()

    async def ping(self) -> bool:
        try:
            async with self._pool.connection(timeout=1.0) as connection:
                await connection.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    async def documents(self, order_uids: list[str]) -> list[StoredDocument]:
        """The orders of these ids that exist."""
        rows = await self._fetch(
            "SELECT order_uid, convert_to(document, 'UTF8') AS document, content_sha256 "
            "FROM orders WHERE order_uid = ANY(%s)",
            (order_uids,),
            binary=True,
        )
        return [_stored_document(row) for row in rows]

    async def recent(self, limit: int) -> list[OrderSummary]:
        rows = await self._fetch(
            """
            SELECT o.order_uid, o.date_created, o.customer_id, p.amount, p.currency,
                   (SELECT count(*) FROM items i WHERE i.order_uid = o.order_uid)
            FROM orders o JOIN payment p USING (order_uid)
            ORDER BY o.date_created DESC, o.order_uid
            LIMIT %s
            """,
            (limit,),
        )
        return [OrderSummary(*row) for row in rows]  # type: ignore[arg-type]

    async def _fetch(
        self, query: str, params: tuple[object, ...], *, binary: bool = False
    ) -> list[tuple[object, ...]]:
        try:
            with _database_errors():
                async with self._pool.connection() as connection:
                    cursor = await connection.execute(query, params, binary=binary)
                    return await cursor.fetchall()
        except DatabaseBusy as busy:
            # The pool lends nothing both when every connection is in use and when the server is
            # down (it cannot reconnect): only a connection of its own tells which.
            if isinstance(busy.__cause__, PoolTimeout) and not await self._server_answers():
                raise DatabaseUnavailable(str(busy)) from busy.__cause__
            raise

    async def _server_answers(self) -> bool:
        try:
            connection = await psycopg.AsyncConnection.connect(
                self._database_url, connect_timeout=2, application_name="order-viewer-probe"
            )
        except psycopg.Error:
            return False
        await connection.close()
        return True


# Documents are read as the UTF-8 bytes the API sends (convert_to), in binary format: psycopg
# hands bytea over as it comes, where a text column is decoded to str for the cache to encode
# back. COPY streams them: the server goes on sending while the rows already here are stored,
# where a cursor's FETCH waits for each chunk in turn (warm-up of 100,000 orders: 1.07 s to
# 0.83 s, docs/PERFORMANCE.md).
_NEWEST_DOCUMENTS = """
COPY (
    SELECT order_uid, convert_to(document, 'UTF8'), content_sha256 FROM orders
    ORDER BY date_created DESC, order_uid LIMIT %s
) TO STDOUT (FORMAT BINARY)
"""


def newest_documents(
    database_url: str, limit: int, chunk: int = 1000
) -> Generator[list[StoredDocument], None, None]:
    """The newest `limit` orders, newest first, in chunks, over a connection of their own, so
    that warming the cache runs beside the event loop, not on it. Closing the generator early
    (the cache is full) cancels the rest of the read."""
    with (
        _database_errors(),
        psycopg.connect(
            database_url,
            autocommit=True,
            connect_timeout=5,
            application_name="order-viewer-warm-up",
        ) as connection,
    ):
        # In the index's order, whatever the planner estimates: the first rows come at once and
        # the read can stop early, where a sort reads every order first (and spills to disk
        # past work_mem).
        connection.execute("SET enable_sort = off")
        with connection.cursor() as cursor, cursor.copy(_NEWEST_DOCUMENTS, (limit,)) as copy:
            copy.set_types(["text", "bytea", "bytea"])
            documents: list[StoredDocument] = []
            # Closed early, the generator raises GeneratorExit here, and psycopg's COPY cancels
            # the statement on its way out (a failed cancel is logged, not raised).
            for row in copy.rows():
                documents.append(_stored_document(row))
                if len(documents) == chunk:
                    yield documents
                    documents = []
            if documents:
                yield documents


def stored_versions(
    database_url: str, order_uids: list[str], chunk: int = 10_000
) -> dict[str, bytes]:
    """The content SHA-256 of each of these orders that is stored, read over a connection of
    its own in chunks of `chunk` ids."""
    versions: dict[str, bytes] = {}
    with (
        _database_errors(),
        psycopg.connect(
            database_url, autocommit=True, connect_timeout=5, application_name="order-viewer-verify"
        ) as connection,
    ):
        for start in range(0, len(order_uids), chunk):
            rows = connection.execute(
                "SELECT order_uid, content_sha256 FROM orders WHERE order_uid = ANY(%s)",
                (order_uids[start : start + chunk],),
            ).fetchall()
            versions.update((str(uid), bytes(sha)) for uid, sha in rows)
    return versions


def _stored_document(row: tuple[object, ...]) -> StoredDocument:
    order_uid, document, sha256 = row
    assert isinstance(order_uid, str)
    assert isinstance(document, bytes)
    assert isinstance(sha256, bytes)
    return StoredDocument(order_uid, document, sha256)
