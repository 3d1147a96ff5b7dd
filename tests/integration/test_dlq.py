"""`order-viewer dlq stats` and `replay` against the real broker: counts and selections over
hand-made dead letters (hostile ones included), and dead letters fixed after the fact stored
exactly once by a running service."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from order_viewer import dlq
from order_viewer.config import Settings
from order_viewer.generate import encode, make_order
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

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def settings_for(stack: Stack, topics: Topics) -> Settings:
    return Settings(
        _env_file=None,
        kafka_bootstrap_servers=stack.bootstrap_servers,
        kafka_topic=topics.orders,
        kafka_dlq_topic=topics.dead_letters,
        kafka_group_id=topics.group,
    )


def write_dead_letters(stack: Stack, topics: Topics, letters: list[dict[str, Any]]) -> None:
    """The letters on new topics of two partitions, at their times (partition 0 unless given)."""
    create_topics(stack, [topics.orders, topics.dead_letters], 2)
    records = [
        Record(
            letter.get("key"),
            letter.get("value"),
            letter.get("headers"),
            int(letter["at"].timestamp() * 1000),
            letter.get("partition", 0),
        )
        for letter in letters
    ]
    produce(stack, topics.dead_letters, records)


def headers(code: bytes) -> list[tuple[str, bytes]]:
    return [("error.code", code), ("error.message", b"why"), ("source.topic", b"orders")]


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


def test_replay_sends_the_selection_only_with_where_it_came_from(
    stack: Stack, topics: Topics
) -> None:
    write_dead_letters(stack, topics, HAND_MADE)
    settings = settings_for(stack, topics)

    def run(selection: dlq.Selection, dry_run: bool = False) -> dlq.ReplaySummary:
        return dlq.replay(settings, selection, dry_run=dry_run, interactive=False)

    everything = run(dlq.Selection(), dry_run=True)
    assert (everything.selected, everything.sent) == (6, 0)
    assert everything.skipped == {"no error.code header": 1, "value not kept": 1}
    window = run(dlq.Selection(None, T0 + timedelta(hours=1), T0 + timedelta(hours=3)), True)
    assert window.selected == 2
    assert window.read == 2  # each partition read from the range's start to its end only
    assert run(dlq.Selection(None, T0 + timedelta(hours=9)), True).read == 0
    assert run(dlq.Selection(None, None, T0 - timedelta(hours=1)), True).read == 0
    assert run(dlq.Selection(None, T0 + timedelta(hours=5)), True).read == 1
    assert read_topic(stack, topics.orders, lambda _: False, timeout=3) == []  # dry runs sent none

    summary = run(dlq.Selection("invalid_json"))
    assert (summary.selected, summary.sent, summary.failed) == (3, 2, 0)
    replayed = read_topic(stack, topics.orders, lambda read: len(read) >= 2, timeout=20)
    assert sorted((m.key(), m.value()) for m in replayed) == [(b"a", b"{"), (b"c", b"{}")]
    origins = sorted(dict(m.headers())["replayed.from"] for m in replayed)
    assert origins == [f"{topics.dead_letters}/0/0".encode(), f"{topics.dead_letters}/0/1".encode()]
    # Nothing else arrived: a filtered replay sends only its reason.
    assert len(read_topic(stack, topics.orders, lambda _: False, timeout=3)) == 2


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
