"""Access control in front of the HTTP app: authentication, scopes, the masked view, the limit on
failed attempts and the audit trail of order reads.

Only the routes that carry order data or metrics are guarded; health, the page, its files and
the API description stay open, since they carry none.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter
from starlette.types import Message, Receive, Scope, Send

from order_viewer.auth import (
    METRICS_READ,
    ORDERS_READ,
    Authenticator,
    AuthFailure,
    FailureLimiter,
    JwtVerifier,
    KeysUnavailable,
    Principal,
    TokenFile,
    TokenFileError,
    bearer_token,
    open_token_file,
)
from order_viewer.cache import CachedOrder
from order_viewer.config import Settings
from order_viewer.forwarded import TrustedProxies, limiter_key
from order_viewer.logs import printable, sole_writer
from order_viewer.masking import MaskedViews
from order_viewer.metrics import HttpStats, Metrics, route_template

audit = logging.getLogger("order_viewer.audit")
AUDIT_LINE = "order read principal=%s order_uid=%s status=%d view=%s client=%s"
LIST_AUDIT_LINE = "orders listed principal=%s status=%d view=%s client=%s"

# The key of the request scope under which the guard leaves the view a principal may see; the
# order routes apply it to the order they found (absent: the order whole).
ORDER_VIEW = "order_viewer.view"
REALM = 'Bearer realm="order-viewer"'


def raw_header(scope: Scope, name: bytes) -> bytes | None:
    """A request header's value as the client sent it; None when absent."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


View = Callable[[CachedOrder], CachedOrder]
Headers = tuple[tuple[bytes, bytes], ...]
# A status and the two messages that send it.
Answer = tuple[int, Message, Message]


def viewed(scope: Scope, found: CachedOrder) -> CachedOrder:
    """The order as the request's principal may see it."""
    view: View | None = scope.get(ORDER_VIEW)
    return found if view is None else view(found)


class OrdersInMemory(Protocol):
    """The app in front of the framework, which answers the orders it holds in memory
    (api.CachedOrders): the guard asks it directly, without wrapping its `send`."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...

    def answer(self, scope: Scope, view: View | None, extra_headers: Headers) -> Answer | None:
        """The answer to a GET of /order/{id} when that order is in memory, for the caller to
        send; None otherwise."""
        ...


@dataclass(frozen=True)
class AccessPolicy:
    authenticator: Authenticator
    limiter: FailureLimiter
    views: MaskedViews
    # None: no proxy is trusted, and the peer is the client.
    proxies: TrustedProxies | None = None


class AccessConfigurationError(Exception):
    """The authentication settings point at something unusable; the message says what."""


def access_policy(settings: Settings) -> AccessPolicy | None:
    """The policy the settings ask for; None with HTTP_AUTH=none."""
    authenticator: Authenticator
    if settings.http_auth == "token":
        assert settings.http_tokens_file is not None  # the settings validated it
        try:
            authenticator = open_token_file(settings.http_tokens_file)
        except TokenFileError as error:
            raise AccessConfigurationError(f"HTTP_TOKENS_FILE: {error}") from None
    elif settings.http_auth == "jwt":
        assert settings.http_jwt_jwks_url is not None
        assert settings.http_jwt_issuer is not None
        assert settings.http_jwt_audience is not None
        authenticator = JwtVerifier(
            str(settings.http_jwt_jwks_url),
            settings.http_jwt_issuer,
            settings.http_jwt_audience,
            max_lifetime=settings.http_jwt_max_lifetime_seconds,
        )
    else:
        return None
    return AccessPolicy(
        authenticator,
        FailureLimiter(),
        MaskedViews(settings.cache_capacity, settings.cache_max_bytes),
        TrustedProxies(settings.http_trusted_proxies) if settings.http_trusted_proxies else None,
    )


def _required_scope(path: str) -> str | None:
    if path.startswith("/order"):  # /order/{id} and /orders
        return ORDERS_READ
    if path == "/metrics":
        return METRICS_READ
    return None


class AccessGuard:
    """ASGI wrapper that lets a request on a guarded route through only with a token that
    carries the route's scope, and writes one audit line per order read."""

    def __init__(self, app: OrdersInMemory, policy: AccessPolicy, metrics: Metrics | None) -> None:
        self._app = app
        self._authenticator = policy.authenticator
        self._limiter = policy.limiter
        self._masked = policy.views.masked
        self._proxies = policy.proxies
        self._stats: HttpStats | None = None
        self._failures: Counter | None = None
        if metrics is not None:
            self._stats = metrics.http
            self._failures = Counter(
                "order_viewer_http_auth_failures",
                "Requests refused for their credentials (401) or for too many failures (429), "
                "by reason.",
                ["reason"],
                registry=metrics.registry,
            )
            metrics.count_masked_views(policy.views)
            if isinstance(policy.authenticator, TokenFile):
                metrics.count_token_file(policy.authenticator)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        needed = _required_scope(scope["path"]) if scope["type"] == "http" else None
        if needed is None:
            await self._app(scope, receive, send)
            return
        started = time.perf_counter()
        client = scope["client"][0] if scope.get("client") else "-"
        if self._proxies is not None:
            client = self._proxies.client(client, scope["headers"])
        counted_as = limiter_key(client)
        principal: Principal | None = None
        wait = self._limiter.retry_after(counted_as)
        if wait is not None:
            denial = _denial(429, "too many failed authentications", {"retry-after": str(wait)})
            self._count_failure("rate_limited")
        else:
            try:
                token = bearer_token(raw_header(scope, b"authorization"))
                principal = self._authenticator.known(
                    token
                ) or await self._authenticator.authenticate(token)
            except AuthFailure as failure:
                # No token guesses nothing, and a page loads without one before its sign-in:
                # counted, a few tabs behind one address would lock everyone there out.
                if failure.reason != "missing":
                    self._limiter.failed(counted_as)
                self._count_failure(failure.reason)
                challenge = (
                    REALM if failure.reason == "missing" else f'{REALM}, error="invalid_token"'
                )
                denial = _denial(
                    401, "a valid bearer token is needed", {"www-authenticate": challenge}
                )
            except KeysUnavailable as unavailable:
                # The provider is away, not the token bad: neither counted nor to be dropped.
                denial = _denial(
                    503,
                    "the identity provider's keys are unavailable",
                    {"retry-after": str(unavailable.retry_after)},
                )
            else:
                if principal.may(needed):
                    view = None if principal.sees_personal_data else self._masked
                    # The hot path: an order in memory, answered without a coroutine more.
                    answer = (
                        self._app.answer(scope, view, _PRIVATE)
                        if scope["path"].startswith("/order/")
                        else None
                    )
                    if answer is not None:
                        try:
                            await send(answer[1])
                            await send(answer[2])
                        finally:  # a client gone mid-answer may have read it: audited too
                            audit_order_read(
                                principal,
                                scope["path"],
                                answer[0],
                                _view_name(view),
                                client,
                            )
                        return
                    await self._pass(scope, receive, send, principal, view=view, client=client)
                    return
                denial = _denial(
                    403,
                    f"the token lacks the scope {needed}",
                    {"www-authenticate": f'{REALM}, error="insufficient_scope", scope="{needed}"'},
                )
        status, headers, body = denial
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        if self._stats is not None:
            self._stats.record(route_template(scope["path"]), status, time.perf_counter() - started)
        audit_request(principal, scope["path"], status, "-", client)

    async def _pass(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        principal: Principal,
        *,
        view: View | None,
        client: str,
    ) -> None:
        """A request the principal may make, to the app, its answer kept private; on order data,
        with its audit line."""
        scope[ORDER_VIEW] = view
        status = 500

        async def send_privately(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message["headers"], *_PRIVATE]
            await send(message)

        try:
            await self._app(scope, receive, send_privately)
        finally:
            audit_request(principal, scope["path"], status, _view_name(view), client)

    def _count_failure(self, reason: str) -> None:
        if self._failures is not None:
            self._failures.labels(reason).inc()


# Every answer of a guarded route depends on the credential (an order in the principal's view,
# the list, a refusal): no cache may keep one, a browser's included, where the next user of a
# shared machine or a proxy in between could read it.
_PRIVATE: Headers = ((b"vary", b"Authorization"), (b"cache-control", b"no-store"))


def _view_name(view: View | None) -> str:
    """How the audit line names the view: no view is the order whole."""
    return "whole" if view is None else "masked"


def _denial(
    status: int, message: str, extra: dict[str, str]
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    headers = [(b"content-type", b"application/json"), *_PRIVATE]
    headers += [(name.encode(), value.encode()) for name, value in extra.items()]
    return status, headers, json.dumps({"error": message}).encode()


def audit_request(
    principal: Principal | None, path: str, status: int, view: str, client: str
) -> None:
    """The audit line of a guarded request, if it asked for order data: an order or the list."""
    if path.startswith("/order/"):
        audit_order_read(principal, path, status, view, client)
    elif path == "/orders":
        level = logging.INFO if status < 400 else logging.WARNING
        name = principal.logged_name if principal is not None else "-"
        audit.log(level, LIST_AUDIT_LINE, name, status, view, client)


def audit_order_read(
    principal: Principal | None, path: str, status: int, view: str, client: str
) -> None:
    """The audit line of a request on /order/{order_uid}; the principal's name is escaped like
    the id, since a JWT `sub` may hold anything."""
    # Never a body, a token or a personal field: who, which order, what answer, from where.
    # Refusals at WARNING: a LOG_LEVEL that drops routine reads still records them.
    level = logging.INFO if status < 400 or status == 404 else logging.WARNING
    if not audit.isEnabledFor(level):
        return
    order_uid = path[len("/order/") :][:80]
    args = (
        principal.logged_name if principal is not None else "-",
        printable(order_uid),
        status,
        view,
        client,
    )
    writer = sole_writer(audit, level)
    if writer is not None:
        # The service's own log set-up: the line without a record (docs/DESIGN.md, Audit).
        writer.defer(level, audit.name, AUDIT_LINE % args, (("order_uid", order_uid),))
        return
    # Made and handed to the logger's handlers directly, as Logger.log would but without its
    # search of the stack for the caller (a tenth of the line's cost): it is always this line.
    audit.handle(
        audit.makeRecord(
            audit.name,
            level,
            __file__,
            0,
            AUDIT_LINE,
            args,
            None,
            "audit_order_read",
            {"order_uid": order_uid},
        )
    )
