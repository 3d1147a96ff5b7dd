"""The ingest in a process of its own beside the serving one, so that the two do not share an
interpreter lock (docs/DESIGN.md, "Reads and writes in two processes").

The two talk over two pipes the serving process makes for each ingest process it starts:

- tickets: the ingest process asks for a cache ticket before each write and waits for it (one
  round trip a batch), then the serving process says `go` once its cache is warm;
- events: the ingest process sends what each write committed (`written`: the bodies, packed as
  the cache holds them, with the ticket; `invalidated`: ids), in the order it committed them,
  and every STATUS_SECONDS its status (`IngestStatus`: its metrics, whether it consumes, why
  writes fail, what is stuck).

So the serving process's cache takes the ingest's writes exactly as it took them when both ran in
one process: the same ticket rule, the same order. Both processes share one instance id, so the
change listener skips these writes' notifications as before. What the serving process cannot
see is a write committed by an ingest process that ended before saying so: every end it did not
ask for makes it check its cache against the database (`IngestProcess.run`'s `recheck`).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from prometheus_client.metrics_core import Metric

from order_viewer.adapters.cache import OrderCache, PackedOrders
from order_viewer.adapters.metrics import combined
from order_viewer.service.ports import CachedOrder, CacheTicket

log = logging.getLogger(__name__)

# How often the ingest process says its status: the delay of its metrics and readiness as the
# serving process reports them.
STATUS_SECONDS = 0.1
# An ingest process that says nothing for this long is stuck: it is killed, and another started.
# Its status is sent by a thread of its own, so only a process that no longer runs Python goes
# silent.
SILENT_SECONDS = 30.0
# The exit status of an ingest process that cannot go on (a start-up step or the consumer failed
# for good, the reason logged): the service stops with it, as it did when both were one process.
CANNOT_GO_ON = 1
# The first wait before an ingest process that ended unasked is started again; it doubles up to
# the longest backoff of the service's retries.
FIRST_RESTART_SECONDS = 1.0
_GO = b"go"
# prctl(2)'s option that names the signal a process gets when its parent ends.
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class IngestStatus:
    """What the ingest process says of itself every STATUS_SECONDS."""

    families: list[Metric]
    consuming: bool
    write_failing: str | None
    stuck: dict[str, str] = field(default_factory=dict)


class IngestFailed(Exception):
    """The ingest process could not go on (its log says why)."""


class IngestLink:
    """The ingest process's end of the link (`WrittenOrders` for the ingest): tickets asked of
    the serving process's cache, committed writes told to it, the status reported. Once the
    serving process is gone (a pipe broken), `stop` is set and the rest is not sent: there is no
    cache left to keep, and the batches under way end as in any stop."""

    def __init__(self, tickets: Connection, events: Connection, stop: threading.Event) -> None:
        self._tickets = tickets
        self._events = events
        self._stop = stop
        self._ticket_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._gone = False

    def wait_for_go(self) -> bool:
        """Wait until the serving process's cache is warm; False if a stop comes first."""
        while not self._stop.is_set():
            try:
                if self._tickets.poll(0.2):
                    return self._tickets.recv_bytes() == _GO
            except (EOFError, OSError):
                self._lost()
        return False

    def ticket(self) -> CacheTicket:
        # The writers' threads ask one at a time: each answer is read by whoever asked.
        with self._ticket_lock:
            if not self._gone:
                try:
                    self._tickets.send_bytes(b"")
                    return CacheTicket(int(self._tickets.recv_bytes()))
                except (EOFError, OSError):
                    self._lost()
        return CacheTicket(0)

    def put_written(
        self, entries: dict[str, CachedOrder], ticket: CacheTicket | None = None
    ) -> None:
        # Packed here, where the cache's CPU is not the reads' (half the bytes to send, too).
        packed = PackedOrders.of(entries)
        self._send(("written", packed, None if ticket is None else ticket.changes))

    def invalidate(self, order_uids: Iterable[str]) -> None:
        self._send(("invalidated", list(order_uids)))

    def report(self, status: IngestStatus) -> None:
        self._send(("status", status))

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            if self._gone:
                return
            try:
                self._events.send(message)
            except OSError:
                self._lost()

    def _lost(self) -> None:
        if not self._gone:
            self._gone = True
            log.warning("the serving process is gone: the ingest process stops")
            self._stop.set()


def die_with_the_serving_process() -> None:
    """Have the kernel kill this process (SIGKILL) when the thread of the serving process that
    started it ends, as the serving process's crash would end both if they were one process: an
    ingest process left on its own would consume unseen, unstoppable by the service's restart.
    Linux only (prctl); elsewhere a broken pipe stops it at its next status (`IngestLink`)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        log.warning(
            "cannot ask to die with the serving process: %s", os.strerror(ctypes.get_errno())
        )
    elif (parent := multiprocessing.parent_process()) is not None and os.getppid() != parent.pid:
        # The serving process ended before the request was made.
        os.kill(os.getpid(), signal.SIGKILL)


def report_status(
    link: IngestLink, status: Callable[[], IngestStatus], stop: threading.Event
) -> None:
    """Report `status` every STATUS_SECONDS until the stop, and once more after it."""
    while not stop.wait(STATUS_SECONDS):
        link.report(status())
    link.report(status())


class IngestProcess:
    """The serving process's end: starts the ingest process (`target(*args, tickets, events)`,
    run in a new interpreter), answers its tickets from `cache`, applies its writes to it, and
    keeps its last status for the probes and `/metrics` (`IngestState`)."""

    def __init__(
        self,
        target: Callable[..., None],
        args: tuple[Any, ...],
        cache: OrderCache,
        max_backoff_seconds: float,
    ) -> None:
        self._target = target
        self._args = args
        self._cache = cache
        self._max_backoff = max_backoff_seconds
        self._context = multiprocessing.get_context("spawn")
        self._status: IngestStatus | None = None
        self._heard = time.monotonic()
        # The counters of the ingest processes that ended: added to the current one's, so that
        # the exposed counters never go back.
        self._ended: list[Metric] = []
        self._lock = threading.Lock()
        self.restarts = 0

    # What the probes read (`readiness.IngestState`).

    def consuming(self) -> bool:
        status = self._status
        return status is not None and status.consuming

    def write_failing(self) -> str | None:
        status = self._status
        return None if status is None else status.write_failing

    def stuck(self) -> dict[str, str]:
        status = self._status
        return {} if status is None else dict(status.stuck)

    def families(self) -> list[Metric]:
        """The ingest's metrics: those of the ingest processes that ended, and the current's."""
        with self._lock:
            status = self._status
            return combined(self._ended, [] if status is None else status.families)

    def run(
        self, stop: threading.Event, warm: threading.Event, recheck: Callable[[], object]
    ) -> None:
        """Keep an ingest process running until the stop, then stop it (SIGTERM) and wait for
        its end; each consumes once the cache is `warm` (it starts before, to be ready sooner).
        One that ends unasked, or is killed for saying nothing for SILENT_SECONDS, is started
        again after a backoff, once `recheck` was called; one that ends with CANNOT_GO_ON raises
        IngestFailed."""
        backoff = FIRST_RESTART_SECONDS
        while True:
            exit_code = self._run_one(stop, warm)
            if stop.is_set():
                if exit_code:
                    log.warning("the ingest process ended with status %d", exit_code)
                return
            if exit_code == CANNOT_GO_ON:
                raise IngestFailed("the ingest process could not go on")
            how = f"on signal {-exit_code}" if exit_code < 0 else f"with status {exit_code}"
            log.error(
                "the ingest process ended unasked (%s): starting another in %.0f s",
                how,
                backoff,
            )
            recheck()
            if stop.wait(backoff):
                return
            backoff = min(backoff * 2, self._max_backoff)
            self.restarts += 1

    def _run_one(self, stop: threading.Event, warm: threading.Event) -> int:
        tickets, tickets_there = self._context.Pipe(duplex=True)
        events, events_there = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=self._target,
            args=(*self._args, tickets_there, events_there),
            name="order-viewer-ingest",
        )
        process.start()
        # Only the ingest process holds these ends now: its end is each pipe's end of file here.
        tickets_there.close()
        events_there.close()
        self._heard = time.monotonic()
        answering = threading.Thread(
            target=self._answer_tickets, args=(tickets, stop, warm), name="ingest-tickets"
        )
        applying = threading.Thread(target=self._apply_events, args=(events,), name="ingest-events")
        answering.start()
        applying.start()
        try:
            while process.is_alive():
                if stop.wait(0.2):
                    process.terminate()
                    break
                silent = time.monotonic() - self._heard
                if self._status is not None and silent >= SILENT_SECONDS:
                    log.error("the ingest process has said nothing for %.0f s: killing it", silent)
                    process.kill()
                    break
            process.join()
        finally:
            answering.join()
            applying.join()
            tickets.close()
            events.close()
            with self._lock:
                if self._status is not None:
                    self._ended = combined(
                        self._ended, [f for f in self._status.families if f.type != "gauge"]
                    )
                self._status = None
        assert process.exitcode is not None
        return process.exitcode

    def _answer_tickets(
        self, tickets: Connection, stop: threading.Event, warm: threading.Event
    ) -> None:
        # The ingest process waits for `go` before it asks anything.
        while not warm.wait(0.2):
            if stop.is_set():
                return
        try:
            tickets.send_bytes(_GO)
            while True:
                tickets.recv_bytes()
                tickets.send_bytes(str(self._cache.ticket().changes).encode())
        except (EOFError, OSError):
            return

    def _apply_events(self, events: Connection) -> None:
        cache = self._cache
        while True:
            try:
                message = events.recv()
            except (EOFError, OSError):
                return
            kind = message[0]
            if kind == "written":
                _, packed, changes = message
                cache.put_packed(packed, None if changes is None else CacheTicket(changes))
            elif kind == "invalidated":
                cache.invalidate(message[1])
            else:
                self._status = message[1]
                self._heard = time.monotonic()
