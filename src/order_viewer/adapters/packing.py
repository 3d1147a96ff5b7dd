"""Order bodies as the caches hold them: each one an LZ4 block compressed against a reference
that whoever unpacks it has at hand again. A whole order is packed against the skeleton of an
order (every field's name, nested and punctuated as the API writes them, without values); a
masked view against the whole body it is a view of, which leaves it little more than the
characters masked.

LZ4 because every cache hit unpacks a body, and LZ4 unpacks one fastest of the codecs measured
(zlib and zstd against the same dictionary packed smaller, but took several times as long);
and a reference different each time, as a masked view's is, costs it nothing to take, where
zstd's Python bindings set up a context for each one. The figures: docs/DESIGN.md, Memory per
cached order.
"""

from __future__ import annotations

from typing import Final

import lz4.block
import msgspec

from order_viewer.domain.model import Order


def _empty(kind: msgspec.inspect.Type) -> object:
    """A value of `kind` without data: a structure keeps its fields' names and nesting."""
    if isinstance(kind, msgspec.inspect.StructType):
        return {field.encode_name: _empty(field.type) for field in kind.fields}
    if isinstance(kind, msgspec.inspect.VarTupleType | msgspec.inspect.ListType):
        return [_empty(kind.item_type)]
    if isinstance(kind, msgspec.inspect.IntType):
        return 0
    return ""


# Made from the model, so that a field added there is in it too, and from no order's data, so
# that what it holds never depends on what was stored. A body must be unpacked against the bytes
# it was packed against: these are the same in every process of one version, and packed bodies
# never leave the process anyway.
ORDER_SKELETON: Final = msgspec.json.encode(_empty(msgspec.inspect.type_info(Order)))


# lz4.block's arguments are given by position, in the order of its C functions (their
# docstrings list them otherwise): given by keyword, they are parsed on a slow path that costs a
# good part of what unpacking a small body does, on every hit. A mistake in the order fails
# tests/unit/test_packing.py, which unpacks against a reference that must be the one used.


def pack(body: bytes, reference: bytes = ORDER_SKELETON) -> bytes:
    """`body` compressed against `reference`, which `unpack` needs again; its length is held in
    the first four bytes. LZ4 uses the last 64 KiB of a longer reference only: a body packed
    against a larger one is still unpacked whole, only less small."""
    # mode, store_size, acceleration, compression (high-compression mode only), return_bytearray
    packed: bytes = lz4.block.compress(body, "default", True, 1, 9, False, reference)
    return packed


def unpack(packed: bytes, reference: bytes = ORDER_SKELETON) -> bytes:
    """The body `pack` was given, from what it returned and the same `reference`."""
    # uncompressed_size (-1: the one `pack` stored), return_bytearray
    body: bytes = lz4.block.decompress(packed, -1, False, reference)
    return body
