"""The order message: its model, its validation and its canonical JSON.

docs/ORDER_FORMAT.md is the human description of every rule and reason code here.
"""

from __future__ import annotations

import codecs
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Annotated, Any, Final

from annotated_types import MaxLen, MinLen
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetPydanticSchema,
    StringConstraints,
    ValidationError,
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

REASON_CODES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "empty_value": "the message has no value (a Kafka tombstone) or an empty one",
        "invalid_utf8": "the message bytes are not valid UTF-8",
        "invalid_json": "the message is not one valid JSON document (syntax, truncation, BOM, "
        "nesting deeper than the parser's limit of about 200 levels)",
        "not_an_object": "the message is valid JSON but not a JSON object",
        "missing_field": "a required field is absent",
        "wrong_type": 'a field has the wrong JSON type (e.g. 1.0, true or "1" for an integer)',
        "out_of_range": "a number is outside its bounds (negative money, sale > 100, beyond "
        "64 bits, payment_dt after year 9999), or date_created is not expressible in UTC",
        "invalid_format": "a string does not have its required form (order_uid characters, "
        "currency, RFC 3339 date_created)",
        "invalid_length": "a string is too long or empty where it must not be, or items has not "
        "1 to 1000 entries",
        "nul_character": "a string contains U+0000, which PostgreSQL text cannot store",
        "invalid_value": "a check without a more specific code failed (an unmapped validator "
        "error: report it as a bug)",
    }
)

# The one reason set after validation: the database refused an order the validator passed.
DB_REJECTED: Final = "db_rejected"

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


def _string_limits(model: type[BaseModel], prefix: str) -> dict[str, tuple[int, int]]:
    limits: dict[str, tuple[int, int]] = {}
    for name, info in model.model_fields.items():
        maxima = [m.max_length for m in info.metadata if isinstance(m, MaxLen)]
        if info.annotation is str and maxima:
            minima = [m.min_length for m in info.metadata if isinstance(m, MinLen)]
            limits[prefix + name] = (minima[0] if minima else 0, maxima[0])
    return limits


STRING_LIMITS: Final[Mapping[str, tuple[int, int]]] = MappingProxyType(
    _string_limits(Order, "")
    | _string_limits(Delivery, "delivery.")
    | _string_limits(Payment, "payment.")
    | _string_limits(Item, "items.*.")
)
"""(min, max) length in code points of every length-bounded string field; "items.*." is any item.
currency and date_created are bounded by their patterns instead."""


@dataclass(frozen=True, slots=True)
class Rejection:
    code: str
    message: str
    field: str | None


class InvalidOrder(Exception):
    def __init__(self, rejection: Rejection) -> None:
        # The rejection is the only argument so that the exception survives pickling.
        super().__init__(rejection)
        self.rejection = rejection

    def __str__(self) -> str:
        return f"{self.rejection.code}: {self.rejection.message}"


# Every pydantic error type this schema can produce -> (reason code, message template). The
# templates see the error's context (our own bounds, or jiter's and speedate's position-only
# details) and the field's expected format, never the input value.
_ERRORS: Final[Mapping[str, tuple[str, str]]] = MappingProxyType(
    {
        "json_invalid": ("invalid_json", "The message is not valid JSON: {error}."),
        "missing": ("missing_field", "Required field {field} is missing."),
        "int_type": (
            "wrong_type",
            "{subject} must be an integer (no fraction, exponent, boolean or string).",
        ),
        "string_type": ("wrong_type", "{subject} must be a string."),
        "model_type": ("wrong_type", "{subject} must be a JSON object."),
        "tuple_type": ("wrong_type", "{subject} must be a JSON array."),
        "greater_than_equal": ("out_of_range", "{subject} must be at least {ge}."),
        "less_than_equal": ("out_of_range", "{subject} must be at most {le}."),
        "string_too_short": (
            "invalid_length",
            "{subject} must have at least {min_length} characters.",
        ),
        "string_too_long": (
            "invalid_length",
            "{subject} must have at most {max_length} characters.",
        ),
        "too_short": ("invalid_length", "{subject} must have at least {min_length} entries."),
        "too_long": ("invalid_length", "{subject} must have at most {max_length} entries."),
        "string_pattern_mismatch": ("invalid_format", "{subject} must be {expected_format}."),
        "datetime_parsing": ("invalid_format", "{subject} is not a real moment in time: {error}."),
        "datetime_from_date_parsing": (
            "invalid_format",
            "{subject} is not a real moment in time: {error}.",
        ),
        # Raised by _to_utc, with a message written in this module.
        "out_of_range": ("out_of_range", "{subject}: {msg}."),
    }
)
_UNMAPPED_ERROR: Final = ("invalid_value", "{subject} failed pydantic's {error_type} check.")
_EXPECTED_FORMAT: Final[Mapping[str, str]] = MappingProxyType(
    {
        "order_uid": "1 to 64 ASCII letters, digits, '-' or '_'",
        "payment.currency": "three capital ASCII letters (ISO 4217)",
        "date_created": "an RFC 3339 timestamp with a zone, like 2021-11-26T06:22:19Z",
    }
)
_BOM_REJECTION: Final = Rejection(
    "invalid_json", "The message starts with a UTF-8 byte order mark, which RFC 8259 forbids.", None
)
_EMPTY_REJECTION: Final = Rejection(
    "empty_value", "The message has no value (a Kafka tombstone or an empty payload).", None
)
_NOT_AN_OBJECT_REJECTION: Final = Rejection(
    "not_an_object", "The message is JSON but not a JSON object.", None
)


def _rejection_from_error(error: Mapping[str, Any]) -> Rejection:
    """Turns one pydantic error into a rejection whose message never repeats the input."""
    error_type: str = error["type"]
    field = ".".join(str(part) for part in error["loc"]) or None
    subject = f"Field {field}" if field else "The message"
    if error_type == "model_type" and field is None:
        return _NOT_AN_OBJECT_REJECTION
    # Whatever string check a string with NUL failed (the NUL pattern, order_uid's pattern, a
    # length), the NUL is the problem the producer has to fix; a string where a number belongs
    # is still a wrong type.
    if (
        error_type.startswith("string_")
        and isinstance(error.get("input"), str)
        and "\x00" in error["input"]
    ):
        message = f"{subject} contains a NUL character, which PostgreSQL text cannot store."
        return Rejection("nul_character", message, field)
    code, template = _ERRORS.get(error_type, _UNMAPPED_ERROR)
    message = template.format(
        **(error.get("ctx") or {}),
        field=field,
        subject=subject,
        error_type=error_type,
        msg=error["msg"],
        expected_format=_EXPECTED_FORMAT.get(field or "", ""),
    )
    return Rejection(code, message, field)


def parse_order(value: bytes | None) -> Order:
    """Validates one Kafka message value; raises InvalidOrder with the first problem found."""
    if not value:
        raise InvalidOrder(_EMPTY_REJECTION)
    # bytes.isascii is far cheaper than decoding, and ASCII is always valid UTF-8.
    if not value.isascii():
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as error:
            message = f"The message is not valid UTF-8 (first bad byte at offset {error.start})."
            raise InvalidOrder(Rejection("invalid_utf8", message, None)) from None
        if value.startswith(codecs.BOM_UTF8):
            raise InvalidOrder(_BOM_REJECTION)
    try:
        return Order.model_validate_json(value)
    except ValidationError as error:
        # "from None": pydantic's error text quotes the input, which may be personal data.
        first = error.errors(include_url=False)[0]
        raise InvalidOrder(_rejection_from_error(first)) from None


def order_json(order: Order) -> bytes:
    """The canonical compact UTF-8 JSON of an order: the message's fields in the message's order."""
    return Order.__pydantic_serializer__.to_json(order)


@dataclass(frozen=True, slots=True)
class PreparedOrder:
    """A valid order with the Kafka position it came from, serialized once: the bytes the API
    serves and the digest that versions them."""

    order: Order
    partition: int
    offset: int
    document: bytes
    sha256: bytes

    @classmethod
    def of(cls, order: Order, partition: int, offset: int) -> PreparedOrder:
        document = order_json(order)
        return cls(order, partition, offset, document, hashlib.sha256(document).digest())


def supersedes(incoming: tuple[bytes, int, int], stored: tuple[bytes, int, int]) -> bool:
    """Whether a message's version of an order, (sha256, partition, offset), replaces the stored
    one: only a different content from a later message does, so an identical redelivery changes
    nothing and an older message redelivered after a newer one loses. Another partition counts
    as later (the key moved partitions, which only a producer change does). The PostgreSQL
    writer states the same rule in SQL; the writer contract tests hold both to it."""
    sha256, partition, offset = incoming
    stored_sha256, stored_partition, stored_offset = stored
    return sha256 != stored_sha256 and later((partition, offset), (stored_partition, stored_offset))


def later(incoming: tuple[int, int], stored: tuple[int, int]) -> bool:
    """Whether a message at (partition, offset) came after the one that made what is stored (an
    order's version or its deletion). Another partition counts as later, as in `supersedes`."""
    return incoming[0] != stored[0] or incoming[1] > stored[1]


def tombstone_uid(key: bytes | None) -> str:
    """The order_uid a tombstone (a keyed message without a value) deletes: its key, which must be
    a valid order_uid; raises InvalidOrder otherwise."""
    if key is None:
        raise InvalidOrder(_EMPTY_REJECTION)
    uid = key_uid(key)
    if uid is None:
        message = "The tombstone's key is not an order_uid (1 to 64 of A-Z, a-z, 0-9, _ and -)."
        raise InvalidOrder(Rejection("invalid_format", message, "key"))
    return uid


_KEY_UID = re.compile(ORDER_UID_PATTERN.strip("^$").encode())


def key_uid(key: bytes | None) -> str | None:
    """The order_uid a message's key names, or None if the key is not a valid order_uid (ASCII
    only, so the bytes are checked before anything is decoded)."""
    if key is None or not _KEY_UID.fullmatch(key):
        return None
    return key.decode("ascii")


def consistency_problems(order: Order) -> list[str]:
    """Business rules the producer owns: the service reports them but still stores the order."""
    problems = []
    payment = order.payment
    if payment.goods_total != sum(item.total_price for item in order.items):
        problems.append("goods_total_mismatch")
    if payment.amount != payment.goods_total + payment.delivery_cost + payment.custom_fee:
        problems.append("amount_mismatch")
    if payment.transaction != order.order_uid:
        problems.append("transaction_mismatch")
    if any(item.track_number != order.track_number for item in order.items):
        problems.append("item_track_number_mismatch")
    return problems
