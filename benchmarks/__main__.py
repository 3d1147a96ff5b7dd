"""Runs every benchmark on the local stack and prints the figures (see docs/PERFORMANCE.md).

Uses a database and topics of its own (`order_viewer_bench`, `bench-*`), so a developer's data
is left alone. Timings here, never in tests: the machine is shared and noisy, so ratios measured
in the same run are the figures to trust.
"""

from __future__ import annotations

import argparse
import csv
import gc
import hashlib
import io
import itertools
import os
import random
import re
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal

import httpx
import psycopg
from prometheus_client.parser import text_string_to_metric_families
from pydantic import PostgresDsn
from rich.progress import Progress

from benchmarks import freshness, profiles
from benchmarks.harness import (
    BareServerRun,
    Bench,
    HeldBacklog,
    ServerProcess,
    ServiceRun,
    console,
    fresh_database,
    generate,
    newest_ids_file,
    peak_rss_sampler,
    produce,
    wait_stored,
    warm_up_seconds,
    with_new_topic,
    wrk,
)
from benchmarks.tracing import (
    decision_cost,
    http_tracing_cost,
    print_traced_ingest,
    print_tracing,
    print_tracing_http,
    traced_ingest_cost,
    tracing_cost,
)
from devstack.identity import AUDIENCE, ISSUER, IdentityProvider, serve_jwks
from order_viewer import bootstrap
from order_viewer.adapters.cache import CachedOrder, MaskedViews, OrderCache
from order_viewer.adapters.http.access import audit_order_read
from order_viewer.adapters.http.auth import ORDERS_READ_PII, Principal
from order_viewer.adapters.http.auth.tokens import new_token, token_digest
from order_viewer.adapters.kafka.consumer import by_size
from order_viewer.adapters.metrics import Metrics
from order_viewer.adapters.postgres.migrate import migrate
from order_viewer.adapters.postgres.reader import newest_documents
from order_viewer.config import Settings
from order_viewer.domain.model import MAX_ITEMS, PreparedOrder, order_json, parse_order
from order_viewer.service.ingest import prepare_batch
from order_viewer.service.lookup import warm_up
from order_viewer.service.ports import ConsumedMessage

AUTH_ROUNDS = 3
HTTP_ROUNDS = 3
AUDIT_LINES = 50_000


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

    # The same topic read twice, by a group of its own each time: without trails, then with
    # them (the default), whose run the other sections read.
    console.print(f"timing order-viewer serve on {len(orders):,} orders, trails off")
    without_trails = time_service(
        bench, len(orders), logs / "ingest-without-trails.log", "without-trails", "false"
    )
    bench.truncate()
    console.print(f"timing order-viewer serve on {len(orders):,} orders")
    with_trails = time_service(bench, len(orders), logs / "ingest.log", "with-trails", "true")
    return {
        "orders": len(orders),
        **with_trails,
        "without_trails_rate": without_trails["service_rate"],
        "trail_entries": bench.count_trail_entries(),
        "copy_rate": len(orders) / copy_seconds,
        "per_order_rate": len(sample) / per_order_seconds,
    }


def time_service(bench: Bench, count: int, log: Path, group: str, trails: str) -> dict[str, float]:
    """Run order-viewer serve over the topic until `count` orders are stored."""
    run = ServiceRun(
        bench,
        log,
        CACHE_CAPACITY="100000",
        KAFKA_GROUP_ID=f"{bench.topic}-{group}",
        ORDER_TRAIL_ENABLED=trails,
    )
    with peak_rss_sampler(run) as peak:
        ready = run.wait_ready()
        finished = wait_stored(bench, run, count)
        peak_kib = max(peak(), run.memory_kib("VmHWM"))
    run.stop()
    return {
        "service_rate": count / (finished - ready),
        "service_rate_from_start": count / (finished - run.started),
        "peak_rss_mib": peak_kib / 1024,
    }


def ingest_metrics_cost(messages: list[tuple[bytes, bytes]]) -> float:
    """Share of a batch's preparation that its consumer-side metrics cost (they are per batch)."""
    batch_messages = [
        ConsumedMessage("bench", 0, offset, key, value)
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


def freshness_benchmark(
    bench: Bench, settings: Settings, rate: int, seconds: int, logs: Path
) -> dict[str, Any]:
    """Freshness at one rate, against a service of default settings on a topic of its own."""
    own = with_new_topic(bench, settings)
    # Seeds of their own: an order already stored would be served at once.
    messages = generate(rate * seconds, seed=1_000_000 + rate)
    run = ServiceRun(own, logs / f"freshness-{rate}.log")
    run.wait_ready()
    console.print(f"freshness at {rate:,} orders/s for {seconds} s")
    result: dict[str, Any] = freshness.measure(
        own, run.url, messages, rate, logs / f"freshness-{rate}.csv"
    )
    run.stop()
    bench.settle()
    return result


def collector_pauses(bench: Bench, cached: int) -> dict[str, float]:
    """Milliseconds of a full pass of Python's cycle collector (it holds the GIL: HTTP and
    ingest stop meanwhile) over the service's objects: its modules and app, and a cache of
    `cached` orders filled from the bench database; then after gc.freeze(), as the service
    does once warm."""
    settings = Settings(
        database_url=PostgresDsn(bench.database_url),
        cache_capacity=cached,
        kafka_bootstrap_servers=bench.bootstrap,
    )
    parts = bootstrap.build(settings, None)
    bootstrap.close(parts)
    # A cache of its own: the service's stays suspended until its change listener listens.
    cache = OrderCache(cached, settings.cache_max_bytes)
    warm_up(cache, partial(newest_documents, bench.database_url), parts.database, parts.metrics)
    assert len(cache) == cached

    def full_pass() -> float:
        started = time.perf_counter()
        gc.collect()
        return (time.perf_counter() - started) * 1000

    before = min(full_pass() for _ in range(3))
    gc.freeze()
    after = min(full_pass() for _ in range(3))
    gc.unfreeze()
    return {"objects": len(gc.get_objects()), "before_ms": before, "after_ms": after}


def stored_so_far(run: ServiceRun) -> int:
    """Orders the service has stored, from its own counter: counting the table every second
    would itself slow the ingest as the table grows."""
    for family in text_string_to_metric_families(httpx.get(f"{run.url}/metrics").text):
        if family.name == "order_viewer_orders_stored":
            return int(
                sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
            )
    raise AssertionError("no order_viewer_orders_stored_total in /metrics")


def when_reached(points: list[tuple[float, int]], target: float) -> float:
    """When the count of `points` (time, count) reached `target`, interpolated linearly
    between the two samples around it."""
    for (before, low), (after, high) in itertools.pairwise(points):
        if high >= target:
            return before + (after - before) * (target - low) / (high - low)
    raise ValueError(f"never reached {target}")


def backlog_benchmark(bench: Bench, settings: Settings, count: int, logs: Path) -> dict[str, Any]:
    """A backlog of `count` orders produced first, then drained into empty tables: the rate
    over each fifth of it, to see what grows with the tables."""
    bench.truncate()
    bench.settle()
    own = with_new_topic(bench, settings)
    produce(own, generate(count, seed=2_000_000))
    console.print(f"backlog: draining {count:,} orders into empty tables")
    run = ServiceRun(own, logs / "backlog.log")
    run.wait_ready()
    checkpoints_before = checkpoints(bench)
    vacuums_before = autovacuums(bench)
    # (seconds since ready, orders stored), two a second; and whether a vacuum ran then
    progress_points: list[tuple[float, int]] = [(0.0, 0)]
    vacuuming: list[bool] = [False]
    started = time.perf_counter()
    with Progress(console=console, transient=True) as progress, bench.connect() as watcher:
        # The counters when the drain begins and as each fifth is passed (to half a second;
        # a sample that passes two makes one point)
        points = [profiles.drain_point(watcher, run.process.pid, 0)]
        task = progress.add_task("stored", total=count)
        while progress_points[-1][1] < count:
            time.sleep(0.5)
            progress_points.append((time.perf_counter() - started, stored_so_far(run)))
            vacuuming.append(vacuum_running(watcher))
            progress.update(task, completed=progress_points[-1][1])
            stored = progress_points[-1][1]
            if stored >= count * len(points) / 5 and stored > points[-1].stored:
                points.append(profiles.drain_point(watcher, run.process.pid, stored))
    run.stop()
    vacuums = {table: after - vacuums_before[table] for table, after in autovacuums(bench).items()}
    timed, requested = (
        after - before for after, before in zip(checkpoints(bench), checkpoints_before, strict=True)
    )
    (logs / "backlog.csv").write_text(
        "seconds,stored,vacuum_running\n"
        + "".join(
            f"{at:.1f},{stored},{int(running)}\n"
            for (at, stored), running in zip(progress_points, vacuuming, strict=True)
        )
    )
    fifths = []
    vacuum_shares = []
    previous = 0.0
    for fifth in range(1, 6):
        reached = when_reached(progress_points, count * fifth / 5)
        fifths.append(count / 5 / (reached - previous))
        within = [
            running
            for (at, _), running in zip(progress_points, vacuuming, strict=True)
            if previous < at <= reached
        ]
        vacuum_shares.append(sum(within) / max(1, len(within)))
        previous = reached
    with bench.connect() as connection:
        row = connection.execute(
            "SELECT sum(pg_relation_size(indexrelid)) FROM pg_stat_user_indexes "
            "WHERE relname IN ('orders', 'delivery', 'payment', 'items')"
        ).fetchone()
    assert row is not None
    return {
        "count": count,
        "seconds": progress_points[-1][0],
        "fifths": fifths,
        "checkpoints_timed": timed,
        "checkpoints_requested": requested,
        "index_mib": int(row[0]) / 2**20,
        "vacuum_shares": vacuum_shares,
        "autovacuums": vacuums,
        "costs": [profiles.drain_costs(*pair) for pair in itertools.pairwise(points)],
    }


def vacuum_running(connection: psycopg.Connection[Any]) -> bool:
    """Whether a vacuum (autovacuum's, in a drain) is working in the bench database now."""
    row = connection.execute(
        "SELECT count(*) FROM pg_stat_progress_vacuum WHERE datname = current_database()"
    ).fetchone()
    return row is not None and int(row[0]) > 0


def autovacuums(bench: Bench) -> dict[str, int]:
    """Autovacuum and autoanalyze runs so far, per table of orders."""
    with bench.connect() as connection:
        rows = connection.execute(
            "SELECT relname, autovacuum_count + autoanalyze_count FROM pg_stat_user_tables "
            "WHERE relname IN ('orders', 'delivery', 'payment', 'items')"
        ).fetchall()
    return {str(table): int(runs) for table, runs in rows}


def checkpoints(bench: Bench) -> tuple[int, int]:
    """The server's checkpoints so far: started by time, and requested (by WAL volume, or by a
    CHECKPOINT command, which the benchmark sends none of while a backlog drains)."""
    with bench.connect() as connection:
        row = connection.execute(
            "SELECT checkpoints_timed, checkpoints_req FROM pg_stat_bgwriter"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


LARGE_ORDERS = 1500


def prepared_expansion(messages: list[tuple[bytes, bytes]], batch_bytes: int) -> float:
    """Bytes a validated batch holds per byte of its messages (tracemalloc)."""
    batch = by_size(
        [
            ConsumedMessage("bench", 0, offset, key, value)
            for offset, (key, value) in enumerate(messages)
        ],
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
        with peak_rss_sampler(run) as peak:
            ready = run.wait_ready()
            finished = wait_stored(own, run, LARGE_ORDERS)
            peak_kib = max(peak(), run.memory_kib("VmHWM"))
        run.stop()
        runs[batch_bytes] = {"seconds": finished - ready, "peak_rss_mib": peak_kib / 1024}
    return {
        "megabytes": sum(len(value) for _, value in messages) / 1e6,
        "expansion": prepared_expansion(messages, settings.batch_max_bytes),
        "runs": runs,
    }


def auth_benchmark(bench: Bench, cached: int, seconds: int, logs: Path) -> dict[str, Any]:
    """Cache hits without authentication, with a token of a file (whole and masked views) and
    with a JWT, with and without audit lines (LOG_LEVEL=WARNING drops those of reads): over
    HTTP, and in this process in microseconds of CPU a hit."""
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
        in_process = profiles.auth_hit_cost(bench, ids_file, runs, logs)
    return {"wrk": results, "in_process_us": in_process}


def audit_line_cost(log_format: Literal["console", "json"], logs_dir: Path) -> dict[str, float]:
    """Microseconds per audit line with the service's log set-up, in this process: on the thread
    that logs (in the service, the event loop), which formats the line, and in CPU of all
    threads (the writer's writes included). Steadier than wrk on a shared machine."""
    principal = Principal("whole", frozenset({ORDERS_READ_PII}))
    with (
        (logs_dir / f"audit-{log_format}.log").open("w") as output,
        profiles.service_logging("INFO", log_format, output) as handler,
    ):
        thread, process = time.thread_time(), time.process_time()
        for number in range(AUDIT_LINES):
            audit_order_read(principal, f"{number:020d}", 200, "whole", "127.0.0.1")
        thread = time.thread_time() - thread
        handler.flush()
        process = time.process_time() - process
    return {"thread_us": thread / AUDIT_LINES * 1e6, "process_us": process / AUDIT_LINES * 1e6}


def http_benchmark(bench: Bench, cached: int, seconds: int, logs: Path) -> dict[str, Any]:
    """Cache hits of the service, with and without metrics, against the bare server's ceiling
    (all three running at once, measured in turns, best of HTTP_ROUNDS); then misses."""
    ids_file = newest_ids_file(bench, cached, logs)

    console.print(f"HTTP: cache of {cached:,} orders, wrk with 64 connections for {seconds} s")
    # One after the other, so that each warms up alone and the warm-up time is its own.
    servers: dict[str, ServerProcess] = {}
    for name, metrics in (("hit", "true"), ("hit_without_metrics", "false")):
        servers[name] = ServiceRun(
            bench,
            logs / f"hits-metrics-{metrics}.log",
            CACHE_CAPACITY=str(cached),
            METRICS_ENABLED=metrics,
        )
        ready = servers[name].wait_ready()
        if name == "hit":
            # What an operator waits for: from the process's start to its first ready answer.
            start_to_ready = ready - servers[name].started
    servers["bare"] = BareServerRun(bench, logs / "bare-server.log", ids_file)
    servers["bare"].wait_ready()
    warm = warm_up_seconds(servers["hit"].log)
    rss_cached = servers["hit"].memory_kib("VmRSS")
    results: dict[str, dict[str, float]] = {}
    for server in servers.values():
        wrk(server.url, ids_file, 64, 3)  # untimed: connections, caches and branch predictors warm
    for round_number in range(1, HTTP_ROUNDS + 1):
        for name, server in servers.items():
            console.print(f"HTTP hits, round {round_number}: {name}, {seconds} s")
            measured = wrk(server.url, ids_file, 64, seconds)
            if name not in results or measured["rate"] > results[name]["rate"]:
                results[name] = measured
    for server in servers.values():
        server.stop()

    console.print("HTTP: no cache (every request reads PostgreSQL)")
    misses = ServiceRun(bench, logs / "misses.log", CACHE_CAPACITY="0")
    misses.wait_ready()
    rss_empty = misses.memory_kib("VmRSS")
    wrk(misses.url, ids_file, 64, 3)
    miss = wrk(misses.url, ids_file, 64, seconds)
    misses.stop()
    return {
        "cached": cached,
        **results,
        "in_process_us": profiles.cache_hit_cost(bench, ids_file),
        "miss": miss,
        "warm_up_seconds": warm,
        "start_to_ready_seconds": start_to_ready,
        "bytes_per_cached_order": (rss_cached - rss_empty) * 1024 / cached,
        "bytes_per_cached_order_with_base": rss_cached * 1024 / cached,
    }


ABSENT_IDS = 10_000


def absent_ids_file(bench: Bench, count: int, logs: Path) -> Path:
    """`count` random ids of the generator's shape that no stored order has, one a line."""
    rng = random.Random(2024)
    candidates = [f"{rng.getrandbits(80):020x}" for _ in range(count)]
    with bench.connect() as connection:
        stored = {
            row[0]
            for row in connection.execute(
                "SELECT order_uid FROM orders WHERE order_uid = ANY(%s)", (candidates,)
            )
        }
    ids_file = logs / "absent-ids.txt"
    ids_file.write_text("".join(f"{uid}\n" for uid in candidates if uid not in stored))
    return ids_file


def absent_entry_bytes(length: int, count: int = 100_000) -> float:
    """Bytes an absent id remembered takes in the cache, the id's own string included
    (tracemalloc), for ids of `length` characters."""
    cache = OrderCache(0, absent_capacity=count)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    # Each id a string of its own, as each request's path makes one.
    cache.fill({}, cache.ticket(), [f"{n:0{length}d}" for n in range(count)])
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert cache.absent_entries == count
    return held / count


def cached_order_bytes(messages: list[tuple[bytes, bytes]]) -> dict[str, float]:
    """Bytes an order takes in the caches (tracemalloc), its id's string included: cached whole
    as warm-up caches it, then with its masked view too (read once by a principal who sees
    orders masked). Each body is made as the service makes it and kept by the caches alone."""
    cache, views = OrderCache(len(messages)), MaskedViews(len(messages), None)
    ticket = cache.ticket()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for start in range(0, len(messages), 1000):
        chunk = {}
        for key, value in messages[start : start + 1000]:
            body = order_json(parse_order(value))
            chunk[key.decode()] = CachedOrder.of(body, hashlib.sha256(body).digest())
        cache.warm(chunk, ticket)
    whole = tracemalloc.get_traced_memory()[0] - before
    for key, _ in messages:
        found = cache.look_up(key.decode())
        assert isinstance(found, CachedOrder)
        views.masked(found)
    with_masked = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(cache) == len(views) == len(messages)
    return {"whole": whole / len(messages), "with_masked_view": with_masked / len(messages)}


def absent_benchmark(bench: Bench, cached: int, seconds: int, logs: Path) -> dict[str, Any]:
    """Cache hits against lookups of ids that are not stored, each of a fixed set asked again
    and again: answered from the absent ids the cache remembers (the default settings), and
    with none remembered (CACHE_ABSENT_CAPACITY=0: a query each). Both services run at once and
    are measured in turns, best of HTTP_ROUNDS; then the same in-process, in µs a lookup."""
    ids_file = newest_ids_file(bench, cached, logs)
    absent_file = absent_ids_file(bench, ABSENT_IDS, logs)
    console.print(
        f"absent ids: {ABSENT_IDS:,} ids not stored against hits of {cached:,} cached orders"
    )
    services = {
        remembered: ServiceRun(
            bench,
            logs / f"absent-capacity-{remembered}.log",
            CACHE_CAPACITY=str(cached),
            CACHE_ABSENT_CAPACITY=str(remembered),
        )
        for remembered in (ABSENT_IDS, 0)
    }
    for service in services.values():
        service.wait_ready()
    turns = {
        "hit": (services[ABSENT_IDS], ids_file),
        "absent": (services[ABSENT_IDS], absent_file),
        "absent_unremembered": (services[0], absent_file),
    }
    # Untimed: connections warm, and every absent id asked at least once (remembered).
    for service, lookups in turns.values():
        wrk(service.url, lookups, 64, 3)
    results: dict[str, dict[str, float]] = {}
    for round_number in range(1, HTTP_ROUNDS + 1):
        for name, (service, lookups) in turns.items():
            console.print(f"absent ids, round {round_number}: {name}, {seconds} s")
            measured = wrk(service.url, lookups, 64, seconds)
            if name not in results or measured["rate"] > results[name]["rate"]:
                results[name] = measured
    for service in services.values():
        service.stop()
    return {
        "cached": cached,
        "absent_ids": len(absent_file.read_text().split()),
        **results,
        "in_process_us": profiles.absent_cost(bench, ids_file, absent_file.read_text().split()),
        "bytes_per_absent_id": {length: absent_entry_bytes(length) for length in (20, 64)},
    }


def print_absent(absent: dict[str, Any]) -> None:
    print(
        f"\n## Absent ids: {absent['absent_ids']:,} ids not stored, each asked again and again, "
        f"against hits of {absent['cached']:,} orders; wrk -t1 -c64, best of {HTTP_ROUNDS}\n"
    )
    print("| lookup | requests/s | vs. hits | p99 ms | non-2xx |")
    print("|---|---:|---:|---:|---:|")
    hits = absent["hit"]["rate"]
    for name, label in (
        ("hit", "cache hit"),
        ("absent", "absent id, remembered (default settings)"),
        ("absent_unremembered", "absent id, CACHE_ABSENT_CAPACITY=0 (a query each)"),
    ):
        rate, p99, errors = (absent[name][key] for key in ("rate", "p99_ms", "errors"))
        print(f"| {label} | {rate:,.0f} | {rate / hits:.2f} | {p99:.2f} | {errors:.0f} |")
    in_process, sizes = absent["in_process_us"], absent["bytes_per_absent_id"]
    print(
        f"\nin-process, µs a lookup with a no-op send: hit {in_process['hit']:.2f}, absent id "
        f"{in_process['absent']:.2f}; memory per absent id remembered (tracemalloc): "
        + ", ".join(f"{size:.0f} bytes for ids of {length}" for length, size in sizes.items())
    )


def drain_benchmark(
    bench: Bench,
    settings: Settings,
    cached: int,
    backlog: int,
    *,
    seconds: int,
    logs: Path,
) -> dict[str, Any]:
    """Cache hits of one service, idle and while a backlog of new orders drains into it, and
    the drain's rate alone and under those reads. Two backlogs of `backlog` orders are held in
    open Kafka transactions before the service starts (so it starts idle, with `cached` orders
    warm), then released in turn: the first drains alone, the second under wrk. Each rate is
    taken over the `seconds` after its release, the window wrk runs in."""
    ids_file = newest_ids_file(bench, cached, logs)
    own = with_new_topic(bench, settings)
    # Seeds of their own: the orders are new, not replacements.
    alone, under_reads = (
        HeldBacklog(own, generate(backlog, seed)) for seed in (3_000_000, 4_000_000)
    )
    capacity = cached + 2 * backlog
    run = ServiceRun(
        own,
        logs / "drain.log",
        # Room for every order the backlogs bring: the cached ones stay hits.
        CACHE_CAPACITY=str(capacity),
        CACHE_MAX_BYTES=str(capacity * 16 * 1024),
        # While a backlog is held, the broker's end is beyond what the consumer can read: not a
        # stall to restart the consumer for.
        KAFKA_STALL_TIMEOUT_MS="3600000",
    )
    run.wait_ready()
    console.print(f"drain: {cached:,} orders cached, hits idle for {seconds} s")
    wrk(run.url, ids_file, 64, 3)  # untimed: connections and caches warm
    cores: dict[str, dict[str, float]] = {}
    with cores_busy(run.process.pid, cores, "hits idle"):
        idle = wrk(run.url, ids_file, 64, seconds)

    def drained_in_window(
        backlog_held: HeldBacklog, during: Callable[[], None], label: str
    ) -> float:
        """Orders stored a second in the window after the backlog's release; waits for the rest."""
        before = stored_so_far(run)
        started = time.perf_counter()
        with cores_busy(run.process.pid, cores, label):
            backlog_held.release()
            during()
            in_window = stored_so_far(run) - before
        window = time.perf_counter() - started
        if in_window >= backlog:
            sys.exit(f"the backlog drained within {window:.1f} s: raise --drain-backlog")
        stored = in_window
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("draining the rest", total=backlog)
            while stored < backlog:
                time.sleep(0.5)
                stored = stored_so_far(run) - before
                progress.update(task, completed=stored)
        return in_window / window

    console.print(f"drain: {backlog:,} new orders drain alone")
    alone_rate = drained_in_window(alone, partial(time.sleep, seconds), "the drain alone")
    bench.settle()
    console.print(f"drain: {backlog:,} new orders drain, hits for {seconds} s")
    during: dict[str, float] = {}
    reads_rate = drained_in_window(
        under_reads,
        lambda: during.update(wrk(run.url, ids_file, 64, seconds)),
        "the drain with the hits",
    )
    run.stop()
    return {
        "cached": cached,
        "backlog": backlog,
        "seconds": seconds,
        "idle": idle,
        "during": during,
        "alone_rate": alone_rate,
        "reads_rate": reads_rate,
        "cores": cores,
    }


@contextmanager
def cores_busy(pid: int, into: dict[str, dict[str, float]], label: str) -> Iterator[None]:
    """How many cores the block kept busy: the machine's, the service's serving process `pid`
    and its ingest process, put in `into[label]`."""
    started, machine = time.perf_counter(), profiles.machine_cpu()
    serving, ingest = profiles.service_cpu(pid)
    yield
    elapsed = time.perf_counter() - started
    serving_after, ingest_after = profiles.service_cpu(pid)
    into[label] = {
        "machine": (profiles.machine_cpu() - machine) / elapsed,
        "serving": (serving_after - serving) / elapsed,
        "ingest": (ingest_after - ingest) / elapsed,
    }


def print_auth(auth: dict[str, Any], lines: dict[str, dict[str, float]], cached: int) -> None:
    print(
        f"\n## Authentication on cache hits, {cached:,} orders, wrk -t1 -c64, "
        f"best of {AUTH_ROUNDS} turns; in-process: µs of CPU a hit, best of 3\n"
    )
    print("| HTTP_AUTH | requests/s | vs. none | p99 ms | non-2xx | in-process µs | added µs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    results, in_process = auth["wrk"], auth["in_process_us"]
    base = results["none"]["rate"]
    for name, run in results.items():
        print(
            f"| {name} | {run['rate']:,.0f} | {run['rate'] / base:.2f} | "
            f"{run['p99_ms']:.2f} | {run['errors']:.0f} | {in_process[name]:.2f} | "
            f"{in_process[name] - in_process['none']:.2f} |"
        )
    print("\n| audit line, LOG_FORMAT | µs on the logging thread | µs of CPU in all |")
    print("|---|---:|---:|")
    for log_format, cost in lines.items():
        print(f"| {log_format} | {cost['thread_us']:.2f} | {cost['process_us']:.2f} |")


def print_ingest(ingest: dict[str, Any], metrics_share: float) -> None:
    print(f"\n## Ingest of {ingest['orders']:,} orders (3 partitions)\n")
    print("| writer | orders/s | vs. COPY |")
    print("|---|---:|---:|")
    for name, key in (
        ("plain COPY of the same rows (ceiling)", "copy_rate"),
        ("order-viewer serve (Kafka to PostgreSQL, from readiness)", "service_rate"),
        ("the same, ORDER_TRAIL_ENABLED=false", "without_trails_rate"),
        ("order-viewer serve (from process start)", "service_rate_from_start"),
        ("one transaction per order", "per_order_rate"),
    ):
        print(f"| {name} | {ingest[key]:,.0f} | {ingest[key] / ingest['copy_rate']:.2f} |")
    print(
        f"\norder-viewer vs. one transaction per order: "
        f"{ingest['service_rate'] / ingest['per_order_rate']:.1f}x; "
        f"peak RSS of the service: {ingest['peak_rss_mib']:.0f} MiB; consumer-side metrics "
        f"cost {metrics_share:.2%} of the time to prepare their batch; with trails at "
        f"{ingest['service_rate'] / ingest['without_trails_rate']:.2f} of the rate without, "
        f"{ingest['trail_entries'] / ingest['orders']:.2f} trail rows written per order"
    )


def print_profile(profile: dict[str, Any]) -> None:
    orders = profile["orders"]
    print(
        f"\n### Where the ingest's time goes: {orders:,} orders in batches of "
        f"{profiles.BATCH:,}, in one thread\n"
    )
    print(
        f"validating and serializing: {profile['preparing'] / orders * 1e6:.1f} µs an order; "
        f"writing (COPY, merge, parts, commit): {profile['writing'] / orders * 1e6:.1f} µs an order"
    )
    for thresholds, micros in profile["thresholds"].items():
        print(
            f"validating and serializing with gc thresholds {thresholds}: {micros:.1f} µs an order"
        )
    print("\nPostgreSQL's time by statement (pg_stat_statements):\n")
    print("| ms in all | µs an order | calls | statement |")
    print("|---:|---:|---:|---|")
    for total, calls, query in profile["statements"]:
        print(f"| {total:,.0f} | {total * 1000 / orders:.1f} | {calls:,} | `{query}` |")
    print("\ncProfile of the same, by own time (the profiler slows the Python side):\n")
    print("```")
    print("\n".join(profile["profile"]))
    print("```")


def print_freshness(runs: list[dict[str, Any]], seconds: int) -> None:
    print(
        f"\n## Freshness: broker acknowledgement to first 200, {seconds} s per rate, "
        f"polled every {freshness.POLL_INTERVAL_SECONDS * 1000:.0f} ms, or "
        f"{freshness.POLL_SHARE:.0%} of the wait so far when longer\n"
    )
    print(
        "| orders/s asked | achieved | followed | p50 ms | p99 ms | max ms | never served "
        "| mean batch | mean write ms | write p99 ≤ ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        print(
            f"| {run['rate']:,} | {run['achieved_rate']:,.0f} | {run['samples']:,} | "
            f"{run['p50_ms']:.1f} | {run['p99_ms']:.1f} | {run['max_ms']:.1f} | "
            f"{run['missed'] + run['failed']:.0f} | {run['batch_mean']:.1f} | "
            f"{run['write_mean_ms']:.1f} | {run['write_p99_bucket_ms']:.0f} |"
        )


def print_collector(pauses: dict[str, float], cached: int) -> None:
    print(
        f"\nfull pass of the cycle collector over the service's {pauses['objects']:,} objects "
        f"(app and {cached:,} cached orders): {pauses['before_ms']:.1f} ms; "
        f"after gc.freeze(): {pauses['after_ms']:.1f} ms"
    )


def print_http(http: dict[str, Any], traced: dict[str, float]) -> None:
    print(f"\n## HTTP lookups, {http['cached']:,} orders, wrk -t1 -c64, best of {HTTP_ROUNDS}\n")
    print("| server | requests/s | vs. bare server | p99 ms | non-2xx |")
    print("|---|---:|---:|---:|---:|")
    ceiling = http["bare"]["rate"]
    for name, label in (
        ("bare", "bare granian app, same bodies (ceiling)"),
        ("hit", "cache hit"),
        ("hit_without_metrics", "cache hit, METRICS_ENABLED=false"),
        ("miss", "cache miss (CACHE_CAPACITY=0)"),
    ):
        rate, p99, errors = (http[name][key] for key in ("rate", "p99_ms", "errors"))
        print(f"| {label} | {rate:,.0f} | {rate / ceiling:.2f} | {p99:.2f} | {errors:.0f} |")
    in_process = http["in_process_us"]
    print(
        f"\none cache hit called in-process with a no-op send: the service's app "
        f"{in_process['service']:.2f} µs, the bare app {in_process['bare']:.2f} µs; over HTTP a "
        f"hit takes {1e6 / http['hit']['rate']:.1f} µs of throughput and a bare one "
        f"{1e6 / ceiling:.1f} µs"
    )
    print(
        f"\ncache hit vs. miss: {http['hit']['rate'] / http['miss']['rate']:.1f}x; "
        f"warm-up of {http['cached']:,} orders: {http['start_to_ready_seconds']:.2f} s from "
        f"the process's start to ready ({http['warm_up_seconds']:.2f} s of it filling the "
        f"cache); memory per cached order: {http['bytes_per_cached_order_with_base']:,.0f} "
        f"bytes with the process's base, {http['bytes_per_cached_order']:,.0f} without; "
        f"in-process (tracemalloc) {traced['whole']:,.0f} bytes, "
        f"{traced['with_masked_view']:,.0f} with its masked view"
    )


def print_backlog(backlog: dict[str, Any]) -> None:
    print(
        f"\n## Backlog of {backlog['count']:,} orders drained into empty tables "
        f"({backlog['seconds']:.0f} s)\n"
    )
    print("| fifth | orders/s | vs. first fifth | time with a vacuum running |")
    print("|---:|---:|---:|---:|")
    first = backlog["fifths"][0]
    for number, (rate, share) in enumerate(
        zip(backlog["fifths"], backlog["vacuum_shares"], strict=True), start=1
    ):
        print(f"| {number} | {rate:,.0f} | {rate / first:.2f} | {share:.0%} |")
    print(
        f"\ncheckpoints while it drained: {backlog['checkpoints_requested']} requested (WAL "
        f"volume), {backlog['checkpoints_timed']} by time; the tables' indexes at the end: "
        f"{backlog['index_mib']:,.0f} MiB; autovacuum and autoanalyze runs: "
        + ", ".join(f"{table} {runs}" for table, runs in sorted(backlog["autovacuums"].items()))
    )
    costs = backlog["costs"]
    queries = {
        queryid: query for cost in costs for queryid, (_, query) in cost["by_statement"].items()
    }
    # The statements that took the most of the whole drain, followed fifth by fifth
    top = sorted(
        queries,
        key=lambda queryid: -sum(cost["by_statement"].get(queryid, (0.0, ""))[0] for cost in costs),
    )[:3]
    print("\nWhat an order cost, fifth by fifth (counters taken as each fifth was passed):\n")
    print(
        "| orders stored | service CPU µs | PostgreSQL CPU µs | machine CPU µs | cores busy | "
        "PostgreSQL statements µs | "
        + " | ".join(f"statement {n} µs" for n in range(1, len(top) + 1))
        + " | blocks read | WAL bytes | WAL full pages |"
    )
    print("|---:|---:|---:|---:|---:|---:|" + "---:|" * len(top) + "---:|---:|---:|")
    for cost in costs:
        by_statement = cost["by_statement"]
        print(
            f"| {cost['from']:,}-{cost['to']:,} | {cost['service_cpu_us']:.0f} | "
            + ("n/a" if cost["postgres_cpu_us"] is None else f"{cost['postgres_cpu_us']:.0f}")
            + f" | {cost['machine_cpu_us']:.0f} | "
            f"{cost['cores_busy']:.2f} of {os.cpu_count()} | {cost['statements_us']:.0f} | "
            + " | ".join(f"{by_statement.get(queryid, (0.0, ''))[0]:.1f}" for queryid in top)
            + f" | {cost['blocks_read']:.2f} | {cost['wal_bytes']:,.0f} | "
            f"{cost['wal_full_pages']:.2f} |"
        )
    for number, queryid in enumerate(top, start=1):
        print(f"\nstatement {number}: {queries[queryid][:100]}")


def print_drain(drain: dict[str, Any]) -> None:
    print(
        f"\n## Reads during a drain: {drain['cached']:,} orders "
        f"cached, backlogs of {drain['backlog']:,} new orders, wrk -t1 -c64 for "
        f"{drain['seconds']} s\n"
    )
    print("| cache hits | requests/s | vs. idle | p99 ms | non-2xx |")
    print("|---|---:|---:|---:|---:|")
    idle = drain["idle"]["rate"]
    for label, key in (("idle", "idle"), ("while a backlog drains", "during")):
        run = drain[key]
        print(
            f"| {label} | {run['rate']:,.0f} | {run['rate'] / idle:.2f} | "
            f"{run['p99_ms']:.2f} | {run['errors']:.0f} |"
        )
    print(
        f"\nthe drain's rate over the {drain['seconds']} s after its release: alone "
        f"{drain['alone_rate']:,.0f} orders/s, under the hits {drain['reads_rate']:,.0f} "
        f"orders/s ({drain['reads_rate'] / drain['alone_rate']:.2f} of alone)"
    )
    print(f"\ncores busy, of {os.cpu_count()}:\n")
    print(
        "| window | the machine | serving process | ingest process "
        "| the rest (PostgreSQL, Kafka, wrk) |"
    )
    print("|---|---:|---:|---:|---:|")
    for label, busy in drain["cores"].items():
        rest = busy["machine"] - busy["serving"] - busy["ingest"]
        print(
            f"| {label} | {busy['machine']:.2f} | {busy['serving']:.2f} | "
            f"{busy['ingest']:.2f} | {rest:.2f} |"
        )


def print_large(large: dict[str, Any]) -> None:
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


SECTIONS = (
    "freshness", "auth", "http", "absent", "drain", "tracing", "large", "backlog", "profile",
)  # fmt: skip


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--orders", type=int, default=200_000)
    parser.add_argument("--cached", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=10, help="duration of each wrk run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--only",
        choices=SECTIONS,
        action="append",
        help="run only these sections (repeatable) after the ingest, which stores the orders "
        "the others read; default: all",
    )
    parser.add_argument(
        "--freshness-seconds", type=int, default=60, help="how long orders are produced per rate"
    )
    parser.add_argument(
        "--freshness-rates",
        type=int,
        nargs="+",
        help="orders/s to measure freshness at; default: 1,000 and half the ingest rate",
    )
    parser.add_argument(
        "--backlog", type=int, default=1_000_000, help="orders in the backlog section"
    )
    parser.add_argument(
        "--drain-backlog",
        type=int,
        help="orders in each backlog of the drain section, at least twice those cached; "
        "default: twice those cached",
    )
    parser.add_argument(
        "--profile-orders", type=int, default=100_000, help="orders in the profile section"
    )
    arguments = parser.parse_args()
    cached = min(arguments.cached, arguments.orders)
    arguments.drain_backlog = arguments.drain_backlog or 2 * cached
    if arguments.drain_backlog < 2 * cached:
        parser.error(f"--drain-backlog must be at least twice the orders cached ({2 * cached:,})")
    return arguments


def main() -> None:
    arguments = parse_arguments()
    sections = arguments.only or SECTIONS
    cached = min(arguments.cached, arguments.orders)
    settings = Settings()
    base_url = str(settings.database_url)
    database = fresh_database(base_url)
    migrate(database)
    unnamed = Bench(base_url, database, settings.kafka_bootstrap_servers, topic="")
    bench = with_new_topic(unnamed, settings)
    logs = Path(tempfile.mkdtemp(prefix="order-viewer-bench-"))
    console.print(f"logs: {logs}")
    messages = generate(arguments.orders, arguments.seed)
    produce(bench, messages)

    ingest = ingest_benchmark(bench, messages, logs)
    print_ingest(ingest, ingest_metrics_cost(messages))
    bench.settle()
    if "freshness" in sections:
        rates = arguments.freshness_rates or [1000, round(ingest["service_rate"] / 2)]
        runs = [
            freshness_benchmark(bench, settings, rate, arguments.freshness_seconds, logs)
            for rate in rates
        ]
        print_freshness(runs, arguments.freshness_seconds)
        print_collector(collector_pauses(bench, cached), cached)
    if "auth" in sections:
        auth = auth_benchmark(bench, cached, arguments.seconds, logs)
        lines = {fmt: audit_line_cost(fmt, logs) for fmt in ("console", "json")}
        print_auth(auth, lines, cached)
    if "http" in sections:
        http = http_benchmark(bench, cached, arguments.seconds, logs)
        print_http(http, cached_order_bytes(messages[:cached]))
    if "drain" in sections:
        print_drain(
            drain_benchmark(
                bench,
                settings,
                cached,
                arguments.drain_backlog,
                seconds=arguments.seconds,
                logs=logs,
            )
        )
    if "absent" in sections:
        print_absent(absent_benchmark(bench, cached, arguments.seconds, logs))
    if "tracing" in sections:
        print_tracing(tracing_cost(messages[:20_000]), min(len(messages), 20_000))
        decision = decision_cost(messages)
        print_tracing_http(
            http_tracing_cost(20_000, arguments.seconds, logs), arguments.seconds, decision
        )
        print_traced_ingest(traced_ingest_cost(bench, len(messages), logs), len(messages), decision)
    if "large" in sections:
        print_large(large_orders_benchmark(bench, settings, arguments.seed, logs))
    if "backlog" in sections:
        print_backlog(backlog_benchmark(bench, settings, arguments.backlog, logs))
    if "profile" in sections:  # last: it leaves other orders in the tables
        print_profile(profiles.ingest_profile(bench, messages[: arguments.profile_orders]))
    print(f"\nlogs: {logs}")


if __name__ == "__main__":
    main()
