"""OpenTelemetry tracing: each consumed message a span of its producer's trace (W3C `traceparent`
and `tracestate` in its Kafka headers), each batch's write a span linked to its messages', each
HTTP request a server span with its database read as a child.

Off unless configured (`config.tracing_enabled`): then no tracer exists, and every part that
would trace holds None and checks that one value, so that no span object is made. When on, the
SDK reads its own `OTEL_*` variables for what it is asked here: the resource
(`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`), the sampler (`OTEL_TRACES_SAMPLER` and its
argument) and the OTLP/HTTP exporter (endpoint, headers, timeout, compression, certificates),
which sends what `otlp.SpanBatches` gathers.

The spans themselves are this module's (`Span`), encoded as OTLP protobuf by `otlp` as they
end, because the SDK's span and its exporter's encoder cost about 75 µs a span on these
machines, three times a whole cache hit (docs/DESIGN.md, Tracing): a span here is a few fields
set as it starts and ends.

A message or request the sampler drops costs its decision only: the sampler's rule is applied
here before anything else is made (`Sampling`), so that at 1 % the other 99 % pay one random
draw and a comparison.

No personal data leaves in a span: attributes are positions, ids, counts, reason codes and route
templates; exceptions are never recorded (a database error quotes the row it refused), only
their type.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Final

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from order_viewer.adapters import logs, otlp
from order_viewer.adapters.metrics import route_template
from order_viewer.domain.model import ORDER_UID_PATTERN
from order_viewer.service.ports import ConsumedMessage, RejectedMessage, TraceHeaders, WriteResult

TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
# A version-00 traceparent is 55 characters; later versions may append fields, which the
# propagator ignores. Longer values, and a tracestate beyond the 512 characters W3C asks every
# vendor to pass on, are dropped here, before any parsing: a producer cannot make the consumer
# parse megabytes per message.
MAX_TRACEPARENT_BYTES = 128
MAX_TRACESTATE_BYTES = 512
# The links a batch's write keeps, as the SDK's default OTEL_SPAN_LINK_COUNT_LIMIT: a batch of
# 2,000 messages would otherwise make a span of 2,000 links, which backends truncate anyway.
MAX_LINKS = 128

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


@dataclass(frozen=True, slots=True)
class Parent:
    """The producer's or client's span a message's or request's span continues."""

    trace_id: int
    span_id: int
    sampled: bool
    trace_state: str


class Span:
    """One operation of a trace (a request, its database read, a batch's write), from its start
    to its `end`, when it is encoded and queued for export. What it shares with others of its
    kind (name, kind, the attributes of its route or the database's) comes encoded
    (`described`), and so do its own attributes as they are given."""

    __slots__ = (
        "_finished",
        "attributes",
        "described",
        "end_time",
        "error",
        "links",
        "method",
        "parent_id",
        "path",
        "span_id",
        "start_time",
        "trace_id",
        "trace_state",
    )

    def __init__(
        self,
        finished: Callable[[bytes], None],
        trace_id: int,
        parent: Parent | Span | None,
        described: bytes,
        attributes: bytes = b"",
        *,
        links: Sequence[tuple[int, int]] = (),
    ) -> None:
        self._finished = finished
        self.trace_id = trace_id
        self.span_id = _new_span_id()
        self.parent_id = 0 if parent is None else parent.span_id
        self.trace_state: str = "" if parent is None else parent.trace_state
        self.described = described
        self.attributes = attributes
        self.links = links
        # The reason of a failure: an exception's type or a rejection's code, never a text.
        self.error: str | None = None
        # A request's, named once its route is known (`answered`).
        self.method = ""
        self.path = ""
        self.start_time = time.time_ns()
        self.end_time = 0

    def set_attribute(self, key: str, value: otlp.AttributeValue) -> None:
        self.attributes += otlp.own_attribute(key, value)

    def end(self) -> None:
        self.end_time = time.time_ns()
        # Encoded now, so that what waits for export is bytes, which the collector never
        # scans: queued spans made its passes cost 1.8 µs a cache hit (docs/DESIGN.md).
        self._finished(otlp.encoded_span(self))


_draw = random.getrandbits


def _new_span_id() -> int:
    return _draw(64) or 1


# The current request's span, for its database read and its log lines.
_current: ContextVar[Span | None] = ContextVar("order_viewer_span", default=None)


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


def parent_of(headers: TraceHeaders) -> Parent | None:
    """The producer's span as the parent of the message's, as W3C Trace Context reads it (the
    SDK's propagator, which drops a malformed `tracestate` and keeps the trace); None, a new
    trace, when the headers are missing or malformed."""
    if not headers:
        return None
    extracted = _propagator.extract({name: value.decode("ascii") for name, value in headers})
    context = trace.get_current_span(extracted).get_span_context()
    if not context.is_valid:
        return None
    return Parent(
        context.trace_id,
        context.span_id,
        context.trace_flags.sampled,
        context.trace_state.to_header(),
    )


def headers_of(span: Parent) -> TraceHeaders:
    """The W3C headers that continue `span`'s trace downstream (a dead letter, then its
    replay)."""
    parent = (TRACEPARENT, f"00-{span.trace_id:032x}-{span.span_id:016x}-01".encode("ascii"))
    if not span.trace_state:
        return (parent,)
    return parent, (TRACESTATE, span.trace_state.encode("ascii"))


def _order_key(key: bytes | None) -> str | None:
    """The message's key as an attribute only when it is an order id: anything else a producer
    put there stays out of the traces."""
    if key is None or len(key) > 64 or not key.isascii():
        return None
    text = key.decode("ascii")
    return text if _order_uid.fullmatch(text) else None


def failed(span: Span, error: BaseException) -> None:
    """The span marked failed by `error`'s type only: its text may quote a row."""
    span.error = type(error).__name__


def made_current(span: Span) -> Token[Span | None]:
    """`span` the current one of this thread or task, until `ended`."""
    return _current.set(span)


def ended(span: Span, current: Token[Span | None]) -> None:
    """`span`, made current by `made_current`, ended and no longer current."""
    _current.reset(current)
    if not span.described:  # a request answered without being counted (no metrics, no guard)
        span.described = otlp.server(span.method, route_template(span.path), None, None)
    span.end()


class KafkaBatchTrace:
    """The spans of one batch of consumed messages: one per sampled message (a consumer span of
    its producer's trace, ended when the batch is settled, with what became of the message),
    and one per attempt at writing the batch when any is sampled, linked to every sampled
    message's span (`service.ports.BatchTrace`). A message not sampled has no span at all.

    A message's span is never a `Span`: its ids and encoded attributes are kept, one list each,
    and encoded as the batch settles (`otlp.encoded`): a batch's thousands of span objects,
    alive for the whole batch, cost the collector's passes 2 µs a message (docs/DESIGN.md).
    """

    def __init__(self, tracing: Tracing, messages: Sequence[ConsumedMessage], group: str) -> None:
        self._tracing = tracing
        # Each sampled message, and at the same place its span's parts.
        self._messages: list[ConsumedMessage] = []
        self._trace_ids: list[int] = []
        self._span_ids: list[int] = []
        self._parents: list[Parent | None] = []
        self._described: list[bytes] = []
        self._attributes: list[bytes] = []
        # The spans of a batch start together, as its processing does.
        self._started = time.time_ns()
        new_trace, kept = tracing.sampling.new_trace, tracing.sampling.kept
        for message in messages:
            parent = parent_of(message.trace) if message.trace else None
            if parent is None:
                trace_id = new_trace()
                if trace_id is not None:
                    self._consumed(message, group, trace_id, None)
            elif kept(parent, parent.trace_id):
                self._consumed(message, group, parent.trace_id, parent)
        self._written: dict[str, str] = {}
        # Each sampled message's place by the message's identity, made for the first dead letter.
        self._place_of: dict[int, int] | None = None

    def _consumed(
        self, message: ConsumedMessage, group: str, trace_id: int, parent: Parent | None
    ) -> None:
        attributes = otlp.message_attributes(message.offset, _order_key(message.key))
        self._messages.append(message)
        self._trace_ids.append(trace_id)
        self._span_ids.append(_new_span_id())
        self._parents.append(parent)
        self._described.append(otlp.consumer(group, message.topic, message.partition))
        self._attributes.append(attributes)

    def _as_parent(self, place: int) -> Parent:
        parent = self._parents[place]
        return Parent(
            self._trace_ids[place],
            self._span_ids[place],
            True,
            "" if parent is None else parent.trace_state,
        )

    @contextmanager
    def _writing(self, orders: int, deletions: int) -> Iterator[None]:
        # A child of the first sampled message's span, so that following one order shows the
        # write; linked to all of them.
        span = self._tracing.span(
            self._trace_ids[0],
            self._as_parent(0),
            otlp.database("INSERT", "orders"),
            otlp.attribute("db.operation.batch.size", orders + deletions)
            + otlp.attribute("order_viewer.orders", orders)
            + otlp.attribute("order_viewer.deletions", deletions),
            links=list(zip(self._trace_ids[:MAX_LINKS], self._span_ids[:MAX_LINKS], strict=True)),
        )
        try:
            yield
        except BaseException as error:
            failed(span, error)
            raise
        finally:
            span.end()

    def writing(self, orders: int, deletions: int) -> AbstractContextManager[None]:
        return self._writing(orders, deletions) if self._messages else nullcontext()

    def written(self, result: WriteResult) -> None:
        if not self._messages:
            return
        for uid in (*result.inserted, *result.replaced):
            self._written[uid] = STORED
        for uid in result.deleted:
            self._written[uid] = DELETED

    def settled(
        self, kept: Mapping[str, ConsumedMessage], rejected: Sequence[RejectedMessage]
    ) -> None:
        if not self._messages:
            return
        # By each message's identity: its rejection's code, or the order it was kept for.
        reasons = {id(entry.message): entry.rejection.code for entry in rejected}
        kept_for = {id(message): uid for uid, message in kept.items()}
        finished = self._tracing.finished
        ended = time.time_ns()
        outcome_of = otlp.outcome
        for place, message in enumerate(self._messages):
            parent = self._parents[place]
            reason = reasons.get(id(message))
            if reason is not None:
                attributes = outcome_of(DEAD_LETTERED, reason)
            else:
                uid = kept_for.get(id(message))
                attributes = outcome_of(OLDER if uid is None else self._written.get(uid, UNCHANGED))
            finished(
                otlp.encoded(
                    self._trace_ids[place],
                    self._span_ids[place],
                    0 if parent is None else parent.span_id,
                    "" if parent is None else parent.trace_state,
                    self._described[place],
                    start_time=self._started,
                    end_time=ended,
                    attributes=self._attributes[place] + attributes,
                    error=reason,
                )
            )

    def onward(self, message: ConsumedMessage) -> TraceHeaders:
        if self._place_of is None:
            self._place_of = {id(consumed): place for place, consumed in enumerate(self._messages)}
        place = self._place_of.get(id(message))
        # Not sampled: the letter carries the message's own trace on, as it came.
        return message.trace if place is None else headers_of(self._as_parent(place))


@dataclass(frozen=True, slots=True)
class Sampling:
    """The rule of one of the SDK's samplers (those `OTEL_TRACES_SAMPLER` names), applied here
    before any span is made: a continued trace keeps its parent's decision when the sampler is
    parent-based; any other trace is kept when the low 64 bits of its id are below `bound`, as
    the SDK's ratio sampler decides (`always_on`: all of them, `always_off`: none)."""

    parent_based: bool
    bound: int

    @classmethod
    def of(cls, sampler: Sampler) -> Sampling:
        parent_based = isinstance(sampler, ParentBased)
        if parent_based:
            # The SDK keeps its delegates private: those of a sampler the variables make
            # follow the parent's decision, and only its root is chosen.
            delegates = vars(sampler)
            if (
                delegates["_remote_parent_sampled"] is not ALWAYS_ON
                or delegates["_local_parent_sampled"] is not ALWAYS_ON
                or delegates["_remote_parent_not_sampled"] is not ALWAYS_OFF
                or delegates["_local_parent_not_sampled"] is not ALWAYS_OFF
            ):
                raise ValueError(f"no sampling rule for {sampler.get_description()}")
            sampler = delegates["_root"]
        if sampler is ALWAYS_ON:
            return cls(parent_based, otlp.LOW_64_BITS + 1)
        if sampler is ALWAYS_OFF:
            return cls(parent_based, 0)
        if isinstance(sampler, TraceIdRatioBased):
            return cls(parent_based, sampler.bound)
        raise ValueError(f"no sampling rule for {sampler.get_description()}")

    def kept(self, parent: Parent | None, trace_id: int) -> bool:
        if parent is not None and self.parent_based:
            return parent.sampled
        return trace_id & otlp.LOW_64_BITS < self.bound

    def new_trace(self) -> int | None:
        """A new trace's id if the sampler keeps the trace, else None: `kept` without a parent,
        with the id drawn here, in one call (every message and request without a parent pays
        it)."""
        # Zero is W3C's "no trace"; the SDK's generator draws the same way.
        trace_id = _draw(128) or 1
        return trace_id if trace_id & otlp.LOW_64_BITS < self.bound else None


class Tracing:
    """The service's tracer: made only when tracing is on (`start_tracing`)."""

    def __init__(self, sampling: Sampling, batches: otlp.SpanBatches, group: str) -> None:
        self.sampling = sampling
        self._batches = batches
        # Where each span goes as it ends.
        self.finished = batches.finished
        self._group = group

    def span(
        self,
        trace_id: int,
        parent: Parent | Span | None,
        described: bytes,
        attributes: bytes,
        links: Sequence[tuple[int, int]] = (),
    ) -> Span:
        """A span started now, of a trace the sampler keeps, exported once it ends."""
        return Span(self.finished, trace_id, parent, described, attributes, links=links)

    def batch(self, messages: Sequence[ConsumedMessage]) -> KafkaBatchTrace:
        return KafkaBatchTrace(self, messages, self._group)

    def request(
        self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> Span | None:
        """A server span for one HTTP request when it is sampled, continuing the client's
        `traceparent` if it sent a valid one (once, as for a message); None, and nothing made,
        when it is not. The caller makes it current while the request is answered (a database
        read and the log lines are its children) and ends it."""
        parent = None
        for header, _ in headers:
            if header in _W3C:
                parent = parent_of(
                    trace_headers(
                        [(name.decode("latin-1"), value) for name, value in headers if name in _W3C]
                    )
                )
                break
        if parent is None:
            new_trace = self.sampling.new_trace()
            if new_trace is None:
                return None
            trace_id = new_trace
        elif self.sampling.kept(parent, parent.trace_id):
            trace_id = parent.trace_id
        else:
            return None
        # Named, with its route, status and cache, as the request is counted (`answered`).
        span = Span(self.finished, trace_id, parent, b"")
        span.method = method
        span.path = path
        return span

    def database_read(self, collection: str) -> Span | None:
        """A client span for one read of the database, a child of the request that made it;
        None, and nothing made, when that request is not recorded (a read outside a request
        would otherwise begin a trace of its own)."""
        request = _current.get()
        if request is None:
            return None
        return Span(self.finished, request.trace_id, request, otlp.database("SELECT", collection))

    def shutdown(self) -> None:
        """Export the spans still waiting, then stop (at SIGTERM's stop of `serve`)."""
        self._batches.shutdown()


# The request headers that carry a trace, as ASGI names them.
_W3C = (TRACEPARENT.encode(), TRACESTATE.encode())


def answered(route: str, status: int | None, cache: str | None = None) -> None:
    """The current request's span named by its route and told its status (None: not known)
    and, for an order, whether the cache answered it."""
    span = _current.get()
    if span is None:
        return
    span.described = otlp.server(span.method, route, status, cache)
    if status is not None and status >= 500:
        span.error = str(status)


def current_ids() -> tuple[str, str] | None:
    """The trace and span ids of the current span, in W3C's hex, for the log lines; None
    outside a recorded span."""
    span = _current.get()
    if span is None:
        return None
    return f"{span.trace_id:032x}", f"{span.span_id:016x}"


def start_tracing(group: str, batches: otlp.SpanBatches) -> Tracing:
    """The tracer, sampling as the SDK's OTEL_TRACES_SAMPLER says, its finished spans sent by
    `batches` (`otlp_batches`, or the tests' own), and the JSON log lines told to carry the
    current span's ids."""
    # The sampler the SDK makes of the variables, made the one way it offers.
    sampling = Sampling.of(TracerProvider(shutdown_on_exit=False).sampler)
    # A message's malformed tracestate is dropped; the SDK would also log it, member by member,
    # once per message: a producer could fill the log.
    for noisy in ("opentelemetry.trace.span", "opentelemetry.trace.propagation.tracecontext"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logs.trace_ids = current_ids
    return Tracing(sampling, batches, group)
