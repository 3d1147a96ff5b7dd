"""What the probes report: ready (`/readyz`) and live (`/livez`)."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Protocol

from order_viewer.service.ingest import WriteTimeouts


class Liveness:
    """The loops that stopped moving and that the process cannot set going again by itself, each
    with the reason: `/livez` fails while there is one, so that the orchestrator restarts the
    process. A loop reports from its own thread; the event loop reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stuck: dict[str, str] = {}

    def stuck(self, part: str, reason: str) -> None:
        with self._lock:
            self._stuck[part] = reason

    def moving(self, part: str) -> None:
        with self._lock:
            self._stuck.pop(part, None)

    def not_live(self) -> dict[str, str]:
        with self._lock:
            return dict(self._stuck)


class IngestState(Protocol):
    """What the serving process knows of the ingest (`ingest_process.IngestProcess`, from what
    the ingest process last said)."""

    def consuming(self) -> bool: ...

    def write_failing(self) -> str | None:
        """Why writes are not getting through, or None while they are."""
        ...

    def stuck(self) -> dict[str, str]:
        """The ingest's loops stuck for good, each with the reason."""
        ...


class IngestHere:
    """The ingest's state in the process that runs it: what the ingest process reports."""

    def __init__(
        self, consuming: threading.Event, write_timeouts: WriteTimeouts, liveness: Liveness
    ) -> None:
        self._consuming = consuming
        self._write_timeouts = write_timeouts
        self._liveness = liveness

    def consuming(self) -> bool:
        return self._consuming.is_set()

    def write_failing(self) -> str | None:
        return self._write_timeouts.failing

    def stuck(self) -> dict[str, str]:
        return self._liveness.not_live()


class Readiness:
    """What `/readyz` reports: the database reachable and writes getting through, the change
    listener listening, the cache warmed, the consumer consuming; and what `/livez` reports, the
    parts stuck for good. The start-up and listener threads set the events, the ingest process
    says the rest, and the event loop reads them."""

    def __init__(
        self,
        database_reachable: Callable[[], Awaitable[bool]],
        listening: threading.Event,
        ingest: IngestState,
    ) -> None:
        self._database_reachable = database_reachable
        self._listening = listening
        self._ingest = ingest
        self.warmed = threading.Event()
        # Set when a start-up step or the consumer failed for good: the process is stopping.
        self.failed = threading.Event()

    async def not_ready(self) -> dict[str, str]:
        not_ready = {}
        if not await self._database_reachable():
            not_ready["database"] = "unreachable"
        elif (failing := self._ingest.write_failing()) is not None:
            not_ready["database"] = failing
        if not self._listening.is_set():
            not_ready["listener"] = "not listening for changes"
        if not self.warmed.is_set():
            not_ready["cache"] = "warming up"
        if not self._ingest.consuming():
            not_ready["consumer"] = "not consuming"
        return not_ready

    def not_live(self) -> dict[str, str]:
        return self._ingest.stuck()
