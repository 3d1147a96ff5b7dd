"""Where the ingest's time goes: the service's own steps for each batch (validate and serialize,
then write in one transaction) run in this process under cProfile, and the statements they
sent, from PostgreSQL's pg_stat_statements (the local stack preloads it)."""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from typing import Any

import psycopg

from benchmarks.harness import Bench
from order_viewer.ports import Message
from order_viewer.service import prepare_batch
from order_viewer.store import PostgresOrderWriter

BATCH = 2000
TOP = 14

_STATEMENTS = """
SELECT queryid, calls, total_exec_time, rows, query FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def _statements(connection: psycopg.Connection[Any]) -> dict[int, tuple[int, float, int, str]]:
    return {row[0]: row[1:] for row in connection.execute(_STATEMENTS)}


def _store(
    bench: Bench, batches: list[list[Message]], profiler: cProfile.Profile | None
) -> tuple[float, float]:
    """Seconds validating and serializing, and seconds writing, the batches into empty tables."""
    bench.truncate()
    bench.settle()
    writer = PostgresOrderWriter(bench.database_url, "bench-profile")
    preparing = writing = 0.0
    if profiler is not None:
        profiler.enable()
    for batch in batches:
        began = time.perf_counter()
        prepared = prepare_batch(batch)
        prepared_at = time.perf_counter()
        writer.write([order for order, _ in prepared.orders.values()])
        preparing += prepared_at - began
        writing += time.perf_counter() - prepared_at
    if profiler is not None:
        profiler.disable()
    writer.close()
    return preparing, writing


def ingest_profile(bench: Bench, messages: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """Store `messages` in batches of BATCH as the service does, but in one thread (no
    pipelining): once timed, with the statements' statistics; once under cProfile."""
    batches = [
        [
            Message("bench", 0, offset, key, value)
            for offset, (key, value) in enumerate(messages[start : start + BATCH], start=start)
        ]
        for start in range(0, len(messages), BATCH)
    ]
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
    }


def _top_lines(printed: str) -> list[str]:
    """The table of pstats' printout, without its preamble."""
    lines = printed.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    return [line for line in lines[start:] if line.strip()]
