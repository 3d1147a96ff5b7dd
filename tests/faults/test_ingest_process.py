"""The ingest process beside the serving one, killed: the serving process notices, checks its
cache and starts another, losing nothing; and an ingest process whose serving process was
killed dies with it, as one process would, instead of consuming on unseen."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import ServiceProcess, Stack, Topics, children, produce, wait_until
from tests.faults.test_scenarios import Stream, audit, http_status

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def ingest_pid(service: ServiceProcess) -> int | None:
    """The pid of the service's ingest process (a child started by multiprocessing's spawn),
    or None while it has none (a zombie's command line is empty)."""
    assert service.process is not None
    for pid in children(service.process.pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in command:
            return pid
    return None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def replaced(service: ServiceProcess, killed: int) -> bool:
    pid = ingest_pid(service)
    return pid is not None and pid != killed


def test_a_killed_ingest_process_is_replaced_and_nothing_is_lost_or_served_stale(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    service = start_service(KAFKA_SESSION_TIMEOUT_MS="6000")
    stream = Stream(20_000, seed=301).start(stack, topics.orders, seconds=10)
    first = list(stream.valid)[:20]
    wait_until(lambda: all(http_status(service, uid) == 200 for uid in first), 60, "orders served")
    for _ in range(2):
        killed = ingest_pid(service)
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        wait_until(partial(replaced, service, killed), 30, "another ingest process")
        time.sleep(2)
    last_fault = time.monotonic()
    stream.join()
    audit(stack, topics, stream, since=last_fault)
    assert service.process is not None
    assert service.process.poll() is None, "the serving process must stay up"
    log = service.log()
    assert log.count("the ingest process ended unasked (on signal 9)") == 2
    assert "the cached orders are checked against the database" in log

    # A new version of an order cached before the kills replaces it in what is served.
    uid = first[0]
    changed = dict(stream.valid[uid], internal_signature="after the kills")
    produce(stack, topics.orders, [(uid.encode(), json.dumps(changed).encode())])
    wait_until(
        lambda: service.get(f"/order/{uid}").json().get("internal_signature") == "after the kills",
        30,
        "the new version served",
    )
    wait_until(lambda: service.get("/readyz").status_code == 200, 30, "ready again")


def test_an_ingest_process_dies_with_its_serving_process(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    # The successor waits for the killed member's session to end: 6 s rather than 45.
    service = start_service(KAFKA_SESSION_TIMEOUT_MS="6000")
    child = ingest_pid(service)
    assert child is not None
    service.kill()
    wait_until(lambda: not alive(child), 5, "the ingest process to die")
    successor = start_service(KAFKA_SESSION_TIMEOUT_MS="6000")
    order = Stream(1, seed=302, invalid_share=0)
    produce(stack, topics.orders, order.messages)
    (uid,) = order.valid
    wait_until(lambda: http_status(successor, uid) == 200, 60, "the order served")
