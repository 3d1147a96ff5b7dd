"""Access control of the HTTP routes: who sent a request, whether it may use its route, what
it may see of an order, the limit on failed attempts, and the audit trail of order reads.

The guard decides and returns: it sends nothing and calls nothing of the app, which asks it
before answering (api.Front). Only the routes that carry order data or metrics are guarded;
health, the page, its files and the API description stay open, since they carry none.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from prometheus_client import Counter
from starlette.types import Scope

from order_viewer.adapters.cache import CachedOrder, MaskedViews
from order_viewer.adapters.http.auth import (
    METRICS_READ,
    ORDERS_READ,
    ORDERS_TRAIL,
    Authenticator,
    AuthFailure,
    KeysUnavailable,
    Principal,
    bearer_token,
)
from order_viewer.adapters.http.auth.limiter import FailureLimiter
from order_viewer.adapters.http.auth.tokens import TokenFile
from order_viewer.adapters.http.forwarded import TrustedProxies, limiter_key
from order_viewer.adapters.logs import escaped_for_log, sole_writer
from order_viewer.adapters.metrics import ORDER_PATH, Metrics, events_of, trail_of

audit = logging.getLogger("order_viewer.audit")
AUDIT_LINE = "order read principal=%s order_uid=%s status=%d view=%s client=%s"
LIST_AUDIT_LINE = "orders listed principal=%s status=%d view=%s client=%s"
TRAIL_AUDIT_LINE = "order trail read principal=%s order_uid=%s status=%d view=%s client=%s"
EVENTS_AUDIT_LINE = "order events read principal=%s order_uid=%s status=%d view=%s client=%s"
REALM = 'Bearer realm="order-viewer"'


def raw_header(scope: Scope, name: bytes) -> bytes | None:
    """A request header's value as the client sent it; None when absent."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


# What a principal may see of an order: the order whole, or a view of it.
View = Callable[[CachedOrder], CachedOrder]
Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class AccessPolicy:
    authenticator: Authenticator
    limiter: FailureLimiter
    views: MaskedViews
    # None: no proxy is trusted, and the peer is the client.
    proxies: TrustedProxies | None = None


class AccessConfigurationError(Exception):
    """The authentication settings point at something unusable; the message says what."""


class Refusal(NamedTuple):
    """The answer to a request the guard turns away, and its principal when the token was
    valid but lacks the route's scope (for the audit line)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    principal: Principal | None = None


@dataclass(frozen=True, slots=True)
class PendingToken:
    """A bearer token the guard cannot tell about at once: a JWT not verified before, whose key
    may have to be fetched."""

    token: str


def required_scope(path: str) -> str | None:
    """The scope a request on `path` needs; None for the routes open to all."""
    if trail_of(path) is not None:
        return ORDERS_TRAIL
    if path.startswith("/order"):  # /order/{id} and /orders
        return ORDERS_READ
    if path == "/metrics":
        return METRICS_READ
    return None


class AccessGuard:
    """Decides whether a request on a guarded route may be answered, by whom it was sent and
    what that principal may see of an order."""

    def __init__(self, policy: AccessPolicy, metrics: Metrics | None) -> None:
        self._authenticator = policy.authenticator
        self._limiter = policy.limiter
        self._masked = policy.views.masked
        self._proxies = policy.proxies
        self._failures: Counter | None = None
        if metrics is not None:
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

    def client(self, scope: Scope) -> str:
        """The address the request came from, as the failure limiter counts it and the audit
        line names it: behind trusted proxies, the client they forwarded it for."""
        client = scope["client"][0] if scope.get("client") else "-"
        if self._proxies is None:
            return client
        return self._proxies.client(client, scope["headers"])

    def admit(self, scope: Scope, needed: str, client: str) -> Principal | Refusal | PendingToken:
        """The principal of a request from `client` whose token carries the scope `needed`, or
        the refusal to answer it with, when that can be told at once (a token of the file, a JWT
        verified before); otherwise the token, for `verify` to tell. A coroutine only where one
        may wait keeps the hot path to plain calls."""
        counted_as = limiter_key(client)
        wait = self._limiter.retry_after(counted_as)
        if wait is not None:
            self._count_failure("rate_limited")
            return _refusal(429, "too many failed authentications", {"retry-after": str(wait)})
        try:
            token = bearer_token(raw_header(scope, b"authorization"))
            principal = self._authenticator.known(token)
        except AuthFailure as failure:
            return self._failed(failure, counted_as)
        return PendingToken(token) if principal is None else self._scoped(principal, needed)

    async def verify(self, pending: PendingToken, needed: str, client: str) -> Principal | Refusal:
        """`admit` for a token only the authenticator's `authenticate` can tell about."""
        try:
            principal = await self._authenticator.authenticate(pending.token)
        except AuthFailure as failure:
            return self._failed(failure, limiter_key(client))
        except KeysUnavailable as unavailable:
            # The provider is away, not the token bad: neither counted nor to be dropped.
            return _refusal(
                503,
                "the identity provider's keys are unavailable",
                {"retry-after": str(unavailable.retry_after)},
            )
        return self._scoped(principal, needed)

    def _failed(self, failure: AuthFailure, counted_as: str) -> Refusal:
        # No token guesses nothing, and a page loads without one before its sign-in: counted, a
        # few tabs behind one address would lock everyone there out.
        if failure.reason != "missing":
            self._limiter.failed(counted_as)
        self._count_failure(failure.reason)
        challenge = REALM if failure.reason == "missing" else f'{REALM}, error="invalid_token"'
        return _refusal(401, "a valid bearer token is needed", {"www-authenticate": challenge})

    @staticmethod
    def _scoped(principal: Principal, needed: str) -> Principal | Refusal:
        if principal.may(needed):
            return principal
        return _refusal(
            403,
            f"the token lacks the scope {needed}",
            {"www-authenticate": f'{REALM}, error="insufficient_scope", scope="{needed}"'},
            principal,
        )

    def view(self, principal: Principal) -> View | None:
        """What `principal` may see of an order: None for the order whole."""
        return None if principal.sees_personal_data else self._masked

    def _count_failure(self, reason: str) -> None:
        if self._failures is not None:
            self._failures.labels(reason).inc()


# Every answer of a guarded route depends on the credential (an order in the principal's view,
# the list, a refusal): no cache may keep one, a browser's included, where the next user of a
# shared machine or a proxy in between could read it.
PRIVATE: Headers = ((b"vary", b"Authorization"), (b"cache-control", b"no-store"))


def view_name(view: View | None) -> str:
    """How the audit line names the view: no view is the order whole."""
    return "whole" if view is None else "masked"


def _refusal(
    status: int, message: str, extra: dict[str, str], principal: Principal | None = None
) -> Refusal:
    headers = [(b"content-type", b"application/json"), *PRIVATE]
    headers += [(name.encode(), value.encode()) for name, value in extra.items()]
    return Refusal(status, headers, json.dumps({"error": message}).encode(), principal)


def audit_request(
    principal: Principal | None, path: str, status: int, view: str, client: str
) -> None:
    """The audit line of a guarded request, if it asked for order data: an order, its trail,
    the stream of its changes or the list."""
    trail_uid = trail_of(path)
    events_uid = events_of(path)
    if trail_uid is not None:
        audit_order_read(principal, trail_uid, status, view, client, line=TRAIL_AUDIT_LINE)
    elif events_uid is not None:
        audit_order_read(principal, events_uid, status, view, client, line=EVENTS_AUDIT_LINE)
    elif path.startswith(ORDER_PATH):
        audit_order_read(principal, path[len(ORDER_PATH) :], status, view, client)
    elif path == "/orders":
        level = logging.INFO if status < 400 else logging.WARNING
        name = principal.logged_name if principal is not None else "-"
        audit.log(level, LIST_AUDIT_LINE, name, status, view, client)


def audit_order_read(
    principal: Principal | None,
    order_uid: str,
    status: int,
    view: str,
    client: str,
    *,
    line: str = AUDIT_LINE,
) -> None:
    """The audit `line` of a request for the order `order_uid` (as the path held it, whatever
    it is), or for its trail; the principal's name is escaped like the id, since a JWT `sub`
    may hold anything."""
    # Never a body, a token or a personal field: who, which order, what answer, from where.
    # Refusals at WARNING: a LOG_LEVEL that drops routine reads still records them.
    level = logging.INFO if status < 400 or status == 404 else logging.WARNING
    if not audit.isEnabledFor(level):
        return
    order_uid = order_uid[:80]
    args = (
        principal.logged_name if principal is not None else "-",
        escaped_for_log(order_uid),
        status,
        view,
        client,
    )
    writer = sole_writer(audit, level)
    if writer is not None:
        # The service's own log set-up: the line without a record (docs/DESIGN.md, Audit).
        writer.defer(level, audit.name, line % args, (("order_uid", order_uid),))
        return
    # Made and handed to the logger's handlers directly, as Logger.log would but without its
    # search of the stack for the caller, which costs on every line: it is always this line.
    audit.handle(
        audit.makeRecord(
            audit.name,
            level,
            __file__,
            0,
            line,
            args,
            None,
            "audit_order_read",
            {"order_uid": order_uid},
        )
    )
