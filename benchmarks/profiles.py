"""Where the time goes.

- Ingest: the service's own steps for each batch (validate and serialize, then write in one
  transaction) run in this process under cProfile, and the statements they sent, from
  PostgreSQL's pg_stat_statements (the local stack preloads it).
- A cache hit: the service's ASGI app and the bare server's, each called in this process with
  what granian hands over, so that what the service adds to a hit is told from the HTTP
  server's own time; and a lookup of an id the cache remembers as absent, beside a hit.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import io
import logging
import os
import pstats
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

import psycopg
from rich.progress import Progress
from starlette.types import ASGIApp, Scope
from tests.conftest import children

from benchmarks import bare_server
from benchmarks.harness import Bench, console
from order_viewer.adapters import logs as log_setup
from order_viewer.adapters.cache import CachedOrder, OrderCache
from order_viewer.adapters.http.api import create_app
from order_viewer.adapters.metrics import Metrics
from order_viewer.adapters.postgres.writer import PostgresOrderWriter
from order_viewer.bootstrap import COLLECTOR_THRESHOLDS, access_policy
from order_viewer.config import Settings
from order_viewer.service.ingest import prepare_batch
from order_viewer.service.lookup import OrderLookup
from order_viewer.service.ports import ConsumedMessage, OrderSummary, OrderTrail, StoredDocument

BATCH = 2000
TOP = 14

_STATEMENTS = """
SELECT queryid, calls, total_exec_time, rows, query FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def _statements(connection: psycopg.Connection[Any]) -> dict[int, tuple[int, float, int, str]]:
    return {row[0]: row[1:] for row in connection.execute(_STATEMENTS)}


def _batches(messages: list[tuple[bytes, bytes]]) -> list[list[ConsumedMessage]]:
    return [
        [
            ConsumedMessage("bench", 0, offset, key, value)
            for offset, (key, value) in enumerate(messages[start : start + BATCH], start=start)
        ]
        for start in range(0, len(messages), BATCH)
    ]


def _store(
    bench: Bench, batches: list[list[ConsumedMessage]], profiler: cProfile.Profile | None
) -> tuple[float, float]:
    """Seconds validating and serializing, and seconds writing, the batches into empty tables,
    under the service's collector thresholds."""
    bench.truncate()
    bench.settle()
    writer = PostgresOrderWriter(bench.database_url, "bench-profile")
    preparing = writing = 0.0
    saved = gc.get_threshold()
    gc.set_threshold(*COLLECTOR_THRESHOLDS)
    how = "timed" if profiler is None else "under cProfile"
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(f"profile: storing, {how}", total=len(batches))
            for batch in batches:
                if profiler is not None:
                    profiler.enable()
                began = time.perf_counter()
                prepared = prepare_batch(batch)
                prepared_at = time.perf_counter()
                writer.write([order for order, _ in prepared.orders.values()])
                preparing += prepared_at - began
                writing += time.perf_counter() - prepared_at
                if profiler is not None:
                    profiler.disable()
                progress.advance(task)
    finally:
        gc.set_threshold(*saved)
        writer.close()
    return preparing, writing


def ingest_profile(bench: Bench, messages: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """Store `messages` in batches of BATCH as the service does, but in one thread (no
    pipelining): once timed, with the statements' statistics; once under cProfile."""
    batches = _batches(messages)
    with bench.connect() as connection:
        before = _statements(connection)
        preparing, writing = _store(bench, batches, None)
        after = _statements(connection)
    profiler = cProfile.Profile()
    _store(bench, batches, profiler)
    report = io.StringIO()
    pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(TOP)
    unseen = (0, 0.0, 0, "")
    statements = sorted(
        (
            (
                total - before.get(queryid, unseen)[1],
                calls - before.get(queryid, unseen)[0],
                " ".join(query.split())[:90],
            )
            for queryid, (calls, total, _, query) in after.items()
        ),
        reverse=True,
    )
    return {
        "orders": len(messages),
        "preparing": preparing,
        "writing": writing,
        "profile": _top_lines(report.getvalue()),
        "statements": [s for s in statements if s[1] > 0][:6],
        "thresholds": validation_by_collector_thresholds(batches, 100_000),
    }


def _top_lines(printed: str) -> list[str]:
    """The table of pstats' printout, without its preamble."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    return [line for line in lines[start:] if line.strip()]


HIT_CALLS = 100_000
# CPython's, which the service replaces
DEFAULT_COLLECTOR_THRESHOLDS = (700, 10, 10)


class _NoReader:
    """Cache hits never reach the database."""

    async def documents(self, order_uids: list[str]) -> list[StoredDocument]:
        raise AssertionError("a cache hit read the database")

    async def recent(self, limit: int) -> list[OrderSummary]:
        raise AssertionError("a cache hit read the database")

    async def trail(self, order_uid: str, limit: int, after: int) -> OrderTrail | None:
        raise AssertionError("a cache hit read the database")

    async def ping(self) -> bool:
        return True


class _Ready:
    async def not_ready(self) -> dict[str, str]:
        return {}

    def not_live(self) -> dict[str, str]:
        return {}


def _cached(bench: Bench, ids: list[str]) -> tuple[OrderCache, dict[str, Any]]:
    """A cache holding the stored orders of `ids`, and their bodies as the bare server's."""
    bodies = bare_server.stored_bodies(bench.database_url, ids)
    cache = OrderCache(len(ids))
    cache.put_written(
        {
            uid: CachedOrder(body, dict(headers)[b"etag"].decode())
            for uid, (headers, body) in bodies.items()
        }
    )
    return cache, bodies


def _hits(ids: list[str], token: str | None = None) -> list[Scope]:
    """Requests for orders of `ids` as granian hands them over."""
    headers = [(b"host", b"x")]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    return [
        {
            "type": "http",
            "method": "GET",
            "path": f"/order/{uid}",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
        }
        for uid in ids[:1000]
    ]


async def _send(_: object) -> None:
    return None


async def _receive() -> dict[str, object]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _microseconds_a_call(app: ASGIApp, scopes: list[Scope]) -> float:
    started = time.perf_counter()
    for number in range(HIT_CALLS):
        await app(scopes[number % len(scopes)], _receive, _send)
    return (time.perf_counter() - started) / HIT_CALLS * 1e6


@contextmanager
def service_logging(
    level: str, log_format: Literal["console", "json"], output: TextIO
) -> Iterator[log_setup.BackgroundHandler]:
    """The service's log set-up, writing to `output`, for the time of the block; its writer
    is stopped and the root logger's handlers and level put back after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    with redirect_stderr(output):
        log_setup.configure(level, log_format)
    (handler,) = root.handlers
    assert isinstance(handler, log_setup.BackgroundHandler)
    try:
        yield handler
    finally:
        handler.stop()
        root.handlers = saved[0]
        root.setLevel(saved[1])


def cache_hit_cost(bench: Bench, ids_file: Path) -> dict[str, float]:
    """Microseconds one cache hit spends in the service's app (metrics on, no authentication)
    and in the bare server's app, both over the same orders, called with a no-op send."""
    ids = ids_file.read_text().split()
    cache, bodies = _cached(bench, ids)
    service_app = create_app(OrderLookup(_NoReader(), cache), _Ready(), Metrics(cache))
    apps = {"service": service_app, "bare": bare_server.bare_app(bodies)}
    scopes = _hits(ids)

    async def best_of_three() -> dict[str, float]:
        return {
            name: min([await _microseconds_a_call(app, scopes) for _ in range(3)])
            for name, app in apps.items()
        }

    return asyncio.run(best_of_three())


def absent_cost(bench: Bench, ids_file: Path, absent_ids: list[str]) -> dict[str, float]:
    """Microseconds one lookup spends in the service's app (metrics on, no authentication): a
    cache hit, and an id the cache remembers as absent, called with a no-op send."""
    ids = ids_file.read_text().split()
    cache, _ = _cached(bench, ids)
    cache.absent_capacity = len(absent_ids)
    cache.fill({}, cache.ticket(), absent_ids)
    app = create_app(OrderLookup(_NoReader(), cache), _Ready(), Metrics(cache))
    scopes = {"hit": _hits(ids), "absent": _hits(absent_ids)}

    async def best_of_three() -> dict[str, float]:
        return {
            name: min([await _microseconds_a_call(app, lookups) for _ in range(3)])
            for name, lookups in scopes.items()
        }

    costs = asyncio.run(best_of_three())
    assert cache.absent_hits == 3 * HIT_CALLS
    return costs


def auth_hit_cost(
    bench: Bench, ids_file: Path, runs: dict[str, tuple[dict[str, str], str | None]], logs: Path
) -> dict[str, float]:
    """Microseconds of CPU one cache hit costs in the service's app (metrics on) with each of
    `runs`' settings and bearer token, called with a no-op send, the audit lines going through
    the service's log set-up to a file: the log writer's thread is counted too (its lines are
    flushed before the clock stops). Best of three, taken in turns."""
    ids = ids_file.read_text().split()
    cache, _ = _cached(bench, ids)
    apps: dict[str, tuple[ASGIApp, list[Scope], Settings]] = {}
    for name, (environment, token) in runs.items():
        # These variables as the service would read them (they come before the environment).
        fields: dict[str, Any] = {key.lower(): value for key, value in environment.items()}
        settings = Settings(_env_file=None, **fields)
        app = create_app(
            OrderLookup(_NoReader(), cache), _Ready(), Metrics(cache), access_policy(settings)
        )
        apps[name] = app, _hits(ids, token), settings

    async def cost(app: ASGIApp, scopes: list[Scope], settings: Settings) -> float:
        with service_logging(settings.log_level, settings.log_format, output) as handler:
            await _microseconds_a_call(app, scopes[:100])  # masked views made, keys fetched
            handler.flush()
            started = time.process_time()
            await _microseconds_a_call(app, scopes)  # timed by the CPU of all threads instead
            handler.flush()
            return (time.process_time() - started) / HIT_CALLS * 1e6

    async def best_of_three() -> dict[str, list[float]]:
        costs: dict[str, list[float]] = {name: [] for name in apps}
        for round_number in range(1, 4):
            for name, (app, scopes, settings) in apps.items():
                console.print(f"auth in-process, round {round_number} of 3: {name}")
                costs[name].append(await cost(app, scopes, settings))
        return costs

    with (logs / "auth-in-process.log").open("w") as output, _collecting_as_the_service():
        costs = asyncio.run(best_of_three())
    return {name: min(values) for name, values in costs.items()}


@contextmanager
def _collecting_as_the_service() -> Iterator[None]:
    """The cycle collector as `serve` sets it once warm: its thresholds, and what is alive
    now (the cache, the apps) left out of its passes."""
    saved = gc.get_threshold()
    gc.set_threshold(*COLLECTOR_THRESHOLDS)
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


def validation_by_collector_thresholds(
    batches: list[list[ConsumedMessage]], cached: int
) -> dict[tuple[int, int, int], float]:
    """Microseconds an order to validate and serialize batches of BATCH, two batches alive at a
    time as in the consumer, beside `cached` cache entries (long-lived objects, as a warm
    service has), under the collector's default thresholds and the service's; best of three,
    interleaved."""
    cache = OrderCache(cached)
    for start in range(0, cached, 1000):
        cache.put_written(
            {f"cached-{n}": CachedOrder(b"{}", f'"{n}"') for n in range(start, start + 1000)}
        )
    saved = gc.get_threshold()
    timings: dict[tuple[int, int, int], list[float]] = {}
    orders = sum(len(batch) for batch in batches)
    try:
        for round_number in range(1, 4):
            for thresholds in (DEFAULT_COLLECTOR_THRESHOLDS, COLLECTOR_THRESHOLDS):
                console.print(f"profile: validating, round {round_number} of 3, gc {thresholds}")
                gc.set_threshold(*thresholds)
                alive: list[object] = []
                started = time.perf_counter()
                for batch in batches:
                    alive = [*alive[-1:], prepare_batch(batch)]
                seconds = time.perf_counter() - started
                timings.setdefault(thresholds, []).append(seconds / orders * 1e6)
    finally:
        gc.set_threshold(*saved)
    return {thresholds: min(runs) for thresholds, runs in timings.items()}


@dataclass(frozen=True)
class DrainPoint:
    """Counters at one moment of a drain, to be taken from those of a later one. The server's
    reach its views when each backend reports them, up to a second late (pg_stat_wal,
    pg_stat_database): right over fifths of half a minute, not over a drain of seconds."""

    stored: int
    at: float  # perf_counter seconds
    service_cpu: float  # seconds, all threads of the service's process
    # seconds, the server's processes (the writer's backend among them); None when the server
    # runs on another machine, where /proc cannot see it
    postgres_cpu: float | None
    machine_cpu: float  # seconds busy, all cores, whoever used them (the broker among them)
    statements: dict[int, tuple[int, float, int, str]]  # pg_stat_statements by queryid
    blocks_read: int  # from outside shared_buffers (the OS's cache or the disk)
    wal_bytes: int
    wal_full_pages: int  # whole 8 KB pages written to the WAL: first touches since a checkpoint


_WAL_AND_BLOCKS = """
SELECT (SELECT blks_read FROM pg_stat_database WHERE datname = current_database()),
       wal_bytes, wal_fpi
FROM pg_stat_wal
"""


def drain_point(connection: psycopg.Connection[Any], pid: int, stored: int) -> DrainPoint:
    at = time.perf_counter()
    service = sum(service_cpu(pid))
    postgres = _postgres_cpu(connection)
    row = connection.execute(_WAL_AND_BLOCKS).fetchone()
    assert row is not None
    return DrainPoint(
        stored,
        at,
        service,
        postgres,
        machine_cpu(),
        _statements(connection),
        int(row[0]),
        int(row[1]),
        int(row[2]),
    )


def _proc_stat(pid: int | str) -> list[str]:
    """A process's /proc stat fields after its command's parenthesis (the command may hold
    spaces): state first, so field n of proc(5) is at n - 3."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _process_cpu(fields: list[str], reaped: bool = False) -> float:
    """utime and stime, and with `reaped` the children's that the process has waited for."""
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def service_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds of a service's serving process `pid`, and of its children (its ingest
    process, living or ended and waited for; multiprocessing's resource tracker)."""
    fields = _proc_stat(pid)
    own = _process_cpu(fields)
    children_cpu = _process_cpu(fields, reaped=True) - own
    for child in children(pid):
        try:
            children_cpu += _process_cpu(_proc_stat(child))
        except OSError:  # ended since the listing
            continue
    return own, children_cpu


def _postgres_cpu(connection: psycopg.Connection[Any]) -> float | None:
    """The postmaster's CPU, its ended children's (added to it when it reaps them) and its
    living children's: a backend or autovacuum worker that ends between two points still
    counts once. None when the connection's backend is not a process of this machine."""
    row = connection.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    backend = Path(f"/proc/{row[0]}")
    try:
        if (backend / "comm").read_text().strip() != "postgres":
            return None  # the same number names another process here
        postmaster = _proc_stat(row[0])[1]  # the backend's parent
    except OSError:  # no such process here
        return None
    total = _process_cpu(_proc_stat(postmaster), reaped=True)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _proc_stat(entry.name)
        except OSError:  # ended since the listing
            continue
        if fields[1] == postmaster:
            total += _process_cpu(fields)
    return total


def machine_cpu() -> float:
    """Seconds the cores were busy since boot: user, nice, system, irq, softirq and steal."""
    cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(n) for n in cpu[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def drain_costs(before: DrainPoint, after: DrainPoint) -> dict[str, Any]:
    """What each order stored between two points of a drain cost: the CPU of the service, of
    PostgreSQL's processes and of the whole machine (and how many cores were busy),
    PostgreSQL's time in statements (in all, and by statement with its text), blocks read
    from outside shared_buffers, and WAL."""
    orders = after.stored - before.stored
    unseen = (0, 0.0, 0, "")
    spent = {
        queryid: (total - before.statements.get(queryid, unseen)[1], " ".join(query.split()))
        for queryid, (_, total, _, query) in after.statements.items()
    }
    return {
        "from": before.stored,
        "to": after.stored,
        "service_cpu_us": (after.service_cpu - before.service_cpu) / orders * 1e6,
        "postgres_cpu_us": (
            None
            if after.postgres_cpu is None or before.postgres_cpu is None
            else (after.postgres_cpu - before.postgres_cpu) / orders * 1e6
        ),
        "machine_cpu_us": (after.machine_cpu - before.machine_cpu) / orders * 1e6,
        "cores_busy": (after.machine_cpu - before.machine_cpu) / (after.at - before.at),
        "statements_us": sum(ms for ms, _ in spent.values()) / orders * 1000,
        "by_statement": {
            queryid: (ms / orders * 1000, query) for queryid, (ms, query) in spent.items()
        },
        "blocks_read": (after.blocks_read - before.blocks_read) / orders,
        "wal_bytes": (after.wal_bytes - before.wal_bytes) / orders,
        "wal_full_pages": (after.wal_full_pages - before.wal_full_pages) / orders,
    }
