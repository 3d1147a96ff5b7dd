"""What tracing costs, in-process: a batch of messages prepared, written and settled by the
service's `OrderIngest` (over a writer that stores nothing, the worst case for the ratio: a real
write takes most of a batch's time), and a cache hit through the service's app, each with
tracing off, on at 1 % sampling and on at 100 %. CPU time of every thread, so that the span
processor's thread counts too; the spans are encoded as OTLP (what the exporter sends) and
discarded, so no collector's speed is in the figures.

`python -m benchmarks.tracing` runs it alone (no servers needed); `make bench` runs it as a
section of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import uvloop
from opentelemetry.sdk.resources import Resource
from starlette.types import ASGIApp

from benchmarks import bare_server, profiles
from benchmarks.harness import (
    Bench,
    ServerProcess,
    ServiceRun,
    console,
    free_port,
    generate,
    wait_stored,
    wrk,
)
from order_viewer.adapters.cache import OrderCache
from order_viewer.adapters.http.api import create_app
from order_viewer.adapters.metrics import Metrics
from order_viewer.adapters.otlp import SpanBatches
from order_viewer.adapters.tracing import Tracing, start_tracing
from order_viewer.bootstrap import COLLECTOR_THRESHOLDS
from order_viewer.domain.model import PreparedOrder
from order_viewer.service.ingest import OrderIngest
from order_viewer.service.lookup import OrderLookup
from order_viewer.service.ports import (
    CachedOrder,
    ConsumedMessage,
    Deletion,
    Handled,
    RejectedMessage,
    WriteResult,
)
from order_viewer.service.retry import Health, Patience

# Tracing off, then the two samplers measured, as OTEL_TRACES_SAMPLER(_ARG) would set them.
MODES: dict[str, dict[str, str] | None] = {
    "off": None,
    "1 %": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    "100 %": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
}
# The span queue is made large enough that none is dropped: spans come faster in these loops
# than the default queue (2,048) is drained, and a dropped span would cost nothing to export.
QUEUE = 1_000_000
BATCH = 2000
ROUNDS = 3
# Orders cached for the hits.
HITS = 10_000


class _StoresNothing:
    """A writer that says every order was new, at no cost."""

    def write(
        self,
        batch: Sequence[PreparedOrder],
        deletions: Sequence[Deletion] = (),
        handled: Sequence[Handled] = (),
    ) -> WriteResult:
        return WriteResult(tuple(prepared.order.order_uid for prepared in batch), ())


class _NoDeadLetters:
    def send(self, rejected: Sequence[RejectedMessage]) -> None:
        pass


# The second server without tracing, over HTTP.
AGAIN = "off, again"
# What every message and request pays at 1 % but the traced one in a hundred: nothing traced.
NEVER = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}


@contextmanager
def tracing(mode: str) -> Iterator[Tracing | None]:
    environment = MODES[mode]
    yield None if environment is None else tracing_as(environment)


def tracing_as(environment: dict[str, str]) -> Tracing:
    """Tracing as the SDK makes it of `environment`'s OTEL_* variables, its spans encoded as
    the service's are, then dropped instead of sent."""
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        batches = SpanBatches(
            len, Resource.create(), queue_size=QUEUE, batch_size=512, delay_ms=5000
        )
        return start_tracing("bench", batches)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def settled_collector() -> None:
    """The collector as the service has it (its thresholds, and what exists frozen, as the
    service freezes it once warm): otherwise its passes over what earlier measurements left
    moved a figure by half."""
    gc.set_threshold(*COLLECTOR_THRESHOLDS)
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def ingest_cost(messages: list[tuple[bytes, bytes]], traced: Tracing | None) -> float:
    """Microseconds of CPU per message to prepare, write (nothing) and settle the batches."""
    batches = [
        [
            # No producer's traceparent: each message is a new trace, sampled at the mode's rate.
            ConsumedMessage("bench", 0, start + offset, key, value)
            for offset, (key, value) in enumerate(messages[start : start + BATCH])
        ]
        for start in range(0, len(messages), BATCH)
    ]
    cache = OrderCache(len(messages))
    ingest = OrderIngest(
        [_StoresNothing()],
        cache,
        _NoDeadLetters(),
        Patience(Health("bench", logging.getLogger(__name__)), threading.Event(), 1.0),
        Metrics(cache),
        tracing=traced,
    )
    settled_collector()
    started = time.process_time()
    for batch in batches:
        prepared = ingest.prepare(batch)
        ingest.settle(prepared, ingest.store(prepared), lambda _: None)
    if traced is not None:
        traced.shutdown()  # the spans still queued are exported, within the time
    return (time.process_time() - started) / len(messages) * 1e6


def hit_app(
    messages: list[tuple[bytes, bytes]], traced: Tracing | None
) -> tuple[ASGIApp, list[str]]:
    """The service's app (metrics on, no authentication) with the first HITS orders cached,
    and their ids."""
    ids = [key.decode() for key, _ in messages[:HITS]]
    cache = OrderCache(len(ids))
    cache.put_written(
        {key.decode(): CachedOrder.of(value, b"0" * 32) for key, value in messages[:HITS]}
    )
    app = create_app(
        OrderLookup(profiles._NoReader(), cache),
        profiles._Ready(),
        Metrics(cache),
        tracing=traced,
    )
    return app, ids


def hit_cost(messages: list[tuple[bytes, bytes]], traced: Tracing | None) -> float:
    """Microseconds of CPU per cache hit through the service's app, with a no-op send."""
    app, ids = hit_app(messages, traced)
    scopes = profiles._hits(ids)

    async def timed() -> float:
        settled_collector()
        started = time.process_time()
        await profiles._microseconds_a_call(app, scopes)
        if traced is not None:
            traced.shutdown()  # the spans still queued are exported, within the time
        return (time.process_time() - started) / profiles.HIT_CALLS * 1e6

    return asyncio.run(timed())


def decision_cost(messages: list[tuple[bytes, bytes]]) -> dict[str, float]:
    """Microseconds of CPU of the sampler's decision alone (`NEVER`), measured apart because it
    is smaller than the noise of the whole: for a message, the batch's tracing with none of its
    messages kept; for a request, a cache hit through the service's app with tracing so against
    one without (the decision and the traced front it goes through). Best of ROUNDS."""
    batch = [
        ConsumedMessage("bench", 0, offset, key, value)
        for offset, (key, value) in enumerate(messages[:BATCH])
    ]
    never = tracing_as(NEVER)
    message_costs, off_hits, never_hits = [], [], []
    for _ in range(ROUNDS):
        settled_collector()
        started = time.process_time()
        for _ in range(50):
            never.batch(batch).settled({}, [])
        message_costs.append((time.process_time() - started) / (50 * len(batch)) * 1e6)
        off_hits.append(hit_cost(messages, None))
        never_hits.append(hit_cost(messages, tracing_as(NEVER)))
    never.shutdown()
    return {"message": min(message_costs), "request": min(never_hits) - min(off_hits)}


def tracing_cost(messages: list[tuple[bytes, bytes]]) -> dict[str, dict[str, float]]:
    """Each mode's best of ROUNDS, taken in turns so that the machine's load falls on all."""
    costs: dict[str, dict[str, list[float]]] = {mode: {"ingest": [], "hit": []} for mode in MODES}
    for number in range(1, ROUNDS + 1):
        for mode in MODES:
            console.print(f"tracing, round {number} of {ROUNDS}: {mode}")
            with tracing(mode) as traced:
                costs[mode]["ingest"].append(ingest_cost(messages, traced))
            with tracing(mode) as traced:
                costs[mode]["hit"].append(hit_cost(messages, traced))
    return {
        mode: {kind: min(values) for kind, values in kinds.items()} for mode, kinds in costs.items()
    }


class TracedServerRun(ServerProcess):
    """This module serving `hit_app` over granian as the bare server does, tracing as `mode`
    says (its spans encoded and discarded)."""

    def __init__(self, mode: str, log: Path, orders: int) -> None:
        port = free_port()
        command = [
            sys.executable, "-m", "benchmarks.tracing", "--serve", mode, "--port", str(port),
            "--orders", str(orders),
        ]  # fmt: skip
        super().__init__(command, dict(os.environ), log, port, "/livez")


def http_tracing_cost(orders: int, seconds: int, logs: Path) -> dict[str, dict[str, float]]:
    """Cache hits over HTTP as a client times them (wrk, one thread, 64 connections), one
    server per mode, all running at once and measured in turns, as many rounds as servers, the
    order turned each round, best rate; and the server's CPU (all its threads) a request over
    the same runs, the least, which the machine's load moves less than the rate. A second
    server without tracing (`AGAIN`) is measured as the others are: how far two of the same
    stand apart is the noise of the run."""
    ids_file = logs / "tracing-ids.txt"
    ids_file.write_text("\n".join(key.decode() for key, _ in generate(min(orders, HITS), 1)))
    servers = {
        label: TracedServerRun(
            "off" if label == AGAIN else label,
            logs / f"tracing-{label.replace(' %', '').replace(', ', '-')}.log",
            orders,
        )
        for label in (*MODES, AGAIN)
    }
    for server in servers.values():
        server.wait_ready()
        wrk(server.url, ids_file, 64, 3)  # untimed: connections and caches warm
    results: dict[str, dict[str, float]] = {}
    labels = list(servers)
    # Each server first once, second once...: the place in a round moved a figure by 5 %.
    for number in range(len(labels)):
        for mode in labels[number:] + labels[:number]:
            server = servers[mode]
            console.print(
                f"tracing over HTTP, round {number + 1} of {len(labels)}: {mode}, {seconds} s"
            )
            cpu = profiles._process_cpu(profiles._proc_stat(server.process.pid))
            measured = wrk(server.url, ids_file, 64, seconds)
            cpu = profiles._process_cpu(profiles._proc_stat(server.process.pid)) - cpu
            cpu_us = cpu / (measured["rate"] * seconds) * 1e6
            best = results.setdefault(mode, {**measured, "cpu_us": cpu_us})
            if measured["rate"] > best["rate"]:
                best.update(measured)
            best["cpu_us"] = min(best["cpu_us"], cpu_us)
    for server in servers.values():
        server.stop()
    return results


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that takes every request and keeps nothing but its count."""

    received = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        type(self).received += 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def traced_ingest_cost(bench: Bench, count: int, logs: Path) -> dict[str, dict[str, float]]:
    """`order-viewer serve` storing the `count` orders of the bench's topic with each mode's
    tracing, its spans sent over OTLP/HTTP to a collector in this process, in turns, ROUNDS
    times, with the tables emptied before each: the best rate from readiness to the last order
    stored, and the least CPU of the service's process (all its threads) an order over the same
    time."""
    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    results: dict[str, dict[str, float]] = {}
    for number in range(1, ROUNDS + 1):
        for mode, environment in MODES.items():
            console.print(f"traced ingest, round {number} of {ROUNDS}: {mode}, {count:,} orders")
            bench.truncate()
            received_before = _Collector.received
            settings = {} if environment is None else {
                **environment, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            }  # fmt: skip
            run = ServiceRun(
                bench,
                logs / f"traced-ingest-{mode.replace(' %', '')}.log",
                KAFKA_GROUP_ID=f"{bench.topic}-traced-{number}-{mode.replace(' %', '')}",
                **settings,
            )
            ready = run.wait_ready()
            cpu = profiles._process_cpu(profiles._proc_stat(run.process.pid))
            seconds = wait_stored(bench, run, count) - ready
            cpu = profiles._process_cpu(profiles._proc_stat(run.process.pid)) - cpu
            run.stop()  # which sends the spans still queued
            if environment is not None and _Collector.received == received_before:
                # A run that exported nothing would have measured tracing that never was.
                sys.exit(f"traced ingest ({mode}): no spans reached the collector; see {run.log}")
            best = results.setdefault(mode, {"rate": 0.0, "cpu_us": float("inf")})
            best["rate"] = max(best["rate"], count / seconds)
            best["cpu_us"] = min(best["cpu_us"], cpu / count * 1e6)
    collector.shutdown()
    return results


def print_against_off(
    results: dict[str, dict[str, float]], columns: dict[str, tuple[str, str]]
) -> None:
    """A row a mode: each column's figure (its key in the results, and its format) and how
    far it is from the figure without tracing."""
    print("| tracing | " + " | ".join(f"{title} | vs. off" for title in columns) + " |")
    print("|---|" + "---:|---:|" * len(columns))
    off = results["off"]
    for mode, run in results.items():
        cells = [
            f"{run[key]:{form}} | {run[key] / off[key] - 1:+.1%}" for key, form in columns.values()
        ]
        print(f"| {mode} | " + " | ".join(cells) + " |")


def print_one_percent_by_its_parts(off: float, traced: float, decision: float, unit: str) -> None:
    """What 1 % costs a `unit` by its parts, in µs and against `off`'s cost of the unit: the
    sampler's decision every unit pays, and a hundredth of what a traced unit costs more than
    an untraced one (`traced` - `off`, at 100 %)."""
    added = decision + (traced - off) / 100
    print(
        f"\n1 % by its parts: the decision {decision:.2f} µs a {unit} (in-process, best of "
        f"{ROUNDS}) and a hundredth of a traced {unit}'s added CPU: {added:.2f} µs, "
        f"{added / off:+.2%} of a {unit}'s CPU untraced"
    )


def print_traced_ingest(
    results: dict[str, dict[str, float]], count: int, decision: dict[str, float]
) -> None:
    print(
        f"\n### The service's ingest of {count:,} orders, spans sent over OTLP/HTTP (best rate "
        f"and least CPU of {ROUNDS} in turns)\n"
    )
    print_against_off(
        results, {"orders/s": ("rate", ",.0f"), "service CPU µs an order": ("cpu_us", ".1f")}
    )
    off = results["off"]
    print_one_percent_by_its_parts(
        off["cpu_us"], results["100 %"]["cpu_us"], decision["message"], "message"
    )


def print_tracing_http(
    results: dict[str, dict[str, float]], seconds: int, decision: dict[str, float]
) -> None:
    print(
        f"\n### Cache hits over HTTP (wrk -t1 -c64, {seconds} s, best of {len(results)} in turns, "
        "each server first once; spans encoded as OTLP and discarded)\n"
    )
    print(
        "| tracing | requests/s | µs a request | vs. off | server CPU µs a request | vs. off "
        "| p99 ms | non-2xx |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    off = results["off"]
    for mode, run in results.items():
        print(
            f"| {mode} | {run['rate']:,.0f} | {1e6 / run['rate']:.1f} | "
            f"{off['rate'] / run['rate'] - 1:+.1%} | {run['cpu_us']:.1f} | "
            f"{run['cpu_us'] / off['cpu_us'] - 1:+.1%} | {run['p99_ms']:.2f} | "
            f"{run['errors']:.0f} |"
        )
    again = results[AGAIN]
    print(
        f"\nThe two servers without tracing stand {off['rate'] / again['rate'] - 1:+.1%} apart "
        f"by time and {again['cpu_us'] / off['cpu_us'] - 1:+.1%} by CPU: the run's noise."
    )
    print_one_percent_by_its_parts(
        off["cpu_us"], results["100 %"]["cpu_us"], decision["request"], "request"
    )


async def serve(mode: str, port: int, orders: int) -> None:
    with tracing(mode) as traced:
        app, _ = hit_app(generate(min(orders, HITS), 1), traced)
        await bare_server.serve(app, port)


def print_tracing(costs: dict[str, dict[str, float]], orders: int) -> None:
    print(
        f"\n## Tracing (in-process, µs of CPU of all threads, best of {ROUNDS} in turns; "
        f"{orders:,} orders in batches of {BATCH} over a writer that stores nothing; "
        "spans encoded as OTLP and discarded)\n"
    )
    print_against_off(costs, {"ingest µs/order": ("ingest", ".1f"), "cache hit µs": ("hit", ".2f")})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tracing", description=__doc__)
    parser.add_argument("--orders", type=int, default=20_000)
    parser.add_argument("--seconds", type=int, default=10, help="duration of each wrk run")
    parser.add_argument("--serve", choices=MODES, help="serve hits over HTTP (for the wrk part)")
    parser.add_argument("--port", type=int)
    arguments = parser.parse_args()
    if arguments.serve is not None:
        uvloop.run(serve(arguments.serve, arguments.port, arguments.orders))
        return
    generated = generate(arguments.orders, 1)
    print_tracing(tracing_cost(generated), len(generated))
    decision = decision_cost(generated)
    logs = Path(tempfile.mkdtemp(prefix="order-viewer-bench-tracing-"))
    print_tracing_http(
        http_tracing_cost(arguments.orders, arguments.seconds, logs), arguments.seconds, decision
    )


if __name__ == "__main__":
    main()
