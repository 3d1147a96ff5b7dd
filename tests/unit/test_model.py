"""Validation rules of order messages: one table per reason code, plus properties."""

from __future__ import annotations

import copy
import json
import pickle
import re
import time
from datetime import UTC, datetime, timedelta, timezone
from importlib.resources import files
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from order_viewer.domain import schema
from order_viewer.domain.model import (
    INT64_MAX,
    MAX_ITEMS,
    MAX_PAYMENT_DT,
    ORDER_UID_PATTERN,
    REASON_CODES,
    RFC3339_PATTERN,
    STRING_LIMITS,
    Delivery,
    InvalidOrder,
    Item,
    Order,
    Payment,
    Rejection,
    _rejection_from_error,
    consistency_problems,
    order_json,
    parse_order,
    readable,
)
from order_viewer.entrypoints.generate import SAMPLE_ORDER, encode
from tests.fixtures.hostile.make_corpus import SMALL_ITEM

# No example database: these tests must not leave files in the working tree.
PROPERTIES = settings(database=None, deadline=None)
SAMPLE_BYTES = files("order_viewer.entrypoints").joinpath("sample_order.json").read_bytes()
DOC = Path(__file__).parents[2] / "docs" / "ORDER_FORMAT.md"
MARKER = "@@raw@@"


def sample() -> dict[str, Any]:
    return copy.deepcopy(SAMPLE_ORDER)


def _steps(path: str) -> list[str | int]:
    return [int(part) if part.isdigit() else part for part in path.split(".")]


def _parent(order: dict[str, Any], path: str) -> tuple[Any, str | int]:
    *parents, last = _steps(path)
    target: Any = order
    for step in parents:
        target = target[step]
    return target, last


def with_value(path: str, value: Any, order: dict[str, Any] | None = None) -> bytes:
    order = order if order is not None else sample()
    target, last = _parent(order, path)
    target[last] = value
    return encode(order)


def with_raw(path: str, raw_json: str) -> bytes:
    """The sample with the JSON text `raw_json` as the value at `path`, as json.dumps can't."""
    return with_value(path, MARKER).replace(f'"{MARKER}"'.encode(), raw_json.encode())


def without(path: str) -> bytes:
    order = sample()
    target, last = _parent(order, path)
    del target[last]
    return encode(order)


def with_items(items: list[Any]) -> bytes:
    return with_value("items", items)


def rejection(value: bytes | None) -> Rejection:
    with pytest.raises(InvalidOrder) as caught:
        parse_order(value)
    return caught.value.rejection


def leaf_paths(value: Any, prefix: str = "") -> list[str]:
    children = value.items() if isinstance(value, dict) else enumerate(value)
    paths = []
    for key, child in children:
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(child, dict | list):
            paths.extend(leaf_paths(child, path + "."))
    return paths


ALL_PATHS = leaf_paths(SAMPLE_ORDER)
INT_PATHS = [
    path for path in ALL_PATHS if type(_parent(sample(), path)[0][_steps(path)[-1]]) is int
]
STRING_PATHS = [path.replace("*", "0") for path in STRING_LIMITS]
INT_UPPER_BOUNDS = {"payment.payment_dt": MAX_PAYMENT_DT, "items.0.sale": 100}
PERSONAL_PATHS = [path for path in STRING_PATHS if path.startswith("delivery.")] + ["customer_id"]


# Every reason code -> (message, expected field) cases; test_every_code_is_covered keeps this
# table complete.
CASES: dict[str, list[Any]] = {
    "empty_value": [
        pytest.param(None, None, id="tombstone"),
        pytest.param(b"", None, id="empty bytes"),
    ],
    "invalid_utf8": [
        pytest.param(b'{"order_uid":"\xff"}', None, id="stray byte"),
        pytest.param(
            with_value("delivery.name", MARKER).replace(MARKER.encode(), b"Jos\xe9"),
            None,
            id="latin-1 name",
        ),
        pytest.param(b'{"a":"\xc0\xaf"}', None, id="overlong"),
        pytest.param(b'{"a":"\xed\xa0\x80"}', None, id="encoded surrogate"),
        pytest.param('{"a":"Ж'.encode()[:-1], None, id="cut multi-byte char"),
        pytest.param(b"\xff\xfe{\x00}\x00", None, id="UTF-16"),
    ],
    "invalid_json": [
        pytest.param(b"not json", None, id="text"),
        pytest.param(b"{", None, id="lone brace"),
        pytest.param(SAMPLE_BYTES[:-10], None, id="truncated"),
        pytest.param(b"   ", None, id="whitespace only"),
        pytest.param(b'{"order_uid":"x",}', None, id="trailing comma"),
        pytest.param(b"{'order_uid': 'x'}", None, id="single quotes"),
        pytest.param(encode(SAMPLE_ORDER) * 2, None, id="two documents"),
        pytest.param(b"\xef\xbb\xbf" + encode(SAMPLE_ORDER), None, id="byte order mark"),
        pytest.param(with_raw("delivery.name", '"\\ud800"'), None, id="lone surrogate escape"),
        pytest.param(with_raw("delivery.name", '"a\x01b"'), None, id="raw control character"),
        pytest.param(with_raw("delivery.name", '"a\x00b"'), None, id="raw NUL byte"),
        pytest.param(with_raw("sm_id", "9" * 5000), None, id="5000-digit number"),
        pytest.param(b'{"x":' + b"[" * 10_000 + b"]" * 10_000 + b"}", None, id="deep nesting"),
    ],
    "not_an_object": [
        pytest.param(b"[]", None, id="array"),
        pytest.param(b"[" + encode(SAMPLE_ORDER) + b"]", None, id="order in an array"),
        pytest.param(b"42", None, id="number"),
        pytest.param(b'"order"', None, id="string"),
        pytest.param(b"null", None, id="null"),
        pytest.param(b"true", None, id="boolean"),
    ],
    "missing_field": [
        pytest.param(without(path), path, id=path)
        for path in ALL_PATHS
        if not path.rsplit(".", 1)[-1].isdigit()
    ],
    "wrong_type": [
        pytest.param(with_value("payment.amount", 1817.0), "payment.amount", id="float 1817.0"),
        pytest.param(with_raw("payment.amount", "1.0"), "payment.amount", id="float 1.0"),
        pytest.param(with_raw("payment.amount", "1e3"), "payment.amount", id="exponent"),
        pytest.param(with_value("payment.amount", True), "payment.amount", id="bool for int"),
        pytest.param(with_value("payment.amount", "1817"), "payment.amount", id="string int"),
        pytest.param(with_value("items.0.sale", None), "items.0.sale", id="null int"),
        pytest.param(with_raw("sm_id", "NaN"), "sm_id", id="NaN"),
        pytest.param(with_value("order_uid", 123), "order_uid", id="int for string"),
        pytest.param(with_value("delivery.email", None), "delivery.email", id="null string"),
        pytest.param(with_value("items.0.brand", ["x"]), "items.0.brand", id="array string"),
        pytest.param(with_value("date_created", 1637907727), "date_created", id="unix date"),
        pytest.param(with_value("delivery", []), "delivery", id="array for object"),
        pytest.param(with_value("payment", "wbpay"), "payment", id="string for object"),
        pytest.param(with_value("items", {"0": {}}), "items", id="object for array"),
        pytest.param(with_value("items", "Mascaras"), "items", id="string for array"),
        pytest.param(with_items([1]), "items.0", id="number for item"),
    ],
    "out_of_range": [
        pytest.param(with_value("payment.amount", -1), "payment.amount", id="negative amount"),
        pytest.param(with_value("payment.custom_fee", -5), "payment.custom_fee", id="neg fee"),
        pytest.param(with_value("items.0.price", -453), "items.0.price", id="negative price"),
        pytest.param(with_value("items.0.sale", 101), "items.0.sale", id="sale 101"),
        pytest.param(with_value("items.0.sale", -1), "items.0.sale", id="sale -1"),
        pytest.param(with_value("items.0.status", -202), "items.0.status", id="negative status"),
        pytest.param(with_value("sm_id", 2**63), "sm_id", id="2**63"),
        pytest.param(with_value("items.0.chrt_id", 10**30), "items.0.chrt_id", id="10**30"),
        pytest.param(with_value("items.0.nm_id", -(2**63) - 1), "items.0.nm_id", id="-2**63-1"),
        pytest.param(with_value("payment.payment_dt", -1), "payment.payment_dt", id="dt -1"),
        pytest.param(
            with_value("payment.payment_dt", MAX_PAYMENT_DT + 1),
            "payment.payment_dt",
            id="payment_dt in year 10000",
        ),
        pytest.param(
            with_value("date_created", "9999-12-31T23:30:00-01:00"),
            "date_created",
            id="date after 9999 in UTC",
        ),
        pytest.param(
            with_value("date_created", "0001-01-01T00:30:00+01:00"),
            "date_created",
            id="date before year 1 in UTC",
        ),
    ],
    "invalid_format": [
        *[
            pytest.param(with_value("order_uid", uid), "order_uid", id=f"uid {uid!r}")
            for uid in ["b563 feb7", "a.b", "a/b", "заказ", "uid\n", "ü", "a+b"]
        ],
        *[
            pytest.param(with_value("payment.currency", cur), "payment.currency", id=f"cur {cur!r}")
            for cur in ["usd", "Usd", "US", "USDT", "", " USD", "U1D", "ÜSD"]
        ],
        *[
            pytest.param(with_value("date_created", date), "date_created", id=f"date {date!r}")
            for date in [
                "2021-11-26T06:22:19",
                "2021-11-26 06:22:19Z",
                "2021-11-26",
                "2021-11-26T06:22Z",
                "2021-11-26T06:22:19+0300",
                "2021-11-26T06:22:19+03",
                "20211126T062219Z",
                "26.11.2021 06:22:19",
                "1637907727",
                "2021-11-26T06:22:19,5Z",
                "2021-11-26T06:22:19.1234567891Z",
                "2021-13-26T06:22:19Z",
                "2021-02-29T06:22:19Z",
                "2021-11-26T24:00:00Z",
                "2021-11-26T06:60:00Z",
                "2021-11-26T23:59:60Z",
                "2021-11-26T06:22:19+24:00",
                "0000-01-01T00:00:00Z",
                "",
            ]
        ],
    ],
    "invalid_length": [
        pytest.param(with_value("order_uid", ""), "order_uid", id="empty uid"),
        pytest.param(with_value("order_uid", "a" * 65), "order_uid", id="65-char uid"),
        pytest.param(with_value("track_number", ""), "track_number", id="empty track"),
        pytest.param(with_value("payment.transaction", ""), "payment.transaction", id="empty tx"),
        pytest.param(with_value("items.0.rid", ""), "items.0.rid", id="empty rid"),
        pytest.param(
            with_value("delivery.name", "Ж" * 257), "delivery.name", id="257 two-byte chars"
        ),
        pytest.param(
            with_value("delivery.address", "a" * 900_000), "delivery.address", id="900 KB"
        ),
        pytest.param(with_items([]), "items", id="no items"),
        pytest.param(with_items(SAMPLE_ORDER["items"] * (MAX_ITEMS + 1)), "items", id="1001"),
    ],
    "nul_character": [
        pytest.param(with_value("delivery.name", "Te\x00st"), "delivery.name", id="name"),
        pytest.param(with_value("order_uid", "b563\x00"), "order_uid", id="uid"),
        pytest.param(with_value("payment.currency", "US\x00"), "payment.currency", id="currency"),
        pytest.param(with_value("date_created", "\x00"), "date_created", id="date"),
        pytest.param(with_value("items.0.brand", "\x00" * 300), "items.0.brand", id="too long"),
        pytest.param(with_value("payment.request_id", "\x00"), "payment.request_id", id="req"),
    ],
}


def check(code: str, value: bytes | None, field: str | None) -> None:
    found = rejection(value)
    assert (found.code, found.field) == (code, field)
    assert found.message[0].isupper()
    assert found.message.endswith(".")
    assert "\n" not in found.message


@pytest.mark.parametrize(("value", "field"), CASES["empty_value"])
def test_empty_value(value: bytes | None, field: str | None) -> None:
    check("empty_value", value, field)


@pytest.mark.parametrize(("value", "field"), CASES["invalid_utf8"])
def test_invalid_utf8(value: bytes, field: str | None) -> None:
    check("invalid_utf8", value, field)


@pytest.mark.parametrize(("value", "field"), CASES["invalid_json"])
def test_invalid_json(value: bytes, field: str | None) -> None:
    check("invalid_json", value, field)


@pytest.mark.parametrize(("value", "field"), CASES["not_an_object"])
def test_not_an_object(value: bytes, field: str | None) -> None:
    check("not_an_object", value, field)


@pytest.mark.parametrize(("value", "field"), CASES["missing_field"])
def test_missing_field(value: bytes, field: str) -> None:
    check("missing_field", value, field)


@pytest.mark.parametrize(("value", "field"), CASES["wrong_type"])
def test_wrong_type(value: bytes, field: str) -> None:
    check("wrong_type", value, field)


@pytest.mark.parametrize(("value", "field"), CASES["out_of_range"])
def test_out_of_range(value: bytes, field: str) -> None:
    check("out_of_range", value, field)


@pytest.mark.parametrize(("value", "field"), CASES["invalid_format"])
def test_invalid_format(value: bytes, field: str) -> None:
    check("invalid_format", value, field)


@pytest.mark.parametrize(("value", "field"), CASES["invalid_length"])
def test_invalid_length(value: bytes, field: str) -> None:
    check("invalid_length", value, field)


@pytest.mark.parametrize(("value", "field"), CASES["nul_character"])
def test_nul_character(value: bytes, field: str) -> None:
    check("nul_character", value, field)


def test_an_unmapped_pydantic_error_is_invalid_value() -> None:
    error = {"type": "new_in_pydantic_3", "loc": ("payment", "bank"), "msg": "?", "input": "x"}
    assert _rejection_from_error(error) == Rejection(
        "invalid_value",
        "Field payment.bank failed pydantic's new_in_pydantic_3 check.",
        "payment.bank",
    )


def test_every_code_is_covered_and_documented() -> None:
    assert set(CASES) | {"invalid_value"} == set(REASON_CODES)
    doc = DOC.read_text(encoding="utf-8")
    for code in REASON_CODES:
        assert f"`{code}`" in doc


def test_documented_string_bounds_match_the_model() -> None:
    rows = {
        line.split("|")[1].strip().strip("`"): line
        for line in DOC.read_text(encoding="utf-8").splitlines()
        if line.startswith("| `")
    }
    for key, (shortest, longest) in STRING_LIMITS.items():
        cells = [cell.strip() for cell in rows[key.replace(".*.", "[].")].split("|")]
        assert f"≤ {longest}" in cells[3], key
        assert cells[4] == ("no" if shortest else "yes"), key


@pytest.mark.parametrize("path", PERSONAL_PATHS)
def test_messages_never_repeat_personal_values(path: str) -> None:
    secret = "Secret Ivanova"
    for value in [secret + "\x00", secret * 100, [secret]]:
        assert secret not in rejection(with_value(path, value)).message
    assert secret not in rejection(with_value(path, secret) + b"}").message


def test_deep_nesting_is_rejected_without_recursion_error() -> None:
    for depth in [1_000, 10_000, 100_000]:
        assert rejection(b"[" * depth + b"]" * depth).code == "invalid_json"
        assert rejection(b'{"a":' * depth + b"1" + b"}" * depth).code == "invalid_json"
        deep_extra = b'{"x":' + b"[" * depth + b"]" * depth + b"," + encode(SAMPLE_ORDER)[1:]
        assert rejection(deep_extra).code == "invalid_json"


def test_huge_messages_are_rejected_quickly() -> None:
    cases = [
        (with_value("delivery.name", "Ж" * 460_000), "invalid_length", 1.0),  # 900 KiB
        (with_value("x", "a" * 900 * 1024), None, 1.0),  # an ignored 900 KiB field
        (with_items([{}] * 100_000), "missing_field", 1.0),  # stops at the first bad item
        (with_items([SMALL_ITEM] * 100_000), "invalid_length", 5.0),  # 13 MB
    ]
    for message, code, seconds in cases:
        started = time.perf_counter()
        try:
            parse_order(message)
            found = None
        except InvalidOrder as error:
            found = error.rejection.code
        assert found == code
        assert time.perf_counter() - started < seconds


def test_the_sample_parses() -> None:
    order = parse_order(SAMPLE_BYTES)
    assert order.order_uid == "b563feb7b2b84b6test"
    assert order.payment.amount == 1817
    assert order.items[0].name == "Mascaras"
    assert isinstance(order.items, tuple)
    assert order.date_created == datetime(2021, 11, 26, 6, 22, 19, tzinfo=UTC)
    assert order.date_created.tzinfo is UTC
    assert consistency_problems(order) == []


def test_order_json_is_the_compact_sample() -> None:
    canonical = order_json(parse_order(SAMPLE_BYTES))
    assert json.loads(canonical) == SAMPLE_ORDER
    assert canonical == encode(SAMPLE_ORDER)  # same fields, same order, compact
    assert b'"date_created":"2021-11-26T06:22:19Z"' in canonical


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("2021-11-26T09:22:19+03:00", "2021-11-26T06:22:19Z"),
        ("2021-11-25T22:52:19-07:30", "2021-11-26T06:22:19Z"),
        ("2021-11-26T06:22:19-00:00", "2021-11-26T06:22:19Z"),
        ("2021-11-26t06:22:19z", "2021-11-26T06:22:19Z"),
        ("2021-11-26T06:22:19.5Z", "2021-11-26T06:22:19.500000Z"),
        ("2021-11-26T06:22:19.000001+01:00", "2021-11-26T05:22:19.000001Z"),
        ("2021-11-26T06:22:19.123456789Z", "2021-11-26T06:22:19.123456Z"),
        ("2021-11-26T06:22:19.000Z", "2021-11-26T06:22:19Z"),
        ("2020-02-29T00:00:00+01:00", "2020-02-28T23:00:00Z"),
    ],
)
def test_date_created_is_normalised_to_utc(given: str, expected: str) -> None:
    order = parse_order(with_value("date_created", given))
    assert order.date_created.tzinfo is UTC
    assert json.loads(order_json(order))["date_created"] == expected


def test_unknown_fields_are_ignored() -> None:
    order = sample()
    order["comment"] = {"nested": [1, 2.5, None, "x\x00"]}
    order["delivery"]["floor"] = 3
    order["payment"]["amount_str"] = "1817"
    order["items"][0]["color"] = "red"
    assert json.loads(order_json(parse_order(encode(order)))) == SAMPLE_ORDER


def test_duplicate_keys_keep_the_last_value() -> None:
    message = encode(SAMPLE_ORDER)[:-1] + b',"sm_id":7,"sm_id":8}'
    assert parse_order(message).sm_id == 8


@pytest.mark.parametrize(
    "path", [key.replace("*", "0") for key, (shortest, _) in STRING_LIMITS.items() if not shortest]
)
def test_optional_strings_may_be_empty(path: str) -> None:
    target, last = _parent(json.loads(order_json(parse_order(with_value(path, "")))), path)
    assert target[last] == ""


@pytest.mark.parametrize("path", STRING_PATHS)
def test_string_bounds_count_characters_not_bytes(path: str) -> None:
    longest = STRING_LIMITS[re.sub(r"\.\d+\.", ".*.", path)][1]
    char = "a" if path == "order_uid" else "🙂"
    parse_order(with_value(path, char * longest))
    check("invalid_length", with_value(path, char * (longest + 1)), path)


def test_bounds_are_inclusive() -> None:
    order = sample()
    for path in INT_PATHS:
        target, last = _parent(order, path)
        target[last] = INT_UPPER_BOUNDS.get(path, INT64_MAX)
    order["items"] = order["items"] * MAX_ITEMS
    parsed = parse_order(encode(order))
    assert parsed.payment.amount == INT64_MAX
    assert len(parsed.items) == MAX_ITEMS
    for path in INT_PATHS:
        assert parse_order(with_value(path, 0))


def test_the_first_error_in_field_order_is_reported() -> None:
    order = sample()
    order["oof_shard"] = None
    order["payment"]["amount"] = -1
    order["order_uid"] = "bad uid"
    reversed_keys = dict(reversed(order.items()))
    for message in [encode(order), encode(reversed_keys)]:
        assert rejection(message) == rejection(encode(order))
        assert rejection(message).field == "order_uid"


def test_consistency_problems() -> None:
    order = parse_order(SAMPLE_BYTES)
    assert consistency_problems(order) == []
    payment = order.payment
    item = order.items[0]
    replace = msgspec.structs.replace
    cases = {
        "goods_total_mismatch": replace(order, items=(replace(item, total_price=318),)),
        "amount_mismatch": replace(order, payment=replace(payment, amount=1818)),
        "transaction_mismatch": replace(order, payment=replace(payment, transaction="other")),
        "item_track_number_mismatch": replace(
            order, items=(item, replace(item, track_number="X", total_price=0))
        ),
    }
    for problem, broken in cases.items():
        assert consistency_problems(broken) == [problem]
    everything = sample()
    everything["payment"].update(transaction="x", goods_total=1, amount=5)
    assert consistency_problems(parse_order(encode(everything))) == [
        "goods_total_mismatch",
        "amount_mismatch",
        "transaction_mismatch",
    ]


def test_inconsistent_orders_are_still_valid() -> None:
    order = sample()
    order["payment"]["amount"] = 1
    assert consistency_problems(parse_order(encode(order))) == ["amount_mismatch"]


def test_models_are_frozen_and_build_from_python_values() -> None:
    order = parse_order(SAMPLE_BYTES)
    with pytest.raises(AttributeError):
        order.order_uid = "x"  # type: ignore[misc]
    described = schema.Order.model_validate_json(SAMPLE_BYTES)
    with pytest.raises(ValidationError):
        described.order_uid = "x"
    python_values = described.model_dump()
    python_values["items"] = list(python_values["items"])
    moscow = timezone(timedelta(hours=3))
    python_values["date_created"] = datetime(2021, 11, 26, 9, 22, 19, tzinfo=moscow)
    assert schema.Order.model_validate(python_values) == described
    python_values["date_created"] = datetime(2021, 11, 26, 6, 22, 19)  # naive
    with pytest.raises(ValidationError):
        schema.Order.model_validate(python_values)


def test_invalid_order_pickles_and_prints_no_input() -> None:
    error = rejection(with_value("delivery.name", "Secret\x00"))
    raised = InvalidOrder(error)
    assert pickle.loads(pickle.dumps(raised)).rejection == error
    assert str(raised) == f"nul_character: {error.message}"
    assert "Secret" not in str(raised)


# --- properties ---------------------------------------------------------------------------

# UTF-8 encodable excludes lone surrogates, which no valid message can carry.
SAFE_CHARACTERS = st.characters(codec="utf-8", exclude_characters="\x00")


def text_for(key: str) -> st.SearchStrategy[str]:
    shortest, longest = STRING_LIMITS[key]
    return st.text(SAFE_CHARACTERS, min_size=shortest, max_size=longest)


def timestamps() -> st.SearchStrategy[str]:
    # isoformat writes microseconds only when non-zero, as order_json does.
    moments = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31))
    return moments.map(lambda moment: moment.isoformat() + "Z")


def fields(
    template: dict[str, Any], prefix: str, others: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the template's fields in its order: bounded strings, or from `others`."""
    strategies = {
        name: others[name] if name in others else text_for(prefix + name) for name in template
    }
    # fixed_dictionaries does not promise to keep the key order.
    return st.fixed_dictionaries(strategies).map(
        lambda drawn: {name: drawn[name] for name in template}
    )


UINT64 = st.integers(0, INT64_MAX)
ITEMS = fields(
    SAMPLE_ORDER["items"][0],
    "items.*.",
    dict.fromkeys(["chrt_id", "price", "total_price", "nm_id", "status"], UINT64)
    | {"sale": st.integers(0, 100)},
)
PAYMENTS = fields(
    SAMPLE_ORDER["payment"],
    "payment.",
    dict.fromkeys(["amount", "delivery_cost", "goods_total", "custom_fee"], UINT64)
    | {
        "currency": st.from_regex(r"[A-Z]{3}", fullmatch=True),
        "payment_dt": st.integers(0, MAX_PAYMENT_DT),
    },
)
ORDERS = fields(
    SAMPLE_ORDER,
    "",
    {
        "order_uid": st.from_regex(ORDER_UID_PATTERN, fullmatch=True),
        "delivery": fields(SAMPLE_ORDER["delivery"], "delivery.", {}),
        "payment": PAYMENTS,
        "items": st.lists(ITEMS, min_size=1, max_size=4),
        "sm_id": UINT64,
        "date_created": timestamps(),
    },
)


def shape(order: dict[str, Any]) -> list[list[str]]:
    return [list(order), list(order["delivery"]), list(order["payment"]), list(order["items"][0])]


@PROPERTIES
@given(ORDERS)
def test_valid_orders_round_trip(order: dict[str, Any]) -> None:
    assert shape(order) == shape(SAMPLE_ORDER)
    canonical = order_json(parse_order(encode(order)))
    assert json.loads(canonical) == order
    assert parse_order(canonical) == parse_order(encode(order))


@PROPERTIES
@given(
    st.sampled_from(INT_PATHS),
    st.one_of(
        # Bounded like the positive side: past ~4,300 digits the JSON parser itself refuses the
        # number (invalid_json, documented), which is another rule than this one.
        st.integers(min_value=-(2**1000), max_value=-1).map(lambda value: (value, "out_of_range")),
        st.integers(min_value=INT64_MAX + 1, max_value=2**1000).map(
            lambda value: (value, "out_of_range")
        ),
        st.floats().map(lambda value: (value, "wrong_type")),
        st.one_of(st.text(), st.booleans(), st.none(), st.lists(st.integers())).map(
            lambda value: (value, "wrong_type")
        ),
    ),
)
def test_bad_integers_are_rejected(path: str, bad: tuple[Any, str]) -> None:
    value, code = bad
    check(code, with_value(path, value), path)


@PROPERTIES
@given(st.sampled_from(list(INT_UPPER_BOUNDS)), st.data())
def test_bounded_integers_are_rejected_above_their_bound(path: str, data: st.DataObject) -> None:
    value = data.draw(st.integers(INT_UPPER_BOUNDS[path] + 1, INT64_MAX))
    check("out_of_range", with_value(path, value), path)


@PROPERTIES
@given(
    st.sampled_from(STRING_PATHS),
    st.one_of(
        st.integers(),
        st.booleans(),
        st.none(),
        st.lists(st.text()),
        st.dictionaries(st.text(), st.text()),
    ),
)
def test_non_strings_are_rejected(path: str, value: Any) -> None:
    check("wrong_type", with_value(path, value), path)


@PROPERTIES
@given(st.sampled_from(STRING_PATHS), st.text(SAFE_CHARACTERS), st.text(SAFE_CHARACTERS))
def test_strings_with_nul_are_rejected(path: str, before: str, after: str) -> None:
    check("nul_character", with_value(path, before + "\x00" + after), path)


@PROPERTIES
@given(st.sampled_from(STRING_PATHS), SAFE_CHARACTERS, st.integers(1, 100))
def test_too_long_strings_are_rejected(path: str, char: str, excess: int) -> None:
    longest = STRING_LIMITS[re.sub(r"\.\d+\.", ".*.", path)][1]
    check("invalid_length", with_value(path, char * (longest + excess)), path)


@PROPERTIES
@given(st.text())
def test_order_uid_rule(uid: str) -> None:
    message = with_value("order_uid", uid)
    if "\x00" in uid:
        check("nul_character", message, "order_uid")
    elif not 1 <= len(uid) <= 64:
        check("invalid_length", message, "order_uid")
    elif re.fullmatch(ORDER_UID_PATTERN, uid):
        assert parse_order(message).order_uid == uid
    else:
        check("invalid_format", message, "order_uid")


@PROPERTIES
@given(st.one_of(st.text(), st.from_regex(r"[A-Z]{3}", fullmatch=True)))
def test_currency_rule(currency: str) -> None:
    message = with_value("payment.currency", currency)
    if "\x00" in currency:
        check("nul_character", message, "payment.currency")
    elif re.fullmatch(r"[A-Z]{3}", currency):
        assert parse_order(message).payment.currency == currency
    else:
        check("invalid_format", message, "payment.currency")


@PROPERTIES
@given(st.text())
def test_dates_that_are_not_rfc3339_are_rejected(date: str) -> None:
    assume(not re.fullmatch(RFC3339_PATTERN, date))
    code = "nul_character" if "\x00" in date else "invalid_format"
    check(code, with_value("date_created", date), "date_created")


@PROPERTIES
@given(
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)),
    st.integers(-(24 * 60 - 1), 24 * 60 - 1),
)
def test_offset_dates_normalise_to_the_same_instant(local: datetime, offset_minutes: int) -> None:
    sign = "+" if offset_minutes >= 0 else "-"
    hours, minutes = divmod(abs(offset_minutes), 60)
    message = with_value("date_created", f"{local.isoformat()}{sign}{hours:02}:{minutes:02}")
    try:
        expected = local - timedelta(minutes=offset_minutes)
    except OverflowError:
        check("out_of_range", message, "date_created")
        return
    assert parse_order(message).date_created == expected.replace(tzinfo=UTC)


@PROPERTIES
@given(st.lists(st.sampled_from(list(SAMPLE_ORDER)), min_size=2, max_size=5, unique=True))
def test_the_first_broken_field_in_model_order_wins(names: list[str]) -> None:
    order = sample()
    for name in names:
        order[name] = None
    first = min(names, key=list(SAMPLE_ORDER).index)
    check("wrong_type", encode(order), first)


# --- the Structs of msgspec and the models of pydantic ---------------------------------------


def struct_rules(struct: type[msgspec.Struct]) -> dict[str, dict[str, Any]]:
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    rules = {}
    for field in info.fields:
        bounds = {
            name: getattr(field.type, name, None)
            for name in ("ge", "le", "min_length", "max_length", "pattern")
        }
        rules[field.name] = {name: value for name, value in bounds.items() if value is not None}
    return rules


def model_rules(model: type[BaseModel]) -> dict[str, dict[str, Any]]:
    rules = {}
    for name, info in model.model_fields.items():
        bounds = {
            bound: getattr(constraint, bound)
            for constraint in info.metadata
            for bound in ("ge", "le", "min_length", "max_length", "pattern")
            if getattr(constraint, bound, None) is not None
        }
        if bounds.get("pattern") == r"^[^\x00]*$":
            del bounds["pattern"]  # the Structs leave NUL to the message's check for its escape
        elif "pattern" in bounds:
            bounds["pattern"] = r"\A" + bounds["pattern"][1:-1] + r"\Z"
        rules[name] = bounds
    return rules


@pytest.mark.parametrize(
    ("struct", "model"),
    [
        (Order, schema.Order),
        (Delivery, schema.Delivery),
        (Payment, schema.Payment),
        (Item, schema.Item),
    ],
)
def test_the_structs_declare_the_rules_of_the_pydantic_models(
    struct: type[msgspec.Struct], model: type[BaseModel]
) -> None:
    # Field names in the same order (the canonical JSON's), and the same bounds and patterns.
    assert list(struct_rules(struct).items()) == list(model_rules(model).items())


def by_pydantic(value: bytes) -> bytes | Rejection:
    """What parse_order answered before msgspec decoded orders: the checks of the bytes, then
    pydantic's canonical JSON of an accepted message, or the rejection of its first error."""
    try:
        accepted = schema.Order.model_validate_json(readable(value))
    except InvalidOrder as unreadable:
        return unreadable.rejection
    except ValidationError as error:
        return _rejection_from_error(error.errors(include_url=False)[0])
    return schema.Order.__pydantic_serializer__.to_json(accepted)


def by_parse_order(value: bytes) -> bytes | Rejection:
    try:
        return order_json(parse_order(value))
    except InvalidOrder as invalid:
        return invalid.rejection


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children),
    max_leaves=8,
)
# Moments in the RFC 3339 form with any digits (month 13, hour 24, offset +03:60, ...), and
# real ones in any zone, with up to 9 fraction digits and either case of "t" and "z".
DATES = st.from_regex(RFC3339_PATTERN, fullmatch=True) | st.builds(
    lambda moment, fraction, zone, t: f"{moment:%Y-%m-%d}{t}{moment:%H:%M:%S}{fraction}{zone}",
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)),
    st.sampled_from(["", ".5", ".000", ".123456", ".1234567", ".999999999"]),
    st.sampled_from(["Z", "z", "+00:00", "-00:00", "+03:00", "-07:30", "+23:59", "-23:59"]),
    st.sampled_from(["T", "t"]),
)
NEAR_BOUNDS = st.sampled_from(
    [-1, 0, 100, 101, INT64_MAX, INT64_MAX + 1, 2**64, MAX_PAYMENT_DT + 1, "", "\x00", "a\n"]
)


@st.composite
def hostile_messages(draw: st.DrawFn) -> bytes:
    """The sample, or a valid order, changed in a few ways a producer or an attacker might."""
    order = draw(st.sampled_from([sample()]) | ORDERS)
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(leaf_paths(order)))
        target, last = _parent(order, path)
        values = JSON_VALUES | NEAR_BOUNDS | DATES | st.text(st.characters(codec="utf-8"))
        target[last] = draw(values)
    if draw(st.booleans()):
        order[draw(st.text(max_size=5))] = draw(JSON_VALUES)
    message = encode(order)
    if draw(st.booleans()):  # a key repeated, its last value kept by both parsers
        key = draw(st.sampled_from(list(SAMPLE_ORDER)))
        value = json.dumps(draw(JSON_VALUES | DATES), ensure_ascii=draw(st.booleans()))
        message = message[:-1] + f',"{key}":{value}}}'.encode()
    if draw(st.integers(0, 4)) == 0:  # a character where none belongs
        at = draw(st.integers(0, len(message)))
        message = (
            message[:at]
            + draw(st.sampled_from(list(b' \t\x0c0-".,:[]{}\\'))).to_bytes(1, "big")
            + message[at:]
        )
    return message


@PROPERTIES
@given(hostile_messages())
def test_msgspec_and_pydantic_agree_on_every_message(message: bytes) -> None:
    # Accepted alike, with the same canonical JSON (so the same digest), or refused alike.
    assert by_parse_order(message) == by_pydantic(message)


@PROPERTIES
@given(ORDERS)
def test_valid_orders_get_pydantics_canonical_json_byte_for_byte(order: dict[str, Any]) -> None:
    assert by_parse_order(encode(order)) == by_pydantic(encode(order))


def test_what_msgspec_refuses_alone_is_judged_by_pydantic() -> None:
    # A repeated key whose first value breaks a rule, unknown fields, a NUL in an ignored
    # value, a lower-case zone: each accepted as before, with the same canonical JSON.
    repeated = encode(SAMPLE_ORDER)[:-1] + b',"sm_id":"x","sm_id":99}'
    unknown = sample() | {"comment": {"nested": [[["deep"]]], "nul": "x\x00"}}
    lower = with_value("date_created", "2021-11-26t06:22:19.123456789z")
    for message in (repeated, encode(unknown), lower):
        assert isinstance(by_pydantic(message), bytes)
        assert by_parse_order(message) == by_pydantic(message)
