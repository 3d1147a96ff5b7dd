"""OpenTelemetry tracing: each consumed message a span of its producer's trace (W3C `traceparent`
and `tracestate` in its Kafka headers), each batch's write a span linked to its messages', each
HTTP request a server span with its database read as a child.

Off unless configured (`config.tracing_enabled`): then no tracer exists, and every part that
would trace holds None and checks that one value, so that no span object is made. When on, the
SDK reads its own `OTEL_*` variables (exporter, endpoint, sampler, resource, batching), and a
message or request the SDK's sampler does not keep costs its decision only: the sampler is asked
before any span, context or attribute is made (`Tracing.sampled`), so that at 1 % the other 99 %
pay one random draw and one call (the figures are in docs/PERFORMANCE.md).

No personal data leaves in a span: attributes are positions, ids, counts, reason codes and route
templates; exceptions are never recorded (a database error quotes the row it refused), only
their type.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import Token
from importlib.metadata import version
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from order_viewer.adapters import logs
from order_viewer.adapters.metrics import route_template
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

# The SDK's variable that sizes its queue of finished spans.
QUEUE_SIZE: Final = "OTEL_BSP_MAX_QUEUE_SIZE"

# Headers as confluent-kafka gives those of a consumed message.
KafkaHeaders = Sequence[tuple[str, bytes | None]]

_order_uid = re.compile(ORDER_UID_PATTERN)
_propagator = TraceContextTextMapPropagator()
# The parent of a span that begins a new trace.
_NO_PARENT: Final = Context()


# W3C trace context: version, trace id, parent id, flags; version 00 has exactly these fields,
# a later one may append more; version ff and an all-zero trace id are invalid.
_TRACEPARENT_FIELDS = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
_NO_TRACE_ID = b"0" * 32


def trace_id_of(trace: TraceHeaders) -> str | None:
    """The id of the trace a message's `traceparent` (kept by `trace_headers`) names, or None
    if it has none or an invalid one: what its trail entry keeps, sampled here or not."""
    for name, value in trace:
        if name != TRACEPARENT:
            continue
        found = _TRACEPARENT_FIELDS.match(value)
        if (
            found is None
            or found[1] == b"ff"
            or (found[1] == b"00" and len(value) != found.end())
            or found[2] == _NO_TRACE_ID
        ):
            return None
        return found[2].decode("ascii")
    return None


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
        return _NO_PARENT
    return _propagator.extract({name: value.decode("ascii") for name, value in headers})


def headers_of(span: Span) -> TraceHeaders:
    """The W3C headers that continue `span`'s trace downstream (a dead letter, then its
    replay)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, trace.set_span_in_context(span, _NO_PARENT))
    return tuple((name, value.encode("ascii")) for name, value in carrier.items())


def _order_key(key: bytes | None) -> str | None:
    """The message's key as an attribute only when it is an order id: anything else a producer
    put there stays out of the traces."""
    if key is None or len(key) > 64 or not key.isascii():
        return None
    text = key.decode("ascii")
    return text if _order_uid.fullmatch(text) else None


def failed(span: Span, error: BaseException) -> None:
    """The span marked failed by `error`'s type only: its text may quote a row."""
    span.set_status(Status(StatusCode.ERROR, type(error).__name__))


def made_current(span: Span) -> Token[Context]:
    """`span` the current one of this thread or task, until `ended`."""
    return otel_context.attach(trace.set_span_in_context(span))


def ended(span: Span, current: Token[Context]) -> None:
    """`span`, made current by `made_current`, ended and no longer current."""
    otel_context.detach(current)
    span.end()


class KafkaBatchTrace:
    """The spans of one batch of consumed messages: one per sampled message (a consumer span of
    its producer's trace, ended when the batch is settled, with what became of the message),
    and one per attempt at writing the batch when any is sampled, linked to every sampled
    message's span (`service.ports.BatchTrace`). A message not sampled has no span at all.
    """

    def __init__(self, tracing: Tracing, messages: Sequence[ConsumedMessage], group: str) -> None:
        self._tracer = tracing.tracer
        self._max_links = tracing.max_links
        # What every message's span says alike, made once a batch.
        common = {
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.consumer.group.name": group,
        }
        # Each sampled message with its span.
        self._traced: list[tuple[ConsumedMessage, Span]] = []
        for message in messages:
            parent = parent_of(message.trace)
            name = f"process {message.topic}"
            if tracing.sampled(parent, name, SpanKind.CONSUMER):
                self._traced.append((message, self._consumed(message, common, parent, name)))
        self._written: dict[str, str] = {}
        # Each sampled message's span by the message's identity, made for the first dead letter.
        self._span_of: dict[int, Span] | None = None

    def _consumed(
        self, message: ConsumedMessage, common: dict[str, str], parent: Context, name: str
    ) -> Span:
        # Given as the span starts: the SDK checks them once, not once per later call.
        attributes: dict[str, str | int] = {
            **common,
            "messaging.destination.name": message.topic,
            "messaging.destination.partition.id": str(message.partition),
            "messaging.kafka.offset": message.offset,
        }
        key = _order_key(message.key)
        if key is not None:
            attributes["messaging.kafka.message.key"] = key
        return self._tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            record_exception=False,
        )

    @contextmanager
    def _writing(self, orders: int, deletions: int) -> Iterator[None]:
        # A child of the first sampled message's span, so that following one order shows the
        # write; linked to all of them.
        span = self._tracer.start_span(
            "INSERT orders",
            context=trace.set_span_in_context(self._traced[0][1], _NO_PARENT),
            kind=SpanKind.CLIENT,
            # The SDK keeps OTEL_SPAN_LINK_COUNT_LIMIT of them (128 by default): no more made.
            links=[Link(span.get_span_context()) for _, span in self._traced[: self._max_links]],
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
            failed(span, error)
            raise
        finally:
            span.end()

    def writing(self, orders: int, deletions: int) -> AbstractContextManager[None]:
        return self._writing(orders, deletions) if self._traced else nullcontext()

    def written(self, result: WriteResult) -> None:
        if not self._traced:
            return
        for uid in (*result.inserted, *result.replaced):
            self._written[uid] = STORED
        for uid in result.deleted:
            self._written[uid] = DELETED

    def settled(
        self, kept: Mapping[str, ConsumedMessage], rejected: Sequence[RejectedMessage]
    ) -> None:
        if not self._traced:
            return
        outcomes: dict[int, tuple[str, str | None]] = {
            id(entry.message): (DEAD_LETTERED, entry.rejection.code) for entry in rejected
        }
        for uid, message in kept.items():
            outcomes.setdefault(id(message), (self._written.get(uid, UNCHANGED), None))
        for message, span in self._traced:
            outcome, reason = outcomes.get(id(message), (OLDER, None))
            if reason is None:
                span.set_attribute("order_viewer.outcome", outcome)
            else:
                span.set_attributes({"order_viewer.outcome": outcome, "error.type": reason})
                span.set_status(Status(StatusCode.ERROR, reason))
            span.end()

    def onward(self, message: ConsumedMessage) -> TraceHeaders:
        if self._span_of is None:
            self._span_of = {id(consumed): span for consumed, span in self._traced}
        span = self._span_of.get(id(message))
        # Not sampled: the letter carries the message's own trace on, as it came.
        return message.trace if span is None else headers_of(span)


class DecidedTraceIds(RandomIdGenerator):
    """The SDK's random ids, except that a new trace whose sampling `Tracing.sampled` decided
    before its span existed gets the trace id the decision was made on: the SDK's sampler,
    asked again as the span starts, then decides the same (a ratio sampler drawing on another
    id would keep the square of its ratio). One per thread: nothing runs in between."""

    def __init__(self) -> None:
        self._decided = threading.local()

    def drawn(self) -> int:
        """A new trace's id, to decide its sampling on."""
        return super().generate_trace_id()

    def decided(self, trace_id: int) -> None:
        """`trace_id` is the next new trace's of this thread, whose span is started next."""
        self._decided.trace_id = trace_id

    def generate_trace_id(self) -> int:
        trace_id: int | None = getattr(self._decided, "trace_id", None)
        if trace_id is None:
            return super().generate_trace_id()
        self._decided.trace_id = None
        return trace_id


def new_trace_bound(sampler: Sampler) -> int | None:
    """The bound below which `sampler` keeps a new trace, by the low 64 bits of its id, when
    that comparison is all it does for one: the SDK's `traceidratio` and
    `parentbased_traceidratio`. None for any other sampler, which is asked each time."""
    if type(sampler) is ParentBasedTraceIdRatio:
        # The ratio sampler the SDK built from OTEL_TRACES_SAMPLER_ARG, which it keeps private.
        sampler = sampler._root
    return sampler.bound if type(sampler) is TraceIdRatioBased else None


class Tracing:
    """The service's tracer: made only when tracing is on (`start_tracing`)."""

    def __init__(self, provider: TracerProvider, ids: DecidedTraceIds, group: str) -> None:
        self._provider = provider
        self._ids = ids
        # The sampler the SDK made of OTEL_TRACES_SAMPLER and its argument.
        self._sampler = provider.sampler
        self._new_trace_bound = new_trace_bound(self._sampler)
        # Links kept on a span, as the SDK read OTEL_SPAN_LINK_COUNT_LIMIT (None: all).
        self.max_links = SpanLimits().max_links
        self._group = group
        self.tracer = provider.get_tracer("order_viewer", version("order-viewer"))

    def sampled(self, parent: Context, name: str, kind: SpanKind) -> bool:
        """Whether the span `name` of `parent`'s trace (a new trace when `parent` carries none)
        is to be recorded, as the SDK's sampler decides it when the span starts: asked first,
        so that nothing else is made for a span it drops. True promises that the span is
        started next, in this thread, with `parent` (a new trace's id is set aside for it)."""
        if self._decides_alone(parent):
            return self._new_trace_kept()
        context = (
            trace.INVALID_SPAN_CONTEXT
            if parent is _NO_PARENT
            else trace.get_current_span(parent).get_span_context()
        )
        new_trace = not context.is_valid
        trace_id = self._ids.drawn() if new_trace else context.trace_id
        if self._sampler.should_sample(parent, trace_id, name, kind).decision is Decision.DROP:
            return False
        if new_trace:
            self._ids.decided(trace_id)
        return True

    def _decides_alone(self, parent: Context) -> bool:
        """Whether the sampler's decision for a span of `parent` is the comparison of a new
        trace's id with its bound (`_new_trace_kept`), made here without the call to it and the
        result it builds: 3.6 µs of the 4 an unsampled request cost at 1 %."""
        return parent is _NO_PARENT and self._new_trace_bound is not None

    def _new_trace_kept(self) -> bool:
        """`_decides_alone`'s decision on a new trace's id, set aside for its span if kept:
        the sampler, asked on the same id as the span starts, decides the same."""
        assert self._new_trace_bound is not None
        trace_id = self._ids.drawn()
        if trace_id & TraceIdRatioBased.TRACE_ID_LIMIT >= self._new_trace_bound:
            return False
        self._ids.decided(trace_id)
        return True

    def batch(self, messages: Sequence[ConsumedMessage]) -> KafkaBatchTrace:
        return KafkaBatchTrace(self, messages, self._group)

    def request(
        self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> Span | None:
        """A server span for one HTTP request when it is sampled, continuing the client's
        `traceparent` if it sent a valid one (once, as for a message); None, and nothing made,
        when it is not. The caller makes it current while the request is answered (a database
        read and the log lines are its children) and ends it."""
        parent = parent_of(
            trace_headers(
                [(header.decode("latin-1"), value) for header, value in headers if header in _W3C]
            )
        )
        decides_alone = self._decides_alone(parent)
        # A request dropped by the id alone does not need its route (0.5 µs) for a name.
        if decides_alone and not self._new_trace_kept():
            return None
        route = route_template(path)
        name = f"{method} {route}"
        if not decides_alone and not self.sampled(parent, name, SpanKind.SERVER):
            return None
        return self.tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "http.route": route},
            record_exception=False,
        )

    def database_read(self, collection: str) -> Span | None:
        """A client span for one read of the database, a child of the request that made it;
        None, and nothing made, when that request is not recorded (a read outside a request
        would otherwise begin a trace of its own)."""
        if not trace.get_current_span().is_recording():
            return None
        return self.tracer.start_span(
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

    def shutdown(self) -> None:
        """Export the spans still waiting, then stop (at SIGTERM's stop of `serve`)."""
        self._provider.shutdown()


# The request headers that carry a trace, as ASGI names them.
_W3C = (TRACEPARENT.encode(), TRACESTATE.encode())


def answered(status: int, cache: str | None) -> None:
    """The current request's span told its status and, for an order, whether the cache
    answered it."""
    span = trace.get_current_span()
    if cache is None:
        span.set_attribute("http.response.status_code", status)
    else:
        span.set_attributes({"http.response.status_code": status, "order_viewer.cache": cache})
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


def current_ids() -> tuple[str, str] | None:
    """The trace and span ids of the current span, in W3C's hex, for the log lines; None
    outside a recorded span."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def batch_processor(largest_batch: int, exporter: SpanExporter | None = None) -> BatchSpanProcessor:
    """The SDK's batching of finished spans for `exporter` (OTLP/HTTP, to where the OTEL_*
    variables say, unless given: the benchmarks' own), as the OTEL_BSP_* variables say,
    with a queue of two of the largest batches' spans (one a message, and its write) unless
    OTEL_BSP_MAX_QUEUE_SIZE says otherwise: a traced batch ends all its spans at once, and the
    SDK's 2,048 would hold one batch of 2,000, dropping (with a warning) the spans of the next
    whenever the exporter is one batch behind. A span is never waited for: the queue is a
    deque, and a full one drops its oldest."""
    queue = None if QUEUE_SIZE in os.environ else max(2048, 2 * (largest_batch + 1))
    return BatchSpanProcessor(exporter or OTLPSpanExporter(), max_queue_size=queue)


def start_tracing(group: str, processor: SpanProcessor) -> Tracing:
    """The tracer, its finished spans given to `processor` (`batch_processor`, or the tests'
    own), and the JSON log lines told to carry the current span's ids."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: SERVICE}))
    ids = DecidedTraceIds()
    provider = TracerProvider(resource=resource, id_generator=ids)
    provider.add_span_processor(processor)
    # A message's malformed tracestate is dropped; the SDK would also log it, member by member,
    # once per message: a producer could fill the log.
    for noisy in ("opentelemetry.trace.span", "opentelemetry.trace.propagation.tracecontext"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logs.trace_ids = current_ids
    return Tracing(provider, ids, group)
