"""OpenTelemetry tracing: each consumed message a span of its producer's trace (W3C `traceparent`
and `tracestate` in its Kafka headers), each batch's write a span linked to its messages', each
HTTP request a server span with its database read as a child.

Off unless configured (`config.tracing_enabled`): then no tracer exists, and every part that
would trace holds None and checks that one value, so that no span object is made. When on, the
SDK reads its own `OTEL_*` variables (exporter, endpoint, sampler, resource, batching).

No personal data leaves in a span: attributes are positions, ids, counts, reason codes and route
templates; exceptions are never recorded (a database error quotes the row it refused), only
their type.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from importlib.metadata import version
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from order_viewer.adapters import logs
from order_viewer.domain.model import ORDER_UID_PATTERN
from order_viewer.service.ports import ConsumedMessage, RejectedMessage, TraceHeaders, WriteResult

SERVICE = "order-viewer"
TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
# A version-00 traceparent is 55 characters; later versions may append fields, which the
# propagator ignores. Longer values, and a tracestate beyond the 512 characters W3C asks every
# vendor to pass on, are dropped here, before any parsing: a producer cannot make the consumer
# parse megabytes per message.
MAX_TRACEPARENT_BYTES = 128
MAX_TRACESTATE_BYTES = 512

# What a message's span says it became, beside dead_lettered (whose reason code goes with it).
STORED = "stored"
DELETED = "deleted"
# Written, and the database kept what it had: the same version again, or an older one.
UNCHANGED = "unchanged"
# Not written: a later message of the same order in the same batch was.
OLDER = "older"
DEAD_LETTERED = "dead_lettered"

# Headers as confluent-kafka gives those of a consumed message.
KafkaHeaders = Sequence[tuple[str, bytes | None]]

_order_uid = re.compile(ORDER_UID_PATTERN)
_propagator = TraceContextTextMapPropagator()


def trace_headers(headers: KafkaHeaders | None) -> TraceHeaders:
    """The `traceparent` and `tracestate` of a message's Kafka headers, each kept only if it
    came once, within its bound and in ASCII; a `tracestate` without its `traceparent` means
    nothing. Whatever is left out makes the message the root of a new trace, never an error."""
    if not headers:
        return ()
    found: dict[str, bytes | None] = {}
    repeated: set[str] = set()
    for name, value in headers:
        if name in (TRACEPARENT, TRACESTATE):
            if name in found:
                repeated.add(name)
            found[name] = value
    kept: list[tuple[str, bytes]] = []
    for name, bound in ((TRACEPARENT, MAX_TRACEPARENT_BYTES), (TRACESTATE, MAX_TRACESTATE_BYTES)):
        value = found.get(name)
        if value is None or name in repeated or len(value) > bound or not value.isascii():
            if name == TRACEPARENT:
                return ()
            continue
        kept.append((name, value))
    return tuple(kept)


def parent_of(headers: TraceHeaders) -> Context:
    """The producer's span as the parent of the message's, as W3C Trace Context reads it; an
    empty context (a new trace) when the headers are missing or malformed."""
    if not headers:
        return Context()
    return _propagator.extract({name: value.decode("ascii") for name, value in headers})


def headers_of(span: Span) -> TraceHeaders:
    """The W3C headers that continue `span`'s trace downstream (a dead letter, then its
    replay)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, trace.set_span_in_context(span, Context()))
    return tuple((name, value.encode("ascii")) for name, value in carrier.items())


def _order_key(key: bytes | None) -> str | None:
    """The message's key as an attribute only when it is an order id: anything else a producer
    put there stays out of the traces."""
    if key is None or len(key) > 64 or not key.isascii():
        return None
    text = key.decode("ascii")
    return text if _order_uid.fullmatch(text) else None


class KafkaBatchTrace:
    """The spans of one batch of consumed messages: one per message (a consumer span of its
    producer's trace, ended when the batch is settled, with what became of the message), and one
    per attempt at writing the batch, linked to every message's span (`service.ports.BatchTrace`).
    """

    def __init__(
        self, tracer: trace.Tracer, messages: Sequence[ConsumedMessage], group: str
    ) -> None:
        self._tracer = tracer
        self._messages = messages
        self._spans = [self._consumed(message, group) for message in messages]
        self._written: dict[str, str] = {}
        # Each message's span by the message's identity, made for the first dead letter.
        self._span_of: dict[int, Span] | None = None

    def _consumed(self, message: ConsumedMessage, group: str) -> Span:
        attributes: dict[str, str | int] = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": message.topic,
            "messaging.destination.partition.id": str(message.partition),
            "messaging.kafka.offset": message.offset,
            "messaging.consumer.group.name": group,
        }
        key = _order_key(message.key)
        if key is not None:
            attributes["messaging.kafka.message.key"] = key
        return self._tracer.start_span(
            f"process {message.topic}",
            context=parent_of(message.trace),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            record_exception=False,
        )

    @contextmanager
    def _writing(self, orders: int, deletions: int) -> Iterator[None]:
        # A child of the first sampled message's span, so that following one order shows the
        # write; linked to all of them, and sampled only if one of them is.
        parent = next((span for span in self._spans if span.is_recording()), self._spans[0])
        span = self._tracer.start_span(
            "INSERT orders",
            context=trace.set_span_in_context(parent, Context()),
            kind=SpanKind.CLIENT,
            links=[Link(span.get_span_context()) for span in self._spans],
            attributes={
                "db.system.name": "postgresql",
                "db.system": "postgresql",
                "db.operation.name": "INSERT",
                "db.collection.name": "orders",
                "db.operation.batch.size": orders + deletions,
                "order_viewer.orders": orders,
                "order_viewer.deletions": deletions,
            },
            record_exception=False,
        )
        try:
            yield
        except BaseException as error:
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            raise
        finally:
            span.end()

    def writing(self, orders: int, deletions: int) -> AbstractContextManager[None]:
        return self._writing(orders, deletions)

    def written(self, result: WriteResult) -> None:
        for uid in (*result.inserted, *result.replaced):
            self._written[uid] = STORED
        for uid in result.deleted:
            self._written[uid] = DELETED

    def settled(
        self, kept: Mapping[str, ConsumedMessage], rejected: Sequence[RejectedMessage]
    ) -> None:
        outcomes: dict[int, tuple[str, str | None]] = {
            id(entry.message): (DEAD_LETTERED, entry.rejection.code) for entry in rejected
        }
        for uid, message in kept.items():
            outcomes.setdefault(id(message), (self._written.get(uid, UNCHANGED), None))
        for message, span in zip(self._messages, self._spans, strict=True):
            outcome, reason = outcomes.get(id(message), (OLDER, None))
            span.set_attribute("order_viewer.outcome", outcome)
            if reason is not None:
                span.set_attribute("error.type", reason)
                span.set_status(Status(StatusCode.ERROR, reason))
            span.end()

    def onward(self, message: ConsumedMessage) -> TraceHeaders:
        if self._span_of is None:
            self._span_of = {
                id(consumed): span
                for consumed, span in zip(self._messages, self._spans, strict=True)
            }
        span = self._span_of.get(id(message))
        if span is None or not span.get_span_context().is_valid:
            return message.trace
        return headers_of(span)


class Tracing:
    """The service's tracer: made only when tracing is on (`start_tracing`)."""

    def __init__(self, provider: TracerProvider, group: str) -> None:
        self._provider = provider
        self._group = group
        self.tracer = provider.get_tracer("order_viewer", version("order-viewer"))

    def batch(self, messages: Sequence[ConsumedMessage]) -> KafkaBatchTrace:
        return KafkaBatchTrace(self.tracer, messages, self._group)

    @contextmanager
    def request(
        self, method: str, route: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> Iterator[Span]:
        """A server span for one HTTP request, current while it is answered, continuing the
        client's `traceparent` if it sent a valid one (once, as for a message)."""
        span = self.tracer.start_span(
            f"{method} {route}",
            context=parent_of(
                trace_headers(
                    [(name.decode("latin-1"), value) for name, value in headers if name in _W3C]
                )
            ),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route},
            record_exception=False,
        )
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            yield span
        except BaseException as error:
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            raise
        finally:
            otel_context.detach(token)
            span.end()

    @contextmanager
    def database_read(self, collection: str) -> Iterator[Span]:
        """A client span for one read of the database, a child of the request that made it."""
        span = self.tracer.start_span(
            f"SELECT {collection}",
            kind=SpanKind.CLIENT,
            attributes={
                "db.system.name": "postgresql",
                "db.system": "postgresql",
                "db.operation.name": "SELECT",
                "db.collection.name": collection,
            },
            record_exception=False,
        )
        try:
            yield span
        except BaseException as error:
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
            raise
        finally:
            span.end()

    def shutdown(self) -> None:
        """Export the spans still waiting, then stop (at SIGTERM's stop of `serve`)."""
        self._provider.shutdown()


# The request headers that carry a trace, as ASGI names them.
_W3C = (TRACEPARENT.encode(), TRACESTATE.encode())


def answered(status: int, cache: str | None) -> None:
    """The current request's span told its status and, for an order, whether the cache
    answered it."""
    span = trace.get_current_span()
    span.set_attribute("http.response.status_code", status)
    if cache is not None:
        span.set_attribute("order_viewer.cache", cache)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


def current_ids() -> tuple[str, str] | None:
    """The trace and span ids of the current span, in W3C's hex, for the log lines; None
    outside a recorded span."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def start_tracing(group: str, processor: SpanProcessor | None = None) -> Tracing:
    """The tracer, exporting over OTLP/HTTP as the `OTEL_*` variables say (or to `processor`,
    for the tests), and the JSON log lines told to carry the current span's ids."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: SERVICE}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor or BatchSpanProcessor(OTLPSpanExporter()))
    # A message's malformed tracestate is dropped; the SDK would also log it, member by member,
    # once per message: a producer could fill the log.
    for noisy in ("opentelemetry.trace.span", "opentelemetry.trace.propagation.tracecontext"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logs.trace_ids = current_ids
    return Tracing(provider, group)
