"""Fixtures for tests that need the real servers: a private PostgreSQL and Kafka for the run (one
per pytest-xdist worker), a database of its own for each test module (cloned from a migrated
template), and `order-viewer serve` processes with topics of their own for each test, so no test
depends on what another left behind and a developer's stack is never touched."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from devstack import LocalStack, settings_from_env
from order_viewer.adapters.kafka.broker import enqueue
from order_viewer.adapters.logs import BackgroundHandler
from order_viewer.adapters.postgres.migrate import migrate

ROOT = Path(__file__).resolve().parents[1]
ORDER_VIEWER = ROOT / ".venv" / "bin" / "order-viewer"
SERVE = (str(ORDER_VIEWER), "serve")
ARTIFACTS = ROOT / "test-artifacts"
# The services a test started, for the report of a test that fails.
STARTED_SERVICES = pytest.StashKey[list["ServiceProcess"]]()
# How much of each service's log a failure's report shows (the whole log goes to ARTIFACTS).
FAILURE_LOG_LINES = 120


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """A test that runs a command in-process leaves the service's log set-up on the root
    logger, writing to the test's captured stderr, which is closed after it: later tests'
    lines would fail there. The set-up is taken down while that stream is still open."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        added = [h for h in root.handlers if h not in handlers]
        for handler in added:
            if isinstance(handler, BackgroundHandler):
                handler.stop()
        if added:
            root.handlers[:] = handlers
            root.setLevel(level)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test's services' logs, which live in its temporary folder (soon rotated away by
    later runs), each ending with the stacks of the service's threads if it was still running:
    the end of each in the report, the whole in test-artifacts/, so that a failure seen once,
    on a loaded machine, can still be explained."""
    report: pytest.TestReport = yield
    if report.failed:
        for service in item.stash.get(STARTED_SERVICES, []):
            if service.process is not None and service.process.poll() is None:
                # Where each thread stands: what a service that stood still was waiting for.
                # Its ingest process first: it dies with the serving process, unheard.
                for child in children(service.process.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGABRT)
                time.sleep(1)
                service.process.send_signal(signal.SIGABRT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    service.process.wait(10)
            if not service.log_path.exists():
                continue
            text = service.log_path.read_text(errors="replace")
            kept = ARTIFACTS / "failed" / f"{item.name}-{service.log_path.name}"
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(text)
            tail = "\n".join(text.splitlines()[-FAILURE_LOG_LINES:])
            report.sections.append((f"service log {service.log_path.name} (in {kept})", tail))
    return report


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1
) -> Any:
    """Poll until `condition()` is truthy and return it; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_http_ready(
    url: str,
    process: subprocess.Popen[bytes],
    log_path: Path,
    what: str,
    timeout: float = 60,
    **httpx_kwargs: Any,
) -> None:
    """Poll `url` until it answers 200; fail with the end of `process`'s log if it exits first
    (`what` names it) or after `timeout` s."""

    def ready() -> bool:
        if process.poll() is not None:
            log = log_path.read_text(errors="replace")[-5000:]
            pytest.fail(f"{what} exited with {process.returncode}:\n{log}")
        try:
            return httpx.get(url, timeout=2, **httpx_kwargs).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, timeout, f"{what} to be ready")


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`, zombies included."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # ended meanwhile
            # The parent's pid follows the state, after the command name in parentheses.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def kill(process: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL, and wait for the end; nothing to do if it never started or already ended."""
    if process is not None:
        process.send_signal(signal.SIGKILL)
        process.wait()


class Servers(LocalStack):
    """The run's own PostgreSQL and Kafka: free ports, below `directory`."""

    def __init__(self, directory: Path) -> None:
        super().__init__(
            replace(
                settings_from_env(os.environ),
                directory=directory,
                pg_port=free_port(),
                kafka_port=free_port(),
                controller_port=free_port(),
            )
        )

    def connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.database_url, autocommit=True)


@dataclass(frozen=True)
class Stack:
    """The run's servers as one test module sees them: with a database of its own."""

    servers: Servers
    database: str

    @property
    def database_url(self) -> str:
        server, _ = self.servers.database_url.rsplit("/", 1)
        return f"{server}/{self.database}"

    @property
    def bootstrap_servers(self) -> str:
        return self.servers.bootstrap_servers

    def connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.database_url, autocommit=True)


TEMPLATE_DATABASE = "order_viewer_template"


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    """This run's PostgreSQL and Kafka, with a migrated template database to clone."""
    # A temp dir the postgres server user can traverse (pytest's own tmp dirs are private).
    base = Path(tempfile.mkdtemp(prefix="order-viewer-test-"))
    base.chmod(0o755)
    servers = Servers(base / ".stack")
    try:
        servers.up()
        with servers.connect() as connection:
            connection.execute(
                sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE_DATABASE))
            )
        migrate(Stack(servers, TEMPLATE_DATABASE).database_url)
        yield servers
    finally:
        servers.destroy()
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def fresh_database(servers: Servers, label: str) -> Iterator[Stack]:
    """The servers, with a new database cloned from the migrated template (dropped afterwards)."""
    name = f"test_{label[:40]}_{uuid.uuid4().hex[:8]}"
    with servers.connect() as connection:
        connection.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(TEMPLATE_DATABASE)
            )
        )
    try:
        yield Stack(servers, name)
    finally:
        try:
            # As the superuser: FORCE ends the database's other sessions, and an autovacuum
            # worker's is one the owner may not end.
            with servers.superuser_connect() as connection:
                connection.execute(
                    sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name))
                )
        except psycopg.OperationalError:
            # PostgreSQL left down by a failed fault test: the whole cluster goes at the end.
            pass


@pytest.fixture(scope="module")
def stack(servers: Servers, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """The servers, with a database of this test module's own."""
    with fresh_database(servers, request.module.__name__.rsplit(".", 1)[-1]) as isolated:
        yield isolated


@dataclass
class Topics:
    orders: str
    dead_letters: str
    group: str


def new_topics(tag: str = "") -> Topics:
    """Topic names and a consumer group no other test uses; `tag` tells whose they are."""
    suffix = f"{tag}-{uuid.uuid4().hex[:10]}" if tag else uuid.uuid4().hex[:10]
    return Topics(f"orders-{suffix}", f"orders-{suffix}.dlq", f"order-viewer-{suffix}")


@pytest.fixture
def topics() -> Topics:
    return new_topics()


def with_open_files_limit(limit: int, command: list[str]) -> list[str]:
    """The command run with both its open-files limits set to `limit`: set in a small Python
    step that then execs it (`preexec_fn` is unsafe in a process with threads, as ours has)."""
    step = (
        "import os, resource, sys\n"
        "limit = int(sys.argv[1])\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))\n"
        "os.execv(sys.argv[2], sys.argv[2:])\n"
    )
    return [sys.executable, "-c", step, str(limit), *command]


class ServiceProcess:
    """One `order-viewer serve` process over the run's servers, started and stopped at will;
    `command` runs it another way (a test seam's)."""

    def __init__(
        self,
        stack: Stack,
        topics: Topics,
        log_dir: Path,
        command: Sequence[str] = SERVE,
        **settings: str,
    ) -> None:
        self.command = list(command)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "DATABASE_URL": stack.database_url,
            "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers,
            "KAFKA_TOPIC": topics.orders,
            "KAFKA_DLQ_TOPIC": topics.dead_letters,
            "KAFKA_GROUP_ID": topics.group,
            "HTTP_PORT": str(self.port),
            # A SIGABRT then writes every thread's stack to the log (see the failure report).
            "PYTHONFAULTHANDLER": "1",
            **settings,
        }
        self.log_path = log_dir / f"service-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, ready: bool = True, open_files_limit: int | None = None) -> ServiceProcess:
        command = self.command
        if open_files_limit is not None:
            command = with_open_files_limit(open_files_limit, command)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        if ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        assert self.process is not None
        wait_http_ready(
            f"{self.base_url}/readyz", self.process, self.log_path, "the service", timeout
        )

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(f"{self.base_url}{path}", timeout=10, **kwargs)

    def kill(self) -> None:
        kill(self.process)

    def terminate(self, timeout: float = 15) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def scrape(
    service: ServiceProcess, **get_kwargs: Any
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by name and sorted labels; `get_kwargs` go to the request
    (headers=... for a token)."""
    response = service.get("/metrics", **get_kwargs)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def metric_value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def current_metric(service: ServiceProcess, name: str, **labels: str) -> float:
    """One sample of the service's /metrics as it is now (0 if it has none)."""
    return metric_value(scrape(service), name, **labels)


@pytest.fixture
def start_service(
    stack: Stack, topics: Topics, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., ServiceProcess]]:
    """Start services over this test's topics; each is stopped when the test ends."""
    started: list[ServiceProcess] = []
    request.node.stash[STARTED_SERVICES] = started

    def start(
        ready: bool = True, command: Sequence[str] = SERVE, **settings: str
    ) -> ServiceProcess:
        service = ServiceProcess(stack, topics, tmp_path, command, **settings)
        started.append(service)
        return service.start(ready)

    yield start
    for service in started:
        service.kill()


def create_topics(stack: Stack, names: Sequence[str], partitions: int) -> None:
    """Create the topics before anything uses them (each must be new)."""
    admin = AdminClient({"bootstrap.servers": stack.bootstrap_servers})
    created = admin.create_topics([NewTopic(name, num_partitions=partitions) for name in names])
    for future in created.values():
        future.result()


@dataclass(frozen=True)
class Record:
    """A message with what a plain (key, value) pair leaves to the producer."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, str | bytes | None]] | None = None
    timestamp_ms: int = 0  # 0: the producer's clock
    partition: int = -1  # -1: the producer's partitioner


def produce(
    stack: Stack, topic: str, messages: Sequence[tuple[bytes | None, bytes | None] | Record]
) -> None:
    """Produce and wait until the broker acknowledged every message (the topic must exist)."""
    producer = Producer({"bootstrap.servers": stack.bootstrap_servers, "linger.ms": 10})
    failures: list[Any] = []

    def delivered(error: Any, _: Any) -> None:
        if error is not None:
            failures.append(error)

    for message in messages:
        record = message if isinstance(message, Record) else Record(*message)
        enqueue(
            producer,
            topic,
            key=record.key,
            value=record.value,
            headers=record.headers,
            timestamp=record.timestamp_ms,
            partition=record.partition,
            on_delivery=delivered,
        )
    assert producer.flush(60) == 0, "the broker did not take every message in time"
    assert not failures, f"{len(failures)} messages not delivered, e.g. {failures[0]}"


def encode_orders(orders: list[dict[str, Any]]) -> list[tuple[bytes | None, bytes | None]]:
    return [(order["order_uid"].encode(), json.dumps(order).encode()) for order in orders]


def produce_orders(stack: Stack, topic: str, orders: list[dict[str, Any]]) -> None:
    """`produce` the orders as JSON, each keyed by its order_uid."""
    produce(stack, topic, encode_orders(orders))


def served(service: ServiceProcess, uid: str) -> bool:
    """Whether the service answers the order now."""
    return service.get(f"/order/{uid}").status_code == 200


def read_topic(
    stack: Stack, topic: str, enough: Callable[[list[Any]], bool], timeout: float = 30
) -> list[Any]:
    """Messages of `topic` from its start, read by a throwaway consumer group until `enough` of
    them were read (or `timeout` passed)."""
    consumer = Consumer(
        {
            "bootstrap.servers": stack.bootstrap_servers,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    received: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while not enough(received) and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                received.append(message)
    finally:
        consumer.close()
    return received


def consume_all(stack: Stack, topic: str, count: int, timeout: float = 30) -> list[Any]:
    """The first `count` messages of `topic`."""
    return read_topic(stack, topic, lambda received: len(received) >= count, timeout)


def end_offsets(stack: Stack, topic: str) -> dict[int, int]:
    """Each partition of the topic and the offset its next message will have."""
    consumer = Consumer({"bootstrap.servers": stack.bootstrap_servers, "group.id": "end-offsets"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return {
            partition: consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[
                1
            ]
            for partition in partitions
        }
    finally:
        consumer.close()


def committed_lag(stack: Stack, topics: Topics) -> int:
    """Messages of the orders topic the service's group has not committed yet."""
    consumer = Consumer({"bootstrap.servers": stack.bootstrap_servers, "group.id": topics.group})
    try:
        partitions = (
            consumer.list_topics(topics.orders, timeout=10).topics[topics.orders].partitions
        )
        lag = 0
        for committed in consumer.committed(
            [TopicPartition(topics.orders, p) for p in partitions], timeout=10
        ):
            _, high = consumer.get_watermark_offsets(committed, timeout=10)
            lag += high - max(committed.offset, 0)
        return lag
    finally:
        consumer.close()


class RunningService:
    """The service the end-to-end tests share, and a way to feed it orders."""

    def __init__(self, stack: Stack, process: ServiceProcess, topics: Topics) -> None:
        self.stack = stack
        self.process = process
        self.topics = topics
        self.base_url = process.base_url

    def ingest(self, orders: list[dict[str, Any]]) -> None:
        """Produce the orders and return once every one of them is served."""
        produce(self.stack, self.topics.orders, encode_orders(orders))
        for order in orders:

            def served(uid: str = order["order_uid"]) -> bool:
                return self.process.get(f"/order/{uid}").status_code == 200

            wait_until(served, 30, f"order {order['order_uid']} to be served")


@pytest.fixture(scope="session")
def service(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    topics = new_topics("e2e")
    with fresh_database(servers, "e2e") as stack:
        process = ServiceProcess(stack, topics, tmp_path_factory.mktemp("service")).start()
        yield RunningService(stack, process, topics)
        process.terminate()
