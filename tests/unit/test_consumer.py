from __future__ import annotations

import random
from typing import Any

import pytest
from confluent_kafka import Consumer

from order_viewer.adapters.kafka.consumer import (
    RESTARTS_BEFORE_STUCK,
    GroupProgress,
    Lanes,
    ProgressWatch,
    Verdict,
    by_size,
)
from order_viewer.bootstrap import group_membership
from order_viewer.config import Settings
from order_viewer.service.ports import ConsumedMessage


def message(offset: int, size: int | None) -> ConsumedMessage:
    return ConsumedMessage("orders", 0, offset, b"k", None if size is None else b"x" * size)


def test_batches_are_cut_by_bytes_in_order() -> None:
    messages = [message(0, 40), message(1, 40), message(2, 40), message(3, 100), message(4, 10)]
    batches = by_size(messages, 100)
    assert [[m.offset for m in batch] for batch in batches] == [[0, 1], [2], [3], [4]]


def test_empty_values_and_oversized_messages_still_get_a_batch() -> None:
    messages = [message(0, None), message(1, 0), message(2, 500), message(3, 1)]
    batches = by_size(messages, 100)
    assert [[m.offset for m in batch] for batch in batches] == [[0, 1], [2], [3]]
    assert by_size([], 100) == []


def on(partition: int, offset: int) -> ConsumedMessage:
    return ConsumedMessage("orders", partition, offset, b"k", b"{}")


class Write:
    """A write whose end the test decides."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def __repr__(self) -> str:
        return self.name


def three_lanes(split_from: int = 5) -> Lanes[Write]:
    return Lanes(3, split_from)


def positions(groups: list[tuple[frozenset[int], list[ConsumedMessage]]]) -> list[Any]:
    return [
        (sorted(lanes), [(m.partition, m.offset) for m in messages]) for lanes, messages in groups
    ]


def test_a_partition_belongs_to_the_lane_of_its_number_modulo_the_lanes() -> None:
    assert [Lanes[Write](2).of(partition) for partition in range(5)] == [0, 1, 0, 1, 0]
    assert [Lanes[Write](1).of(partition) for partition in range(3)] == [0, 0, 0]


@pytest.mark.parametrize("count", [0, -1])
def test_lanes_are_at_least_one(count: int) -> None:
    with pytest.raises(ValueError, match="at least one lane"):
        Lanes[Write](count)


def test_a_small_poll_is_one_batch_of_all_its_lanes_in_the_order_it_came() -> None:
    messages = [on(0, 0), on(4, 0), on(1, 0), on(0, 1)]
    assert positions(three_lanes().batches(messages)) == [
        ([0, 1], [(0, 0), (4, 0), (1, 0), (0, 1)])
    ]
    assert three_lanes().batches([]) == []


def test_a_large_poll_is_a_batch_per_lane_the_free_lanes_first() -> None:
    lanes = three_lanes()
    lanes.begin(frozenset({0}), Write("busy"))
    messages = [on(0, 0), on(1, 0), on(2, 0), on(3, 0), on(1, 1), on(5, 0)]
    assert positions(lanes.batches(messages)) == [
        ([1], [(1, 0), (1, 1)]),
        ([2], [(2, 0), (5, 0)]),
        ([0], [(0, 0), (3, 0)]),
    ]


def test_a_large_poll_of_one_lane_is_one_batch() -> None:
    messages = [on(3, n) for n in range(10)]
    assert positions(three_lanes().batches(messages)) == [([0], [(3, n) for n in range(10)])]


def test_a_lane_holds_one_write_until_it_is_taken_back_done_or_not() -> None:
    lanes = three_lanes()
    first = Write("first")
    lanes.begin(frozenset({0}), first)
    with pytest.raises(ValueError, match=r"lanes \[0\] are held"):
        lanes.begin(frozenset({0, 2}), Write("second"))
    assert not lanes.free(0)
    assert lanes.free(1)
    assert lanes.free(2)
    first.finished = True
    assert lanes.free(0)  # its write is done, only its settling waits
    with pytest.raises(ValueError, match="held"):
        lanes.begin(frozenset({0}), Write("second"))
    assert lanes.take_holding(frozenset({0, 2})) == [first]
    lanes.begin(frozenset({0, 2}), Write("second"))


def test_a_batch_of_several_lanes_holds_them_all_and_is_settled_before_any_of_them_is_used() -> (
    None
):
    lanes = three_lanes()
    several = Write("several")
    lanes.begin(frozenset({0, 1}), several)
    assert [lanes.free(lane) for lane in range(3)] == [False, False, True]
    lanes.begin(frozenset({2}), beside := Write("beside"))
    assert lanes.take_holding(frozenset({1})) == [several]
    assert [lanes.free(lane) for lane in range(3)] == [True, True, False]
    assert lanes.take_all() == [beside]


def test_the_writes_are_handed_back_in_the_order_they_began() -> None:
    lanes = three_lanes()
    writes = [Write("a"), Write("b"), Write("c")]
    for lane, write in enumerate(writes):
        lanes.begin(frozenset({lane}), write)
    assert lanes.take_holding(frozenset({2, 0})) == [writes[0], writes[2]]
    assert lanes.take_all() == [writes[1]]
    assert not lanes.under_way


def test_only_the_done_writes_are_taken_in_the_order_they_began_the_others_stay() -> None:
    lanes = three_lanes()
    a, b, c = Write("a"), Write("b"), Write("c")
    for lane, write in enumerate((a, b, c)):
        lanes.begin(frozenset({lane}), write)
    assert lanes.take_done() == []
    c.finished = a.finished = True
    assert lanes.take_done() == [a, c]
    assert lanes.take_done() == []
    assert lanes.under_way
    b.finished = True
    assert lanes.take_done() == [b]
    assert not lanes.under_way
    assert lanes.take_all() == []


@pytest.mark.parametrize("seed", range(5))
def test_scheduled_as_the_consumer_does_each_partition_is_settled_in_order(seed: int) -> None:
    """Polls of random partitions, split or not, whose writes end at random: every message is
    settled once, each partition's in offset order, with at most one write per lane."""
    chance = random.Random(seed)
    lanes: Lanes[Batch] = Lanes(3, split_from=6)
    next_offset = dict.fromkeys(range(7), 0)
    begun: list[Batch] = []
    settled: list[ConsumedMessage] = []
    for _ in range(200):
        polled = []
        for _ in range(chance.randrange(12)):
            partition = chance.randrange(7)
            polled.append(on(partition, next_offset[partition]))
            next_offset[partition] += 1
        for batch_lanes, messages in lanes.batches(polled):
            settled += settle(lanes.take_holding(batch_lanes))
            begun.append(Batch(messages))
            lanes.begin(batch_lanes, begun[-1])  # raises if a lane held a write
        for write in begun:
            write.finished = write.finished or chance.random() < 0.4
        settled += settle(lanes.take_done())
    settled += settle(lanes.take_all())
    for partition, count in next_offset.items():
        offsets = [m.offset for m in settled if m.partition == partition]
        assert offsets == list(range(count))


class Batch(Write):
    def __init__(self, messages: list[ConsumedMessage]) -> None:
        super().__init__(f"batch of {len(messages)}")
        self.messages = messages


def settle(writes: list[Batch]) -> list[ConsumedMessage]:
    return [message for write in writes for message in write.messages]


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, {"group.id": "order-viewer", "session.timeout.ms": 45_000}),
        (
            {"kafka_group_instance_id": "viewer-0", "kafka_session_timeout_ms": 10_000},
            {
                "group.id": "order-viewer",
                "session.timeout.ms": 10_000,
                "group.instance.id": "viewer-0",
            },
        ),
        (
            {"kafka_group_protocol": "consumer"},
            {"group.id": "order-viewer", "group.protocol": "consumer"},
        ),
    ],
)
def test_group_membership_is_one_librdkafka_accepts(
    settings: dict[str, Any], expected: dict[str, object]
) -> None:
    membership = group_membership(Settings(_env_file=None, **settings))
    assert membership == expected
    # librdkafka checks its configuration when the client is made, before any connection.
    Consumer({"bootstrap.servers": "127.0.0.1:9", **membership}).close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watch_of(timeout: float = 30) -> tuple[ProgressWatch, Clock]:
    clock = Clock()
    return ProgressWatch(timeout, clock), clock


LAGGING = {"orders/0": 0, "orders/1": 120}


def test_a_quiet_consumer_is_checked_once_the_timeout_has_passed() -> None:
    watch, clock = watch_of(30)
    clock.now += 29.9
    assert not watch.due()
    clock.now += 0.1
    assert watch.due()


def test_messages_coming_keep_the_check_away() -> None:
    watch, clock = watch_of(30)
    for _ in range(10):
        clock.now += 20
        assert not watch.moved()
        assert not watch.due()


def test_waiting_for_the_writes_is_not_quiet_time() -> None:
    # The database away for ten minutes: the loop waited in its writes, asking the broker for
    # nothing, and the lag grew because of that alone.
    watch, clock = watch_of(30)
    clock.now += 600
    watch.held()
    assert not watch.due()
    clock.now += 29
    assert not watch.due()
    clock.now += 1
    assert watch.due()


def test_a_broker_that_does_not_answer_the_check_counts_for_nothing() -> None:
    watch, clock = watch_of(30)
    for _ in range(2 * RESTARTS_BEFORE_STUCK):
        clock.now += 30
        assert watch.due()
        assert watch.checked(None) is Verdict.CARRY_ON
        assert not watch.due()  # the next check is a timeout later
    assert not watch.stuck
    # Back, and still nothing comes: now it counts, from the first restart.
    clock.now += 30
    assert watch.checked(LAGGING) is Verdict.RESTART


@pytest.mark.parametrize("waiting", [{}, {"orders/0": 0, "orders/1": 0}])
def test_nothing_waiting_or_nothing_assigned_is_no_stall(waiting: dict[str, int]) -> None:
    watch, clock = watch_of(30)
    for _ in range(2 * RESTARTS_BEFORE_STUCK):
        clock.now += 30
        assert watch.checked(waiting) is Verdict.CARRY_ON
    assert not watch.stuck


def test_restarts_that_bring_nothing_make_it_stuck_once_and_a_message_frees_it() -> None:
    watch, clock = watch_of(30)
    verdicts = []
    for _ in range(RESTARTS_BEFORE_STUCK + 3):
        clock.now += 30
        verdicts.append(watch.checked(LAGGING))
    assert verdicts == [
        *[Verdict.RESTART] * RESTARTS_BEFORE_STUCK,
        Verdict.STUCK,
        Verdict.RESTART,
        Verdict.RESTART,
    ]
    assert watch.stuck
    assert watch.moved()  # it was stuck
    assert not watch.stuck
    assert not watch.moved()
    clock.now += 30
    assert watch.checked(LAGGING) is Verdict.RESTART


def test_a_message_between_restarts_starts_the_count_again() -> None:
    watch, clock = watch_of(30)
    for _ in range(3):
        for _ in range(RESTARTS_BEFORE_STUCK):
            clock.now += 30
            assert watch.checked(LAGGING) is Verdict.RESTART
        watch.moved()
    assert not watch.stuck


def test_an_unanswered_check_between_restarts_neither_counts_nor_forgives() -> None:
    watch, clock = watch_of(30)
    verdicts = []
    for _ in range(RESTARTS_BEFORE_STUCK + 1):
        clock.now += 30
        assert watch.checked(None) is Verdict.CARRY_ON
        clock.now += 30
        verdicts.append(watch.checked(LAGGING))
    assert verdicts[-1] is Verdict.STUCK


def group(committed: dict[str, int], waiting: dict[str, int]) -> GroupProgress:
    return GroupProgress(committed, waiting)


LEFT_WAITING = group({"orders/0": 10, "orders/1": -1}, {"orders/0": 5, "orders/1": 40})


def test_a_member_without_partitions_is_restarted_once_its_group_stands_still() -> None:
    watch, clock = watch_of(30)
    clock.now += 30
    # The first look has nothing to compare with: the group may be moving.
    assert watch.checked_unassigned(LEFT_WAITING) is Verdict.CARRY_ON
    assert not watch.due()
    clock.now += 30
    assert watch.due()
    assert watch.checked_unassigned(LEFT_WAITING) is Verdict.RESTART


def test_a_group_that_commits_between_checks_is_moving() -> None:
    watch, clock = watch_of(30)
    for offset in range(10, 20):
        clock.now += 30
        moving = group({"orders/0": offset, "orders/1": -1}, {"orders/0": 5, "orders/1": 40})
        assert watch.checked_unassigned(moving) is Verdict.CARRY_ON


def test_a_still_group_with_nothing_waiting_is_idle_not_stalled() -> None:
    watch, clock = watch_of(30)
    idle = group({"orders/0": 10, "orders/1": 3}, {"orders/0": 0, "orders/1": 0})
    for _ in range(2 * RESTARTS_BEFORE_STUCK):
        clock.now += 30
        assert watch.checked_unassigned(idle) is Verdict.CARRY_ON


def test_an_unanswered_group_check_forgets_what_was_seen_before() -> None:
    watch, clock = watch_of(30)
    clock.now += 30
    assert watch.checked_unassigned(LEFT_WAITING) is Verdict.CARRY_ON
    clock.now += 30
    assert watch.checked_unassigned(None) is Verdict.CARRY_ON
    clock.now += 30
    # Still for two checks, but not two in a row that were answered.
    assert watch.checked_unassigned(LEFT_WAITING) is Verdict.CARRY_ON
    clock.now += 30
    assert watch.checked_unassigned(LEFT_WAITING) is Verdict.RESTART


def test_each_new_member_gets_a_full_interval_to_be_assigned_and_is_never_stuck() -> None:
    watch, clock = watch_of(30)
    verdicts = []
    for _ in range(4 * (RESTARTS_BEFORE_STUCK + 1)):
        clock.now += 30
        verdicts.append(watch.checked_unassigned(LEFT_WAITING))
    assert verdicts == [Verdict.CARRY_ON, Verdict.RESTART] * 2 * (RESTARTS_BEFORE_STUCK + 1)
    assert not watch.stuck


def test_partitions_assigned_between_group_checks_start_the_comparison_again() -> None:
    watch, clock = watch_of(30)
    clock.now += 30
    assert watch.checked_unassigned(LEFT_WAITING) is Verdict.CARRY_ON
    clock.now += 30
    assert watch.checked({"orders/0": 0}) is Verdict.CARRY_ON  # assigned, caught up
    clock.now += 30
    assert watch.checked_unassigned(LEFT_WAITING) is Verdict.CARRY_ON
    watch.moved()
    clock.now += 30
    assert watch.checked_unassigned(LEFT_WAITING) is Verdict.CARRY_ON


def test_restarts_for_having_no_partition_do_not_count_toward_stuck() -> None:
    watch, clock = watch_of(30)
    for _ in range(RESTARTS_BEFORE_STUCK):
        clock.now += 30
        assert watch.checked(LAGGING) is Verdict.RESTART
    clock.now += 30
    watch.checked_unassigned(LEFT_WAITING)
    clock.now += 30
    assert watch.checked_unassigned(LEFT_WAITING) is Verdict.RESTART
    assert not watch.stuck
    clock.now += 30
    # The next fruitless restart of an assigned consumer is the one that makes it stuck.
    assert watch.checked(LAGGING) is Verdict.STUCK
