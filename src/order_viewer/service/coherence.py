"""This instance's cache kept in step with what the other instances commit (`CacheCoherence`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from functools import partial

from order_viewer.service.ports import (
    Cache,
    DatabaseUnavailable,
    ServiceMetrics,
    Stopped,
    StoredVersions,
    etag_of,
)
from order_viewer.service.retry import Health, Patience, retry

log = logging.getLogger(__name__)


class CacheCoherence:
    """Keeps this instance's cache in step with what the other instances commit (the `Changes`
    the change listener reports): a replaced or deleted order is dropped from the cache, a new
    one is no longer remembered as absent, and any read of either under way is not kept.

    While changes cannot be heard, the cache answers nothing (every lookup reads the database,
    or, if that cannot be reached either, gets what the cache kept) and forgets the ids it knew
    absent. Once the listener listens again, every cached entry is checked against the stored
    version's digest, those that changed meanwhile are dropped, and only then does the cache
    answer again; this runs beside the listener (`in_background`), so changes are heard while it
    reads.
    """

    def __init__(
        self,
        cache: Cache,
        metrics: ServiceMetrics,
        stored_versions: StoredVersions,
        database: Patience,
        in_background: Callable[[Callable[[], object]], object],
    ) -> None:
        self._cache = cache
        self._metrics = metrics
        self._stored_versions = stored_versions
        self._database = database
        self._in_background = in_background
        self.listening_now = threading.Event()
        self._lock = threading.Lock()
        # Nothing is answered before the first LISTEN (a copy kept before could change unheard):
        # the start counts as a loss, so the first `listening` resumes the way any other does.
        cache.suspend()
        self._losses = 1
        # Failures of the check that are not the database being away (retried all the same).
        self._check = Patience(
            Health("the cache check", log), database.stop, database.max_backoff_seconds
        )

    def changed(self, order_uids: Sequence[str]) -> None:
        self._cache.invalidate(order_uids)
        self._metrics.heard_changes(len(order_uids))

    def lost(self) -> None:
        with self._lock:
            self._losses += 1
            self._cache.suspend()
        self.listening_now.clear()
        self._metrics.listener_state(listening=False)
        log.warning(
            "the change listener lost its connection: the cache answers nothing until it is "
            "listening again and the cached orders are checked"
        )

    def listening(self) -> None:
        self.listening_now.set()
        self._metrics.listener_state(listening=True)
        self._resume_checked()

    def recheck(self) -> None:
        """Check every cached entry against what is stored, as after a loss of the listener:
        for when this instance's own writes may have gone untold (its ingest process ended
        between a commit and telling the cache)."""
        with self._lock:
            self._losses += 1
            self._cache.suspend()
        log.warning(
            "the ingest process ended: the cache answers nothing until the cached orders are "
            "checked against the database"
        )
        if self.listening_now.is_set():
            self._resume_checked()

    def _resume_checked(self) -> None:
        with self._lock:
            losses = self._losses
            if len(self._cache) == 0:
                # Nothing cached (at start, say): nothing to check.
                self._cache.resume()
                return
        self._in_background(partial(self._verify, losses))

    def _verify(self, losses: int) -> None:
        """Check the cached entries and let the cache answer again; the check is retried until
        it succeeds, a stop comes or the listener is lost again (whose reconnection checks
        anew): a cache left suspended for good would read the database for every lookup."""

        def attempt() -> tuple[int, int] | None:
            if self._lost_since(losses):
                return None
            etags = self._cache.etags()
            try:
                stored = retry(
                    partial(self._stored_versions, list(etags)),
                    transient=(DatabaseUnavailable,),
                    patience=self._database,
                )
            except Stopped:
                raise
            except Exception as error:
                raise _CheckFailed(f"{type(error).__name__}: {error}") from error
            stored_etags = {uid: etag_of(sha) for uid, sha in stored.items()}
            return len(etags), self._cache.verify(stored_etags, etags)

        checked = retry(attempt, transient=(_CheckFailed,), patience=self._check)
        with self._lock:
            if checked is None or self._losses != losses:
                return  # lost again meanwhile: the next reconnection checks again
            self._cache.resume()
        log.info(
            "the change listener is listening again: %d cached orders checked, %d had changed "
            "and were dropped; the cache answers again",
            *checked,
        )

    def _lost_since(self, losses: int) -> bool:
        with self._lock:
            return self._losses != losses


class _CheckFailed(Exception):
    """The cache check failed for another reason than the database being away."""
