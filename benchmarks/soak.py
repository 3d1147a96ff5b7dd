"""The chaos soak: two `order-viewer serve` instances in one group, orders produced at a steady
rate for a set time, and a seeded random schedule of faults; at the end, what was lost,
duplicated or served stale, and how long each fault took to recover from (docs/RELIABILITY.md,
"Chaos soak"). A benchmark, not part of `make test`: `python -m benchmarks.soak` or `make soak`.

Its PostgreSQL and Kafka are its own (a stack directory in the temp dir, on free ports), started
and crashed with the test suite's own tools (`tests.conftest`), so a developer's stack is never
touched; everything it starts is stopped at the end, also on Ctrl-C, SIGTERM or an error.

Faults never overlap: each is planned PLANNED_GAP_SECONDS after the one before (seeded), and
starts at its planned time or once the one before has recovered, whichever is later, so that a
time-to-recover is the fault's own. A fault has recovered once an order produced after it ended,
one on every partition, is served by both instances; one that has not within
RECOVERY_LIMIT_SECONDS is reported as a stall, and the schedule goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import psycopg
from confluent_kafka import KafkaError, Producer
from confluent_kafka import Message as KafkaMessage
from tests.audit import orphan_rows
from tests.conftest import (
    Servers,
    ServiceProcess,
    Stack,
    Topics,
    children,
    committed_lag,
    create_topics,
    new_topics,
    read_topic,
)

from devstack.settings import PG_APP_DB
from devstack.system import signal_process
from order_viewer.adapters.cache import etag_of
from order_viewer.adapters.postgres.migrate import migrate
from order_viewer.domain.model import PreparedOrder, parse_order
from order_viewer.entrypoints.generate import break_order, encode, make_order

INSTANCES = 2
PARTITIONS = 6
# Updates go to the newest orders, and the row lock holds the same ones, so that the writes
# during the lock meet it.
RECENT_WINDOW = 1000
UPDATE_SHARE = 0.10
INVALID_SHARE = 0.01
# Random reads of acknowledged orders from either instance, so that each caches orders the
# other one may replace: what a missed change notification would leave stale.
READS_PER_SECOND = 20
PROGRESS_SECONDS = 30
PLANNED_GAP_SECONDS = (22.0, 28.0)
RECOVERY_LIMIT_SECONDS = 180
RECOVERY_POLL_SECONDS = 0.25
ROW_LOCK_SECONDS = 60
POSTGRES_FREEZE_SECONDS = 20
BROKER_FREEZE_SECONDS = 30
# Longer than any fault: a message waits out a broker outage in the producer's queue instead of
# failing.
DELIVERY_TIMEOUT_MS = 600_000
FLUSH_SECONDS = 120
HTTP_TIMEOUT_SECONDS = 5
CHECK_CONCURRENCY = 16


@dataclass(frozen=True, slots=True)
class Version:
    """An acknowledged version of an order: where the broker put it and what it holds."""

    offset: int
    sha256: bytes
    items: int


@dataclass(frozen=True, slots=True)
class SentOrder:
    """A version of an order as sent, waiting for its acknowledgement."""

    uid: str
    sha256: bytes
    items: int
    updatable: bool


class Ledger:
    """What was produced and what the broker acknowledged: the newest acknowledged version of
    each order and the keys of the invalid messages. Delivery reports write it (in whichever
    thread polls the producer), the other threads read it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.produced = 0
        self.acknowledged = 0
        self.failed: list[str] = []
        self.newest: dict[str, Version] = {}
        self.invalid: set[bytes] = set()
        # Acknowledged orders in the order of their first version, for updates and reads; not
        # the recovery markers, which are sent to a partition of their choice: a new version
        # would go to its key's partition, and versions in two partitions have no order.
        self._uids: list[str] = []

    def sent(self) -> None:
        with self._lock:
            self.produced += 1

    def order_delivered(
        self, sent: SentOrder, error: KafkaError | None, message: KafkaMessage
    ) -> None:
        with self._lock:
            if error is not None:
                self.failed.append(f"{sent.uid}: {error}")
                return
            self.acknowledged += 1
            offset = message.offset()
            assert offset is not None
            known = self.newest.get(sent.uid)
            if known is None and sent.updatable:
                self._uids.append(sent.uid)
            if known is None or offset > known.offset:
                self.newest[sent.uid] = Version(offset, sent.sha256, sent.items)

    def invalid_delivered(self, key: bytes, error: KafkaError | None, _: KafkaMessage) -> None:
        with self._lock:
            if error is not None:
                self.failed.append(f"{key!r}: {error}")
                return
            self.acknowledged += 1
            self.invalid.add(key)

    def recent(self) -> list[str]:
        with self._lock:
            return self._uids[-RECENT_WINDOW:]

    def pick(self, rng: random.Random, recent: bool) -> str | None:
        """An acknowledged order at random: among the newest RECENT_WINDOW, or among all."""
        with self._lock:
            if not self._uids:
                return None
            share = min(RECENT_WINDOW, len(self._uids)) if recent else len(self._uids)
            return self._uids[-1 - rng.randrange(share)]

    def counts(self) -> tuple[int, int, int]:
        """Produced, acknowledged and failed, read together."""
        with self._lock:
            return self.produced, self.acknowledged, len(self.failed)


class SteadyProducer:
    """Orders at a steady rate, in a thread of its own: new ones, new versions of recent ones (same
    order_uid, other content) and a few invalid ones. Idempotent, with acknowledgements from
    every replica and a delivery timeout longer than any fault: during a broker fault messages
    wait in its queue and are retried, none twice and none out of order, and a message counts
    only once acknowledged."""

    def __init__(self, bootstrap: str, topic: str, rate: int, seed: int, ledger: Ledger) -> None:
        self._topic = topic
        self._rate = rate
        self._ledger = ledger
        self._rng = random.Random(f"{seed}-orders")
        self._markers = random.Random(f"{seed}-markers")
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 5,
                "message.timeout.ms": DELIVERY_TIMEOUT_MS,
                # Refused connections during the broker's faults are expected, and failed
                # deliveries are counted by the ledger: librdkafka's own lines would drown
                # the soak's.
                "log_level": 0,
            }
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)
        self.unacknowledged = 0

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        interval = 1 / self._rate
        started = time.monotonic()
        number = 0
        while not self._stop.is_set():
            due = started + number * interval
            # poll() serves delivery reports while it waits for the next message's turn.
            while (now := time.monotonic()) < due and not self._stop.is_set():
                self._producer.poll(due - now)
            self._next(number)
            number += 1

    def _next(self, number: int) -> None:
        rng = self._rng
        draw = rng.random()
        if draw < INVALID_SHARE:
            key = f"invalid-{number}".encode()
            value, _code = break_order(rng, make_order(rng))
            self._send(key, value, partial(self._ledger.invalid_delivered, key))
            return
        uid = self._ledger.pick(rng, recent=True) if draw < INVALID_SHARE + UPDATE_SHARE else None
        self._send_order(make_order(rng, order_uid=uid))

    def marker(self, partition: int) -> str:
        """A new order sent to `partition` (from any thread); its order_uid."""
        order = make_order(self._markers)
        self._send_order(order, partition, updatable=False)
        return str(order["order_uid"])

    def _send_order(
        self, order: dict[str, Any], partition: int = -1, updatable: bool = True
    ) -> None:
        value = encode(order)
        # The digest the service stores: that of the order's canonical JSON.
        sha256 = PreparedOrder.of(parse_order(value), partition, 0).sha256
        uid = order["order_uid"]
        sent = SentOrder(uid, sha256, len(order["items"]), updatable)
        self._send(uid.encode(), value, partial(self._ledger.order_delivered, sent), partition)

    def _send(
        self,
        key: bytes,
        value: bytes,
        delivered: Callable[[KafkaError | None, KafkaMessage], None],
        partition: int = -1,
    ) -> None:
        while not self._stop.is_set():
            try:
                self._producer.produce(
                    self._topic, key=key, value=value, partition=partition, on_delivery=delivered
                )
            except BufferError:
                self._producer.poll(0.1)
                continue
            self._ledger.sent()
            return

    def stop(self, wait: float) -> None:
        """Stop producing, then wait up to `wait` seconds for the acknowledgements still due;
        those that did not come are counted in `unacknowledged`."""
        self._stop.set()
        self._thread.join(5)  # it waits a message's interval (1 s at most) between checks
        self.unacknowledged = self._producer.flush(wait)


class CacheReader:
    """Reads acknowledged orders at random from either instance, READS_PER_SECOND, in a thread
    of its own; what each read brings into an instance's cache is what the final check
    compares with PostgreSQL."""

    def __init__(self, services: list[ServiceProcess], ledger: Ledger, seed: int) -> None:
        self._services = services
        self._ledger = ledger
        self._rng = random.Random(f"{seed}-reads")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reader", daemon=True)
        self.reads = 0

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=HTTP_TIMEOUT_SECONDS) as client:
            while not self._stop.wait(1 / READS_PER_SECOND):
                uid = self._ledger.pick(self._rng, recent=False)
                if uid is None:
                    continue
                service = self._rng.choice(self._services)
                try:
                    client.get(f"{service.base_url}/order/{uid}")
                except httpx.TransportError:
                    # An instance killed or waiting for a frozen server: its reads resume after.
                    continue
                self.reads += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(HTTP_TIMEOUT_SECONDS + 5)


@dataclass(frozen=True, slots=True)
class PlannedFault:
    at: float  # seconds from the start
    kind: str
    instance: int  # the one a SIGKILL hits


@dataclass
class Fault:
    number: int
    kind: str
    started: float  # seconds from the start, as the ended and recovered times
    ended: float = 0.0
    recovered: float | None = None  # seconds from `ended`; None: not within the limit
    detail: str = ""


def plan(seed: int, seconds: float) -> list[PlannedFault]:
    """The faults of a run of `seconds`, one every PLANNED_GAP_SECONDS; the kinds drawn in rounds
    of one each, shuffled, so that every kind comes as often as the others."""
    rng = random.Random(f"{seed}-faults")
    planned: list[PlannedFault] = []
    kinds: list[str] = []
    at = rng.uniform(*PLANNED_GAP_SECONDS)
    while at < seconds:
        if not kinds:
            kinds = list(FAULTS)
            rng.shuffle(kinds)
        planned.append(PlannedFault(at, kinds.pop(), rng.randrange(INSTANCES)))
        at += rng.uniform(*PLANNED_GAP_SECONDS)
    return planned


@contextmanager
def stopped(pids: list[int]) -> Iterator[None]:
    """SIGSTOP the processes for the block and SIGCONT them after it, whatever happens: a server
    left stopped would outlive the soak and hang whoever stops it."""
    for pid in pids:
        signal_process(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            signal_process(pid, signal.SIGCONT)


def clock(seconds: float) -> str:
    return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"


class Soak:
    """The servers, the two instances, the producer and the reader of one run, and its faults."""

    def __init__(self, servers: Servers, logs: Path, seed: int, group_protocol: str) -> None:
        self.servers = servers
        self.stack = Stack(servers, PG_APP_DB)
        self.topics: Topics = new_topics("soak")
        self.seed = seed
        self.ledger = Ledger()
        self.started = time.monotonic()
        self.faults: list[Fault] = []
        self.now_doing = "starting"
        settings = {
            "KAFKA_TOPIC_PARTITIONS": str(PARTITIONS),
            "KAFKA_GROUP_PROTOCOL": group_protocol,
        }
        self.services = [
            ServiceProcess(
                self.stack,
                self.topics,
                logs,
                # Static membership (classic protocol only): a restarted instance takes its
                # partitions back at once, as a deployment would have it.
                **settings,
                **({"KAFKA_GROUP_INSTANCE_ID": f"soak-{n}"} if group_protocol == "classic" else {}),
            )
            for n in range(INSTANCES)
        ]
        self.producer: SteadyProducer | None = None
        self.reader = CacheReader(self.services, self.ledger, seed)
        self._progress_stop = threading.Event()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, line: str) -> None:
        print(f"[{clock(self.elapsed())}] {line}", flush=True)

    def start(self, rate: int) -> None:
        migrate(self.stack.database_url)
        create_topics(self.stack, [self.topics.orders, self.topics.dead_letters], PARTITIONS)
        for service in self.services:
            service.start()
        self.started = time.monotonic()
        self.producer = SteadyProducer(
            self.stack.bootstrap_servers, self.topics.orders, rate, self.seed, self.ledger
        )
        self.producer.start()
        self.reader.start()
        threading.Thread(target=self._progress, name="progress", daemon=True).start()

    def _progress(self) -> None:
        while not self._progress_stop.wait(PROGRESS_SECONDS):
            produced, acknowledged, failed = self.ledger.counts()
            self.say(
                f"produced {produced:,}, acknowledged {acknowledged:,}, failed {failed}; "
                f"faults {len(self.faults)}; now: {self.now_doing}"
            )

    def stop(self, wait: float) -> None:
        """Stop producing (waiting up to `wait` seconds for the acknowledgements due), reading
        and reporting."""
        self._progress_stop.set()
        self.reader.stop()
        if self.producer is not None:
            self.producer.stop(wait)

    # ------------------------------------------------------------ faults

    def run_faults(self, planned: list[PlannedFault], seconds: float) -> None:
        for number, fault_plan in enumerate(planned, start=1):
            if fault_plan.at >= seconds or self.elapsed() >= seconds:
                break
            self.now_doing = "waiting for the next fault"
            time.sleep(max(0.0, fault_plan.at - self.elapsed()))
            fault = Fault(number, fault_plan.kind, self.elapsed())
            self.now_doing = fault.kind
            FAULTS[fault.kind].inject(self, fault, fault_plan)
            fault.ended = self.elapsed()
            self.now_doing = f"recovering from {fault.kind}"
            fault.recovered = self.recovery(fault)
            self.faults.append(fault)
            after = (
                f"recovered in {fault.recovered:.1f} s"
                if fault.recovered is not None
                else f"NOT recovered within {RECOVERY_LIMIT_SECONDS} s (a stall)"
            )
            detail = f" ({fault.detail})" if fault.detail else ""
            self.say(
                f"fault {number}: {fault.kind}{detail}, {fault.ended - fault.started:.1f} s; "
                + after
            )

    def recovery(self, fault: Fault) -> float | None:
        """Seconds from the fault's end until an order produced after it, one on every
        partition, is served by both instances; None if not within RECOVERY_LIMIT_SECONDS."""
        assert self.producer is not None
        uids = [self.producer.marker(partition) for partition in range(PARTITIONS)]
        waiting = {(service.base_url, uid) for service in self.services for uid in uids}
        with httpx.Client(timeout=HTTP_TIMEOUT_SECONDS) as client:
            while waiting and self.elapsed() - fault.ended < RECOVERY_LIMIT_SECONDS:
                for base_url, uid in list(waiting):
                    try:
                        if client.get(f"{base_url}/order/{uid}").status_code == 200:
                            waiting.discard((base_url, uid))
                    except httpx.TransportError:
                        pass  # an instance restarting, or waiting for a server
                time.sleep(RECOVERY_POLL_SECONDS)
        return None if waiting else self.elapsed() - fault.ended

    def row_lock(self, fault: Fault, _: PlannedFault) -> None:
        uids = self.ledger.recent()
        # An operator's forgotten transaction; its own statement may wait for a batch's
        # transaction, but not for ever.
        with psycopg.connect(
            self.stack.database_url, connect_timeout=10, options="-c statement_timeout=30000"
        ) as holder:
            held = holder.execute(
                "SELECT order_uid FROM orders WHERE order_uid = ANY(%s) FOR UPDATE", (uids,)
            ).fetchall()
            # Halfway, whether the writers wait for the rows: that the fault bites.
            time.sleep(ROW_LOCK_SECONDS / 2)
            with self.stack.connect() as connection:
                row = connection.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = 'order-viewer-writer' AND wait_event_type = 'Lock'"
                ).fetchone()
            fault.detail = f"{len(held):,} rows; {row[0] if row else 0} writers waiting"
            time.sleep(ROW_LOCK_SECONDS / 2)
            holder.rollback()

    def postgres_freeze(self, fault: Fault, _: PlannedFault) -> None:
        pid_file = self.servers.settings.pg_data / "postmaster.pid"
        postmaster = int(pid_file.read_text().split()[0])
        # The postmaster first, so that it forks no backend the second list would miss.
        with stopped([postmaster]), stopped(children(postmaster)):
            time.sleep(POSTGRES_FREEZE_SECONDS)
        fault.detail = f"postmaster {postmaster} and its processes"

    def broker_freeze(self, _fault: Fault, _: PlannedFault) -> None:
        pid = self.servers.kafka_pid()
        if pid is None:
            raise RuntimeError("the broker is not running")
        with stopped([pid]):
            time.sleep(BROKER_FREEZE_SECONDS)

    def listener_terminate(self, fault: Fault, _: PlannedFault) -> None:
        with self.stack.connect() as connection:
            row = connection.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = 'order-viewer-listener' "
                "AND datname = current_database()"
            ).fetchone()
        fault.detail = f"{row[0] if row else 0} connections"

    def instance_kill(self, fault: Fault, planned: PlannedFault) -> None:
        service = self.services[planned.instance]
        service.kill()
        service.start(ready=False)
        fault.detail = f"instance {planned.instance}"

    def broker_restart(self, _fault: Fault, _: PlannedFault) -> None:
        self.servers.kafka_stop()
        self.servers.kafka_start()

    def postgres_crash(self, _fault: Fault, _: PlannedFault) -> None:
        self.servers.pg_crash()
        self.servers.pg_start()


@dataclass(frozen=True, slots=True)
class FaultKind:
    what: str
    inject: Callable[[Soak, Fault, PlannedFault], None]


FAULTS = {
    "row-lock": FaultKind(
        f"another session holds the rows of the {RECENT_WINDOW:,} newest orders (the ones "
        f"updates go to) FOR UPDATE for {ROW_LOCK_SECONDS} s",
        Soak.row_lock,
    ),
    "postgres-freeze": FaultKind(
        f"SIGSTOP of PostgreSQL (the postmaster, then every process it started) for "
        f"{POSTGRES_FREEZE_SECONDS} s",
        Soak.postgres_freeze,
    ),
    "broker-freeze": FaultKind(
        f"SIGSTOP of the broker for {BROKER_FREEZE_SECONDS} s", Soak.broker_freeze
    ),
    "listener-terminate": FaultKind(
        "pg_terminate_backend of the instances' LISTEN connections", Soak.listener_terminate
    ),
    "instance-kill": FaultKind(
        "SIGKILL of one instance, started again at once", Soak.instance_kill
    ),
    "broker-restart": FaultKind(
        "the broker stopped (SIGTERM, orderly) and started again", Soak.broker_restart
    ),
    "postgres-crash": FaultKind(
        "PostgreSQL stopped in immediate mode (crash recovery at the start), started again",
        Soak.postgres_crash,
    ),
}


# ------------------------------------------------------------ the audit at the end


@dataclass
class Outcome:
    """What the audit found; every list names the orders (or messages) concerned."""

    drained_seconds: float | None = None
    not_stored: list[str] = field(default_factory=list)
    older_version: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    orphan_rows: int = 0
    lag: int | None = None
    dead_letters_missing: list[bytes] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    unanswered: list[str] = field(default_factory=list)
    stored: int = 0
    # Seconds each step of the audit took, by step.
    timings: dict[str, float] = field(default_factory=dict)

    def failures(self) -> list[str]:
        return [
            f"{what}: {len(found)}, e.g. {found[0]!r}"
            for what, found in (
                ("lost (acknowledged, not stored)", self.not_stored),
                ("lost (an older version stored)", self.older_version),
                ("duplicated", self.duplicated),
                ("dead letters missing", self.dead_letters_missing),
                ("stale reads", self.stale),
                ("unanswered reads", self.unanswered),
            )
            if found
        ] + [
            f"{what}: {count}"
            for what, count in (("orphan rows", self.orphan_rows), ("lag", self.lag))
            if count != 0
        ]


def stored_digests(stack: Stack, uids: list[str]) -> dict[str, bytes]:
    with stack.connect() as connection:
        rows = connection.execute(
            "SELECT order_uid, content_sha256 FROM orders WHERE order_uid = ANY(%s)", (uids,)
        ).fetchall()
    return {uid: bytes(sha256) for uid, sha256 in rows}


def behind(ledger: Ledger, stored: dict[str, bytes]) -> list[str]:
    """The orders whose newest acknowledged version is not the stored one (or none is)."""
    return [uid for uid, version in ledger.newest.items() if stored.get(uid) != version.sha256]


def drain(stack: Stack, topics: Topics, ledger: Ledger, seconds: float) -> float | None:
    """Wait (at most `seconds`) until every acknowledged order is stored in its newest version
    and the group has committed the whole topic; how long that took, None if it did not."""
    started = time.monotonic()
    uids = list(ledger.newest)
    while time.monotonic() - started < seconds:
        try:
            if (
                not behind(ledger, stored_digests(stack, uids))
                and committed_lag(stack, topics) == 0
            ):
                return time.monotonic() - started
        except psycopg.OperationalError:
            pass  # PostgreSQL still recovering from the last fault
        time.sleep(5)
    return None


def part_counts(stack: Stack, uids: list[str]) -> list[tuple[str, int, int, int]]:
    """(order_uid, delivery rows, payment rows, item rows) of each stored order."""
    with stack.connect() as connection:
        return connection.execute(
            "SELECT o.order_uid, "
            "(SELECT count(*) FROM delivery d WHERE d.order_uid = o.order_uid), "
            "(SELECT count(*) FROM payment p WHERE p.order_uid = o.order_uid), "
            "(SELECT count(*) FROM items i WHERE i.order_uid = o.order_uid) "
            "FROM orders o WHERE o.order_uid = ANY(%s)",
            (uids,),
        ).fetchall()


async def ask_every_order(
    base_urls: list[str], stored: dict[str, bytes]
) -> tuple[list[str], list[str]]:
    """Each instance asked for each stored order with the stored version's ETag, CHECK_CONCURRENCY
    at a time: a 304, or a 200 whose body has the stored digest, is current; the stale answers
    and the requests that got none (an error, a 5xx) are returned, each named."""
    stale: list[str] = []
    unanswered: list[str] = []
    # One iterator shared by the workers: each request is made once, and only CHECK_CONCURRENCY
    # of them exist at a time, however many orders there are.
    requests = iter([(base_url, uid) for base_url in base_urls for uid in stored])
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_SECONDS) as client:

        async def worker() -> None:
            for base_url, uid in requests:
                url = f"{base_url}/order/{uid}"
                try:
                    response = await client.get(
                        url, headers={"if-none-match": etag_of(stored[uid])}
                    )
                except httpx.TransportError as error:
                    unanswered.append(f"{url}: {error!r}")
                    continue
                status = response.status_code
                if status >= 500:
                    unanswered.append(f"{url}: {status}")
                elif status != 304 and not (
                    status == 200 and hashlib.sha256(response.content).digest() == stored[uid]
                ):
                    stale.append(f"{url}: {status} {response.headers.get('etag')}")

        await asyncio.gather(*(worker() for _ in range(CHECK_CONCURRENCY)))
    return stale, unanswered


def audit(soak: Soak, drain_seconds: float) -> Outcome:
    """Every acknowledged order stored once in its newest version, every invalid message
    dead-lettered, offsets committed to the end, and both instances' answer for every order the
    stored document (compared by digest)."""
    stack, ledger = soak.stack, soak.ledger
    outcome = Outcome(drained_seconds=drain(stack, soak.topics, ledger, drain_seconds))
    began = time.monotonic()
    uids = list(ledger.newest)
    stored = stored_digests(stack, uids)
    outcome.stored = len(stored)
    for uid in behind(ledger, stored):
        (outcome.older_version if uid in stored else outcome.not_stored).append(uid)
    for uid, delivery, payment, items in part_counts(stack, uids):
        version = ledger.newest[uid]
        # A stored older version has other items: only the newest one's count is known here.
        if (
            delivery != 1
            or payment != 1
            or (stored[uid] == version.sha256 and items != version.items)
        ):
            outcome.duplicated.append(uid)
    outcome.orphan_rows = orphan_rows(stack)
    outcome.lag = committed_lag(stack, soak.topics)
    outcome.timings["database checked"] = time.monotonic() - began

    began = time.monotonic()
    # At least once: a redelivered batch may dead-letter a message twice, never zero times.
    letters = read_topic(
        stack,
        soak.topics.dead_letters,
        lambda read: ledger.invalid <= {message.key() for message in read},
        timeout=60,
    )
    outcome.dead_letters_missing = sorted(ledger.invalid - {message.key() for message in letters})

    outcome.timings["dead letters read"] = time.monotonic() - began

    began = time.monotonic()
    base_urls = [service.base_url for service in soak.services]
    outcome.stale, outcome.unanswered = asyncio.run(ask_every_order(base_urls, stored))
    outcome.timings["every order asked from both instances"] = time.monotonic() - began
    return outcome


def report(soak: Soak, outcome: Outcome, minutes: float, rate: int, group_protocol: str) -> None:
    ledger = soak.ledger
    produced, acknowledged, failed = ledger.counts()
    unacknowledged = soak.producer.unacknowledged if soak.producer is not None else 0
    print(
        f"\n## Chaos soak: {minutes:g} min at {rate} orders/s, {INSTANCES} instances, "
        f"{PARTITIONS} partitions, KAFKA_GROUP_PROTOCOL={group_protocol}, seed {soak.seed}\n"
    )
    print(
        f"produced {produced:,}; acknowledged {acknowledged:,} ({len(ledger.newest):,} orders, "
        f"{len(ledger.invalid):,} invalid messages); failed {failed}; never acknowledged "
        f"{unacknowledged}"
    )
    drained = (
        f"in {outcome.drained_seconds:.0f} s"
        if outcome.drained_seconds is not None
        else "NOT within the drain period"
    )
    print(
        f"drained {drained}; stored {outcome.stored:,} of {len(ledger.newest):,}; lost "
        f"{len(outcome.not_stored) + len(outcome.older_version)}; duplicated "
        f"{len(outcome.duplicated)}; orphan rows {outcome.orphan_rows}; dead letters missing "
        f"{len(outcome.dead_letters_missing)}; offsets behind {outcome.lag}"
    )
    print(
        f"stale reads {len(outcome.stale)} and unanswered {len(outcome.unanswered)} of "
        f"{INSTANCES * outcome.stored:,} (every stored order from both instances); "
        f"{soak.reader.reads:,} random reads during the run"
    )
    print(
        "audit steps: "
        + ", ".join(f"{step} in {seconds:.0f} s" for step, seconds in outcome.timings.items())
    )
    print("\n| # | at | fault | detail | lasted s | recovered in s |")
    print("|---:|---:|---|---|---:|---:|")
    for fault in soak.faults:
        recovered = "stall" if fault.recovered is None else f"{fault.recovered:.1f}"
        print(
            f"| {fault.number} | {clock(fault.started)} | {fault.kind} | {fault.detail} | "
            f"{fault.ended - fault.started:.1f} | {recovered} |"
        )
    print("\n| fault | what is done | count | recovered in s, median | max | stalls |")
    print("|---|---|---:|---:|---:|---:|")
    for kind, fault_kind in FAULTS.items():
        of_kind = [fault for fault in soak.faults if fault.kind == kind]
        times = [fault.recovered for fault in of_kind if fault.recovered is not None]
        median = f"{statistics.median(times):.1f}" if times else "-"
        longest = f"{max(times):.1f}" if times else "-"
        print(
            f"| {kind} | {fault_kind.what} | {len(of_kind)} | {median} | {longest} | "
            f"{len(of_kind) - len(times)} |"
        )


def positive(kind: Callable[[str], float | int]) -> Callable[[str], float | int]:
    """An argument type: a number of `kind` above 0 and below a million (no run is that long or
    that fast; larger is a typo)."""

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not 0 < value < 10**6:
            raise argparse.ArgumentTypeError(
                f"must be a number above 0 and below 1,000,000, not {text!r}"
            )
        return value

    return parse


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__)
    parser.add_argument(
        "--minutes", type=positive(float), default=20, help="of production and faults (20)"
    )
    parser.add_argument("--rate", type=positive(int), default=50, help="orders a second (50)")
    parser.add_argument(
        "--seed", type=int, help="of the orders and the fault schedule; default: a new one"
    )
    parser.add_argument(
        "--drain-seconds",
        type=positive(float),
        default=300,
        help="longest wait, after the last fault, for every order to be stored (300)",
    )
    parser.add_argument("--group-protocol", choices=("classic", "consumer"), default="classic")
    return parser.parse_args(argv)


def main() -> int:
    args = arguments()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    seconds = args.minutes * 60
    planned = plan(seed, seconds)
    print(f"seed {seed}: {len(planned)} faults planned in {args.minutes:g} min", flush=True)
    # Ctrl-C and SIGTERM alike unwind through the `finally` that stops everything.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    # A temp dir the postgres server user can traverse, as the test suite's.
    base = Path(tempfile.mkdtemp(prefix="order-viewer-soak-"))
    base.chmod(0o755)
    logs = Path(tempfile.mkdtemp(prefix="order-viewer-soak-logs-"))
    servers = Servers(base / ".stack")
    soak: Soak | None = None
    try:
        servers.up()
        soak = Soak(servers, logs, seed, args.group_protocol)
        soak.start(args.rate)
        soak.say(f"producing {args.rate} orders/s; logs: {logs}")
        soak.run_faults(planned, seconds)
        if (left := seconds - soak.elapsed()) > 0:
            soak.now_doing = "no more faults"
            time.sleep(left)
        soak.stop(FLUSH_SECONDS)
        soak.say(f"{len(soak.faults)} faults; production stopped, draining")
        outcome = audit(soak, args.drain_seconds)
        report(soak, outcome, args.minutes, args.rate, args.group_protocol)
        failures = outcome.failures() + [
            f"fault {fault.number} ({fault.kind}) not recovered within {RECOVERY_LIMIT_SECONDS} s"
            for fault in soak.faults
            if fault.recovered is None
        ]
        print("\n" + ("FAILED:\n  " + "\n  ".join(failures) if failures else "OK"))
        print(f"seed {seed}; logs: {logs}")
        return 1 if failures else 0
    except KeyboardInterrupt:
        done = len(soak.faults) if soak is not None else 0
        print(f"\ninterrupted after {done} faults; seed {seed}; logs: {logs}", flush=True)
        return 130
    finally:
        if soak is not None:
            # Waiting for acknowledgements only on the way to the audit: a second Ctrl-C
            # during a long wait here would leave the servers running.
            soak.stop(0)
            for service in soak.services:
                service.kill()
        for name in ("postgres.log", "kafka.log"):
            if (servers.directory / name).is_file():
                shutil.copy(servers.directory / name, logs / name)
        servers.destroy()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
