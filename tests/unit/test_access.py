"""The access guard's answers, and the audit line of an order read: its logger, level and
fields, whatever id a client sent."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from devstack.identity import AUDIENCE, ISSUER, IdentityProvider
from order_viewer import bootstrap
from order_viewer.adapters.cache import CachedOrder, MaskedViews, OrderCache
from order_viewer.adapters.http.access import (
    AccessConfigurationError,
    AccessGuard,
    AccessPolicy,
    audit,
    audit_order_read,
)
from order_viewer.adapters.http.api import Front, absent_answer, create_app
from order_viewer.adapters.http.auth import ORDERS_READ, Authenticator, AuthFailure, Principal
from order_viewer.adapters.http.auth.jwt import JWKS_RETRY_SECONDS, JwksAnswer, JwtVerifier
from order_viewer.adapters.http.auth.limiter import FailureLimiter
from order_viewer.adapters.http.auth.tokens import TokenFile
from order_viewer.adapters.http.forwarded import TrustedProxies, trusted_networks
from order_viewer.adapters.logs import BackgroundHandler, JsonFormatter, sole_writer
from order_viewer.adapters.metrics import Metrics
from order_viewer.adapters.packing import pack
from order_viewer.config import Settings
from order_viewer.domain.masking import DELIVERY_MASKS, MASK, masked_document
from order_viewer.entrypoints.generate import SAMPLE_ORDER, make_order
from order_viewer.service.lookup import OrderLookup
from tests.fakes import FakeReader

SUPPORT = Principal("support", frozenset({ORDERS_READ}))


def audit_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "order_viewer.audit"]


def test_the_line_names_who_read_which_order_with_what_answer_from_where(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="order_viewer.audit")
    audit_order_read(SUPPORT, "b563feb7b2b84b6test", 200, "masked", "10.0.0.7")
    audit_order_read(None, "b563feb7b2b84b6test", 401, "-", "10.0.0.8")
    read, refused = audit_records(caplog)
    assert read.getMessage() == (
        "order read principal=support order_uid=b563feb7b2b84b6test status=200 view=masked "
        "client=10.0.0.7"
    )
    assert read.levelno == logging.INFO
    assert read.order_uid == "b563feb7b2b84b6test"  # type: ignore[attr-defined]
    assert (read.funcName, read.module) == ("audit_order_read", "access")
    assert refused.getMessage() == (
        "order read principal=- order_uid=b563feb7b2b84b6test status=401 view=- client=10.0.0.8"
    )


@pytest.mark.parametrize(
    ("status", "level"),
    [
        (200, logging.INFO),
        (304, logging.INFO),
        (404, logging.INFO),
        (401, logging.WARNING),
        (403, logging.WARNING),
        (429, logging.WARNING),
        (500, logging.WARNING),
    ],
)
def test_refusals_are_warnings_and_reads_are_info(
    caplog: pytest.LogCaptureFixture, status: int, level: int
) -> None:
    caplog.set_level(logging.INFO, logger="order_viewer.audit")
    audit_order_read(SUPPORT, "x", status, "masked", "10.0.0.7")
    assert [record.levelno for record in audit_records(caplog)] == [level]


def test_a_level_above_info_keeps_only_the_refusals(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="order_viewer.audit")
    for status in (200, 304, 404, 403):
        audit_order_read(SUPPORT, "x", status, "masked", "10.0.0.7")
    assert [record.getMessage().split()[4] for record in audit_records(caplog)] == ["status=403"]


HOSTILE_IDS = [
    'quote"and\\backslash',
    "line\nbreak\r\nforged status=200 view=whole",
    "\x00\x1b[31mred\x7f",
    "naïve-☃-𝄞",
    "\ud800",
    "x" * 5000,
    "",
]


@pytest.mark.parametrize("uid", HOSTILE_IDS)
def test_an_id_of_any_kind_is_escaped_and_cut_on_one_line(
    caplog: pytest.LogCaptureFixture, uid: str
) -> None:
    caplog.set_level(logging.INFO, logger="order_viewer.audit")
    audit_order_read(SUPPORT, uid, 404, "masked", "10.0.0.7")
    (record,) = audit_records(caplog)
    message = record.getMessage()
    assert message.isascii()
    assert message.isprintable()
    written = message.split(" order_uid=")[1].rsplit(" status=404 ", 1)[0]
    assert json.loads(f'"{written}"') == uid[:80]
    assert record.order_uid == uid[:80]  # type: ignore[attr-defined]


@pytest.mark.parametrize("status", [200, 403])
@pytest.mark.parametrize("uid", HOSTILE_IDS)
def test_with_the_service_log_set_up_the_line_is_the_one_of_the_record(
    caplog: pytest.LogCaptureFixture, uid: str, status: int
) -> None:
    """The service's own set-up writes the line without making a record: the same line."""
    caplog.set_level(logging.INFO, logger="order_viewer.audit")
    audit_order_read(SUPPORT, uid, status, "masked", "10.0.0.7")
    (record,) = audit_records(caplog)
    output = io.StringIO()
    writer = BackgroundHandler(output)
    writer.setFormatter(JsonFormatter())
    audit.handlers, audit.propagate = [writer], False
    try:
        assert sole_writer(audit, record.levelno) is writer
        audit_order_read(SUPPORT, uid, status, "masked", "10.0.0.7")
    finally:
        audit.handlers, audit.propagate = [], True
        writer.stop()
    (line,) = output.getvalue().splitlines()
    written, expected = json.loads(line), json.loads(JsonFormatter().format(record))
    assert written.pop("time") >= expected.pop("time")  # written after the record was made
    assert written == expected


@pytest.mark.parametrize(
    "sub",
    [
        "mallory\n2026-01-01 INFO order_viewer.audit order read principal=admin",
        "mallory order_uid=other status=200 view=whole client=10.0.0.1",
        "\r\x00\x1b[2K\x7f\u2028\u0085",
        "ünïcode-☃",
        "\ud800",
    ],
)
def test_a_principal_of_any_name_is_escaped_on_one_line(
    caplog: pytest.LogCaptureFixture, sub: str
) -> None:
    caplog.set_level(logging.INFO, logger="order_viewer.audit")
    audit_order_read(Principal(sub, frozenset({ORDERS_READ})), "x", 200, "masked", "-")
    (record,) = audit_records(caplog)
    message = record.getMessage()
    assert message.isascii()
    assert message.isprintable()
    fields = message.split(" ")
    assert fields[:2] == ["order", "read"]
    assert [field.split("=")[0] for field in fields[2:]] == [
        "principal",
        "order_uid",
        "status",
        "view",
        "client",
    ]
    assert json.loads(f'"{fields[2].removeprefix("principal=")}"') == sub
    assert fields[3:] == ["order_uid=x", "status=200", "view=masked", "client=-"]


VALID = "valid-token"


class OneToken:
    def known(self, token: str) -> Principal | None:
        return None  # every token through `authenticate`, as a JWT not seen before

    async def authenticate(self, token: str) -> Principal:
        if token != VALID:
            raise AuthFailure("unknown_token")
        return SUPPORT


async def answer_ok(scope: Scope, receive: Receive, send: Send) -> None:
    """The framework behind the front, answering every request with a 200."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def front(
    policy: AccessPolicy, metrics: Metrics | None = None, cache: OrderCache | None = None
) -> Front:
    """The app's front with `policy`, in front of `answer_ok`, holding the orders of `cache`."""
    lookup = OrderLookup(FakeReader({}), OrderCache(10) if cache is None else cache)
    stats = None if metrics is None else metrics.http
    return Front(answer_ok, lookup, AccessGuard(policy, metrics), stats)


def request(path: str, authorization: str | None, client: str = "203.0.113.9") -> Scope:
    headers = [] if authorization is None else [(b"authorization", authorization.encode())]
    return {
        "type": "http",
        "method": "GET",
        "path": path,
        "headers": headers,
        "client": (client, 50000),
    }


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def answer(
    guard: Front, authorization: str | None, client: str = "203.0.113.9"
) -> tuple[int, dict[bytes, bytes]]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(guard(request("/orders", authorization, client), receive, send))
    return sent[0]["status"], dict(sent[0]["headers"])


def status_of(guard: Front, authorization: str | None, client: str = "203.0.113.9") -> int:
    return answer(guard, authorization, client)[0]


def guard(authenticator: Authenticator | None = None) -> Front:
    return front(AccessPolicy(authenticator or OneToken(), FailureLimiter(), MaskedViews(10, None)))


def test_requests_without_a_token_do_not_lock_out_their_address() -> None:
    # Page loads in many tabs behind one address, none signed in yet.
    checked = guard()
    for _ in range(60):
        assert status_of(checked, None) == 401
    assert status_of(checked, f"Bearer {VALID}") == 200


def test_wrong_tokens_still_lock_out_their_address() -> None:
    checked = guard()
    statuses = [status_of(checked, "Bearer guess") for _ in range(22)]
    assert statuses[:21] == [401] * 21
    assert statuses[21] == 429
    assert status_of(checked, f"Bearer {VALID}") == 429
    assert status_of(checked, f"Bearer {VALID}", client="203.0.113.10") == 200


def forwarded_for(
    checked: Front, token: str, forwarded: str, caplog: pytest.LogCaptureFixture
) -> tuple[int, str]:
    """The status of a GET of /orders through the proxy at 10.0.0.2, and the client its audit
    line names."""
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = request("/orders", f"Bearer {token}", client="10.0.0.2")
    scope["headers"].append((b"x-forwarded-for", forwarded.encode()))
    caplog.clear()
    asyncio.run(checked(scope, receive, send))
    (record,) = audit_records(caplog)
    return sent[0]["status"], record.getMessage().rsplit(" client=", 1)[1]


def test_failures_through_a_trusted_proxy_lock_out_their_client_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Behind the proxy every client had its address: 21 bad tokens from anyone locked out
    every valid user for a minute."""
    caplog.set_level(logging.INFO, logger="order_viewer.audit")
    limiter = FailureLimiter()
    proxies = TrustedProxies(trusted_networks("10.0.0.0/8"))
    checked = front(AccessPolicy(OneToken(), limiter, MaskedViews(10, None), proxies))
    attacker = [
        forwarded_for(checked, "guess", "198.51.100.1, 203.0.113.66", caplog) for _ in range(22)
    ]
    assert attacker[:21] == [(401, "203.0.113.66")] * 21
    assert attacker[21] == (429, "203.0.113.66")
    # A spoofed left-most hop changes nothing; another client behind the proxy is let in.
    assert forwarded_for(checked, VALID, "198.51.100.2, 203.0.113.66", caplog)[0] == 429
    assert forwarded_for(checked, VALID, "203.0.113.66, 203.0.113.77", caplog) == (
        200,
        "203.0.113.77",
    )
    # IPv6 clients are counted per /64, and audited by their whole address.
    for _ in range(21):
        assert forwarded_for(checked, "guess", "2001:db8:0:1::66", caplog)[0] == 401
    assert forwarded_for(checked, VALID, "[2001:db8:0:1::77]:4711", caplog) == (
        429,
        "2001:db8:0:1::77",
    )
    assert forwarded_for(checked, VALID, "2001:db8:0:2::66", caplog) == (200, "2001:db8:0:2::66")
    assert len(limiter) == 2


def test_without_trusted_proxies_a_forwarded_address_is_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="order_viewer.audit")
    checked = guard()
    for n in range(22):
        status, client = forwarded_for(checked, "guess", f"203.0.113.{n}", caplog)
        assert client == "10.0.0.2"
    assert status == 429


def test_an_identity_provider_away_is_a_503_to_retry_not_a_bad_token() -> None:
    provider = IdentityProvider()
    away = True

    def fetch(url: str) -> JwksAnswer:
        if away:
            raise ConnectionRefusedError(111, "Connection refused")
        return provider.fetch(url)

    now = [1000.0]
    verifier = JwtVerifier(
        "http://127.0.0.1:1/jwks", ISSUER, AUDIENCE, fetch=fetch, monotonic=lambda: now[0]
    )
    checked = guard(verifier)
    token = provider.token()
    for _ in range(25):
        status, headers = answer(checked, f"Bearer {token}")
        assert status == 503
        assert 1 <= int(headers[b"retry-after"]) <= JWKS_RETRY_SECONDS
        assert b"www-authenticate" not in headers  # nothing tells the page to drop the token
    away = False
    now[0] += JWKS_RETRY_SECONDS
    assert status_of(checked, f"Bearer {token}") == 200  # and the address was not locked out


@pytest.mark.parametrize(
    "auth",
    [
        {"http_auth": "token", "http_tokens_file": "tokens"},
        {
            "http_auth": "jwt",
            "http_jwt_jwks_url": "https://id.example/jwks",
            "http_jwt_issuer": ISSUER,
            "http_jwt_audience": AUDIENCE,
        },
    ],
)
def test_no_access_policy_is_refused_when_the_settings_ask_for_authentication(
    auth: dict[str, str],
) -> None:
    settings = Settings(_env_file=None, **auth)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"HTTP_AUTH={auth['http_auth']} but no access policy"):
        bootstrap.build(settings, None)


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        (
            {"http_host": "0.0.0.0"},
            "HTTP_AUTH=none with HTTP_HOST=0.0.0.0 serves every customer's personal data",
        ),
        (
            {"http_auth": "token", "http_tokens_file": "no such file"},
            "HTTP_TOKENS_FILE: cannot read",
        ),
    ],
)
def test_settings_that_cannot_guard_the_orders_give_no_access_policy(
    settings: dict[str, str], problem: str
) -> None:
    with pytest.raises(AccessConfigurationError, match=f"^{problem}"):
        bootstrap.access_policy(Settings(_env_file=None, **settings))  # type: ignore[arg-type]


def test_the_list_is_audited_with_its_view_and_no_answer_of_a_guarded_route_is_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """GET /orders was not audited, and it and the refusals could be kept by any cache."""
    caplog.set_level(logging.INFO, logger="order_viewer.audit")
    checked = guard()
    answers = [answer(checked, f"Bearer {VALID}"), answer(checked, None)]
    answers += [answer(checked, "Bearer guess", client="203.0.113.7") for _ in range(22)]
    assert [status for status, _ in answers] == [200, 401, *[401] * 21, 429]
    for _, headers in answers:
        assert headers[b"cache-control"] == b"no-store"
        assert headers[b"vary"] == b"Authorization"
    lines = [(record.levelno, record.getMessage()) for record in audit_records(caplog)]
    assert lines[:2] == [
        (logging.INFO, "orders listed principal=support status=200 view=masked client=203.0.113.9"),
        (logging.WARNING, "orders listed principal=- status=401 view=- client=203.0.113.9"),
    ]
    assert lines[-1] == (
        logging.WARNING,
        "orders listed principal=- status=429 view=- client=203.0.113.7",
    )
    assert len(lines) == len(answers)


def order_read(send: Send) -> tuple[MaskedViews, CachedOrder]:
    """A read of an order in memory with the support token, which reads orders masked: the
    masked views of the policy, and the order whole."""
    whole = CachedOrder(json.dumps(SAMPLE_ORDER).encode(), '"v1"')
    cache = OrderCache(10)
    cache.put_written({"b563": whole})
    views = MaskedViews(10, None)
    guarded = front(AccessPolicy(OneToken(), FailureLimiter(), views), cache=cache)
    asyncio.run(guarded(request("/order/b563", f"Bearer {VALID}"), receive, send))
    return views, whole


def test_an_order_in_memory_is_answered_in_the_principals_view_and_kept_private(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="order_viewer.audit")
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    views, whole = order_read(send)
    masked = views.masked(whole)
    assert [message["type"] for message in sent] == ["http.response.start", "http.response.body"]
    assert sent[1]["body"] == masked.body  # support reads orders masked
    assert masked.body == masked_document(whole.body)  # byte for byte, though kept compressed
    headers = sent[0]["headers"]
    assert (b"etag", masked.etag.encode()) in headers
    assert (b"vary", b"Authorization") in headers
    assert (b"cache-control", b"no-store") in headers
    (record,) = audit_records(caplog)
    assert "order_uid=b563 status=200 view=masked" in record.getMessage()


def test_an_order_read_from_memory_is_audited_though_the_client_left(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="order_viewer.audit")

    async def send(message: Message) -> None:
        raise OSError("the client left")

    with pytest.raises(OSError, match="the client left"):
        order_read(send)
    (record,) = audit_records(caplog)
    assert "order_uid=b563 status=200 view=masked" in record.getMessage()


def test_an_id_remembered_absent_is_answered_404_from_memory_kept_private_and_audited(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="order_viewer.audit")
    cache = OrderCache(10, absent_capacity=10)
    cache.fill({}, cache.ticket(), ["gone-1"])
    guarded = front(AccessPolicy(OneToken(), FailureLimiter(), MaskedViews(10, None)), cache=cache)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(guarded(request("/order/gone-1", f"Bearer {VALID}"), receive, send))
    assert sent[0]["status"] == 404  # not the framework's answer_ok behind: answered here
    assert json.loads(sent[1]["body"]) == {"error": "no order with this id", "order_uid": "gone-1"}
    headers = sent[0]["headers"]
    assert (b"content-type", b"application/json") in headers
    assert (b"vary", b"Authorization") in headers
    assert (b"cache-control", b"no-store") in headers
    assert cache.absent_hits == 1
    (record,) = audit_records(caplog)
    assert record.levelno == logging.INFO
    assert "order_uid=gone-1 status=404 view=masked" in record.getMessage()


@pytest.mark.parametrize("order_uid", ["plain", 'quo"te', "back\\slash", "new\nline", "é☃", "\x00"])
def test_the_answer_of_an_absent_id_is_json_whatever_the_id(order_uid: str) -> None:
    status, headers, body = absent_answer(order_uid)
    assert (status, headers) == (404, [(b"content-type", b"application/json")])
    assert json.loads(body) == {"error": "no order with this id", "order_uid": order_uid}


def test_the_masked_views_beside_the_cache_are_measured() -> None:
    metrics = Metrics(OrderCache(10))
    views = MaskedViews(10, None)
    AccessGuard(AccessPolicy(OneToken(), FailureLimiter(), views), metrics)

    def gauges() -> tuple[float | None, float | None]:
        return (
            metrics.registry.get_sample_value("order_viewer_masked_views_entries"),
            metrics.registry.get_sample_value("order_viewer_masked_views_bytes"),
        )

    assert gauges() == (0, 0)
    whole = CachedOrder(json.dumps(SAMPLE_ORDER).encode(), '"v1"')
    masked = views.masked(whole)
    views.masked(whole)
    held = len(pack(masked.body, whole.body))  # the bytes held: packed against the whole
    assert gauges() == (1, held)
    views.masked(CachedOrder(whole.body, '"v2"'))
    assert gauges() == (2, 2 * held)


def test_the_refused_lines_of_the_tokens_file_are_measured(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"support:{'a' * 64}:orders:read\nbroken\n")
    tokens = TokenFile(path)
    metrics = Metrics(OrderCache(10))
    AccessGuard(AccessPolicy(tokens, FailureLimiter(), MaskedViews(10, None)), metrics)
    assert metrics.registry.get_sample_value("order_viewer_tokens_file_refused_lines") == 1
    path.write_text(f"support:{'a' * 64}:orders:read\n")
    tokens.reload_if_changed()
    assert metrics.registry.get_sample_value("order_viewer_tokens_file_refused_lines") == 0
    # Only the tokens file has the gauge.
    metrics = Metrics(OrderCache(10))
    AccessGuard(AccessPolicy(OneToken(), FailureLimiter(), MaskedViews(10, None)), metrics)
    assert metrics.registry.get_sample_value("order_viewer_tokens_file_refused_lines") is None


# ------------------------------------------------- what a masked reader gets of what is hidden

# A character the masks hide as any other: the masks show where words break (whitespace) and
# where an email's domain begins (`@`), by design.
HIDDEN = st.characters(codec="utf-8").filter(
    lambda character: not character.isspace() and character != "@"
)


class NotReady:
    async def not_ready(self) -> dict[str, str]:
        return {}

    def not_live(self) -> dict[str, str]:
        return {}


@dataclass
class Instance:
    """The app of one instance as a masked reader meets it, with a cache that keeps the order
    (answered by the front) or none (answered by the framework, from the database)."""

    app: ASGIApp
    reader: FakeReader
    cache: OrderCache

    @classmethod
    def start(cls, capacity: int) -> Instance:
        reader, cache = FakeReader({}), OrderCache(capacity)
        policy = AccessPolicy(OneToken(), FailureLimiter(), MaskedViews(10, None))
        return cls(create_app(OrderLookup(reader, cache), NotReady(), None, policy), reader, cache)

    def holds(self, body: bytes) -> None:
        self.reader.stored = {"o1": body}
        if self.cache.capacity:
            self.cache.put_written({"o1": CachedOrder.of(body, hashlib.sha256(body).digest())})

    def read(self, **headers: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """The status, every header and the body of a masked reader's GET of the order."""
        sent: list[Message] = []

        async def send(message: Message) -> None:
            sent.append(message)

        # What the framework needs of a scope besides what the guard reads.
        scope = {**request("/order/o1", f"Bearer {VALID}"), "query_string": b"", "root_path": ""}
        scope["headers"] += [
            (name.lower().encode(), value.encode()) for name, value in headers.items()
        ]

        async def get() -> None:
            await self.app(scope, receive, send)

        asyncio.run(get())
        body = b"".join(message.get("body", b"") for message in sent[1:])
        return sent[0]["status"], sorted(sent[0]["headers"]), body


@pytest.fixture(scope="module")
def instances() -> dict[str, tuple[Instance, Instance]]:
    """Two instances for each path an order read takes, each to hold a version of the order."""
    return {
        "in memory": (Instance.start(10), Instance.start(10)),
        "from the database": (Instance.start(0), Instance.start(0)),
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), data=st.data())
def test_orders_that_differ_only_in_hidden_characters_give_byte_identical_masked_answers(
    instances: dict[str, tuple[Instance, Instance]], seed: int, data: st.DataObject
) -> None:
    """The masked ETag was the whole order's tag with `-masked`: a masked reader could test
    guesses of a hidden phone number against it offline (200,001 candidates in 0.5 s)."""
    order = make_order(random.Random(seed))
    other = json.loads(json.dumps(order))
    for field, mask in DELIVERY_MASKS.items():
        value: str = order["delivery"][field]
        assert MASK not in value
        other["delivery"][field] = "".join(
            data.draw(HIDDEN) if shown == MASK else kept
            for kept, shown in zip(value, mask(value), strict=True)
        )
    assume(other != order)
    bodies = json.dumps(order).encode(), json.dumps(other).encode()
    for path, pair in instances.items():
        for instance, body in zip(pair, bodies, strict=True):
            instance.holds(body)
        first, second = pair
        answer = first.read()
        assert answer[0] == 200, path
        assert second.read() == answer, path
        etag = dict(answer[1])[b"etag"].decode()
        whole_etag = CachedOrder.of(bodies[0], hashlib.sha256(bodies[0]).digest()).etag
        for if_none_match in (etag, whole_etag, f"W/{etag}, {whole_etag}", "*"):
            revalidated = first.read(**{"If-None-Match": if_none_match})
            assert second.read(**{"If-None-Match": if_none_match}) == revalidated, path
        assert revalidated[0] == 304
