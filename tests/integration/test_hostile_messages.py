"""Hostile messages through the real service: the corpus of tests/fixtures/hostile, thousands of
mutated orders, and the throughput of valid orders while hostile ones flow.

The expected outcome of a mutated message comes from `parse_order`: tests/unit/test_model.py
checks the validator against docs/ORDER_FORMAT.md; these tests check that the service, under
volume and end to end, stores exactly what the validator accepts and dead-letters the rest, byte
for byte, with the validator's reason.
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition

from order_viewer.domain.model import (
    INT64_MAX,
    MAX_ITEMS,
    MAX_PAYMENT_DT,
    STRING_LIMITS,
    InvalidOrder,
    order_json,
    parse_order,
)
from order_viewer.entrypoints.generate import SAMPLE_ORDER, break_order, encode, make_order
from tests.audit import stored_count, stored_documents, wait_stored
from tests.conftest import (
    ServiceProcess,
    Stack,
    Topics,
    committed_lag,
    consume_all,
    create_topics,
    metric_value,
    new_topics,
    produce,
    scrape,
    wait_until,
)

pytestmark = pytest.mark.integration

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "hostile"
MANIFEST: dict[str, dict[str, Any]] = json.loads((CORPUS / "MANIFEST.json").read_text("utf-8"))
STORED = "stored"
RSS_LIMIT_MIB = 600
# Corpus values at least this big are sent once per throughput phase, not cycled (see there).
HEAVY_BYTES = 64 * 1024


@dataclass(frozen=True)
class Hostile:
    name: str
    entry: dict[str, Any]
    key: bytes | None
    value: bytes | None

    @property
    def expected(self) -> str:
        return str(self.entry["expected"])


def load(name: str) -> Hostile:
    entry = MANIFEST[name]
    value: bytes | None = None
    if "value" not in entry:  # "value": null is a tombstone, which has no file
        value = (CORPUS / name).read_bytes()
        if entry.get("gzip"):
            value = gzip.decompress(value)
    key = None if entry["key"] is None else str(entry["key"]).encode()
    return Hostile(name, entry, key, value)


STREAMED = [load(name) for name, entry in MANIFEST.items() if "apart" not in entry]
SENT_APART = [name for name, entry in MANIFEST.items() if "apart" in entry]


# --- Helpers ----------------------------------------------------------------------------------


def produce_with(
    stack: Stack, topic: str, messages: list[tuple[bytes | None, bytes | None]], **config: Any
) -> None:
    """`produce` with extra librdkafka settings (size limit, compression)."""
    producer = Producer({"bootstrap.servers": stack.bootstrap_servers, **config})
    errors: list[KafkaError] = []

    def delivered(error: KafkaError | None, _: Message) -> None:
        if error:
            errors.append(error)

    for key, value in messages:
        producer.produce(topic, key=key, value=value, on_delivery=delivered)
    assert producer.flush(60) == 0, "the broker did not take every message"
    assert not errors, errors


def topic_size(stack: Stack, topic: str) -> int:
    """Messages in the topic (sum of its partitions' high watermarks; nothing is compacted)."""
    consumer = Consumer({"bootstrap.servers": stack.bootstrap_servers, "group.id": "sizer"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        )
    finally:
        consumer.close()


def dead_letters(stack: Stack, topics: Topics, expected: int) -> dict[bytes | None, Any]:
    """The dead-letter topic, which must hold exactly `expected` messages, by key."""
    wait_until(
        lambda: topic_size(stack, topics.dead_letters) >= expected,
        120,
        f"{expected} dead letters",
        interval=0.5,
    )
    total = topic_size(stack, topics.dead_letters)
    assert total == expected, f"{total} dead letters for {expected} rejected messages"
    received = consume_all(stack, topics.dead_letters, expected, timeout=120)
    assert len(received) == expected
    by_key = {message.key(): message for message in received}
    assert len(by_key) == expected, "two dead letters share a key: a message was sent twice"
    return by_key


def check_dead_letter(
    message: Any, topics: Topics, value: bytes | None, code: str, field: str | None, what: str
) -> None:
    assert message.value() == value, f"{what}: dead letter is not byte-for-byte the message"
    headers = dict(message.headers() or [])
    assert headers.get("error.code", b"").decode() == code, f"{what}: {headers}"
    actual_field = headers.get("error.field")
    assert (actual_field.decode() if actual_field is not None else None) == field, (
        f"{what}: error.field {actual_field!r}, expected {field!r}"
    )
    assert headers.get("error.message"), what
    assert headers["source.topic"].decode() == topics.orders, what
    assert int(headers["source.partition"]) in range(3), what
    assert int(headers["source.offset"]) >= 0, what


def check_hostile_dead_letter(
    letters: dict[bytes | None, Any], topics: Topics, hostile: Hostile
) -> None:
    """A rejected corpus entry's dead letter: there, byte for byte the message, with the reason
    and field its manifest entry names."""
    assert hostile.key in letters, f"{hostile.name}: no dead letter"
    check_dead_letter(
        letters[hostile.key],
        topics,
        hostile.value,
        hostile.expected,
        hostile.entry["field"],
        hostile.name,
    )


def canonical(value: bytes | None) -> Any:
    """What the service must store for a message the validator accepts, decoded."""
    return json.loads(order_json(parse_order(value)))


def documented_fields(message: dict[str, Any]) -> dict[str, Any]:
    """The documented fields of a decoded message, in the documented order: the canonical JSON
    computed without the service's model (Python's json also keeps a repeated key's last value)."""

    def project(template: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
        projected = {}
        for name, sample in template.items():
            child = value[name]
            if isinstance(sample, dict):
                child = project(sample, child)
            elif isinstance(sample, list):
                child = [project(sample[0], item) for item in child]
            projected[name] = child
        return projected

    return project(SAMPLE_ORDER, message)


def peak_rss_mib(service: ServiceProcess) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    assert service.process is not None
    status = Path(f"/proc/{service.process.pid}/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return kib / 1024


def assert_alive(service: ServiceProcess) -> None:
    assert service.process is not None
    assert service.process.poll() is None, f"the service exited:\n{service.log()[-5000:]}"


def wait_lag_zero(stack: Stack, topics: Topics) -> None:
    wait_until(lambda: committed_lag(stack, topics) == 0, 120, "offsets committed to the end", 0.5)


# --- 1. The corpus ------------------------------------------------------------------------------


def test_corpus_manifest_matches_its_files_and_its_script() -> None:
    files = {path.name for path in CORPUS.iterdir() if path.name.endswith((".msg", ".msg.gz"))}
    listed = {name for name, entry in MANIFEST.items() if "value" not in entry}
    assert files == listed
    assert len({entry["kind"] for entry in MANIFEST.values()}) == len(MANIFEST) >= 40
    keys = [entry["key"] for entry in MANIFEST.values() if entry["key"] is not None]
    assert len(keys) == len(set(keys)), "every corpus message has its own key"
    assert (CORPUS / "empty_value.msg").read_bytes() == b""
    assert MANIFEST["tombstone"]["value"] is None
    for name in files:
        assert (CORPUS / name).stat().st_size < 2_000_000, name
    # The committed files are what make_corpus.py makes (it also checks them against
    # parse_order before writing them).
    spec = importlib.util.spec_from_file_location("make_corpus", CORPUS / "make_corpus.py")
    assert spec is not None
    assert spec.loader is not None
    make_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpus)
    corpus = make_corpus.build()
    assert corpus.entries == MANIFEST
    assert corpus.values == {name: load(name).value for name in MANIFEST}


def test_every_hostile_message_is_dead_lettered_with_its_reason(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    service = start_service()
    rng = random.Random(1201)
    valid: list[dict[str, Any]] = []
    messages: list[tuple[bytes | None, bytes | None]] = []
    for hostile in STREAMED:
        for _ in range(5):
            order = make_order(rng)
            valid.append(order)
            messages.append((order["order_uid"].encode(), encode(order)))
        messages.append((hostile.key, hostile.value))
    produce(stack, topics.orders, messages)

    stored = [hostile for hostile in STREAMED if hostile.expected == STORED]
    rejected = [hostile for hostile in STREAMED if hostile.expected != STORED]
    valid_uids = [order["order_uid"] for order in valid]
    stored_uids = [hostile.entry["order_uid"] for hostile in stored]
    wait_stored(stack, valid_uids + stored_uids, timeout=120)
    wait_lag_zero(stack, topics)

    # Valid orders around the hostile ones: stored exactly.
    assert stored_documents(stack, valid_uids) == {o["order_uid"]: o for o in valid}
    # Hostile but valid messages: stored as the validator reads them, which is what the
    # documented fields of the decoded message say (last value of a repeated key, unknown
    # fields dropped), and served so.
    documents = stored_documents(stack, stored_uids)
    for hostile in stored:
        uid = hostile.entry["order_uid"]
        assert hostile.value is not None
        expected = documented_fields(json.loads(hostile.value))
        assert documents[uid] == expected == canonical(hostile.value), hostile.name
        response = service.get(f"/order/{uid}")
        assert response.status_code == 200, hostile.name
        assert response.json() == expected, hostile.name

    # Every rejected one in the dead-letter topic, byte for byte, with its key and reason.
    letters = dead_letters(stack, topics, len(rejected))
    for hostile in rejected:
        check_hostile_dead_letter(letters, topics, hostile)

    # Nothing hostile reached the database: no row under any id or key the corpus used but the
    # ids of the entries expected to be stored.
    candidates = {f"hostile-{entry['kind']}"[:64] for entry in MANIFEST.values()}
    candidates |= {str(entry["key"]) for entry in MANIFEST.values() if entry["key"] is not None}
    with stack.connect() as connection:
        rows = connection.execute(
            "SELECT order_uid FROM orders WHERE order_uid = ANY(%s)", (sorted(candidates),)
        ).fetchall()
    assert sorted(uid for (uid,) in rows) == sorted(stored_uids)

    assert_alive(service)
    peak = peak_rss_mib(service)
    assert peak < RSS_LIMIT_MIB, f"peak resident memory {peak:.0f} MiB"
    wait_lag_zero(stack, topics)


@pytest.mark.parametrize("name", SENT_APART)
def test_oversized_hostile_message_is_dead_lettered_and_the_service_goes_on(
    name: str, stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    """Corpus entries marked "apart" in the manifest: messages near or above the broker's limit."""
    hostile = load(name)
    service = start_service()
    rng = random.Random(name)
    before, after = make_order(rng), make_order(rng)
    produce_with(
        stack,
        topics.orders,
        [
            (before["order_uid"].encode(), encode(before)),
            (hostile.key, hostile.value),
            (after["order_uid"].encode(), encode(after)),
        ],
        **hostile.entry.get("producer", {}),
    )
    process = service.process
    assert process is not None
    wait_until(
        lambda: process.poll() is not None or topic_size(stack, topics.dead_letters) >= 1,
        60,
        "the dead letter (or the service's exit)",
        interval=0.25,
    )
    assert_alive(service)
    check_hostile_dead_letter(dead_letters(stack, topics, 1), topics, hostile)
    wait_stored(stack, [before["order_uid"], after["order_uid"]], timeout=60)
    wait_lag_zero(stack, topics)
    assert_alive(service)


# --- 2. Mutated orders ----------------------------------------------------------------------------

Path_ = tuple[str | int, ...]
_CHARACTERS = (
    "a", "Z", "9", "-", "_", " ", "Ж", "é", "中", "🙂", "e\u0301", "\x00", "\x01", "\x1f", "\n",
    '"', "\\", "/", "'", "\u2028", "\ufeff", "\uffff", "\ud800",
)  # fmt: skip
_INTEGERS = (
    -1, 0, 1, 100, 101, INT64_MAX, INT64_MAX + 1, -(2**63), -(2**63) - 1, 2**64,
    MAX_PAYMENT_DT, MAX_PAYMENT_DT + 1, 10**30,
)  # fmt: skip


def _encode(order: Any) -> bytes:
    try:
        return encode(order)
    except UnicodeEncodeError:  # a lone surrogate: only its escaped form can be sent
        return json.dumps(order, separators=(",", ":")).encode()


def _walk(value: Any, prefix: Path_ = ()) -> list[tuple[Path_, Any]]:
    found: list[tuple[Path_, Any]] = []
    children = value.items() if isinstance(value, dict) else enumerate(value)
    for key, child in children:
        found.append(((*prefix, key), child))
        if isinstance(child, dict | list):
            found.extend(_walk(child, (*prefix, key)))
    return found


def _parent(order: Any, path: Path_) -> Any:
    for part in path[:-1]:
        order = order[part]
    return order


def _text(rng: random.Random, length: int | None = None) -> str:
    if length is None:
        length = rng.choice((0, 1, 2, 5, 20, rng.randrange(300)))
    return "".join(rng.choice(_CHARACTERS) for _ in range(length))


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 2 else 7)
    if kind == 0:
        return rng.choice(_INTEGERS)
    if kind == 1:
        return rng.randrange(-(10**6), 10**6)
    if kind == 2:
        return rng.choice((0.0, 1.5, -2.25, 1e300, float(rng.randrange(1000))))
    if kind == 3:
        return rng.choice((True, False))
    if kind == 4:
        return None
    if kind in (5, 6):
        return _text(rng)
    if kind == 7:
        return [_json_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {_text(rng, 3): _json_value(rng, depth + 1) for _ in range(rng.randrange(3))}


def _date(rng: random.Random) -> str:
    year = rng.choice((0, 1, 1970, 2021, 2021, 9999, 10000))
    fields = (
        f"{year:04d}-{rng.choice((1, 2, 12, 0, 13)):02d}-{rng.choice((1, 28, 29, 30, 31, 0)):02d}"
        + rng.choice(("T", "T", "t", " "))
        + f"{rng.choice((0, 12, 23, 24)):02d}:{rng.choice((0, 59, 60)):02d}"
        + rng.choice((":00", ":59", ":60", ""))
    )
    fraction = rng.choice(("", "", ".5", ".123456", ".123456789", ".1234567890", ",5"))
    zone = rng.choice(("Z", "Z", "z", "+03:00", "-23:59", "+24:00", "+0300", "", "-01:00"))
    return fields + fraction + zone


def _replace_any(rng: random.Random, order: dict[str, Any]) -> bytes:
    path, _ = rng.choice(_walk(order))
    _parent(order, path)[path[-1]] = _json_value(rng)
    return _encode(order)


def _delete_any(rng: random.Random, order: dict[str, Any]) -> bytes:
    path, _ = rng.choice([(p, v) for p, v in _walk(order) if isinstance(p[-1], str)])
    del _parent(order, path)[path[-1]]
    return _encode(order)


def _edit_string(rng: random.Random, order: dict[str, Any]) -> bytes:
    path, value = rng.choice([(p, v) for p, v in _walk(order) if isinstance(v, str)])
    limit_key = ".".join("*" if isinstance(part, int) else str(part) for part in path)
    shortest, longest = STRING_LIMITS.get(limit_key, (0, 64))
    choice = rng.randrange(5)
    if choice == 0:
        value = ""
    elif choice == 1:  # exactly at, or one over, the bound, in characters of any width
        value = rng.choice("aЖ🙂") * (longest + rng.choice((0, 1)))
    elif choice == 2:
        cut = rng.randrange(len(value) + 1)
        value = value[:cut] + _text(rng, rng.randint(1, 3)) + value[cut:]
    elif choice == 3:
        value = value[: rng.randrange(max(shortest, 1), len(value) + 1)] if value else value
    else:
        value = _text(rng)
    _parent(order, path)[path[-1]] = value
    return _encode(order)


def _edit_integer(rng: random.Random, order: dict[str, Any]) -> bytes:
    path, _ = rng.choice([(p, v) for p, v in _walk(order) if type(v) is int])
    _parent(order, path)[path[-1]] = rng.choice(_INTEGERS)
    return _encode(order)


def _edit_date(rng: random.Random, order: dict[str, Any]) -> bytes:
    order["date_created"] = _date(rng)
    return _encode(order)


def _edit_bytes(rng: random.Random, order: dict[str, Any]) -> bytes:
    data = bytearray(_encode(order))
    at = rng.randrange(len(data))
    choice = rng.randrange(5)
    if choice == 0:
        data[at] ^= 1 << rng.randrange(8)
    elif choice == 1:
        del data[at]
    elif choice == 2:
        data.insert(at, rng.choice(b'\x00\x80\xff{}[],:"\\ 0aZ'))
    elif choice == 3:
        del data[at:]
    else:
        data[at:at] = data[rng.randrange(len(data)) :][: rng.randrange(1, 40)]
    return bytes(data)


def _unknown_field(rng: random.Random, order: dict[str, Any]) -> bytes:
    paths = [()] + [p for p, v in _walk(order) if isinstance(v, dict)]
    target: Any = order
    for part in rng.choice(paths):
        target = target[part]
    target[_text(rng, rng.randint(1, 8))] = _json_value(rng)
    return _encode(order)


def _duplicate_key(rng: random.Random, order: dict[str, Any]) -> bytes:
    name = rng.choice(list(order))
    repeated = _encode({name: rng.choice((_json_value(rng), copy.deepcopy(order[name])))})
    data = _encode(order)
    if rng.random() < 0.5:  # the repeat after the original: it wins
        return data[:-1] + b"," + repeated[1:]
    return repeated[:-1] + b"," + data[1:]  # before it: the original wins


def _items(rng: random.Random, order: dict[str, Any]) -> bytes:
    items = order["items"]
    choice = rng.randrange(4)
    if choice == 0:
        order["items"] = []
    elif choice == 1:
        order["items"] = [items[i % len(items)] for i in range(MAX_ITEMS + rng.choice((0, 1)))]
    elif choice == 2:
        items.insert(rng.randrange(len(items) + 1), _json_value(rng))
    else:
        rng.shuffle(items)
    return _encode(order)


def _broken(rng: random.Random, order: dict[str, Any]) -> bytes:
    return break_order(rng, order)[0]


_MUTATIONS: tuple[tuple[Callable[[random.Random, dict[str, Any]], bytes | None], int], ...] = (
    (_replace_any, 6),
    (_delete_any, 2),
    (_edit_string, 5),
    (_edit_integer, 3),
    (_edit_date, 2),
    (_edit_bytes, 4),
    (_unknown_field, 2),
    (_duplicate_key, 2),
    (_items, 1),
    (_broken, 5),
)


@dataclass(frozen=True)
class Mutated:
    key: bytes
    value: bytes | None
    code: str  # STORED or the reason code
    field: str | None
    uid: str  # the order_uid of the order it was made from (and stored under, if stored)
    document: Any  # the canonical JSON decoded, when stored


def mutated_messages(rng: random.Random, prefix: str, count: int) -> list[Mutated]:
    """`count` messages with unique keys and order_uids: ~20 % valid orders as made, the rest one
    mutation of a valid order each; the outcome of each is what parse_order says of it."""
    functions = [function for function, _ in _MUTATIONS]
    weights = [weight for _, weight in _MUTATIONS]
    messages = []
    for index in range(count):
        uid = f"{prefix}{index:06d}"
        order = make_order(rng, order_uid=uid)
        while True:
            if rng.random() < 0.2:
                value: bytes | None = encode(order)
            elif rng.random() < 0.002:
                value = None  # a tombstone
            else:
                value = rng.choices(functions, weights)[0](rng, json.loads(json.dumps(order)))
            try:
                parsed = parse_order(value)
            except InvalidOrder as invalid:
                code, field = invalid.rejection.code, invalid.rejection.field
                outcome = Mutated(f"k-{uid}".encode(), value, code, field, uid, None)
                break
            # A mutation that leaves a valid order under another id could collide with another
            # message's: try again.
            if parsed.order_uid == uid:
                document = json.loads(order_json(parsed))
                outcome = Mutated(f"k-{uid}".encode(), value, STORED, None, uid, document)
                break
        messages.append(outcome)
    return messages


def test_mutated_valid_orders_are_stored_exactly_or_rejected_with_the_right_code(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    rng = random.Random(20_240_611)
    prefix = f"mut-{uuid.uuid4().hex[:10]}-"
    messages = mutated_messages(rng, prefix, 12_000)
    stored = [m for m in messages if m.code == STORED]
    rejected = [m for m in messages if m.code != STORED]
    codes = {m.code for m in rejected}
    # The mix covers every reason a single message can have (db_rejected is the database's).
    assert codes >= {
        "empty_value", "invalid_utf8", "invalid_json", "not_an_object", "missing_field",
        "wrong_type", "out_of_range", "invalid_format", "invalid_length", "nul_character",
    }, codes  # fmt: skip
    assert "invalid_value" not in codes, [m for m in rejected if m.code == "invalid_value"][:3]
    assert 0.2 <= len(stored) / len(messages) <= 0.5

    service = start_service()
    produce(stack, topics.orders, [(m.key, m.value) for m in messages])
    wait_stored(stack, [m.uid for m in stored], timeout=150)
    wait_lag_zero(stack, topics)
    assert_alive(service)

    # Every valid one stored exactly, under its own id; no rejected one stored at all.
    documents = stored_documents(stack, [m.uid for m in stored])
    assert len(documents) == len(stored)
    wrong = [m.key for m in stored if documents[m.uid] != m.document]
    assert not wrong, f"{len(wrong)} orders stored differently, e.g. {wrong[:3]}"
    assert stored_count(stack, [m.uid for m in rejected]) == 0
    for m in random.Random(5).sample(stored, 100):  # and served so
        assert service.get(f"/order/{m.uid}").json() == m.document, m.uid
    # Every rejected one dead-lettered once, byte for byte, with the validator's reason; the
    # counts add up: stored + dead-lettered = produced.
    letters = dead_letters(stack, topics, len(rejected))
    for m in rejected:
        check_dead_letter(letters[m.key], topics, m.value, m.code, m.field, m.key.decode())
    assert len(documents) + len(letters) == len(messages)


# --- 3. Throughput -----------------------------------------------------------------------------


def write_rate(stack: Stack, uids: list[str]) -> float:
    """Orders stored per second by the service, from the `stored_at` (transaction start) of their
    batches, over the batches between the 10th and the 90th percentile: start-up and the last
    partial batch do not count."""
    with stack.connect() as connection:
        batches: list[tuple[datetime, int]] = connection.execute(
            "SELECT stored_at, count(*) FROM orders WHERE order_uid = ANY(%s) "
            "GROUP BY stored_at ORDER BY stored_at",
            (uids,),
        ).fetchall()
    done, first, last = 0, None, None
    for index, (_, count) in enumerate(batches):
        if first is None and done + count > len(uids) * 0.1:
            first = index
        if done + count > len(uids) * 0.9:
            last = index
            break
        done += count
    assert first is not None, batches
    assert last is not None, batches
    assert last > first, batches
    orders = sum(count for _, count in batches[first:last])
    return orders / (batches[last][0] - batches[first][0]).total_seconds()


def start_on_backlog(
    stack: Stack,
    start_service: Callable[..., ServiceProcess],
    messages: list[tuple[bytes | None, bytes | None]],
    **settings: str,
) -> tuple[ServiceProcess, Topics]:
    """Produce the messages to new topics first, then start a service on them."""
    topics = new_topics()
    # Created as the service would, so that a backlog can be produced before it runs.
    create_topics(stack, [topics.orders, topics.dead_letters], 3)
    produce(stack, topics.orders, messages)
    service = start_service(
        KAFKA_TOPIC=topics.orders,
        KAFKA_DLQ_TOPIC=topics.dead_letters,
        KAFKA_GROUP_ID=topics.group,
        **settings,
    )
    return service, topics


def run_backlog(
    stack: Stack,
    start_service: Callable[..., ServiceProcess],
    messages: list[tuple[bytes | None, bytes | None]],
    valid_uids: list[str],
) -> float:
    """Let a new service drain a backlog of the messages; the rate at which it stored the valid
    orders."""
    service, topics = start_on_backlog(stack, start_service, messages)
    wait_stored(stack, valid_uids, timeout=150)
    rejected = len(messages) - len(valid_uids)
    wait_until(
        lambda: topic_size(stack, topics.dead_letters) >= rejected,
        120,
        f"{rejected} dead letters",
        interval=0.25,
    )
    assert topic_size(stack, topics.dead_letters) == rejected
    assert_alive(service)
    service.terminate()
    return write_rate(stack, valid_uids)


def hostile_stream(rng: random.Random, count: int) -> list[tuple[bytes | None, bytes | None]]:
    """`count` rejected messages: every rejected corpus message of HEAVY_BYTES or more once, then
    the other rejected corpus kinds and break_order's kinds in turn (break_order's messages of
    HEAVY_BYTES or more, its 1,000-plus-item orders, are made again)."""
    corpus = [h for h in STREAMED if h.expected != STORED]
    heavy = [h for h in corpus if h.value is not None and len(h.value) >= HEAVY_BYTES]
    light = [h for h in corpus if h not in heavy]
    stream: list[tuple[bytes | None, bytes | None]] = [(h.key, h.value) for h in heavy]
    index = 0
    while len(stream) < count:
        if index % 2 == 0:
            value: bytes | None = light[(index // 2) % len(light)].value
        else:
            value = break_order(rng, make_order(rng))[0]
            while len(value) >= HEAVY_BYTES:
                value = break_order(rng, make_order(rng))[0]
        stream.append((f"hostile-{index}-{uuid.uuid4().hex[:8]}".encode(), value))
        index += 1
    rng.shuffle(stream)
    return stream


@pytest.mark.perf
def test_valid_orders_keep_at_least_half_their_rate_alongside_hostile_messages(
    stack: Stack, start_service: Callable[..., ServiceProcess]
) -> None:
    """The same number of valid orders, alone and with one rejected message per five valid ones,
    each phase a backlog that a fresh service drains (several seconds each).

    The phases run alone, mixed, mixed, alone, and each kind keeps its better run: other work on
    the machine (and the growing tables) then weigh on both kinds alike. The rejected messages
    are the corpus's and break_order's; those of HEAVY_BYTES or more (900 KiB, ~1 MB of items,
    100,000 empty items, 1,001 items, ...) are sent once per phase rather than cycled, because a
    message's own cost is its size, which any consumer must read and copy to the dead-letter
    topic: cycling them would measure bandwidth, not how the service copes with bad messages.
    """
    rng = random.Random(4242)
    count = 20_000
    rates: dict[str, list[float]] = {"alone": [], "mixed": []}
    for phase in ("alone", "mixed", "mixed", "alone"):
        orders = [make_order(rng) for _ in range(count)]
        hostile = hostile_stream(rng, count // 5) if phase == "mixed" else []
        messages: list[tuple[bytes | None, bytes | None]] = []
        for index, order in enumerate(orders):
            messages.append((order["order_uid"].encode(), encode(order)))
            if index % 5 == 4 and hostile:
                messages.append(hostile.pop())
        messages.extend(hostile)
        uids = [order["order_uid"] for order in orders]
        rates[phase].append(run_backlog(stack, start_service, messages, uids))

    alone, mixed = max(rates["alone"]), max(rates["mixed"])
    print(f"valid orders/s alone {rates['alone']}, alongside rejected messages {rates['mixed']}")
    assert mixed >= alone / 2, (
        f"valid orders stored at {mixed:.0f}/s alongside rejected messages, "
        f"less than half of {alone:.0f}/s alone (runs: {rates})"
    )


# --- 4. Memory ---------------------------------------------------------------------------------


@pytest.mark.perf
def test_a_backlog_of_the_largest_valid_orders_keeps_memory_bounded(
    stack: Stack, start_service: Callable[..., ServiceProcess]
) -> None:
    """1,000 valid orders of MAX_ITEMS items (about 215 KB a message) waiting when the service
    starts. Validated, an order takes several times the bytes of its message, and two batches are
    held at once (one written while the next is validated): batches are cut by bytes and the
    consumer reads ahead only as far as two batches, or such a backlog takes memory without
    bound. The cache, bounded by bytes as well as by count, holds at most CACHE_MAX_BYTES of
    them, and whatever warm-up found in the database of the earlier tests."""
    rng = random.Random(1000)
    samples: dict[str, dict[str, Any]] = {}
    messages: list[tuple[bytes | None, bytes | None]] = []
    for index in range(1000):
        order = make_order(rng, item_count=MAX_ITEMS)
        messages.append((order["order_uid"].encode(), encode(order)))
        if index % 100 == 0:
            samples[order["order_uid"]] = order
    uids = [key.decode() for key, _ in messages if key is not None]
    megabytes = sum(len(value or b"") for _, value in messages) / 1e6
    service, _ = start_on_backlog(
        stack, start_service, messages, CACHE_MAX_BYTES=str(64 * 1024 * 1024)
    )
    del messages
    wait_stored(stack, uids, timeout=180)
    assert_alive(service)
    peak = peak_rss_mib(service)
    print(f"\n1,000 orders of {MAX_ITEMS:,} items ({megabytes:.0f} MB): peak RSS {peak:.0f} MiB")
    assert stored_documents(stack, list(samples)) == samples
    cached = metric_value(scrape(service), "order_viewer_cache_bytes")
    assert 60 * 1024 * 1024 < cached <= 64 * 1024 * 1024, cached
    assert peak < RSS_LIMIT_MIB, f"peak resident memory {peak:.0f} MiB"
