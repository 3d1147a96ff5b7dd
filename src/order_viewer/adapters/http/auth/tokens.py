"""Bearer tokens of HTTP_TOKENS_FILE: the file's lines parsed, and the tokens they admit."""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from order_viewer.adapters.http.auth import SCOPES, AuthFailure, Principal

log = logging.getLogger(__name__)

_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
# Token-file lookups go by this many hex digits of the digest, then compare it whole.
_PREFIX = 8


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
