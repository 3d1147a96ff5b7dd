"""JWTs of an identity provider: its key set (JWKS) fetched and kept, and the tokens verified
with it and remembered."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import logging
import math
import re
import socket
import ssl
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import jwt

from order_viewer.adapters.http.auth import SCOPES, AuthFailure, KeysUnavailable, Principal
from order_viewer.adapters.logs import escaped_for_log

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

log = logging.getLogger(__name__)

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
            ", ".join(sorted(escaped_for_log(kid) for kid in withdrawn)),
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
