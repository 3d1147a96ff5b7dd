"""The order's tables as the writer fills them: the one declaration of their columns, from which
the writer's SQL (column lists, the merge's SET list) and its COPY rows are derived.

Each table holds the scalar fields of one part of the model, under the fields' names and in the
model's order: `orders` the order's own, after which come where its version came from;
`delivery` and `payment` theirs, after the order_uid that ties them to their order; `items`
each item's, after the order_uid and the item's position in the message. So a new scalar field
of the model is a new column here with no change to this module: the migration that adds the
column (and the view `order_documents`, which rebuilds the document from the columns) is the
other half, and tests/integration/test_store.py holds the migrated tables to this declaration.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Union, get_args, get_origin, get_type_hints

import msgspec
from psycopg import sql

from order_viewer.domain.model import Delivery, Instant, Item, Order, Payment, PreparedOrder

Row = tuple[object, ...]


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str
    """As PostgreSQL's format_type() names it."""
    nullable: bool = False


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    """In the order of the rows' values."""
    rows: Callable[[Sequence[PreparedOrder]], Iterator[Row]]
    """The table's rows of these orders, for COPY."""
    filled_by_database: tuple[Column, ...] = ()
    """Columns the writer leaves to their defaults or sets in SQL."""

    @property
    def column_list(self) -> sql.Composed:
        return sql.SQL(", ").join(sql.Identifier(column.name) for column in self.columns)


# The PostgreSQL type of each Python type a model field may have.
_POSTGRES_TYPES: Final[dict[object, str]] = {
    str: "text",
    int: "bigint",
    datetime: "timestamp with time zone",
    Instant: "timestamp with time zone",
}
# The parts of an order that are tables of their own rather than columns of `orders`.
_PARTS: Final = frozenset({"delivery", "payment", "items"})


def _field_column(model: type[msgspec.Struct], name: str, annotation: object) -> Column:
    nullable = False
    if get_origin(annotation) in (Union, types.UnionType):
        others = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(others) == 1:
            (annotation,), nullable = others, True
    if annotation not in _POSTGRES_TYPES:
        raise TypeError(f"{model.__name__}.{name}: no column type for {annotation!r}")
    return Column(name, _POSTGRES_TYPES[annotation], nullable)


def columns_of(
    model: type[msgspec.Struct], but: frozenset[str] = frozenset()
) -> tuple[Column, ...]:
    """A column for each field of the model, but those named: a field that may be null is a
    column that may be; a field of a type no column holds is refused, as TypeError."""
    # Without their constraints (Annotated), which are the validation's, not the column's.
    annotations = get_type_hints(model)
    return tuple(
        _field_column(model, name, annotations[name])
        for name in model.__struct_fields__
        if name not in but
    )


def _row_function(columns: tuple[Column, ...], fields: tuple[Column, ...]) -> Callable[..., Row]:
    """A function of one part of the model, given by keyword the values of the columns that are
    not its fields, that returns the part's row: a tuple display written from the declaration
    and compiled once, as dataclasses write their __init__, so that a row costs what a tuple
    written out by hand does (attrgetter's tuple unpacked into the row cost more per item)."""
    field_names = {column.name for column in fields}
    given = ", ".join(column.name for column in columns if column.name not in field_names)
    values = ", ".join(
        f"part.{column.name}" if column.name in field_names else column.name for column in columns
    )
    namespace: dict[str, Callable[..., Row]] = {}
    # The names are the declaration's: the model's field names and the columns above.
    exec(f"def row(part, *, {given}): return ({values},)", namespace)  # noqa: S102
    return namespace["row"]


_ORDER_UID = Column("order_uid", "text")
# Where the stored version came from (model.supersedes decides by them) and the document the API
# serves, after the order's own fields.
_VERSION = (
    Column("content_sha256", "bytea"),
    Column("kafka_partition", "integer"),
    Column("kafka_offset", "bigint"),
    Column("document", "text"),
)
_ORDER_FIELDS = columns_of(Order, but=_PARTS)
_DELIVERY_FIELDS = columns_of(Delivery)
_PAYMENT_FIELDS = columns_of(Payment)
_ITEM_FIELDS = columns_of(Item)
_ORDER_COLUMNS = (*_ORDER_FIELDS, *_VERSION)
_DELIVERY_COLUMNS = (_ORDER_UID, *_DELIVERY_FIELDS)
_PAYMENT_COLUMNS = (_ORDER_UID, *_PAYMENT_FIELDS)
_ITEM_COLUMNS = (_ORDER_UID, Column("position", "integer"), *_ITEM_FIELDS)

_order_row = _row_function(_ORDER_COLUMNS, _ORDER_FIELDS)
_delivery_row = _row_function(_DELIVERY_COLUMNS, _DELIVERY_FIELDS)
_payment_row = _row_function(_PAYMENT_COLUMNS, _PAYMENT_FIELDS)
_item_row = _row_function(_ITEM_COLUMNS, _ITEM_FIELDS)


def _order_rows(batch: Sequence[PreparedOrder]) -> Iterator[Row]:
    for prepared in batch:
        yield _order_row(
            prepared.order,
            content_sha256=prepared.sha256,
            kafka_partition=prepared.partition,
            kafka_offset=prepared.offset,
            document=prepared.document.decode(),
        )


def _delivery_rows(batch: Sequence[PreparedOrder]) -> Iterator[Row]:
    for prepared in batch:
        yield _delivery_row(prepared.order.delivery, order_uid=prepared.order.order_uid)


def _payment_rows(batch: Sequence[PreparedOrder]) -> Iterator[Row]:
    for prepared in batch:
        yield _payment_row(prepared.order.payment, order_uid=prepared.order.order_uid)


def _item_rows(batch: Sequence[PreparedOrder]) -> Iterator[Row]:
    for prepared in batch:
        uid = prepared.order.order_uid
        for position, item in enumerate(prepared.order.items):
            yield _item_row(item, order_uid=uid, position=position)


ORDERS: Final = Table(
    "orders",
    _ORDER_COLUMNS,
    _order_rows,
    filled_by_database=(Column("stored_at", "timestamp with time zone"),),
)
DELIVERY: Final = Table("delivery", _DELIVERY_COLUMNS, _delivery_rows)
PAYMENT: Final = Table("payment", _PAYMENT_COLUMNS, _payment_rows)
ITEMS: Final = Table("items", _ITEM_COLUMNS, _item_rows)
PARTS: Final = (DELIVERY, PAYMENT, ITEMS)
"""The tables of an order's parts, which reference `orders` and go with it."""
