"""The bounded in-memory caches of orders to send, held compressed: whole bodies, and their
masked views."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from order_viewer.adapters.packing import ORDER_SKELETON, pack, unpack
from order_viewer.domain.masking import masked_document
from order_viewer.service.ports import ABSENT, Absent, CachedOrder, CacheTicket, etag_of

# The entries and their tags are values of the service layer (`ports`), named here too: the
# modules that hold entries import them from here.
__all__ = ["CHANGES_REMEMBERED", "CachedOrder", "OrderCache", "etag_of"]

# How many recently changed ids the cache remembers to refuse reads that began before the change;
# a read that began before the oldest remembered change is refused whole.
CHANGES_REMEMBERED = 50_000


@dataclass(frozen=True, slots=True)
class _Insertion:
    """How one kind of insertion treats the orders it brings; the three kinds share one path
    (`OrderCache._insert`), so that each keeps the rule of reads racing changes the same way."""

    # Versions the database has just committed: each replaces a cached copy, counts as a change
    # of its id (a read of it under way is not kept), and is kept while the cache is suspended
    # (it was the newest when it committed). Otherwise a copy already cached wins.
    written: bool
    # Warm-up reads the newest first: each order goes behind every one cached so far, so that it
    # is evicted before them, and the first one over a bound ends the warm-up instead of evicting.
    behind: bool


_WRITTEN = _Insertion(written=True, behind=False)
_READ = _Insertion(written=False, behind=False)
_WARMING = _Insertion(written=False, behind=True)


@dataclass(frozen=True, slots=True)
class _Held:
    """An order as the cache holds it: its body packed (`packing`), and its entity tag."""

    packed: bytes
    etag: str


class PackedOrders(NamedTuple):
    """Whole orders packed as the cache holds them, by whoever has the time: the ingest process
    packs what it committed before it sends it over, so that the serving process, which answers
    the reads, does not."""

    order_uids: list[str]
    packed: list[bytes]
    etags: list[str]

    @classmethod
    def of(cls, entries: dict[str, CachedOrder]) -> PackedOrders:
        orders = entries.values()
        return cls(
            list(entries), [pack(order.body) for order in orders], [order.etag for order in orders]
        )


class OrderCache:
    """Least-recently-used cache of orders by order_uid, bounded by a number of orders and by the
    bytes it holds of their bodies (orders run from 1 KB to over 200 KB, so a count alone bounds
    nothing).

    Bodies are held packed (`packing`), in a fraction of their memory, for one unpacked on every
    hit; callers give and get them whole, and the bound counts the bytes held. They are packed
    against the skeleton of an order, or against the `reference` a caller gives `put_written`
    and then `get` again (masked views give the body of their whole order).

    The consumer thread writes, the change listener invalidates and the HTTP event loop reads,
    so every access holds one lock; each critical section is a few dictionary operations, far
    shorter than a request: bodies are packed before it and unpacked after it.

    A database read that fills the cache may have read a version that changed while it ran. Each
    change (a write here, an invalidation heard from another instance) therefore takes a number,
    and the cache remembers the number of the last change of each recently changed id. Whoever
    asks the database takes a `ticket` first and hands it back with the answer (`fill`, `warm`,
    `put_written`): what it brings of an id changed since the ticket is not kept. The numbers
    stay inside the cache, so a caller cannot hand back a later one by mistake.

    It also remembers, up to `absent_capacity` of them (least recently asked evicted), the ids
    the database answered absent for (`fill`'s `absent`), so that asking again costs no query
    (`look_up` answers ABSENT). Such an entry is right until the id is stored, which is a change
    like any other: a write here or one heard from another instance forgets it, and a read under
    way when it happened is not kept, by the same ticket rule.

    While changes may go unheard (`suspend`), the cache answers no lookup; it keeps its entries
    for `kept` (what to serve when the database cannot be reached either) and for `verify`, which
    drops those that changed meanwhile before `resume`. The absent ids are forgotten instead: an
    id is one query to learn again, and none may be stored unheard in the meantime.
    """

    def __init__(
        self, capacity: int, max_bytes: int | None = None, absent_capacity: int = 0
    ) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.absent_capacity = absent_capacity
        self.bytes = 0
        # Set when warm-up met a bound, so that it stops reading the database.
        self.warm_full = capacity == 0
        self._entries: OrderedDict[str, _Held] = OrderedDict()
        # The ids the database answered absent for, least recently asked first (no values).
        self._absent: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._writes = 0
        self._changed: OrderedDict[str, int] = OrderedDict()
        # Reads that began before this change are refused whole: the ids they may have missed
        # are no longer remembered, or changes went unheard.
        self._floor = 0
        self._suspended = False
        self.hits = 0
        self.misses = 0
        self.absent_hits = 0
        self.evictions = 0
        self.invalidations = 0
        self.suspensions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def ticket(self) -> CacheTicket:
        """To take before the database is asked, and hand back with what it answered."""
        with self._lock:
            return CacheTicket(self._writes)

    @property
    def suspended(self) -> bool:
        """Whether the cache answers no lookup, until its entries are verified again."""
        return self._suspended

    def look_up(self, order_uid: str) -> CachedOrder | Absent | None:
        """The cached order, ABSENT for an id remembered absent, or None; each lookup counted
        once, as a hit, an absent hit or a miss (a query to come)."""
        found = self._find(order_uid)
        if found is None or found is ABSENT:
            return found
        return CachedOrder(unpack(found.packed), found.etag)

    def get(self, order_uid: str, *, reference: bytes = ORDER_SKELETON) -> CachedOrder | None:
        """The cached order, or None: for a cache that remembers no absent ids (masked views),
        whose bodies were put against `reference`."""
        found = self._find(order_uid)
        if found is None or found is ABSENT:
            return None
        return CachedOrder(unpack(found.packed, reference), found.etag)

    def _find(self, order_uid: str) -> _Held | Absent | None:
        with self._lock:
            if not self._suspended:
                entry = self._entries.get(order_uid)
                if entry is not None:
                    self._entries.move_to_end(order_uid)
                    self.hits += 1
                    return entry
                if order_uid in self._absent:
                    self._absent.move_to_end(order_uid)
                    self.absent_hits += 1
                    return ABSENT
            self.misses += 1
            return None

    @property
    def absent_entries(self) -> int:
        return len(self._absent)

    def kept(self, order_uid: str) -> CachedOrder | None:
        """The entry of an order, even while the cache is suspended: what is left to serve when
        the database cannot be reached (and then nothing can be committed there either)."""
        with self._lock:
            entry = self._entries.get(order_uid)
        return None if entry is None else CachedOrder(unpack(entry.packed), entry.etag)

    def etags(self) -> dict[str, str]:
        """The entity tag of every entry, to check against what is stored."""
        with self._lock:
            return {order_uid: entry.etag for order_uid, entry in self._entries.items()}

    def verify(self, stored_etags: dict[str, str], checked: Iterable[str]) -> int:
        """Drop the checked entries whose tag is not the stored one (`stored_etags` lacks the
        orders no longer stored); how many were dropped. An entry written since the check read
        the database may be dropped too, which costs a miss and nothing else."""
        with self._lock:
            dropped = 0
            for order_uid in checked:
                entry = self._entries.get(order_uid)
                if entry is not None and entry.etag != stored_etags.get(order_uid):
                    self._drop(order_uid)
                    dropped += 1
            self.invalidations += dropped
            return dropped

    def put_written(
        self,
        entries: dict[str, CachedOrder],
        ticket: CacheTicket | None = None,
        *,
        reference: bytes = ORDER_SKELETON,
    ) -> None:
        """Store orders the database has just committed, replacing older copies. With the
        `ticket` taken before the write began, an order changed since (another instance committed
        a newer version and it was heard) is dropped, not stored: the rule `fill` keeps to. Their
        bodies are packed against `reference`, which `get` is to be given again."""
        self._insert(_packed(entries, reference), ticket, _WRITTEN)

    def put_packed(self, orders: PackedOrders, ticket: CacheTicket | None = None) -> None:
        """`put_written` for whole orders packed already."""
        held = {
            uid: _Held(packed, etag)
            for uid, packed, etag in zip(
                orders.order_uids, orders.packed, orders.etags, strict=True
            )
        }
        self._insert(held, ticket, _WRITTEN)

    def invalidate(self, order_uids: Iterable[str]) -> None:
        """Forget these orders (stored, replaced or deleted elsewhere), and any read of them
        under way."""
        with self._lock:
            order_uids = list(order_uids)
            self._change(order_uids)
            for order_uid in order_uids:
                self.invalidations += self._drop(order_uid)

    def suspend(self) -> None:
        """Answer no lookup and keep no read until `resume`: changes may go unheard meanwhile.
        Writes of this instance are still kept (each was the newest when it committed); the
        absent ids are forgotten (any may be stored unheard)."""
        with self._lock:
            self._absent.clear()
            self._writes += 1
            self._floor = self._writes
            self._suspended = True
            self.suspensions += 1

    def resume(self) -> None:
        """Answer lookups again, once every change is heard and the entries were verified;
        reads that began before are refused."""
        with self._lock:
            self._writes += 1
            self._floor = self._writes
            self._suspended = False

    def fill(
        self, entries: dict[str, CachedOrder], ticket: CacheTicket, absent: Iterable[str] = ()
    ) -> int:
        """Keep orders read from the database, and the ids it answered `absent` for, except
        those changed since the `ticket` (the read may then be older than what is stored now); a
        copy already here wins. Returns how many orders were kept."""
        return self._insert(_packed(entries), ticket, _READ, absent)

    def warm(self, entries: dict[str, CachedOrder], ticket: CacheTicket) -> int:
        """Keep orders older than every one cached so far (warm-up reads the newest first), so
        they are evicted before them, except those changed since the `ticket`; stops when the
        cache is full, and says so in `warm_full`. Returns how many were kept."""
        return self._insert(_packed(entries), ticket, _WARMING)

    def _insert(
        self,
        entries: dict[str, _Held],
        ticket: CacheTicket | None,
        how: _Insertion,
        absent: Iterable[str] = (),
    ) -> int:
        with self._lock:
            if self._suspended and not how.written:
                return 0
            if self.absent_capacity:
                self._remember_absent(self._unchanged_since(absent, ticket))
            fresh = [(uid, entries[uid]) for uid in self._unchanged_since(entries, ticket)]
            if how.written:
                self._change(entries)
                for order_uid in entries:
                    self._drop(order_uid)
            kept = 0
            for order_uid, entry in fresh:
                if how.behind and self._full(len(entry.packed)):
                    self.warm_full = True
                    break
                # One order over the whole bound would only empty the cache and then go itself.
                if order_uid not in self._entries and self._fits(entry):
                    self._entries[order_uid] = entry
                    if how.behind:
                        self._entries.move_to_end(order_uid, last=False)
                    self.bytes += len(entry.packed)
                    kept += 1
            if not how.behind:
                self._evict()
            return kept

    def _remember_absent(self, order_uids: list[str]) -> None:
        remembered = self._absent
        for order_uid in order_uids:
            remembered[order_uid] = None
            remembered.move_to_end(order_uid)
        while len(remembered) > self.absent_capacity:
            remembered.popitem(last=False)

    def _unchanged_since(self, order_uids: Iterable[str], ticket: CacheTicket | None) -> list[str]:
        if ticket is None:
            return list(order_uids)
        if ticket.changes < self._floor:
            # Before the floor, a change of any id may be forgotten or may have gone unheard.
            return []
        changed, since = self._changed, ticket.changes
        return [uid for uid in order_uids if changed.get(uid, 0) <= since]

    def _change(self, order_uids: Iterable[str]) -> None:
        """Number a change of these ids: a read of them under way is not kept, and an id
        remembered absent is forgotten (the change may have stored it)."""
        self._writes += 1
        changed, absent = self._changed, self._absent
        for order_uid in order_uids:
            changed[order_uid] = self._writes
            changed.move_to_end(order_uid)
            absent.pop(order_uid, None)
        while len(changed) > CHANGES_REMEMBERED:
            _, forgotten = changed.popitem(last=False)
            self._floor = max(self._floor, forgotten)

    def _drop(self, order_uid: str) -> bool:
        dropped = self._entries.pop(order_uid, None)
        if dropped is None:
            return False
        self.bytes -= len(dropped.packed)
        return True

    def _full(self, more: int) -> bool:
        return len(self._entries) >= self.capacity or self._too_big(more)

    def _fits(self, entry: _Held) -> bool:
        return self.max_bytes is None or len(entry.packed) <= self.max_bytes

    def _too_big(self, more: int) -> bool:
        return self.max_bytes is not None and self.bytes + more > self.max_bytes

    def _evict(self) -> None:
        while self._entries and (len(self._entries) > self.capacity or self._too_big(0)):
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= len(evicted.packed)
            self.evictions += 1


def _packed(entries: dict[str, CachedOrder], reference: bytes = ORDER_SKELETON) -> dict[str, _Held]:
    """The entries as the cache holds them: packed by the caller's thread before the lock is
    taken, so that no reader waits for it (those that will not be kept are packed for nothing,
    rarely: a race lost, a copy already cached, the end of warm-up)."""
    return {uid: _Held(pack(entry.body, reference), entry.etag) for uid, entry in entries.items()}


def masked_etag(masked_body: bytes) -> str:
    """The tag of a masked body: a digest of the masked bytes alone, so that it tells a reader
    nothing the body does not (a tag derived from the whole order let a masked reader test
    guesses of the hidden characters offline), and every instance gives the same bytes the same
    tag. Marked apart, so no client or proxy mistakes it for the tag of a whole order."""
    return f'{etag_of(hashlib.sha256(masked_body).digest())[:-1]}-masked"'


class MaskedViews:
    """Masked orders, computed once per version of an order (keyed by the whole one's ETag) and
    kept in a bounded LRU cache of their own, so a cache hit does not mask again.

    Each is packed against its whole order's body, which is at hand whenever the view is asked
    for: all a view holds then is about the characters masked. The key, a digest of that body,
    makes it the same body each time."""

    def __init__(self, capacity: int, max_bytes: int | None) -> None:
        self._views = OrderCache(capacity, max_bytes)

    def __len__(self) -> int:
        return len(self._views)

    @property
    def bytes(self) -> int:
        return self._views.bytes

    def masked(self, whole: CachedOrder) -> CachedOrder:
        view = self._views.get(whole.etag, reference=whole.body)
        if view is None:
            body = masked_document(whole.body)
            view = CachedOrder(body, masked_etag(body))
            self._views.put_written({whole.etag: view}, reference=whole.body)
        return view
