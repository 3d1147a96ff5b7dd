"""Hostile and generated HTTP traffic against a running service.

Schemathesis fuzzes every operation of the service's own /openapi.json; raw sockets send
oversized, malformed, slow and very many requests. Each must be answered (never with a 5xx) or
refused by closing the connection, never left hanging, and the service must serve normally
afterwards.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import re
import resource
import select
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.errors import InvalidSchema
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Err, Ok

from order_viewer.entrypoints.generate import make_order
from tests.conftest import ServiceProcess, Stack, Topics, encode_orders, produce, wait_until

# One worker runs the module, so that its tests share the one service they attack.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("http_hostile")]

# server.py: HTTP1Settings(header_read_timeout=10_000, max_buffer_size=64 * 1024)
HEADER_READ_TIMEOUT = 10.0
# Generated requests per operation and generation mode (operations without parameters have
# only one distinct request, which Hypothesis sends once).
EXAMPLES_PER_OPERATION = 500
MIN_GENERATED_REQUESTS = 1000
ORDERS = 5


@dataclass
class Target:
    service: ServiceProcess
    port: int
    uids: list[str]
    etags: dict[str, str]

    def url(self, path: str) -> str:
        return f"{self.service.base_url}{path}"


@pytest.fixture(scope="module")
def target(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One service for the module, with a few orders stored and served."""
    suffix = uuid.uuid4().hex[:10]
    topics = Topics(
        f"orders-hostile-{suffix}", f"orders-hostile-{suffix}.dlq", f"order-viewer-h-{suffix}"
    )
    service = ServiceProcess(stack, topics, tmp_path_factory.mktemp("hostile")).start()
    try:
        rng = random.Random(20_240_611)
        orders = [make_order(rng) for _ in range(ORDERS)]
        produce(stack, topics.orders, encode_orders(orders))
        etags = {}
        for order in orders:
            uid = order["order_uid"]

            def served(uid: str = uid) -> bool:
                return service.get(f"/order/{uid}").status_code == 200

            wait_until(served, 30, f"order {uid} to be served")
            etags[uid] = service.get(f"/order/{uid}").headers["etag"]
        yield Target(service, service.port, [o["order_uid"] for o in orders], etags)
    finally:
        service.kill()


def serving(target: Target) -> str | None:
    """None when /livez and a known order answer 200 within 5 s; else what went wrong."""
    try:
        live = httpx.get(target.url("/livez"), timeout=5)
        order = httpx.get(target.url(f"/order/{target.uids[0]}"), timeout=5)
    except httpx.HTTPError as error:
        return f"{type(error).__name__}: {error}"
    if live.status_code != 200 or order.status_code != 200:
        return f"/livez {live.status_code}, /order {order.status_code}"
    if order.json()["order_uid"] != target.uids[0]:
        return "the known order came back wrong"
    return None


def assert_still_serving(target: Target) -> None:
    assert target.service.process is not None
    assert target.service.process.poll() is None, (
        f"the service died:\n{target.service.log()[-5000:]}"
    )
    problem = serving(target)
    assert problem is None, f"the service no longer serves normally: {problem}"


# --- schemathesis -----------------------------------------------------------------------------

# The one check that wants every schema-valid request accepted: the broad fuzzing test leaves it
# to test_schema_states_the_order_id_rule, which runs it on the order route, whose schema states
# the id rule the handler enforces.
SCHEMA_DESCRIBES_REQUESTS = schemathesis.checks.positive_data_acceptance

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)


@dataclass
class FuzzRun:
    requests: collections.Counter[tuple[str, str, int]]
    failures: dict[tuple[str, str], str]

    @property
    def total(self) -> int:
        return sum(self.requests.values())


def operation_of(
    result: Ok[schemathesis.APIOperation[Any, Any, Any, Any]] | Err[InvalidSchema],
) -> schemathesis.APIOperation[Any, Any, Any, Any]:
    assert isinstance(result, Ok), result.err()
    return result.ok()


def fuzz(
    target: Target,
    excluded_checks: list[Any],
    operations: Callable[[str], bool] = lambda _: True,
    max_examples: int = EXAMPLES_PER_OPERATION,
    headers: dict[str, str] | None = None,
) -> FuzzRun:
    """Send generated requests (positive and, where the schema allows, negative ones) to every
    operation `operations` selects, checking each response; failures are collected, not raised,
    so that one run covers everything. `headers` go with every request (credentials)."""
    schema = schemathesis.openapi.from_url(target.url("/openapi.json"))
    run = FuzzRun(collections.Counter(), {})
    with requests.Session() as session:
        session.headers.update(headers or {})

        def send_all(
            operation: schemathesis.APIOperation[Any, Any, Any, Any],
            mode: GenerationMode,
            strategy: st.SearchStrategy[schemathesis.Case[Any]],
        ) -> None:
            # An event stream answers until its client leaves: of a stream that opens, the
            # head is checked, and the client leaves.
            streamed = operation.path.endswith("/events")

            @settings(FUZZ_SETTINGS, max_examples=max_examples)
            @given(case=strategy)
            def send(case: schemathesis.Case[Any]) -> None:
                response: Any
                if streamed:
                    # Sent by hand: schemathesis would read the body to its end.
                    response = session.request(
                        **case.as_transport_kwargs(base_url=target.url("")),
                        stream=True,
                        timeout=10,
                    )
                else:
                    response = case.call(session=session, timeout=10)
                run.requests[(operation.label, mode.value, response.status_code)] += 1
                if streamed and response.status_code == 200:
                    kind = response.headers.get("content-type", "")
                    response.close()
                    if not kind.startswith("text/event-stream"):
                        run.failures.setdefault(
                            (operation.label, f"an open stream of {kind}"), case.as_curl_command()
                        )
                    return
                try:
                    case.validate_response(response, excluded_checks=excluded_checks)
                except FailureGroup as group:
                    for failure in group.exceptions:
                        key = (operation.label, failure.title)
                        run.failures.setdefault(key, case.as_curl_command())

            try:
                send()
            except Unsatisfiable:
                # No request can break the schema (e.g. a path parameter that is any string):
                # there is no negative data to send.
                assert mode is GenerationMode.NEGATIVE, operation.label

        for result in schema.get_all_operations():
            operation = operation_of(result)
            if not operations(operation.label):
                continue
            for mode in GenerationMode:
                strategy = operation.as_strategy(generation_mode=mode)
                if mode is GenerationMode.POSITIVE and "order_uid" in operation.path:
                    # Stored orders too, plain and revalidated, not only ids nobody has.
                    def plain_and_revalidated(
                        uid: str, op: schemathesis.APIOperation[Any, Any, Any, Any] = operation
                    ) -> st.SearchStrategy[schemathesis.Case[Any]]:
                        return st.one_of(
                            op.as_strategy(path_parameters={"order_uid": uid}),
                            op.as_strategy(
                                path_parameters={"order_uid": uid},
                                headers={"If-None-Match": target.etags[uid]},
                            ),
                        )

                    known = st.sampled_from(target.uids).flatmap(plain_and_revalidated)
                    strategy = st.one_of(strategy, known)
                send_all(operation, mode, strategy)
    return run


def explicit_order_cases(target: Target) -> list[tuple[dict[str, str], dict[str, str], int]]:
    """(path parameters, headers, expected status) of /order/{order_uid}."""
    uid = target.uids[0]
    etag = target.etags[uid]
    return [
        *(({"order_uid": u}, {}, 200) for u in target.uids),
        ({"order_uid": uid}, {"If-None-Match": etag}, 304),
        ({"order_uid": uid}, {"If-None-Match": f'"other", W/{etag}'}, 304),
        ({"order_uid": uid}, {"If-None-Match": "*"}, 304),
        ({"order_uid": uid}, {"If-None-Match": '"stale"'}, 200),
        ({"order_uid": "valid-but-unknown_0"}, {}, 404),
        ({"order_uid": "a" * 64}, {}, 404),
        ({"order_uid": "a" * 65}, {}, 400),
        ({"order_uid": "not an id"}, {}, 400),
        ({"order_uid": "ünïcödé"}, {}, 400),
    ]


def test_generated_requests_get_documented_answers(target: Target) -> None:
    """≥ 1,000 generated requests over every documented operation: no 5xx, every status
    documented, every content type and body as the schema says."""
    started = time.monotonic()
    run = fuzz(target, excluded_checks=[SCHEMA_DESCRIBES_REQUESTS])
    generated = run.total

    schema = schemathesis.openapi.from_url(target.url("/openapi.json"))
    operation = schema["/order/{order_uid}"]["GET"]
    with requests.Session() as session:
        for path_parameters, headers, expected in explicit_order_cases(target):
            case = operation.Case(path_parameters=path_parameters, headers=headers)
            response = case.call_and_validate(session=session, timeout=10)
            assert response.status_code == expected, (path_parameters, headers)
            run.requests[(operation.label, "explicit", response.status_code)] += 1

    print(f"\nschemathesis: {run.total} requests in {time.monotonic() - started:.1f} s")
    for key, count in sorted(run.requests.items()):
        print(f"  {key}: {count}")
    assert not run.failures, "\n".join(
        f"{label}: {title}\n    {curl}" for (label, title), curl in run.failures.items()
    )
    assert not any(status >= 500 for _, _, status in run.requests)
    documented = {operation_of(result).label for result in schema.get_all_operations()}
    assert {"GET /order/{order_uid}", "GET /orders", "GET /livez", "GET /readyz"} <= documented
    assert documented == {label for label, _, _ in run.requests}
    order_statuses = {status for label, _, status in run.requests if "order_uid" in label}
    assert {200, 304, 400, 404} <= order_statuses
    assert generated >= MIN_GENERATED_REQUESTS
    assert_still_serving(target)


def test_schema_states_the_order_id_rule(target: Target) -> None:
    """No request the published schema allows may be rejected as malformed (400)."""
    run = fuzz(
        target,
        excluded_checks=[],
        operations=lambda label: "order_uid" in label,
        max_examples=50,
    )
    assert run.total > 0
    assert not run.failures, "\n".join(
        f"{label}: {title}\n    {curl}" for (label, title), curl in run.failures.items()
    )


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/", "text/html"),
        ("/docs", "text/html"),
        ("/openapi.json", "application/json"),
        ("/static/app.js", "text/javascript"),
    ],
)
def test_endpoints_outside_the_schema_answer(target: Target, path: str, content_type: str) -> None:
    """What /openapi.json does not describe, and so the fuzzing above does not reach."""
    response = httpx.get(target.url(path), timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(content_type)


@pytest.mark.parametrize(
    "path",
    ["/metrics/", "/livez/", "/readyz/", "/orders/", "/docs/", "/openapi.json/", "/static", "/"],
)
def test_no_answer_sends_a_browser_to_the_host_the_request_named(target: Target, path: str) -> None:
    """Starlette's redirect to the path without its trailing slash was made from the Host
    header: GET /metrics/ with Host: evil.example answered `location: http://evil.example/metrics`,
    to anyone, without a token."""
    evil = {"Host": "evil.example", "X-Forwarded-Host": "evil.example"}
    response = httpx.get(target.url(path), headers=evil, timeout=10)
    assert "location" not in response.headers, response.headers
    assert response.status_code in (200, 404), path
    assert "evil.example" not in response.text


@pytest.mark.parametrize("path", ["/", "/docs"])
def test_the_pages_keep_what_they_run_to_the_services_own_files(target: Target, path: str) -> None:
    """/docs lacked the page's security headers, though it shares its origin, and with it the
    token the page keeps in sessionStorage."""
    response = httpx.get(target.url(path), timeout=10)
    policy = dict(
        directive.strip().split(" ", 1)
        for directive in response.headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'none'"
    assert policy["frame-ancestors"] == "'none'"
    assert policy["base-uri"] == "'none'"
    assert policy["connect-src"] == "'self'"
    # The service's files, and on /docs the page's own inline script by its digest only.
    others = [source for source in policy["script-src"].split() if source != "'self'"]
    assert len(others) == (0 if path == "/" else 1)
    assert all(re.fullmatch(r"'sha256-[A-Za-z0-9+/]{43}='", source) for source in others)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "strict-transport-security" not in response.headers  # plain HTTP: not ours to say
    # The OAuth2 redirect page of Swagger UI, which nothing here uses, is not served.
    assert httpx.get(target.url("/docs/oauth2-redirect"), timeout=10).status_code == 404


# --- raw sockets ------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int | None  # None: the server closed the connection without an answer
    body: bytes
    seconds: float


def exchange(port: int, request: bytes, timeout: float = 10) -> Reply:
    """Send `request` on a new connection and read the answer's head and body (by its
    Content-Length); fail if the server neither answers nor closes within `timeout` s."""
    started = time.monotonic()
    deadline = started + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no answer and no close after {timeout:.0f} s: {request[:80]!r}")
        return left

    received = b""
    bodiless = request.startswith(b"HEAD ")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading; it may have answered first
        except TimeoutError:
            pytest.fail(f"the server stopped reading but kept the connection: {request[:80]!r}")
        wanted: int | None = None
        while wanted is None or len(received) < wanted:
            sock.settimeout(remaining())
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            except TimeoutError:
                remaining()
                continue
            if not chunk:
                break
            received += chunk
            if wanted is None and b"\r\n\r\n" in received:
                head = received.split(b"\r\n\r\n", 1)[0]
                length = 0
                for line in [] if bodiless else head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                wanted = len(head) + 4 + length
    seconds = time.monotonic() - started
    if not received:
        return Reply(None, b"", seconds)
    status_line = received.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1."), f"not an HTTP/1 answer: {received[:100]!r}"
    head, _, body = received.partition(b"\r\n\r\n")
    return Reply(int(status_line.split()[1]), body, seconds)


HOST = b"Host: 127.0.0.1\r\n"


def get(path: bytes, *headers: bytes, body: bytes = b"") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\n" + HOST + b"".join(headers) + b"\r\n" + body


MIB = 1 << 20

# Requests no client should send: each must get a 4xx, or the connection closed.
REFUSED = {
    "path 10,000 chars": get(b"/order/" + b"a" * 10_000),
    "path 100,000 chars": get(b"/order/" + b"a" * 100_000),
    "path 1 MiB": get(b"/order/" + b"a" * MIB),
    "query 1 MiB": get(b"/orders?limit=" + b"9" * MIB),
    "header 1 MiB": get(b"/livez", b"X-Big: " + b"a" * MIB + b"\r\n"),
    "10,000 headers": get(b"/livez", *(b"X-H%d: v\r\n" % i for i in range(10_000))),
    "garbage request line": b"\x00\xff\xfe garbage \x01\x02\r\n\r\n",
    "garbage without end": b"asdkjh aksjdh aksjd",
    "invalid method token": b"G@T /livez HTTP/1.1\r\n" + HOST + b"\r\n",
    "unknown method": b"FROB /livez HTTP/1.1\r\n" + HOST + b"\r\n",
    "POST to an order": b"POST /order/x HTTP/1.1\r\n" + HOST + b"Content-Length: 2\r\n\r\n{}",
    "HTTP/0.9 request": b"GET /livez\r\n",
    "HTTP/0.9 request, blank line": b"GET /livez\r\n\r\n",
    "HTTP/3.0 on HTTP/1": b"GET /livez HTTP/3.0\r\n" + HOST + b"\r\n",
    "Content-Length beyond 64 bits": get(
        b"/livez", b"Content-Length: 99999999999999999999999999\r\n"
    ),
    "negative Content-Length": get(b"/livez", b"Content-Length: -1\r\n"),
    "conflicting Content-Lengths": get(
        b"/livez", b"Content-Length: 3\r\n", b"Content-Length: 5\r\n", body=b"abc"
    ),
    "NUL in a header": get(b"/livez", b"X-A: a\x00b\r\n"),
    "obsolete line folding": get(b"/livez", b"X-A: a\r\n b\r\n"),
    "header without colon": get(b"/livez", b"NoColonHere\r\n"),
    "space before colon": get(b"/livez", b"X-A : b\r\n"),
    "raw non-UTF-8 path": get(b"/order/\xff\xfe"),
    "control character in path": get(b"/order/a\x01b"),
    "raw non-UTF-8 query": get(b"/orders?limit=\xff"),
    "percent-encoded invalid UTF-8 id": get(b"/order/%FF%FE"),
    "percent-encoded NUL id": get(b"/order/%00"),
    "overlong-UTF-8 slash id": get(b"/order/%C0%AF"),
    "traversal out of /static": get(b"/static/../../../../etc/passwd"),
    "encoded traversal out of /static": get(b"/static/..%2F..%2F..%2F..%2Fetc%2Fpasswd"),
    "limit above 64 bits": get(b"/orders?limit=" + b"9" * 40),
    "limit not a number": get(b"/orders?limit=%00"),
}

# Requests that are odd but valid HTTP: any answer but a 5xx (or the connection closed).
ANSWERED = {
    "body on GET": get(b"/livez", b"Content-Length: 5\r\n", body=b"hello"),
    "body on GET of an order": get(b"/order/KNOWN", b"Content-Length: 5\r\n", body=b"hello"),
    "chunked body on GET": get(
        b"/livez", b"Transfer-Encoding: chunked\r\n", body=b"5\r\nhello\r\n0\r\n\r\n"
    ),
    "broken chunked body on GET": get(
        b"/livez", b"Transfer-Encoding: chunked\r\n", body=b"zz\r\nhello\r\n0\r\n\r\n"
    ),
    "chunked and Content-Length": get(
        b"/livez", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 4\r\n", body=b"0\r\n\r\n"
    ),
    "absurd Content-Length on GET": get(
        b"/livez", b"Content-Length: 1000000000000\r\n", body=b"abc"
    ),
    "no Host on HTTP/1.1": b"GET /livez HTTP/1.1\r\n\r\n",
    "HTTP/1.0": b"GET /livez HTTP/1.0\r\n\r\n",
    "bare LF line ends": b"GET /livez HTTP/1.1\nHost: 127.0.0.1\n\n",
    "absolute-form target": get(b"http://elsewhere.invalid/livez"),
    "asterisk-form OPTIONS": b"OPTIONS * HTTP/1.1\r\n" + HOST + b"\r\n",
    "CONNECT": b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n" + HOST + b"\r\n",
    "HEAD of an order": b"HEAD /order/KNOWN HTTP/1.1\r\n" + HOST + b"\r\n",
    "non-UTF-8 If-None-Match": get(b"/order/KNOWN", b"If-None-Match: \xff\xfe\x80\r\n"),
    "12,000 ETags in If-None-Match": get(
        b"/order/KNOWN", b"If-None-Match: " + b'"x",' * 12_000 + b"\r\n"
    ),
    "60,000 commas in If-None-Match": get(
        b"/order/KNOWN", b"If-None-Match: " + b"," * 60_000 + b"\r\n"
    ),
    "99 headers": get(b"/livez", *(b"X-H%d: v\r\n" % i for i in range(99))),
    "repeated limit": get(b"/orders?limit=1&limit=2&limit=abc"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_hostile_request_is_refused_cleanly(target: Target, name: str) -> None:
    reply = exchange(target.port, REFUSED[name])
    print(f"\n{name}: {reply.status or 'closed'} in {reply.seconds:.2f} s")
    assert reply.status is None or 400 <= reply.status < 500, (name, reply)
    assert b"root:" not in reply.body
    assert_still_serving(target)


@pytest.mark.parametrize("name", list(ANSWERED))
def test_odd_request_is_answered_without_error(target: Target, name: str) -> None:
    request = ANSWERED[name].replace(b"KNOWN", target.uids[0].encode())
    reply = exchange(target.port, request)
    print(f"\n{name}: {reply.status or 'closed'} in {reply.seconds:.2f} s")
    assert reply.status is None or reply.status < 500, (name, reply)
    assert_still_serving(target)


def test_pipelined_requests_are_all_answered(target: Target) -> None:
    uid = target.uids[0].encode()
    request = get(b"/livez") + get(b"/order/" + uid) + get(b"/order/%FF") + get(b"/nope")
    request += get(b"/orders?limit=1", b"Connection: close\r\n")
    received = b""
    with socket.create_connection(("127.0.0.1", target.port), timeout=10) as sock:
        sock.sendall(request)
        while chunk := sock.recv(65536):
            received += chunk
    statuses = [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)]
    assert statuses == [200, 200, 400, 404, 200]
    assert_still_serving(target)


def test_slow_clients_do_not_block_others_and_are_cut_off(target: Target) -> None:
    """200 connections stall in the middle of their request (some trickle a byte a second):
    others are still answered at once, and the server closes each stalled one after its header
    read timeout."""
    uid = target.uids[0].encode()
    partial = [
        b"GET /order/" + uid + b" HT",  # in the request line
        b"GET /livez HTTP/1.1\r\n" + HOST + b"X-Slow: ",  # in a header
        get(b"/livez")[:-2],  # all but the blank line that ends the headers
    ]
    trickled = get(b"/livez", *(b"X-T%d: v\r\n" % i for i in range(60)))
    stalled: dict[socket.socket, tuple[float, int]] = {}  # first byte's time, bytes trickled
    try:
        for index in range(200):
            sock = socket.create_connection(("127.0.0.1", target.port), timeout=5)
            sock.setblocking(False)
            if index % 10 == 0:
                sock.send(trickled[:1])
                stalled[sock] = (time.monotonic(), 1)
            else:
                sock.send(partial[index % 3])
                stalled[sock] = (time.monotonic(), 0)
        opened = time.monotonic()

        latencies = []
        while time.monotonic() - opened < 4:
            for path in ("/livez", f"/order/{target.uids[1]}", "/orders?limit=5"):
                began = time.monotonic()
                assert httpx.get(target.url(path), timeout=5).status_code == 200, path
                latencies.append(time.monotonic() - began)
        assert max(latencies) < 2, f"slowest answer {max(latencies):.2f} s while clients stall"

        closed_after: list[float] = []
        answered = []
        deadline = opened + HEADER_READ_TIMEOUT + 8
        next_trickle = time.monotonic()
        while stalled and time.monotonic() < deadline:
            if time.monotonic() >= next_trickle:
                next_trickle += 1
                for sock, (first, sent) in list(stalled.items()):
                    if 0 < sent < len(trickled) - 2:
                        try:
                            sock.send(trickled[sent : sent + 1])
                        except OSError:
                            continue
                        stalled[sock] = (first, sent + 1)
            readable, _, _ = select.select(list(stalled), [], [], 0.2)
            for sock in readable:
                try:
                    data = sock.recv(4096)
                except ConnectionResetError:
                    data = b""
                if data:
                    answered.append(data[:40])  # e.g. a 408: answered is fine, but keep looking
                    continue
                closed_after.append(time.monotonic() - stalled.pop(sock)[0])
                sock.close()
        print(
            f"\nslow clients: answers during the stall within {max(latencies):.3f} s "
            f"({len(latencies)} requests); {len(closed_after)} of 200 stalled connections "
            f"closed after {min(closed_after, default=0):.1f}-{max(closed_after, default=0):.1f} s"
        )
        assert all(not data.startswith(b"HTTP/1.1 5") for data in answered), answered
        assert not stalled, f"{len(stalled)} stalled connections still open after {deadline} s"
        assert min(closed_after) > HEADER_READ_TIMEOUT * 0.8
        assert max(closed_after) < HEADER_READ_TIMEOUT + 5
    finally:
        for sock in stalled:
            sock.close()
    assert_still_serving(target)


def test_connections_that_send_nothing_are_closed(target: Target) -> None:
    """A connection that sends nothing, or only HTTP/2's preface, is closed once the header read
    timeout has passed, like a slow one: left open, such connections pile up for free."""
    sockets = {
        "idle": socket.create_connection(("127.0.0.1", target.port), timeout=5),
        "HTTP/2 preface only": socket.create_connection(("127.0.0.1", target.port), timeout=5),
    }
    sockets["HTTP/2 preface only"].sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    opened = time.monotonic()
    still_open = dict(sockets)
    try:
        while still_open and time.monotonic() - opened < HEADER_READ_TIMEOUT + 5:
            readable, _, _ = select.select(list(still_open.values()), [], [], 0.5)
            for sock in readable:
                try:
                    data = sock.recv(4096)
                except ConnectionResetError:
                    data = b""
                if not data:
                    name = next(n for n, s in still_open.items() if s is sock)
                    del still_open[name]
        problem = serving(target)
        if problem is not None:
            pytest.fail(f"the service no longer serves normally: {problem}")
        assert not still_open, (
            f"still open {time.monotonic() - opened:.0f} s later: {sorted(still_open)}"
        )
    finally:
        for sock in sockets.values():
            sock.close()


def raise_open_files_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def test_2000_concurrent_connections(target: Target) -> None:
    """2,000 connections open at once, each then sends one request: every one is answered 200
    or closed by the server, and the service serves normally afterwards."""
    connections = 2000
    raise_open_files_limit(connections + 500)
    uid = target.uids[0]

    async def storm() -> collections.Counter[str]:
        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | str:
            try:
                return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", target.port), 20)
            except TimeoutError:
                return "connect timed out"
            except OSError as error:
                return f"connect: {type(error).__name__}"

        async def ask(
            index: int, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | str
        ) -> str:
            if isinstance(connection, str):
                return connection
            reader, writer = connection
            path = "/livez" if index % 2 else f"/order/{uid}"
            try:
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
                )
                await writer.drain()
                data = await asyncio.wait_for(reader.read(), 30)
            except TimeoutError:
                return "no answer"
            except OSError:
                return "closed"
            finally:
                writer.close()
            if not data:
                return "closed"
            return data.split(b"\r\n", 1)[0].decode(errors="replace")

        opened = await asyncio.gather(*(connect() for _ in range(connections)))
        answers = await asyncio.gather(*(ask(i, c) for i, c in enumerate(opened)))
        return collections.Counter(answers)

    started = time.monotonic()
    outcomes = asyncio.run(asyncio.wait_for(storm(), 90))
    seconds = time.monotonic() - started
    answered = outcomes["HTTP/1.1 200 OK"]
    print(f"\n{connections} concurrent connections in {seconds:.1f} s: {dict(outcomes)}")
    clean = {"HTTP/1.1 200 OK", "closed", "connect: ConnectionRefusedError"}
    clean.add("connect: ConnectionResetError")
    assert set(outcomes) <= clean, outcomes
    assert answered > 0
    assert_still_serving(target)


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_connections_cannot_exhaust_file_descriptors(
    stack: Stack, target: Target, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Idle connections can fill a process's table of open files; a server that then retries a
    failing accept() without pause spins a core and answers nobody. The service takes no more
    connections than its open-files limit leaves room for: the rest wait in the listen backlog,
    it stays idle meanwhile, and it serves again as it closes the idle ones."""
    limit = 400
    environment = target.service.env
    topics = Topics(
        environment["KAFKA_TOPIC"],
        environment["KAFKA_DLQ_TOPIC"],
        f"{environment['KAFKA_GROUP_ID']}-files",
    )
    service = ServiceProcess(stack, topics, tmp_path)
    request.addfinalizer(service.kill)
    service.start(open_files_limit=limit)
    small = Target(service, service.port, target.uids, target.etags)
    assert service.process is not None
    pid = service.process.pid
    idle = limit + 100
    raise_open_files_limit(idle + 500)
    sockets: list[socket.socket] = []
    try:
        sockets = [
            socket.create_connection(("127.0.0.1", service.port), timeout=5) for _ in range(idle)
        ]
        time.sleep(0.5)
        before = cpu_seconds(pid)
        time.sleep(3)
        cpu = (cpu_seconds(pid) - before) / 3
        held = open_files(pid)
        # Asked while the connections are full: answered once the server closes idle ones.
        began = time.monotonic()
        waited = httpx.get(small.url(f"/order/{target.uids[0]}"), timeout=3 * HEADER_READ_TIMEOUT)
        seconds = time.monotonic() - began
    finally:
        for sock in sockets:
            sock.close()
    print(
        f"\n{idle} idle connections against a limit of {limit} open files: the service held "
        f"{held} files, used {cpu:.2f} CPU, and answered a request made meanwhile in "
        f"{seconds:.1f} s"
    )
    assert waited.status_code == 200
    assert service.process.poll() is None, f"the service died:\n{service.log()[-5000:]}"
    assert cpu < 0.1, f"the service used {cpu:.2f} CPU with its connections full"
    assert limit - 200 < held < limit, f"{held} open files against a limit of {limit}"
    problem = serving(small)
    assert problem is None, f"the service does not serve normally afterwards: {problem}"
