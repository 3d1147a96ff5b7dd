"""The declaration of the order's tables: each row holds its columns' values, in the declared
order; the migrated tables are held to it in tests/integration/test_store.py."""

from __future__ import annotations

import json
import random
from datetime import datetime
from typing import Annotated, Any, Optional

import msgspec
import pytest

from order_viewer.adapters.postgres.tables import (
    DELIVERY,
    ITEMS,
    ORDERS,
    PARTS,
    PAYMENT,
    Column,
    Table,
    columns_of,
)
from order_viewer.domain.model import PreparedOrder, parse_order
from order_viewer.entrypoints.generate import make_order


def by_column(table: Table, prepared: PreparedOrder) -> list[dict[str, Any]]:
    names = [column.name for column in table.columns]
    rows = list(table.rows([prepared]))
    assert all(len(row) == len(names) for row in rows)
    return [dict(zip(names, row, strict=True)) for row in rows]


@pytest.mark.parametrize("seed", range(20))
def test_each_row_holds_the_values_of_its_columns(seed: int) -> None:
    prepared = PreparedOrder.of(
        parse_order(json.dumps(make_order(random.Random(seed))).encode()), 3, 41
    )
    order = prepared.order
    uid = order.order_uid
    assert by_column(ORDERS, prepared) == [
        {
            **{
                name: value
                for name, value in msgspec.structs.asdict(order).items()
                if name not in {"delivery", "payment", "items"}
            },
            "content_sha256": prepared.sha256,
            "kafka_partition": 3,
            "kafka_offset": 41,
            "document": prepared.document.decode(),
        }
    ]
    assert by_column(DELIVERY, prepared) == [
        {"order_uid": uid, **msgspec.structs.asdict(order.delivery)}
    ]
    assert by_column(PAYMENT, prepared) == [
        {"order_uid": uid, **msgspec.structs.asdict(order.payment)}
    ]
    assert by_column(ITEMS, prepared) == [
        {"order_uid": uid, "position": position, **msgspec.structs.asdict(item)}
        for position, item in enumerate(order.items)
    ]
    assert PARTS == (DELIVERY, PAYMENT, ITEMS)


def test_a_field_that_may_be_null_is_a_column_that_may_be() -> None:
    class Part(msgspec.Struct):
        name: str
        note: Annotated[str, msgspec.Meta(max_length=3)] | None = None
        count: int | None = None
        when: Optional[datetime] = None  # noqa: UP045 (the older spelling is one too)

    assert columns_of(Part) == (
        Column("name", "text"),
        Column("note", "text", nullable=True),
        Column("count", "bigint", nullable=True),
        Column("when", "timestamp with time zone", nullable=True),
    )
    assert columns_of(Part, but=frozenset({"note", "when"})) == (
        Column("name", "text"),
        Column("count", "bigint", nullable=True),
    )


@pytest.mark.parametrize("annotation", [float, bool, bytes, list[str], str | int, str | int | None])
def test_a_field_of_a_type_no_column_holds_is_refused(annotation: object) -> None:
    part = msgspec.defstruct("Part", [("odd", annotation)], module=__name__)
    with pytest.raises(TypeError, match=r"^Part\.odd: no column type for "):
        columns_of(part)
