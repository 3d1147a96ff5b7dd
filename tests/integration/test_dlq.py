"""`order-viewer dlq stats` and `replay` against the real broker: counts and selections over
hand-made dead letters (hostile ones included), and dead letters fixed after the fact stored
exactly once by a running service."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient

from order_viewer.adapters.kafka.consumer import REPLAYED_FROM
from order_viewer.config import Settings
from order_viewer.entrypoints import dlq
from order_viewer.entrypoints.generate import encode, make_order
from tests.conftest import (
    ORDER_VIEWER,
    Record,
    ServiceProcess,
    Stack,
    Topics,
    create_topics,
    metric_value,
    produce,
    read_topic,
    scrape,
    wait_until,
)

pytestmark = pytest.mark.integration

# The dead letters' time stamps: a day ago, on the hour. Records stamped beyond the broker's
# retention (7 days) are deleted at its next retention check, which comes at any moment of a
# test: a fixed date in the past made the letters vanish from under a test now and then.
T0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=1)


def settings_for(stack: Stack, topics: Topics) -> Settings:
    return Settings(
        _env_file=None,
        kafka_bootstrap_servers=stack.bootstrap_servers,
        kafka_topic=topics.orders,
        kafka_dlq_topic=topics.dead_letters,
        kafka_group_id=topics.group,
    )


Headers = list[tuple[str, str | bytes | None]]


def write_dead_letters(stack: Stack, topics: Topics, letters: list[dict[str, Any]]) -> None:
    """The letters on new topics of two partitions, at their times (partition 0 unless given);
    those with headers name their original, written to the orders topic's partition 0."""
    create_topics(stack, [topics.orders, topics.dead_letters], 2)
    produce(
        stack,
        topics.orders,
        [Record(letter.get("key"), letter.get("value"), partition=0) for letter in letters],
    )
    records = [
        Record(
            letter.get("key"),
            letter.get("value"),
            None
            if letter.get("headers") is None
            else [*letter["headers"], *source(topics.orders, 0, original, None)],
            int(letter["at"].timestamp() * 1000),
            letter.get("partition", 0),
        )
        for original, letter in enumerate(letters)
    ]
    produce(stack, topics.dead_letters, records)


def headers(code: bytes) -> Headers:
    return [("error.code", code), ("error.message", b"why")]


def source(topic: str, partition: int, offset: int, code: bytes | None) -> Headers:
    """The headers the service writes on a dead letter of the record at topic/partition/offset
    (without a code: the `source.*` ones only)."""
    return [
        *([] if code is None else headers(code)),
        ("source.topic", topic.encode()),
        ("source.partition", str(partition).encode()),
        ("source.offset", str(offset).encode()),
    ]


HAND_MADE: list[dict[str, Any]] = [
    {"key": b"a", "value": b"{", "headers": headers(b"invalid_json"), "at": T0},
    {
        "key": b"b", "value": b"[]", "headers": headers(b"not_an_object"),
        "at": T0 + timedelta(hours=1), "partition": 1,
    },
    {
        "key": b"c", "value": b"{}", "headers": headers(b"invalid_json"),
        "at": T0 + timedelta(hours=2),
    },
    # Not written by the service: no headers at all, and no value either.
    {"key": None, "value": None, "headers": None, "at": T0 + timedelta(hours=3)},
    # Its value was too large to keep: sent back it would be a tombstone.
    {
        "key": b"d", "value": None,
        "headers": [*headers(b"invalid_json"), ("error.value_dropped", b"9 bytes, too large")],
        "at": T0 + timedelta(hours=4),
    },
    # A reason that is not UTF-8.
    {
        "key": b"e", "value": b"x", "headers": [("error.code", b"\xff\xfe")],
        "at": T0 + timedelta(hours=5),
    },
]  # fmt: skip


def test_stats_count_by_reason_with_first_and_last_time(stack: Stack, topics: Topics) -> None:
    write_dead_letters(stack, topics, HAND_MADE)
    by_reason = dlq.stats(settings_for(stack, topics), interactive=False)
    counts = {reason: (s.count, s.first, s.last) for reason, s in by_reason.items()}
    assert counts == {
        "invalid_json": (3, T0, T0 + timedelta(hours=4)),
        "not_an_object": (1, T0 + timedelta(hours=1), T0 + timedelta(hours=1)),
        dlq.NO_REASON: (1, T0 + timedelta(hours=3), T0 + timedelta(hours=3)),
        "\ufffd\ufffd": (1, T0 + timedelta(hours=5), T0 + timedelta(hours=5)),
    }


def replayed(stack: Stack, topics: Topics, enough: int, timeout: float) -> list[Any]:
    """The messages a replay sent to the orders topic (those with a `replayed.from` header), read
    until more than `enough` of them came or `timeout` passed."""

    def sent(read: list[Any]) -> list[Any]:
        return [m for m in read if m.headers() and REPLAYED_FROM in dict(m.headers())]

    return sent(read_topic(stack, topics.orders, lambda read: len(sent(read)) > enough, timeout))


def test_replay_sends_the_selection_only_with_where_it_came_from(
    stack: Stack, topics: Topics
) -> None:
    write_dead_letters(stack, topics, HAND_MADE)
    settings = settings_for(stack, topics)

    def run(selection: dlq.Selection, dry_run: bool = False) -> dlq.ReplaySummary:
        return dlq.replay(
            settings, selection, dry_run=dry_run, send_unverified=False, interactive=False
        )

    everything = run(dlq.Selection(), dry_run=True)
    assert (everything.selected, everything.sent) == (6, 0)
    assert everything.skipped == {"no error.code header": 1, "value not kept": 1}
    window = run(dlq.Selection(None, T0 + timedelta(hours=1), T0 + timedelta(hours=3)), True)
    assert window.selected == 2
    assert window.read == 2  # each partition read from the range's start to its end only
    assert run(dlq.Selection(None, T0 + timedelta(hours=9)), True).read == 0
    assert run(dlq.Selection(None, None, T0 - timedelta(hours=1)), True).read == 0
    assert run(dlq.Selection(None, T0 + timedelta(hours=5)), True).read == 1
    assert replayed(stack, topics, 0, timeout=3) == []  # dry runs sent none

    summary = run(dlq.Selection("invalid_json"))
    assert (summary.selected, summary.sent, summary.failed) == (3, 2, 0)
    # Read until a third came or 5 s passed: a filtered replay sends only its reason.
    sent = replayed(stack, topics, 2, timeout=5)
    assert sorted((m.key(), m.value()) for m in sent) == [(b"a", b"{"), (b"c", b"{}")]
    origins = sorted(dict(m.headers())["replayed.from"] for m in sent)
    assert origins == [f"{topics.dead_letters}/0/0".encode(), f"{topics.dead_letters}/0/1".encode()]


def command_env(stack: Stack, topics: Topics) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers,
        "KAFKA_TOPIC": topics.orders,
        "KAFKA_DLQ_TOPIC": topics.dead_letters,
        "PATH": "/usr/bin:/bin",
    }


def test_a_record_written_straight_to_the_dead_letter_topic_is_not_replayed(
    stack: Stack, topics: Topics
) -> None:
    """Whoever can write the dead-letter topic could have any order stored by writing it there
    with an `error.code` header, even naming a real record's coordinates: replay sends back
    only dead letters whose original is still in the orders topic with their key and value."""
    create_topics(stack, [topics.orders, topics.dead_letters], 2)
    produce(
        stack, topics.orders, [Record(b"a", b"{", partition=0), Record(b"b", b"[]", partition=1)]
    )
    forged = encode(make_order(random.Random(21)))
    produce(
        stack,
        topics.dead_letters,
        [
            Record(b"a", b"{", source(topics.orders, 0, 0, b"invalid_json")),
            Record(b"b", b"[]", source(topics.orders, 1, 0, b"not_an_object")),
            Record(b"x", forged, [("error.code", b"db_rejected")]),
            Record(b"a", forged, source(topics.orders, 0, 0, b"db_rejected")),
        ],
    )

    def replay(*arguments: str) -> str:
        result = subprocess.run(
            [str(ORDER_VIEWER), "dlq", "replay", *arguments], env=command_env(stack, topics),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert (result.returncode, result.stderr) == (0, "")
        return result.stdout

    def in_orders(count: int) -> list[tuple[bytes, bytes]]:
        # The command returns once the broker acknowledged what it sent: all of it is there.
        read = read_topic(stack, topics.orders, lambda read: len(read) > count, timeout=5)
        return sorted((m.key(), m.value()) for m in read)

    summary = replay()
    assert summary.startswith(f"4 dead letters selected; sent 2 to {topics.orders} in ")
    assert summary.endswith(
        "; unverified: 2 skipped (1 key or value differ from the original, "
        "1 source headers missing or malformed); skipped: none; 0 failed\n"
    )
    assert in_orders(4) == [(b"a", b"{"), (b"a", b"{"), (b"b", b"[]"), (b"b", b"[]")]

    # Sent when the operator says so, and counted as such.
    summary = replay("--unverified", "--reason", "db_rejected")
    assert summary.startswith(f"2 dead letters selected; sent 2 to {topics.orders} in ")
    assert summary.endswith(
        "; unverified: 2 sent (1 key or value differ from the original, "
        "1 source headers missing or malformed); skipped: none; 0 failed\n"
    )
    assert in_orders(6) == sorted(
        [(b"a", b"{"), (b"a", b"{"), (b"b", b"[]"), (b"b", b"[]"), (b"x", forged), (b"a", forged)]
    )


def forged_source(**named: bytes | list[bytes]) -> Headers:
    """A dead letter's headers with the `source.*` ones given (a list: that header repeated)."""
    pairs: Headers = [("error.code", b"invalid_json")]
    for name, values in named.items():
        for value in values if isinstance(values, list) else [values]:
            pairs.append((f"source.{name}", value))
    return pairs


def test_replay_sends_back_only_dead_letters_whose_original_is_there_as_they_have_it(
    stack: Stack, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    create_topics(stack, [topics.orders, topics.dead_letters], 2)
    # Partition 0 long enough that the look-up seeks over the gap between its originals;
    # partition 1's first record removed, as retention would.
    produce(
        stack,
        topics.orders,
        [Record(b"k%d" % i, b"v%d" % i, partition=0) for i in range(1200)]
        + [Record(b"p1-0", b"gone", partition=1), Record(b"p1-1", b"kept", partition=1)],
    )
    admin = AdminClient({"bootstrap.servers": stack.bootstrap_servers})
    for future in admin.delete_records([TopicPartition(topics.orders, 1, 1)]).values():
        future.result()
    orders = topics.orders.encode()

    def naming(partition: bytes, offset: bytes) -> Headers:
        return forged_source(topic=orders, partition=partition, offset=offset)

    genuine = [
        Record(b"k0", b"v0", naming(b"0", b"0")),
        Record(b"k1100", b"v1100", naming(b"0", b"1100")),
        # The same message dead-lettered twice (delivered again after a crash): both genuine.
        Record(b"k1100", b"v1100", naming(b"0", b"1100")),
        Record(b"p1-1", b"kept", naming(b"1", b"1")),
    ]
    malformed = [
        *(
            Record(b"k3", b"v3", naming(b"0", offset))
            for offset in [
                b"-1", b"+3", b" 3", b"3 ", b"03", b"3_0", "\u0663".encode(), b"0x3", b"3e0",
                b"", b"9223372036854775808", b"99999999999999999999", b"9" * 5000,
            ]
        ),
        *(
            Record(b"k3", b"v3", naming(partition, b"3"))
            for partition in [b"-1", b"2147483648", b"00", b"0.0"]
        ),
        Record(b"k3", b"v3", [("error.code", b"invalid_json")]),
        Record(b"k3", b"v3", forged_source(partition=b"0", offset=b"3")),
        Record(b"k3", b"v3", forged_source(topic=orders, partition=b"0", offset=[b"3", b"3"])),
        Record(b"k3", b"v3", forged_source(topic=[orders, orders], partition=b"0", offset=b"3")),
    ]  # fmt: skip
    elsewhere = [
        Record(b"k3", b"v3", forged_source(topic=b"other", partition=b"0", offset=b"3")),
        Record(b"k3", b"v3", forged_source(topic=orders + b" ", partition=b"0", offset=b"3")),
        Record(b"k3", b"v3", forged_source(
            topic=topics.dead_letters.encode(), partition=b"0", offset=b"0"
        )),
    ]  # fmt: skip
    missing = [
        Record(b"k3", b"v3", naming(b"0", b"1200")),  # the partition's end
        Record(b"k3", b"v3", naming(b"0", b"1000000000000")),
        Record(b"k3", b"v3", naming(b"2", b"0")),  # no such partition
    ]
    removed = [Record(b"p1-0", b"gone", naming(b"1", b"0"))]
    forged = [
        Record(b"k5", b"forged", naming(b"0", b"5")),
        Record(b"other", b"v6", naming(b"0", b"6")),
        Record(b"k7", None, naming(b"0", b"7")),  # a tombstone would delete the order
        Record(None, b"v8", naming(b"0", b"8")),
    ]
    letters = [*missing, *genuine[:2], *forged, *malformed, *genuine[2:], *elsewhere, *removed]
    produce(stack, topics.dead_letters, [replace(r, partition=0) for r in letters])
    # Look-ups of three letters: a partition a look-up finished and paused is read by the next.
    monkeypatch.setattr(dlq, "LOOKUP_LETTERS", 3)
    settings = settings_for(stack, topics)
    expected_unverified = {
        dlq.NO_SOURCE: len(malformed),
        dlq.OTHER_TOPIC: len(elsewhere),
        dlq.ORIGINAL_MISSING: len(missing),
        dlq.ORIGINAL_REMOVED: len(removed),
        dlq.NOT_THE_ORIGINAL: len(forged),
    }

    def run(dry_run: bool, send_unverified: bool = False) -> dlq.ReplaySummary:
        summary = dlq.replay(
            settings, dlq.Selection(), dry_run=dry_run, send_unverified=send_unverified,
            interactive=False,
        )  # fmt: skip
        assert summary.selected == len(letters)
        assert summary.unverified == expected_unverified
        assert not summary.skipped
        assert summary.failed == 0
        return summary

    assert (run(dry_run=True).sendable, run(dry_run=True, send_unverified=True).sendable) == (
        len(genuine),
        len(letters),
    )
    assert replayed(stack, topics, 0, timeout=3) == []  # the dry runs sent nothing
    assert run(dry_run=False).sent == len(genuine)
    sent = replayed(stack, topics, len(genuine), timeout=5)
    assert sorted((m.key(), m.value()) for m in sent) == sorted((r.key, r.value) for r in genuine)
    assert sorted(dict(m.headers())["replayed.from"] for m in sent) == sorted(
        f"{topics.dead_letters}/0/{offset}".encode()
        for offset, letter in enumerate(letters)
        if any(letter is g for g in genuine)
    )


def test_a_dead_letter_naming_an_order_changed_or_deleted_since_is_not_replayed(
    stack: Stack, topics: Topics
) -> None:
    """Whoever can write the dead-letter topic could name any earlier record of the orders
    topic, one stored and replaced since or deleted since: sent back, it would replace the
    order's later version, or store a deleted order again. A dead letter is sent back only
    while the last record of its key has its value."""
    create_topics(stack, [topics.orders, topics.dead_letters], 2)
    produce(
        stack,
        topics.orders,
        [
            Record(key, value, partition=0)
            for key, value in [
                (b"a", b"a1"), (b"a", b"a2"),  # a stored, then replaced
                (b"b", b"b1"), (b"b", None),  # b stored, then deleted
                (b"c", b"c1"),  # c refused, and last of its key
                (b"d", b"d1"), (b"d", b"d2"), (b"d", b"d1"),  # d back to what it was
            ]
        ],
    )  # fmt: skip
    produce(
        stack,
        topics.dead_letters,
        [
            Record(key, value, source(topics.orders, 0, offset, b"db_rejected"))
            for key, value, offset in [(b"a", b"a1", 0), (b"b", b"b1", 2), (b"c", b"c1", 4),
                                       (b"d", b"d1", 5)]
        ],
    )  # fmt: skip

    summary = dlq.replay(
        settings_for(stack, topics),
        dlq.Selection(),
        dry_run=False,
        send_unverified=False,
        interactive=False,
    )
    assert (summary.selected, summary.sendable, summary.sent) == (4, 2, 2)
    assert summary.unverified == {dlq.SUPERSEDED: 2}
    sent = replayed(stack, topics, 2, timeout=5)
    assert sorted((m.key(), m.value()) for m in sent) == [(b"c", b"c1"), (b"d", b"d1")]


def test_the_commands_say_when_the_dead_letter_topic_is_missing(
    stack: Stack, topics: Topics
) -> None:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers,
        "KAFKA_DLQ_TOPIC": topics.dead_letters,
        "PATH": "/usr/bin:/bin",
    }
    for command in (["stats"], ["replay", "--dry-run"]):
        result = subprocess.run(
            [str(ORDER_VIEWER), "dlq", *command], env=env, capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 1
        assert result.stderr == (
            f"order-viewer: the dead-letter topic {topics.dead_letters} does not exist\n"
        )


def test_fixed_dead_letters_are_stored_exactly_once_however_often_replayed(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    rng = random.Random(3003)
    refused = [make_order(rng) for _ in range(3)]
    for order in refused:
        order["delivery"]["name"] = "Refused For Now"
    kept = make_order(rng)
    with stack.connect() as connection:
        # A rule the validator does not know: the database refuses these orders for now.
        connection.execute(
            "ALTER TABLE delivery ADD CONSTRAINT refused_for_now CHECK (name <> 'Refused For Now')"
        )
    try:
        service = start_service(KAFKA_SESSION_TIMEOUT_MS="6000")
        produce(
            stack,
            topics.orders,
            [
                *((o["order_uid"].encode(), encode(o)) for o in [kept, *refused]),
                (kept["order_uid"].encode(), None),  # a tombstone, dead-lettered by default
                (b"broken", b"{"),
            ],
        )
        wait_until(
            lambda: (
                sum(
                    metric_value(
                        scrape(service), "order_viewer_messages_dead_lettered_total", reason=r
                    )
                    for r in ("db_rejected", "empty_value", "invalid_json")
                )
                == 5
            ),
            60,
            "five dead letters",
        )
    finally:
        with stack.connect() as connection:
            connection.execute("ALTER TABLE delivery DROP CONSTRAINT refused_for_now")
    stored_before = metric_value(scrape(service), "order_viewer_orders_stored_total")
    assert stored_before == 1

    result = subprocess.run(
        [str(ORDER_VIEWER), "dlq", "stats"], env=service.env, capture_output=True, text=True,
        timeout=60, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines[1:-1]] == [
        ["db_rejected", "3"], ["empty_value", "1"], ["invalid_json", "1"],
    ]  # fmt: skip
    assert lines[-1] == f"5 dead letters in {topics.dead_letters}"

    def replay(*arguments: str) -> str:
        result = subprocess.run(
            [str(ORDER_VIEWER), "dlq", "replay", *arguments], env=service.env,
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return result.stdout

    assert replay("--reason", "db_rejected", "--dry-run").startswith(
        f"3 dead letters selected; would send 3 to {topics.orders}"
    )
    for _ in range(2):
        assert replay("--reason", "db_rejected").startswith(
            f"3 dead letters selected; sent 3 to {topics.orders}"
        )
    wait_until(
        lambda: metric_value(scrape(service), "order_viewer_messages_consumed_total") == 6 + 6,
        60,
        "the replayed messages consumed",
    )
    samples = scrape(service)
    assert metric_value(samples, "order_viewer_orders_stored_total") == 1 + 3
    assert metric_value(samples, "order_viewer_orders_replaced_total") == 0
    for order in refused:
        assert service.get(f"/order/{order['order_uid']}").json() == order

    # The tombstone's reason, accepted once the flag says so: replayed, it deletes.
    service.terminate()
    deleting = start_service(KAFKA_SESSION_TIMEOUT_MS="6000", KAFKA_TOMBSTONES="delete")
    assert replay("--reason", "empty_value").startswith("1 dead letters selected; sent 1")
    wait_until(
        lambda: deleting.get(f"/order/{kept['order_uid']}").status_code == 404, 60, "the delete"
    )
    assert metric_value(scrape(deleting), "order_viewer_orders_deleted_total") == 1
    # The service's group resumed where it stopped: the tools never moved its offsets.
    assert metric_value(scrape(deleting), "order_viewer_messages_dead_lettered_total") == 0
