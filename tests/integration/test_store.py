"""The PostgreSQL adapters in-process, against the real server: what the contract suite does not
cover (refusals, the normalized rows, the reader, an unreachable server)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import psycopg
import pytest

from order_viewer.adapters.cache import OrderCache
from order_viewer.adapters.metrics import Metrics
from order_viewer.adapters.postgres.reader import PostgresOrderReader, newest_documents
from order_viewer.adapters.postgres.tables import ORDERS, PARTS, Column
from order_viewer.adapters.postgres.writer import PARTITION_LOCK_CLASS, PostgresOrderWriter
from order_viewer.domain import schema
from order_viewer.domain.model import PreparedOrder, parse_order
from order_viewer.entrypoints.generate import make_order
from order_viewer.service.ingest import BatchOutcome, OrderIngest, prepare_batch
from order_viewer.service.ports import (
    ConsumedMessage,
    DatabaseBusy,
    DatabaseUnavailable,
    RejectedByDatabase,
)
from order_viewer.service.retry import Health, Patience
from tests.audit import row_counts, stored_documents
from tests.conftest import Stack, free_port, wait_until
from tests.fakes import FakeDeadLetters

pytestmark = pytest.mark.integration

_rng = random.Random(2024)


def prepared(offset: int = 0) -> tuple[dict[str, Any], PreparedOrder]:
    order = make_order(_rng)
    return order, PreparedOrder.of(parse_order(json.dumps(order).encode()), 0, offset)


def unreachable_url() -> str:
    return f"postgresql://order_viewer:order_viewer@127.0.0.1:{free_port()}/order_viewer"


def test_a_batch_lands_in_all_four_tables_as_its_document_says(stack: Stack) -> None:
    writer = PostgresOrderWriter(stack.database_url, "tests")
    orders = [prepared(n) for n in range(3)]
    try:
        writer.write([p for _, p in orders])
    finally:
        writer.close()
    uids = [str(order["order_uid"]) for order, _ in orders]
    # stored_documents also checks each document against its rebuild from the normalized rows.
    assert stored_documents(stack, uids) == {str(o["order_uid"]): o for o, _ in orders}
    items = sum(len(order["items"]) for order, _ in orders)
    assert row_counts(stack, uids) == {"orders": 3, "delivery": 3, "payment": 3, "items": items}


def test_an_order_stored_before_msgspec_is_unchanged_when_delivered_again(stack: Stack) -> None:
    order, _ = prepared()
    message = json.dumps(order).encode()
    # As it was stored when pydantic made the document: its canonical JSON and that digest.
    document = schema.Order.__pydantic_serializer__.to_json(
        schema.Order.model_validate_json(message)
    )
    stored = PreparedOrder(parse_order(message), 0, 1, document, hashlib.sha256(document).digest())
    writer = PostgresOrderWriter(stack.database_url, "tests")
    try:
        assert writer.write([stored]).inserted == (order["order_uid"],)
        # The same message again, later in the partition: replaced if its digest differed.
        again = writer.write([PreparedOrder.of(parse_order(message), 0, 2)])
    finally:
        writer.close()
    assert (again.inserted, again.replaced) == ((), ())


def test_the_migrated_tables_have_the_declared_columns_and_no_others(stack: Stack) -> None:
    # A column the declaration lacks is never written (a NOT NULL one refuses every order), and
    # one the migrations lack refuses every batch. Rows are COPYed by column name, so only the
    # names, types and nullability must agree, not the tables' physical order.
    with stack.connect() as connection:
        for table in (ORDERS, *PARTS):
            migrated = connection.execute(
                "SELECT attname, format_type(atttypid, atttypmod), NOT attnotnull, atthasdef "
                "FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
                "AND NOT attisdropped",
                (table.name,),
            ).fetchall()
            columns = {Column(name, type_, nullable) for name, type_, nullable, _ in migrated}
            assert columns == {*table.columns, *table.filled_by_database}, table.name
            defaults = {name for name, _, _, has_default in migrated if has_default}
            assert defaults >= {column.name for column in table.filled_by_database}, table.name


def test_a_refused_order_leaves_nothing_of_its_batch(stack: Stack) -> None:
    good_order, good = prepared()
    _, bad = prepared()
    # What the validator would never pass but the database's own checks refuse.
    negative = msgspec.structs.replace(bad.order.payment, amount=-1)
    broken = PreparedOrder(
        msgspec.structs.replace(bad.order, payment=negative), 0, 1, bad.document, bad.sha256
    )
    writer = PostgresOrderWriter(stack.database_url, "tests")
    try:
        with pytest.raises(RejectedByDatabase, match="amount"):
            writer.write([good, broken])
        # The connection stays usable for the next batch.
        writer.write([good])
    finally:
        writer.close()
    assert row_counts(stack, [str(good_order["order_uid"]), broken.order.order_uid]) == {
        "orders": 1,
        "delivery": 1,
        "payment": 1,
        "items": len(good_order["items"]),
    }


def test_an_unreachable_database_is_unavailable_not_refusing() -> None:
    _, order = prepared()
    writer = PostgresOrderWriter(unreachable_url(), "tests")
    with pytest.raises(DatabaseUnavailable):
        writer.write([order])
    with pytest.raises(DatabaseUnavailable):
        list(newest_documents(unreachable_url(), 10))


@contextmanager
def stored_for_the_block(stack: Stack, orders: list[PreparedOrder]) -> Iterator[None]:
    """The orders stored for the time of the block, then deleted: the other tests here read the
    newest orders of this database, and these would be them."""
    writer = PostgresOrderWriter(stack.database_url, "tests")
    try:
        writer.write(orders)
    finally:
        writer.close()
    try:
        yield
    finally:
        with psycopg.connect(stack.database_url) as connection:
            connection.execute(
                "DELETE FROM orders WHERE order_uid = ANY(%s)",
                ([prepared_order.order.order_uid for prepared_order in orders],),
            )


def test_a_warm_up_read_closed_early_stops_reading_and_lets_its_connection_go(
    stack: Stack,
) -> None:
    """The cache fills before the read ends: the read must stop and close its connection, not
    keep the server sending or the snapshot open. Enough orders that the server is still
    sending when the read is closed (megabytes, past what the socket buffers hold)."""
    with stored_for_the_block(stack, [prepared(offset)[1] for offset in range(3000)]):
        chunks = newest_documents(stack.database_url, 3000, chunk=5)
        first = next(chunks)
        assert len(first) == 5
        chunks.close()

        def connection_gone() -> bool:
            with psycopg.connect(stack.database_url) as connection:
                left = connection.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = 'order-viewer-warm-up'"
                ).fetchone()
            return left == (0,)

        wait_until(connection_gone, 10, "the warm-up connection to close")
        # And read to its end, every order once.
        uids = [d.order_uid for chunk in newest_documents(stack.database_url, 3000) for d in chunk]
        assert len(uids) == len(set(uids)) == 3000


def test_a_warm_up_read_closed_early_ends_quietly_when_its_cancel_fails(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancel is only a saving: if the server cannot take it (gone meanwhile), closing the
    read still ends it without an error."""
    timeouts: list[float | None] = []

    def refused(_: psycopg.Connection[Any], timeout: float | None = None) -> None:
        timeouts.append(timeout)
        raise psycopg.OperationalError("connection to server failed: Connection refused")

    monkeypatch.setattr(psycopg.Connection, "cancel_safe", refused)
    with stored_for_the_block(stack, [prepared(offset)[1] for offset in range(20)]):
        chunks = newest_documents(stack.database_url, 20, chunk=5)
        assert len(next(chunks)) == 5
        chunks.close()
        assert len(timeouts) == 1  # a cancel was tried, and its failure ended nothing badly


def test_the_reader_finds_documents_and_recent_summaries(stack: Stack) -> None:
    order, stored = prepared()
    writer = PostgresOrderWriter(stack.database_url, "tests")
    try:
        writer.write([stored])
    finally:
        writer.close()

    async def read() -> None:
        reader = PostgresOrderReader(stack.database_url, 2)
        await reader.open()
        try:
            assert await reader.ping()
            found = await reader.documents([stored.order.order_uid, "absent"])
            assert [(d.order_uid, d.document, d.sha256) for d in found] == [
                (stored.order.order_uid, stored.document, stored.sha256)
            ]
            recent = await reader.recent(100)
            summary = next(s for s in recent if s.order_uid == stored.order.order_uid)
            assert summary.item_count == len(order["items"])
            assert summary.amount == stored.order.payment.amount
        finally:
            await reader.close()

    asyncio.run(read())


def test_the_reader_says_unavailable_when_the_database_is_away() -> None:
    async def read() -> None:
        reader = PostgresOrderReader(unreachable_url(), 1)
        await reader.open()
        try:
            assert not await reader.ping()
            with pytest.raises(DatabaseUnavailable) as away:
                await reader.documents(["a"])
            # Not merely busy: a suspended cache may then serve what it kept.
            assert not isinstance(away.value, DatabaseBusy)
        finally:
            await reader.close()

    asyncio.run(read())


def test_writers_of_one_partition_take_turns_and_others_do_not_wait(stack: Stack) -> None:
    """Another instance still writing partition 0 (its transaction holds the partition's lock)
    holds up a batch of partition 0 until it commits, so the batch then sees what it committed;
    a batch of partition 1 goes on at once."""
    _, on_zero = prepared(offset=1)
    on_one = PreparedOrder.of(msgspec.structs.replace(on_zero.order, order_uid="lock-one"), 1, 1)
    zero_writer = PostgresOrderWriter(stack.database_url, "zero")
    one_writer = PostgresOrderWriter(stack.database_url, "one")
    written = threading.Event()

    def write_on_zero() -> None:
        zero_writer.write([on_zero])
        written.set()

    try:
        with stack.connect() as other, other.transaction():
            other.execute("SELECT pg_advisory_xact_lock(%s, 0)", (PARTITION_LOCK_CLASS,))
            waiting = threading.Thread(target=write_on_zero)
            waiting.start()
            one_writer.write([on_one])
            assert not written.wait(1.0), "a batch of partition 0 went on during the other write"
            assert row_counts(stack, [on_zero.order.order_uid])["orders"] == 0
        waiting.join(30)
        assert written.is_set()
    finally:
        zero_writer.close()
        one_writer.close()
    assert row_counts(stack, [on_zero.order.order_uid, "lock-one"])["orders"] == 2


def test_two_lanes_writing_the_same_orders_at_once_both_finish_and_leave_them_whole(
    stack: Stack,
) -> None:
    """A producer that keys by something else than order_uid can put one order in two
    partitions, so two lanes may merge it at once. Each lane here writes the same 150 orders,
    in opposite orders, at the same moment: if PostgreSQL breaks a deadlock between them, the
    cancelled batch is retried, and every order ends up whole, as one of the two versions."""
    stop = threading.Event()
    patience = Patience(Health("database", logging.getLogger("test.database")), stop, 0.05)
    cache = OrderCache(1000)
    writers = [PostgresOrderWriter(stack.database_url, "lanes") for _ in range(2)]
    ingest = OrderIngest(writers, cache, FakeDeadLetters([]), patience, Metrics(cache))
    orders = [make_order(_rng) for _ in range(150)]
    versions = [[{**order, "track_number": f"LANE{lane}"} for order in orders] for lane in range(2)]
    batches = [
        prepare_batch(
            [
                ConsumedMessage("orders", lane, offset, None, json.dumps(order).encode())
                for offset, order in enumerate(version if lane == 0 else version[::-1])
            ]
        )
        for lane, version in enumerate(versions)
    ]
    together = threading.Barrier(2)
    outcomes: dict[int, BatchOutcome] = {}

    def store(lane: int) -> None:
        together.wait()
        outcomes[lane] = ingest.store(batches[lane], lane)

    lanes = [threading.Thread(target=store, args=(lane,)) for lane in range(2)]
    try:
        for thread in lanes:
            thread.start()
        for thread in lanes:
            thread.join(60)
    finally:
        for writer in writers:
            writer.close()
    assert sorted(outcomes) == [0, 1], "a lane's batch did not finish"
    uids = [order["order_uid"] for order in orders]
    stored = stored_documents(stack, uids)  # each checked against its normalized rows
    assert set(stored) == set(uids)
    for order in orders:
        uid = order["order_uid"]
        assert stored[uid] in (
            {**order, "track_number": "LANE0"},
            {**order, "track_number": "LANE1"},
        )
    counts = row_counts(stack, uids)
    assert (counts["orders"], counts["delivery"], counts["payment"]) == (150, 150, 150)
    assert counts["items"] == sum(len(order["items"]) for order in orders)
