"""How the PostgreSQL adapters meet the database: psycopg's errors as the ports say them, and the
connection of a part of its own (keepalives, a watchdog that cuts a call past its deadline)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypedDict

import psycopg
from psycopg_pool import PoolTimeout

from order_viewer.service.ports import (
    DatabaseBusy,
    DatabaseUnavailable,
)

# SQLSTATE classes that mean "try again": connection exceptions, resource shortage, operator
# intervention (shutdown, crash recovery), and the transaction rollbacks (serialization, deadlock).
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "40")


def is_transient(error: psycopg.Error) -> bool:
    if isinstance(error, psycopg.OperationalError | psycopg.InterfaceError):
        return True
    return error.sqlstate is not None and error.sqlstate.startswith(_TRANSIENT_SQLSTATE_CLASSES)


# Resource shortage and a statement timeout: the server is up, only too busy to answer.
_BUSY_SQLSTATE_CLASS = "53"
_QUERY_CANCELED = "57014"


def unavailable(error: psycopg.Error) -> DatabaseUnavailable:
    """What a transient error says to the service: busy if the server is up and answering
    others, unavailable otherwise."""
    sqlstate = error.sqlstate or ""
    busy = (
        isinstance(error, PoolTimeout)
        or sqlstate.startswith(_BUSY_SQLSTATE_CLASS)
        or sqlstate == _QUERY_CANCELED
    )
    return (DatabaseBusy if busy else DatabaseUnavailable)(str(error).strip())


@contextlib.contextmanager
def database_errors(
    *,
    reset: Callable[[], object] = lambda: None,
    refused: Callable[[psycopg.Error], Exception] | None = None,
) -> Iterator[None]:
    """psycopg's errors as the ports say them: a transient one is DatabaseUnavailable (or
    DatabaseBusy), after `reset` so that the next attempt connects anew; any other is
    `refused(error)` if given, else raised as it is."""
    try:
        yield
    except psycopg.Error as error:
        if is_transient(error):
            reset()
            raise unavailable(error) from error
        if refused is None:
            raise
        raise refused(error) from error


class _Keepalives(TypedDict):
    keepalives: int
    keepalives_idle: int
    keepalives_interval: int
    keepalives_count: int


# A peer that vanished without closing the connection (a network cut, its machine gone) is
# noticed in seconds, not after the system's two-hour keepalive default.
KEEPALIVES = _Keepalives(keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=2)


class Unanswered(psycopg.OperationalError):
    """The server did not answer a call within its deadline, so its connection was cut."""


@dataclass(eq=False, slots=True)
class _Watched:
    deadline: float
    # A duplicate of the connection's socket: shutting it down acts on the socket both share,
    # even if psycopg has closed its own descriptor (whose number may be reused) meanwhile.
    socket: socket.socket
    cut: bool = False


class _Watchdog:
    """Cuts the connection of a call that outlives its deadline.

    A server that accepts connections but answers nothing (its processes stopped, its machine
    frozen) cannot enforce its own timeouts, and its kernel still acknowledges TCP, so neither
    libpq's keepalives nor tcp_user_timeout notice it: a query to a SIGSTOPped PostgreSQL waited
    for as long as it was stopped. Shutting the socket down from another thread wakes the waiting
    call with the connection lost (psycopg waits in short polls), as `Unanswered`, and the
    connection is closed. One thread serves every watched call of the process, asleep until the
    earliest deadline; watching costs a call a descriptor duplicated and a lock taken twice."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._watched: set[_Watched] = set()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(
        self, connection: psycopg.Connection[tuple[object, ...]], seconds: float
    ) -> Iterator[None]:
        watched = _Watched(
            time.monotonic() + seconds, socket.socket(fileno=os.dup(connection.pgconn.socket))
        )
        with self._condition:
            self._watched.add(watched)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._cut_overdue, name="connection-watchdog", daemon=True
                )
                self._thread.start()
            self._condition.notify()
        try:
            yield
        except psycopg.Error as error:
            if watched.cut:
                raise Unanswered(f"no answer from PostgreSQL within {seconds:g} s") from error
            raise
        finally:
            with self._condition:
                self._watched.discard(watched)
            watched.socket.close()
            if watched.cut:
                # Cut as the call ended, it may have ended well: the connection is unusable all
                # the same.
                connection.close()

    def _cut_overdue(self) -> None:
        with self._condition:
            while True:
                now = time.monotonic()
                for watched in [w for w in self._watched if w.deadline <= now]:
                    self._watched.discard(watched)
                    watched.cut = True
                    with contextlib.suppress(OSError):
                        watched.socket.shutdown(socket.SHUT_RDWR)
                earliest = min((w.deadline for w in self._watched), default=None)
                self._condition.wait(None if earliest is None else earliest - now)


WATCHDOG = _Watchdog()


class DedicatedConnection:
    """One connection kept for one writing part, made again (and `prepare`d) when it was closed
    or broke."""

    def __init__(
        self,
        database_url: str,
        name: str,
        prepare: Callable[[psycopg.Connection[tuple[object, ...]]], object] = lambda _: None,
    ) -> None:
        self._database_url = database_url
        self._name = name
        self._prepare = prepare
        self._connection: psycopg.Connection[tuple[object, ...]] | None = None

    def get(self) -> psycopg.Connection[tuple[object, ...]]:
        if self._connection is None or self._connection.closed or self._connection.broken:
            connection = psycopg.connect(
                self._database_url,
                autocommit=True,
                connect_timeout=5,
                application_name=self._name,
                **KEEPALIVES,
            )
            self._prepare(connection)
            self._connection = connection
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
