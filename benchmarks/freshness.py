"""How long an order takes to become visible: from the broker's acknowledgement of its message to
the first `200` of `GET /order/{id}`, with orders produced at a steady rate.

A sample of the orders (about SAMPLES_PER_SECOND a second, whatever the rate) is followed: from
its acknowledgement on, each is asked for every POLL_INTERVAL_SECONDS, and once it has waited
longer, every POLL_SHARE of the time it has waited, until it is served; so a figure is late by
at most the larger of the two. Following every order would flood the service with requests for
orders not there yet, each of them a database read; so would polling a late order every 5 ms:
at a second of delay, the samples waiting made 8,000 such reads a second (near what the
service answers without a cache), which kept the delay up.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import KafkaError, Producer
from confluent_kafka import Message as KafkaMessage
from prometheus_client.parser import text_string_to_metric_families
from rich.progress import Progress

from benchmarks.harness import Bench, console

SAMPLES_PER_SECOND = 40
POLL_INTERVAL_SECONDS = 0.005
POLL_SHARE = 0.05
GIVE_UP_SECONDS = 30.0


@dataclass
class Follower:
    """Follows sampled orders until the service serves them, in an event loop of its own."""

    base_url: str
    seen_after: list[float] = field(default_factory=list)
    # (perf_counter at acknowledgement, seconds until served), for freshness-RATE.csv
    timeline: list[tuple[float, float]] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _pending: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._client = httpx.AsyncClient(
            base_url=self.base_url, limits=httpx.Limits(max_connections=64), timeout=10
        )
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def follow(self, order_uid: str, acknowledged_at: float) -> None:
        """Thread-safe: start following an order acknowledged at that perf_counter time."""
        self._loop.call_soon_threadsafe(self._start, order_uid, acknowledged_at)

    def _start(self, order_uid: str, acknowledged_at: float) -> None:
        task = self._loop.create_task(self._until_served(order_uid, acknowledged_at))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _until_served(self, order_uid: str, acknowledged_at: float) -> None:
        while (waited := time.perf_counter() - acknowledged_at) < GIVE_UP_SECONDS:
            try:
                response = await self._client.get(f"/order/{order_uid}")
            except httpx.TransportError:
                # A refused or dropped connection is a poll that saw nothing yet, not the end
                # of the run; an order never served is counted in `missed`.
                response = None
            if response is not None and response.status_code == 200:
                self.seen_after.append(time.perf_counter() - acknowledged_at)
                self.timeline.append((acknowledged_at, self.seen_after[-1]))
                return
            await asyncio.sleep(max(POLL_INTERVAL_SECONDS, waited * POLL_SHARE))
        self.missed.append(order_uid)

    def finish(self) -> None:
        async def drain() -> None:
            while self._pending:
                await asyncio.gather(*list(self._pending))
            await self._client.aclose()

        asyncio.run_coroutine_threadsafe(drain(), self._loop).result(GIVE_UP_SECONDS + 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


def produce_steadily(
    bench: Bench,
    messages: list[tuple[bytes, bytes]],
    rate: int,
    follower: Follower,
) -> dict[str, float]:
    """Produce the messages at `rate` a second, following every n-th one once acknowledged;
    returns the rate achieved and how many the broker refused."""
    producer = Producer({"bootstrap.servers": bench.bootstrap, "linger.ms": 1})
    every = max(1, rate // SAMPLES_PER_SECOND)
    failed = 0

    def acknowledged(order_uid: str, error: KafkaError | None, _: KafkaMessage) -> None:
        nonlocal failed
        if error is not None:
            failed += 1
        else:
            follower.follow(order_uid, time.perf_counter())

    interval = 1 / rate
    started = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"producing {rate:,} orders/s", total=len(messages))
        for number, (key, value) in enumerate(messages):
            due = started + number * interval
            # poll() serves delivery reports while it waits, so acknowledgements are timed
            # within a send interval of their arrival.
            while (now := time.perf_counter()) < due:
                producer.poll(due - now)
            callback = partial(acknowledged, key.decode()) if number % every == 0 else None
            producer.produce(bench.topic, key=key, value=value, on_delivery=callback)
            if number % 1000 == 0:
                progress.update(task, completed=number)
        producer.flush(30)
    return {"achieved_rate": len(messages) / (time.perf_counter() - started), "failed": failed}


def wait_until_consuming(bench: Bench, base_url: str, message: tuple[bytes, bytes]) -> None:
    """Ready is not yet consuming: the group's first assignment comes seconds later. Timing
    starts once one order has gone all the way through."""
    producer = Producer({"bootstrap.servers": bench.bootstrap})
    producer.produce(bench.topic, key=message[0], value=message[1])
    producer.flush(30)
    deadline = time.monotonic() + 120
    while httpx.get(f"{base_url}/order/{message[0].decode()}").status_code != 200:
        if time.monotonic() > deadline:
            raise SystemExit("the service did not store an order within 120 s")
        time.sleep(0.05)


def batch_figures(base_url: str) -> dict[str, float]:
    """From the service's own metrics: the mean batch and the mean and 99th-percentile bucket
    of its write (one transaction) while it ran."""
    families = {
        family.name: family.samples
        for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text)
    }

    def histogram(name: str) -> tuple[float, float, float]:
        samples = families[name]
        total = next(s.value for s in samples if s.name == f"{name}_sum")
        count = next(s.value for s in samples if s.name == f"{name}_count")
        p99 = next(
            float(s.labels["le"])
            for s in samples
            if s.name == f"{name}_bucket" and s.value >= 0.99 * count
        )
        return total, count, p99

    size_total, batches, _ = histogram("order_viewer_batch_size_messages")
    write_total, writes, write_p99 = histogram("order_viewer_database_write_duration_seconds")
    return {
        "batch_mean": size_total / batches,
        "write_mean_ms": write_total / writes * 1000,
        "write_p99_bucket_ms": write_p99 * 1000,
    }


def measure(
    bench: Bench, base_url: str, messages: list[tuple[bytes, bytes]], rate: int, timeline: Path
) -> Any:
    """Freshness at one rate: p50, p99 and max seconds from acknowledgement to first 200; each
    sample's time and latency written to `timeline` (CSV)."""
    wait_until_consuming(bench, base_url, messages[0])
    follower = Follower(base_url)
    produced = produce_steadily(bench, messages[1:], rate, follower)
    follower.finish()
    began = min(at for at, _ in follower.timeline)
    timeline.write_text(
        "seconds,latency_ms\n"
        + "".join(
            f"{at - began:.3f},{after * 1000:.1f}\n" for at, after in sorted(follower.timeline)
        )
    )
    seen = sorted(follower.seen_after)
    return {
        "rate": rate,
        **produced,
        **batch_figures(base_url),
        "samples": len(seen),
        "missed": len(follower.missed),
        "p50_ms": statistics.median(seen) * 1000,
        "p99_ms": statistics.quantiles(seen, n=100)[98] * 1000,
        "max_ms": seen[-1] * 1000,
    }
