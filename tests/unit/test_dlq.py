"""The dead-letter tools' inputs, without a broker: times, selections and the command line's
refusals (which come before any connection)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from order_viewer.cli import main
from order_viewer.dlq import (
    NO_REASON,
    DeadLetter,
    ReasonStats,
    Selection,
    parse_time,
    print_stats,
    send_back,
)


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


class StalledProducer:
    """A producer whose broker never acknowledges: `flush` gives up with everything queued."""

    def __init__(self) -> None:
        self.queued: list[tuple[str, bytes | None]] = []

    def produce(
        self,
        topic: str,
        *,
        value: bytes | None,
        key: bytes | None,
        on_delivery: Callable[[Any, Any], None],
        headers: list[tuple[str, str | bytes | None]],
    ) -> None:
        self.queued.append((topic, key))

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        return len(self.queued)


def test_what_the_broker_has_not_acknowledged_when_flush_gives_up_counts_as_failed() -> None:
    letters = [letter(b"invalid_json", None) for _ in range(3)]
    producer = StalledProducer()
    summary = send_back(
        letters, Selection(), producer, orders_topic="orders", dead_letter_topic="dlq"
    )
    assert producer.queued == [("orders", b"k")] * 3
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
