from __future__ import annotations

import hashlib
import random
import string
import threading
from typing import Any

import pytest

from order_viewer.adapters import cache as cache_module
from order_viewer.adapters.cache import CachedOrder, MaskedViews, OrderCache, masked_etag
from order_viewer.adapters.packing import pack
from order_viewer.domain.masking import masked_document
from order_viewer.domain.model import MAX_ITEMS, order_json, parse_order
from order_viewer.entrypoints.generate import encode, make_order
from order_viewer.service.ports import ABSENT


def entry(text: str) -> CachedOrder:
    return CachedOrder.of(text.encode(), text.encode().ljust(32, b"\0"))


def api_body(order: dict[str, Any]) -> bytes:
    """An order's body as the API sends it."""
    return order_json(parse_order(encode(order)))


def held(text: str) -> int:
    """The bytes the cache holds of the body `text`, packed: what its bound counts."""
    return len(pack(text.encode()))


def absent(cache: OrderCache, order_uid: str) -> bool:
    """Whether the cache answers the id as absent (a lookup, counted as one)."""
    return cache.look_up(order_uid) is ABSENT


def test_least_recently_used_is_evicted_first() -> None:
    cache = OrderCache(capacity=2)
    cache.put_written({"a": entry("a"), "b": entry("b")})
    assert cache.get("a") == entry("a")  # "b" is now the least recently used
    cache.put_written({"c": entry("c")})
    assert cache.get("b") is None
    assert cache.get("a") == entry("a")
    assert cache.get("c") == entry("c")
    assert len(cache) == 2
    assert cache.evictions == 1
    assert (cache.hits, cache.misses) == (3, 1)


def test_a_written_order_replaces_its_cached_copy() -> None:
    cache = OrderCache(capacity=10)
    cache.put_written({"a": entry("old")})
    cache.put_written({"a": entry("new")})
    assert cache.get("a") == entry("new")


def test_orders_packed_elsewhere_are_held_as_if_written_whole_with_the_same_ticket_rule() -> None:
    bodies = {
        uid: CachedOrder.of(api_body(make_order(random.Random(n))), bytes(32))
        for n, uid in enumerate("abc")
    }
    packed, whole = OrderCache(capacity=10), OrderCache(capacity=10)
    ticket = packed.ticket()
    assert whole.ticket() == ticket
    # "c" changed (another instance's write, heard) after the ticket was taken.
    for cache in (packed, whole):
        cache.invalidate(["c"])
    packed.put_packed(cache_module.PackedOrders.of(bodies), ticket)
    whole.put_written(bodies, ticket)
    for uid in "ab":
        assert packed.get(uid) == whole.get(uid) == bodies[uid]
    assert packed.get("c") is whole.get("c") is None
    assert packed.bytes == whole.bytes == sum(len(pack(bodies[uid].body)) for uid in "ab")


def test_fill_never_overwrites_and_yields_to_a_concurrent_write() -> None:
    cache = OrderCache(capacity=10)
    cache.put_written({"a": entry("new")})
    assert cache.fill({"a": entry("old")}, cache.ticket()) == 0
    assert cache.get("a") == entry("new")

    before_read = cache.ticket()
    # The consumer committed "c" and "b" while the read of "c" and "d" was under way, and "c"
    # was evicted since (or never fitted): what the read found of "c" may be older.
    cache.put_written({"b": entry("b"), "c": entry("new c")})
    cache.invalidate(["c"])
    assert cache.fill({"c": entry("c"), "d": entry("d")}, before_read) == 1
    assert cache.get("c") is None
    assert cache.get("d") == entry("d")
    assert cache.fill({"c": entry("c")}, cache.ticket()) == 1
    assert cache.get("c") == entry("c")


def test_capacity_zero_keeps_nothing() -> None:
    cache = OrderCache(capacity=0)
    cache.put_written({"a": entry("a")})
    assert cache.get("a") is None


def test_etag_is_a_quoted_digest_prefix() -> None:
    cached = CachedOrder.of(b"{}", bytes(range(32)))
    assert cached.etag == '"000102030405060708090a0b0c0d0e0f"'


def test_concurrent_writers_and_readers_keep_the_bound() -> None:
    cache = OrderCache(capacity=100)

    def write(prefix: str) -> None:
        for number in range(2000):
            cache.put_written({f"{prefix}{number}": entry(str(number))})

    def read() -> None:
        for number in range(2000):
            cache.get(f"w{number}")

    threads = [threading.Thread(target=write, args=(p,)) for p in "wxy"]
    threads += [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cache) == 100
    assert cache.evictions == 3 * 2000 - 100


def test_warm_up_keeps_the_newest_most_recently_used_and_stops_when_full() -> None:
    cache = OrderCache(capacity=3)
    cache.put_written({"written": entry("written")})
    # Warm-up reads newest first; "written" (stored since) must outlive all of them.
    assert cache.warm({"new": entry("new"), "written": entry("old copy")}, cache.ticket()) == 1
    assert cache.warm({"older": entry("older"), "oldest": entry("oldest")}, cache.ticket()) == 1
    assert cache.get("written") == entry("written")
    assert cache.get("oldest") is None
    cache.put_written({"next": entry("next")})
    assert cache.get("older") is None  # the oldest goes first
    assert cache.get("new") == entry("new")


def test_the_bytes_held_bound_the_cache_as_well_as_the_count() -> None:
    four, two = held("aaaa"), held("bb")  # the bytes held of a body of four characters, of two
    cache = OrderCache(capacity=100, max_bytes=2 * four + two)
    cache.put_written({"a": entry("aaaa"), "b": entry("bbbb")})
    assert cache.bytes == 2 * four
    cache.put_written({"c": entry("cccc")})  # 3 * four: the least recently used goes
    assert cache.get("a") is None
    assert (cache.bytes, len(cache), cache.evictions) == (2 * four, 2, 1)
    cache.put_written({"b": entry("bb")})  # a replaced copy counts its own size only
    assert cache.bytes == four + two
    assert cache.fill({"d": entry("dddd")}, cache.ticket()) == 1
    assert cache.bytes == 2 * four + two  # the bound itself
    assert [cache.get(uid) for uid in "bcd"] == [entry("bb"), entry("cccc"), entry("dddd")]


def test_the_bytes_counted_and_bounded_are_those_held_packed_not_the_bodies() -> None:
    rng = random.Random(24)
    first, second, third = (CachedOrder.of(api_body(make_order(rng)), bytes(32)) for _ in "abc")
    # Room for two orders packed, less than one body whole.
    bound = len(pack(first.body)) + len(pack(second.body))
    assert bound < len(first.body)
    cache = OrderCache(capacity=10, max_bytes=bound)
    cache.put_written({"a": first, "b": second})
    assert (cache.bytes, len(cache), cache.evictions) == (bound, 2, 0)
    cache.put_written({"c": third})  # over the bound: the least recently used goes
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (None, second, third)
    assert cache.bytes == len(pack(second.body)) + len(pack(third.body))
    cache.invalidate(["b", "c"])
    assert cache.bytes == 0


def test_an_order_larger_than_the_byte_bound_is_not_kept_and_evicts_nothing() -> None:
    bound = held("aaaa") + held("old")
    cache = OrderCache(capacity=100, max_bytes=bound)
    # Characters LZ4 finds no repeat in, each held in a byte or more.
    huge, other = string.ascii_letters, string.ascii_uppercase + string.digits
    assert min(held(huge), held(other)) > bound
    cache.put_written({"a": entry("aaaa"), "huge": entry("old")})
    cache.put_written({"huge": entry(huge)})
    assert cache.get("huge") is None  # nor its older copy
    assert cache.get("a") == entry("aaaa")
    assert (cache.bytes, len(cache), cache.evictions) == (held("aaaa"), 1, 0)
    assert cache.fill({"other": entry(other)}, cache.ticket()) == 0


def test_warm_up_stops_at_the_byte_bound_and_says_the_cache_is_full() -> None:
    four, two = held("aaaa"), held("dd")
    cache = OrderCache(capacity=100, max_bytes=2 * four + two)
    assert not cache.warm_full
    assert cache.warm({"a": entry("aaaa"), "b": entry("bbbb")}, cache.ticket()) == 2
    assert not cache.warm_full
    # "c" is over the bound: warm-up ends there, though "d" would still fit.
    assert cache.warm({"c": entry("cccc"), "d": entry("dd")}, cache.ticket()) == 0
    assert cache.warm_full
    assert cache.bytes == 2 * four


def test_warm_up_says_the_cache_is_full_at_its_count() -> None:
    cache = OrderCache(capacity=2)
    assert cache.warm({"a": entry("a"), "b": entry("b")}, cache.ticket()) == 2
    assert not cache.warm_full  # nothing was left out yet
    assert cache.warm({"c": entry("c")}, cache.ticket()) == 0
    assert cache.warm_full
    assert OrderCache(capacity=0).warm_full


def test_a_write_overtaken_by_a_change_heard_before_it_is_cached_is_dropped() -> None:
    cache = OrderCache(capacity=10)
    cache.put_written({"a": entry("a0"), "b": entry("b0")})
    before_write = cache.ticket()
    # Our write committed a1 and b1; another instance committed a2 right after, and our
    # listener heard it before our writer came back to cache what it wrote.
    cache.invalidate(["a"])
    cache.put_written({"a": entry("a1"), "b": entry("b1")}, before_write)
    assert cache.get("a") is None
    assert cache.get("b") == entry("b1")
    assert cache.bytes == held("b1")
    # Nor is a read of "a" under way during our write kept.
    assert cache.fill({"a": entry("a1")}, before_write) == 0
    cache.put_written({"a": entry("a3")}, cache.ticket())
    assert cache.get("a") == entry("a3")


def test_a_write_begun_before_the_changes_remembered_is_not_cached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cache_module, "CHANGES_REMEMBERED", 2)
    cache = OrderCache(capacity=10)
    before_write = cache.ticket()
    cache.invalidate(["x", "y", "z"])  # "x" forgotten: changes before this are unknown
    cache.put_written({"a": entry("a1")}, before_write)
    assert cache.get("a") is None


def test_an_invalidation_drops_the_copy_and_refuses_a_read_of_it_under_way() -> None:
    cache = OrderCache(capacity=10)
    cache.put_written({"a": entry("a1"), "b": entry("b1")})
    before_read = cache.ticket()
    cache.invalidate(["a", "absent"])
    assert cache.get("a") is None
    assert cache.get("b") == entry("b1")
    assert (cache.invalidations, cache.bytes) == (1, held("b1"))
    assert cache.fill({"a": entry("a1"), "absent": entry("x")}, before_read) == 0
    assert cache.warm({"a": entry("a1")}, before_read) == 0
    assert cache.fill({"a": entry("a2")}, cache.ticket()) == 1


def test_a_suspended_cache_answers_nothing_keeps_its_entries_and_refuses_reads() -> None:
    cache = OrderCache(capacity=10)
    cache.warm({"a": entry("a"), "b": entry("b")}, cache.ticket())
    before_suspension = cache.ticket()
    cache.suspend()
    assert (cache.get("a"), cache.suspended, cache.suspensions) == (None, True, 1)
    assert cache.kept("a") == entry("a")  # for when the database cannot be reached either
    during = cache.ticket()
    cache.put_written({"c": entry("c")})  # this instance's own commit: the newest at the time
    assert cache.kept("c") == entry("c")
    assert cache.fill({"d": entry("d")}, cache.ticket()) == 0
    assert cache.warm({"d": entry("d")}, cache.ticket()) == 0
    assert cache.etags() == {"a": entry("a").etag, "b": entry("b").etag, "c": entry("c").etag}
    # "a" changed meanwhile, "b" was deleted, "c" is as stored; "e" was never cached.
    stored = {"a": entry("a2").etag, "c": entry("c").etag, "e": entry("e").etag}
    assert cache.verify(stored, ["a", "b", "c", "e"]) == 2
    cache.resume()
    assert not cache.suspended
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (None, None, entry("c"))
    assert cache.fill({"a": entry("a")}, before_suspension) == 0
    assert cache.fill({"d": entry("d")}, during) == 0
    assert cache.fill({"d": entry("d")}, cache.ticket()) == 1
    assert cache.get("d") == entry("d")


def test_a_read_older_than_the_changes_remembered_is_refused_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cache_module, "CHANGES_REMEMBERED", 2)
    cache = OrderCache(capacity=10)
    before_read = cache.ticket()
    cache.invalidate(["x"])
    after_x = cache.ticket()
    cache.invalidate(["y", "z"])  # "x" is forgotten: a read begun before its change cannot tell
    assert cache.fill({"a": entry("a")}, before_read) == 0
    assert cache.fill({"a": entry("a"), "y": entry("y")}, after_x) == 1
    assert cache.get("y") is None


def test_an_id_the_database_did_not_find_is_answered_absent_until_a_change_of_it() -> None:
    cache = OrderCache(capacity=10, absent_capacity=10)
    assert cache.fill({"a": entry("a")}, cache.ticket(), ["x", "y", "z"]) == 1
    assert (absent(cache, "x"), absent(cache, "a"), absent(cache, "never-asked")) == (
        True,
        False,
        False,
    )
    # Each lookup counted once: "a" a hit, "x" an absent hit, "never-asked" a miss.
    assert (cache.hits, cache.absent_hits, cache.misses, cache.absent_entries) == (1, 1, 1, 3)
    cache.put_written({"x": entry("x")})  # this instance stored it
    cache.invalidate(["y"])  # another instance stored it, and it was heard
    assert (absent(cache, "x"), absent(cache, "y"), absent(cache, "z")) == (False, False, True)
    assert cache.get("x") == entry("x")
    assert cache.absent_entries == 1


def test_the_absent_ids_are_bounded_least_recently_asked_first() -> None:
    cache = OrderCache(capacity=10, absent_capacity=2)
    cache.fill({}, cache.ticket(), ["a", "b"])
    assert absent(cache, "a")  # "b" is now the least recently asked
    cache.fill({}, cache.ticket(), ["c"])
    assert (absent(cache, "a"), absent(cache, "b"), absent(cache, "c")) == (True, False, True)
    assert cache.absent_entries == 2
    cache.fill({}, cache.ticket(), [f"flood{n}" for n in range(1000)])
    assert cache.absent_entries == 2
    assert (absent(cache, "flood998"), absent(cache, "flood999"), absent(cache, "a")) == (
        True,
        True,
        False,
    )
    off = OrderCache(capacity=10, absent_capacity=0)
    off.fill({}, off.ticket(), ["a"])
    assert (absent(off, "a"), off.absent_entries) == (False, 0)


def test_an_absent_answer_read_before_a_change_of_its_id_is_not_kept() -> None:
    cache = OrderCache(capacity=10, absent_capacity=10)
    before_read = cache.ticket()
    # While the database was being asked, this instance stored "mine" and another instance
    # stored "theirs" (heard): the read may have begun before either commit.
    cache.put_written({"mine": entry("mine")}, cache.ticket())
    cache.invalidate(["theirs"])
    cache.fill({}, before_read, ["mine", "theirs", "other"])
    assert (absent(cache, "mine"), absent(cache, "theirs"), absent(cache, "other")) == (
        False,
        False,
        True,
    )
    cache.fill({}, cache.ticket(), ["theirs"])  # asked again after the change: absent again
    assert absent(cache, "theirs")


def test_an_absent_answer_older_than_the_changes_remembered_is_not_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cache_module, "CHANGES_REMEMBERED", 2)
    cache = OrderCache(capacity=10, absent_capacity=10)
    before_read = cache.ticket()
    cache.invalidate(["x", "y", "z"])  # "x" forgotten: a change of "a" could have been too
    cache.fill({}, before_read, ["a"])
    assert not absent(cache, "a")


def test_a_suspended_cache_answers_no_id_absent_and_forgets_them() -> None:
    cache = OrderCache(capacity=10, absent_capacity=10)
    cache.fill({}, cache.ticket(), ["a"])
    before_suspension = cache.ticket()
    cache.suspend()
    assert not absent(cache, "a")
    cache.fill({}, cache.ticket(), ["b"])  # nothing kept while changes may go unheard
    cache.resume()
    # "a" may have been stored unheard meanwhile: forgotten, not answered again.
    assert (absent(cache, "a"), absent(cache, "b"), cache.absent_entries) == (False, False, 0)
    cache.fill({}, before_suspension, ["a"])
    assert not absent(cache, "a")
    cache.fill({}, cache.ticket(), ["a"])
    assert absent(cache, "a")


def orders_as_served() -> dict[str, CachedOrder]:
    """Generated orders as the API serves them, with bodies at the edges: the largest order
    (over LZ4's 64 KiB window), multi-byte text, and bodies unlike an order."""
    rng = random.Random(11)
    bodies = [api_body(make_order(rng)) for _ in range(300)]
    bodies.append(api_body(make_order(rng, item_count=MAX_ITEMS)))
    bodies += [b"", "Zoë 王小明 🌸".encode() * 99, random.Random(3).randbytes(3000)]
    return {
        f"o{n}": CachedOrder.of(body, hashlib.sha256(body).digest())
        for n, body in enumerate(bodies)
    }


def test_a_hit_gives_back_the_body_and_tag_put_byte_for_byte_however_it_came_in() -> None:
    orders = orders_as_served()
    written, read, warmed = (OrderCache(capacity=len(orders)) for _ in range(3))
    written.put_written(orders)
    assert read.fill(orders, read.ticket()) == len(orders)
    assert warmed.warm(orders, warmed.ticket()) == len(orders)
    for cache in (written, read, warmed):
        for order_uid, order in orders.items():
            found = cache.look_up(order_uid)
            assert isinstance(found, CachedOrder)
            assert (found.body, found.etag) == (order.body, order.etag)
            assert cache.kept(order_uid) == order
        assert cache.etags() == {order_uid: order.etag for order_uid, order in orders.items()}
        assert cache.bytes == sum(len(pack(order.body)) for order in orders.values())


def test_masked_views_give_back_byte_for_byte_what_masking_made() -> None:
    views = MaskedViews(capacity=1000, max_bytes=None)
    held = 0
    for whole in orders_as_served().values():
        if not whole.body.startswith(b"{"):
            continue  # not an order: nothing to mask
        body = masked_document(whole.body)
        made = CachedOrder(body, masked_etag(body))
        assert views.masked(whole) == made  # masked now
        assert views.masked(whole) == made  # from the views kept
        held += len(pack(body, whole.body))
    # Each view held packed against its whole order's body: about the characters masked.
    assert views.bytes == held


def test_masked_views_are_bounded_by_the_bytes_they_hold() -> None:
    rng = random.Random(5)
    wholes = [CachedOrder.of(api_body(make_order(rng)), bytes([n]) * 32) for n in range(3)]
    packed = [len(pack(masked_document(whole.body), whole.body)) for whole in wholes]
    # Room for the second and either other, not all three.
    bound = packed[1] + max(packed[0], packed[2])
    assert sum(packed) > bound
    views = MaskedViews(capacity=10, max_bytes=bound)
    first = views.masked(wholes[0])
    views.masked(wholes[1])
    assert (len(views), views.bytes) == (2, packed[0] + packed[1])
    views.masked(wholes[2])  # over the bound: the least recently used goes
    assert (len(views), views.bytes) == (2, packed[1] + packed[2])
    assert views.masked(wholes[0]) == first  # masked again
