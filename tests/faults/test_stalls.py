"""Faults that leave the service alive but standing still: a consumer that stops fetching after
a broker restart (KIP-848), one that no new consumer gets moving, a member left without
partitions, and a broker frozen by SIGSTOP for 30 s. Each ends with the audit of the other fault
scenarios, and with every order served as stored, the newest version of the ones produced twice
included."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from order_viewer.adapters.cache import etag_of
from order_viewer.adapters.kafka.consumer import (
    CONSUMER_CLOSE_TIMEOUT_SECONDS,
    RESTARTS_BEFORE_STUCK,
)
from order_viewer.domain.model import order_json, parse_order
from order_viewer.entrypoints.generate import encode
from tests import frozen_fetching
from tests.audit import stored_count
from tests.conftest import (
    ROOT,
    ServiceProcess,
    Stack,
    Topics,
    metric_value,
    produce,
    scrape,
    wait_until,
)
from tests.faults.test_scenarios import Stream, audit

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def stalled_restarts(service: ServiceProcess, reason: str = "stalled") -> float:
    return metric_value(scrape(service), "order_viewer_consumer_restarts_total", reason=reason)


def second_versions(stream: Stream, count: int) -> list[tuple[bytes | None, bytes | None]]:
    """New content for the first `count` valid orders of the stream, which becomes what the
    audit expects of them: the later message of an order is the one stored."""
    messages: list[tuple[bytes | None, bytes | None]] = []
    for uid in list(stream.valid)[:count]:
        order = copy.deepcopy(stream.valid[uid])
        order["delivery"]["name"] = "Second Version"
        stream.valid[uid] = order
        messages.append((uid.encode(), encode(order)))
    stream.messages.extend(messages)
    return messages


def stale_answers(service: ServiceProcess, stream: Stream) -> list[str]:
    """The orders the service does not answer with the version the stream ended with."""
    expected = {
        uid: etag_of(hashlib.sha256(order_json(parse_order(encode(order)))).digest())
        for uid, order in stream.valid.items()
    }

    async def answers() -> dict[str, str | None]:
        limit = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=service.base_url, timeout=30) as client:

            async def one(uid: str) -> tuple[str, str | None]:
                async with limit:
                    response = await client.get(f"/order/{uid}")
                return uid, response.headers.get("etag") if response.status_code == 200 else None

            return dict(await asyncio.gather(*(one(uid) for uid in expected)))

    served = asyncio.run(answers())
    return sorted(uid for uid, etag in expected.items() if served[uid] != etag)


def wait_storing(stack: Stack, stream: Stream) -> None:
    first = list(stream.valid)[:100]
    wait_until(lambda: stored_count(stack, first) == len(first), 60, "the service to be storing")


@pytest.fixture
def switch(tmp_path: Path) -> Path:
    """The file that tells the consumers of a service started behind the seam to freeze (see
    tests.frozen_fetching)."""
    return tmp_path / "freeze"


@pytest.fixture
def start_behind_the_seam(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess], switch: Path
) -> Callable[..., ServiceProcess]:
    """Start the service with consumers that fetch nothing while `switch` says so, produce the
    first `produced` messages of the stream, and return the service once it stores the first of
    them."""

    def start(stream: Stream, produced: int, **settings: str) -> ServiceProcess:
        service = start_service(
            command=frozen_fetching.command(switch), PYTHONPATH=str(ROOT), **settings
        )
        produce(stack, topics.orders, stream.messages[:produced])
        wait_storing(stack, stream)
        return service

    return start


@pytest.mark.timeout(400)
def test_a_consumer_that_stops_fetching_after_a_broker_restart_is_replaced(
    stack: Stack,
    topics: Topics,
    switch: Path,
    start_behind_the_seam: Callable[..., ServiceProcess],
) -> None:
    # The stall itself comes about one broker restart in a few and cannot be forced, so the
    # seam makes it: right after the restart, the consumer made at start fetches nothing.
    stream = Stream(6_000, seed=301)
    service = start_behind_the_seam(
        stream, 3000, KAFKA_GROUP_PROTOCOL="consumer", KAFKA_STALL_TIMEOUT_MS="10000"
    )
    stack.servers.kafka_kill()
    stack.servers.kafka_start()
    switch.write_text("1")
    # After the restart the consumer may take a while to be given its partitions again.
    wait_until(frozen_fetching.frozen_marker(switch).exists, 60, "the consumer to freeze")
    restarted = time.monotonic()
    produce(stack, topics.orders, stream.messages[3000:])
    produce(stack, topics.orders, second_versions(stream, 200))
    wait_until(lambda: stalled_restarts(service) >= 1, 120, "the watchdog to replace the consumer")
    audit(stack, topics, stream, since=restarted)
    assert stale_answers(service, stream) == []
    assert service.get("/livez").json() == {"status": "ok"}
    log = service.log()
    assert "the consumer fetched nothing for 10 s while messages wait (" in log
    assert f"{topics.orders}/0 lag " in log or f"{topics.orders}/1 lag " in log
    assert service.process is not None
    assert service.process.poll() is None


@pytest.mark.timeout(400)
def test_a_consumer_no_new_one_gets_moving_fails_livez_until_it_moves(
    stack: Stack,
    topics: Topics,
    switch: Path,
    start_behind_the_seam: Callable[..., ServiceProcess],
) -> None:
    stream = Stream(2_000, seed=302)
    service = start_behind_the_seam(stream, 1000, KAFKA_STALL_TIMEOUT_MS="5000")
    switch.write_text("1000")  # every consumer from now on, the new ones too
    wait_until(frozen_fetching.frozen_marker(switch).exists, 30, "the consumer to freeze")
    produce(stack, topics.orders, stream.messages[1000:])

    def stuck() -> httpx.Response | None:
        response = service.get("/livez")
        return response if response.status_code == 503 else None

    response = wait_until(stuck, 150, "/livez to fail")
    reason = response.json()["stuck"]["consumer"]
    assert reason.startswith(f"nothing fetched after {RESTARTS_BEFORE_STUCK} new consumers (")
    assert stalled_restarts(service) >= RESTARTS_BEFORE_STUCK + 1
    assert "the consumer is stuck: nothing fetched" in service.log()
    switch.unlink()
    freed = time.monotonic()
    audit(stack, topics, stream, since=freed)
    wait_until(lambda: service.get("/livez").status_code == 200, 30, "/livez to pass again")
    assert stale_answers(service, stream) == []
    assert "the consumer consumes again" in service.log()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_a_member_left_without_partitions_while_messages_wait_is_replaced(
    stack: Stack,
    topics: Topics,
    switch: Path,
    start_behind_the_seam: Callable[..., ServiceProcess],
    protocol: str,
) -> None:
    # Seen once under the classic protocol: after the broker's outage the member's partitions
    # were revoked and never assigned again, and nothing else consumed them. It cannot be made
    # to happen at will, so the seam makes it: the consumer made at start drops its partitions
    # while the group still counts them as its.
    stream = Stream(4_000, seed={"classic": 306, "consumer": 307}[protocol])
    service = start_behind_the_seam(
        stream, 2000, KAFKA_GROUP_PROTOCOL=protocol, KAFKA_STALL_TIMEOUT_MS="5000"
    )
    switch.write_text("1 unassigned")
    wait_until(
        frozen_fetching.frozen_marker(switch).exists, 60, "the consumer to drop its partitions"
    )
    left_out = time.monotonic()
    produce(stack, topics.orders, stream.messages[2000:])
    produce(stack, topics.orders, second_versions(stream, 200))
    wait_until(
        lambda: stalled_restarts(service, "unassigned") >= 1,
        120,
        "the watchdog to replace the consumer",
    )
    audit(stack, topics, stream, since=left_out)
    assert stale_answers(service, stream) == []
    assert stalled_restarts(service, "stalled") == 0
    assert service.get("/livez").json() == {"status": "ok"}
    assert (
        "the consumer has had no partition, and its group has committed nothing, for 5 s "
        f"while messages wait ({topics.orders}/"
    ) in service.log()
    assert service.process is not None
    assert service.process.poll() is None


@pytest.mark.timeout(400)
@pytest.mark.parametrize("protocol", ["classic", "consumer"])
def test_a_broker_frozen_for_30_s_is_waited_out_without_a_restart_while_it_is_frozen(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess], protocol: str
) -> None:
    service = start_service(KAFKA_GROUP_PROTOCOL=protocol, KAFKA_STALL_TIMEOUT_MS="10000")
    # Orders of their own for each protocol: the test module shares one database.
    stream = Stream(6_000, seed={"classic": 303, "consumer": 304}[protocol])
    stream.start(stack, topics.orders, seconds=20)
    wait_storing(stack, stream)
    pid = stack.servers.kafka_pid()
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(30)
        # Three checks' worth of quiet, each unanswered: a new consumer would not help.
        assert stalled_restarts(service) == 0
        assert service.get("/livez").status_code == 200
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed = time.monotonic()
    stream.join()
    produce(stack, topics.orders, second_versions(stream, 200))
    audit(stack, topics, stream, since=resumed)
    assert stale_answers(service, stream) == []
    assert service.process is not None
    assert service.process.poll() is None
    print(f"restarts of a stalled consumer in all: {stalled_restarts(service):.0f}")


@pytest.mark.timeout(300)
def test_a_stop_while_the_broker_is_frozen_ends_the_process_within_its_bound(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    # librdkafka's close() waits for a coordinator that does not answer without a bound of its
    # own: a SIGTERM then left the process running until it was killed (seen: over an hour).
    service = start_service()
    stream = Stream(3_000, seed=305)
    produce(stack, topics.orders, stream.messages)
    wait_storing(stack, stream)
    pid = stack.servers.kafka_pid()
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        assert service.terminate(timeout=CONSUMER_CLOSE_TIMEOUT_SECONDS + 30) == 0
        stopped_in = time.monotonic() - stopped_at
    finally:
        os.kill(pid, signal.SIGCONT)
    assert "did not close within" in service.log()
    print(f"\nstopped {stopped_in:.1f} s after SIGTERM with the broker frozen")
    # What it had not committed is read again by the next one: nothing lost or doubled.
    service.start()
    audit(stack, topics, stream, since=stopped_at)
