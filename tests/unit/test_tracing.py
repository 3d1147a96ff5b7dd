"""Tracing (`adapters/tracing.py`) into an in-memory exporter: a message's W3C headers read
defensively, each message's span and outcome, the batch's write linked to them, the dead letter's
trace, HTTP requests and their database read, the log lines' ids, and no personal data exported."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from collections.abc import Iterator
from threading import Event
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_ON,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanContext, SpanKind

from order_viewer.adapters import logs
from order_viewer.adapters.cache import CachedOrder, OrderCache
from order_viewer.adapters.http.api import create_app
from order_viewer.adapters.metrics import Metrics
from order_viewer.adapters.tracing import (
    MAX_TRACESTATE_BYTES,
    KafkaHeaders,
    Tracing,
    batch_processor,
    ended,
    made_current,
    new_trace_bound,
    parent_of,
    start_tracing,
    trace_headers,
    trace_id_of,
)
from order_viewer.domain.masking import DELIVERY_MASKS
from order_viewer.domain.model import parse_order
from order_viewer.entrypoints.generate import encode, make_order
from order_viewer.service.ingest import OrderIngest, WriteTimeouts
from order_viewer.service.lookup import OrderLookup
from order_viewer.service.ports import ConsumedMessage, RejectedMessage
from order_viewer.service.readiness import Liveness, Readiness
from tests.fakes import FakeReader
from tests.unit.test_service import Ingest, order

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01".encode()


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Tracing, InMemorySpanExporter]]:
    monkeypatch.setattr(logs, "trace_ids", None)  # start_tracing sets it; put back after
    exported = InMemorySpanExporter()
    tracing = start_tracing("order-viewer", SimpleSpanProcessor(exported))
    yield tracing, exported
    tracing.shutdown()


def message(
    offset: int, value: bytes | None, headers: KafkaHeaders | None = None
) -> ConsumedMessage:
    return ConsumedMessage("orders", 0, offset, b"key", value, trace=trace_headers(headers))


def parent(headers: list[tuple[str, bytes | None]] | None) -> tuple[str, str, str] | None:
    """The trace id, parent span id and tracestate the headers give a message's span."""
    context = trace.get_current_span(parent_of(trace_headers(headers))).get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}", context.trace_state.to_header()


def test_a_valid_traceparent_and_tracestate_continue_the_producers_trace() -> None:
    headers: list[tuple[str, bytes | None]] = [
        ("other", b"x"),
        ("traceparent", TRACEPARENT),
        ("tracestate", b"vendor=abc,other=1"),
    ]
    assert parent(headers) == (TRACE_ID, PARENT_ID, "vendor=abc,other=1")


@pytest.mark.parametrize(
    "headers",
    [
        None,
        [],
        [("other", b"x")],
        [("traceparent", None)],
        [("traceparent", b"")],
        [("traceparent", b"not a traceparent")],
        [("traceparent", f"00-{TRACE_ID}-{PARENT_ID}".encode())],
        [("traceparent", f"00-{'0' * 32}-{PARENT_ID}-01".encode())],
        [("traceparent", f"00-{TRACE_ID}-{'0' * 16}-01".encode())],
        [("traceparent", f"ff-{TRACE_ID}-{PARENT_ID}-01".encode())],
        [("traceparent", f"00-{TRACE_ID.upper()}-{PARENT_ID}-01".encode())],
        [("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01-extra".encode())],
        [("traceparent", TRACEPARENT.replace(b"4", "४".encode()))],
        [("traceparent", b"\xff\xfe" + TRACEPARENT)],
        [("traceparent", TRACEPARENT + b"\x00")],
        # Oversized: a later version may append fields, but not kilobytes of them.
        [("traceparent", b"01" + TRACEPARENT[2:] + b"-" + b"a" * 200)],
        [("traceparent", TRACEPARENT + b" " * 10_000_000)],
        # Duplicated, even identical: W3C's rule, which one would be the producer's?
        [("traceparent", TRACEPARENT), ("traceparent", TRACEPARENT)],
        [("traceparent", TRACEPARENT), ("traceparent", b"garbage")],
        # A tracestate alone carries no trace.
        [("tracestate", b"vendor=abc")],
        # Header names are case-sensitive in Kafka, and this is not ours.
        [("Traceparent", TRACEPARENT)],
    ],
)
def test_a_missing_malformed_oversized_or_duplicated_traceparent_starts_a_new_trace(
    headers: list[tuple[str, bytes | None]] | None,
) -> None:
    assert parent(headers) is None


@pytest.mark.parametrize(
    "tracestate",
    [
        b"",
        b"not a member",
        b"vendor=abc,vendor=def",  # the same key twice
        b"UPPER=case",
        b"vendor=a\x00b",
        "vendor=ünicode".encode(),
        b"vendor=abc," * 40,  # beyond 32 members
        b"v=" + b"a" * MAX_TRACESTATE_BYTES,  # beyond what W3C asks to pass on
        b"v=" + b"a" * 10_000_000,
    ],
)
def test_a_hostile_tracestate_is_dropped_and_the_trace_goes_on(tracestate: bytes) -> None:
    headers: list[tuple[str, bytes | None]] = [
        ("traceparent", TRACEPARENT),
        ("tracestate", tracestate),
    ]
    assert parent(headers) == (TRACE_ID, PARENT_ID, "")


def test_a_duplicated_tracestate_is_dropped_and_the_trace_goes_on() -> None:
    headers: list[tuple[str, bytes | None]] = [
        ("traceparent", TRACEPARENT),
        ("tracestate", b"a=1"),
        ("tracestate", b"b=2"),
    ]
    assert parent(headers) == (TRACE_ID, PARENT_ID, "")


def spans_named(exported: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [span for span in exported.get_finished_spans() if span.name.startswith(prefix)]


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def ids(span: ReadableSpan | SpanContext | None) -> tuple[str, str]:
    """The trace and span ids of a span, or of a span's parent, in W3C's hex."""
    context = span.get_span_context() if isinstance(span, ReadableSpan) else span
    assert context is not None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def traced_ingest(tracing: Tracing) -> Ingest:
    ingest = Ingest()
    ingest.service = OrderIngest(
        [ingest.writer],
        ingest.cache,
        ingest.dead_letters,
        ingest.patience,
        ingest.metrics,
        tracing=tracing,
    )
    return ingest


def settle(ingest: Ingest, messages: list[ConsumedMessage]) -> None:
    batch = ingest.service.prepare(messages)
    ingest.service.settle(batch, ingest.service.store(batch), ingest.acknowledge)


def test_each_message_is_a_span_of_its_producers_trace_with_its_outcome(
    traced: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exported = traced
    ingest = traced_ingest(tracing)
    settle(ingest, [message(0, order("a"))])
    exported.clear()
    producer = [("traceparent", TRACEPARENT)]
    settle(
        ingest,
        [
            message(1, order("b", name="Old Name"), producer),  # lost to offset 2
            message(2, order("b"), producer),
            message(3, order("a")),  # the same version again
            message(4, b"{nope", producer),
            ConsumedMessage("orders", 0, 5, b"c", order("c")),
        ],
    )
    consumed = sorted(
        spans_named(exported, "process "), key=lambda s: attributes(s)["messaging.kafka.offset"]
    )
    assert [attributes(span)["order_viewer.outcome"] for span in consumed] == [
        "older", "stored", "unchanged", "dead_lettered", "stored",
    ]  # fmt: skip
    assert attributes(consumed[3])["error.type"] == "invalid_json"
    first = consumed[0]
    assert first.kind is SpanKind.CONSUMER
    assert first.parent is not None
    assert (ids(first)[0], ids(first.parent)[1]) == (
        TRACE_ID,
        PARENT_ID,
    )
    assert attributes(first) == {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": "orders",
        "messaging.destination.partition.id": "0",
        "messaging.kafka.offset": 1,
        "messaging.consumer.group.name": "order-viewer",
        "messaging.kafka.message.key": "key",
        "order_viewer.outcome": "older",
    }
    # Without a traceparent, a message is the root of its own trace.
    assert consumed[2].parent is None
    assert ids(consumed[2])[0] != ids(first)[0]
    (write,) = spans_named(exported, "INSERT ")
    assert {ids(link.context) for link in write.links} == {ids(span) for span in consumed}
    assert write.parent is not None
    assert ids(write.parent) == ids(first)
    assert attributes(write)["db.system.name"] == "postgresql"
    assert attributes(write)["db.operation.name"] == "INSERT"
    assert attributes(write)["db.operation.batch.size"] == 3  # a, b and c


def test_a_dead_letter_carries_the_trace_of_its_consumption(
    traced: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exported = traced
    ingest = traced_ingest(tracing)
    settle(
        ingest,
        [message(0, b"{nope", [("traceparent", TRACEPARENT), ("tracestate", b"v=1")])],
    )
    (letter,) = ingest.dead_letters.sent
    (consumed,) = spans_named(exported, "process ")
    span_id = ids(consumed)[1]
    assert letter.trace == (
        ("traceparent", f"00-{TRACE_ID}-{span_id}-01".encode()),
        ("tracestate", b"v=1"),
    )


def test_untraced_a_dead_letter_passes_on_the_messages_own_trace() -> None:
    ingest = Ingest()
    settle(ingest, [message(0, b"{nope", [("traceparent", TRACEPARENT)])])
    (letter,) = ingest.dead_letters.sent
    assert letter == RejectedMessage(letter.message, letter.rejection)
    assert letter.message.trace == (("traceparent", TRACEPARENT),)


def test_a_failed_write_attempt_is_a_span_with_an_error_and_no_exception_text(
    traced: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exported = traced
    ingest = traced_ingest(tracing)
    ingest.writer.unavailable_for = 1
    settle(ingest, [message(0, order("a"))])
    failed, succeeded = spans_named(exported, "INSERT ")
    assert failed.status.description == "DatabaseUnavailable"
    assert not failed.events
    assert succeeded.status.is_unset


def traced_app(tracing: Tracing, reader: FakeReader, cache: OrderCache) -> httpx.AsyncClient:
    lookup = OrderLookup(reader, cache)
    readiness = Readiness(reader.ping, Event(), Event(), WriteTimeouts(Metrics(cache)), Liveness())
    app = create_app(lookup, readiness, Metrics(cache), tracing=tracing)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://order-viewer")


def test_every_request_is_a_server_span_continuing_the_clients_trace(
    traced: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exported = traced
    cache = OrderCache(100)
    stored = {"hit": order("hit"), "miss": order("miss")}
    cache.put_written({"hit": CachedOrder.of(stored["hit"], b"0" * 32)})

    async def scenario() -> None:
        async with traced_app(tracing, FakeReader(stored), cache) as client:
            headers = {"traceparent": TRACEPARENT.decode()}
            for path in ("/order/hit", "/order/miss", "/order/none", "/livez"):
                await client.get(path, headers=headers)
            await client.get("/order/hit", headers=[("traceparent", TRACEPARENT.decode())] * 2)

    asyncio.run(scenario())
    spans = spans_named(exported, "GET ")
    assert [
        (
            span.name,
            attributes(span)["http.response.status_code"],
            attributes(span).get("order_viewer.cache"),
        )
        for span in spans
    ] == [
        ("GET /order/{order_uid}", 200, "hit"),
        ("GET /order/{order_uid}", 200, "miss"),
        ("GET /order/{order_uid}", 404, "miss"),
        ("GET /livez", 200, None),
        ("GET /order/{order_uid}", 200, "hit"),
    ]
    for span in spans[:4]:
        assert span.kind is SpanKind.SERVER
        assert span.parent is not None
        assert ids(span.parent)[1] == PARENT_ID
        assert attributes(span)["http.route"] in ("/order/{order_uid}", "/livez")
    # Sent twice, the traceparent is no one's: a new trace.
    assert spans[4].parent is None


def test_json_log_lines_carry_the_current_spans_ids(
    traced: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, _ = traced
    formatter = logs.JsonFormatter()
    record = logging.LogRecord("order_viewer.test", logging.INFO, __file__, 0, "hello", None, None)
    assert "trace_id" not in json.loads(formatter.format(record))
    with tracing.tracer.start_as_current_span("work") as span:
        line = json.loads(formatter.format(record))
        deferred = json.loads(formatter.line(0.0, logging.INFO, "order_viewer.audit", "read", ()))
    for fields in (line, deferred):
        assert (fields["trace_id"], fields["span_id"]) == ids(span.get_span_context())


def exported_text(exported: InMemorySpanExporter) -> str:
    """Everything exported: names, attributes, events, links, status and resource of every
    span, as JSON, without the random trace and span ids (a zip code could be in one)."""
    text = "\n".join(span.to_json() for span in exported.get_finished_spans())
    return re.sub(r"0x[0-9a-f]{16,32}", "", text)


def personal_values(bodies: list[bytes]) -> set[str]:
    """The delivery fields `domain/masking.py` masks, of each order sent (an empty one is in
    every text)."""
    values = {
        str(getattr(parse_order(body).delivery, field))
        for body in bodies
        for field in DELIVERY_MASKS
    }
    return values - {""}


def test_no_personal_value_of_an_order_is_exported(
    traced: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exported = traced
    rng = random.Random(25)
    bodies = [encode(make_order(rng)) for _ in range(20)]
    uids = [parse_order(body).order_uid for body in bodies]
    ingest = traced_ingest(tracing)
    # Some stored, one refused by the database (its error quotes the row), one dead-lettered.
    ingest.writer.refuse.add(uids[1])
    ingest.writer.unavailable_for = 1
    hostile = bodies[2].replace(b'"order_uid"', b'"order_uid": 5, "x"')
    settle(
        ingest,
        [
            ConsumedMessage(
                "orders", 0, offset, uid.encode(), body, trace=(("traceparent", TRACEPARENT),)
            )
            for offset, (uid, body) in enumerate(zip(uids, bodies, strict=True))
        ]
        + [ConsumedMessage("orders", 0, 99, b"x", hostile)],
    )
    cache = OrderCache(5)

    async def scenario() -> None:
        async with traced_app(
            tracing, FakeReader(dict(zip(uids, bodies, strict=True))), cache
        ) as client:
            for uid in uids:
                await client.get(f"/order/{uid}")
                await client.get(f"/order/{uid}")

    asyncio.run(scenario())
    text = exported_text(exported)
    # All of it exported: the messages' spans and the requests'.
    assert "dead_lettered" in text
    assert "GET /order/{order_uid}" in text
    personal = personal_values(bodies)
    assert len(personal) > 40
    leaked = sorted(value for value in personal if value in text)
    assert leaked == []


def sampling(
    monkeypatch: pytest.MonkeyPatch, sampler: str, ratio: str | None = None
) -> tuple[Tracing, InMemorySpanExporter]:
    """Tracing whose SDK built its sampler from OTEL_TRACES_SAMPLER (and its argument)."""
    monkeypatch.setattr(logs, "trace_ids", None)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    if ratio is not None:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", ratio)
    exported = InMemorySpanExporter()
    return start_tracing("order-viewer", SimpleSpanProcessor(exported)), exported


def test_a_message_or_request_not_sampled_makes_no_span_and_its_letter_keeps_its_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracing, exported = sampling(monkeypatch, "parentbased_traceidratio", "0")
    started: list[str] = []
    start_span = tracing.tracer.start_span

    def counted(name: str, *args: Any, **kwargs: Any) -> trace.Span:
        started.append(name)
        return start_span(name, *args, **kwargs)

    monkeypatch.setattr(tracing.tracer, "start_span", counted)
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00".encode()
    ingest = traced_ingest(tracing)
    settle(
        ingest,
        [
            message(0, order("a")),  # a new trace, at a ratio of 0
            message(1, b"{nope", [("traceparent", unsampled)]),  # the producer's: not sampled
            message(2, b"{nope"),
        ],
    )
    cache = OrderCache(100)
    cache.put_written({"hit": CachedOrder.of(order("hit"), b"0" * 32)})

    async def scenario() -> None:
        async with traced_app(tracing, FakeReader({"miss": order("miss")}), cache) as client:
            for path in ("/order/hit", "/order/miss", "/livez"):
                assert (await client.get(path)).status_code == 200

    asyncio.run(scenario())
    assert started == []
    # The letters carry the trace the messages came with, none made up for them.
    assert [letter.trace for letter in ingest.dead_letters.sent] == [
        (("traceparent", unsampled),),
        (),
    ]
    # A producer's sampled trace is followed whatever the ratio (parent-based).
    settle(ingest, [message(3, order("b"), [("traceparent", TRACEPARENT)])])
    assert started == ["process orders", "INSERT orders"]
    (consumed,) = spans_named(exported, "process ")
    assert ids(consumed)[0] == TRACE_ID
    tracing.shutdown()


def get_a_cached_order(tracing: Tracing, times: int, *then: dict[str, str]) -> None:
    """`GET` a cached order `times` times without headers, then once with each of `then`."""
    cache = OrderCache(100)
    cache.put_written({"hit": CachedOrder.of(order("hit"), b"0" * 32)})

    async def scenario() -> None:
        async with traced_app(tracing, FakeReader({}), cache) as client:
            for _ in range(times):
                await client.get("/order/hit")
            for headers in then:
                await client.get("/order/hit", headers=headers)

    asyncio.run(scenario())


def test_a_new_trace_is_sampled_on_the_trace_id_its_spans_get(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    drawn: list[int] = []
    generate = RandomIdGenerator.generate_trace_id

    def recorded(self: RandomIdGenerator) -> int:
        drawn.append(generate(self))
        return drawn[-1]

    monkeypatch.setattr(RandomIdGenerator, "generate_trace_id", recorded)
    tracing, exported = sampling(monkeypatch, "parentbased_traceidratio", "0.5")
    settle(traced_ingest(tracing), [message(offset, order(f"o{offset}")) for offset in range(200)])
    get_a_cached_order(tracing, 200)
    bound = TraceIdRatioBased(0.5).bound
    kept = {trace_id for trace_id in drawn if trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < bound}
    # As often as the ratio says (not its square, as a second draw at the span's start would).
    assert 150 < len(kept) < 250
    traced = {span.context.trace_id for span in exported.get_finished_spans() if span.context}
    assert traced == kept
    tracing.shutdown()


@pytest.mark.parametrize(
    ("sampler", "bound"),
    [
        (TraceIdRatioBased(0.01), TraceIdRatioBased(0.01).bound),
        (ParentBasedTraceIdRatio(0.25), TraceIdRatioBased(0.25).bound),
        (DEFAULT_ON, None),
        (ALWAYS_ON, None),
        (ALWAYS_OFF, None),
        # Another root under a parent-based sampler, or a ratio below another kind of sampler,
        # is not the comparison alone: the sampler is asked.
        (ParentBased(TraceIdRatioBased(0.5), remote_parent_sampled=ALWAYS_OFF), None),
    ],
)
def test_only_a_ratio_samplers_decision_on_a_new_trace_is_made_without_it(
    sampler: Sampler, bound: int | None
) -> None:
    assert new_trace_bound(sampler) == bound


@pytest.mark.parametrize("sampler", ["traceidratio", "parentbased_traceidratio"])
def test_a_ratio_sampler_is_asked_only_as_a_kept_new_traces_span_starts(
    monkeypatch: pytest.MonkeyPatch, sampler: str
) -> None:
    tracing, exported = sampling(monkeypatch, sampler, "0.5")
    provider_sampler = tracing.tracer.sampler  # type: ignore[attr-defined]
    asked: list[str] = []
    should_sample = provider_sampler.should_sample

    def counted(*args: Any, **kwargs: Any) -> Any:
        asked.append(args[2] if len(args) > 2 else kwargs["name"])
        return should_sample(*args, **kwargs)

    monkeypatch.setattr(provider_sampler, "should_sample", counted)
    # A client's trace, the last request, is the sampler's to judge (a ratio of it, or its flag).
    get_a_cached_order(tracing, 200, {"traceparent": TRACEPARENT.decode()})
    kept = spans_named(exported, "GET ")
    assert 50 < len(kept) < 150
    # Once a kept span, as the SDK starts it; once more for the client's trace, asked first.
    assert len(asked) == len(kept) + 1
    tracing.shutdown()


def test_the_span_queue_holds_two_of_the_largest_batches_unless_the_sdks_variable_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def queue_size(largest_batch: int) -> int:
        provider = TracerProvider()
        processor = batch_processor(largest_batch, InMemorySpanExporter())
        provider.add_span_processor(processor)
        # The SDK's own attribute: it has no other way to tell its queue's size.
        size: int = processor._batch_processor._max_queue_size
        provider.shutdown()
        return size

    monkeypatch.delenv("OTEL_BSP_MAX_QUEUE_SIZE", raising=False)
    assert [queue_size(largest_batch) for largest_batch in (1, 2000, 50_000)] == [
        2048,
        4002,
        100_002,
    ]
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "1000")
    assert queue_size(2000) == 1000


def test_a_database_read_is_a_span_only_within_a_recorded_request(
    traced: tuple[Tracing, InMemorySpanExporter],
) -> None:
    tracing, exported = traced
    # Outside a request, or in one not sampled, it would begin a trace of its own.
    assert tracing.database_read("orders") is None
    request = tracing.request("GET", "/order/some-order", [(b"traceparent", TRACEPARENT)])
    assert request is not None
    current = made_current(request)
    read = tracing.database_read("orders")
    assert read is not None
    read.end()
    ended(request, current)
    (span,) = spans_named(exported, "SELECT ")
    assert span.parent is not None
    assert ids(span.parent) == ids(request.get_span_context())
    assert ids(span)[0] == TRACE_ID


@pytest.mark.parametrize(
    ("headers", "kept"),
    [
        ((("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),),
         "4bf92f3577b34da6a3ce929d0e0e4736"),
        # A later version may append fields; version ff is invalid, as is an all-zero id.
        ((("traceparent", b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"),),
         "4bf92f3577b34da6a3ce929d0e0e4736"),
        ((("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"),),
         None),
        ((("traceparent", b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),), None),
        ((("traceparent", b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01"),), None),
        ((("traceparent", b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),), None),
        ((("traceparent", b"00-4bf92f3577b34da6-00f067aa0ba902b7-01"),), None),
        ((("traceparent", b"'; DROP TABLE order_trail; --"),), None),
        ((("traceparent", b""),), None),
        ((("tracestate", b"vendor=x"),), None),
        ((), None),
    ],
)  # fmt: skip
def test_the_trace_id_a_trail_keeps_is_a_valid_traceparents_alone(
    headers: tuple[tuple[str, bytes], ...], kept: str | None
) -> None:
    assert trace_id_of(headers) == kept
