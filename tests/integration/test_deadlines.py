"""The writer's deadlines and the connection watchdog in-process, against the real server: a
write blocked by another session's row lock is cut and names that session, and a call the
server leaves unanswered is cut by the client."""

from __future__ import annotations

import json
import random
import time

import psycopg
import pytest

from order_viewer.adapters.postgres.connection import WATCHDOG
from order_viewer.adapters.postgres.writer import PostgresOrderWriter
from order_viewer.domain.model import PreparedOrder, parse_order
from order_viewer.entrypoints.generate import make_order
from order_viewer.service.ports import WriteTimedOut
from tests.audit import stored_documents
from tests.conftest import Stack

pytestmark = pytest.mark.integration


def test_a_write_blocked_by_another_sessions_row_lock_is_cut_naming_that_session(
    stack: Stack,
) -> None:
    order = make_order(random.Random(31))
    newer = {**order, "delivery": {**order["delivery"], "name": "Newer Name"}}

    def prepared(document: dict[str, object], offset: int) -> PreparedOrder:
        return PreparedOrder.of(parse_order(json.dumps(document).encode()), 0, offset)

    writer = PostgresOrderWriter(stack.database_url, "tests", timeout_seconds=1)
    try:
        writer.write([prepared(order, 0)])
        with psycopg.connect(stack.database_url) as holder:
            holder.execute(
                "SELECT 1 FROM orders WHERE order_uid = %s FOR UPDATE", (order["order_uid"],)
            )
            started = time.monotonic()
            with pytest.raises(WriteTimedOut) as timed_out:
                writer.write([prepared(newer, 1)])
            waited = time.monotonic() - started
            assert timed_out.value.cause == "lock"
            assert timed_out.value.blocker is not None
            assert timed_out.value.blocker.startswith(
                f"pid {holder.info.backend_pid} (idle in transaction, its transaction open for "
            )
            assert 1 <= waited < 5
            holder.rollback()
        # The same writer, its connection kept, writes once the lock is gone.
        writer.write([prepared(newer, 1)])
    finally:
        writer.close()
    assert stored_documents(stack, [order["order_uid"]]) == {order["order_uid"]: newer}


def test_a_call_the_server_leaves_unanswered_is_cut_at_its_deadline(stack: Stack) -> None:
    with psycopg.connect(stack.database_url, autocommit=True) as connection:
        with WATCHDOG.watch(connection, 5):
            assert connection.execute("SELECT 1").fetchone() == (1,)
        # Answered in time: the connection is left as it was.
        assert not connection.closed
        started = time.monotonic()
        with (
            pytest.raises(
                psycopg.OperationalError, match=r"no answer from PostgreSQL within 0\.5 s"
            ),
            WATCHDOG.watch(connection, 0.5),
        ):
            connection.execute("SELECT pg_sleep(30)")
        assert 0.5 <= time.monotonic() - started < 3
        assert connection.closed
