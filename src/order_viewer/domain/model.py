"""The order message: its model, its validation and its canonical JSON.

docs/ORDER_FORMAT.md is the human description of every rule and reason code here. A message is
decoded by msgspec into the Structs below, whose strict typed decoding is several times faster
than building pydantic models; a message they refuse goes to the pydantic models of `schema`,
whose first error names the reason, so that a rejection is the same whichever path saw it.
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

import msgspec
from msgspec import Meta
from pydantic import ValidationError

from order_viewer.domain import schema
from order_viewer.domain.schema import (
    CURRENCY_PATTERN,
    INT64_MAX,
    MAX_ITEMS,
    MAX_PAYMENT_DT,
    ORDER_UID_PATTERN,
    RFC3339_PATTERN,
)

__all__ = [
    "INT64_MAX",
    "MAX_ITEMS",
    "MAX_PAYMENT_DT",
    "ORDER_UID_PATTERN",
    "RFC3339_PATTERN",
]

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


def _searched(pattern: str) -> str:
    """A pattern of `schema` (anchored by ^ and $ for pydantic's Rust regex) as msgspec needs it:
    msgspec searches with Python's `re`, whose `$` also matches before a trailing newline."""
    return r"\A" + pattern.removeprefix("^").removesuffix("$") + r"\Z"


class Instant(datetime):
    """date_created: a moment in UTC. A type of its own so that msgspec hands its string to
    `_instant`: msgspec's own datetime parser also takes a space separator, no zone and "+0300"
    offsets, and rounds the fraction that pydantic cuts."""

    __slots__ = ()


# The RFC 3339 strings whose moment Python's parser reads as pydantic's does (it cuts a fraction
# to microseconds too), with each field within its range, since Python would read "+03:60" as
# four hours. Any other string goes to pydantic, which accepts the lower-case "t" and "z" too.
_PLAIN_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?"
    r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)


def _instant(kind: type, value: Any) -> Instant:
    """msgspec's decoding of `Instant`; a ValueError or TypeError is its ValidationError."""
    if kind is not Instant or not isinstance(value, str) or not _PLAIN_RFC3339.fullmatch(value):
        raise TypeError("not a plain RFC 3339 timestamp")
    try:
        return Instant.fromisoformat(value).astimezone(UTC)
    except OverflowError:
        raise ValueError("outside years 1 to 9999 once converted to UTC") from None


def _instant_json(value: Any) -> str:
    """msgspec's encoding of `Instant`, as pydantic writes a datetime in UTC."""
    if not isinstance(value, Instant):
        raise TypeError(f"cannot encode {type(value).__name__}")
    return value.isoformat().removesuffix("+00:00") + "Z"


NonNegativeInt64 = Annotated[int, Meta(ge=0, le=INT64_MAX)]


# Unknown fields are refused here (pydantic ignores them) because msgspec skips a value it does
# not keep without the limits of pydantic's JSON parser (nesting, digits); such a message goes
# to pydantic. Without cycles, the Structs stay out of the cycle collector's walks (gc=False).
class Delivery(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    name: Annotated[str, Meta(max_length=256)]
    phone: Annotated[str, Meta(max_length=64)]
    zip: Annotated[str, Meta(max_length=32)]
    city: Annotated[str, Meta(max_length=256)]
    address: Annotated[str, Meta(max_length=512)]
    region: Annotated[str, Meta(max_length=256)]
    email: Annotated[str, Meta(max_length=254)]


class Payment(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    transaction: Annotated[str, Meta(min_length=1, max_length=128)]
    request_id: Annotated[str, Meta(max_length=128)]
    currency: Annotated[str, Meta(pattern=_searched(CURRENCY_PATTERN))]
    provider: Annotated[str, Meta(max_length=128)]
    amount: NonNegativeInt64
    payment_dt: Annotated[int, Meta(ge=0, le=MAX_PAYMENT_DT)]
    bank: Annotated[str, Meta(max_length=128)]
    delivery_cost: NonNegativeInt64
    goods_total: NonNegativeInt64
    custom_fee: NonNegativeInt64


class Item(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    chrt_id: NonNegativeInt64
    track_number: Annotated[str, Meta(min_length=1, max_length=128)]
    price: NonNegativeInt64
    rid: Annotated[str, Meta(min_length=1, max_length=128)]
    name: Annotated[str, Meta(max_length=512)]
    sale: Annotated[int, Meta(ge=0, le=100)]
    size: Annotated[str, Meta(max_length=64)]
    total_price: NonNegativeInt64
    nm_id: NonNegativeInt64
    brand: Annotated[str, Meta(max_length=256)]
    status: NonNegativeInt64


class Order(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    order_uid: Annotated[
        str, Meta(min_length=1, max_length=64, pattern=_searched(ORDER_UID_PATTERN))
    ]
    track_number: Annotated[str, Meta(min_length=1, max_length=128)]
    entry: Annotated[str, Meta(max_length=64)]
    delivery: Delivery
    payment: Payment
    items: Annotated[tuple[Item, ...], Meta(min_length=1, max_length=MAX_ITEMS)]
    locale: Annotated[str, Meta(max_length=64)]
    internal_signature: Annotated[str, Meta(max_length=1024)]
    customer_id: Annotated[str, Meta(max_length=128)]
    delivery_service: Annotated[str, Meta(max_length=128)]
    shardkey: Annotated[str, Meta(max_length=64)]
    sm_id: NonNegativeInt64
    date_created: Instant
    oof_shard: Annotated[str, Meta(max_length=64)]


_DECODER: Final = msgspec.json.Decoder(Order, dec_hook=_instant)
_ENCODER: Final = msgspec.json.Encoder(enc_hook=_instant_json)


def _string_limits(struct: type[msgspec.Struct], prefix: str) -> dict[str, tuple[int, int]]:
    limits: dict[str, tuple[int, int]] = {}
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    for field in info.fields:
        if isinstance(field.type, msgspec.inspect.StrType) and field.type.max_length is not None:
            limits[prefix + field.name] = (field.type.min_length or 0, field.type.max_length)
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


# A string with U+0000 can only come as this escape: the Structs do not look for it (a pattern
# on every string would cost each string a call of `re`); pydantic's models do.
_ESCAPED_NUL: Final = b"\\u0000"


def readable(value: bytes | None) -> bytes:
    """The value, if it is text a JSON decoder may be given: not empty, UTF-8, without a byte
    order mark; else InvalidOrder saying which."""
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
    return value


def parse_order(value: bytes | None) -> Order:
    """Validates one Kafka message value; raises InvalidOrder with the first problem found."""
    value = readable(value)
    if _ESCAPED_NUL not in value:
        try:
            return _DECODER.decode(value)
        except msgspec.DecodeError:
            pass  # refused, or not for msgspec to judge: pydantic decides
    try:
        accepted = schema.Order.model_validate_json(value)
    except ValidationError as error:
        # "from None": pydantic's error text quotes the input, which may be personal data.
        first = error.errors(include_url=False)[0]
        raise InvalidOrder(_rejection_from_error(first)) from None
    # Accepted by pydantic alone (a repeated key whose first value breaks a rule, an unknown
    # field, a NUL in an ignored value, a lower-case "z"): its canonical JSON is plain.
    return _DECODER.decode(schema.Order.__pydantic_serializer__.to_json(accepted))


def order_json(order: Order) -> bytes:
    """The canonical compact UTF-8 JSON of an order: the message's fields in the message's order."""
    return _ENCODER.encode(order)


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
