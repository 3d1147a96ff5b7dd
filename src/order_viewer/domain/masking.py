"""The masked view of an order: the delivery's personal fields shortened to what lets a person
recognise a customer (`+97*******00`, `t***@gmail.com`) without disclosing them."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

MASK = "*"
_WORD = re.compile(r"\S+")


def mask_text(value: str, keep_start: int, keep_end: int = 0) -> str:
    """`value` with all but `keep_start` leading and `keep_end` trailing characters masked,
    keeping its length; never more than half of it shown, so a short value is all masks."""
    visible = len(value) // 2
    keep_end = min(keep_end, max(visible - keep_start, 0))
    keep_start = min(keep_start, visible)
    hidden = len(value) - keep_start - keep_end
    return value[:keep_start] + MASK * hidden + value[len(value) - keep_end :]


def mask_words(value: str) -> str:
    """Each word to its first character: `Test Testov` -> `T*** T*****`."""
    return _WORD.sub(lambda word: mask_text(word[0], 1), value)


def mask_phone(value: str) -> str:
    return mask_text(value, 3, 2)


def mask_email(value: str) -> str:
    """The local part to its first character; the domain stays (it says little of a person).
    Without an `@` the whole value is masked as text."""
    local, at, domain = value.rpartition("@")
    if not at or not local:
        return mask_text(value, 1)
    return f"{mask_text(local, 1)}@{domain}"


def mask_zip(value: str) -> str:
    return mask_text(value, 2)


DELIVERY_MASKS: dict[str, Callable[[str], str]] = {
    "name": mask_words,
    "phone": mask_phone,
    "email": mask_email,
    "address": mask_words,
    "city": mask_words,
    "zip": mask_zip,
}


def masked_document(body: bytes) -> bytes:
    """The order JSON with its delivery's personal fields masked; the rest unchanged."""
    order = json.loads(body)
    delivery = order.get("delivery") if isinstance(order, dict) else None
    if isinstance(delivery, dict):
        for field, mask in DELIVERY_MASKS.items():
            value = delivery.get(field)
            if value is not None:
                # Validated orders hold text here; anything else is masked as its text too.
                delivery[field] = mask(value if isinstance(value, str) else json.dumps(value))
    return json.dumps(order, ensure_ascii=False, separators=(",", ":")).encode()
