"""What every benchmark needs: its own database and topics on the local stack, the service as a
subprocess, orders generated and produced, and wrk."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import psycopg
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from rich.console import Console
from rich.progress import Progress
from tests.conftest import children

from order_viewer.adapters.kafka.broker import enqueue
from order_viewer.config import Settings, kafka_client
from order_viewer.entrypoints.generate import encode, make_order

ROOT = Path(__file__).resolve().parents[1]
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

    def count_trail_entries(self) -> int:
        with self.connect() as connection:
            row = connection.execute("SELECT count(*) FROM order_trail").fetchone()
            assert row is not None
            return int(row[0])

    def count_orders(self) -> int:
        with self.connect() as connection:
            row = connection.execute("SELECT count(*) FROM orders").fetchone()
            assert row is not None
            return int(row[0])

    def truncate(self) -> None:
        with self.connect() as connection:
            connection.execute("TRUNCATE orders, delivery, payment, items, order_trail")

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


class ServerProcess:
    """A server under test as a subprocess on a port of its own, ready once `ready_path`
    answers 200."""

    def __init__(
        self, command: list[str], env: dict[str, str], log: Path, port: int, ready_path: str
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._ready_path = ready_path
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                command, env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT
            )
        self.started = time.perf_counter()

    def wait_ready(self, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                sys.exit(f"{self.log.stem} exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + self._ready_path, timeout=2).status_code == 200:
                    return time.perf_counter()
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        sys.exit(f"{self.log.stem} not ready in time")

    def memory_kib(self, field: str) -> int:
        """`field` of /proc/PID/status, added up over the process and its children (the
        service's ingest process, multiprocessing's resource tracker): for VmHWM, the sum of
        each one's peak, at least their peak together."""
        total = 0
        for pid in (self.process.pid, *children(self.process.pid)):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except FileNotFoundError:
                if pid == self.process.pid:
                    raise
                continue  # a child that ended meanwhile
            match = re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE)
            assert match is not None
            total += int(match.group(1))
        return total

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)


def wait_stored(bench: Bench, run: ServerProcess, count: int) -> float:
    """When `count` orders are stored (`time.perf_counter`), watched with a progress bar; the
    benchmark ends, with the service's log, if the service does first."""
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("stored", total=count)
        stored = 0
        while stored < count:
            if run.process.poll() is not None:
                sys.exit(f"{run.log.stem} exited:\n{run.log.read_text()[-3000:]}")
            time.sleep(0.2)
            stored = bench.count_orders()
            progress.update(task, completed=stored)
    return time.perf_counter()


class ServiceRun(ServerProcess):
    """`order-viewer serve` with its own port and settings."""

    def __init__(self, bench: Bench, log: Path, **settings: str) -> None:
        port = free_port()
        env = {
            **os.environ,
            "DATABASE_URL": bench.database_url,
            "KAFKA_BOOTSTRAP_SERVERS": bench.bootstrap,
            "KAFKA_TOPIC": bench.topic,
            "KAFKA_DLQ_TOPIC": f"{bench.topic}.dlq",
            "KAFKA_GROUP_ID": f"{bench.topic}-group",
            "HTTP_PORT": str(port),
            **settings,
        }
        command = [str(ROOT / ".venv" / "bin" / "order-viewer"), "serve"]
        super().__init__(command, env, log, port, "/readyz")


class BareServerRun(ServerProcess):
    """benchmarks.bare_server serving the orders of `ids_file`: the HTTP server's ceiling."""

    def __init__(self, bench: Bench, log: Path, ids_file: Path) -> None:
        port = free_port()
        command = [
            str(ROOT / ".venv" / "bin" / "python"), "-m", "benchmarks.bare_server",
            "--port", str(port), "--ids-file", str(ids_file),
        ]  # fmt: skip
        first_id = ids_file.read_text().split("\n", 1)[0]
        env = {**os.environ, "DATABASE_URL": bench.database_url}
        super().__init__(command, env, log, port, f"/order/{first_id}")


def with_new_topic(bench: Bench, settings: Settings) -> Bench:
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(kafka_client(settings))
    partitions = settings.kafka_topic_partitions
    created = admin.create_topics(
        [NewTopic(name, num_partitions=partitions) for name in (topic, f"{topic}.dlq")]
    )
    for future in created.values():
        future.result()
    return replace(bench, topic=topic)


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
            enqueue(producer, bench.topic, key=key, value=value)
            if number % 5000 == 0:
                producer.poll(0)
                progress.update(task, completed=number)
        producer.flush()


class HeldBacklog:
    """Orders produced inside one Kafka transaction left open: a consumer reading committed
    messages (librdkafka's default) sees none of them until `release` commits it, and then all of
    them at once. So a backlog is produced before the service consumes it, and starts draining at
    a moment the benchmark chooses, into a service already running. Backlogs held one after the
    other on a topic are released in the same order: each one's messages precede the next's."""

    def __init__(self, bench: Bench, messages: list[tuple[bytes, bytes]]) -> None:
        self._producer = Producer(
            {
                "bootstrap.servers": bench.bootstrap,
                "linger.ms": 50,
                "compression.type": "lz4",
                "transactional.id": f"{bench.topic}-{uuid.uuid4().hex[:8]}",
                # Held while the service warms up and is measured idle: up to the broker's default
                # transaction.max.timeout.ms, past which the broker would abort it.
                "transaction.timeout.ms": 900_000,
            }
        )
        self._producer.init_transactions()
        self._producer.begin_transaction()
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("producing a held backlog", total=len(messages))
            for number, (key, value) in enumerate(messages):
                enqueue(self._producer, bench.topic, key=key, value=value)
                if number % 5000 == 0:
                    self._producer.poll(0)
                    progress.update(task, completed=number)
            self._producer.flush()

    def release(self) -> None:
        self._producer.commit_transaction()


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
