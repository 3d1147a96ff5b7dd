"""Bodies as the caches hold them: packed and unpacked back to the same bytes, whatever they are,
against the skeleton of an order or against another body (a masked view against its whole)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from order_viewer.adapters.packing import ORDER_SKELETON, pack, unpack
from order_viewer.domain.masking import masked_document
from order_viewer.domain.model import MAX_ITEMS, order_json, parse_order
from order_viewer.entrypoints.generate import SAMPLE_ORDER, encode, make_order

# No example database: these tests must not leave files in the working tree.
PROPERTIES = settings(database=None, deadline=None)


def api_body(order: dict[str, Any]) -> bytes:
    """An order's body as the API sends it (and the caches hold it)."""
    return order_json(parse_order(encode(order)))


def generated(count: int, seed: int, item_count: int | None = None) -> list[bytes]:
    rng = random.Random(seed)
    return [api_body(make_order(rng, item_count=item_count)) for _ in range(count)]


def test_every_generated_body_and_its_masked_view_come_back_byte_for_byte() -> None:
    for whole in generated(2000, seed=24):
        assert unpack(pack(whole)) == whole
        masked = masked_document(whole)
        assert unpack(pack(masked, whole), whole) == masked


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{}",
        # Multi-byte characters in every length of UTF-8 sequence, and text unlike any order.
        "Zoë 王小明 🌸 Ünïcödé \u2028 \x00".encode() * 50,
        random.Random(5).randbytes(5000),  # nothing to compress: the block is a little larger
        bytes(300_000),  # all alike: far smaller
        b"[1,2,3]" * 40_000,
    ],
    ids=["empty", "empty object", "multi-byte text", "random bytes", "zeros", "json array"],
)
def test_bodies_unlike_an_order_come_back_byte_for_byte(body: bytes) -> None:
    assert unpack(pack(body)) == body
    whole = api_body(SAMPLE_ORDER)
    assert unpack(pack(body, whole), whole) == body


def test_the_largest_orders_and_views_against_them_come_back_byte_for_byte() -> None:
    # Over LZ4's 64 KiB window: a view is packed against the last 64 KiB of its whole alone.
    (whole,) = generated(1, seed=7, item_count=MAX_ITEMS)
    assert len(whole) > 64 * 1024
    assert unpack(pack(whole)) == whole
    masked = masked_document(whole)
    assert unpack(pack(masked, whole), whole) == masked


@PROPERTIES
@given(body=st.binary(max_size=4096), reference=st.binary(max_size=4096))
def test_any_body_against_any_reference_comes_back_byte_for_byte(
    body: bytes, reference: bytes
) -> None:
    assert unpack(pack(body, reference), reference) == body


def test_an_order_packs_smaller_and_a_masked_view_against_its_whole_far_smaller() -> None:
    for whole in generated(50, seed=3):
        assert len(pack(whole)) < len(whole)
        masked = masked_document(whole)
        assert len(pack(masked, whole)) < len(masked) // 4


def structure(value: Any) -> Any:
    """The keys of a JSON document, nested, in order (an array by its first element)."""
    if isinstance(value, dict):
        return [(key, structure(child)) for key, child in value.items()]
    if isinstance(value, list):
        return [structure(value[0])] if value else []
    return None


def test_the_skeleton_has_every_field_of_an_order_in_the_apis_order_and_no_data() -> None:
    skeleton = json.loads(ORDER_SKELETON)
    assert structure(skeleton) == structure(json.loads(api_body(SAMPLE_ORDER)))
    leaves = [*skeleton["delivery"].values(), *skeleton["payment"].values()]
    assert set(leaves) <= {"", 0}
    # Compact, as the API writes an order: no spaces between the names and values.
    assert json.dumps(skeleton, separators=(",", ":")).encode() == ORDER_SKELETON
