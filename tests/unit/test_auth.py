"""The pure parts of access control: bearer headers, the token file, JWT verification over a
JWKS the test generates, the failure limiter, protected mode and the masking rules."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from devstack.identity import AUDIENCE, ISSUER, IdentityProvider
from order_viewer.adapters import cache as cache_module
from order_viewer.adapters.cache import CachedOrder, MaskedViews, masked_etag
from order_viewer.adapters.http.auth import (
    ORDERS_READ,
    ORDERS_READ_PII,
    AuthFailure,
    KeysUnavailable,
    Principal,
    bearer_token,
    protected_mode_problem,
)
from order_viewer.adapters.http.auth.jwt import (
    JWKS_DEFAULT_MAX_AGE_SECONDS,
    JWKS_MAX_MAX_AGE_SECONDS,
    JWKS_MAX_STALE_SECONDS,
    JWKS_MIN_MAX_AGE_SECONDS,
    JWKS_REFETCH_SECONDS,
    JWKS_RETRY_SECONDS,
    JwksAnswer,
    JwtVerifier,
    jwks_max_age,
    parse_jwks,
)
from order_viewer.adapters.http.auth.limiter import FailureLimiter
from order_viewer.adapters.http.auth.tokens import (
    TokenFile,
    TokenFileError,
    TokenLines,
    new_token,
    open_token_file,
    parse_token_file,
    token_digest,
)
from order_viewer.config import ConfigurationError, Settings, load_settings
from order_viewer.domain.masking import (
    mask_email,
    mask_phone,
    mask_words,
    mask_zip,
    masked_document,
)
from order_viewer.entrypoints.generate import SAMPLE_ORDER

DIGEST = "a" * 64

# ----------------------------------------------------------------------------- bearer header


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (b"Bearer abc", "abc"),
        (b"bearer abc.def-ghi_jkl~mno+pqr/stu==", "abc.def-ghi_jkl~mno+pqr/stu=="),
        (b"BEARER   abc ", "abc"),
        (b"Bearer !~", "!~"),  # the ends of the visible ASCII characters
    ],
)
def test_a_bearer_header_gives_its_token(header: bytes, token: str) -> None:
    assert bearer_token(header) == token


def test_no_header_is_a_missing_token() -> None:
    with pytest.raises(AuthFailure) as failure:
        bearer_token(None)
    assert failure.value.reason == "missing"


@pytest.mark.parametrize(
    "header",
    [
        b"",
        b"Bearer",
        b"Bearer ",
        b"Basic YWxpY2U6c2VjcmV0",
        b"Bearer a b",
        "Bearer ünïcödé".encode(),
        "Bearer ünïcödé".encode("latin-1"),
        b"Bearer abc\x00",
        b"Bearer abc\x7f",
        b"Bearer abc\x1f",
        b"Bearer ab\tc",
        b"Bearer\tabc",
        b"Bearerabc",
        b"Bearer " + b"a" * 9000,
    ],
)
def test_a_malformed_header_is_refused(header: bytes) -> None:
    with pytest.raises(AuthFailure) as failure:
        bearer_token(header)
    assert failure.value.reason == "malformed"


# -------------------------------------------------------------------------------- token file


def test_the_token_file_gives_each_digest_its_client_and_scopes() -> None:
    text = (
        "# clients of the order viewer\n"
        "\n"
        f"support:{DIGEST}:orders:read\r\n"
        f"  auditor:{'B' * 64}:orders:read:pii, metrics:read  \n"
    )
    table = parse_token_file(text)
    assert table.principals == {
        DIGEST: Principal("support", frozenset({ORDERS_READ})),
        "b" * 64: Principal("auditor", frozenset({ORDERS_READ_PII, "metrics:read"})),
    }
    assert table.refused == []


OTHER = "c" * 64


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("support", "expected name:sha256-hex:scope,scope"),
        (f"support:{DIGEST}", "expected name:sha256-hex:scope,scope"),
        (f":{DIGEST}:orders:read", "a client name is"),
        (f"sup port:{DIGEST}:orders:read", "a client name is"),
        (f"\ufeffsupport:{DIGEST}:orders:read", "a client name is"),
        (f"{'n' * 65}:{DIGEST}:orders:read", "a client name is"),
        (f"support\x00:{DIGEST}:orders:read", "a client name is"),
        ("support:s3cret-token-in-clear:orders:read", "64 hexadecimal digits"),
        (f"support:{DIGEST[:-1]}:orders:read", "64 hexadecimal digits"),
        (f"support:{DIGEST}g:orders:read", "64 hexadecimal digits"),
        (f"support:{DIGEST}:", "unknown scope"),
        (f"support:{DIGEST}:orders:write", "unknown scope"),
        (f"support:{DIGEST}:orders:read,,", "unknown scope"),
        (f"support:{DIGEST}:" + "x" * 100_000, "unknown scope"),
        (f"support:{DIGEST}:orders:read  # s3cret note", "unknown scope"),
        (f"support:{DIGEST}:ORDERS:READ", "unknown scope"),
        (f"support:{DIGEST}:orders:read\x00", "unknown scope"),
        (f"support:{DIGEST}:orders:read\u2028metrics:read", "unknown scope"),
        (f"support:{DIGEST}:orders:read\rs3cret", "unknown scope"),
        ("s3cret" * 50_000, "expected name:sha256-hex:scope,scope"),
    ],
)
def test_a_hostile_line_is_refused_alone_naming_the_line_not_its_content(
    line: str, problem: str
) -> None:
    table = parse_token_file(f"# first\n{line}\nother:{OTHER}:orders:read\n")
    assert table.principals == {OTHER: Principal("other", frozenset({ORDERS_READ}))}
    [message] = table.refused
    assert message.startswith("line 2: ")
    assert problem in message
    assert "s3cret" not in message
    assert len(message) < 200


def test_every_line_of_a_client_or_a_token_listed_twice_is_refused() -> None:
    # Either line could be the one meant to be removed: neither is trusted.
    table = parse_token_file(
        f"a:{DIGEST}:orders:read\nb:{OTHER}:orders:read\na:{'b' * 64}:orders:read:pii\n"
    )
    assert table.principals == {OTHER: Principal("b", frozenset({ORDERS_READ}))}
    assert table.refused == [
        "line 1: client a is listed more than once",
        "line 3: client a is listed more than once",
    ]
    table = parse_token_file(
        f"a:{DIGEST}:orders:read\nb:{DIGEST.upper()}:orders:read:pii\nc:{OTHER}:metrics:read\n"
    )
    assert list(table.principals) == [OTHER]
    assert table.refused == [
        "line 1: the same token is listed more than once",
        "line 2: the same token is listed more than once",
    ]


def test_line_numbers_are_an_editors_and_an_empty_file_admits_nobody() -> None:
    # A form feed or a line separator inside a line does not shift the numbers that follow.
    table = parse_token_file(f"x\x0cy\n\u2028\nz\n\nsupport:{DIGEST}:orders\n")
    assert table.refused[0].startswith("line 1: ")
    assert table.refused[1].startswith("line 3: ")
    assert table.refused[2].startswith("line 5: ")
    for text in ("", "\n\n", "# nobody yet\n"):
        assert parse_token_file(text) == TokenLines({}, [])


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def authenticate(authenticator: Any, token: str) -> Principal:
    principal: Principal = asyncio.run(authenticator.authenticate(token))
    return principal


def reason(authenticator: Any, token: str) -> str:
    with pytest.raises(AuthFailure) as failure:
        authenticate(authenticator, token)
    return failure.value.reason


def test_a_token_is_known_by_its_digest_and_a_removed_line_revokes_it(tmp_path: Path) -> None:
    support, auditor = new_token(), new_token()
    assert support != auditor
    assert len(support) >= 43
    path = tmp_path / "tokens"
    path.write_text(
        f"support:{token_digest(support)}:orders:read\n"
        f"auditor:{token_digest(auditor)}:orders:read:pii\n"
    )
    clock = Clock()
    tokens = TokenFile(path, clock)
    assert authenticate(tokens, support).name == "support"
    assert authenticate(tokens, auditor).sees_personal_data
    assert reason(tokens, new_token()) == "unknown_token"
    assert reason(tokens, token_digest(support)) == "unknown_token"  # the digest is no token

    path.write_text(f"auditor:{token_digest(auditor)}:orders:read:pii\n")
    assert authenticate(tokens, support).name == "support"  # looked at once a second
    clock.now += 1
    assert reason(tokens, support) == "unknown_token"
    assert authenticate(tokens, auditor).name == "auditor"


def token_lines(**tokens: str) -> str:
    return "".join(f"{name}:{token_digest(token)}:orders:read\n" for name, token in tokens.items())


@pytest.fixture
def two_clients(tmp_path: Path) -> tuple[Path, Clock, TokenFile, str, str]:
    """A token file of two clients, `support` and `leaver`, and their tokens."""
    support, leaver = new_token(), new_token()
    path = tmp_path / "tokens"
    path.write_text(token_lines(support=support, leaver=leaver))
    clock = Clock()
    return path, clock, TokenFile(path, clock), support, leaver


Breakage = Callable[[Path], None]


def deleted(path: Path) -> None:
    path.unlink()


def a_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def not_utf8(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"# caf\xe9\n")


def binary(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 4)


@pytest.mark.parametrize("break_it", [deleted, a_directory, not_utf8, binary])
def test_a_token_file_that_cannot_be_read_admits_no_token_until_it_can(
    two_clients: tuple[Path, Clock, TokenFile, str, str],
    caplog: pytest.LogCaptureFixture,
    break_it: Breakage,
) -> None:
    path, clock, tokens, support, leaver = two_clients
    break_it(path)
    clock.now += 1
    # The revoked token may be any of them: nothing tells which, so none is let in.
    assert reason(tokens, support) == "unknown_token"
    assert reason(tokens, leaver) == "unknown_token"
    for _ in range(3):
        clock.now += 5
        assert reason(tokens, support) == "unknown_token"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1  # once, not every second
    assert errors[0].startswith("HTTP_TOKENS_FILE cannot be read, no bearer token is admitted")

    if path.is_dir():
        path.rmdir()
    path.write_text(token_lines(support=support))
    clock.now += 1
    assert authenticate(tokens, support).name == "support"
    assert reason(tokens, leaver) == "unknown_token"


def test_a_removed_line_revokes_its_token_even_when_another_line_breaks(
    two_clients: tuple[Path, Clock, TokenFile, str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    path, clock, tokens, support, leaver = two_clients
    auditor = new_token()
    # leaver's line removed, an inline comment and an upper-case scope added by mistake.
    path.write_text(
        f"support:{token_digest(support)}:orders:read\n"
        f"auditor:{token_digest(auditor)}:orders:read # s3cret note\n"
        f"auditor2:{token_digest(new_token())}:ORDERS:READ\n"
    )
    clock.now += 1
    assert reason(tokens, leaver) == "unknown_token"
    assert reason(tokens, auditor) == "unknown_token"
    assert authenticate(tokens, support).name == "support"
    assert tokens.refused_lines == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [
        "HTTP_TOKENS_FILE line 2: unknown scope; known are metrics:read, orders:read, "
        "orders:read:pii, orders:trail; the line admits no token",
        "HTTP_TOKENS_FILE line 3: unknown scope; known are metrics:read, orders:read, "
        "orders:read:pii, orders:trail; the line admits no token",
    ]
    assert "s3cret" not in caplog.text


def test_a_chmod_that_makes_the_file_unreadable_is_noticed(
    two_clients: tuple[Path, Clock, TokenFile, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, clock, tokens, support, _ = two_clients
    # The superuser reads any file: the refusal a chmod 000 gives others is made here.

    def refused(_: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", refused)
    path.chmod(0)
    clock.now += 1
    assert reason(tokens, support) == "unknown_token"


def test_a_token_file_starts_with_its_good_lines_or_not_at_all(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    support = new_token()
    path = tmp_path / "tokens"
    path.write_bytes(
        b"\xef\xbb\xbf"  # a BOM, as some editors write
        + token_lines(support=support).replace("\n", "\r\n").encode()
        + b"nul\x00:s3cret:orders:read\n"
    )
    tokens = open_token_file(path)
    assert authenticate(tokens, support).name == "support"
    assert tokens.refused_lines == 1
    assert "HTTP_TOKENS_FILE line 2: a client name is" in caplog.text
    assert "s3cret" not in caplog.text

    path.write_text("support:s3cret:orders:read\n# the only client\n")
    with pytest.raises(TokenFileError) as refused:
        open_token_file(path)
    assert str(refused.value) == (
        "line 1: the second field must be 64 hexadecimal digits (SHA-256) "
        "(and no line admits a token)"
    )
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(TokenFileError) as refused:
        open_token_file(path)
    assert str(refused.value) == "it is not UTF-8 text"
    path.unlink()
    with pytest.raises(TokenFileError) as refused:
        open_token_file(path)
    assert str(refused.value) == "cannot read it: No such file or directory"
    path.write_text("")
    assert len(open_token_file(path)) == 0  # nobody admitted, on purpose


# ------------------------------------------------------------------------------------- JWT


@pytest.fixture(scope="module")
def provider() -> IdentityProvider:
    return IdentityProvider()


def verifier(provider: IdentityProvider, clock: Clock | None = None) -> JwtVerifier:
    return JwtVerifier(
        "http://127.0.0.1:1/jwks",
        ISSUER,
        AUDIENCE,
        fetch=provider.fetch,
        monotonic=clock or Clock(),
    )


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1", "ed-1"])
def test_a_token_signed_by_a_published_key_names_its_subject_and_scopes(
    provider: IdentityProvider, kid: str
) -> None:
    token = provider.token(kid, sub="bob", scope="orders:read metrics:read admin")
    assert authenticate(verifier(provider), token) == Principal(
        "bob", frozenset({ORDERS_READ, "metrics:read"})
    )


@pytest.mark.parametrize(
    ("claims", "scopes"),
    [
        ({"scope": None, "scp": ["orders:read:pii", 7]}, {ORDERS_READ_PII}),
        ({"scope": None, "scp": "orders:read"}, {ORDERS_READ}),
        ({"scope": None}, set()),
        ({"scope": {"orders:read": True}}, set()),
    ],
)
def test_scopes_come_from_scope_or_scp(
    provider: IdentityProvider, claims: dict[str, Any], scopes: set[str]
) -> None:
    assert authenticate(verifier(provider), provider.token(**claims)).scopes == scopes


def test_every_bad_token_is_refused_with_its_reason(provider: IdentityProvider) -> None:
    now = int(time.time())
    check = verifier(provider)
    cases = {
        "expired": provider.token(exp=now - 31),
        # Valid in 90 s, past the 30 s leeway by a minute: the checks below may run seconds
        # after `now` on a loaded machine (at now + 31 one failed so, valid by then).
        "not_yet_valid": provider.token(nbf=now + 90),
        "wrong_issuer": provider.token(iss="https://elsewhere.example/"),
        "wrong_audience": provider.token(aud="another-service"),
        "algorithm": provider.unsigned_token(),
        "unknown_key": provider.token(headers={"kid": "nobody"}),
        "malformed": "not.a.jwt",
    }
    for expected, token in cases.items():
        assert reason(check, token) == expected, expected
    assert reason(check, provider.hmac_with_public_key()) == "algorithm"
    assert reason(check, provider.token(sub=None)) == "invalid"
    assert reason(check, provider.token(exp=None)) == "invalid"
    assert reason(check, provider.token(sub="")) == "invalid"
    assert reason(check, provider.token(exp="tomorrow")) == "invalid"
    # A token signed by one published key but naming another's kid.
    header, payload, _ = provider.token("rsa-1").split(".")
    _, _, other_signature = provider.token("rsa-1", sub="mallory").split(".")
    assert reason(check, f"{header}.{payload}.{other_signature}") == "bad_signature"
    assert reason(check, provider.token("ec-1", headers={"kid": "rsa-1"})) == "algorithm"


def test_thirty_seconds_of_clock_skew_are_forgiven(provider: IdentityProvider) -> None:
    now = int(time.time())
    check = verifier(provider)
    assert authenticate(check, provider.token(exp=now - 20)).name == "alice"
    assert authenticate(check, provider.token(nbf=now + 20)).name == "alice"


def test_an_unknown_kid_refetches_the_keys_at_most_once_per_30_seconds() -> None:
    provider = IdentityProvider()
    clock = Clock()
    check = verifier(provider, clock)
    assert authenticate(check, provider.token()).name == "alice"
    assert provider.requests == 1
    for _ in range(5):
        assert reason(check, provider.token(headers={"kid": "made-up"})) == "unknown_key"
    assert provider.requests == 1  # fetched less than 30 s ago

    provider.add_key("rsa-2")
    assert reason(check, provider.token("rsa-2")) == "unknown_key"
    clock.now += JWKS_REFETCH_SECONDS
    assert authenticate(check, provider.token("rsa-2")).name == "alice"  # a rotated key
    assert provider.requests == 2


class ProviderDown:
    """The provider's JWKS endpoint, failing while `down` says so."""

    def __init__(self, provider: IdentityProvider, error: Exception) -> None:
        self.provider = provider
        self.error = error
        self.down = True
        self.attempts = 0

    def __call__(self, url: str) -> JwksAnswer:
        self.attempts += 1
        if self.down:
            raise self.error
        return self.provider.fetch(url)


@pytest.mark.parametrize(
    "error",
    [ConnectionRefusedError(111, "Connection refused"), TimeoutError(), ValueError("not JSON")],
)
def test_keys_that_cannot_be_fetched_ask_to_retry_soon_rather_than_refuse_the_token(
    provider: IdentityProvider, error: Exception
) -> None:
    clock = Clock()
    endpoint = ProviderDown(provider, error)
    check = JwtVerifier(
        "http://127.0.0.1:1/jwks", ISSUER, AUDIENCE, fetch=endpoint, monotonic=clock
    )
    token = provider.token()
    for waited in (0.0, 0.5, 1.5):
        clock.now = 1000.0 + waited
        with pytest.raises(KeysUnavailable) as unavailable:
            authenticate(check, token)
        assert unavailable.value.retry_after == max(1, math.ceil(JWKS_RETRY_SECONDS - waited))
    assert endpoint.attempts == 1  # not hammered while it is down

    endpoint.down = False
    clock.now = 1000.0 + JWKS_RETRY_SECONDS
    assert authenticate(check, token).name == "alice"
    assert endpoint.attempts == 2
    # Back to the normal pause between fetches for a made-up kid.
    assert reason(check, provider.token(headers={"kid": "made-up"})) == "unknown_key"
    clock.now += JWKS_RETRY_SECONDS
    assert reason(check, provider.token(headers={"kid": "made-up"})) == "unknown_key"
    assert endpoint.attempts == 2


def test_a_provider_down_after_a_fetch_keeps_the_keys_it_gave(
    provider: IdentityProvider,
) -> None:
    clock = Clock()
    endpoint = ProviderDown(provider, ConnectionResetError(104, "Connection reset"))
    endpoint.down = False
    check = JwtVerifier(
        "http://127.0.0.1:1/jwks", ISSUER, AUDIENCE, fetch=endpoint, monotonic=clock
    )
    assert authenticate(check, provider.token(sub="first")).name == "first"
    endpoint.down = True
    clock.now += JWKS_REFETCH_SECONDS
    with pytest.raises(KeysUnavailable):
        authenticate(check, provider.token(headers={"kid": "rotated"}))
    assert authenticate(check, provider.token(sub="second")).name == "second"


def test_a_verified_token_is_remembered_until_it_expires(provider: IdentityProvider) -> None:
    now = time.time()
    wall = Clock(now)
    check = JwtVerifier(
        "http://127.0.0.1:1/jwks", ISSUER, AUDIENCE, fetch=provider.fetch, clock=wall
    )
    token = provider.token(exp=int(now) + 60)
    first = authenticate(check, token)
    decoded: list[str] = []
    original = check._verify

    async def counting(token: str) -> Any:
        decoded.append(token)
        return await original(token)

    check._verify = counting  # type: ignore[method-assign]
    assert authenticate(check, token) is first
    assert decoded == []
    # Past exp and its leeway by the cache's clock: verified again (PyJWT reads the real clock,
    # for which the token is still valid, so the check passes once more).
    wall.now = now + 60 + 31
    assert authenticate(check, token) == first
    assert decoded == [token]


def test_a_time_claim_must_be_a_number(provider: IdentityProvider) -> None:
    now = int(time.time())
    check = verifier(provider)
    # PyJWT reads a numeric string, or true, as the number it stands for.
    for claims in (
        {"exp": str(now + 300)},
        {"exp": f" {now + 300} "},
        {"nbf": str(now - 10)},
        {"iat": str(now)},
        {"nbf": True},
        {"iat": True},
    ):
        assert reason(check, provider.token(**claims)) == "invalid", claims
    assert authenticate(check, provider.token(exp=now + 300.5, iat=now - 0.5)).name == "alice"


def test_a_maximum_lifetime_refuses_longer_lived_tokens_and_tokens_without_iat(
    provider: IdentityProvider,
) -> None:
    now = int(time.time())
    check = JwtVerifier(
        "http://127.0.0.1:1/jwks", ISSUER, AUDIENCE, max_lifetime=600, fetch=provider.fetch
    )
    assert authenticate(check, provider.token(iat=now, exp=now + 600)).name == "alice"
    assert reason(check, provider.token(iat=now, exp=now + 601)) == "lifetime"
    assert reason(check, provider.token(iat=now - 3600, exp=now + 60)) == "lifetime"
    assert reason(check, provider.token(iat=None, exp=now + 60)) == "lifetime"
    assert reason(check, provider.token(iat=str(now), exp=now + 60)) == "invalid"
    # Unbounded unless set.
    assert authenticate(verifier(provider), provider.token(iat=None, exp=now + 86400 * 365))


@pytest.mark.parametrize(
    ("cache_control", "seconds"),
    [
        (None, JWKS_DEFAULT_MAX_AGE_SECONDS),
        ("public", JWKS_DEFAULT_MAX_AGE_SECONDS),
        ("s-maxage=600", JWKS_DEFAULT_MAX_AGE_SECONDS),
        ("max-age=120", 120),
        ("public, MAX-AGE = 120 , must-revalidate", 120),
        ("max-age=0", JWKS_MIN_MAX_AGE_SECONDS),
        ("max-age=1", JWKS_MIN_MAX_AGE_SECONDS),
        ("max-age=-60", JWKS_MIN_MAX_AGE_SECONDS),
        ("max-age=86400", JWKS_MAX_MAX_AGE_SECONDS),
        ("max-age=" + "9" * 5000, JWKS_MAX_MAX_AGE_SECONDS),
        ("max-age=soon", JWKS_MIN_MAX_AGE_SECONDS),
        ("max-age=", JWKS_MIN_MAX_AGE_SECONDS),
        ("max-age=1e3", JWKS_MIN_MAX_AGE_SECONDS),
        ("max-age=\uff16\uff10", JWKS_MIN_MAX_AGE_SECONDS),  # full-width digits
        ('max-age="600"', JWKS_MIN_MAX_AGE_SECONDS),
        ("max-age=600, max-age=60", JWKS_MIN_MAX_AGE_SECONDS),
        ("max-age=600, max-age=600", JWKS_MIN_MAX_AGE_SECONDS),
        ("no-store", JWKS_MIN_MAX_AGE_SECONDS),
        ("max-age=600, no-cache", JWKS_MIN_MAX_AGE_SECONDS),
        ('no-cache="set-cookie", max-age=600', JWKS_MIN_MAX_AGE_SECONDS),
        (",,, ,", JWKS_DEFAULT_MAX_AGE_SECONDS),
    ],
)
def test_the_key_set_lives_its_max_age_within_bounds(
    cache_control: str | None, seconds: float
) -> None:
    assert jwks_max_age(cache_control) == seconds
    assert JWKS_MIN_MAX_AGE_SECONDS == JWKS_REFETCH_SECONDS < 300 <= JWKS_MAX_MAX_AGE_SECONDS


def run(scenario: Coroutine[Any, Any, None]) -> None:
    """One event loop for a whole scenario, so that a fetch started in the background by one
    request is still there for the next."""
    asyncio.run(scenario)


async def refused(check: JwtVerifier, token: str) -> str:
    with pytest.raises(AuthFailure) as failure:
        await check.authenticate(token)
    return failure.value.reason


def test_the_key_set_is_fetched_again_after_its_max_age() -> None:
    provider = IdentityProvider()
    provider.cache_control = "max-age=120"
    clock = Clock()
    check = verifier(provider, clock)

    async def scenario() -> None:
        token = provider.token()
        assert (await check.authenticate(token)).name == "alice"
        clock.now += 119
        assert check.known(token) is not None
        assert (await check.authenticate(provider.token(sub="bob"))).name == "bob"
        assert provider.requests == 1
        clock.now += 1
        await check.authenticate(provider.token(sub="carol"))
        assert provider.requests == 2

    run(scenario())


def test_a_withdrawn_key_is_refused_once_the_key_set_is_fetched_again() -> None:
    provider = IdentityProvider()
    provider.cache_control = "max-age=60"
    clock = Clock()
    check = verifier(provider, clock)

    async def scenario() -> None:
        assert (await check.authenticate(provider.token())).name == "alice"
        provider.withdraw("rsa-1")
        clock.now += 60
        # The first request to find the set stale starts the fetch; a new token waits for it.
        assert await refused(check, provider.token(sub="mallory")) == "unknown_key"
        assert provider.requests == 2
        assert (await check.authenticate(provider.token("ec-1"))).name == "alice"

    run(scenario())


def test_tokens_remembered_under_a_withdrawn_or_replaced_key_are_forgotten(
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider = IdentityProvider()
    provider.cache_control = "max-age=60"
    clock = Clock()
    check = verifier(provider, clock)
    withdrawn = provider.token(sub="withdrawn")
    replaced = provider.token("ec-1", sub="replaced")
    kept = provider.token("ed-1", sub="kept")

    async def scenario() -> None:
        for token in (withdrawn, replaced, kept):
            await check.authenticate(token)
        provider.withdraw("rsa-1")
        provider.keys["ec-1"] = ec.generate_private_key(ec.SECP256R1())  # the same kid
        clock.now += 60
        await check.authenticate(provider.token("ed-1", sub="new"))  # waits for the fetch
        assert check.known(withdrawn) is None
        assert check.known(replaced) is None
        assert check.known(kept) is not None
        assert await refused(check, withdrawn) == "unknown_key"
        assert await refused(check, replaced) == "bad_signature"

    run(scenario())
    assert "JWKS: 2 keys withdrawn (ec-1, rsa-1), 2 tokens verified with them forgotten" in (
        caplog.text
    )


def test_a_remembered_token_is_answered_while_the_key_set_is_fetched() -> None:
    provider = IdentityProvider()
    provider.cache_control = "max-age=60"
    clock = Clock()
    release = threading.Event()
    slow: list[str] = []

    def fetch(url: str) -> JwksAnswer:
        if slow:
            release.wait(10)
        slow.append(url)
        return provider.fetch(url)

    check = JwtVerifier("http://127.0.0.1:1/jwks", ISSUER, AUDIENCE, fetch=fetch, monotonic=clock)

    async def scenario() -> None:
        token = provider.token()
        await check.authenticate(token)
        clock.now += 60
        for _ in range(100):  # the hot path: no wait, one fetch started
            assert check.known(token) is not None
            await asyncio.sleep(0)
        assert provider.requests == 1
        waiting = asyncio.ensure_future(check.authenticate(provider.token(sub="new")))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # a token not verified yet waits for the keys
        release.set()
        assert (await waiting).name == "new"
        assert provider.requests == 2

    run(scenario())


def test_keys_are_kept_for_an_hour_while_the_provider_is_down_then_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider = IdentityProvider()
    clock = Clock()
    endpoint = ProviderDown(provider, ConnectionRefusedError(111, "Connection refused"))
    endpoint.down = False
    check = JwtVerifier(
        "http://127.0.0.1:1/jwks", ISSUER, AUDIENCE, fetch=endpoint, monotonic=clock
    )
    remembered = provider.token(sub="remembered")

    async def scenario() -> None:
        await check.authenticate(remembered)
        endpoint.down = True
        clock.now += JWKS_DEFAULT_MAX_AGE_SECONDS
        # Stale and unreachable: the keys of the last fetch still verify.
        assert (await check.authenticate(provider.token(sub="new"))).name == "new"
        assert endpoint.attempts == 2
        clock.now += JWKS_RETRY_SECONDS
        check.known(remembered)
        await check.authenticate(provider.token(sub="newer"))
        assert endpoint.attempts == 3  # tried again every few seconds
        clock.now = 1000.0 + JWKS_MAX_STALE_SECONDS - 1
        assert (await check.authenticate(provider.token(sub="last"))).name == "last"
        clock.now = 1000.0 + JWKS_MAX_STALE_SECONDS
        with pytest.raises(KeysUnavailable):
            await check.authenticate(provider.token(sub="too-late"))
        assert check.known(remembered) is None
        attempts = endpoint.attempts
        for _ in range(5):  # and the provider is not hammered meanwhile
            with pytest.raises(KeysUnavailable):
                await check.authenticate(remembered)
        assert endpoint.attempts == attempts
        endpoint.down = False
        clock.now += JWKS_RETRY_SECONDS
        assert (await check.authenticate(remembered)).name == "remembered"

    run(scenario())
    assert "its last keys are older than 3600 s: dropped" in caplog.text


def test_keys_a_jwks_must_not_offer_are_left_out(provider: IdentityProvider) -> None:
    published = json.loads(provider.jwks())["keys"]
    hostile = [
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0", "alg": "HS256"},
        {**published[0], "kid": "rsa-as-hs", "alg": "HS256"},
        {**published[0], "kid": "encryption", "use": "enc"},
        {**published[0], "kid": 7},
        {"kty": "RSA", "kid": "broken", "n": "AQ", "e": "!!"},
        "not a key",
    ]
    keys = parse_jwks(json.dumps({"keys": [*published, *hostile]}).encode())
    assert set(keys) == {"rsa-1", "ec-1", "ed-1"}
    for body in (b"[]", b'{"keys": {}}', b"{}"):
        with pytest.raises(ValueError, match="not a JSON Web Key Set"):
            parse_jwks(body)


# ------------------------------------------------------------------------------ brute force


def test_past_twenty_failures_in_a_minute_a_client_waits_for_the_window_to_end() -> None:
    clock = Clock()
    limiter = FailureLimiter(clock=clock)
    for _ in range(20):
        limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") is None
    limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == 60
    assert limiter.retry_after("10.0.0.2") is None
    clock.now += 45.5
    assert limiter.retry_after("10.0.0.1") == 15
    clock.now += 14.5
    assert limiter.retry_after("10.0.0.1") is None
    limiter.failed("10.0.0.1")  # a new window, counted from one
    assert limiter.retry_after("10.0.0.1") is None


def test_the_limiter_tracks_a_bounded_number_of_clients() -> None:
    clock = Clock()
    limiter = FailureLimiter(max_clients=100, clock=clock)
    for _ in range(21):
        limiter.failed("attacker")
    for n in range(100_000):
        limiter.failed(f"2001:db8::{n:x}")
        clock.now += 0.0001
    assert len(limiter) == 100
    assert limiter.retry_after("attacker") is None  # evicted, oldest first


# ---------------------------------------------------------------------------- protected mode


@pytest.mark.parametrize(
    ("env", "refused"),
    [
        ({}, False),
        ({"HTTP_HOST": "localhost"}, False),
        ({"HTTP_HOST": "::1"}, False),
        ({"HTTP_HOST": "127.0.0.2"}, False),
        ({"HTTP_HOST": "0.0.0.0"}, True),
        ({"HTTP_HOST": "::"}, True),
        ({"HTTP_HOST": "192.168.1.10"}, True),
        ({"HTTP_HOST": "orders.internal"}, True),
        ({"HTTP_HOST": "0.0.0.0", "HTTP_ALLOW_ANONYMOUS": "true"}, False),
        ({"HTTP_HOST": "0.0.0.0", "HTTP_AUTH": "token", "HTTP_TOKENS_FILE": "t"}, False),
    ],
)
def test_protected_mode_refuses_anonymous_access_beyond_loopback(
    env: dict[str, str], refused: bool
) -> None:
    values: dict[str, Any] = {name.lower(): value for name, value in env.items()}
    settings = Settings(_env_file=None, **values)
    problem = protected_mode_problem(
        settings.http_auth, settings.http_host, allow_anonymous=settings.http_allow_anonymous
    )
    assert (problem is not None) == refused
    if problem is not None:
        assert "HTTP_AUTH=none" in problem
        assert f"HTTP_HOST={env['HTTP_HOST']}" in problem
        assert "\n" not in problem


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HTTP_AUTH": "token"}, "HTTP_AUTH=token needs HTTP_TOKENS_FILE"),
        ({"HTTP_AUTH": "jwt"}, "HTTP_AUTH=jwt needs HTTP_JWT_JWKS_URL"),
        (
            {"HTTP_AUTH": "jwt", "HTTP_JWT_JWKS_URL": "https://id/jwks", "HTTP_JWT_ISSUER": "i"},
            "HTTP_AUTH=jwt needs HTTP_JWT_AUDIENCE",
        ),
        (
            {"HTTP_TLS_CERT_FILE": "cert.pem"},
            "HTTP_TLS_CERT_FILE and HTTP_TLS_KEY_FILE go together",
        ),
    ],
)
def test_incomplete_authentication_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=f"^invalid settings: .*{message}"):
        load_settings()


# ----------------------------------------------------------------------------------- masking


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        ("Test Testov", "T*** T*****"),
        ("", ""),
        ("A", "*"),
        ("Al", "A*"),
        ("  Jean-Luc   Picard ", "  J*******   P***** "),
        ("Иван Петров", "И*** П*****"),
        ("李小龙", "李**"),
        ("Ploshad Mira 15", "P****** M*** 1*"),
    ],
)
def test_names_addresses_and_cities_keep_each_words_first_character(
    value: str, masked: str
) -> None:
    assert mask_words(value) == masked


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        ("+972000000000", "+97********00"),
        ("+97200000000", "+97*******00"),
        ("+7 (900) 123-45-67", "+7 *************67"),
        ("12345", "12***"),
        ("123", "1**"),
        ("1", "*"),
        ("", ""),
    ],
)
def test_phones_keep_their_prefix_and_last_two_digits(value: str, masked: str) -> None:
    assert mask_phone(value) == masked
    assert len(mask_phone(value)) == len(value)


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        ("test@gmail.com", "t***@gmail.com"),
        ("ab@x.org", "a*@x.org"),
        ("a@x.org", "*@x.org"),
        ('"odd@local"@example.org', '"**********@example.org'),
        ("no-at-sign", "n*********"),
        ("@example.org", "@***********"),
        ("", ""),
    ],
)
def test_emails_keep_their_first_character_and_domain(value: str, masked: str) -> None:
    assert mask_email(value) == masked


def test_zip_codes_keep_two_characters() -> None:
    assert mask_zip("2639809") == "26*****"
    assert mask_zip("123") == "1**"


def test_the_masked_document_hides_the_delivery_and_keeps_the_rest() -> None:
    order = json.loads(json.dumps(SAMPLE_ORDER))
    masked = json.loads(masked_document(json.dumps(order).encode()))
    delivery, original = masked["delivery"], order["delivery"]
    for field in ("name", "phone", "email", "address", "city", "zip"):
        assert delivery[field] != original[field], field
        assert len(delivery[field]) == len(original[field])
        assert "*" in delivery[field]
    assert delivery["region"] == original["region"]
    masked.pop("delivery")
    order.pop("delivery")
    assert masked == order


def test_odd_documents_are_masked_without_error() -> None:
    assert json.loads(masked_document(b'{"delivery": {"phone": 79001234567, "name": null}}')) == {
        "delivery": {"phone": "790******67", "name": None}
    }
    assert json.loads(masked_document(b'{"delivery": "nobody"}')) == {"delivery": "nobody"}
    assert json.loads(masked_document(b"[1, 2]")) == [1, 2]
    unicode = masked_document('{"delivery": {"name": "Zoë Ünïcödé"}}'.encode())
    assert unicode.decode() == '{"delivery":{"name":"Z** Ü******"}}'


def test_a_masked_view_is_computed_once_per_version_and_tagged_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    maskings: list[bytes] = []

    def counted(body: bytes) -> bytes:
        maskings.append(body)
        return masked_document(body)

    monkeypatch.setattr(cache_module, "masked_document", counted)
    views = MaskedViews(capacity=10, max_bytes=None)
    whole = CachedOrder.of(json.dumps(SAMPLE_ORDER).encode(), b"\x01" * 32)
    masked = views.masked(whole)
    assert masked.body == masked_document(whole.body)
    assert views.masked(whole) == masked
    assert maskings == [whole.body]  # the second from the views kept, not masked again
    assert masked.etag == masked_etag(masked.body) != whole.etag
    assert masked.etag.endswith('-masked"')
    assert masked.etag.startswith('"')
    assert masked.etag.endswith('"')
    newer = CachedOrder.of(json.dumps({**SAMPLE_ORDER, "entry": "X"}).encode(), b"\x02" * 32)
    assert views.masked(newer) != masked
    assert maskings == [whole.body, newer.body]
    assert len(views) == 2


def test_tokens_arriving_while_the_keys_are_fetched_wait_for_them() -> None:
    provider = IdentityProvider()
    check = verifier(provider)
    tokens = [provider.token(sub=f"client-{n}") for n in range(20)]

    async def all_at_once() -> list[Principal]:
        return list(await asyncio.gather(*(check.authenticate(token) for token in tokens)))

    principals = asyncio.run(all_at_once())
    assert [p.name for p in principals] == [f"client-{n}" for n in range(20)]
    assert provider.requests == 1
