"""GET /order/{id}/events against a running `order-viewer serve`: versions produced while a stream
is open arrive on it, a tombstone ends in `deleted`, each caller sees its own view, the access
check and audit of an order read, Last-Event-ID, the cap on open streams, and a stop that ends
them promptly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from order_viewer.adapters.http.auth.tokens import new_token, token_digest
from order_viewer.entrypoints.generate import make_order
from tests.conftest import (
    ServiceProcess,
    Stack,
    Topics,
    new_topics,
    produce,
    produce_orders,
    served,
    wait_until,
)

pytestmark = pytest.mark.integration

_rng = random.Random(2323)
TOKEN_SCOPES = {
    "auditor": "orders:read:pii,metrics:read",
    "support": "orders:read",
    "prometheus": "metrics:read",
}
MAX_STREAMS = 1000


@dataclass(frozen=True)
class Event:
    kind: str
    id: str | None
    data: str


class Stream:
    """A client of one event stream over a socket of its own, read in a thread as it comes;
    `close` shuts the socket down, which the server sees as the client leaving."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parsed = httpx.URL(url)
        self.events: queue.Queue[Event] = queue.Queue()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self._socket = socket.create_connection((parsed.host, parsed.port), timeout=60)
        request = f"GET {parsed.raw_path.decode()} HTTP/1.1\r\nHost: {parsed.host}\r\n"
        request += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        self._socket.sendall(f"{request}\r\n".encode())
        self._file = self._socket.makefile("rb")
        status_line = self._file.readline().decode()
        self.status = int(status_line.split()[1])
        while (line := self._file.readline().decode().strip()) != "":
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _chunks(self) -> Iterator[bytes]:
        """The body's chunks (HTTP/1.1 chunked transfer coding, as a stream is sent)."""
        while size := int(self._file.readline().strip() or b"0", 16):
            yield self._file.read(size)
            self._file.readline()

    def _read(self) -> None:
        # The socket shut down from the test's side ends the read with an error: that is the end.
        with contextlib.suppress(OSError, ValueError):
            if self.headers.get("transfer-encoding") != "chunked":
                self.body = self._file.read(int(self.headers.get("content-length", "0")))
                return
            pending = b""
            for chunk in self._chunks():
                pending += chunk
                while b"\n\n" in pending:
                    frame, pending = pending.split(b"\n\n", 1)
                    self._parse(frame.decode())

    def _parse(self, frame: str) -> None:
        fields: dict[str, str] = {}
        for line in frame.split("\n"):
            if not line.startswith(":"):
                name, _, value = line.partition(": ")
                fields[name] = value
        if "event" in fields:
            self.events.put(Event(fields["event"], fields.get("id"), fields["data"]))

    def next(self, timeout: float = 10) -> Event:
        return self.events.get(timeout=timeout)

    def ended(self, timeout: float) -> bool:
        """Whether the server ended the stream within `timeout` seconds."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        self._file.close()
        self._socket.close()


@dataclass
class Guarded:
    service: ServiceProcess
    stack: Stack
    topics: Topics
    tokens: dict[str, str]

    def headers(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}

    def stream(self, order_uid: str, name: str = "auditor", **headers: str) -> Stream:
        return Stream(
            f"{self.service.base_url}/order/{order_uid}/events",
            {**self.headers(name), **headers},
        )

    def store(self, order: dict[str, Any]) -> None:
        """Produce the order and wait until it is served as produced."""
        produce_orders(self.stack, self.topics.orders, [order])
        uid = order["order_uid"]
        wait_until(
            lambda: self.get(f"/order/{uid}").json().get("delivery") == order["delivery"],
            30,
            f"order {uid} to be served",
        )

    def get(self, path: str, name: str = "auditor") -> httpx.Response:
        return self.service.get(path, headers=self.headers(name))


@pytest.fixture(scope="module")
def guarded(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    directory = tmp_path_factory.mktemp("events")
    tokens = {name: new_token() for name in TOKEN_SCOPES}
    tokens_file = directory / "tokens.txt"
    tokens_file.write_text(
        "".join(
            f"{name}:{token_digest(tokens[name])}:{scopes}\n"
            for name, scopes in TOKEN_SCOPES.items()
        )
    )
    topics = new_topics("events")
    service = ServiceProcess(
        stack,
        topics,
        directory,
        HTTP_AUTH="token",
        HTTP_TOKENS_FILE=str(tokens_file),
        KAFKA_TOMBSTONES="delete",
        BATCH_MAX_WAIT_MS="20",
    ).start()
    try:
        yield Guarded(service, stack, topics, tokens)
    finally:
        service.kill()


def renamed(order: dict[str, Any], name: str) -> dict[str, Any]:
    return {**order, "delivery": {**order["delivery"], "name": name}}


def test_new_versions_and_a_tombstone_reach_an_open_stream_as_they_are_stored(
    guarded: Guarded,
) -> None:
    order = make_order(_rng)
    uid = order["order_uid"]
    guarded.store(order)
    stream = guarded.stream(uid)
    try:
        assert stream.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert "no-store" in stream.headers["cache-control"]  # guarded: PRIVATE
        first = stream.next()
        assert first.kind == "version"
        assert json.loads(first.data) == guarded.get(f"/order/{uid}").json()
        assert first.id is not None
        ids = [int(first.id)]
        for name in ("second", "third"):
            produced = time.monotonic()
            produce_orders(guarded.stack, guarded.topics.orders, [renamed(order, name)])
            event = stream.next(timeout=5)
            assert event.kind == "version"
            assert json.loads(event.data)["delivery"]["name"] == name
            assert event.id is not None
            ids.append(int(event.id))
            print(f"\n{name} version on the stream {time.monotonic() - produced:.2f} s after sent")
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)
        produce(guarded.stack, guarded.topics.orders, [(uid.encode(), None)])
        deleted = stream.next(timeout=5)
        assert deleted.kind == "deleted"
        assert json.loads(deleted.data) == {"order_uid": uid}
        assert deleted.id is not None
        assert int(deleted.id) > ids[-1]
        assert guarded.get(f"/order/{uid}").status_code == 404
    finally:
        stream.close()


def test_a_stream_gives_each_token_its_own_view_of_the_order(guarded: Guarded) -> None:
    order = make_order(_rng)
    uid = order["order_uid"]
    guarded.store(order)
    for name in ("support", "auditor"):
        stream = guarded.stream(uid, name)
        try:
            event = stream.next()
            assert json.loads(event.data) == guarded.get(f"/order/{uid}", name).json()
        finally:
            stream.close()
    masked = guarded.get(f"/order/{uid}", "support").json()
    assert masked["delivery"]["name"] != order["delivery"]["name"]


def test_a_stream_needs_the_token_an_order_read_needs_and_is_audited_at_connect(
    guarded: Guarded,
) -> None:
    order = make_order(_rng)
    uid = order["order_uid"]
    guarded.store(order)
    url = f"/order/{uid}/events"
    anonymous = guarded.service.get(url)
    assert anonymous.status_code == 401
    assert anonymous.json() == {"error": "a valid bearer token is needed"}
    assert guarded.get(url, "prometheus").status_code == 403
    bad = guarded.service.get(url, headers={"Authorization": "Bearer not-a-token"})
    assert bad.status_code == 401
    stream = guarded.stream(uid, "support")
    try:
        assert stream.next().kind == "version"
        # Audited while the stream is still open: once, at connect.
        line = f"order events read principal=support order_uid={uid} status=200 view=masked"
        wait_until(lambda: line in guarded.service.log(), 5, "the stream's audit line")
    finally:
        stream.close()
    assert guarded.service.log().count(line) == 1
    assert "status=403" in guarded.service.log()


def test_last_event_id_sends_the_version_on_connect_only_if_newer(guarded: Guarded) -> None:
    order = make_order(_rng)
    uid = order["order_uid"]
    guarded.store(order)
    guarded.store(renamed(order, "second"))  # at an offset above 0, so one below it exists
    first = guarded.stream(uid)
    try:
        current = first.next()
    finally:
        first.close()
    assert current.id is not None
    offset = int(current.id)
    behind = guarded.stream(uid, **{"Last-Event-ID": str(offset - 1)})
    up_to_date = guarded.stream(uid, **{"Last-Event-ID": str(offset)})
    try:
        assert (behind.status, up_to_date.status) == (200, 200)
        assert behind.next() == current
        produce_orders(guarded.stack, guarded.topics.orders, [renamed(order, "newer")])
        # Nothing on connect for the one that had it: its first event is the newer version.
        newer = up_to_date.next()
        assert json.loads(newer.data)["delivery"]["name"] == "newer"
        assert behind.next() == newer
    finally:
        behind.close()
        up_to_date.close()


@pytest.mark.parametrize(
    "last_event_id", ["abc", "-1", "1e9", "0x10", "9" * 19, "1" * 20, "1 2", ""]
)
def test_a_last_event_id_that_this_stream_never_sent_is_a_400(
    guarded: Guarded, last_event_id: str
) -> None:
    response = httpx.get(
        f"{guarded.service.base_url}/order/anyorder/events",
        headers={**guarded.headers("auditor"), "Last-Event-ID": last_event_id},
        timeout=10,
    )
    assert response.status_code == 400
    assert response.json() == {"error": "Last-Event-ID: not an event id of this stream"}


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/order/has%20space/events", 400),
        ("/order/" + "x" * 65 + "/events", 400),
        ("/order//events", 400),
        ("/order/a/b/events", 400),
        ("/order/events", 404),  # an order whose id is "events"
    ],
)
def test_paths_beside_the_stream_are_not_taken_for_it_nor_for_an_order_id(
    guarded: Guarded, path: str, status: int
) -> None:
    response = guarded.get(path)
    assert response.status_code == status, response.text


def test_an_order_never_seen_opens_a_stream_that_sends_nothing(guarded: Guarded) -> None:
    stream = guarded.stream(make_order(_rng)["order_uid"])
    try:
        assert stream.status == 200
        with pytest.raises(queue.Empty):
            stream.next(timeout=1)
    finally:
        stream.close()


async def _open_raw_stream(port: int, path: str, token: str) -> tuple[Any, Any, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    return reader, writer, head


def test_streams_beyond_the_cap_get_503_and_a_client_that_leaves_frees_its_slot(
    guarded: Guarded,
) -> None:
    order = make_order(_rng)
    uid = order["order_uid"]
    guarded.store(order)
    port, token = guarded.service.port, guarded.tokens["auditor"]
    path = f"/order/{uid}/events"

    async def at_the_cap() -> tuple[list[bytes], float, bytes]:
        opened = await asyncio.gather(
            *(_open_raw_stream(port, path, token) for _ in range(MAX_STREAMS))
        )
        try:
            open_now = await asyncio.to_thread(open_streams, guarded)
            _, refused_writer, refused = await _open_raw_stream(port, path, token)
            refused_writer.close()
        finally:
            for _, writer, _ in opened:
                writer.close()
        return [head for _, _, head in opened], open_now, refused

    heads, open_at_cap, refused = asyncio.run(at_the_cap())
    assert all(head.startswith(b"HTTP/1.1 200") for head in heads), {
        h.split(b"\r\n")[0] for h in heads
    }
    assert open_at_cap == MAX_STREAMS
    assert refused.startswith(b"HTTP/1.1 503"), refused
    assert b"retry-after: 5" in refused.lower()
    # Every client left: their slots are free again, and a new stream opens.
    wait_until(lambda: open_streams(guarded) == 0, 10, "the streams to close")
    stream = guarded.stream(uid)
    try:
        assert stream.status == 200
        assert stream.next().kind == "version"
    finally:
        stream.close()


def open_streams(guarded: Guarded) -> float:
    response = guarded.get("/metrics")
    for line in response.text.splitlines():
        if line.startswith("order_viewer_http_event_streams "):
            return float(line.split()[1])
    raise AssertionError("no order_viewer_http_event_streams in /metrics")


def test_a_stop_ends_the_open_streams_and_the_process_promptly(
    start_service: Callable[..., ServiceProcess], stack: Stack, topics: Topics, tmp_path: Path
) -> None:
    service = start_service(KAFKA_TOMBSTONES="delete")
    order = make_order(_rng)
    produce_orders(stack, topics.orders, [order])
    wait_until(lambda: served(service, order["order_uid"]), 30, "the order to be served")
    streams = [
        Stream(f"{service.base_url}/order/{order['order_uid']}/events", {}) for _ in range(5)
    ]
    try:
        for stream in streams:
            assert stream.next().kind == "version"
        started = time.monotonic()
        assert service.terminate(timeout=15) == 0
        stopped = time.monotonic() - started
        assert stopped < 5, f"the service took {stopped:.1f} s to stop with streams open"
        for stream in streams:
            assert stream.ended(5), "a stream was not ended by the stop"
    finally:
        for stream in streams:
            stream.close()
