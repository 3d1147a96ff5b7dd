"""Runs every benchmark on the local stack and prints the figures (see docs/PERFORMANCE.md).

Uses a database and topics of its own (`order_viewer_bench`, `bench-*`), so a developer's data
is left alone. Timings here, never in tests: the machine is shared and noisy, so ratios measured
in the same run are the figures to trust.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import httpx
import psycopg
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from rich.console import Console
from rich.progress import Progress

from devstack.identity import AUDIENCE, ISSUER, IdentityProvider, serve_jwks
from order_viewer import logs as log_setup
from order_viewer.access import audit_order_read
from order_viewer.auth import ORDERS_READ_PII, Principal, new_token, token_digest
from order_viewer.broker import client_config
from order_viewer.cache import OrderCache
from order_viewer.config import Settings
from order_viewer.consumer import by_size
from order_viewer.generate import encode, make_order
from order_viewer.metrics import Metrics
from order_viewer.model import MAX_ITEMS, PreparedOrder, parse_order
from order_viewer.ports import Message
from order_viewer.service import prepare_batch
from order_viewer.store import migrate

ROOT = Path(__file__).resolve().parents[1]
AUTH_ROUNDS = 3
AUDIT_LINES = 50_000
WRK_SCRIPT = Path(__file__).with_name("random_ids.lua")
console = Console(stderr=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Bench:
    admin_url: str
    database_url: str
    bootstrap: str
    topic: str

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.database_url, autocommit=True)

    def count_orders(self) -> int:
        with self.connect() as connection:
            row = connection.execute("SELECT count(*) FROM orders").fetchone()
            assert row is not None
            return int(row[0])

    def truncate(self) -> None:
        with self.connect() as connection:
            connection.execute("TRUNCATE orders, delivery, payment, items")

    def settle(self) -> None:
        """Leave no work behind for autovacuum and the checkpointer, which would otherwise
        compete with the next run. (The local stack grants the checkpoint right; elsewhere
        it is skipped.)"""
        with self.connect() as connection:
            connection.execute("VACUUM (ANALYZE) orders, delivery, payment, items")
            with suppress(psycopg.errors.InsufficientPrivilege):
                connection.execute("CHECKPOINT")


def fresh_database(base_url: str) -> str:
    """Drop and create `order_viewer_bench` next to the configured database; its URL."""
    name = "order_viewer_bench"
    with psycopg.connect(base_url, autocommit=True) as connection:
        # An autovacuum worker left busy by the previous run belongs to the superuser, which
        # FORCE may not terminate; it finishes within seconds.
        for attempt in range(60):
            try:
                connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                break
            except psycopg.errors.InsufficientPrivilege:
                if attempt == 59:
                    raise
                console.print("waiting for autovacuum to leave the previous bench database")
                time.sleep(1)
        connection.execute(f"CREATE DATABASE {name}")
    url = re.sub(r"/[^/?]*(\?|$)", rf"/{name}\1", base_url.rsplit("@", 1)[1], count=1)
    return base_url.rsplit("@", 1)[0] + "@" + url


class ServiceRun:
    """`order-viewer serve` as a subprocess with its own port and settings."""

    def __init__(self, bench: Bench, log: Path, **settings: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "DATABASE_URL": bench.database_url,
            "KAFKA_BOOTSTRAP_SERVERS": bench.bootstrap,
            "KAFKA_TOPIC": bench.topic,
            "KAFKA_DLQ_TOPIC": f"{bench.topic}.dlq",
            "KAFKA_GROUP_ID": f"{bench.topic}-group",
            "HTTP_PORT": str(self.port),
            **settings,
        }
        self.log = log
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                [str(ROOT / ".venv" / "bin" / "order-viewer"), "serve"],
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        self.started = time.perf_counter()

    def wait_ready(self, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"service exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.perf_counter()
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        sys.exit("service not ready in time")

    def memory_kib(self, field: str) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
        assert match is not None
        return int(match.group(1))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


def generate(count: int, seed: int, item_count: int | None = None) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    messages = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("generating orders", total=count)
        for number in range(count):
            order = make_order(rng, item_count=item_count)
            messages.append((order["order_uid"].encode(), encode(order)))
            if number % 500 == 0:
                progress.update(task, completed=number)
    return messages


def produce(bench: Bench, messages: list[tuple[bytes, bytes]]) -> None:
    producer = Producer(
        {"bootstrap.servers": bench.bootstrap, "linger.ms": 50, "compression.type": "lz4"}
    )
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("producing to Kafka", total=len(messages))
        for number, (key, value) in enumerate(messages):
            while True:
                try:
                    producer.produce(bench.topic, key=key, value=value)
                    break
                except BufferError:
                    producer.poll(0.05)
            if number % 5000 == 0:
                producer.poll(0)
                progress.update(task, completed=number)
        producer.flush()


def copy_rows(orders: list[PreparedOrder]) -> dict[str, str]:
    """The four tables' rows as COPY text, prepared before the clock starts."""
    buffers = {name: io.StringIO() for name in ("orders", "delivery", "payment", "items")}
    # Quoted, because in CSV an unquoted empty field is NULL and a quoted one the empty string.
    writers = {name: csv.writer(buffer, quoting=csv.QUOTE_ALL) for name, buffer in buffers.items()}
    for prepared in orders:
        order, uid = prepared.order, prepared.order.order_uid
        writers["orders"].writerow((
            uid, order.track_number, order.entry, order.locale, order.internal_signature,
            order.customer_id, order.delivery_service, order.shardkey, order.sm_id,
            order.date_created.isoformat(), order.oof_shard, "\\x" + prepared.sha256.hex(),
            prepared.partition, prepared.offset, prepared.document.decode(),
        ))  # fmt: skip
        d = order.delivery
        writers["delivery"].writerow(
            (uid, d.name, d.phone, d.zip, d.city, d.address, d.region, d.email)
        )
        p = order.payment
        writers["payment"].writerow((
            uid, p.transaction, p.request_id, p.currency, p.provider, p.amount, p.payment_dt,
            p.bank, p.delivery_cost, p.goods_total, p.custom_fee,
        ))  # fmt: skip
        for position, i in enumerate(order.items):
            writers["items"].writerow((
                uid, position, i.chrt_id, i.track_number, i.price, i.rid, i.name, i.sale,
                i.size, i.total_price, i.nm_id, i.brand, i.status,
            ))  # fmt: skip
    return {name: buffer.getvalue() for name, buffer in buffers.items()}


COPY_COLUMNS = {
    "orders": "order_uid, track_number, entry, locale, internal_signature, customer_id, "
    "delivery_service, shardkey, sm_id, date_created, oof_shard, content_sha256, "
    "kafka_partition, kafka_offset, document",
    "delivery": "order_uid, name, phone, zip, city, address, region, email",
    "payment": "order_uid, transaction, request_id, currency, provider, amount, payment_dt, "
    "bank, delivery_cost, goods_total, custom_fee",
    "items": "order_uid, position, chrt_id, track_number, price, rid, name, sale, size, "
    "total_price, nm_id, brand, status",
}


def time_copy(bench: Bench, rows: dict[str, str]) -> float:
    with bench.connect() as connection:
        started = time.perf_counter()
        with connection.transaction(), connection.cursor() as cursor:
            for table in ("orders", "delivery", "payment", "items"):
                with cursor.copy(
                    f"COPY {table} ({COPY_COLUMNS[table]}) FROM STDIN (FORMAT csv)"
                ) as copy:
                    copy.write(rows[table])
        return time.perf_counter() - started


def time_per_order_transactions(bench: Bench, orders: list[PreparedOrder]) -> float:
    """What most implementations do: one transaction per order, a statement per row."""
    with bench.connect() as connection:
        started = time.perf_counter()
        for prepared in orders:
            order = prepared.order
            with connection.transaction(), connection.cursor() as cursor:
                cursor.execute(
                    "INSERT INTO orders (order_uid, track_number, entry, locale, "
                    "internal_signature, customer_id, delivery_service, shardkey, sm_id, "
                    "date_created, oof_shard, content_sha256, kafka_partition, kafka_offset, "
                    "document) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (order.order_uid, order.track_number, order.entry, order.locale,
                     order.internal_signature, order.customer_id, order.delivery_service,
                     order.shardkey, order.sm_id, order.date_created, order.oof_shard,
                     prepared.sha256, prepared.partition, prepared.offset,
                     prepared.document.decode()),
                )  # fmt: skip
                d = order.delivery
                cursor.execute(
                    "INSERT INTO delivery VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    (order.order_uid, d.name, d.phone, d.zip, d.city, d.address, d.region, d.email),
                )
                p = order.payment
                cursor.execute(
                    "INSERT INTO payment VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (order.order_uid, p.transaction, p.request_id, p.currency, p.provider,
                     p.amount, p.payment_dt, p.bank, p.delivery_cost, p.goods_total, p.custom_fee),
                )  # fmt: skip
                for position, i in enumerate(order.items):
                    cursor.execute(
                        "INSERT INTO items VALUES "
                        "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (order.order_uid, position, i.chrt_id, i.track_number, i.price, i.rid,
                         i.name, i.sale, i.size, i.total_price, i.nm_id, i.brand, i.status),
                    )  # fmt: skip
        return time.perf_counter() - started


@contextmanager
def peak_rss_sampler(run: ServiceRun) -> Iterator[Callable[[], int]]:
    """VmHWM is the kernel's own peak; read it while the process lives."""
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.5):
            try:
                peak = max(peak, run.memory_kib("VmHWM"))
            except (FileNotFoundError, AssertionError):
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: peak
    finally:
        done.set()
        thread.join()


def ingest_benchmark(
    bench: Bench, messages: list[tuple[bytes, bytes]], logs: Path
) -> dict[str, Any]:
    orders = [
        PreparedOrder.of(parse_order(value), 0, offset)
        for offset, (_, value) in enumerate(messages)
    ]
    rows = copy_rows(orders)
    console.print("timing COPY of the same rows (the ceiling)")
    copy_seconds = time_copy(bench, rows)
    bench.truncate()
    sample = orders[: min(len(orders), 10_000)]
    console.print(f"timing a one-transaction-per-order writer on {len(sample):,} orders")
    per_order_seconds = time_per_order_transactions(bench, sample)
    bench.truncate()

    console.print(f"timing order-viewer serve on {len(orders):,} orders")
    run = ServiceRun(bench, logs / "ingest.log", CACHE_CAPACITY="100000")
    with peak_rss_sampler(run) as peak, Progress(console=console, transient=True) as progress:
        ready = run.wait_ready()
        task = progress.add_task("stored", total=len(orders))
        stored = 0
        while stored < len(orders):
            time.sleep(0.2)
            stored = bench.count_orders()
            progress.update(task, completed=stored)
        finished = time.perf_counter()
        peak_kib = max(peak(), run.memory_kib("VmHWM"))
    run.stop()
    service_rate = len(orders) / (finished - ready)
    return {
        "orders": len(orders),
        "service_rate": service_rate,
        "service_rate_from_start": len(orders) / (finished - run.started),
        "copy_rate": len(orders) / copy_seconds,
        "per_order_rate": len(sample) / per_order_seconds,
        "peak_rss_mib": peak_kib / 1024,
    }


def ingest_metrics_cost(messages: list[tuple[bytes, bytes]]) -> float:
    """Share of a batch's preparation that its consumer-side metrics cost (they are per batch)."""
    batch_messages = [
        Message("bench", 0, offset, key, value)
        for offset, (key, value) in enumerate(messages[:2000])
    ]
    started = time.perf_counter()
    batch = prepare_batch(batch_messages)
    preparing = time.perf_counter() - started
    metrics = Metrics(OrderCache(0))

    def count() -> None:
        metrics.messages_consumed.inc(len(batch_messages))
        metrics.batch_size.observe(len(batch_messages))
        metrics.orders_stored.inc(len(batch.orders))
        metrics.orders_replaced.inc(0)
        metrics.order_stored(max(p.order.date_created for p, _ in batch.orders.values()))
        metrics.write_duration.observe(preparing)

    runs = 100
    started = time.perf_counter()
    for _ in range(runs):
        count()
    return (time.perf_counter() - started) / runs / preparing


LARGE_ORDERS = 1500


def with_new_topic(bench: Bench, settings: Settings) -> Bench:
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(client_config(settings))
    partitions = settings.kafka_topic_partitions
    created = admin.create_topics(
        [NewTopic(name, num_partitions=partitions) for name in (topic, f"{topic}.dlq")]
    )
    for future in created.values():
        future.result()
    return replace(bench, topic=topic)


def prepared_expansion(messages: list[tuple[bytes, bytes]], batch_bytes: int) -> float:
    """Bytes a validated batch holds per byte of its messages (tracemalloc)."""
    batch = by_size(
        [Message("bench", 0, offset, key, value) for offset, (key, value) in enumerate(messages)],
        batch_bytes,
    )[0]
    tracemalloc.start()
    prepared = prepare_batch(batch)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(prepared.orders) == len(batch)
    return held / sum(len(message.value or b"") for message in batch)


def large_orders_benchmark(
    bench: Bench, settings: Settings, seed: int, logs: Path
) -> dict[str, Any]:
    """A backlog of the largest valid orders drained with batches cut at the default
    BATCH_MAX_BYTES and at 16 MiB (each with a read-ahead of two batches): peak memory and
    time. The cache keeps its defaults, so it fills up to CACHE_MAX_BYTES in both."""
    messages = generate(LARGE_ORDERS, seed, item_count=MAX_ITEMS)
    runs: dict[int, dict[str, float]] = {}
    for batch_bytes in (settings.batch_max_bytes, 16 * 1024 * 1024):
        bench.truncate()
        bench.settle()
        own = with_new_topic(bench, settings)
        produce(own, messages)
        console.print(
            f"large orders: {LARGE_ORDERS:,} of {MAX_ITEMS:,} items, "
            f"batches of {batch_bytes // 2**20} MiB"
        )
        run = ServiceRun(own, logs / f"large-{batch_bytes}.log", BATCH_MAX_BYTES=str(batch_bytes))
        with peak_rss_sampler(run) as peak, Progress(console=console, transient=True) as progress:
            ready = run.wait_ready()
            task = progress.add_task("stored", total=LARGE_ORDERS)
            stored = 0
            while stored < LARGE_ORDERS:
                time.sleep(0.2)
                stored = own.count_orders()
                progress.update(task, completed=stored)
            finished = time.perf_counter()
            peak_kib = max(peak(), run.memory_kib("VmHWM"))
        run.stop()
        runs[batch_bytes] = {"seconds": finished - ready, "peak_rss_mib": peak_kib / 1024}
    return {
        "megabytes": sum(len(value) for _, value in messages) / 1e6,
        "expansion": prepared_expansion(messages, settings.batch_max_bytes),
        "runs": runs,
    }


def wrk(
    url: str, ids_file: Path, connections: int, seconds: int, token: str | None = None
) -> dict[str, float]:
    # One wrk thread: the server has one core to itself and the load generator the other.
    headers = ["-H", f"Authorization: Bearer {token}"] if token is not None else []
    output = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            *headers,
            "-s",
            str(WRK_SCRIPT),
            url,
        ],
        env={**os.environ, "IDS_FILE": str(ids_file)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    per_second = re.search(r"Requests/sec:\s+([\d.]+)", output)
    assert per_second is not None, output
    rate = float(per_second.group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", output)
    assert p99 is not None, output
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "rate": rate,
        "p99_ms": float(p99.group(1)) * scale,
        "errors": float(errors.group(1)) if errors else 0.0,
    }


def warm_up_seconds(log: Path) -> float:
    match = re.search(r"cache warmed with (\d+) orders in ([\d.]+) s", log.read_text())
    assert match is not None
    return float(match.group(2))


def newest_ids_file(bench: Bench, count: int, logs: Path) -> Path:
    """The ids of the `count` newest orders, one a line, for random_ids.lua."""
    with bench.connect() as connection:
        ids = [
            row[0]
            for row in connection.execute(
                "SELECT order_uid FROM orders ORDER BY date_created DESC, order_uid LIMIT %s",
                (count,),
            )
        ]
    ids_file = logs / "ids.txt"
    ids_file.write_text("\n".join(ids) + "\n")
    return ids_file


def auth_benchmark(bench: Bench, cached: int, seconds: int, logs: Path) -> dict[str, Any]:
    """Cache hits without authentication, with a token of a file (whole and masked views) and
    with a JWT, with and without audit lines (LOG_LEVEL=WARNING drops those of reads)."""
    ids_file = newest_ids_file(bench, cached, logs)
    provider = IdentityProvider()
    tokens = {"whole": new_token(), "masked": new_token()}
    tokens_file = logs / "tokens.txt"
    tokens_file.write_text(
        f"whole:{token_digest(tokens['whole'])}:orders:read:pii\n"
        f"masked:{token_digest(tokens['masked'])}:orders:read\n"
    )
    token_file = {"HTTP_AUTH": "token", "HTTP_TOKENS_FILE": str(tokens_file)}
    results: dict[str, dict[str, float]] = {}
    with serve_jwks(provider) as jwks_url:
        jwt_settings = {
            "HTTP_AUTH": "jwt",
            "HTTP_JWT_JWKS_URL": jwks_url,
            "HTTP_JWT_ISSUER": ISSUER,
            "HTTP_JWT_AUDIENCE": AUDIENCE,
        }
        jwt_token = provider.token(scope="orders:read:pii", exp=2**31 - 1)
        runs: dict[str, tuple[dict[str, str], str | None]] = {
            "none": ({}, None),
            "token": (token_file, tokens["whole"]),
            "token, masked": (token_file, tokens["masked"]),
            "jwt": (jwt_settings, jwt_token),
            # Reads pass without an audit line: what authentication alone costs.
            "jwt, LOG_LEVEL=WARNING": ({**jwt_settings, "LOG_LEVEL": "WARNING"}, jwt_token),
            "token, LOG_LEVEL=WARNING": ({**token_file, "LOG_LEVEL": "WARNING"}, tokens["whole"]),
        }
        # All running at once and measured in turns, best of AUTH_ROUNDS: on a shared machine
        # the load of others drifts over minutes, and one run after the other would charge
        # that drift to whichever setting came last.
        services = {
            name: ServiceRun(
                bench,
                logs / f"auth-{re.sub(r'[^a-zA-Z]+', '-', name)}.log",
                CACHE_CAPACITY=str(cached),
                **settings,
            )
            for name, (settings, _) in runs.items()
        }
        for name, run in services.items():
            run.wait_ready()
            # Untimed, long enough for every order to be read once (masked views computed).
            wrk(run.url, ids_file, 64, 5, runs[name][1])
        for round_number in range(1, AUTH_ROUNDS + 1):
            for name, run in services.items():
                console.print(f"HTTP auth, round {round_number}: HTTP_AUTH={name}, {seconds} s")
                measured = wrk(run.url, ids_file, 64, seconds, runs[name][1])
                if name not in results or measured["rate"] > results[name]["rate"]:
                    results[name] = measured
        for run in services.values():
            run.stop()
    return results


def audit_line_cost(log_format: Literal["console", "json"], logs_dir: Path) -> dict[str, float]:
    """Microseconds per audit line with the service's log set-up, in this process: on the thread
    that logs (in the service, the event loop) and in CPU of all threads (the writer's
    formatting and writes included). Steadier than wrk on a shared machine."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    principal = Principal("whole", frozenset({ORDERS_READ_PII}))
    with (logs_dir / f"audit-{log_format}.log").open("w") as output:
        with redirect_stderr(output):
            log_setup.configure("INFO", log_format)
        (handler,) = root.handlers
        assert isinstance(handler, log_setup.BackgroundHandler)
        try:
            thread, process = time.thread_time(), time.process_time()
            for number in range(AUDIT_LINES):
                audit_order_read(principal, f"/order/{number:020d}", 200, "whole", "127.0.0.1")
            thread = time.thread_time() - thread
            handler.flush()
            process = time.process_time() - process
        finally:
            handler.stop()
            root.handlers = saved[0]
            root.setLevel(saved[1])
    return {"thread_us": thread / AUDIT_LINES * 1e6, "process_us": process / AUDIT_LINES * 1e6}


def http_benchmark(bench: Bench, cached: int, seconds: int, logs: Path) -> dict[str, Any]:
    ids_file = newest_ids_file(bench, cached, logs)

    console.print(f"HTTP: cache of {cached:,} orders, wrk with 64 connections for {seconds} s")
    hit: dict[str, dict[str, float]] = {}
    for metrics in ("false", "true"):
        hits = ServiceRun(
            bench, logs / f"hits-metrics-{metrics}.log", CACHE_CAPACITY=str(cached),
            METRICS_ENABLED=metrics,
        )  # fmt: skip
        hits.wait_ready()
        warm = warm_up_seconds(hits.log)
        rss_cached = hits.memory_kib("VmRSS")
        wrk(hits.url, ids_file, 64, 3)  # untimed: connections, caches and branch predictors warm
        hit[metrics] = wrk(hits.url, ids_file, 64, seconds)
        hits.stop()

    console.print("HTTP: no cache (every request reads PostgreSQL)")
    misses = ServiceRun(bench, logs / "misses.log", CACHE_CAPACITY="0")
    misses.wait_ready()
    rss_empty = misses.memory_kib("VmRSS")
    wrk(misses.url, ids_file, 64, 3)
    miss = wrk(misses.url, ids_file, 64, seconds)
    misses.stop()
    return {
        "cached": cached,
        "hit": hit["true"],
        "hit_without_metrics": hit["false"],
        "miss": miss,
        "warm_up_seconds": warm,
        "bytes_per_cached_order": (rss_cached - rss_empty) * 1024 / cached,
    }


def print_auth(
    results: dict[str, dict[str, float]], lines: dict[str, dict[str, float]], cached: int
) -> None:
    print(
        f"\n## Authentication on cache hits, {cached:,} orders, wrk -t1 -c64, "
        f"best of {AUTH_ROUNDS} turns\n"
    )
    print("| HTTP_AUTH | requests/s | vs. none | p99 ms | non-2xx |")
    print("|---|---:|---:|---:|---:|")
    base = results["none"]["rate"]
    for name, run in results.items():
        print(
            f"| {name} | {run['rate']:,.0f} | {run['rate'] / base:.2f} | "
            f"{run['p99_ms']:.2f} | {run['errors']:.0f} |"
        )
    print("\n| audit line, LOG_FORMAT | µs on the logging thread | µs of CPU in all |")
    print("|---|---:|---:|")
    for log_format, cost in lines.items():
        print(f"| {log_format} | {cost['thread_us']:.2f} | {cost['process_us']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--orders", type=int, default=200_000)
    parser.add_argument("--cached", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=10, help="duration of each wrk run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--only-auth",
        action="store_true",
        help="only the cost of authentication on cache hits (after storing --orders orders)",
    )
    arguments = parser.parse_args()

    settings = Settings()
    base_url = str(settings.database_url)
    database = fresh_database(base_url)
    migrate(database)
    unnamed = Bench(base_url, database, settings.kafka_bootstrap_servers, topic="")
    bench = with_new_topic(unnamed, settings)
    logs = Path(tempfile.mkdtemp(prefix="order-viewer-bench-"))
    messages = generate(arguments.orders, arguments.seed)
    produce(bench, messages)

    ingest = ingest_benchmark(bench, messages, logs)
    bench.settle()
    cached = min(arguments.cached, arguments.orders)
    auth = auth_benchmark(bench, cached, arguments.seconds, logs)
    lines = {log_format: audit_line_cost(log_format, logs) for log_format in ("console", "json")}
    print_auth(auth, lines, cached)
    if arguments.only_auth:
        return
    http = http_benchmark(bench, cached, arguments.seconds, logs)
    metrics_share = ingest_metrics_cost(messages)
    large = large_orders_benchmark(bench, settings, arguments.seed, logs)

    print(f"\n## Ingest of {ingest['orders']:,} orders (3 partitions)\n")
    print("| writer | orders/s | vs. COPY |")
    print("|---|---:|---:|")
    for name, key in (
        ("plain COPY of the same rows (ceiling)", "copy_rate"),
        ("order-viewer serve (Kafka to PostgreSQL, from readiness)", "service_rate"),
        ("order-viewer serve (from process start)", "service_rate_from_start"),
        ("one transaction per order", "per_order_rate"),
    ):
        print(f"| {name} | {ingest[key]:,.0f} | {ingest[key] / ingest['copy_rate']:.2f} |")
    print(
        f"\norder-viewer vs. one transaction per order: "
        f"{ingest['service_rate'] / ingest['per_order_rate']:.1f}x; "
        f"peak RSS of the service: {ingest['peak_rss_mib']:.0f} MiB; consumer-side metrics "
        f"cost {metrics_share:.2%} of the time to prepare their batch"
    )
    print(f"\n## HTTP lookups, {http['cached']:,} orders, wrk -t1 -c64\n")
    print("| path | requests/s | p99 ms | non-2xx |")
    print("|---|---:|---:|---:|")
    for name in ("hit", "miss"):
        rate, p99, errors = (http[name][key] for key in ("rate", "p99_ms", "errors"))
        print(f"| cache {name} | {rate:,.0f} | {p99:.2f} | {errors:.0f} |")
    without = http["hit_without_metrics"]["rate"]
    print(
        f"\nmetrics cost on cache hits: {1 - http['hit']['rate'] / without:.1%} of throughput "
        f"({without:,.0f} req/s with METRICS_ENABLED=false)"
    )
    print(
        f"cache hit vs. miss: {http['hit']['rate'] / http['miss']['rate']:.1f}x; "
        f"warm-up of {http['cached']:,} orders: {http['warm_up_seconds']:.2f} s; "
        f"memory per cached order: {http['bytes_per_cached_order']:,.0f} bytes"
    )
    print(
        f"\n## Backlog of {LARGE_ORDERS:,} orders of {MAX_ITEMS:,} items "
        f"({large['megabytes']:,.0f} MB)\n"
    )
    print("| BATCH_MAX_BYTES | drained in s | orders/s | peak RSS MiB |")
    print("|---:|---:|---:|---:|")
    for batch_bytes, run in large["runs"].items():
        print(
            f"| {batch_bytes // 2**20} MiB | {run['seconds']:.1f} | "
            f"{LARGE_ORDERS / run['seconds']:,.0f} | {run['peak_rss_mib']:.0f} |"
        )
    print(
        f"\na validated batch holds {large['expansion']:.1f}x the bytes of its messages "
        "(tracemalloc)"
    )
    print(f"\nlogs: {logs}")


if __name__ == "__main__":
    main()
