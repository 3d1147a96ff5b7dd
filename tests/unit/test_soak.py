"""The chaos soak's parts that need no servers: its seeded schedule, its options' hostile values,
and the freezing of processes that must never outlive a failure."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from benchmarks.soak import (
    FAULTS,
    PLANNED_GAP_SECONDS,
    Ledger,
    SentOrder,
    Version,
    arguments,
    behind,
    plan,
    stopped,
)
from confluent_kafka import KafkaError
from confluent_kafka import Message as KafkaMessage

from tests.conftest import children, wait_until


def test_the_schedule_replays_from_its_seed_and_plans_forty_faults_in_twenty_minutes() -> None:
    planned = plan(7, 20 * 60)
    assert planned == plan(7, 20 * 60)
    assert planned != plan(8, 20 * 60)
    assert len(planned) >= 40
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(planned)]
    assert all(PLANNED_GAP_SECONDS[0] <= gap <= PLANNED_GAP_SECONDS[1] for gap in gaps)
    assert planned[-1].at < 20 * 60
    # Every kind as often as the others, give or take the last round's.
    counts = Counter(fault.kind for fault in planned)
    assert set(counts) == set(FAULTS)
    assert max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize("option", ["--minutes", "--rate", "--drain-seconds"])
@pytest.mark.parametrize("value", ["0", "-1", "1e9", "99999999999", "abc", "nan", "inf", "", "2 0"])
def test_hostile_option_values_are_refused_in_one_line(
    option: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        arguments([option, value])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith(f"must be a number above 0 and below 1,000,000, not {value!r}")


def test_the_options_default_to_a_twenty_minute_run_at_fifty_orders_a_second() -> None:
    parsed = arguments([])
    assert (parsed.minutes, parsed.rate, parsed.seed, parsed.group_protocol) == (
        20,
        50,
        None,
        "classic",
    )
    assert arguments(["--minutes", "0.5", "--rate", "7"]).minutes == 0.5


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def stopped_now(pid: int) -> bool:
    """Whether the process is stopped; a signal is delivered a moment after it is sent."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def interrupted_while_frozen(pid: int) -> None:
    with stopped([pid]):
        wait_until(lambda: stopped_now(pid), 10, "the process to stop", interval=0.01)
        raise KeyboardInterrupt  # a Ctrl-C in the middle of a fault


def test_a_frozen_process_is_continued_when_the_block_fails(
    sleeper: subprocess.Popen[bytes],
) -> None:
    with pytest.raises(KeyboardInterrupt):
        interrupted_while_frozen(sleeper.pid)
    wait_until(lambda: not stopped_now(sleeper.pid), 10, "the process to go on", interval=0.01)


def test_the_children_of_a_process_are_found(sleeper: subprocess.Popen[bytes]) -> None:
    assert sleeper.pid in children(os.getpid())
    assert children(sleeper.pid) == []


class Acknowledged:
    """What a delivery report hands over, as far as the ledger reads it."""

    def __init__(self, offset: int) -> None:
        self._offset = offset

    def offset(self) -> int:
        return self._offset


def at(offset: int) -> KafkaMessage:
    return cast(KafkaMessage, Acknowledged(offset))


def test_the_ledger_keeps_each_orders_newest_acknowledged_version() -> None:
    ledger = Ledger()
    report = ledger.order_delivered
    report(SentOrder("a", b"a2", 2, updatable=True), None, at(7))
    # A report of an earlier offset, however late it comes, does not make it the newest.
    report(SentOrder("a", b"a1", 1, updatable=True), None, at(3))
    report(SentOrder("m", b"m1", 1, updatable=False), None, at(1))
    failed = KafkaError(KafkaError._MSG_TIMED_OUT)
    report(SentOrder("b", b"b1", 1, updatable=True), failed, at(-1))
    assert ledger.newest == {"a": Version(7, b"a2", 2), "m": Version(1, b"m1", 1)}
    assert ledger.counts() == (0, 3, 1)
    # Markers are never picked for an update or a read, and a failed order never was acknowledged.
    assert {ledger.pick(random.Random(seed), recent=True) for seed in range(20)} == {"a"}
    assert behind(ledger, {"a": b"a2", "m": b"m1"}) == []
    assert sorted(behind(ledger, {"a": b"a1"})) == ["a", "m"]
