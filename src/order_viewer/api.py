"""The HTTP app: orders by id, the recent orders, health, and the page that shows them."""

from __future__ import annotations

import re
import time
from importlib import resources
from importlib.metadata import version
from typing import Annotated, Any, Protocol

from fastapi import Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.convertors import Convertor, register_url_convertor
from starlette.types import ASGIApp, Receive, Scope, Send

from order_viewer.access import (
    ORDER_VIEW,
    AccessGuard,
    AccessPolicy,
    Answer,
    Headers,
    View,
    raw_header,
    viewed,
)
from order_viewer.cache import CachedOrder
from order_viewer.metrics import (
    DOCS_FILES,
    ORDER_ROUTE,
    PAGE_FILES,
    HttpStats,
    Metrics,
    RequestMetrics,
)
from order_viewer.model import ORDER_UID_PATTERN, Order
from order_viewer.ports import DatabaseUnavailable, OrderSummary
from order_viewer.service import OrderLookup

RETRY_AFTER_SECONDS = "5"
# The page's scripts and styles are files of our own; nothing inline, nothing from elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# An order changes only when a new message replaces it, so clients may keep a copy but must
# revalidate it (cheaply, with the ETag) before use.
ORDER_CACHE_CONTROL = "no-cache"

_order_uid = re.compile(ORDER_UID_PATTERN)


class _AnyText(Convertor[str]):
    """Matches any path remainder, newlines and slashes included, so that every malformed id
    reaches the handler and gets a 400 that explains the rule rather than a bare 404."""

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


class Readiness(Protocol):
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
    readiness: Readiness,
    metrics: Metrics | None,
    access: AccessPolicy | None = None,
) -> ASGIApp:
    """The HTTP app; with `metrics`, every request is counted and `/metrics` serves them; with
    `access`, orders and metrics need a token with their scope."""
    guarded: dict[int | str, dict[str, Any]] = {} if access is None else _GUARDED
    # /docs serves Swagger UI from files installed with the package, so it works where the
    # browser cannot reach a CDN. No ReDoc: its bundle still fetches a logo from its maker.
    app = FastAPIOffline(
        static_url=DOCS_FILES,
        redoc_url=None,
        title="order-viewer",
        summary="Orders consumed from Kafka, stored in PostgreSQL, served by id.",
        version=_version(),
    )
    # Starlette keeps convertors in one table of its own; registering the same one again when
    # another app is made (as the tests do) replaces it with an equal one.
    register_url_convertor("any_text", _AnyText())
    static = resources.files("order_viewer") / "static"
    index_html = (static / "index.html").read_bytes()

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return _error(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return Response(
            index_html,
            media_type="text/html; charset=utf-8",
            headers={
                "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                "X-Content-Type-Options": "nosniff",
            },
        )

    @app.get(
        "/order/{order_uid:any_text}",
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
    async def order(
        # The rule is published for clients, and checked below to answer with its own 400.
        order_uid: Annotated[
            str,
            Path(
                description="1 to 64 letters, digits, '-' or '_'",
                json_schema_extra={"pattern": ORDER_UID_PATTERN, "minLength": 1, "maxLength": 64},
            ),
        ],
        request: Request,
    ) -> Response:
        # Orders in memory were answered by CachedOrders before the request got here.
        if not _order_uid.fullmatch(order_uid):
            return _error(400, "an order id is 1 to 64 letters, digits, '-' or '_'")
        try:
            found = await lookup.load(order_uid)
        except DatabaseUnavailable:
            return _error(503, "the order is not in memory and the database is unreachable")
        if found is None:
            return _error(404, "no order with this id", order_uid=order_uid)
        status, headers, body = order_reply(
            viewed(request.scope, found), request.headers.get("if-none-match")
        )
        return Response(body, status_code=status, headers=headers)

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
        stuck = readiness.not_live()
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
        not_ready = await readiness.not_ready()
        return JSONResponse(
            {"status": "not ready" if not_ready else "ready", "not_ready": not_ready},
            status_code=503 if not_ready else 200,
        )

    if metrics is not None:
        registry = metrics.registry

        @app.get(
            "/metrics",
            summary="Prometheus metrics",
            response_class=PlainTextResponse,
            responses=_as_json(guarded),
        )
        async def prometheus_metrics() -> Response:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.mount(PAGE_FILES, StaticFiles(directory=str(static)), name="static")
    front = (
        CachedOrders(app, lookup, None)
        if metrics is None
        else CachedOrders(RequestMetrics(app, metrics.http), lookup, metrics.http)
    )
    return front if access is None else AccessGuard(front, access, metrics)


def order_reply(found: CachedOrder, if_none_match: str | None) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body for an order found, honouring the client's If-None-Match."""
    headers = {"etag": found.etag, "cache-control": ORDER_CACHE_CONTROL}
    if if_none_match is not None and _matches(if_none_match, found.etag):
        return 304, headers, b""
    headers["content-type"] = "application/json"
    return 200, headers, found.body


def _matches(if_none_match: str, etag: str) -> bool:
    candidates = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return etag in candidates or "*" in candidates


class CachedOrders:
    """Answers GET /order/{id} for orders in memory before the framework sees the request.

    That is the hot path, and the framework's routing, validation and response objects would
    cost most of its time (docs/DESIGN.md has the figures); misses and everything else go on to
    the app, which documents the route and answers the other cases.
    """

    def __init__(self, app: ASGIApp, lookup: OrderLookup, stats: HttpStats | None) -> None:
        self._app = app
        self._lookup = lookup
        self._stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = (
            self.answer(scope, scope.get(ORDER_VIEW), ())
            if scope["type"] == "http" and scope["path"].startswith("/order/")
            else None
        )
        if answer is None:
            await self._app(scope, receive, send)
            return
        await send(answer[1])
        await send(answer[2])

    def answer(self, scope: Scope, view: View | None, extra_headers: Headers) -> Answer | None:
        """The answer to a GET of /order/{id} when that order is in memory, as `view` shows it
        with `extra_headers` too, and counted as answered; None otherwise. The caller sends its
        two messages: made a coroutine, this cost a hit a twentieth more."""
        if scope["method"] != "GET":
            return None
        started = time.perf_counter()
        found = self._lookup.cached(scope["path"][7:])
        if found is None:
            return None
        if_none_match = raw_header(scope, b"if-none-match")
        status, headers, body = order_reply(
            found if view is None else view(found),
            None if if_none_match is None else if_none_match.decode("latin-1"),
        )
        encoded = [(name.encode(), value.encode()) for name, value in headers.items()]
        if extra_headers:
            encoded += extra_headers
        if self._stats is not None:
            # Before the sends, which only hand the two messages to the server.
            self._stats.record(ORDER_ROUTE, status, time.perf_counter() - started)
        return (
            status,
            {"type": "http.response.start", "status": status, "headers": encoded},
            {"type": "http.response.body", "body": body},
        )


def _version() -> str:
    return version("order-viewer")
