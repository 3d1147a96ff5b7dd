"""Traces in a real Jaeger: orders produced with a `traceparent` and read over HTTP with one, by a
real `order-viewer serve` exporting over OTLP/HTTP; a dead letter's trace and its replay's."""

from __future__ import annotations

import json
import random
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from order_viewer.domain.masking import DELIVERY_MASKS
from order_viewer.entrypoints.generate import make_order
from tests.conftest import (
    ORDER_VIEWER,
    Record,
    ServiceProcess,
    Stack,
    Topics,
    produce,
    read_topic,
    served,
    wait_until,
)
from tests.integration.test_dlq import command_env
from tests.jaeger import Jaeger

pytestmark = pytest.mark.integration

PRODUCER_SPAN = "00f067aa0ba902b7"
READER_SPAN = "b7ad6b7169203331"


@pytest.fixture(scope="module")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jaeger]:
    running = Jaeger(tmp_path_factory.mktemp("jaeger"))
    yield running
    running.stop()


def traced_service(
    start_service: Callable[..., ServiceProcess], jaeger: Jaeger, **settings: str
) -> ServiceProcess:
    """A service exporting its spans to Jaeger within a tenth of a second."""
    return start_service(
        OTEL_EXPORTER_OTLP_ENDPOINT=jaeger.endpoint, OTEL_BSP_SCHEDULE_DELAY="100", **settings
    )


def traceparent(trace_id: str, span_id: str) -> str:
    return f"00-{trace_id}-{span_id}-01"


def tags(span: dict[str, Any]) -> dict[str, Any]:
    return {tag["key"]: tag["value"] for tag in span["tags"]}


def parent(span: dict[str, Any]) -> str | None:
    references = [ref["spanID"] for ref in span["references"] if ref["refType"] == "CHILD_OF"]
    return references[0] if references else None


def named(trace: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    return sorted(
        (span for span in trace["spans"] if span["operationName"].startswith(prefix)),
        key=lambda span: span["startTime"],
    )


def test_one_order_is_followed_from_its_producer_to_a_get(
    stack: Stack,
    topics: Topics,
    jaeger: Jaeger,
    start_service: Callable[..., ServiceProcess],
) -> None:
    # One order in memory at a time: the first read of the other goes to the database.
    service = traced_service(start_service, jaeger, CACHE_CAPACITY="1")
    trace_id = secrets.token_hex(16)
    rng = random.Random(25)
    first, second = make_order(rng), make_order(rng)
    produced = [
        Record(
            order["order_uid"].encode(),
            json.dumps(order).encode(),
            [("traceparent", traceparent(trace_id, PRODUCER_SPAN).encode())],
        )
        for order in (first, second)
    ]
    produce(stack, topics.orders, produced)
    uid = second["order_uid"]
    wait_until(lambda: served(service, uid), 30, "the second order to be served")
    wait_until(lambda: served(service, first["order_uid"]), 30, "the first to be served")
    reader = {"traceparent": traceparent(trace_id, READER_SPAN)}
    assert [service.get(f"/order/{uid}", headers=reader).status_code for _ in range(2)] == [
        200,
        200,
    ]

    trace = jaeger.wait_for(
        trace_id,
        lambda trace: (
            (len(named(trace, "process ")), len(named(trace, "GET ")), len(named(trace, "SELECT ")))
            == (2, 2, 1)
        ),
    )
    consumed = named(trace, "process ")
    assert len(consumed) == 2
    # Each order's span by its key: the two may be the first of two partitions, at one offset.
    span_of = {tags(span).get("messaging.kafka.message.key"): span for span in consumed}
    assert sorted(span_of, key=str) == sorted(order["order_uid"] for order in (first, second))
    for order in (first, second):
        span = span_of[order["order_uid"]]
        assert parent(span) == PRODUCER_SPAN
        assert {
            name: tags(span)[name]
            for name in (
                "span.kind",
                "messaging.system",
                "messaging.destination.name",
                "messaging.consumer.group.name",
                "messaging.kafka.message.key",
                "order_viewer.outcome",
            )
        } == {
            "span.kind": "consumer",
            "messaging.system": "kafka",
            "messaging.destination.name": topics.orders,
            "messaging.consumer.group.name": topics.group,
            "messaging.kafka.message.key": order["order_uid"],
            "order_viewer.outcome": "stored",
        }
        assert "messaging.destination.partition.id" in tags(span)
    writes = named(trace, "INSERT orders")
    assert writes
    linked = {ref["spanID"] for write in writes for ref in write["references"]}
    assert {span["spanID"] for span in consumed} <= linked
    for write in writes:
        assert tags(write)["db.system.name"] == "postgresql"
        assert tags(write)["db.operation.name"] == "INSERT"
        assert tags(write)["db.operation.batch.size"] >= 1
    miss, hit = named(trace, "GET /order/{order_uid}")
    assert (parent(miss), parent(hit)) == (READER_SPAN, READER_SPAN)
    assert (tags(miss)["order_viewer.cache"], tags(hit)["order_viewer.cache"]) == ("miss", "hit")
    assert tags(hit)["http.response.status_code"] == 200
    assert tags(hit)["http.route"] == "/order/{order_uid}"
    (read,) = named(trace, "SELECT orders")
    assert parent(read) == miss["spanID"]
    assert tags(read)["db.system.name"] == "postgresql"
    assert tags(read)["db.response.returned_rows"] == 1
    assert trace["processes"][read["processID"]]["serviceName"] == "order-viewer"

    everything = httpx.get(
        f"{jaeger.query}/api/traces", params={"service": "order-viewer", "limit": 1000}, timeout=10
    ).text
    personal = {
        str(order["delivery"][field]) for order in (first, second) for field in DELIVERY_MASKS
    }
    assert [value for value in personal - {""} if value in everything] == []


def test_a_dead_letter_and_its_replay_continue_the_producers_trace(
    stack: Stack,
    topics: Topics,
    jaeger: Jaeger,
    start_service: Callable[..., ServiceProcess],
    tmp_path: Path,
) -> None:
    traced_service(start_service, jaeger)
    trace_id = secrets.token_hex(16)
    produce(
        stack,
        topics.orders,
        [
            Record(
                b"bad-1", b"{nope", [("traceparent", traceparent(trace_id, PRODUCER_SPAN).encode())]
            )
        ],
    )
    (letter,) = read_topic(stack, topics.dead_letters, lambda read: len(read) >= 1)
    carried = dict(letter.headers())["traceparent"].decode()
    trace = jaeger.wait_for(trace_id, lambda trace: len(named(trace, "process ")) == 1)
    (consumed,) = named(trace, "process ")
    assert carried == traceparent(trace_id, consumed["spanID"])
    assert parent(consumed) == PRODUCER_SPAN
    assert tags(consumed)["order_viewer.outcome"] == "dead_lettered"
    assert tags(consumed)["error.type"] == "invalid_json"

    replay = subprocess.run(
        [str(ORDER_VIEWER), "dlq", "replay"], env=command_env(stack, topics),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (replay.returncode, replay.stderr) == (0, "")
    assert " sent 1 to " in replay.stdout
    trace = jaeger.wait_for(trace_id, lambda trace: len(named(trace, "process ")) == 2)
    first, again = named(trace, "process ")
    assert first["spanID"] == consumed["spanID"]
    assert parent(again) == consumed["spanID"]
    assert tags(again)["order_viewer.outcome"] == "dead_lettered"
