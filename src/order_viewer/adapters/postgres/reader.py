"""The reads of the HTTP side and of the cache's warm-up and check."""

from __future__ import annotations

from collections.abc import Generator

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from order_viewer.adapters.postgres.connection import database_errors
from order_viewer.adapters.postgres.trail import TRAIL_PAGE, trail_page
from order_viewer.adapters.tracing import Tracing, failed
from order_viewer.service.ports import (
    CachedOrder,
    DatabaseBusy,
    DatabaseUnavailable,
    OrderState,
    OrderSummary,
    OrderTrail,
    StoredDocument,
)


class PostgresOrderReader:
    """Reads order documents for the HTTP side over a small pool of connections."""

    def __init__(self, database_url: str, pool_size: int, tracing: Tracing | None = None) -> None:
        self._database_url = database_url
        self._tracing = tracing
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

    async def states(self, order_uids: list[str]) -> dict[str, OrderState]:
        """What is stored of these orders now, for their streams (`ports.OrderStates`): the
        version and its offset, else the offset of the tombstone that deleted it."""
        rows = await self._fetch(
            "SELECT u.order_uid, convert_to(o.document, 'UTF8'), o.content_sha256, "
            "coalesce(o.kafka_offset, t.kafka_offset) "
            "FROM unnest(%s::text[]) AS u(order_uid) "
            "LEFT JOIN orders o USING (order_uid) "
            "LEFT JOIN order_tombstones t USING (order_uid) "
            "WHERE o.order_uid IS NOT NULL OR t.order_uid IS NOT NULL",
            (order_uids,),
            binary=True,
        )
        states: dict[str, OrderState] = {}
        for order_uid, document, sha256, offset in rows:
            assert isinstance(order_uid, str)
            assert isinstance(offset, int)
            stored = None
            if isinstance(document, bytes) and isinstance(sha256, bytes):
                stored = CachedOrder.of(document, sha256)
            states[order_uid] = OrderState(stored, offset)
        return states

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

    async def trail(self, order_uid: str, limit: int, after: int) -> OrderTrail | None:
        rows = await self._fetch(TRAIL_PAGE, {"uid": order_uid, "limit": limit, "after": after})
        return trail_page(order_uid, limit, rows)

    async def _fetch(
        self,
        query: str,
        params: tuple[object, ...] | dict[str, object],
        *,
        binary: bool = False,
    ) -> list[tuple[object, ...]]:
        # A child of the request that asked first: the lookup gathers the misses of one
        # event-loop step into this read, in that request's context.
        span = None if self._tracing is None else self._tracing.database_read("orders")
        if span is None:
            return await self._rows(query, params, binary)
        try:
            rows = await self._rows(query, params, binary)
            span.set_attribute("db.response.returned_rows", len(rows))
            return rows
        except BaseException as error:
            failed(span, error)
            raise
        finally:
            span.end()

    async def _rows(
        self, query: str, params: tuple[object, ...] | dict[str, object], binary: bool
    ) -> list[tuple[object, ...]]:
        try:
            with database_errors():
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
        database_errors(),
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
        database_errors(),
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
