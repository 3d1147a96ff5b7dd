"""One contract, two writers: the fake the unit tests use and the PostgreSQL one. Every case runs
against both, so the merge rule (`model.supersedes`, and its SQL in `store`) cannot drift
between what the unit tests assume and what the database does."""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from order_viewer.adapters.postgres.reader import newest_documents
from order_viewer.adapters.postgres.writer import PostgresOrderWriter
from order_viewer.domain.model import PreparedOrder, parse_order
from order_viewer.entrypoints.generate import make_order
from order_viewer.service.ports import Deletion, OrderWriter, WriteResult
from tests.conftest import Stack
from tests.fakes import FakeWriter

pytestmark = pytest.mark.integration


@dataclass
class Subject:
    writer: OrderWriter
    stored: Callable[[str], bytes | None]
    newest: Callable[[int], list[str]]


def fake_subject() -> Iterator[Subject]:
    writer = FakeWriter()
    yield Subject(
        writer,
        lambda uid: writer.stored[uid].document if uid in writer.stored else None,
        lambda limit: [doc.order_uid for chunk in writer.newest(limit) for doc in chunk],
    )


def postgres_subject(stack: Stack) -> Iterator[Subject]:
    writer = PostgresOrderWriter(stack.database_url, "tests")

    def stored(uid: str) -> bytes | None:
        with stack.connect() as connection:
            row = connection.execute(
                "SELECT document FROM orders WHERE order_uid = %s", (uid,)
            ).fetchone()
        return None if row is None else str(row[0]).encode()

    def newest(limit: int) -> list[str]:
        return [
            doc.order_uid for chunk in newest_documents(stack.database_url, limit) for doc in chunk
        ]

    try:
        yield Subject(writer, stored, newest)
    finally:
        writer.close()


@pytest.fixture(params=["fake", "postgres"])
def subject(request: pytest.FixtureRequest, stack: Stack) -> Iterator[Subject]:
    if request.param == "fake":
        yield from fake_subject()
    else:
        yield from postgres_subject(stack)


_rng = random.Random(848)


def new_order(**changes: Any) -> dict[str, Any]:
    order = make_order(_rng)
    order.update(changes)
    return order


def prepared(order: dict[str, Any], partition: int, offset: int) -> PreparedOrder:
    return PreparedOrder.of(parse_order(json.dumps(order).encode()), partition, offset)


def renamed(order: dict[str, Any], name: str) -> dict[str, Any]:
    changed = copy.deepcopy(order)
    changed["delivery"]["name"] = name
    return changed


def test_new_orders_are_inserted(subject: Subject) -> None:
    a, b = new_order(), new_order()
    result = subject.writer.write([prepared(a, 0, 1), prepared(b, 0, 2)])
    assert result == WriteResult((a["order_uid"], b["order_uid"]), ())
    assert subject.stored(a["order_uid"]) == prepared(a, 0, 1).document


def test_an_identical_redelivery_changes_nothing(subject: Subject) -> None:
    a = new_order()
    subject.writer.write([prepared(a, 0, 1)])
    assert subject.writer.write([prepared(a, 0, 1)]) == WriteResult((), ())
    assert subject.writer.write([prepared(a, 0, 7)]) == WriteResult((), ())


def test_a_later_message_with_other_content_replaces(subject: Subject) -> None:
    a = new_order()
    subject.writer.write([prepared(a, 0, 1)])
    newer = renamed(a, "Later Name")
    assert subject.writer.write([prepared(newer, 0, 2)]) == WriteResult((), (a["order_uid"],))
    assert subject.stored(a["order_uid"]) == prepared(newer, 0, 2).document


def test_an_older_message_redelivered_after_a_newer_one_loses(subject: Subject) -> None:
    a = new_order()
    newer = renamed(a, "Newer Name")
    subject.writer.write([prepared(newer, 0, 5)])
    assert subject.writer.write([prepared(a, 0, 4)]) == WriteResult((), ())
    assert subject.stored(a["order_uid"]) == prepared(newer, 0, 5).document


def test_a_message_from_another_partition_with_other_content_replaces(subject: Subject) -> None:
    a = new_order()
    subject.writer.write([prepared(a, 0, 5)])
    moved = renamed(a, "Moved Name")
    assert subject.writer.write([prepared(moved, 1, 0)]) == WriteResult((), (a["order_uid"],))


def test_a_batch_mixes_new_replaced_and_unchanged(subject: Subject) -> None:
    a, b, c = new_order(), new_order(), new_order()
    subject.writer.write([prepared(a, 0, 1), prepared(b, 0, 2)])
    result = subject.writer.write(
        [prepared(a, 0, 1), prepared(renamed(b, "Other"), 0, 3), prepared(c, 0, 4)]
    )
    assert result == WriteResult((c["order_uid"],), (b["order_uid"],))


def test_newest_documents_come_newest_first_up_to_the_limit(subject: Subject) -> None:
    marker = f"contract-{_rng.randrange(10**9)}"
    dated = [
        new_order(date_created=f"2099-01-0{day}T00:00:00Z", order_uid=f"{marker}-{day}")
        for day in (3, 1, 4, 2)
    ]
    subject.writer.write([prepared(order, 0, n) for n, order in enumerate(dated)])
    assert subject.newest(3) == [f"{marker}-4", f"{marker}-3", f"{marker}-2"]


def tombstone(order: dict[str, Any], partition: int, offset: int) -> Deletion:
    return Deletion(order["order_uid"], partition, offset)


def test_a_tombstone_deletes_and_a_second_one_changes_nothing(subject: Subject) -> None:
    a, b = new_order(), new_order()
    subject.writer.write([prepared(a, 0, 1), prepared(b, 0, 2)])
    result = subject.writer.write([], [tombstone(a, 0, 3)])
    assert result == WriteResult((), (), (a["order_uid"],))
    assert subject.stored(a["order_uid"]) is None
    assert subject.stored(b["order_uid"]) == prepared(b, 0, 2).document
    assert subject.writer.write([], [tombstone(a, 0, 3)]) == WriteResult((), (), ())
    assert subject.writer.write([], [tombstone(new_order(), 0, 9)]) == WriteResult((), (), ())


def test_an_older_message_after_a_tombstone_does_not_bring_the_order_back(
    subject: Subject,
) -> None:
    a = new_order()
    subject.writer.write([prepared(a, 0, 1)])
    subject.writer.write([], [tombstone(a, 0, 5)])
    assert subject.writer.write([prepared(a, 0, 1)]) == WriteResult((), ())
    assert subject.writer.write([prepared(renamed(a, "Older"), 0, 4)]) == WriteResult((), ())
    assert subject.stored(a["order_uid"]) is None
    # A tombstone delivered again after a later tombstone does not move it back either.
    subject.writer.write([], [tombstone(a, 0, 2)])
    assert subject.writer.write([prepared(a, 0, 3)]) == WriteResult((), ())
    later_version = renamed(a, "Later")
    assert subject.writer.write([prepared(later_version, 0, 6)]) == WriteResult(
        (a["order_uid"],), ()
    )
    assert subject.stored(a["order_uid"]) == prepared(later_version, 0, 6).document


def test_an_older_tombstone_does_not_delete_a_later_version(subject: Subject) -> None:
    a = new_order()
    subject.writer.write([prepared(a, 0, 7)])
    assert subject.writer.write([], [tombstone(a, 0, 6)]) == WriteResult((), (), ())
    assert subject.stored(a["order_uid"]) == prepared(a, 0, 7).document


def test_a_tombstone_before_the_first_version_keeps_that_version_out(subject: Subject) -> None:
    a = new_order()
    subject.writer.write([], [tombstone(a, 1, 8)])
    assert subject.writer.write([prepared(a, 1, 7)]) == WriteResult((), ())
    assert subject.writer.write([prepared(a, 2, 0)]) == WriteResult((a["order_uid"],), ())


def test_versions_and_tombstones_of_other_orders_share_a_batch(subject: Subject) -> None:
    a, b, c = new_order(), new_order(), new_order()
    subject.writer.write([prepared(a, 0, 1), prepared(b, 0, 2)])
    result = subject.writer.write(
        [prepared(renamed(b, "B2"), 0, 4), prepared(c, 0, 5)], [tombstone(a, 0, 3)]
    )
    assert result == WriteResult((c["order_uid"],), (b["order_uid"],), (a["order_uid"],))
