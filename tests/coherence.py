"""Watching several instances for stale reads: the versions PostgreSQL commits, seen by a poller,
and the versions the instances serve, read at random by a few readers; a read is stale if it
began a second or more after a newer version (or the deletion) was committed."""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Self

import httpx
import psycopg

from tests.conftest import ServiceProcess, Stack, Topics, produce_orders, wait_until

# What the instances of a test with several run with: partitions enough for each to have some,
# a stopped member's partitions moved on within seconds rather than the default 45, and each
# batch written without waiting to fill.
INSTANCE_SETTINGS = {
    "KAFKA_TOPIC_PARTITIONS": "6",
    "KAFKA_SESSION_TIMEOUT_MS": "6000",
    "BATCH_MAX_WAIT_MS": "20",
}

# What the contract allows between a commit and every instance serving it.
ALLOWED_DELAY_SECONDS = 1.0
DELETED = -1


def version_of(name: str | None) -> int:
    """Versions are written into delivery.name as "v<n>"; a deleted order is DELETED."""
    return DELETED if name is None else int(name.removeprefix("v"))


@dataclass(frozen=True, slots=True)
class Read:
    began: float
    ended: float
    instance: int
    order_uid: str
    version: int


class Workers:
    """Threads that run from the start of a `with` block until its end."""

    JOIN_SECONDS = 30.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.JOIN_SECONDS)


class Observer(Workers):
    """Polls PostgreSQL for the committed version of each order (the first time a version is
    seen is an upper bound of its commit time) and reads the orders at random from the
    instances, until stopped."""

    def __init__(
        self, stack: Stack, services: Sequence[ServiceProcess], uids: list[str], readers: int = 3
    ) -> None:
        self.stack = stack
        self.services = services
        self.uids = uids
        # uid -> [(first seen, version)] in the order seen
        self.committed: dict[str, list[tuple[float, int]]] = defaultdict(list)
        self.reads: list[Read] = []
        self.errors: list[str] = []
        super().__init__()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._poll, name="db-poller")] + [
            threading.Thread(target=self._read, args=(seed,), name=f"reader-{seed}")
            for seed in range(readers)
        ]

    def committed_version(self, uid: str) -> int | None:
        with self._lock:
            history = self.committed.get(uid)
            return history[-1][1] if history else None

    def _poll(self) -> None:
        with psycopg.connect(self.stack.database_url, autocommit=True) as connection:
            while not self._stop.is_set():
                rows: dict[str, str] = dict(
                    connection.execute(
                        "SELECT order_uid, name FROM delivery WHERE order_uid = ANY(%s)",
                        (self.uids,),
                    ).fetchall()
                )
                now = time.monotonic()
                with self._lock:
                    for uid in self.uids:
                        version = version_of(rows.get(uid))
                        history = self.committed[uid]
                        if not history or history[-1][1] != version:
                            history.append((now, version))
                self._stop.wait(0.01)

    def _read(self, seed: int) -> None:
        rng = random.Random(seed)
        clients = [httpx.Client(base_url=s.base_url, timeout=5) for s in self.services]
        try:
            while not self._stop.is_set():
                instance = rng.randrange(len(clients))
                uid = rng.choice(self.uids)
                began = time.monotonic()
                try:
                    response = clients[instance].get(f"/order/{uid}")
                except httpx.TransportError as error:
                    self.errors.append(f"instance {instance}: {error!r}")
                    continue
                ended = time.monotonic()
                if response.status_code == 404:
                    version = DELETED
                elif response.status_code == 200:
                    version = version_of(response.json()["delivery"]["name"])
                else:
                    self.errors.append(f"instance {instance}: {response.status_code}")
                    continue
                with self._lock:
                    self.reads.append(Read(began, ended, instance, uid, version))
        finally:
            for client in clients:
                client.close()

    def stale_reads(self) -> list[str]:
        """Every read that returned something other than what was committed at least
        ALLOWED_DELAY_SECONDS before it began (or a version committed since)."""
        stale = []
        with self._lock:
            for read in self.reads:
                history = self.committed.get(read.order_uid, [])
                # The versions a read may return: the one committed a second before it began
                # (if any), and every one committed after that.
                settled = [v for seen, v in history if seen <= read.began - ALLOWED_DELAY_SECONDS]
                allowed = {v for seen, v in history if seen > read.began - ALLOWED_DELAY_SECONDS}
                if settled:
                    allowed.add(settled[-1])
                if settled and read.version not in allowed:
                    stale.append(
                        f"instance {read.instance} served {read.order_uid} as {read.version}; "
                        "committed (seconds from the read, version): "
                        f"{[(round(s - read.began, 3), v) for s, v in history]}"
                    )
        return stale

    def delays(self) -> list[float]:
        """For each committed version after the first and each instance: from its commit (as
        polled) to the first read of it from that instance after which that instance never
        served an older one."""
        result = []
        with self._lock:
            by_instance: dict[tuple[str, int], list[Read]] = defaultdict(list)
            for read in self.reads:
                by_instance[(read.order_uid, read.instance)].append(read)
            for (uid, _), reads in by_instance.items():
                reads.sort(key=lambda r: r.began)
                history = self.committed.get(uid, [])
                for (seen, version), following in zip(
                    history[1:], [*history[2:], (float("inf"), None)], strict=True
                ):
                    window = [r for r in reads if seen - 5 <= r.began < following[0]]
                    last_other = max(
                        (i for i, r in enumerate(window) if r.version != version), default=-1
                    )
                    if last_other + 1 < len(window):
                        result.append(max(0.0, window[last_other + 1].ended - seen))
        return result


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def versioned(order: dict[str, Any], version: int) -> dict[str, Any]:
    return {**order, "delivery": {**order["delivery"], "name": f"v{version}"}}


def all_committed(observer: Observer, orders: list[dict[str, Any]], version: int) -> bool:
    return all(observer.committed_version(str(o["order_uid"])) == version for o in orders)


def update_in_rounds(
    stack: Stack,
    topics: Topics,
    observer: Observer,
    orders: list[dict[str, object]],
    rounds: range,
    pause: float,
) -> None:
    """Each round produces a new version of every order, waits until all are committed, then
    lets the readers read for `pause` seconds."""
    for version in rounds:
        produce_orders(stack, topics.orders, [versioned(o, version) for o in orders])
        wait_until(
            partial(all_committed, observer, orders, version),
            30,
            f"version {version} to be committed",
            interval=0.02,
        )
        time.sleep(pause)
