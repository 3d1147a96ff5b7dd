"""Realistic random orders, valid or broken in a known way, for the emulator and the tests."""

from __future__ import annotations

import copy
import json
import random
import string
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from typing import Any, Final

from order_viewer.domain.model import INT64_MAX, MAX_ITEMS, MAX_PAYMENT_DT, STRING_LIMITS

SAMPLE_ORDER: Final[dict[str, Any]] = json.loads(
    files("order_viewer.entrypoints").joinpath("sample_order.json").read_bytes()
)
"""The sample message of the task; shared, so deep-copy it before changing anything."""

_NAMES = (
    "Test Testov",
    "Иван Петров",
    "Анна-Мария Смирнова",
    "José Álvarez",
    "Zoë Brontë",
    "Øyvind Næss",
    "Nguyễn Thị Ngọc",
    "王小明",
    "佐藤 花子",
    "Amélie 🌸 Poulain",
    "Мария 🙂 Кузнецова",
    "Seán O'Connor-Smith",
)
_CITIES = ("Kiryat Mozkin", "Москва", "Санкт-Петербург", "Zürich", "São Paulo", "東京", "Kraków")
_ADDRESSES = (
    "Ploshad Mira 15",
    "ул. Ленина, д. 7, кв. 12",
    "Rue de l’Église 3",  # noqa: RUF001 - the typographic apostrophe real data has
    "Hauptstraße 5",
    "中山路 88号",
    "221B Baker Street",
)
_REGIONS = ("Kraiot", "Московская область", "Île-de-France", "", "")
_EMAIL_DOMAINS = ("gmail.com", "yandex.ru", "example.org", "почта.рф")
_PRODUCTS = (
    ("Mascaras", "Vivienne Sabo"),
    ("Футболка хлопковая", "Befree"),
    ("Crème hydratante", "L’Oréal"),  # noqa: RUF001 - the typographic apostrophe real data has
    ("无线耳机", "Xiaomi"),
    ("Кроссовки беговые 🏃", "Nike"),
    ("Thermos 0,5 l", "Stanley"),
    ("Gift card", ""),
)
_SIZES = ("0", "", "S", "M", "XL", "42", "44/46")
_CURRENCIES = ("USD", "EUR", "RUB", "KZT", "BYN", "CNY")
_PROVIDERS = ("wbpay", "applepay", "googlepay")
_BANKS = ("alpha", "sber", "tinkoff", "vtb", "")
_LOCALES = ("en", "ru", "kk", "de", "zh-Hans-CN")
_DELIVERY_SERVICES = ("meest", "cdek", "boxberry", "dpd", "wb")
_FIRST_DATE = datetime(2020, 1, 1, tzinfo=UTC)
# Orders of the past six years: none is dated after a test that stamps an order "now".
_DATE_SPAN_SECONDS = 6 * 365 * 24 * 3600


def _hex(rng: random.Random, length: int) -> str:
    return f"{rng.getrandbits(4 * length):0{length}x}"


def _item(rng: random.Random, track_number: str) -> dict[str, Any]:
    name, brand = rng.choice(_PRODUCTS)
    price = rng.randint(100, 500_000)
    sale = rng.choice((0, 0, 10, 25, 30, 50, 70))
    return {
        "chrt_id": rng.randrange(10**6, 10**8),
        "track_number": track_number,
        "price": price,
        "rid": _hex(rng, 21),
        "name": name,
        "sale": sale,
        "size": rng.choice(_SIZES),
        "total_price": price * (100 - sale) // 100,
        "nm_id": rng.randrange(10**6, 10**8),
        "brand": brand,
        "status": rng.choice((200, 202, 300)),
    }


def make_order(
    rng: random.Random, order_uid: str | None = None, item_count: int | None = None
) -> dict[str, Any]:
    """A valid order with consistent totals, built only from rng, so a seed replays it; with
    1 to 5 items unless `item_count` says how many."""
    uid = order_uid if order_uid is not None else _hex(rng, 20)
    track_number = "WBIL" + "".join(rng.choices(string.ascii_uppercase + string.digits, k=10))
    created = _FIRST_DATE + timedelta(seconds=rng.randrange(_DATE_SPAN_SECONDS))
    count = item_count if item_count is not None else rng.randint(1, 5)
    items = [_item(rng, track_number) for _ in range(count)]
    goods_total = sum(item["total_price"] for item in items)
    delivery_cost = rng.choice((0, 500, 1500, 30_000))
    custom_fee = rng.choice((0, 0, 0, 100))
    login = f"user{rng.randrange(10**6)}"
    return {
        "order_uid": uid,
        "track_number": track_number,
        "entry": "WBIL",
        "delivery": {
            "name": rng.choice(_NAMES),
            "phone": rng.choice(("+7", "+972", "+49")) + str(rng.randrange(10**9, 10**10)),
            "zip": rng.choice((str(rng.randrange(100_000, 1_000_000)), "")),
            "city": rng.choice(_CITIES),
            "address": rng.choice(_ADDRESSES),
            "region": rng.choice(_REGIONS),
            "email": rng.choice((f"{login}@{rng.choice(_EMAIL_DOMAINS)}", "")),
        },
        "payment": {
            "transaction": uid,
            "request_id": rng.choice(("", "", _hex(rng, 32))),
            "currency": rng.choice(_CURRENCIES),
            "provider": rng.choice(_PROVIDERS),
            "amount": goods_total + delivery_cost + custom_fee,
            "payment_dt": int(created.timestamp()) - rng.randrange(600),
            "bank": rng.choice(_BANKS),
            "delivery_cost": delivery_cost,
            "goods_total": goods_total,
            "custom_fee": custom_fee,
        },
        "items": items,
        "locale": rng.choice(_LOCALES),
        "internal_signature": rng.choice(("", "", _hex(rng, 40))),
        "customer_id": login,
        "delivery_service": rng.choice(_DELIVERY_SERVICES),
        "shardkey": str(rng.randrange(10)),
        "sm_id": rng.randrange(1, 1000),
        "date_created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "oof_shard": str(rng.randrange(10)),
    }


def encode(order: dict[str, Any]) -> bytes:
    return json.dumps(order, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


Path = tuple[str | int, ...]


def _walk(value: Any, prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
    children = value.items() if isinstance(value, dict) else enumerate(value)
    for key, child in children:
        yield (*prefix, key), child
        if isinstance(child, dict | list):
            yield from _walk(child, (*prefix, key))


def _paths(order: dict[str, Any], wanted: Callable[[Path, Any], bool]) -> list[Path]:
    return [path for path, value in _walk(order) if wanted(path, value)]


def _parent(order: dict[str, Any], path: Path) -> Any:
    parent: Any = order
    for key in path[:-1]:
        parent = parent[key]
    return parent


def _replace(order: dict[str, Any], path: Path, value: Any) -> bytes:
    _parent(order, path)[path[-1]] = value
    return encode(order)


def _limit_key(path: Path) -> str:
    return ".".join("*" if isinstance(part, int) else part for part in path)


def _is_int(_path: Path, value: Any) -> bool:
    return isinstance(value, int)


def _is_str(_path: Path, value: Any) -> bool:
    return isinstance(value, str)


def _with_marker(rng: random.Random, order: dict[str, Any], replacement: bytes) -> bytes:
    """Encodes the order with `replacement` spliced raw into one string, bypassing json.dumps."""
    marker = _hex(rng, 32)
    path = rng.choice(_paths(order, _is_str))
    value = _parent(order, path)[path[-1]]
    cut = rng.randint(0, len(value))
    return _replace(order, path, value[:cut] + marker + value[cut:]).replace(
        marker.encode(), replacement
    )


def _empty(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    return b"", "empty_value"


def _invalid_utf8(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    # A stray byte, a lone lead byte, an encoded surrogate, an overlong "/", a cut 3-byte
    # sequence, and Latin-1 text from a producer that ignored the encoding.
    bad = rng.choice((b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\xc0\xaf", b"\xe2\x82", b"Jos\xe9"))
    return _with_marker(rng, order, bad), "invalid_utf8"


def _not_json(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    text = rng.choice(
        (b"order", b"{order_uid: 1}", b"{'order_uid': 'x'}", b"<order/>", b'{"a":1,}', b"{}}")
    )
    return text, "invalid_json"


def _two_documents(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    return encode(order) + b"\n" + encode(order), "invalid_json"


def _truncated(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    # Cut the text, not the bytes: a cut inside a multi-byte character would be invalid_utf8.
    text = encode(order).decode("utf-8")
    return text[: rng.randrange(1, len(text))].encode("utf-8"), "invalid_json"


def _byte_order_mark(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    return b"\xef\xbb\xbf" + encode(order), "invalid_json"


def _lone_surrogate(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    return _with_marker(rng, order, rng.choice((b"\\ud800", b"\\udfff"))), "invalid_json"


def _raw_control_character(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    # JSON strings may hold control characters only escaped; a raw NUL byte is one of them.
    return _with_marker(rng, order, bytes([rng.randrange(0x20)])), "invalid_json"


def _deep_nesting(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    depth = rng.randint(256, 10_000)
    extra = b'"extra":' + b"[" * depth + b"]" * depth + b","
    return b"{" + extra + encode(order)[1:], "invalid_json"


def _not_an_object(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    value = rng.choice(([order], 42, 3.5, "order", None, True))
    return json.dumps(value).encode(), "not_an_object"


def _missing_field(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    path = rng.choice(_paths(order, lambda path, _value: isinstance(path[-1], str)))
    del _parent(order, path)[path[-1]]
    return encode(order), "missing_field"


def _wrong_type(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    path, value = rng.choice(list(_walk(order)))
    if isinstance(value, int):
        replacement: Any = rng.choice((str(value), value == 0, None, [value], {"v": value}))
    elif isinstance(value, str):
        replacement = rng.choice((len(value), True, None, [value], {"v": value}))
    elif isinstance(value, dict):
        replacement = rng.choice(("object", [value], None, 1, False))
    else:
        replacement = rng.choice(({"0": value[0]}, "items", None, 1, True))
    return _replace(order, path, replacement), "wrong_type"


def _float_for_int(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    path = rng.choice(_paths(order, _is_int))
    value = _parent(order, path)[path[-1]]
    return _replace(order, path, rng.choice((float(value), value + 0.5))), "wrong_type"


def _negative_number(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    path = rng.choice(_paths(order, _is_int))
    return _replace(order, path, -rng.randint(1, 10**12)), "out_of_range"


def _beyond_64_bits(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    path = rng.choice(_paths(order, _is_int))
    value = rng.choice((INT64_MAX + 1, 2**64, 10**30, -(2**63) - 1))
    return _replace(order, path, value), "out_of_range"


def _sale_above_100(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    path = ("items", rng.randrange(len(order["items"])), "sale")
    return _replace(order, path, rng.randint(101, 10_000)), "out_of_range"


def _payment_dt_after_9999(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    value = MAX_PAYMENT_DT + rng.randint(1, 10**9)
    return _replace(order, ("payment", "payment_dt"), value), "out_of_range"


def _date_beyond_utc(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    # Valid RFC 3339, but the UTC moment falls outside years 1-9999.
    value = rng.choice(("9999-12-31T23:30:00-01:00", "0001-01-01T00:30:00+01:00"))
    return _replace(order, ("date_created",), value), "out_of_range"


def _bad_order_uid(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    # "uid\n" catches a `$` that also matches before a final newline (Python's re).
    value = rng.choice(("b563 feb7", "заказ-1", "a/b", "a.b", "uid\n", "ü", "1+1"))
    return _replace(order, ("order_uid",), value), "invalid_format"


def _bad_currency(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    # The Cyrillic abbreviation is on purpose: letters, but not ASCII capitals.
    value = rng.choice(("usd", "US", "USDT", "$", "руб", "U1D", " USD", ""))  # noqa: RUF001
    return _replace(order, ("payment", "currency"), value), "invalid_format"


def _bad_date(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    value = rng.choice(
        (
            "2021-11-26T06:22:19",
            "2021-11-26 06:22:19Z",
            "2021-11-26",
            "26.11.2021 06:22:19",
            "1637907727",
            "2021-13-26T06:22:19Z",
            "2021-02-30T06:22:19Z",
            "2021-11-26T24:00:00Z",
            "2021-11-26T06:22:60Z",
            "2021-11-26T06:22:19+0300",
            "2021-11-26T06:22Z",
            "0000-01-01T00:00:00Z",
            "",
        )
    )
    return _replace(order, ("date_created",), value), "invalid_format"


def _no_items(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    return _replace(order, ("items",), []), "invalid_length"


def _too_many_items(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    count = rng.randint(MAX_ITEMS + 1, MAX_ITEMS + 100)
    items = [order["items"][i % len(order["items"])] for i in range(count)]
    return _replace(order, ("items",), items), "invalid_length"


def _too_long_string(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    path = rng.choice(_paths(order, lambda path, _value: _limit_key(path) in STRING_LIMITS))
    longest = STRING_LIMITS[_limit_key(path)][1]
    # Lengths count code points, so a multi-byte character counts once.
    value = rng.choice("aЖé中🙂") * (longest + rng.randint(1, 100))
    return _replace(order, path, value), "invalid_length"


def _empty_required_string(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    path = rng.choice(
        _paths(order, lambda path, _value: STRING_LIMITS.get(_limit_key(path), (0, 0))[0] > 0)
    )
    return _replace(order, path, ""), "invalid_length"


def _nul_character(rng: random.Random, order: dict[str, Any]) -> tuple[bytes, str]:
    path = rng.choice(_paths(order, _is_str))
    value = _parent(order, path)[path[-1]]
    cut = rng.randint(0, len(value))
    return _replace(order, path, value[:cut] + "\x00" + value[cut:]), "nul_character"


_BREAKERS: Final[dict[str, Callable[[random.Random, dict[str, Any]], tuple[bytes, str]]]] = {
    "empty": _empty,
    "invalid_utf8": _invalid_utf8,
    "not_json": _not_json,
    "two_documents": _two_documents,
    "truncated": _truncated,
    "byte_order_mark": _byte_order_mark,
    "lone_surrogate": _lone_surrogate,
    "raw_control_character": _raw_control_character,
    "deep_nesting": _deep_nesting,
    "not_an_object": _not_an_object,
    "missing_field": _missing_field,
    "wrong_type": _wrong_type,
    "float_for_int": _float_for_int,
    "negative_number": _negative_number,
    "beyond_64_bits": _beyond_64_bits,
    "sale_above_100": _sale_above_100,
    "payment_dt_after_9999": _payment_dt_after_9999,
    "date_beyond_utc": _date_beyond_utc,
    "bad_order_uid": _bad_order_uid,
    "bad_currency": _bad_currency,
    "bad_date": _bad_date,
    "no_items": _no_items,
    "too_many_items": _too_many_items,
    "too_long_string": _too_long_string,
    "empty_required_string": _empty_required_string,
    "nul_character": _nul_character,
}
BREAK_KINDS: Final = tuple(_BREAKERS)


def break_order(
    rng: random.Random, order: dict[str, Any], kind: str | None = None
) -> tuple[bytes, str]:
    """(message, the reason code parse_order gives it) for a valid order broken in one way.

    `kind` (one of BREAK_KINDS) picks the way; by default rng does. `order` is not changed.
    """
    breaker = _BREAKERS[kind if kind is not None else rng.choice(BREAK_KINDS)]
    return breaker(rng, copy.deepcopy(order))
