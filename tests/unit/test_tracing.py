"""Tracing (`adapters/tracing.py`) into an in-memory collector that decodes what it is sent as
OTLP protobuf: a message's W3C headers read defensively, each message's span and outcome, the
batch's write linked to them, the dead letter's trace, HTTP requests and their database read, the
log lines' ids, the sampling as the SDK's samplers decide, the batching, and no personal data
exported."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from threading import Event
from typing import Any, get_args

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SentSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from order_viewer.adapters import logs, otlp
from order_viewer.adapters import tracing as tracing_module
from order_viewer.adapters.cache import CachedOrder, OrderCache
from order_viewer.adapters.http.api import create_app
from order_viewer.adapters.metrics import Metrics
from order_viewer.adapters.otlp import SpanBatches
from order_viewer.adapters.tracing import (
    MAX_LINKS,
    MAX_TRACESTATE_BYTES,
    KafkaHeaders,
    Parent,
    Sampling,
    Span,
    Tracing,
    ended,
    made_current,
    parent_of,
    start_tracing,
    trace_headers,
    trace_id_of,
)
from order_viewer.config import Settings
from order_viewer.domain.masking import DELIVERY_MASKS
from order_viewer.domain.model import parse_order
from order_viewer.entrypoints.generate import encode, make_order
from order_viewer.service.ingest import OrderIngest, WriteTimeouts
from order_viewer.service.lookup import OrderLookup
from order_viewer.service.ports import ConsumedMessage, RejectedMessage
from order_viewer.service.readiness import IngestHere, Liveness, Readiness
from tests.fakes import FakeReader
from tests.unit.test_service import Ingest, order

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01".encode()


class Collector:
    """What an OTLP collector is sent, each request decoded as the protobuf it must be."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.batches: SpanBatches | None = None

    def send(self, data: bytes) -> None:
        self.requests.append(ExportTraceServiceRequest.FromString(data))

    def received(self) -> list[ExportTraceServiceRequest]:
        """Every request sent, once the spans that have ended are."""
        assert self.batches is not None
        self.batches.flush()
        return self.requests

    def spans(self) -> list[SentSpan]:
        return [
            span
            for request in self.received()
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    def clear(self) -> None:
        self.received().clear()


def collecting(*, batch_size: int = 512, delay_ms: int = 3_600_000) -> tuple[Tracing, Collector]:
    """Tracing as the SDK's OTEL_* variables say, its spans sent to a `Collector`."""
    collector = Collector()
    collector.batches = SpanBatches(
        collector.send,
        Resource.create({"service.name": "order-viewer"}),
        queue_size=100_000,
        batch_size=batch_size,
        delay_ms=delay_ms,
    )
    return start_tracing("order-viewer", collector.batches), collector


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Tracing, Collector]]:
    monkeypatch.setattr(logs, "trace_ids", None)  # start_tracing sets it; put back after
    tracing, collector = collecting()
    yield tracing, collector
    tracing.shutdown()


def message(
    offset: int, value: bytes | None, headers: KafkaHeaders | None = None
) -> ConsumedMessage:
    return ConsumedMessage("orders", 0, offset, b"key", value, trace=trace_headers(headers))


def parent(headers: list[tuple[str, bytes | None]] | None) -> tuple[str, str, str] | None:
    """The trace id, parent span id and tracestate the headers give a message's span."""
    found = parent_of(trace_headers(headers))
    if found is None:
        return None
    return f"{found.trace_id:032x}", f"{found.span_id:016x}", found.trace_state


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


def spans_named(collector: Collector, prefix: str) -> list[SentSpan]:
    return [span for span in collector.spans() if span.name.startswith(prefix)]


def attributes(span: SentSpan) -> dict[str, Any]:
    return {
        pair.key: getattr(pair.value, pair.value.WhichOneof("value")) for pair in span.attributes
    }


def ids(span: SentSpan) -> tuple[str, str]:
    """The trace and span ids of a span sent, in W3C's hex."""
    return span.trace_id.hex(), span.span_id.hex()


def own_ids(span: Span) -> tuple[str, str]:
    """The trace and span ids of a span made here, in W3C's hex."""
    return f"{span.trace_id:032x}", f"{span.span_id:016x}"


def parent_id(span: SentSpan) -> str | None:
    return span.parent_span_id.hex() or None


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
    traced: tuple[Tracing, Collector],
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
    assert first.kind == SentSpan.SPAN_KIND_CONSUMER
    assert (ids(first)[0], parent_id(first)) == (TRACE_ID, PARENT_ID)
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
    assert parent_id(consumed[2]) is None
    assert ids(consumed[2])[0] != ids(first)[0]
    (write,) = spans_named(exported, "INSERT ")
    assert {(link.trace_id.hex(), link.span_id.hex()) for link in write.links} == {
        ids(span) for span in consumed
    }
    assert (ids(write)[0], parent_id(write)) == ids(first)
    assert attributes(write)["db.system.name"] == "postgresql"
    assert attributes(write)["db.operation.name"] == "INSERT"
    assert attributes(write)["db.operation.batch.size"] == 3  # a, b and c


def test_a_dead_letter_carries_the_trace_of_its_consumption(
    traced: tuple[Tracing, Collector],
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
    traced: tuple[Tracing, Collector],
) -> None:
    tracing, exported = traced
    ingest = traced_ingest(tracing)
    ingest.writer.unavailable_for = 1
    settle(ingest, [message(0, order("a"))])
    failed, succeeded = spans_named(exported, "INSERT ")
    assert (failed.status.code, failed.status.message) == (
        Status.STATUS_CODE_ERROR,
        "DatabaseUnavailable",
    )
    assert not failed.events
    assert succeeded.status.code == Status.STATUS_CODE_UNSET


def traced_app(tracing: Tracing, reader: FakeReader, cache: OrderCache) -> httpx.AsyncClient:
    lookup = OrderLookup(reader, cache)
    readiness = Readiness(
        reader.ping, Event(), IngestHere(Event(), WriteTimeouts(Metrics(cache)), Liveness())
    )
    app = create_app(lookup, readiness, Metrics(cache), tracing=tracing)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://order-viewer")


def test_every_request_is_a_server_span_continuing_the_clients_trace(
    traced: tuple[Tracing, Collector],
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
        assert span.kind == SentSpan.SPAN_KIND_SERVER
        assert (ids(span)[0], parent_id(span)) == (TRACE_ID, PARENT_ID)
        assert attributes(span)["http.route"] in ("/order/{order_uid}", "/livez")
        assert attributes(span)["http.request.method"] == "GET"
    # Sent twice, the traceparent is no one's: a new trace.
    assert parent_id(spans[4]) is None


def test_json_log_lines_carry_the_current_spans_ids(
    traced: tuple[Tracing, Collector],
) -> None:
    tracing, _ = traced
    formatter = logs.JsonFormatter()
    record = logging.LogRecord("order_viewer.test", logging.INFO, __file__, 0, "hello", None, None)
    assert "trace_id" not in json.loads(formatter.format(record))
    span = tracing.request("GET", "/livez", [])
    assert span is not None
    current = made_current(span)
    line = json.loads(formatter.format(record))
    deferred = json.loads(formatter.line(0.0, logging.INFO, "order_viewer.audit", "read", ()))
    ended(span, current)
    for fields in (line, deferred):
        assert (fields["trace_id"], fields["span_id"]) == own_ids(span)
    assert "trace_id" not in json.loads(formatter.format(record))


def exported_bytes(collector: Collector) -> bytes:
    """Everything exported, every field of every request as sent, without the random trace and
    span ids (a zip code's digits could be in one)."""
    sent = []
    for request in collector.received():
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    for field in ("trace_id", "span_id", "parent_span_id"):
                        span.ClearField(field)
                    for link in span.links:
                        link.ClearField("trace_id")
                        link.ClearField("span_id")
        sent.append(request.SerializeToString())
    return b"\n".join(sent)


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
    traced: tuple[Tracing, Collector],
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
    exported_data = exported_bytes(exported)
    # All of it exported: the messages' spans and the requests'.
    assert b"dead_lettered" in exported_data
    assert b"GET /order/{order_uid}" in exported_data
    personal = personal_values(bodies)
    assert len(personal) > 40
    leaked = sorted(value for value in personal if value.encode() in exported_data)
    assert leaked == []


def sampling(
    monkeypatch: pytest.MonkeyPatch, sampler: str, ratio: str | None = None
) -> tuple[Tracing, Collector]:
    """Tracing whose SDK built its sampler from OTEL_TRACES_SAMPLER (and its argument)."""
    monkeypatch.setattr(logs, "trace_ids", None)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    if ratio is not None:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", ratio)
    return collecting()


def test_a_message_or_request_not_sampled_makes_no_span_and_its_letter_keeps_its_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tracing, exported = sampling(monkeypatch, "parentbased_traceidratio", "0")
    # Every span, a message's as a request's, draws its id as it starts, and only then.
    started: list[int] = []
    draw = tracing_module._new_span_id

    def counted() -> int:
        started.append(draw())
        return started[-1]

    monkeypatch.setattr(tracing_module, "_new_span_id", counted)
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
    assert [span.name for span in exported.spans()] == ["INSERT orders", "process orders"]
    assert len(started) == 2
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
    draw = tracing_module._draw

    def recorded(bits: int) -> int:
        number = draw(bits)
        if bits == 128:
            drawn.append(number)
        return number

    monkeypatch.setattr(tracing_module, "_draw", recorded)
    tracing, exported = sampling(monkeypatch, "parentbased_traceidratio", "0.5")
    settle(traced_ingest(tracing), [message(offset, order(f"o{offset}")) for offset in range(200)])
    get_a_cached_order(tracing, 200)
    assert len(drawn) == 400
    bound = TraceIdRatioBased(0.5).bound
    kept = {trace_id for trace_id in drawn if trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < bound}
    # As often as the ratio says, and on the id the trace then has.
    assert 150 < len(kept) < 250
    traced = {int.from_bytes(span.trace_id, "big") for span in exported.spans()}
    assert traced == kept
    tracing.shutdown()


def sdk_sampler(monkeypatch: pytest.MonkeyPatch, name: str, ratio: str) -> Sampler:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", name)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", ratio)
    return TracerProvider(shutdown_on_exit=False).sampler


# The samplers OTEL_TRACES_SAMPLER may name (the settings refuse any other).
SAMPLERS = get_args(get_args(Settings.model_fields["otel_traces_sampler"].annotation)[0])


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("ratio", ["0", "0.01", "0.5", "1"])
def test_sampling_decides_as_the_sdks_sampler_the_variables_name(
    monkeypatch: pytest.MonkeyPatch, name: str, ratio: str
) -> None:
    sampler = sdk_sampler(monkeypatch, name, ratio)
    sampling = Sampling.of(sampler)
    rng = random.Random(f"{name} {ratio}")
    for _ in range(3000):
        trace_id = rng.getrandbits(128) or 1
        for flags in (None, 0, 1):
            parent = (
                None
                if flags is None
                else Parent(trace_id, rng.getrandbits(64) or 1, bool(flags), "")
            )
            context = (
                None
                if parent is None
                else trace.set_span_in_context(
                    NonRecordingSpan(
                        SpanContext(trace_id, parent.span_id, True, TraceFlags(flags or 0))
                    )
                )
            )
            decided = sampler.should_sample(context, trace_id, "process orders").decision
            sampled = decided is Decision.RECORD_AND_SAMPLE
            assert sampling.kept(parent, trace_id) is sampled, (trace_id, flags)


def test_a_sampler_whose_rule_is_not_known_here_is_refused() -> None:
    # Not one the variables can make: its delegates are not the parent's decision.
    with pytest.raises(ValueError, match="no sampling rule"):
        Sampling.of(ParentBased(ALWAYS_ON, remote_parent_sampled=TraceIdRatioBased(0.5)))


def test_a_span_is_encoded_as_otlp_says_with_every_field() -> None:
    tracing, collector = collecting()
    parent = Parent(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, True, "v=1,w=2")
    span = tracing.span(
        parent.trace_id,
        parent,
        otlp.database("INSERT", "orders"),
        otlp.attribute("order_viewer.orders", 3),
        links=[(1, 2), ((1 << 128) - 1, (1 << 64) - 1)],
    )
    span.set_attribute("big", (1 << 63) - 1)
    span.set_attribute("negative", -5)
    span.set_attribute("text", "ünïcode " * 40)  # a length of two bytes
    span.set_attribute("lone surrogate", "a\udc80b")
    span.error = "DatabaseUnavailable"
    span.end()
    (request,) = collector.received()
    (resource_spans,) = request.resource_spans
    resource = {pair.key: pair.value.string_value for pair in resource_spans.resource.attributes}
    assert resource["service.name"] == "order-viewer"
    (scope_spans,) = resource_spans.scope_spans
    assert scope_spans.scope.name == "order_viewer"
    (sent,) = scope_spans.spans
    assert ids(sent) == own_ids(span)
    assert ids(sent)[0] == TRACE_ID
    assert (parent_id(sent), sent.trace_state) == (PARENT_ID, "v=1,w=2")
    assert (sent.name, sent.kind) == ("INSERT orders", SentSpan.SPAN_KIND_CLIENT)
    assert (sent.start_time_unix_nano, sent.end_time_unix_nano) == (span.start_time, span.end_time)
    assert 0 < span.end_time - span.start_time < 10**9
    assert attributes(sent) == {
        "db.system.name": "postgresql",
        "db.system": "postgresql",
        "db.operation.name": "INSERT",
        "db.collection.name": "orders",
        "order_viewer.orders": 3,
        "big": (1 << 63) - 1,
        "negative": -5,
        "text": "ünïcode " * 40,
        "lone surrogate": "a?b",
    }
    assert [(link.trace_id.hex(), link.span_id.hex()) for link in sent.links] == [
        (f"{1:032x}", f"{2:016x}"),
        ("f" * 32, "f" * 16),
    ]
    assert (sent.status.code, sent.status.message) == (
        Status.STATUS_CODE_ERROR,
        "DatabaseUnavailable",
    )
    tracing.shutdown()


def test_spans_are_sent_in_batches_as_they_fill_or_as_the_delay_ends() -> None:
    tracing, collector = collecting(batch_size=512, delay_ms=50)
    batches = collector.batches
    assert batches is not None
    for _ in range(1100):
        span = tracing.request("GET", "/livez", [])
        assert span is not None
        span.end()
    # Two full batches and the rest, without being asked: the last after the delay.
    deadline = time.monotonic() + 10
    while (
        sum(len(request.resource_spans[0].scope_spans[0].spans) for request in collector.requests)
        < 1100
    ):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert sorted(
        len(request.resource_spans[0].scope_spans[0].spans) for request in collector.requests
    ) == [76, 512, 512]
    tracing.shutdown()


def test_a_full_queue_drops_the_oldest_spans_and_says_how_many(
    caplog: pytest.LogCaptureFixture,
) -> None:
    collector = Collector()
    # Never sent unless asked: the queue fills.
    collector.batches = SpanBatches(
        collector.send, Resource.create(), queue_size=10, batch_size=10**6, delay_ms=3_600_000
    )
    tracing = start_tracing("order-viewer", collector.batches)
    made = []
    for _ in range(25):
        span = tracing.request("GET", "/livez", [])
        assert span is not None
        made.append(own_ids(span))
        span.end()
    with caplog.at_level(logging.WARNING, "order_viewer.adapters.otlp"):
        sent = [ids(span) for span in collector.spans()]
    assert sent == made[-10:]
    assert "span queue full: 15 spans dropped" in caplog.text
    tracing.shutdown()


def test_spans_dropped_while_the_queue_never_empties_are_said_batch_by_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A collector so slow that spans keep ending and overflowing the queue while each batch is
    # sent: the queue is never empty, and the drops must be said all the same.
    said_while_sending: list[bool] = []

    def slow_send(data: bytes) -> None:
        said_while_sending.append("spans dropped" in caplog.text)
        if len(said_while_sending) < 4:
            for _ in range(30):
                span = tracing.request("GET", "/livez", [])
                assert span is not None
                span.end()

    batches = SpanBatches(
        slow_send, Resource.create(), queue_size=10, batch_size=5, delay_ms=3_600_000
    )
    tracing = start_tracing("order-viewer", batches)
    for _ in range(10):
        span = tracing.request("GET", "/livez", [])
        assert span is not None
        span.end()
    with caplog.at_level(logging.WARNING, "order_viewer.adapters.otlp"):
        batches.flush()
    # Said after the first batch, which overflowed the queue, before it was ever empty: each
    # of the first three sends ended 30 spans into a queue holding 5, dropping 25.
    assert said_while_sending[:2] == [False, True]
    assert caplog.text.count("span queue full: 25 spans dropped") == 3
    tracing.shutdown()


def test_a_failed_send_loses_its_batch_only_and_the_export_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    received: list[ExportTraceServiceRequest] = []
    failures = [RuntimeError("collector gone")]

    def send(data: bytes) -> None:
        if failures:
            raise failures.pop()
        received.append(ExportTraceServiceRequest.FromString(data))

    batches = SpanBatches(send, Resource.create(), queue_size=100, batch_size=1, delay_ms=10)
    tracing = start_tracing("order-viewer", batches)
    with caplog.at_level(logging.WARNING, "order_viewer.adapters.otlp"):
        for _ in range(3):
            span = tracing.request("GET", "/livez", [])
            assert span is not None
            span.end()
            time.sleep(0.05)
        deadline = time.monotonic() + 10
        while len(received) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert "spans not exported" in caplog.text
    assert "collector gone" in caplog.text
    assert any(thread.name == "span-export" for thread in threading.enumerate())
    tracing.shutdown()


def test_a_stop_sends_what_waits_and_closes_the_exporter() -> None:
    received: list[bytes] = []
    closed: list[bool] = []
    batches = SpanBatches(
        received.append,
        Resource.create(),
        queue_size=100,
        batch_size=100,
        delay_ms=3_600_000,
        close=lambda: closed.append(True),
    )
    tracing = start_tracing("order-viewer", batches)
    for _ in range(3):
        span = tracing.request("GET", "/livez", [])
        assert span is not None
        span.end()
    assert received == []
    tracing.shutdown()
    (request,) = (ExportTraceServiceRequest.FromString(data) for data in received)
    assert len(request.resource_spans[0].scope_spans[0].spans) == 3
    assert closed == [True]
    assert not any(thread.name == "span-export" for thread in threading.enumerate())


def test_a_batch_keeps_no_more_links_than_the_sdks_default(
    traced: tuple[Tracing, Collector],
) -> None:
    tracing, exported = traced
    settle(traced_ingest(tracing), [message(offset, order(f"o{offset}")) for offset in range(300)])
    (write,) = spans_named(exported, "INSERT ")
    assert len(write.links) == MAX_LINKS


def test_a_database_read_is_a_span_only_within_a_recorded_request(
    traced: tuple[Tracing, Collector],
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
    assert (ids(span)[0], parent_id(span)) == own_ids(request)
    assert ids(span)[0] == TRACE_ID
    # A request answered without being counted is still named by its route.
    (served,) = spans_named(exported, "GET ")
    assert attributes(served)["http.route"] == "/order/{order_uid}"


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


@pytest.mark.parametrize("offset", [0, 5, 127, 128, 300, 10**6, 2**40, 2**62])
@pytest.mark.parametrize("key", [None, "b563feb7b2b84b6test", "x" * 64, "ü" * 70, "k" * 200])
def test_a_messages_own_attributes_are_encoded_as_any_attribute(
    offset: int, key: str | None
) -> None:
    expected = otlp.attribute("messaging.kafka.offset", offset)
    if key is not None:
        expected += otlp.attribute("messaging.kafka.message.key", key)
    assert otlp.message_attributes(offset, key) == expected
