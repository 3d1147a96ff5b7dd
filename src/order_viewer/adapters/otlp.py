"""OTLP protobuf, written by hand for the spans of `adapters/tracing.py`: the fields of
`opentelemetry.proto.trace.v1` these spans have, each a tag (field number and wire type) and, for
strings, bytes and messages, a varint length; what repeats (a span's name, kind and the attributes
it shares with others of its kind) encoded once. The SDK's encoder builds a protobuf object an
attribute, in Python: about 40 µs a span on these machines, more than a cache hit
(docs/DESIGN.md, Tracing). The resource and the scope are encoded by the SDK's own classes, once.

`SpanBatches` sends them in batches, as the SDK's batch processor would, through the SDK's
OTLP/HTTP exporter (`otlp_batches`).
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from enum import IntEnum
from functools import lru_cache
from importlib.metadata import version
from typing import TYPE_CHECKING, Final

from opentelemetry.exporter.otlp.proto.common._internal import _encode_resource
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.sdk.resources import SERVICE_NAME, Resource

if TYPE_CHECKING:
    from order_viewer.adapters.tracing import Span

SERVICE = "order-viewer"
SCOPE = "order_viewer"
# What an attribute may hold here: the semantic conventions' strings and integers.
AttributeValue = str | int
LOW_64_BITS: Final = (1 << 64) - 1


class SpanKind(IntEnum):
    """OTLP's numbers of the kinds of span made here."""

    SERVER = 2
    CLIENT = 3
    CONSUMER = 5


def _varint(number: int) -> bytes:
    # Lengths, offsets and counts: the shorter forms spelled out, 3 times faster than the loop.
    if number < 0x80:
        return _SMALL_VARINTS[number]
    if number < 0x4000:
        return bytes((number & 0x7F | 0x80, number >> 7))
    if number < 0x200000:
        return bytes((number & 0x7F | 0x80, number >> 7 & 0x7F | 0x80, number >> 14))
    if number < 0x10000000:
        return bytes(
            (
                number & 0x7F | 0x80,
                number >> 7 & 0x7F | 0x80,
                number >> 14 & 0x7F | 0x80,
                number >> 21,
            )
        )
    out = bytearray()
    while number > 0x7F:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


_SMALL_VARINTS: Final = [bytes((number,)) for number in range(0x80)]


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _text(value: str) -> bytes:
    # A lone surrogate (from a client's bytes decoded loosely) must not break a whole export.
    return value.encode("utf-8", "replace")


@lru_cache(maxsize=256)
def _key(key: str) -> bytes:
    return _field(b"\x0a", _text(key))


def attribute(key: str, value: AttributeValue) -> bytes:
    """A span's attribute (field 9, a KeyValue of its key and an AnyValue)."""
    if isinstance(value, str):
        text = _text(value)
        any_value = b"\x0a" + _varint(len(text)) + text
    else:
        any_value = b"\x18" + _varint(value & LOW_64_BITS)  # int64, two's complement
    key_value = _key(key) + b"\x12" + _varint(len(any_value)) + any_value
    return b"\x4a" + _varint(len(key_value)) + key_value


# Strings repeat (outcomes, reason codes): each encoded once, then found here; the order ids
# that do not are the first it forgets. Numbers (offsets, sizes) rarely do.
_repeated_attribute = lru_cache(maxsize=4096)(attribute)


def message_attributes(offset: int, key: str | None) -> bytes:
    """A consumed message's own attributes: its offset, and its key when it is an order id
    (what `attribute` makes of them, without its general steps: every message pays this)."""
    offset_value = b"\x18" + _varint(offset)
    key_value = _OFFSET_KEY + _varint(len(offset_value)) + offset_value
    encoded = b"\x4a" + _varint(len(key_value)) + key_value
    if key is None:
        return encoded
    text = _text(key)
    key_text = b"\x0a" + _varint(len(text)) + text
    key_value = _MESSAGE_KEY + _varint(len(key_text)) + key_text
    return encoded + b"\x4a" + _varint(len(key_value)) + key_value


@lru_cache(maxsize=256)
def outcome(outcome: str, reason: str | None = None) -> bytes:
    """A consumed message's outcome and, for a dead letter, its reason code, as attributes."""
    encoded_outcome = attribute("order_viewer.outcome", outcome)
    return encoded_outcome if reason is None else encoded_outcome + attribute("error.type", reason)


# The keys of a message's own attributes, each with its value's tag (field 2 of a KeyValue).
_OFFSET_KEY: Final = _key("messaging.kafka.offset") + b"\x12"
_MESSAGE_KEY: Final = _key("messaging.kafka.message.key") + b"\x12"


def own_attribute(key: str, value: AttributeValue) -> bytes:
    return _repeated_attribute(key, value) if type(value) is str else attribute(key, value)


def _described(
    name: str, kind: SpanKind, attributes: Sequence[tuple[str, AttributeValue]]
) -> bytes:
    """A span's name, kind and the attributes it shares with others of its kind, encoded."""
    return (
        _field(b"\x2a", _text(name))
        + b"\x30"
        + _varint(kind)
        + b"".join(attribute(key, value) for key, value in attributes)
    )


@lru_cache(maxsize=1024)
def consumer(group: str, topic: str, partition: int) -> bytes:
    return _described(
        f"process {topic}",
        SpanKind.CONSUMER,
        (
            ("messaging.system", "kafka"),
            ("messaging.operation.type", "process"),
            ("messaging.operation.name", "process"),
            ("messaging.consumer.group.name", group),
            ("messaging.destination.name", topic),
            ("messaging.destination.partition.id", str(partition)),
        ),
    )


@lru_cache(maxsize=16)
def database(operation: str, collection: str) -> bytes:
    return _described(
        f"{operation} {collection}",
        SpanKind.CLIENT,
        (
            ("db.system.name", "postgresql"),
            ("db.system", "postgresql"),
            ("db.operation.name", operation),
            ("db.collection.name", collection),
        ),
    )


@lru_cache(maxsize=1024)
def server(method: str, route: str, status: int | None, cache: str | None) -> bytes:
    attributes: list[tuple[str, AttributeValue]] = [
        ("http.request.method", method),
        ("http.route", route),
    ]
    if status is not None:
        attributes.append(("http.response.status_code", status))
    if cache is not None:
        attributes.append(("order_viewer.cache", cache))
    return _described(f"{method} {route}", SpanKind.SERVER, attributes)


# A span's trace id (field 1, 16 bytes) and span id (field 2, 8 bytes), big-endian as W3C
# writes them; its start and end (fields 7 and 8, fixed64, little-endian as protobuf's).
_ids = struct.Struct(">2sQQ2sQ").pack
_times = struct.Struct("<cQcQ").pack
_link_ids = struct.Struct(">4sQQ2sQ").pack


def encoded_span(span: Span) -> bytes:
    """`span` as an element of a ScopeSpans' spans (field 2)."""
    return encoded(
        span.trace_id,
        span.span_id,
        span.parent_id,
        span.trace_state,
        span.described,
        start_time=span.start_time,
        end_time=span.end_time,
        attributes=span.attributes,
        links=span.links,
        error=span.error,
    )


def encoded(
    trace_id: int,
    span_id: int,
    parent_id: int,
    trace_state: str,
    described: bytes,
    *,
    start_time: int,
    end_time: int,
    attributes: bytes,
    links: Sequence[tuple[int, int]] = (),
    error: str | None = None,
) -> bytes:
    """A span of these fields as an element of a ScopeSpans' spans (field 2): `described`
    and `attributes` already encoded (`consumer`, `attribute`, ...), `parent_id` 0 for a root."""
    body = _ids(b"\x0a\x10", trace_id >> 64, trace_id & LOW_64_BITS, b"\x12\x08", span_id)
    if trace_state:
        body += _field(b"\x1a", _text(trace_state))
    if parent_id:
        body += b"\x22\x08" + parent_id.to_bytes(8, "big")
    body += described + _times(b"\x39", start_time, b"\x41", end_time) + attributes
    if links:
        # Each a Link (field 13) of its trace and span ids.
        body += b"".join(
            [
                _link_ids(
                    b"\x6a\x1c\x0a\x10",
                    linked_trace >> 64,
                    linked_trace & LOW_64_BITS,
                    b"\x12\x08",
                    linked_span,
                )
                for linked_trace, linked_span in links
            ]
        )
    if error is not None:
        # Status (field 15): its message, and code 2, error.
        body += _field(b"\x7a", _field(b"\x12", _text(error)) + b"\x18\x02")
    return _field(b"\x12", body)


class SpanBatches:
    """Finished spans queued as they end and sent in batches from a thread of their own, as the
    SDK's batch processor does with `OTEL_BSP_*`: when `batch_size` are waiting or every
    `delay_ms`, each batch encoded as one OTLP ExportTraceServiceRequest for the same resource
    and scope and given to `send`. A span is never waited for: a full queue drops the oldest,
    counted in a warning after the next batch is sent."""

    def __init__(
        self,
        send: Callable[[bytes], object],
        resource: Resource,
        *,
        queue_size: int,
        batch_size: int,
        delay_ms: int,
        close: Callable[[], object] = lambda: None,
    ) -> None:
        self._send = send
        self._close = close
        scope = InstrumentationScope(name=SCOPE, version=version("order-viewer"))
        # ResourceSpans' resource (field 1), and its ScopeSpans' scope (field 1).
        self._resource = _field(b"\x0a", _encode_resource(resource).SerializeToString())
        self._scope = _field(b"\x0a", scope.SerializeToString())
        self._queue: deque[bytes] = deque(maxlen=queue_size)
        self._batch_size = batch_size
        self._delay = delay_ms / 1000
        self._dropped = 0
        self._wake = threading.Event()
        self._stopping = False
        self._sending = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="span-export", daemon=True)
        self._worker.start()

    def finished(self, span: bytes) -> None:
        queue = self._queue
        if len(queue) == queue.maxlen:
            # Two threads end spans (the event loop's, the consumer's): a count for the log,
            # which a lock on every span would make exact at a price every span would pay.
            self._dropped += 1
        queue.append(span)
        # Setting an event takes a lock: once is enough.
        if len(queue) >= self._batch_size and not self._wake.is_set():
            self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._delay)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Send every span that has ended, in batches."""
        with self._sending:
            while self._queue:
                batch: list[bytes] = []
                while self._queue and len(batch) < self._batch_size:
                    batch.append(self._queue.popleft())
                try:
                    self._send(self.request(batch))
                except Exception:
                    # The exporter reports a collector's refusal itself; anything it raises
                    # loses this batch only, never the thread that sends the next.
                    _log.exception("%d spans not exported", len(batch))
                # After each batch: with a slow collector the queue may never empty, and the
                # spans it drops would otherwise go unsaid for as long.
                if self._dropped:
                    dropped, self._dropped = self._dropped, 0
                    _log.warning("span queue full: %d spans dropped", dropped)

    def request(self, spans: Sequence[bytes]) -> bytes:
        """An OTLP ExportTraceServiceRequest of `spans` (`encoded_span`), its field 1 one
        ResourceSpans."""
        scope_spans = _field(b"\x12", self._scope + b"".join(spans))
        return _field(b"\x0a", self._resource + scope_spans)

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._worker.join()
        self.flush()
        self._close()


_log = logging.getLogger(__name__)


def otlp_batches(*, queue_size: int, batch_size: int, delay_ms: int) -> SpanBatches:
    """Spans sent by the SDK's OTLP/HTTP exporter, to where its OTEL_EXPORTER_OTLP_* variables
    say, with its retries; the resource as OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES say
    (`order-viewer` when they name no service)."""
    exporter = OTLPSpanExporter()
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: SERVICE}))
    return SpanBatches(
        # Its HTTP client: the exporter's own export() takes the SDK's spans only.
        exporter._client.export,
        resource,
        queue_size=queue_size,
        batch_size=batch_size,
        delay_ms=delay_ms,
        close=exporter.shutdown,
    )
