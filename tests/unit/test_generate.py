"""The random order generator: valid orders are valid, broken ones break as announced."""

from __future__ import annotations

import collections
import copy
import json
import random
import re
import unicodedata
from importlib.resources import files
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from order_viewer.domain.model import (
    REASON_CODES,
    InvalidOrder,
    consistency_problems,
    order_json,
    parse_order,
)
from order_viewer.entrypoints.generate import (
    BREAK_KINDS,
    SAMPLE_ORDER,
    break_order,
    encode,
    make_order,
)

# No example database: these tests must not leave files in the working tree.
PROPERTIES = settings(database=None, deadline=None)
SEEDS = st.integers(0, 2**64)


def rejection_code(message: bytes) -> str | None:
    try:
        parse_order(message)
    except InvalidOrder as error:
        return error.rejection.code
    return None


def leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """(dotted path without item indices, value) of every scalar in an order."""
    if isinstance(value, dict):
        return [pair for key, child in value.items() for pair in leaves(child, f"{path}{key}.")]
    if isinstance(value, list):
        return [pair for child in value for pair in leaves(child, path)]
    return [(path.rstrip("."), value)]


def test_sample_order_is_the_packaged_sample() -> None:
    packaged = (
        files("order_viewer.entrypoints").joinpath("sample_order.json").read_text(encoding="utf-8")
    )
    assert json.loads(packaged) == SAMPLE_ORDER
    assert packaged == json.dumps(SAMPLE_ORDER, indent=2, ensure_ascii=False) + "\n"
    assert SAMPLE_ORDER["order_uid"] == "b563feb7b2b84b6test"
    assert json.loads(order_json(parse_order(encode(SAMPLE_ORDER)))) == SAMPLE_ORDER


def test_encode_is_compact_utf8() -> None:
    order = copy.deepcopy(SAMPLE_ORDER)
    order["delivery"]["name"] = "Иван 🙂"
    message = encode(order)
    assert "Иван 🙂".encode() in message
    assert b": " not in message
    assert b", " not in message
    assert json.loads(message) == order


@PROPERTIES
@given(SEEDS)
def test_made_orders_are_valid_consistent_and_round_trip(seed: int) -> None:
    order = make_order(random.Random(seed))
    parsed = parse_order(encode(order))
    assert consistency_problems(parsed) == []
    assert order_json(parsed) == encode(order)
    assert 1 <= len(order["items"]) <= 5
    assert re.fullmatch(r"[0-9a-f]{20}", order["order_uid"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", order["date_created"])
    assert list(order) == list(SAMPLE_ORDER)


@PROPERTIES
@given(SEEDS)
def test_a_seed_replays_the_same_order(seed: int) -> None:
    assert make_order(random.Random(seed)) == make_order(random.Random(seed))


def test_a_given_order_uid_is_used() -> None:
    order = make_order(random.Random(1), order_uid="my-order_1")
    assert order["order_uid"] == order["payment"]["transaction"] == "my-order_1"
    assert parse_order(encode(order)).order_uid == "my-order_1"


def test_made_orders_are_varied() -> None:
    rng = random.Random(2024)
    orders = [make_order(rng) for _ in range(2000)]
    assert len({order["order_uid"] for order in orders}) == len(orders)
    scalars = [pair for order in orders for pair in leaves(order)]
    texts = {value for _, value in scalars if isinstance(value, str)}
    scripts = {
        name
        for text in texts
        for char in text
        for name in ["CYRILLIC", "CJK", "WITH ACUTE", "WITH GRAVE"]
        if name in unicodedata.name(char, "")
    }
    assert scripts == {"CYRILLIC", "CJK", "WITH ACUTE", "WITH GRAVE"}
    assert any(ord(char) > 0xFFFF for text in texts for char in text)  # emoji
    empty_fields = {path for path, value in scalars if value == ""}
    assert {"payment.request_id", "internal_signature", "delivery.region"} <= empty_fields
    assert {"delivery.email", "delivery.zip", "items.size", "items.brand"} <= empty_fields
    assert {len(order["items"]) for order in orders} == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("kind", BREAK_KINDS)
def test_every_kind_of_breakage_gets_the_announced_code(kind: str) -> None:
    rng = random.Random(kind)
    for _ in range(40):
        order = make_order(rng)
        message, code = break_order(rng, order, kind)
        assert code in REASON_CODES
        assert rejection_code(message) == code, message[:300]


@PROPERTIES
@given(SEEDS, st.sampled_from(BREAK_KINDS))
def test_broken_orders_get_the_announced_code(seed: int, kind: str) -> None:
    rng = random.Random(seed)
    order = make_order(rng)
    before = copy.deepcopy(order)
    message, code = break_order(rng, order, kind)
    assert rejection_code(message) == code
    assert order == before


@PROPERTIES
@given(SEEDS)
def test_the_sample_breaks_as_announced_too(seed: int) -> None:
    message, code = break_order(random.Random(seed), SAMPLE_ORDER)
    assert rejection_code(message) == code


def test_random_breakage_yields_every_reachable_code() -> None:
    rng = random.Random(5)
    codes = collections.Counter(break_order(rng, make_order(rng))[1] for _ in range(3000))
    assert set(codes) == set(REASON_CODES) - {"invalid_value"}


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(KeyError):
        break_order(random.Random(0), SAMPLE_ORDER, "gentle")
