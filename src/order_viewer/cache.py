"""The bounded in-memory cache of orders, ready to send."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CachedOrder:
    """An order as the API sends it: the JSON body and its entity tag, computed once."""

    body: bytes
    etag: str

    @classmethod
    def of(cls, body: bytes, sha256: bytes) -> CachedOrder:
        return cls(body, f'"{sha256[:16].hex()}"')


class OrderCache:
    """Least-recently-used cache of orders by order_uid, bounded by a number of orders and by the
    bytes of their bodies (orders run from 1 KB to over 200 KB, so a count alone bounds nothing).

    The consumer thread writes while the HTTP event loop reads, so every access holds one lock;
    each critical section is a dictionary operation, far shorter than a request.
    """

    def __init__(self, capacity: int, max_bytes: int | None = None) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.bytes = 0
        # Set when warm-up met a bound, so that it stops reading the database.
        self.warm_full = capacity == 0
        self._entries: OrderedDict[str, CachedOrder] = OrderedDict()
        self._lock = threading.Lock()
        self._writes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def writes(self) -> int:
        """How many times the consumer has written; a reader that fills the cache after a
        database read compares it before and after, so it never puts back an older version."""
        return self._writes

    def get(self, order_uid: str) -> CachedOrder | None:
        with self._lock:
            entry = self._entries.get(order_uid)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(order_uid)
            self.hits += 1
            return entry

    def put_written(self, entries: dict[str, CachedOrder]) -> None:
        """Store orders the database has just committed, replacing older copies."""
        with self._lock:
            self._writes += 1
            for order_uid, entry in entries.items():
                replaced = self._entries.pop(order_uid, None)
                if replaced is not None:
                    self.bytes -= len(replaced.body)
                # One order over the whole bound would only empty the cache and then go itself.
                if self._fits(entry):
                    self._entries[order_uid] = entry
                    self.bytes += len(entry.body)
            self._evict()

    def fill(self, entries: dict[str, CachedOrder], writes_before_read: int) -> int:
        """Keep orders read from the database, unless the consumer wrote since the read began
        (the read may then be older than what the consumer stored); a copy already here wins.
        Returns how many were kept."""
        with self._lock:
            if self._writes != writes_before_read:
                return 0
            kept = 0
            for order_uid, entry in entries.items():
                if order_uid not in self._entries and self._fits(entry):
                    self._entries[order_uid] = entry
                    self.bytes += len(entry.body)
                    kept += 1
            self._evict()
            return kept

    def warm(self, entries: dict[str, CachedOrder]) -> int:
        """Keep orders older than every one cached so far (warm-up reads the newest first), so
        they are evicted before them; stops when the cache is full, and says so in `warm_full`.
        Returns how many were kept."""
        with self._lock:
            kept = 0
            for order_uid, entry in entries.items():
                if self._full(len(entry.body)):
                    self.warm_full = True
                    break
                if order_uid not in self._entries:
                    self._entries[order_uid] = entry
                    self._entries.move_to_end(order_uid, last=False)
                    self.bytes += len(entry.body)
                    kept += 1
            return kept

    def _full(self, more: int) -> bool:
        return len(self._entries) >= self.capacity or self._too_big(more)

    def _fits(self, entry: CachedOrder) -> bool:
        return self.max_bytes is None or len(entry.body) <= self.max_bytes

    def _too_big(self, more: int) -> bool:
        return self.max_bytes is not None and self.bytes + more > self.max_bytes

    def _evict(self) -> None:
        while self._entries and (len(self._entries) > self.capacity or self._too_big(0)):
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= len(evicted.body)
            self.evictions += 1
