"""Waiting out transient failures: capped exponential backoff, each state change logged once."""

from __future__ import annotations

import logging
import random
import threading


class Backoff:
    """Delays of 0.1 s doubling up to a cap, with jitter so that instances do not retry in step."""

    def __init__(self, cap_seconds: float, stop: threading.Event) -> None:
        self._cap = cap_seconds
        self._stop = stop
        self._delay = 0.1

    def wait(self) -> bool:
        """Sleep for the next delay; False when a stop was requested meanwhile."""
        delay = min(self._delay, self._cap) * random.uniform(0.8, 1.2)
        self._delay = min(self._delay * 2, self._cap)
        return not self._stop.wait(delay)


class Health:
    """Logs a dependency going away and coming back once each, however many retries lie between."""

    def __init__(self, name: str, log: logging.Logger) -> None:
        self._name = name
        self._log = log
        self.failing = False

    def failed(self, reason: str) -> None:
        if not self.failing:
            self.failing = True
            self._log.warning("%s unavailable, retrying: %s", self._name, reason)

    def recovered(self) -> None:
        if self.failing:
            self.failing = False
            self._log.info("%s recovered", self._name)
