"""The HTTP app: orders by id, the recent orders, health, and the page that shows them.

A request goes one way: `Front` (the access check, an order in memory, its metrics and audit
line), then the framework's routes for everything else; both answer an order with
`order_answer`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Coroutine
from importlib import resources
from importlib.metadata import version
from json.encoder import encode_basestring_ascii
from typing import Annotated, Any, Protocol

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.convertors import Convertor, register_url_convertor
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from order_viewer.adapters import tracing as traces
from order_viewer.adapters.cache import CachedOrder
from order_viewer.adapters.http.access import (
    PRIVATE,
    AccessGuard,
    AccessPolicy,
    PendingToken,
    Refusal,
    View,
    audit_order_read,
    audit_request,
    raw_header,
    required_scope,
    view_name,
)
from order_viewer.adapters.http.auth import Principal
from order_viewer.adapters.http.trail import (
    CURSOR_PATTERN,
    MAX_TRAIL_LIMIT,
    TRAIL_LIMIT,
    InvalidCursor,
    TrailBody,
    key_of,
    trail_body,
)
from order_viewer.adapters.metrics import (
    DOCS_FILES,
    EVENTS_ROUTE,
    ORDER_PATH,
    ORDER_ROUTE,
    PAGE_FILES,
    TRAIL_SUFFIX,
    HttpStats,
    Metrics,
    route_template,
)
from order_viewer.domain.model import ORDER_UID_PATTERN
from order_viewer.domain.schema import Order
from order_viewer.service.events import OrderEvents, StreamEnded, Subscription
from order_viewer.service.lookup import OrderLookup
from order_viewer.service.ports import ABSENT, DatabaseUnavailable, OrderState, OrderSummary

RETRY_AFTER_SECONDS = "5"
# The page's scripts and styles are files of our own; nothing inline, nothing from elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# The API description's page: Swagger UI's files of the package, and the one script of the page
# itself, allowed by its digest; the data it shows (and the orders "Try it out" fetches, with the
# token of the page's sign-in in the same origin's storage) from this service only.
DOCS_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self' {script}; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# Served over TLS, the service tells browsers to use nothing else for a year (not its
# subdomains: the name may be shared with other services).
STRICT_TRANSPORT_SECURITY = (b"strict-transport-security", b"max-age=31536000")
# An order changes only when a new message replaces it, so clients may keep a copy but must
# revalidate it (cheaply, with the ETag) before use.
ORDER_CACHE_CONTROL = "no-cache"
# The key of the request scope under which `Front` leaves the framework's order route the view
# the principal may see (absent or None: the order whole).
ORDER_VIEW = "order_viewer.view"

# A stream of an order's changes sends a comment this often when nothing else, so that proxies
# keep the connection and a client notices a dead one.
HEARTBEAT_SECONDS = 15.0
# A stream ends after this long, and its client connects again (with Last-Event-ID, missing
# nothing): its credential is checked at connect, so a revoked one is shut out within this.
STREAM_LIFETIME_SECONDS = 600.0
# A Last-Event-ID is an offset the stream sent: a non-negative bigint, in decimal.
_LAST_EVENT_ID = re.compile(r"[0-9]{1,19}")
# Published as the ids the stream sends (an offset in decimal, of which 18 digits stay below the
# largest), checked by the route to answer with its own 400.
_LAST_EVENT_ID_PARAMETER = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "description": "The id of the last event received, to resume after it.",
    "schema": {"type": "string", "pattern": "^[0-9]{1,18}$", "minLength": 1, "maxLength": 18},
}
_LARGEST_OFFSET = 2**63 - 1

_order_uid = re.compile(ORDER_UID_PATTERN)
_BAD_ORDER_UID = "an order id is 1 to 64 letters, digits, '-' or '_'"
# The rule is published for clients, and checked by each route to answer with its own 400.
OrderUid = Annotated[
    str,
    Path(
        description="1 to 64 letters, digits, '-' or '_'",
        json_schema_extra={"pattern": ORDER_UID_PATTERN, "minLength": 1, "maxLength": 64},
    ),
]


class _AnyText(Convertor[str]):
    """Matches any path remainder, newlines and slashes included, so that every malformed id
    reaches the handler and gets a 400 that explains the rule rather than a bare 404."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class HealthReport(Protocol):
    """What the probes answer from: `/readyz` the parts not ready, `/livez` the parts stuck (the
    service's `Readiness` gathers both)."""

    async def not_ready(self) -> dict[str, str]:
        """The parts that are not ready, each with what is wrong; empty when all are."""
        ...

    def not_live(self) -> dict[str, str]:
        """The parts stuck for good, each with why; empty when none is."""
        ...


class ErrorBody(BaseModel):
    error: str


class NotFoundBody(BaseModel):
    error: str
    order_uid: str


class RecentOrdersBody(BaseModel):
    orders: list[OrderSummary]


class ReadinessBody(BaseModel):
    status: str
    not_ready: dict[str, str]


class LivenessBody(BaseModel):
    status: str
    stuck: dict[str, str] = {}


def _error(status: int, message: str, **extra: str) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 503 else None
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


_UNAVAILABLE = {"model": ErrorBody, "description": "The database is unreachable; retry later."}
# Answers of the guarded routes when the service requires authentication.
_GUARDED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No bearer token, or not a valid one."},
    403: {"model": ErrorBody, "description": "The token lacks the route's scope."},
    429: {"model": ErrorBody, "description": "Too many failed authentications from this client."},
}


def _as_json(answers: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """Error answers documented as the JSON they are, on a route whose own body is not JSON:
    FastAPI puts a response model under the route's media type."""
    return {
        status: {
            "description": answer["description"],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        }
        for status, answer in answers.items()
    }


def create_app(
    lookup: OrderLookup,
    health: HealthReport,
    metrics: Metrics | None,
    access: AccessPolicy | None = None,
    *,
    tls: bool = False,
    trails: bool = True,
    events: OrderEvents | None = None,
    tracing: traces.Tracing | None = None,
) -> ASGIApp:
    """The HTTP app; with `metrics`, every request is counted and `/metrics` serves them; with
    `access`, orders and metrics need a token with their scope; with `tls` (served over HTTPS),
    every answer says that browsers must use nothing else; without `trails`
    (ORDER_TRAIL_ENABLED=false), the trail route answers 404; with `events`, the stream of an
    order's changes is served from that hub; with `tracing`, every request is a server span."""
    guarded: dict[int | str, dict[str, Any]] = {} if access is None else _GUARDED
    # /docs serves Swagger UI from files installed with the package, so it works where the
    # browser cannot reach a CDN; the page is our own (below), to send it with its security
    # headers and without the OAuth2 redirect page nothing here uses. No ReDoc: its bundle still
    # fetches a logo from its maker. No redirect to the path with or without a trailing slash:
    # Starlette's is absolute, made from the request's Host header, so anyone could make the
    # service send a browser elsewhere.
    app = FastAPIOffline(
        static_url=DOCS_FILES,
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,
        title="order-viewer",
        summary="Orders consumed from Kafka, stored in PostgreSQL, served by id.",
        version=_version(),
    )
    # Starlette keeps convertors in one table of its own; registering the same one again when
    # another app is made (as the tests do) replaces it with an equal one.
    register_url_convertor("any_text", _AnyText())
    static = resources.files("order_viewer.adapters.http") / "static"
    index_html = (static / "index.html").read_bytes()
    docs_html = bytes(
        get_swagger_ui_html(
            openapi_url=str(app.openapi_url),
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{DOCS_FILES}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_FILES}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_FILES}/favicon.png",
        ).body
    )

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return _html_page(index_html, CONTENT_SECURITY_POLICY)

    docs_policy = DOCS_CONTENT_SECURITY_POLICY.format(script=_inline_script_source(docs_html))

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return _html_page(docs_html, docs_policy)

    # Both before the order's route, whose id takes any rest of the path.
    _add_trail_route(app, lookup, guarded, trails=trails)
    if events is not None:
        _add_event_stream(app, events, guarded)

    @app.get(
        f"{ORDER_PATH}{{order_uid:any_text}}",
        summary="One order by its id",
        response_model=Order,
        responses={
            304: {"description": "The client's copy (If-None-Match) is current."},
            400: {"model": ErrorBody, "description": "The id cannot be an order id."},
            404: {"model": NotFoundBody, "description": "No such order."},
            503: _UNAVAILABLE,
            **guarded,
        },
    )
    async def order(order_uid: OrderUid, request: Request) -> Response:
        # Orders in memory were answered by Front before the request got here.
        if not _order_uid.fullmatch(order_uid):
            return _error(400, _BAD_ORDER_UID)
        try:
            found = await lookup.load(order_uid)
        except DatabaseUnavailable:
            return _error(503, "the order is not in memory and the database is unreachable")
        if found is None:
            status, headers, body = absent_answer(order_uid)
        else:
            status, headers, body = order_answer(
                found, request.scope.get(ORDER_VIEW), raw_header(request.scope, b"if-none-match")
            )
        response = Response(body, status_code=status)
        response.raw_headers[:0] = headers
        return response

    @app.get(
        "/orders",
        summary="The most recent orders",
        response_model=RecentOrdersBody,
        responses={400: {"model": ErrorBody}, 503: _UNAVAILABLE, **guarded},
    )
    async def recent_orders(limit: Annotated[int, Query(ge=1, le=100)] = 20) -> Response:
        try:
            summaries = await lookup.recent(limit)
        except DatabaseUnavailable:
            return _error(503, "the database is unreachable")
        body = RecentOrdersBody(orders=summaries)
        return Response(body.model_dump_json(), media_type="application/json")

    @app.get(
        "/livez",
        summary="The process is up and none of its parts is stuck for good",
        response_model=LivenessBody,
        responses={503: {"model": LivenessBody, "description": "A part is stuck: restart."}},
    )
    async def livez() -> JSONResponse:
        stuck = health.not_live()
        if stuck:
            return JSONResponse({"status": "stuck", "stuck": stuck}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get(
        "/readyz",
        summary="Database reachable, cache warmed, consumer running",
        response_model=ReadinessBody,
        responses={503: {"model": ReadinessBody}},
    )
    async def readyz() -> JSONResponse:
        not_ready = await health.not_ready()
        return JSONResponse(
            {"status": "not ready" if not_ready else "ready", "not_ready": not_ready},
            status_code=503 if not_ready else 200,
        )

    if metrics is not None:
        registry = metrics.exposed

        @app.get(
            "/metrics",
            summary="Prometheus metrics",
            response_class=PlainTextResponse,
            responses=_as_json(guarded),
        )
        async def prometheus_metrics() -> Response:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.mount(PAGE_FILES, StaticFiles(directory=str(static)), name="static")
    if metrics is not None and events is not None:
        metrics.count_event_streams(events)
    guard = None if access is None else AccessGuard(access, metrics)
    stats = None if metrics is None else metrics.http
    front = (
        Front(app, lookup, guard, stats)
        if tracing is None
        else TracedFront(app, lookup, guard, stats, tracing)
    )
    return StrictTransport(front) if tls else front


def _add_trail_route(
    app: FastAPI, lookup: OrderLookup, guarded: dict[int | str, dict[str, Any]], *, trails: bool
) -> None:
    """The route of an order's trail; without `trails`, it answers 404."""

    @app.get(
        f"{ORDER_PATH}{{order_uid:any_text}}{TRAIL_SUFFIX}",
        summary="What became of every message of an order, and its state",
        description="Each message with this order id that the service handled, oldest first: "
        "where it came from and its outcome (stored, unchanged, older, dead_lettered, "
        "deleted). Paged: `next` is the `after` of the following page. No personal data.",
        response_model=TrailBody,
        responses={
            400: {"model": ErrorBody, "description": "A bad id, limit or cursor."},
            404: {"model": ErrorBody, "description": "Nothing known of the id, or trails off."},
            503: _UNAVAILABLE,
            **guarded,
        },
    )
    async def order_trail(
        order_uid: OrderUid,
        limit: Annotated[int, Query(ge=1, le=MAX_TRAIL_LIMIT)] = TRAIL_LIMIT,
        # Published for clients, and checked below to answer with its own 400.
        after: Annotated[
            str | None,
            Query(
                description="The `next` of the previous page.",
                json_schema_extra={"pattern": CURSOR_PATTERN, "minLength": 11, "maxLength": 11},
            ),
        ] = None,
    ) -> Response:
        if not trails:
            return _error(404, "order trails are off (ORDER_TRAIL_ENABLED=false)")
        if not _order_uid.fullmatch(order_uid):
            return _error(400, _BAD_ORDER_UID)
        try:
            key = 0 if after is None else key_of(after)
        except InvalidCursor:
            return _error(400, "after: not a cursor of this API")
        try:
            trail = await lookup.trail(order_uid, limit, key)
        except DatabaseUnavailable:
            return _error(503, "the database is unreachable")
        if trail is None:
            return _error(404, "nothing is known of this order id", order_uid=order_uid)
        return Response(trail_body(trail).model_dump_json(), media_type="application/json")


def _add_event_stream(
    app: FastAPI, events: OrderEvents, guarded: dict[int | str, dict[str, Any]]
) -> None:
    """The route of the stream of an order's changes, fed by `events`."""

    @app.get(
        EVENTS_ROUTE,
        summary="The changes of one order, as they are stored (Server-Sent Events)",
        description=(
            "An event stream: `event: version` with the order (as `GET /order/{order_uid}` "
            "gives it to the caller) and `id:` the offset of its message, on connect if it "
            "is stored and on each new version; `event: deleted` when it is deleted; a "
            f"comment every {HEARTBEAT_SECONDS:.0f} s. A stream ends after "
            f"{STREAM_LIFETIME_SECONDS / 60:.0f} minutes, for the client to connect again "
            "(and its credential to be checked again). With `Last-Event-ID`, the state on "
            "connect is sent only if newer than that offset."
        ),
        response_class=_EventStream,
        # Declared here rather than as a parameter: as an optional one, its schema would allow
        # null, which a header can only carry as the text "null".
        openapi_extra={"parameters": [_LAST_EVENT_ID_PARAMETER]},
        status_code=200,
        response_description="The event stream, until the client leaves or the service stops.",
        responses={
            200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
            **_as_json(
                {
                    400: {"description": "Not an order id, or not an event id of the stream."},
                    503: {"description": "As many streams are open as allowed; retry later."},
                    **guarded,
                }
            ),
        },
    )
    async def order_events(
        order_uid: Annotated[
            str,
            Path(
                description="1 to 64 letters, digits, '-' or '_'",
                json_schema_extra={
                    "pattern": ORDER_UID_PATTERN,
                    "minLength": 1,
                    "maxLength": 64,
                },
            ),
        ],
        request: Request,
    ) -> Response:
        last_event_id = request.headers.get("last-event-id")
        if not _order_uid.fullmatch(order_uid):
            return _error(400, "an order id is 1 to 64 letters, digits, '-' or '_'")
        last_offset = None
        if last_event_id is not None:
            if not _LAST_EVENT_ID.fullmatch(last_event_id) or (
                int(last_event_id) > _LARGEST_OFFSET
            ):
                return _error(400, "Last-Event-ID: not an event id of this stream")
            last_offset = int(last_event_id)
        subscription = events.subscribe(order_uid, last_offset)
        if subscription is None:
            return _error(503, "too many event streams are open")
        return _EventStream(events, subscription, request.scope.get(ORDER_VIEW))


def _html_page(body: bytes, content_security_policy: str) -> Response:
    """A page of the service, with the headers that keep what it runs to its own files."""
    return Response(
        body,
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": content_security_policy,
            "X-Content-Type-Options": "nosniff",
        },
    )


def _inline_script_source(html: bytes) -> str:
    """The Content-Security-Policy source that allows the one inline script of `html`, by its
    digest: the script is made by the framework, and changes with its version."""
    (script,) = re.findall(rb"<script>(.*?)</script>", html, re.S)
    return f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"


class StrictTransport:
    """Adds `Strict-Transport-Security` to every answer, so that a browser that has reached the
    service over HTTPS once never sends it a request (or a token) in clear afterwards."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_hsts(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message["headers"], STRICT_TRANSPORT_SECURITY]
            await send(message)

        await self._app(scope, receive, send_with_hsts)


_ORDER_CACHE_CONTROL = (b"cache-control", ORDER_CACHE_CONTROL.encode())
_JSON = (b"content-type", b"application/json")
_ABSENT_BODY = b'{"error":"no order with this id","order_uid":%s}'


def order_answer(
    found: CachedOrder, view: View | None, if_none_match: bytes | None
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The status, headers and body that answer a GET of an order found, as `view` shows it
    (None: whole), honouring the client's If-None-Match: the one place that makes them, for an
    order in memory and one read from the database alike."""
    if view is not None:
        found = view(found)
    headers = [(b"etag", found.etag.encode()), _ORDER_CACHE_CONTROL]
    if if_none_match is not None and _matches(if_none_match.decode("latin-1"), found.etag):
        return 304, headers, b""
    headers.append(_JSON)
    return 200, headers, found.body


def absent_answer(order_uid: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """The answer to a GET of an order that is not stored: the one place that makes it, for an
    id the cache knows absent and one the database did not find alike."""
    # The id as a JSON string, quoted and escaped; a whole json.dumps of the body took most of
    # the time of an absent id's answer (docs/PERFORMANCE.md, Absent ids).
    return 404, [_JSON], _ABSENT_BODY % encode_basestring_ascii(order_uid).encode()


def _matches(if_none_match: str, etag: str) -> bool:
    candidates = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return etag in candidates or "*" in candidates


class _EventStream(StreamingResponse):
    """The stream of one order's changes: each state the hub offers, in the caller's view, and
    a heartbeat comment while there is none, until the client leaves or the service stops.
    Watching for the client's leaving ends it at once, not at the next write."""

    media_type = "text/event-stream"

    def __init__(self, events: OrderEvents, subscription: Subscription, view: View | None) -> None:
        super().__init__(
            _event_frames(subscription, view),
            # no-cache: never kept; X-Accel-Buffering: a proxy such as nginx passes each
            # event on at once instead of gathering the answer.
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
        self._events = events
        self._subscription = subscription

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        leaving = asyncio.ensure_future(self._until_disconnect(receive))
        try:
            await self.stream_response(send)
        except OSError:
            pass  # the client left while an event was being sent
        finally:
            leaving.cancel()
            self._events.unsubscribe(self._subscription)

    async def _until_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._subscription.close()


async def _event_frames(subscription: Subscription, view: View | None) -> AsyncIterator[bytes]:
    ends = time.monotonic() + STREAM_LIFETIME_SECONDS
    while (left := ends - time.monotonic()) > 0:
        try:
            state = await subscription.next(min(HEARTBEAT_SECONDS, left))
        except StreamEnded:
            return
        yield b": heartbeat\n\n" if state is None else event_frame(subscription, state, view)


def event_frame(subscription: Subscription, state: OrderState, view: View | None) -> bytes:
    """One Server-Sent Event of an order's state: its offset as the id (absent for a deletion
    without a tombstone), and the order as `GET /order/{id}` would give it to the caller."""
    frame = b"" if state.offset is None else b"id: %d\n" % state.offset
    if state.order is None:
        data = json.dumps({"order_uid": subscription.order_uid}).encode()
        return frame + b"event: deleted\ndata: " + data + b"\n\n"
    shown = state.order if view is None else view(state.order)
    # The stored document is compact JSON, one line; a line break in it would still be
    # delivered whole, each line of it a data line of the event.
    lines = b"".join(b"data: " + line + b"\n" for line in shown.body.splitlines())
    return frame + b"event: version\n" + lines + b"\n"


class Front:
    """The service's ASGI app, which every request passes once, downhill: the access check of
    a guarded route (the guard decides and returns), an order in memory answered here, anything
    else answered by the framework behind; then the request's metrics and audit line.

    Orders in memory are the hot path, answered in this frame without a coroutine or a wrapped
    `send` more: the framework's routing, validation and response objects would cost most of
    their time (docs/PERFORMANCE.md). So are the ids the cache knows absent, a client polling
    for an order not there yet or a flood of made-up ids. The framework documents the order
    route and answers its other cases, with the same `order_answer` and `absent_answer`.
    """

    def __init__(
        self, app: ASGIApp, lookup: OrderLookup, guard: AccessGuard | None, stats: HttpStats | None
    ) -> None:
        self._app = app
        self._lookup = lookup
        self._guard = guard
        self._stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        guard = self._guard
        # Set on a guarded route only: the request's principal, what it may see, its client.
        principal: Principal | None = None
        view: View | None = None
        client = "-"
        if guard is not None and (needed := required_scope(path)) is not None:
            client = guard.client(scope)
            verdict = guard.admit(scope, needed, client)
            if isinstance(verdict, PendingToken):
                verdict = await guard.verify(verdict, needed, client)
            if isinstance(verdict, Refusal):
                await self._refuse(path, send, verdict, client, started)
                return
            principal, view = verdict, guard.view(verdict)
        if path.startswith(ORDER_PATH) and scope["method"] == "GET":
            # No order id holds a '/': a trail's path is never found in the cache.
            order_uid = path[len(ORDER_PATH) :]
            answer = self._from_memory(order_uid, view, scope)
            if answer is not None:
                status, headers, body = answer
                if principal is not None:
                    headers += PRIVATE
                # Before the sends, which only hand the two messages to the server. Memory
                # answers 404 only for an id it remembers the database did not have.
                self._record(ORDER_ROUTE, status, started, "absent" if status == 404 else "hit")
                try:
                    await send(
                        {"type": "http.response.start", "status": status, "headers": headers}
                    )
                    await send({"type": "http.response.body", "body": body})
                finally:  # a client gone mid-answer may have read it: audited too
                    if principal is not None:
                        audit_order_read(principal, order_uid, status, view_name(view), client)
                return
        if principal is None and self._stats is None:
            await self._app(scope, receive, send)
            return
        await self._answered_by_app(
            scope, receive, send, principal=principal, view=view, client=client, started=started
        )

    async def _answered_by_app(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        principal: Principal | None,
        view: View | None,
        client: str,
        started: float,
    ) -> None:
        """The request answered by the framework, counted, and audited when guarded."""
        path: str = scope["path"]
        scope[ORDER_VIEW] = view
        status = 500
        route = route_template(path)
        # A stream is audited once its answer starts, not when it ends, hours later maybe.
        audited = False

        async def send_noting_status(message: Message) -> None:
            nonlocal status, audited
            if message["type"] == "http.response.start":
                status = message["status"]
                if principal is not None:
                    message["headers"] = [*message["headers"], *PRIVATE]
                    if route == EVENTS_ROUTE:
                        audit_request(principal, path, status, view_name(view), client)
                        audited = True
            await send(message)

        try:
            await self._app(scope, receive, send_noting_status)
        finally:
            self._record(route, status, started, "miss" if route == ORDER_ROUTE else None)
            if principal is not None and not audited:
                audit_request(principal, path, status, view_name(view), client)

    def _from_memory(
        self, order_uid: str, view: View | None, scope: Scope
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        """The answer to a GET of the order if memory has it: the order, or that it is absent."""
        found = self._lookup.cached(order_uid)
        if found is None:
            return None
        if found is ABSENT:
            return absent_answer(order_uid)
        return order_answer(found, view, raw_header(scope, b"if-none-match"))

    async def _refuse(
        self, path: str, send: Send, refusal: Refusal, client: str, started: float
    ) -> None:
        await send(
            {"type": "http.response.start", "status": refusal.status, "headers": refusal.headers}
        )
        await send({"type": "http.response.body", "body": refusal.body})
        self._record(route_template(path), refusal.status, started)
        audit_request(refusal.principal, path, refusal.status, "-", client)

    def _record(self, route: str, status: int, started: float, cache: str | None = None) -> None:
        """The request counted; `cache` says whether an order's GET was a hit, a miss, or an
        id remembered absent."""
        if self._stats is not None:
            self._stats.record(route, status, time.perf_counter() - started)


class TracedFront(Front):
    """`Front` with a server span around every sampled request, made only when tracing is on,
    so that the front without it checks nothing more per request. A request the sampler drops
    goes through that front as it is, with nothing made for it but the decision."""

    def __init__(
        self,
        app: ASGIApp,
        lookup: OrderLookup,
        guard: AccessGuard | None,
        stats: HttpStats | None,
        tracing: traces.Tracing,
    ) -> None:
        super().__init__(app, lookup, guard, stats)
        self._tracing = tracing
        self._untraced = Front(app, lookup, guard, stats)

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]:
        # Not a coroutine itself: a request the sampler drops is the plain front's coroutine,
        # with no frame of this one's in between.
        span = (
            None
            if scope["type"] != "http"
            else self._tracing.request(scope["method"], scope["path"], scope["headers"])
        )
        if span is None:
            return self._untraced(scope, receive, send)
        return self._traced(span, scope, receive, send)

    async def _traced(self, span: traces.Span, scope: Scope, receive: Receive, send: Send) -> None:
        # Current while the request is answered: its database read and log lines are its.
        token = traces.made_current(span)
        try:
            await super().__call__(scope, receive, send)
        except BaseException as error:
            traces.failed(span, error)
            raise
        finally:
            traces.ended(span, token)

    def _record(self, route: str, status: int, started: float, cache: str | None = None) -> None:
        super()._record(route, status, started, cache)
        traces.answered(route, status, cache)


def _version() -> str:
    return version("order-viewer")
