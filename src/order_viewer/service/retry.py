"""Waiting out transient failures: one stop-aware retry with capped exponential backoff, and one
health record per dependency that logs each outage and recovery once."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from order_viewer.service.ports import Stopped

T = TypeVar("T")

FIRST_DELAY_SECONDS = 0.1


class Health:
    """The state of one dependency (the database, the broker), shared by every part that uses
    it: an outage is logged once when the first part sees it and a recovery once when one gets
    through, however many parts and retries lie between."""

    def __init__(self, name: str, log: logging.Logger) -> None:
        self.name = name
        self._log = log
        self._lock = threading.Lock()
        self._failing = False

    def failed(self, reason: str) -> None:
        with self._lock:
            if self._failing:
                return
            self._failing = True
        self._log.warning("%s unavailable, retrying: %s", self.name, reason)

    def recovered(self) -> None:
        with self._lock:
            if not self._failing:
                return
            self._failing = False
        self._log.info("%s recovered", self.name)


@dataclass(frozen=True, slots=True)
class Patience:
    """How to wait for one dependency: whose health to report, the stop that ends the waiting,
    and the longest pause between two attempts."""

    health: Health
    stop: threading.Event
    max_backoff_seconds: float


def retry(
    attempt: Callable[[], T],
    *,
    transient: tuple[type[BaseException], ...],
    patience: Patience,
    on_retry: Callable[[], object] = lambda: None,
) -> T:
    """`attempt()` until it returns, waiting out the `transient` errors: 0.1 s doubling up to the
    cap, with jitter so that instances do not retry in step. Any other error goes to the caller.
    Raises Stopped when the stop is set while waiting, so that a shutdown never waits for a
    dependency to come back."""
    delay = FIRST_DELAY_SECONDS
    cap = patience.max_backoff_seconds
    while True:
        try:
            result = attempt()
        except transient as error:
            patience.health.failed(_first_line(error))
            on_retry()
            if patience.stop.wait(min(delay, cap) * random.uniform(0.8, 1.2)):
                raise Stopped from error
            delay = min(delay * 2, cap)
            continue
        patience.health.recovered()
        return result


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
