"""Access control of a running service: bearer tokens from a file, JWTs of an identity provider
the test runs itself (keys it generates, its JWKS served on loopback), scopes, masked and whole
orders, audit lines, the limit on failed attempts, protected mode and HTTPS."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import random
import re
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.identity import AUDIENCE, ISSUER, IdentityProvider, serve_jwks
from order_viewer.adapters.http.auth import KeysUnavailable
from order_viewer.adapters.http.auth.jwt import JwtVerifier, fetch_url
from order_viewer.adapters.http.auth.tokens import new_token, token_digest
from order_viewer.domain.masking import masked_document
from order_viewer.entrypoints.generate import make_order
from tests.conftest import (
    ORDER_VIEWER,
    ServiceProcess,
    Stack,
    Topics,
    encode_orders,
    new_topics,
    produce,
    scrape,
    wait_http_ready,
    wait_until,
)
from tests.conftest import metric_value as value
from tests.integration.test_http_hostile import SCHEMA_DESCRIBES_REQUESTS, Target, fuzz
from tests.tls import self_signed_pair

# One worker runs the module, so that its tests share its two guarded services.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("auth")]

PERSONAL = ("name", "phone", "email", "address", "city", "zip")
OPEN_PATHS = ("/livez", "/readyz", "/openapi.json", "/docs", "/", "/static/app.js")


def personal_values(orders: list[dict[str, Any]]) -> set[str]:
    """The personal fields of the orders that are long enough to be looked for in a text
    (a generated order may leave one empty)."""
    return {
        order["delivery"][field]
        for order in orders
        for field in PERSONAL
        if len(order["delivery"][field]) >= 3
    }


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def client_at(address: str) -> httpx.Client:
    """A client whose requests come from `address` (any of 127/8 reaches the service), so that
    the failures one test provokes do not count against another's address."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=10)


@dataclass
class Guarded:
    service: ServiceProcess
    orders: list[dict[str, Any]]
    tokens: dict[str, str]
    tokens_file: Path | None = None

    def get(self, path: str, token: str | None = None, **headers: str) -> httpx.Response:
        if token is not None:
            headers = {**headers, **bearer(token)}
        return self.service.get(path, headers=headers)

    def audit(self) -> list[dict[str, Any]]:
        records = [json.loads(line) for line in self.service.log().splitlines() if line.strip()]
        return [record for record in records if record["logger"] == "order_viewer.audit"]

    def audit_lines_so_far(self) -> int:
        """How many audit lines the reads made until now leave, once all are written: a line is
        written a moment after its answer, so a read of an id of its own marks the end of
        them, and its line is waited for."""
        mark = f"audit-mark-{uuid.uuid4().hex}"
        assert self.get(f"/order/{mark}", self.tokens["masked"]).status_code == 404

        def through_the_mark() -> int | None:
            uids = [line.get("order_uid") for line in self.audit()]
            return uids.index(mark) + 1 if mark in uids else None

        count: int = wait_until(through_the_mark, 10, "the mark's audit line")
        return count


def start_guarded(
    stack: Stack, directory: Path, tag: str, tokens: dict[str, str], **settings: str
) -> tuple[ServiceProcess, list[dict[str, Any]]]:
    """A service over topics of its own, with three orders stored and served to `tokens`'
    first (a whole-view) token."""
    topics = new_topics(tag)
    service = ServiceProcess(stack, topics, directory, LOG_FORMAT="json", **settings).start()
    rng = random.Random(tag)
    orders = [make_order(rng) for _ in range(3)]
    produce(stack, topics.orders, encode_orders(orders))
    whole = next(iter(tokens.values()))

    def served(uid: str) -> bool:
        return service.get(f"/order/{uid}", headers=bearer(whole)).status_code == 200

    for order in orders:
        wait_until(
            partial(served, order["order_uid"]), 30, f"order {order['order_uid']} to be served"
        )
    return service, orders


def write_tokens(path: Path, tokens: dict[str, str], scopes: dict[str, str]) -> None:
    path.write_text(
        "# demo clients\n"
        + "".join(f"{name}:{token_digest(tokens[name])}:{scopes[name]}\n" for name in scopes)
    )


# The reverse proxy in front of the token service: requests from this address are forwarded.
PROXY = "127.0.0.2"

# The principal behind each view's token, in both services (token-file names, JWT `sub`s).
PRINCIPALS = {"whole": "auditor", "masked": "support", "metrics": "prometheus"}
TOKEN_SCOPES = {
    "auditor": "orders:read:pii,metrics:read",
    "support": "orders:read",
    "prometheus": "metrics:read",
    "leaver": "orders:read",
}


@pytest.fixture(scope="module")
def by_token(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    directory = tmp_path_factory.mktemp("token-auth")
    tokens = {name: new_token() for name in TOKEN_SCOPES}
    tokens_file = directory / "tokens.txt"
    write_tokens(tokens_file, tokens, TOKEN_SCOPES)
    service, orders = start_guarded(
        stack,
        directory,
        "token",
        tokens,
        HTTP_AUTH="token",
        HTTP_TOKENS_FILE=str(tokens_file),
        HTTP_TRUSTED_PROXIES=f"{PROXY}, fd00::/8",
    )
    try:
        yield Guarded(service, orders, tokens, tokens_file)
    finally:
        service.kill()


@pytest.fixture(scope="module")
def provider() -> IdentityProvider:
    return IdentityProvider()


@pytest.fixture(scope="module")
def by_jwt(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory, provider: IdentityProvider
) -> Iterator[Guarded]:
    """JWT authentication over a cache that keeps nothing, so that every order read takes the
    database path (the token service above answers from the cache)."""
    tokens = {
        "whole": provider.token(sub="auditor", scope="orders:read:pii orders:trail metrics:read"),
        "masked": provider.token("ec-1", sub="support", scp=["orders:read"], scope=None),
        "metrics": provider.token("ed-1", sub="prometheus", scope="metrics:read"),
    }
    with serve_jwks(provider) as jwks_url:
        service, orders = start_guarded(
            stack,
            tmp_path_factory.mktemp("jwt-auth"),
            "jwt",
            tokens,
            HTTP_AUTH="jwt",
            HTTP_JWT_JWKS_URL=jwks_url,
            HTTP_JWT_ISSUER=ISSUER,
            HTTP_JWT_AUDIENCE=AUDIENCE,
            CACHE_CAPACITY="0",
        )
        try:
            yield Guarded(service, orders, tokens)
        finally:
            service.kill()


@pytest.fixture(params=["token", "jwt"])
def guarded(request: pytest.FixtureRequest) -> Guarded:
    """Each service, with its tokens renamed by their view: whole, masked, metrics."""
    found: Guarded = request.getfixturevalue(f"by_{request.param}")
    return found if request.param == "jwt" else by_view(found)


def by_view(by_token: Guarded) -> Guarded:
    """The token service with its tokens renamed by their view, as the JWT one has them."""
    tokens = {view: by_token.tokens[name] for view, name in PRINCIPALS.items()}
    return Guarded(by_token.service, by_token.orders, tokens)


def test_order_data_and_metrics_need_a_token_and_the_rest_stays_open(guarded: Guarded) -> None:
    uid = guarded.orders[0]["order_uid"]
    for path in (f"/order/{uid}", "/order/unknown-order", "/orders", "/metrics"):
        response = guarded.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == 'Bearer realm="order-viewer"'
        assert response.json() == {"error": "a valid bearer token is needed"}
    for path in OPEN_PATHS:
        assert guarded.get(path).status_code == 200, path


def test_the_refusals_of_metrics_are_described_as_the_json_they_are(guarded: Guarded) -> None:
    refused = guarded.get("/metrics")
    assert refused.headers["content-type"] == "application/json"
    described = guarded.get("/openapi.json").json()["paths"]["/metrics"]["get"]["responses"]
    for status in ("401", "403", "429"):
        assert list(described[status]["content"]) == ["application/json"], status
        assert described[status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorBody"
        }


def test_orders_read_sees_personal_fields_masked_and_pii_sees_them_whole(
    guarded: Guarded,
) -> None:
    for order in guarded.orders:
        uid = order["order_uid"]
        whole = guarded.get(f"/order/{uid}", guarded.tokens["whole"])
        masked = guarded.get(f"/order/{uid}", guarded.tokens["masked"])
        assert whole.status_code == masked.status_code == 200
        assert whole.json() == order
        assert masked.content == masked_document(whole.content)
        for personal in personal_values([order]):
            assert personal not in masked.text
        assert masked.headers["etag"] != whole.headers["etag"]
        for response in (whole, masked):
            assert response.headers["vary"] == "Authorization"
            assert "no-store" in response.headers["cache-control"]

        # Each view revalidates against its own tag only.
        revalidated = guarded.get(
            f"/order/{uid}", guarded.tokens["masked"], **{"If-None-Match": masked.headers["etag"]}
        )
        assert revalidated.status_code == 304
        assert revalidated.content == b""
        with_whole_tag = guarded.get(
            f"/order/{uid}", guarded.tokens["masked"], **{"If-None-Match": whole.headers["etag"]}
        )
        assert with_whole_tag.status_code == 200
        assert with_whole_tag.content == masked.content
    recent = guarded.get("/orders", guarded.tokens["masked"])
    assert recent.status_code == 200
    assert {o["order_uid"] for o in guarded.orders} <= {
        o["order_uid"] for o in recent.json()["orders"]
    }


def test_a_token_without_the_scope_is_forbidden(guarded: Guarded) -> None:
    uid = guarded.orders[0]["order_uid"]
    forbidden = guarded.get(f"/order/{uid}", guarded.tokens["metrics"])
    assert forbidden.status_code == 403
    assert forbidden.headers["www-authenticate"] == (
        'Bearer realm="order-viewer", error="insufficient_scope", scope="orders:read"'
    )
    assert guarded.get("/orders", guarded.tokens["metrics"]).status_code == 403
    assert guarded.get("/metrics", guarded.tokens["masked"]).status_code == 403
    metrics = guarded.get("/metrics", guarded.tokens["metrics"])
    assert metrics.status_code == 200
    assert "order_viewer_http_auth_failures_total" in metrics.text


def test_every_order_read_leaves_one_audit_line_without_personal_data(
    guarded: Guarded,
) -> None:
    order = guarded.orders[1]
    uid = order["order_uid"]
    before = guarded.audit_lines_so_far()
    whole = guarded.get(f"/order/{uid}", guarded.tokens["whole"])
    reads = [
        (guarded.tokens["whole"], {}, 200),
        (guarded.tokens["masked"], {}, 200),
        (guarded.tokens["whole"], {"If-None-Match": whole.headers["etag"]}, 304),
        (guarded.tokens["metrics"], {}, 403),
        ("made-up-token", {}, 401),
    ]
    for token, headers, status in reads:
        assert guarded.get(f"/order/{uid}", token, **headers).status_code == status
    assert guarded.get("/order/no-such-order-here", guarded.tokens["masked"]).status_code == 404

    def seven_more() -> list[dict[str, Any]]:
        lines = guarded.audit()[before:]
        return lines if len(lines) >= 7 else []

    lines = wait_until(seven_more, 10, "the audit lines")
    assert len(lines) == 7
    statuses = [(line["order_uid"], line["event"].split(" status=")[1]) for line in lines]
    assert statuses == [
        (uid, "200 view=whole client=127.0.0.1"),
        (uid, "200 view=whole client=127.0.0.1"),
        (uid, "200 view=masked client=127.0.0.1"),
        (uid, "304 view=whole client=127.0.0.1"),
        (uid, "403 view=- client=127.0.0.1"),
        (uid, "401 view=- client=127.0.0.1"),
        ("no-such-order-here", "404 view=masked client=127.0.0.1"),
    ]
    principals = [PRINCIPALS[view] for view in ("whole", "whole", "masked", "whole", "metrics")]
    principals += ["-", PRINCIPALS["masked"]]
    assert [line["event"].split()[2] for line in lines] == [f"principal={p}" for p in principals]
    log = guarded.service.log()
    for secret in (*guarded.tokens.values(), "made-up-token"):
        assert secret not in log
    for personal in personal_values(guarded.orders):
        assert personal not in log


def test_the_list_is_audited_and_no_answer_that_depends_on_the_token_may_be_kept(
    guarded: Guarded,
) -> None:
    """GET /orders was not audited, and the answers of guarded routes said only `private`."""
    uid = guarded.orders[0]["order_uid"]
    before = guarded.audit_lines_so_far()
    answers = [
        guarded.get("/orders", guarded.tokens["masked"]),
        guarded.get("/orders?limit=2", guarded.tokens["whole"]),
        guarded.get("/orders", guarded.tokens["metrics"]),
        guarded.get("/orders"),
        guarded.get(f"/order/{uid}", guarded.tokens["masked"]),
        guarded.get(f"/order/{uid}"),
        guarded.get("/metrics", guarded.tokens["metrics"]),
    ]
    assert [response.status_code for response in answers] == [200, 200, 403, 401, 200, 401, 200]
    for response in answers:
        assert "no-store" in response.headers["cache-control"], response.url
        assert response.headers["vary"] == "Authorization", response.url

    def six_more() -> list[str]:
        lines = [line["event"] for line in guarded.audit()[before:]]
        return lines if len(lines) >= 6 else []

    listed = [line for line in wait_until(six_more, 10, "the audit lines") if "listed" in line]
    assert listed == [
        f"orders listed principal={PRINCIPALS['masked']} status=200 view=masked client=127.0.0.1",
        f"orders listed principal={PRINCIPALS['whole']} status=200 view=whole client=127.0.0.1",
        f"orders listed principal={PRINCIPALS['metrics']} status=403 view=- client=127.0.0.1",
        "orders listed principal=- status=401 view=- client=127.0.0.1",
    ]


def test_a_removed_token_line_is_refused_within_seconds(by_token: Guarded) -> None:
    uid = by_token.orders[0]["order_uid"]
    leaver = by_token.tokens["leaver"]
    assert by_token.get(f"/order/{uid}", leaver).status_code == 200
    assert by_token.tokens_file is not None
    write_tokens(
        by_token.tokens_file,
        by_token.tokens,
        {name: scopes for name, scopes in TOKEN_SCOPES.items() if name != "leaver"},
    )
    wait_until(
        lambda: by_token.get(f"/order/{uid}", leaver).status_code == 401, 5, "the revocation"
    )
    assert by_token.get(f"/order/{uid}", by_token.tokens["support"]).status_code == 200


def bad_tokens(provider: IdentityProvider) -> dict[str, tuple[str | None, str]]:
    """Each attack and the failure reason the service counts for it."""
    now = int(datetime.datetime.now(datetime.UTC).timestamp())
    return {
        "missing": (None, "missing"),
        "malformed": ("not-a.jwt", "malformed"),
        "not a bearer": ("Basic YWxpY2U6c2VjcmV0", "malformed"),
        "expired": (provider.token(exp=now - 60), "expired"),
        "not yet valid": (provider.token(nbf=now + 60), "not_yet_valid"),
        "another issuer": (provider.token(iss="https://evil.example/"), "wrong_issuer"),
        "another audience": (provider.token(aud="billing"), "wrong_audience"),
        "alg none": (provider.unsigned_token(), "algorithm"),
        "HS256 keyed with the public key": (provider.hmac_with_public_key(), "algorithm"),
        "unknown kid": (provider.token(headers={"kid": "stolen-key"}), "unknown_key"),
    }


def test_every_bad_jwt_is_a_401_never_a_5xx(by_jwt: Guarded, provider: IdentityProvider) -> None:
    uid = by_jwt.orders[0]["order_uid"]
    before = scrape(by_jwt.service, headers=bearer(by_jwt.tokens["whole"]))
    cases = bad_tokens(provider)
    with client_at("127.0.0.4") as client:
        for case, (token, _) in cases.items():
            headers = {}
            if token is not None:
                headers["Authorization"] = token if token.startswith("Basic") else f"Bearer {token}"
            response = client.get(f"{by_jwt.service.base_url}/order/{uid}", headers=headers)
            assert response.status_code == 401, case
            assert response.headers["www-authenticate"].startswith("Bearer"), case
            assert by_jwt.orders[0]["delivery"]["name"] not in response.text
    after = scrape(by_jwt.service, headers=bearer(by_jwt.tokens["whole"]))
    reasons: dict[str, int] = {}
    for _, reason in cases.values():
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in reasons.items():
        counted = value(after, "order_viewer_http_auth_failures_total", reason=reason) - value(
            before, "order_viewer_http_auth_failures_total", reason=reason
        )
        assert counted == count, reason


def test_a_token_file_line_that_is_not_a_token_of_the_file_is_refused(by_token: Guarded) -> None:
    uid = by_token.orders[0]["order_uid"]
    with client_at("127.0.0.5") as client:
        for token in (
            new_token(),
            token_digest(by_token.tokens["auditor"]),  # the digest is not the token
            by_token.tokens["auditor"] + "x",
            by_token.tokens["auditor"][:-1],
        ):
            response = client.get(f"{by_token.service.base_url}/order/{uid}", headers=bearer(token))
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == (
                'Bearer realm="order-viewer", error="invalid_token"'
            )


def test_more_than_twenty_failures_in_a_minute_get_429_for_that_address_only(
    by_token: Guarded,
) -> None:
    uid = by_token.orders[0]["order_uid"]
    url = f"{by_token.service.base_url}/order/{uid}"
    with client_at("127.0.0.3") as attacker:
        statuses = [attacker.get(url, headers=bearer(new_token())).status_code for _ in range(21)]
        assert statuses == [401] * 21
        refused = attacker.get(url, headers=bearer(new_token()))
        assert refused.status_code == 429
        assert 50 <= int(refused.headers["retry-after"]) <= 60
        # Even the right token waits: a guess that succeeded must look like the others.
        assert attacker.get(url, headers=bearer(by_token.tokens["auditor"])).status_code == 429
    assert by_token.get(f"/order/{uid}", by_token.tokens["auditor"]).status_code == 200
    samples = scrape(by_token.service, headers=bearer(by_token.tokens["auditor"]))
    assert value(samples, "order_viewer_http_auth_failures_total", reason="rate_limited") == 2
    assert (
        value(samples, "order_viewer_http_requests_total", route="/order/{order_uid}", status="429")
        == 2
    )


def test_failures_through_the_proxy_lock_out_their_client_and_not_the_others(
    by_token: Guarded,
) -> None:
    """Behind a proxy every client had the proxy's address: 21 bad tokens from anyone locked
    out every valid user for a minute."""
    uid = by_token.orders[0]["order_uid"]
    url = f"{by_token.service.base_url}/order/{uid}"
    auditor = bearer(by_token.tokens["auditor"])
    before = by_view(by_token).audit_lines_so_far()
    with client_at(PROXY) as proxy:

        def through_proxy(client: str, headers: dict[str, str]) -> int:
            # The attacker's own header, with what the proxy appends to it.
            forwarded = {"X-Forwarded-For": f"127.0.0.9, {client}"}
            return proxy.get(url, headers={**headers, **forwarded}).status_code

        statuses = [through_proxy("198.51.100.66", bearer(new_token())) for _ in range(22)]
        assert statuses == [401] * 21 + [429]
        assert through_proxy("198.51.100.66", auditor) == 429
        assert through_proxy("198.51.100.77", auditor) == 200
        # The proxy's own requests (a health check of its own) are not the attacker's either.
        assert proxy.get(url, headers=auditor).status_code == 200
        # IPv6 clients are counted by their /64.
        assert [
            through_proxy("[2001:db8:1:1::66]:4711", bearer(new_token())) for _ in range(21)
        ] == [401] * 21
        assert through_proxy("2001:db8:1:1::77", auditor) == 429
        assert through_proxy("2001:db8:1:2::66", auditor) == 200
    # A client that is not the proxy cannot name another address.
    with client_at("127.0.0.6") as direct:
        forwarded = {"X-Forwarded-For": "198.51.100.66"}
        assert direct.get(url, headers={**auditor, **forwarded}).status_code == 200
    assert by_token.get(f"/order/{uid}", by_token.tokens["auditor"]).status_code == 200

    def audited_clients() -> list[str] | None:
        lines = [
            line["event"] for line in by_token.audit()[before:] if line.get("order_uid") == uid
        ]
        return lines if len(lines) >= 50 else None

    clients = [
        line.rsplit(" client=", 1)[1] for line in wait_until(audited_clients, 10, "the audit lines")
    ]
    assert clients == [
        *["198.51.100.66"] * 23,
        "198.51.100.77",
        PROXY,
        *["2001:db8:1:1::66"] * 21,
        "2001:db8:1:1::77",
        "2001:db8:1:2::66",
        "127.0.0.6",
        "127.0.0.1",
    ]


def test_generated_requests_with_a_valid_token_get_no_5xx(by_jwt: Guarded) -> None:
    target = Target(
        by_jwt.service,
        by_jwt.service.port,
        [order["order_uid"] for order in by_jwt.orders],
        {
            order["order_uid"]: by_jwt.get(
                f"/order/{order['order_uid']}", by_jwt.tokens["whole"]
            ).headers["etag"]
            for order in by_jwt.orders
        },
    )
    run = fuzz(
        target,
        excluded_checks=[SCHEMA_DESCRIBES_REQUESTS],
        max_examples=60,
        headers=bearer(by_jwt.tokens["whole"]),
    )
    assert not run.failures, run.failures
    assert run.total >= 100
    assert not any(status >= 500 for _, _, status in run.requests)
    assert not any(status in (401, 403) for _, _, status in run.requests)


# ------------------------------------------------------------------------ start-up settings


def run_serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ORDER_VIEWER), "serve"],
        env={**os.environ, "DATABASE_URL": "postgresql://x@127.0.0.1:1/x", **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_protected_mode_refuses_anonymous_access_beyond_loopback(host: str) -> None:
    refused = run_serve({"HTTP_HOST": host})
    assert refused.returncode == 2
    [line] = refused.stderr.splitlines()
    assert line.startswith("order-viewer: HTTP_AUTH=none with HTTP_HOST=")
    assert "HTTP_ALLOW_ANONYMOUS" in line
    assert refused.stdout == ""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "order-viewer: HTTP_TOKENS_FILE: cannot read it: No such file or directory"),
        ("support:s3cret:orders:read\n", "order-viewer: HTTP_TOKENS_FILE: line 1: "),
    ],
)
def test_an_unusable_token_file_stops_start_up_in_one_line(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "tokens.txt"
    if content is not None:
        path.write_text(content)
    refused = run_serve({"HTTP_AUTH": "token", "HTTP_TOKENS_FILE": str(path)})
    assert refused.returncode == 2
    [line] = refused.stderr.splitlines()
    assert line.startswith(message)
    assert "s3cret" not in line


def token_create(name: str, scopes: str) -> list[str]:
    """The output lines of `order-viewer token create`."""
    created = subprocess.run(
        [str(ORDER_VIEWER), "token", "create", name, "--scopes", scopes],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return created.stdout.splitlines()


def test_token_create_prints_a_token_once_and_the_line_that_admits_it() -> None:
    lines = token_create("support", "orders:read,metrics:read")
    token = lines[1].strip()
    assert lines[3].strip() == f"support:{token_digest(token)}:metrics:read,orders:read"
    assert token_create("support", "orders:read")[1].strip() != token


def test_https_with_a_certificate_of_the_operators(
    stack: Stack, topics: Topics, start_service: Any, tmp_path: Path
) -> None:
    cert_file, key_file = self_signed_pair(tmp_path)
    token = new_token()
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"support:{token_digest(token)}:orders:read\n")
    service = start_service(
        ready=False,
        HTTP_AUTH="token",
        HTTP_TOKENS_FILE=str(tokens),
        HTTP_TLS_CERT_FILE=str(cert_file),
        HTTP_TLS_KEY_FILE=str(key_file),
    )
    https = f"https://127.0.0.1:{service.port}"
    trusted = ssl.create_default_context(cafile=str(cert_file))
    assert service.process is not None
    wait_http_ready(
        f"{https}/readyz",
        service.process,
        service.log_path,
        "the service over HTTPS",
        verify=trusted,
    )
    order = httpx.get(f"{https}/order/not-stored-here", headers=bearer(token), verify=trusted)
    assert order.status_code == 404
    refused = httpx.get(f"{https}/order/x", verify=trusted)
    assert refused.status_code == 401
    # Every answer tells the browser to use HTTPS only from now on (there was no HSTS).
    for response in (
        order,
        refused,
        *(httpx.get(f"{https}{path}", verify=trusted) for path in OPEN_PATHS),
    ):
        assert response.headers["strict-transport-security"] == "max-age=31536000", response.url
    with pytest.raises(httpx.ConnectError):  # a certificate nobody vouched for
        httpx.get(f"{https}/livez", timeout=5)
    with pytest.raises(httpx.TransportError):  # no plain HTTP on the port
        httpx.get(f"http://127.0.0.1:{service.port}/livez", timeout=5)
    assert "serving HTTP on https://127.0.0.1:" in service.log()


def test_a_key_the_provider_withdraws_is_refused_once_the_key_sets_max_age_is_over(
    start_service: Any,
) -> None:
    """The attack of a withdrawn key: tokens it signed were still answered 200 long after, and
    a token verified before it was withdrawn stayed remembered until its `exp`."""
    provider = IdentityProvider()
    provider.cache_control = "max-age=30"  # the least the service honours
    with serve_jwks(provider) as jwks_url:
        service = start_service(
            HTTP_AUTH="jwt",
            HTTP_JWT_JWKS_URL=jwks_url,
            HTTP_JWT_ISSUER=ISSUER,
            HTTP_JWT_AUDIENCE=AUDIENCE,
        )
        url = f"{service.base_url}/order/not-stored-here"
        remembered = provider.token(sub="remembered")
        assert httpx.get(url, headers=bearer(remembered)).status_code == 404
        withdrawn_at = time.monotonic()
        provider.withdraw("rsa-1")

        def signed_by_the_withdrawn_key_refused() -> bool:
            fresh = provider.token(sub="fresh")
            return httpx.get(url, headers=bearer(fresh)).status_code == 401

        wait_until(signed_by_the_withdrawn_key_refused, 45, "the withdrawn key refused", 1.0)
        assert time.monotonic() - withdrawn_at > 20  # at the set's max-age, not before
        assert httpx.get(url, headers=bearer(remembered)).status_code == 401
        assert httpx.get(url, headers=bearer(provider.token("ec-1"))).status_code == 404
        assert provider.requests == 2
        # The remembered token, and those signed after the withdrawal, before the fetch.
        forgotten = r"JWKS: 1 keys withdrawn \(rsa-1\), [1-9][0-9]* tokens verified with them"
        assert re.search(forgotten, service.log())


# ----------------------------------------------------------------------- JWKS over the network

Behaviour = Callable[[socket.socket], None]


@contextmanager
def jwks_server(behaviour: Behaviour) -> Iterator[str]:
    """A server on loopback that reads each request and answers it as `behaviour` does, on
    the socket itself (so that it can drip, lie or break HTTP); yields a URL on it."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)  # to see `stop`: closing a socket does not end its accept()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(None)
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = connection.recv(4096)
                    if not chunk:
                        break
                    request += chunk
                with suppress(OSError):
                    behaviour(connection)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/.well-known/jwks.json"
    finally:
        stop.set()
        thread.join(10)
        listener.close()


def answer(status: str, body: bytes, *headers: str) -> Behaviour:
    def send(connection: socket.socket) -> None:
        head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers, "", ""]
        connection.sendall("\r\n".join(head).encode() + body)

    return send


def dripping(head: bytes, body: bytes, pause: float) -> Behaviour:
    """The answer one byte at a time, each well within a read's timeout."""

    def send(connection: socket.socket) -> None:
        for byte in head + body:
            connection.sendall(bytes([byte]))
            time.sleep(pause)

    return send


@pytest.fixture
def one_second_deadline(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr("order_viewer.adapters.http.auth.jwt.JWKS_TIMEOUT_SECONDS", 1)
    return 1.0


JWKS = IdentityProvider().jwks()
HEAD = f"HTTP/1.1 200 OK\r\nContent-Length: {len(JWKS)}\r\n\r\n".encode()


@pytest.mark.parametrize(
    "behaviour",
    [
        dripping(HEAD, JWKS[:60], 0.05),  # the body, byte by byte
        dripping(HEAD[:-2] + b"X-Padding: " + b"a" * 60, b"", 0.05),  # the headers too
        lambda _: time.sleep(3),  # nothing at all
    ],
    ids=["dripped body", "dripped headers", "silent"],
)
def test_a_jwks_fetch_ends_at_one_deadline_however_slowly_the_server_answers(
    one_second_deadline: float, behaviour: Behaviour
) -> None:
    with jwks_server(behaviour) as url:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            fetch_url(url)
        assert time.monotonic() - started < one_second_deadline + 0.5


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_jwks_redirect_is_an_error_never_followed(status: int) -> None:
    redirect = (
        f"the URL answered {status}, a redirect, which is not followed: "
        "set HTTP_JWT_JWKS_URL to the key set's own URL"
    )
    with (
        serve_jwks(IdentityProvider()) as target,
        jwks_server(answer(f"{status} Elsewhere", b"", f"Location: {target}")) as url,
        pytest.raises(ValueError, match=re.escape(redirect)),
    ):
        fetch_url(url)


def chunked(body: bytes, chunk: int = 65536) -> Behaviour:
    def send(connection: socket.socket) -> None:
        connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for start in range(0, len(body), chunk):
            part = body[start : start + chunk]
            connection.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        connection.sendall(b"0\r\n\r\n")

    return send


@pytest.mark.parametrize(
    ("behaviour", "error", "message"),
    [
        (answer("200 OK", b" " * (2 * 1024 * 1024)), ValueError, "larger than 1048576 bytes"),
        (chunked(b" " * (2 * 1024 * 1024)), ValueError, "larger than 1048576 bytes"),
        (answer("404 Not Found", b"{}"), ValueError, "the URL answered 404"),
        (answer("500 Oops", b"{}"), ValueError, "the URL answered 500"),
        (lambda c: c.sendall(b"SSH-2.0-OpenSSH\r\n\r\n"), ValueError, "not an HTTP answer"),
        (lambda c: c.sendall(b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 70000), ValueError, "not"),
        (lambda _: None, ValueError, "not an HTTP answer (RemoteDisconnected)"),
        (
            lambda c: c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"),
            ValueError,
            "the answer ended before its Content-Length",
        ),
    ],
    ids=["huge", "huge chunked", "404", "500", "not HTTP", "endless header", "closed", "cut"],
)
def test_a_broken_jwks_answer_is_a_clear_error(
    behaviour: Behaviour, error: type[Exception], message: str
) -> None:
    with jwks_server(behaviour) as url, pytest.raises(error) as refused:
        fetch_url(url)
    assert message in str(refused.value)


def test_a_jwks_answer_gives_its_body_and_every_cache_control_line() -> None:
    with jwks_server(
        answer("200 OK", JWKS, "Cache-Control: public", "cache-control: max-age=60")
    ) as url:
        assert fetch_url(url) == (JWKS, "public, max-age=60")
    with jwks_server(answer("200 OK", JWKS)) as url:
        assert fetch_url(url) == (JWKS, None)


def test_an_https_jwks_of_a_certificate_nobody_vouched_for_is_refused(tmp_path: Path) -> None:
    cert_file, key_file = self_signed_pair(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)

    listener = socket.create_server(("127.0.0.1", 0))

    def serve_once_over_tls() -> None:
        connection, _ = listener.accept()
        # The handshake fails on the server's side too, once the client refuses it.
        with suppress(OSError), context.wrap_socket(connection, server_side=True) as wrapped:
            answer("200 OK", JWKS)(wrapped)

    thread = threading.Thread(target=serve_once_over_tls, daemon=True)
    thread.start()
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            fetch_url(f"https://127.0.0.1:{listener.getsockname()[1]}/jwks")
    finally:
        listener.close()
        thread.join(10)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"<html>sign in</html>", "the body is not JSON"),
        (b"[" * 100_000, "the body is not JSON"),
        (b"\xff\xfe{}", "the body is not JSON"),
        (b'{"keys": "none"}', "not a JSON Web Key Set"),
    ],
)
def test_a_jwks_that_is_no_key_set_is_logged_and_tokens_wait(
    body: bytes, problem: str, caplog: pytest.LogCaptureFixture
) -> None:
    provider = IdentityProvider()
    with jwks_server(answer("200 OK", body)) as url:
        check = JwtVerifier(url, ISSUER, AUDIENCE)
        with pytest.raises(KeysUnavailable):
            asyncio.run(check.authenticate(provider.token()))
    assert f"cannot fetch the JWKS, keeping 0 known keys: {problem}" in caplog.text


def test_a_jwks_url_in_clear_beyond_loopback_stops_start_up() -> None:
    refused = run_serve(
        {
            "HTTP_AUTH": "jwt",
            "HTTP_JWT_JWKS_URL": "http://idp.example.com/jwks",
            "HTTP_JWT_ISSUER": ISSUER,
            "HTTP_JWT_AUDIENCE": AUDIENCE,
        }
    )
    assert refused.returncode == 2
    assert refused.stderr == (
        "order-viewer: invalid setting HTTP_JWT_JWKS_URL: Value error, must be an https:// URL "
        "(http:// only to a loopback address)\n"
    )
