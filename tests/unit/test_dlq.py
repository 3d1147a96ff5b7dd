"""The dead-letter tools' inputs, without a broker: times, selections and the command line's
refusals (which come before any connection)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from rich.progress import Progress

from order_viewer.entrypoints import dlq
from order_viewer.entrypoints.cli import main
from order_viewer.entrypoints.dlq import (
    NO_REASON,
    DeadLetter,
    DeadLetterToolError,
    Originals,
    ReasonStats,
    ReplaySummary,
    Selection,
    Unverified,
    parse_time,
    print_stats,
    send_back,
    source,
)
from tests.fakes import StalledProducer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-30T10:00:00Z", datetime(2026, 11, 30, 10, tzinfo=UTC)),
        ("2026-11-30T13:00:00+03:00", datetime(2026, 11, 30, 10, tzinfo=UTC)),
        ("2026-11-30T10:00:00.250000Z", datetime(2026, 11, 30, 10, 0, 0, 250000, UTC)),
    ],
)
def test_times_are_iso_8601_with_a_zone(text: str, expected: datetime) -> None:
    assert parse_time(text) == expected


@pytest.mark.parametrize(
    "text",
    ["yesterday", "", "2026-13-01T00:00:00Z", "1700000000", "2026-11-30T10:00:00", "2026-11-30"],
)
def test_a_time_that_is_not_one_or_has_no_zone_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"ISO 8601|time zone"):
        parse_time(text)


def letter(reason: bytes | None, stamp: datetime | None) -> DeadLetter:
    headers = {} if reason is None else {"error.code": reason}
    return DeadLetter(0, 0, stamp, b"k", b"v", headers)


def test_a_selection_filters_by_reason_and_by_a_half_open_time_range() -> None:
    since, until = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)
    window = Selection("invalid_json", since, until)
    assert letter(b"invalid_json", since) in window
    assert letter(b"invalid_json", until) not in window
    assert letter(b"missing_field", since) not in window
    assert letter(b"invalid_json", None) not in window  # no time: cannot be in a range
    assert letter(None, since) in Selection()
    assert letter(None, None).reason == NO_REASON
    assert letter(b"\xff\xfe", None).reason == "\ufffd\ufffd"


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        (["--since", "yesterday"], "argument --since: not an ISO 8601 time"),
        (["--until", "2026-11-30T10:00:00"], "argument --until: give the time zone"),
        (["--reason", "no_such_reason"], "argument --reason: invalid choice"),
        (["--reason", NO_REASON], "argument --reason: invalid choice"),
        (["--reason"], "argument --reason: expected one argument"),
        (["--dry-run=yes"], "ignored explicit argument"),
        (["--unverified=yes"], "ignored explicit argument"),
    ],
)
def test_replay_refuses_bad_arguments_before_reaching_the_broker(
    arguments: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["dlq", "replay", *arguments])
    assert exited.value.code == 2
    assert complaint in capsys.readouterr().err


def test_replay_refuses_a_range_that_ends_before_it_begins(
    capsys: pytest.CaptureFixture[str],
) -> None:
    since, until = "2026-11-30T10:00:00Z", "2026-11-30T09:00:00Z"
    assert main(["dlq", "replay", "--since", since, "--until", until]) == 2
    assert capsys.readouterr().err == "order-viewer: --since must be before --until\n"


@pytest.mark.parametrize("command", [["dlq"], ["dlq", "stats"], ["dlq", "replay"]])
def test_the_dead_letter_commands_have_help(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: order-viewer dlq")


def test_dlq_needs_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["dlq"])
    assert exited.value.code == 2
    assert "required" in capsys.readouterr().err


class Verdicts:
    """Look-ups of originals that find unverified the letters whose key is in `unverified`, and
    remember what each was asked."""

    def __init__(self, unverified: dict[bytes, str] | None = None) -> None:
        self.unverified_keys = unverified or {}
        self.asked: list[list[DeadLetter]] = []

    def unverified(self, letters: Sequence[DeadLetter]) -> list[str | None]:
        self.asked.append(list(letters))
        return [self.unverified_keys.get(letter.key or b"") for letter in letters]


def topics_and_keys(producer: StalledProducer) -> list[tuple[str, bytes | None]]:
    return [(message.topic, message.key) for message in producer.queued]


def send(
    letters: list[DeadLetter],
    producer: StalledProducer | None,
    verdicts: Verdicts | None = None,
    send_unverified: bool = False,
) -> ReplaySummary:
    return send_back(
        letters, Selection(), verdicts or Verdicts(), producer, send_unverified=send_unverified,
        orders_topic="orders", dead_letter_topic="dlq",
    )  # fmt: skip


def test_what_the_broker_has_not_acknowledged_when_flush_gives_up_counts_as_failed() -> None:
    letters = [letter(b"invalid_json", None) for _ in range(3)]
    producer = StalledProducer()
    summary = send(letters, producer)
    assert topics_and_keys(producer) == [("orders", b"k")] * 3
    assert (summary.selected, summary.sent, summary.failed) == (3, 0, 3)


@pytest.mark.parametrize(
    "code",
    [
        "\x1b[2J\x1b[31mall good",
        "invalid_json\n999  forged line",
        "\r\x07\x9b31m",
        "\u202eevil",
        "\x00",
    ],
)
def test_a_hostile_reason_is_printed_quoted_never_raw(
    code: str, capsys: pytest.CaptureFixture[str]
) -> None:
    print_stats({code: ReasonStats(1), "invalid_json": ReasonStats(2)}, "dlq")
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 4
    assert all(line.isprintable() for line in lines)
    assert repr(code) in out


def named(**source_headers: bytes) -> DeadLetter:
    """A dead letter with the `source.*` headers given."""
    headers = {f"source.{name}": value for name, value in source_headers.items()}
    return DeadLetter(0, 0, None, b"k", b"v", {"error.code": b"invalid_json", **headers})


def test_a_dead_letter_names_its_original_as_the_service_writes_it() -> None:
    assert source(named(topic=b"orders", partition=b"0", offset=b"0"), "orders") == (0, 0)
    largest = named(topic=b"orders", partition=b"2147483647", offset=b"9223372036854775807")
    assert source(largest, "orders") == (2**31 - 1, 2**63 - 1)


@pytest.mark.parametrize(
    ("letter", "why"),
    [
        (DeadLetter(0, 0, None, b"k", b"v", {"error.code": b"invalid_json"}), dlq.NO_SOURCE),
        (named(partition=b"0", offset=b"1"), dlq.NO_SOURCE),
        (named(topic=b"orders", offset=b"1"), dlq.NO_SOURCE),
        (named(topic=b"orders", partition=b"0"), dlq.NO_SOURCE),
        (
            replace(
                named(topic=b"orders", partition=b"0", offset=b"1"),
                repeated=frozenset({"source.offset"}),
            ),
            dlq.NO_SOURCE,
        ),
        *(
            (named(topic=b"orders", partition=b"0", offset=offset), dlq.NO_SOURCE)
            for offset in [
                b"", b"-1", b"+1", b" 1", b"1 ", b"01", b"1_000", "\u0661".encode(), b"0x1",
                b"1e3", b"1.0", b"\x00", b"9223372036854775808", b"9" * 20, b"9" * 5000,
            ]
        ),
        *(
            (named(topic=b"orders", partition=partition, offset=b"1"), dlq.NO_SOURCE)
            for partition in [b"-1", b"2147483648", b"00", b"9" * 11]
        ),
        (named(topic=b"orders.dlq", partition=b"0", offset=b"1"), dlq.OTHER_TOPIC),
        (named(topic=b"Orders", partition=b"0", offset=b"1"), dlq.OTHER_TOPIC),
        (named(topic=b"orders\x00", partition=b"0", offset=b"1"), dlq.OTHER_TOPIC),
        (named(topic=b"", partition=b"0", offset=b"1"), dlq.OTHER_TOPIC),
    ],
)  # fmt: skip
def test_a_dead_letter_whose_source_headers_are_not_the_services_is_unverified(
    letter: DeadLetter, why: str
) -> None:
    with pytest.raises(Unverified, match=f"^{why}$"):
        source(letter, "orders")


def keyed(*keys: bytes) -> list[DeadLetter]:
    return [
        DeadLetter(0, i, None, key, b"v", {"error.code": b"invalid_json"})
        for i, key in enumerate(keys)
    ]


def test_the_unverified_are_skipped_and_counted_unless_asked_for_and_a_dry_run_counts_alike() -> (
    None
):
    letters = [*keyed(b"a", b"forged", b"b", b"gone"), letter(None, None)]
    verdicts = {b"forged": dlq.NOT_THE_ORIGINAL, b"gone": dlq.ORIGINAL_REMOVED}
    for producer in [StalledProducer(), None]:
        summary = send(letters, producer, Verdicts(verdicts))
        assert (summary.selected, summary.sendable) == (5, 2)
        assert summary.unverified == {dlq.NOT_THE_ORIGINAL: 1, dlq.ORIGINAL_REMOVED: 1}
        assert summary.skipped == {"no error.code header": 1}
        if producer is not None:
            assert topics_and_keys(producer) == [("orders", b"a"), ("orders", b"b")]
        asked = send(
            letters, producer and StalledProducer(), Verdicts(verdicts), send_unverified=True
        )
        assert (asked.sendable, asked.unverified) == (4, summary.unverified)


def test_a_look_up_holds_a_bounded_number_of_letters_and_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dlq, "LOOKUP_LETTERS", 3)
    monkeypatch.setattr(dlq, "LOOKUP_BYTES", 10)
    large = replace(keyed(b"large")[0], value=b"x" * 20)  # alone beyond the bytes: alone
    verdicts = Verdicts()
    letters = [*keyed(b"1", b"2", b"3", b"4"), large, *keyed(b"12345", b"12345")]
    assert send(letters, None, verdicts).sendable == 7
    assert [[letter.key for letter in asked] for asked in verdicts.asked] == [
        [b"1", b"2", b"3"], [b"4"], [b"large"], [b"12345"], [b"12345"],
    ]  # fmt: skip


class StalledReader:
    """A consumer of a topic of one partition whose records never arrive."""

    def __init__(self) -> None:
        self.assigned: list[Any] = []

    def list_topics(self, topic: str, *, timeout: float) -> Any:
        partitions = {0: SimpleNamespace()}
        return SimpleNamespace(topics={topic: SimpleNamespace(error=None, partitions=partitions)})

    def get_watermark_offsets(self, partition: Any, *, timeout: float) -> tuple[int, int]:
        return 0, 10

    def assign(self, partitions: list[Any]) -> None:
        self.assigned = partitions

    def seek(self, partition: Any) -> None: ...

    def pause(self, partitions: list[Any]) -> None: ...

    def resume(self, partitions: list[Any]) -> None: ...

    def poll(self, timeout: float) -> Any:
        time.sleep(timeout)
        return None

    def consume(self, num_messages: int, *, timeout: float) -> list[Any]:
        raise AssertionError("consume without a first message")

    def position(self, partitions: list[Any]) -> list[Any]:
        return [TopicPartition(p.topic, p.partition, -1001) for p in partitions]  # not yet read


def test_a_look_up_that_reads_nothing_gives_up_after_its_time_limit() -> None:
    reader = StalledReader()
    originals = Originals(reader, "orders", Progress(disable=True), time_limit=0.3)
    letter = named(topic=b"orders", partition=b"0", offset=b"7")
    started = time.monotonic()
    with pytest.raises(DeadLetterToolError) as raised:
        originals.unverified([letter])
    assert 0.3 <= time.monotonic() - started < 2
    assert str(raised.value) == (
        "looking up dead letters' originals in orders: nothing read for 0.3 s "
        "(partition 0 offset 7 awaited)"
    )
    assert [(p.topic, p.partition, p.offset) for p in reader.assigned] == [("orders", 0, 7)]


WHY = "(1 key or value differ from the original, 1 original removed)"


@pytest.mark.parametrize(
    ("arguments", "unverified"),
    [
        ([], f"2 skipped {WHY}"),
        (["--dry-run"], f"2 skipped {WHY}"),
        (["--unverified"], f"2 sent {WHY}"),
        (["--dry-run", "--unverified"], f"2 would be sent {WHY}"),
    ],
)
def test_the_summary_line_says_how_many_were_unverified_why_and_what_became_of_them(
    arguments: list[str],
    unverified: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    asked: dict[str, bool] = {}

    def replay(
        settings: Any,
        selection: Selection,
        *,
        dry_run: bool,
        send_unverified: bool,
        interactive: bool,
    ) -> ReplaySummary:
        asked.update(dry_run=dry_run, send_unverified=send_unverified)
        summary = ReplaySummary(
            selected=5, sendable=4 if send_unverified else 2, sent=0 if dry_run else 2
        )
        summary.unverified.update({dlq.ORIGINAL_REMOVED: 1, dlq.NOT_THE_ORIGINAL: 1})
        summary.skipped["no error.code header"] += 1
        return summary

    monkeypatch.setattr(dlq, "replay", replay)
    assert main(["dlq", "replay", *arguments]) == 0
    assert asked == {
        "dry_run": "--dry-run" in arguments,
        "send_unverified": "--unverified" in arguments,
    }
    out = capsys.readouterr().out
    assert f"; unverified: {unverified}; skipped: 1 no error.code header; 0 failed\n" in out


def test_a_replayed_letter_continues_its_trace_and_a_repeated_traceparent_is_none() -> None:
    traceparent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    traced = {"traceparent": traceparent, "tracestate": b"v=1"}
    letters = [
        replace(keyed(b"traced")[0], headers={"error.code": b"invalid_json", **traced}),
        replace(
            keyed(b"twice")[0],
            headers={"error.code": b"invalid_json", **traced},
            repeated=frozenset({"traceparent"}),
        ),
        replace(
            keyed(b"oversized")[0],
            headers={"error.code": b"invalid_json", "traceparent": traceparent + b"-" * 200},
        ),
    ]
    producer = StalledProducer()
    send(letters, producer, Verdicts())
    assert [message.headers for message in producer.queued] == [
        [("replayed.from", b"dlq/0/0"), ("traceparent", traceparent), ("tracestate", b"v=1")],
        [("replayed.from", b"dlq/0/0")],
        [("replayed.from", b"dlq/0/0")],
    ]
