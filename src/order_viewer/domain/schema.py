"""The order message as JSON Schema describes it, in pydantic models: the API's description of
an order, and the validator whose errors `model` turns into the reasons of rejected messages.

`model` decodes the messages with msgspec Structs bound by the same rules; tests/unit/test_model.py
holds the two declarations to each other, field by field and on arbitrary messages.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Final

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetPydanticSchema,
    StringConstraints,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError, core_schema

ORDER_UID_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$"
"""Pydantic and Rust regex syntax; in Python's `re` use `fullmatch`, since `$` there accepts a
trailing newline."""

INT64_MAX: Final = 2**63 - 1
MAX_PAYMENT_DT: Final = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second of year 9999
MAX_ITEMS: Final = 1000

CURRENCY_PATTERN: Final = r"^[A-Z]{3}$"
# Only the RFC 3339 `date-time` production: pydantic's own parser also takes unix-time strings,
# a space separator, missing seconds and "+0300" offsets, which the producer must not send.
# Up to 9 fraction digits because Go's RFC3339Nano writes that many; they are cut to microseconds.
RFC3339_PATTERN: Final = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})$"
)
# PostgreSQL text cannot hold U+0000. A pattern keeps the check inside pydantic-core (no Python
# call per string); errors on strings containing NUL are then reported as nul_character.
_NO_NUL_PATTERN: Final = r"^[^\x00]*$"

_STRICT = ConfigDict(strict=True, extra="ignore", frozen=True)

Text = Annotated[str, StringConstraints(pattern=_NO_NUL_PATTERN)]
NonNegativeInt64 = Annotated[int, Field(ge=0, le=INT64_MAX)]


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise PydanticCustomError(
            "out_of_range", "the instant falls outside years 1 to 9999 once converted to UTC"
        ) from None


def _utc_timestamp_schema(_source: Any, _handler: Any) -> core_schema.CoreSchema:
    to_utc = core_schema.no_info_plain_validator_function(_to_utc)
    from_json = core_schema.chain_schema(
        [
            core_schema.str_schema(pattern=RFC3339_PATTERN, strict=True),
            # Lax only because its input is the string the previous step already checked.
            core_schema.datetime_schema(strict=False),
            to_utc,
        ]
    )
    # Python callers (tests, the database layer) hand over datetime objects, not strings.
    from_python = core_schema.chain_schema(
        [core_schema.datetime_schema(strict=True, tz_constraint="aware"), to_utc]
    )
    return core_schema.json_or_python_schema(json_schema=from_json, python_schema=from_python)


UtcTimestamp = Annotated[
    datetime,
    GetPydanticSchema(_utc_timestamp_schema),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


class Delivery(BaseModel):
    model_config = _STRICT

    name: Text = Field(max_length=256)
    phone: Text = Field(max_length=64)
    zip: Text = Field(max_length=32)
    city: Text = Field(max_length=256)
    address: Text = Field(max_length=512)
    region: Text = Field(max_length=256)
    email: Text = Field(max_length=254)


class Payment(BaseModel):
    model_config = _STRICT

    transaction: Text = Field(min_length=1, max_length=128)
    request_id: Text = Field(max_length=128)
    currency: str = Field(pattern=CURRENCY_PATTERN)
    provider: Text = Field(max_length=128)
    amount: NonNegativeInt64
    payment_dt: int = Field(ge=0, le=MAX_PAYMENT_DT)
    bank: Text = Field(max_length=128)
    delivery_cost: NonNegativeInt64
    goods_total: NonNegativeInt64
    custom_fee: NonNegativeInt64


class Item(BaseModel):
    model_config = _STRICT

    chrt_id: NonNegativeInt64
    track_number: Text = Field(min_length=1, max_length=128)
    price: NonNegativeInt64
    rid: Text = Field(min_length=1, max_length=128)
    name: Text = Field(max_length=512)
    sale: int = Field(ge=0, le=100)
    size: Text = Field(max_length=64)
    total_price: NonNegativeInt64
    nm_id: NonNegativeInt64
    brand: Text = Field(max_length=256)
    status: NonNegativeInt64


class Order(BaseModel):
    model_config = _STRICT

    order_uid: str = Field(min_length=1, max_length=64, pattern=ORDER_UID_PATTERN)
    track_number: Text = Field(min_length=1, max_length=128)
    entry: Text = Field(max_length=64)
    delivery: Delivery
    payment: Payment
    # Lax only for Python callers passing a list; JSON input is an array or a wrong_type.
    items: tuple[Item, ...] = Field(
        strict=False, fail_fast=True, min_length=1, max_length=MAX_ITEMS
    )
    locale: Text = Field(max_length=64)
    internal_signature: Text = Field(max_length=1024)
    customer_id: Text = Field(max_length=128)
    delivery_service: Text = Field(max_length=128)
    shardkey: Text = Field(max_length=64)
    sm_id: NonNegativeInt64
    date_created: UtcTimestamp
    oof_shard: Text = Field(max_length=64)
