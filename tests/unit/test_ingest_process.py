"""The link between the serving process and the ingest process, with real processes (spawned as
the service spawns its ingest process) standing in for the ingest: tickets, committed orders and
their order, status, the ends asked for and not, and the serving process gone."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, Pipe
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from order_viewer.adapters import ingest_process
from order_viewer.adapters.cache import OrderCache
from order_viewer.adapters.ingest_process import (
    CANNOT_GO_ON,
    IngestFailed,
    IngestLink,
    IngestProcess,
    IngestStatus,
    report_status,
)
from order_viewer.adapters.metrics import Metrics, combined
from order_viewer.service.ports import CachedOrder, CacheTicket

ORDER = CachedOrder(b'{"order_uid": "a"}', '"aa"')


def status(consuming: bool = True, stuck: dict[str, str] | None = None) -> IngestStatus:
    metrics = Metrics(None)
    metrics.orders_stored.inc(3)
    return IngestStatus(metrics.ingest_families(), consuming, None, stuck or {})


def link_of(tickets: Connection, events: Connection) -> tuple[IngestLink, threading.Event]:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return IngestLink(tickets, events, stop), stop


# The ingest processes the tests start (spawned: module-level functions).


def writes_then_waits(directory: str, tickets: Connection, events: Connection) -> None:
    """Takes a ticket, says it consumes, and writes order `a` once `directory`/write exists; stays
    until stopped, reporting its status."""
    link, stop = link_of(tickets, events)
    if not link.wait_for_go():
        sys.exit(0)
    ticket = link.ticket()
    link.report(status())
    while not (Path(directory) / "write").exists():
        time.sleep(0.01)
    link.put_written({"a": ORDER}, ticket)
    link.put_written({"b": ORDER})
    link.invalidate(["c"])
    report_status(link, status, stop)
    sys.exit(0)


def ends_by_itself(directory: str, tickets: Connection, events: Connection) -> None:
    """The first ends on SIGKILL, the second with CANNOT_GO_ON: counted in `directory`."""
    link, _ = link_of(tickets, events)
    link.wait_for_go()
    link.report(status())
    started = Path(directory) / "started"
    count = int(started.read_text()) + 1 if started.exists() else 1
    started.write_text(str(count))
    if count == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(CANNOT_GO_ON)


def falls_silent(tickets: Connection, events: Connection) -> None:
    link, stop = link_of(tickets, events)
    link.wait_for_go()
    link.report(status(stuck={"consumer": "nothing fetched"}))
    stop.wait()
    sys.exit(0)


# The serving process's side.


def running(
    process: IngestProcess, recheck: Callable[[], object] = lambda: None
) -> tuple[threading.Thread, threading.Event, list[BaseException]]:
    stop, warm = threading.Event(), threading.Event()
    warm.set()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            process.run(stop, warm, recheck)
        except BaseException as error:
            failures.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, stop, failures


def wait_until(condition: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_committed_orders_reach_the_cache_in_order_and_a_change_since_the_ticket_wins(
    tmp_path: Path,
) -> None:
    cache = OrderCache(10)
    process = IngestProcess(writes_then_waits, (str(tmp_path),), cache, 1.0)
    thread, stop, failures = running(process)
    wait_until(process.consuming)
    # Heard after the ingest process took its ticket: its write of `a` began before this
    # change was heard, so it may be older than it and must not be kept.
    cache.invalidate(["a"])
    cache.fill({"c": ORDER}, cache.ticket())
    (tmp_path / "write").touch()
    wait_until(lambda: cache.kept("b") is not None)
    assert cache.kept("a") is None
    wait_until(lambda: cache.kept("c") is None)
    assert process.families()
    exposed = {f.name: f for f in process.families()}
    assert exposed["order_viewer_orders_stored"].samples[0].value == 3
    stop.set()
    thread.join(30)
    assert not thread.is_alive()
    assert failures == []
    assert not process.consuming()


def test_an_end_unasked_is_checked_and_restarted_and_cannot_go_on_stops_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ingest_process, "FIRST_RESTART_SECONDS", 0.1)
    rechecks: list[None] = []
    process = IngestProcess(ends_by_itself, (str(tmp_path),), OrderCache(1), 1.0)
    thread, _, failures = running(process, lambda: rechecks.append(None))
    thread.join(60)
    assert not thread.is_alive()
    assert (tmp_path / "started").read_text() == "2"
    assert rechecks == [None]
    assert process.restarts == 1
    assert len(failures) == 1
    assert isinstance(failures[0], IngestFailed)
    # The counters of the process that ended are kept, and the one after adds to them.
    stored = {f.name: f for f in process.families()}["order_viewer_orders_stored"]
    assert [s.value for s in stored.samples if s.name.endswith("_total")] == [6.0]


def test_a_silent_ingest_process_is_killed_and_another_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ingest_process, "SILENT_SECONDS", 0.5)
    monkeypatch.setattr(ingest_process, "FIRST_RESTART_SECONDS", 0.1)
    rechecks: list[None] = []
    process = IngestProcess(falls_silent, (), OrderCache(1), 1.0)
    thread, stop, failures = running(process, lambda: rechecks.append(None))
    wait_until(process.consuming)
    assert process.stuck() == {"consumer": "nothing fetched"}
    wait_until(lambda: process.restarts >= 1)
    assert rechecks
    wait_until(process.consuming)
    stop.set()
    thread.join(30)
    assert failures == []


def test_the_link_stops_the_ingest_once_the_serving_process_is_gone() -> None:
    tickets, tickets_there = Pipe()
    events_here, events = Pipe(duplex=False)
    stop = threading.Event()
    link = IngestLink(tickets_there, events, stop)
    tickets.close()
    events_here.close()
    assert link.ticket() == CacheTicket(0)
    assert stop.is_set()
    link.put_written({"a": ORDER})
    link.invalidate(["a"])
    assert not link.wait_for_go()


def test_counters_and_histograms_are_added_and_the_ingests_gauges_replace_the_servings() -> None:
    def families(stored: int, lag: int | None, seconds: float, listening: int) -> list[Metric]:
        registry = CollectorRegistry()
        Counter("stored", "", registry=registry).inc(stored)
        retries = Counter("retries", "", ["kind"], registry=registry)
        retries.labels("database").inc(stored)
        if lag is not None:
            Gauge("order_viewer_consumer_lag_messages", "", registry=registry).set(lag)
        Gauge("listening", "", registry=registry).set(listening)
        Histogram("write", "", buckets=(1.0,), registry=registry).observe(seconds)
        return list(registry.collect())

    own = families(1, None, 0.5, 1)
    theirs = [f for f in families(2, 7, 2.0, 0) if f.name != "listening"]
    registry = CollectorRegistry(auto_describe=False)

    class Both(Collector):
        def collect(self) -> list[Metric]:
            return combined(own, theirs)

    registry.register(Both())
    values = {
        (sample.name, tuple(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
        if not sample.name.endswith("_created")
    }
    assert values[("stored_total", ())] == 3
    assert values[("retries_total", (("kind", "database"),))] == 3
    assert values[("order_viewer_consumer_lag_messages", ())] == 7
    assert values[("listening", ())] == 1
    assert values[("write_count", ())] == 2
    assert values[("write_sum", ())] == 2.5
    assert values[("write_bucket", (("le", "1.0"),))] == 1
    assert values[("write_bucket", (("le", "+Inf"),))] == 2


def test_the_ingest_sends_its_counters_and_its_own_gauges_only() -> None:
    names = {family.name for family in Metrics(None).ingest_families()}
    assert {"order_viewer_orders_stored", "order_viewer_consumer_lag_messages"} <= names
    assert "order_viewer_change_listener_connected" not in names
    assert "order_viewer_cache_warm_up_duration_seconds" not in names
