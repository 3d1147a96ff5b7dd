from __future__ import annotations

from order_viewer.consumer import by_size
from order_viewer.service import Message


def message(offset: int, size: int | None) -> Message:
    return Message("orders", 0, offset, b"k", None if size is None else b"x" * size)


def test_batches_are_cut_by_bytes_in_order() -> None:
    messages = [message(0, 40), message(1, 40), message(2, 40), message(3, 100), message(4, 10)]
    batches = by_size(messages, 100)
    assert [[m.offset for m in batch] for batch in batches] == [[0, 1], [2], [3], [4]]


def test_empty_values_and_oversized_messages_still_get_a_batch() -> None:
    messages = [message(0, None), message(1, 0), message(2, 500), message(3, 1)]
    batches = by_size(messages, 100)
    assert [[m.offset for m in batch] for batch in batches] == [[0, 1], [2], [3]]
    assert by_size([], 100) == []
