"""Who may read what: the principal a bearer token stands for and its scopes, the authenticator
every kind of token answers to, and the checks of the header and the mode both kinds share. The
kinds are beside it: `tokens` (a file of token digests), `jwt` (an identity provider's JWTs and its
key set), and `limiter` (failed authentications per client)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from order_viewer.adapters.logs import escaped_for_log
from order_viewer.config import is_loopback

ORDERS_READ = "orders:read"
ORDERS_READ_PII = "orders:read:pii"
METRICS_READ = "metrics:read"
# What became of an order's messages: no personal data, but who asked about which order is
# itself worth a scope of its own (support, not every reader).
ORDERS_TRAIL = "orders:trail"
SCOPES = frozenset({ORDERS_READ, ORDERS_READ_PII, METRICS_READ, ORDERS_TRAIL})

# A JWT with a few claims is under 1 KB; anything far larger is not one we issued.
MAX_TOKEN_CHARS = 8192


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated client: its name (token-file name or JWT `sub`) and its scopes."""

    name: str
    scopes: frozenset[str]
    # As the audit line writes it, escaped once rather than on every read.
    logged_name: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "logged_name", escaped_for_log(self.name))

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
