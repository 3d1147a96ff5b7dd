"""Who may read what: bearer tokens from a file or JWTs of an identity provider, their scopes,
the cache of verified JWTs, and the limiter of failed authentications."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.client
import io
import json
import logging
import math
import os
import re
import secrets
import socket
import ssl
import time
import urllib.parse
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jwt

from order_viewer.adapters.logs import printable
from order_viewer.config import is_loopback

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger(__name__)

ORDERS_READ = "orders:read"
ORDERS_READ_PII = "orders:read:pii"
METRICS_READ = "metrics:read"
SCOPES = frozenset({ORDERS_READ, ORDERS_READ_PII, METRICS_READ})

# Asymmetric only: with no shared secret in the service there is no HMAC key to confuse with a
# public one, and `none` is not a signature.
JWT_ALGORITHMS = ("RS256", "ES256", "EdDSA")
JWT_LEEWAY_SECONDS = 30
JWKS_REFETCH_SECONDS = 30
# After a failed fetch: the provider is tried again this soon, while tokens wait with a 503.
JWKS_RETRY_SECONDS = 2
JWKS_MAX_BYTES = 1024 * 1024
# For the whole fetch, not each read.
JWKS_TIMEOUT_SECONDS = 5
# How long a fetched key set is used before it is fetched again: its answer's max-age, within
# these bounds, or the default without one. No sooner than an unknown `kid` may refetch, and
# 15 minutes at most, so that a key the provider withdraws is refused within 15 minutes
# whatever its answers announce (providers send hours, even days).
JWKS_DEFAULT_MAX_AGE_SECONDS = 300
JWKS_MIN_MAX_AGE_SECONDS = JWKS_REFETCH_SECONDS
JWKS_MAX_MAX_AGE_SECONDS = 900
# While every fetch fails, the keys of the last good one are kept this long after it: an
# outage of the provider shorter than an hour goes unnoticed, and a key it withdrew meanwhile
# is not trusted for ever because it cannot be reached (an hour is also the lifetime of a
# typical provider's access tokens).
JWKS_MAX_STALE_SECONDS = 3600
# Verified JWTs remembered at once; beyond, the oldest is checked again when it comes back.
VERIFIED_TOKENS = 10_000
# A JWT with a few claims is under 1 KB; anything far larger is not one we issued.
MAX_TOKEN_CHARS = 8192

_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
# Token-file lookups go by this many hex digits of the digest, then compare it whole.
_PREFIX = 8


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated client: its name (token-file name or JWT `sub`) and its scopes."""

    name: str
    scopes: frozenset[str]
    # As the audit line writes it, escaped once rather than on every read.
    logged_name: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "logged_name", printable(self.name))

    def may(self, scope: str) -> bool:
        # Reading orders whole includes reading them masked.
        return scope in self.scopes or (scope == ORDERS_READ and ORDERS_READ_PII in self.scopes)

    @property
    def sees_personal_data(self) -> bool:
        return ORDERS_READ_PII in self.scopes


class AuthFailure(Exception):
    """Authentication failed; `reason` is a short fixed word, fit for a metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeysUnavailable(Exception):
    """The keys to check a token could not be fetched: the token may be good, so the client
    should try again in `retry_after` seconds rather than drop it."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the signing keys are unavailable, retry in {retry_after} s")
        self.retry_after = retry_after


class Authenticator(Protocol):
    def known(self, token: str) -> Principal | None:
        """The principal the token stands for when that can be told at once, without waiting
        for anything (a token of the file, a JWT verified before); None when only
        `authenticate` can tell. Raises AuthFailure for a token known to be bad."""
        ...

    async def authenticate(self, token: str) -> Principal:
        """The principal the token stands for; raises AuthFailure, or KeysUnavailable when
        nothing could tell whether the token is good."""
        ...


# What a bearer token may hold: printable ASCII, no space (RFC 6750's b64token, loosely).
_VISIBLE_ASCII = bytes(range(0x21, 0x7F))


def bearer_token(authorization: bytes | None) -> str:
    """The token of an `Authorization: Bearer` header, as the request carried it; raises
    AuthFailure."""
    if authorization is None:
        raise AuthFailure("missing")
    scheme, _, token = authorization.partition(b" ")
    token = token.strip(b" ")
    # Its exact alphabet is left to the lookup, which finds nothing for a token nobody issued.
    # Deleting the visible characters leaves whatever else there is: one pass in C, where
    # str.isprintable cost a microsecond for a JWT on every request.
    if (
        scheme.lower() != b"bearer"
        or not token
        or len(token) > MAX_TOKEN_CHARS
        or token.translate(None, _VISIBLE_ASCII)
    ):
        raise AuthFailure("malformed")
    return token.decode("ascii")


def protected_mode_problem(http_auth: str, http_host: str, *, allow_anonymous: bool) -> str | None:
    """Why serving with HTTP_AUTH `http_auth` on the address `http_host` would serve personal
    data to anyone, or None."""
    if http_auth != "none" or allow_anonymous:
        return None
    if is_loopback(http_host):
        return None
    return (
        f"HTTP_AUTH=none with HTTP_HOST={http_host} serves every customer's personal "
        "data to anyone who can reach it: set HTTP_AUTH to token or jwt, or "
        "HTTP_ALLOW_ANONYMOUS=true if that is intended"
    )


# ------------------------------------------------------------------------------ token file


class TokenFileError(Exception):
    """The token file cannot be used; the message names the line, never its content."""


def parse_scopes(text: str) -> frozenset[str]:
    scopes = frozenset(scope.strip() for scope in text.split(","))
    # An empty text or a comma too many gives an empty scope, which is unknown too.
    if scopes - SCOPES:
        raise ValueError(f"unknown scope; known are {', '.join(sorted(SCOPES))}")
    return scopes


def check_client_name(name: str) -> str:
    if not _CLIENT_NAME.fullmatch(name):
        raise ValueError("a client name is 1 to 64 letters, digits, '.', '_', '@' or '-'")
    return name


@dataclass(frozen=True, slots=True)
class TokenLines:
    """What a token file admits (principals by token digest) and the lines it refuses, each
    refusal naming the line's number, never its content (the line may hold a token)."""

    principals: dict[str, Principal]
    refused: list[str]


def parse_token_file(text: str) -> TokenLines:
    """Blank lines and `#` comments are skipped; a line that is not `name:sha256-hex:scope,scope`
    is refused alone, so one broken line locks out its client only. Every line of a name or a
    digest listed more than once is refused too: either could be the line someone meant to
    remove, so neither is trusted."""
    parsed: list[tuple[int, str, Principal]] = []
    refused: dict[int, str] = {}
    # Lines as an editor numbers them: str.splitlines would also split at \x0b, \x1c or \u2028.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            parsed.append((number, *_token_line(line)))
        except ValueError as error:
            refused[number] = f"line {number}: {error}"
    names = Counter(principal.name for _, _, principal in parsed)
    digests = Counter(digest for _, digest, _ in parsed)
    principals: dict[str, Principal] = {}
    for number, digest, principal in parsed:
        if names[principal.name] > 1:
            refused[number] = f"line {number}: client {principal.name} is listed more than once"
        elif digests[digest] > 1:
            refused[number] = f"line {number}: the same token is listed more than once"
        else:
            principals[digest] = principal
    return TokenLines(principals, [refused[number] for number in sorted(refused)])


def _token_line(line: str) -> tuple[str, Principal]:
    """The digest and principal of a `name:sha256-hex:scope,scope` line; raises ValueError."""
    parts = line.split(":", 2)
    if len(parts) != 3:
        raise ValueError("expected name:sha256-hex:scope,scope")
    name, digest, scopes = parts[0], parts[1].lower(), parts[2]
    check_client_name(name)
    if not _DIGEST.fullmatch(digest):
        raise ValueError("the second field must be 64 hexadecimal digits (SHA-256)")
    return digest, Principal(name, parse_scopes(scopes))


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """256 random bits, URL-safe (and a valid RFC 6750 b64token)."""
    return secrets.token_urlsafe(32)


class TokenFile:
    """Bearer tokens of HTTP_TOKENS_FILE, which holds only their SHA-256 digests.

    The file is looked at again at most once a second (a stat) and re-read when it changed,
    so a line removed revokes its token within a second. It fails closed for whatever may have
    been removed: a line that does not parse admits nobody (the others load), and while the
    file cannot be read as text (deleted, unreadable, not UTF-8) no token is admitted at all,
    since nothing tells which of the previous ones are still meant to be.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = path
        self._clock = clock
        self._stamp: tuple[int, ...] | None = self._file_stamp()
        table = self._read()
        if table.refused and not table.principals:
            # Nobody admitted for broken lines is a mistake to fix before start, not a setting.
            raise TokenFileError(f"{table.refused[0]} (and no line admits a token)")
        self._by_prefix: dict[str, list[tuple[str, Principal]]] = {}
        self.refused_lines = 0
        self._use(table)
        self._checked = clock()
        self._problem: str | None = None  # logged once, not on every look at the file

    def _file_stamp(self) -> tuple[int, ...]:
        status = os.stat(self._path)
        # The change time too: a chmod that makes the file unreadable changes nothing else.
        return status.st_ino, status.st_mtime_ns, status.st_ctime_ns, status.st_size

    def _read(self) -> TokenLines:
        """Raises OSError, or TokenFileError for a file that is not UTF-8 text."""
        try:
            # Bytes decoded whole: text mode would also end lines at a lone \r. A leading BOM
            # (some editors write one) is no part of the first line.
            text = self._path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            raise TokenFileError("it is not UTF-8 text") from None
        return parse_token_file(text)

    def _use(self, table: TokenLines) -> None:
        for problem in table.refused:
            log.error("HTTP_TOKENS_FILE %s; the line admits no token", problem)
        by_prefix: dict[str, list[tuple[str, Principal]]] = {}
        for digest, principal in table.principals.items():
            by_prefix.setdefault(digest[:_PREFIX], []).append((digest, principal))
        self._by_prefix = by_prefix
        self.refused_lines = len(table.refused)

    def reload_if_changed(self) -> None:
        self._checked = self._clock()
        try:
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return
            table = self._read()
        except (OSError, TokenFileError) as error:
            self._by_prefix = {}
            self.refused_lines = 0
            self._stamp = None  # read again as soon as it can be, whatever its stamp
            problem = error.strerror if isinstance(error, OSError) else str(error)
            if problem != self._problem:
                log.error(
                    "HTTP_TOKENS_FILE cannot be read, no bearer token is admitted until it can: %s",
                    problem,
                )
            self._problem = problem
            return
        self._stamp = stamp
        self._use(table)
        self._problem = None
        log.info("HTTP_TOKENS_FILE reloaded: %d clients", len(self))

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._by_prefix.values())

    async def authenticate(self, token: str) -> Principal:
        return self.known(token)

    def known(self, token: str) -> Principal:
        if self._clock() - self._checked >= 1.0:
            self.reload_if_changed()
        digest = token_digest(token)
        # Found by a prefix in O(1), then compared whole in constant time, so the time of an
        # answer does not tell how much of a stored digest a guess matched.
        for stored, principal in self._by_prefix.get(digest[:_PREFIX], ()):
            if hmac.compare_digest(stored, digest):
                return principal
        raise AuthFailure("unknown_token")


def open_token_file(path: Path) -> TokenFile:
    """Raises TokenFileError naming the file's problem: it cannot be read as text, or none of
    its lines admits a token while some are refused."""
    try:
        return TokenFile(path)
    except OSError as error:
        raise TokenFileError(f"cannot read it: {error.strerror}") from None


# ------------------------------------------------------------------------------------- JWT


# A fetch's body and its Cache-Control (the header's lines joined), None without one.
JwksAnswer = tuple[bytes, str | None]


def fetch_url(url: str) -> JwksAnswer:
    """GET `url` (https, or http to loopback: the setting is validated as such) within one
    deadline of JWKS_TIMEOUT_SECONDS for the whole fetch, so a server that drips its answer
    byte by byte cannot hold it longer; at most JWKS_MAX_BYTES; a redirect is an error, never
    followed (it could lead anywhere, in clear). Raises OSError or ValueError.

    The standard library's http.client with a socket of our own between it and the network,
    which sets the time left as its timeout before each read: a timeout on its own bounds
    each read, not the fetch. Name resolution is not bounded (getaddrinfo takes no timeout).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.hostname is None:
        raise ValueError("the URL names no host")
    deadline = time.monotonic() + JWKS_TIMEOUT_SECONDS
    port = parts.port or (443 if parts.scheme == "https" else 80)
    connection = http.client.HTTPConnection(parts.hostname, port, timeout=JWKS_TIMEOUT_SECONDS)
    connection.connect()
    # Closed here once the answer is read: http.client closes its connection as soon as an
    # answer's head says it is the last, before its body is read.
    sock: socket.socket = connection.sock
    try:
        if parts.scheme == "https":
            # The handshake within the time left: a TLS call keeps to its timeout as a whole.
            sock.settimeout(_time_left(deadline))
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        connection.sock = _DeadlineSocket(sock, deadline)
        target = parts.path or "/"
        connection.request(
            "GET", f"{target}?{parts.query}" if parts.query else target, headers=_JWKS_REQUEST
        )
        response = connection.getresponse()
        if 300 <= response.status < 400:
            raise ValueError(
                f"the URL answered {response.status}, a redirect, which is not followed: "
                "set HTTP_JWT_JWKS_URL to the key set's own URL"
            )
        if response.status != 200:
            raise ValueError(f"the URL answered {response.status}")
        body = response.read(JWKS_MAX_BYTES + 1)
        # Read with a bound, http.client returns what came before the connection closed.
        if len(body) <= JWKS_MAX_BYTES and response.length:
            raise ValueError("the answer ended before its Content-Length")
        cache_control = ", ".join(response.headers.get_all("cache-control") or ()) or None
    except http.client.HTTPException as error:
        # Its text may quote what the server sent.
        raise ValueError(f"not an HTTP answer ({type(error).__name__})") from None
    finally:
        sock.close()
    if len(body) > JWKS_MAX_BYTES:
        raise ValueError(f"the key set is larger than {JWKS_MAX_BYTES} bytes")
    return body, cache_control


_JWKS_REQUEST = {"Accept": "application/json"}


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"no whole answer within {JWKS_TIMEOUT_SECONDS} s")
    return left


class _DeadlineSocket(io.RawIOBase):
    """A connected socket as http.client uses it (sendall, makefile, close), each call waiting
    at most until the fetch's deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(_time_left(self._deadline))
        self._sock.sendall(data)

    def makefile(self, mode: str) -> io.BufferedReader:
        assert mode == "rb"  # http.client reads its answers so
        return io.BufferedReader(self)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        self._sock.settimeout(_time_left(self._deadline))
        return self._sock.recv_into(buffer)

    def close(self) -> None:
        """Nothing: fetch_url closes the socket once it has read the answer."""


def jwks_max_age(cache_control: str | None) -> float:
    """Seconds a fetched key set is used before it is fetched again, from the answer's
    Cache-Control: its max-age within JWKS_MIN_MAX_AGE_SECONDS and JWKS_MAX_MAX_AGE_SECONDS,
    JWKS_DEFAULT_MAX_AGE_SECONDS without one. An answer stale at once (no-store, no-cache,
    max-age=0) or whose freshness is invalid (not a number, or given twice, which RFC 9111
    says to treat as stale) is fetched again as soon as the lower bound allows."""
    if cache_control is None:
        return JWKS_DEFAULT_MAX_AGE_SECONDS
    ages: list[str] = []
    for directive in cache_control.split(","):
        name, _, value = directive.partition("=")
        name = name.strip().lower()
        if name in ("no-store", "no-cache"):
            return JWKS_MIN_MAX_AGE_SECONDS
        if name == "max-age":
            ages.append(value.strip())
    if not ages:
        return JWKS_DEFAULT_MAX_AGE_SECONDS
    if len(ages) > 1 or not _SECONDS.fullmatch(ages[0]):
        return JWKS_MIN_MAX_AGE_SECONDS
    # Past ten digits, the upper bound: int() of thousands of digits is slow, then refused.
    seconds = int(ages[0]) if len(ages[0]) <= 10 else JWKS_MAX_MAX_AGE_SECONDS
    return min(max(seconds, JWKS_MIN_MAX_AGE_SECONDS), JWKS_MAX_MAX_AGE_SECONDS)


_SECONDS = re.compile(r"[0-9]+")


def parse_jwks(body: bytes) -> dict[str, jwt.PyJWK]:
    """The usable keys of a JSON Web Key Set by `kid`: asymmetric keys of the allowed
    algorithms only; other keys (symmetric ones above all) are left out."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise ValueError("the body is not JSON") from None
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise ValueError("not a JSON Web Key Set (no `keys` list)")
    usable: dict[str, jwt.PyJWK] = {}
    for entry in keys:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            continue
        if entry.get("use", "sig") != "sig" or entry.get("kty") not in ("RSA", "EC", "OKP"):
            continue
        try:
            key = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            continue
        if key.algorithm_name in JWT_ALGORITHMS:
            usable[entry["kid"]] = key
    return usable


_FAILURES: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidIssuerError, "wrong_issuer"),
    (jwt.InvalidAudienceError, "wrong_audience"),
    (jwt.InvalidSignatureError, "bad_signature"),
)


class JwtVerifier:
    """JWTs signed by the keys of an identity provider's JWKS, for one issuer and audience.

    The key set is fetched on first use, then again when it grows stale (after the max-age of
    its answer, `jwks_max_age`): the first request to find it stale starts the fetch in the
    background and is answered meanwhile, so a fetch never holds a token verified before; a
    token not verified yet waits for the fetch under way, which may withdraw its key. A key gone
    from the new set is refused from then on, and the tokens remembered under it (or under a
    `kid` whose key changed) are forgotten. A `kid` not known yet fetches the set too, at most
    once every JWKS_REFETCH_SECONDS (so a stream of made-up `kid`s cannot make the service
    hammer the provider). While fetches fail, the keys of the last good one are kept, for at
    most JWKS_MAX_STALE_SECONDS after it; past that they are dropped with the tokens
    remembered, and a token whose key is not known raises KeysUnavailable, the fetch being
    tried again every JWKS_RETRY_SECONDS. A verified token is remembered until its expiry, so a
    client that sends the same token on every request pays for one signature check.
    """

    def __init__(
        self,
        jwks_url: str,
        issuer: str,
        audience: str,
        *,
        max_lifetime: int | None = None,
        fetch: Callable[[str], JwksAnswer] = fetch_url,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._jwks_url = jwks_url
        self._issuer = issuer
        self._audience = audience
        self._max_lifetime = max_lifetime
        self._fetch = fetch
        self._clock = clock
        self._monotonic = monotonic
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._fetch_failed = False
        # When the set is to be fetched again (at once: none yet); infinite while a fetch runs.
        self._stale_at = -math.inf
        # When the keys of the last good fetch are dropped if no fetch succeeds before.
        self._keys_expire_at = math.inf
        self._fetching: asyncio.Task[None] | None = None
        # token -> (remembered until, principal, kid of the key that verified it)
        self._verified: OrderedDict[str, tuple[float, Principal, str]] = OrderedDict()

    def known(self, token: str) -> Principal | None:
        # One comparison on the hot path: the fetch runs beside the request, never before it.
        if self._monotonic() >= self._stale_at:
            self._start_fetch()
        remembered = self._verified.get(token)
        if remembered is not None and self._clock() < remembered[0]:
            return remembered[1]
        return None

    async def authenticate(self, token: str) -> Principal:
        principal = self.known(token)
        if principal is not None:
            return principal
        self._verified.pop(token, None)  # expired, if there: remembered again below when good
        principal, until, kid = await self._verify(token)
        self._verified[token] = (until, principal, kid)
        if len(self._verified) > VERIFIED_TOKENS:
            self._verified.popitem(last=False)
        return principal

    async def _verify(self, token: str) -> tuple[Principal, float, str]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthFailure("malformed") from None
        algorithm, kid = header.get("alg"), header.get("kid")
        if algorithm not in JWT_ALGORITHMS:
            raise AuthFailure("algorithm")
        if not isinstance(kid, str):
            raise AuthFailure("unknown_key")
        # From the key's lookup to the token remembered nothing awaits: a fetch that withdraws
        # the key cannot end in between and miss the token.
        key = await self._key(kid)
        if key is None:
            raise AuthFailure("unknown_key")
        # The algorithm comes from the key the provider published, never from the token.
        if key.algorithm_name != algorithm:
            raise AuthFailure("algorithm")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm_name],
                audience=self._audience,
                issuer=self._issuer,
                leeway=JWT_LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as error:
            reason = next((name for kind, name in _FAILURES if isinstance(error, kind)), "invalid")
            raise AuthFailure(reason) from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not 0 < len(subject) <= 256:
            raise AuthFailure("invalid")
        # PyJWT takes a time given as a numeric string (or true) for the number it spells.
        if not all(_is_time(claims[name]) for name in _TIMES if name in claims):
            raise AuthFailure("invalid")
        if self._max_lifetime is not None and (
            "iat" not in claims or claims["exp"] - claims["iat"] > self._max_lifetime
        ):
            raise AuthFailure("lifetime")
        principal = Principal(subject, _claimed_scopes(claims))
        return principal, float(claims["exp"]) + JWT_LEEWAY_SECONDS, kid

    async def _key(self, kid: str) -> jwt.PyJWK | None:
        if self._fetching is not None:
            # The set being fetched may bring this key, or withdraw it: wait for it.
            await asyncio.shield(self._fetching)
        elif kid not in self._keys and self._may_fetch():
            self._start_fetch()
            assert self._fetching is not None
            await asyncio.shield(self._fetching)
        key = self._keys.get(kid)
        if key is None and self._fetch_failed:
            raise KeysUnavailable(max(1, math.ceil(self._pause_left())))
        return key

    def _start_fetch(self) -> None:
        if self._fetching is None:
            self._stale_at = math.inf
            self._fetching = asyncio.get_running_loop().create_task(self._fetch_keys())

    async def _fetch_keys(self) -> None:
        self._fetched_at = started = self._monotonic()
        max_age = float(JWKS_RETRY_SECONDS)
        try:
            body, cache_control = await asyncio.to_thread(self._fetch, self._jwks_url)
            keys = parse_jwks(body)
        except (OSError, ValueError) as error:
            self._fetch_failed = True
            if self._keys and started >= self._keys_expire_at:
                self._use_keys({})
                self._keys_expire_at = math.inf
                log.error(
                    "cannot fetch the JWKS, and its last keys are older than %d s: dropped, "
                    "tokens wait for the provider: %s",
                    JWKS_MAX_STALE_SECONDS,
                    error,
                )
            else:
                log.warning(
                    "cannot fetch the JWKS, keeping %d known keys: %s", len(self._keys), error
                )
        else:
            self._fetch_failed = False
            self._keys_expire_at = started + JWKS_MAX_STALE_SECONDS
            max_age = jwks_max_age(cache_control)
            self._use_keys(keys)
            log.info("JWKS fetched: %d usable keys, fetched again in %d s", len(keys), max_age)
        finally:
            # Even after an error no one expected: the set must not stay current for ever, nor
            # be used past the end of its keys without a fetch to find that out.
            self._stale_at = min(started + max_age, self._keys_expire_at)
            self._fetching = None

    def _use_keys(self, keys: dict[str, jwt.PyJWK]) -> None:
        """Takes `keys` as the set, forgetting the tokens verified by a key it withdrew."""
        withdrawn = {
            kid
            for kid, key in self._keys.items()
            if kid not in keys
            or keys[kid].key != key.key
            or keys[kid].algorithm_name != key.algorithm_name
        }
        self._keys = keys
        if not withdrawn:
            return
        forgotten = [token for token, (_, _, kid) in self._verified.items() if kid in withdrawn]
        for token in forgotten:
            del self._verified[token]
        log.warning(
            "JWKS: %d keys withdrawn (%s), %d tokens verified with them forgotten",
            len(withdrawn),
            ", ".join(sorted(printable(kid) for kid in withdrawn)),
            len(forgotten),
        )

    def _pause_left(self) -> float:
        if self._fetched_at is None:
            return 0.0
        pause = JWKS_RETRY_SECONDS if self._fetch_failed else JWKS_REFETCH_SECONDS
        return self._fetched_at + pause - self._monotonic()

    def _may_fetch(self) -> bool:
        return self._pause_left() <= 0


_TIMES = ("exp", "nbf", "iat")


def _is_time(value: Any) -> bool:
    """A JWT NumericDate: a JSON number (PyJWT has refused infinities and NaN already)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _claimed_scopes(claims: dict[str, Any]) -> frozenset[str]:
    """Scopes from `scope` (space-separated, RFC 8693) or `scp` (a list, or a string as some
    providers send it); only the ones this service knows."""
    claimed = claims.get("scope", claims.get("scp"))
    names: Iterable[Any]
    if isinstance(claimed, str):
        names = claimed.split()
    elif isinstance(claimed, list):
        names = claimed
    else:
        names = ()
    return frozenset(name for name in names if isinstance(name, str) and name in SCOPES)


# ------------------------------------------------------------------------------ brute force


class FailureLimiter:
    """Counts failed authentications per client address in fixed windows of `window` seconds;
    past `limit` in one window, the address is refused until the window ends.

    At most `max_clients` addresses are tracked: a flood of new addresses evicts the oldest
    windows, so memory stays bounded whatever the traffic.
    """

    def __init__(
        self,
        limit: int = 20,
        window: float = 60.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._clock = clock
        # address -> [window start, failures in it]
        self._clients: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def retry_after(self, client: str) -> int | None:
        """Seconds until `client` may try again, or None when it may now."""
        entry = self._clients.get(client)
        if entry is None:
            return None
        left = entry[0] + self.window - self._clock()
        if left <= 0:
            del self._clients[client]
            return None
        return math.ceil(left) if entry[1] > self.limit else None

    def failed(self, client: str) -> None:
        now = self._clock()
        entry = self._clients.get(client)
        if entry is None or now - entry[0] >= self.window:
            self._clients.pop(client, None)
            self._clients[client] = [now, 1]
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
        else:
            entry[1] += 1
