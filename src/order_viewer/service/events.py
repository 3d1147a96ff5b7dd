"""The live changes of orders, for the streams that watch them (`OrderEvents`): which version of
an order a watching client is sent, and when.

Changes come from the change notifications every instance shares (the change listener reports
each one, this instance's own writes included): a notification only names the orders replaced or
deleted, so the hub reads the state of those that are watched, once for all their streams, and
offers it to each stream. A stream holds only the newest state it has not sent yet, so a client
that never reads costs one slot, whatever changes meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from order_viewer.service.ports import DatabaseUnavailable, OrderState, OrderStates

log = logging.getLogger(__name__)

# The state of an order neither stored nor deleted by a tombstone (expired, or never stored).
ABSENT = OrderState(order=None, offset=None)


class StreamEnded(Exception):
    """The stream was closed: its client left, or the service is stopping."""


class Subscription:
    """One stream's view of one order: the offset of the last state it accepted (what its client
    will have shown once it has read) and the newest state not sent yet, the only one kept.

    A state is accepted only if it is newer than what the client has: a version from a later
    message, or a deletion of the version it shows. So a client never goes back to an older
    version, whatever order the reads of the database answer in."""

    def __init__(self, order_uid: str, last_offset: int | None) -> None:
        self.order_uid = order_uid
        self._offset = last_offset
        # Whether the client shows a version: one it was sent, or the one of its Last-Event-ID.
        self._showing = last_offset is not None
        self._pending: OrderState | None = None
        self._woken = asyncio.Event()
        self._closed = False

    def offer(self, state: OrderState) -> None:
        if self._closed or not self._newer(state):
            return
        if state.offset is not None:
            self._offset = state.offset
        self._showing = state.order is not None
        self._pending = state
        self._woken.set()

    def _newer(self, state: OrderState) -> bool:
        if state.offset is None:
            # Deleted without a tombstone (by retention): news only to a client that shows it.
            return state.order is None and self._showing
        return self._offset is None or state.offset > self._offset

    async def next(self, timeout: float) -> OrderState | None:
        """The newest state not sent yet, as soon as there is one; None when `timeout` seconds
        pass without one (time for a heartbeat). Raises StreamEnded once closed."""
        if self._pending is None and not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken.wait(), timeout)
        if self._closed:
            raise StreamEnded
        self._woken.clear()
        state, self._pending = self._pending, None
        return state

    def close(self) -> None:
        self._closed = True
        self._pending = None
        self._woken.set()


class OrderEvents:
    """The hub of the streams of orders' changes: at most `max_streams` at once, each fed the
    states of its order as the change notifications name it (`changed`, from any thread).

    Memory is bounded by the streams: one `Subscription` each, holding at most one pending
    state (shared between the streams of one order, its body that of the read), plus the ids
    of the watched orders waiting for a read. Nothing grows with the changes or with a client
    that never reads."""

    # How long a read of the changed orders waits before trying again while the database is away.
    RETRY_SECONDS = 1.0

    def __init__(self, states: OrderStates, max_streams: int) -> None:
        self._states = states
        self.max_streams = max_streams
        self._watched: dict[str, set[Subscription]] = {}
        self._open = 0
        # Watched orders named by a change and not read since, and the task that reads them.
        self._stale: set[str] = set()
        self._reading: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def open_streams(self) -> int:
        return self._open

    def subscribe(self, order_uid: str, last_offset: int | None) -> Subscription | None:
        """A new stream of the order (its client has the version of `last_offset`, if any), or
        None when `max_streams` are open or the hub is closed. In the event loop. The order's
        state now is read and offered to it soon: with the reads of changed orders, so that a
        thousand clients connecting at once cost a few reads, not a thousand."""
        if self._closed or self._open >= self.max_streams:
            return None
        self._loop = asyncio.get_running_loop()
        subscription = Subscription(order_uid, last_offset)
        self._watched.setdefault(order_uid, set()).add(subscription)
        self._open += 1
        self._mark_stale([order_uid])
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscription.close()
        watching = self._watched.get(subscription.order_uid)
        if watching is None or subscription not in watching:
            return
        watching.remove(subscription)
        self._open -= 1
        if not watching:
            del self._watched[subscription.order_uid]

    def close(self) -> None:
        """End every stream and open no more: the service is stopping."""
        self._closed = True
        for watching in list(self._watched.values()):
            for subscription in list(watching):
                self.unsubscribe(subscription)
        if self._reading is not None:
            self._reading.cancel()

    # What the change listener reports (`ports.Changes`), from its own thread.

    def changed(self, order_uids: Sequence[str]) -> None:
        """These orders were stored, replaced or deleted: the watched ones are read and offered."""
        watched = [uid for uid in order_uids if uid in self._watched]
        if watched:
            self._mark_stale_soon(watched)

    def listening(self) -> None:
        """Changes may have gone unheard while the listener was away: every watched order is
        read again (a stream that already has its state is offered nothing new)."""
        self._mark_stale_soon(None)

    def lost(self) -> None:
        """Nothing to do until `listening`: the streams keep what they have."""

    def _mark_stale_soon(self, order_uids: list[str] | None) -> None:
        """`_mark_stale` in the event loop (None: every watched order)."""
        loop = self._loop
        if loop is None:
            return  # never subscribed: nothing is watched
        # The loop closes as the process ends: then no stream is left to tell.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._mark_stale, order_uids)

    def _mark_stale(self, order_uids: list[str] | None) -> None:
        if self._closed:
            return
        self._stale.update(self._watched if order_uids is None else order_uids)
        if self._reading is None:
            self._reading = asyncio.get_running_loop().create_task(self._read_stale())

    async def _read_stale(self) -> None:
        try:
            while self._stale:
                order_uids = [uid for uid in self._stale if uid in self._watched]
                self._stale.clear()
                if not order_uids:
                    continue
                try:
                    states = await self._states(order_uids)
                except DatabaseUnavailable as error:
                    log.warning("reading changed orders for their streams failed: %s", error)
                    self._stale.update(order_uids)
                    await asyncio.sleep(self.RETRY_SECONDS)
                    continue
                for order_uid in order_uids:
                    state = states.get(order_uid, ABSENT)
                    for subscription in self._watched.get(order_uid, ()):
                        subscription.offer(state)
        finally:
            self._reading = None
