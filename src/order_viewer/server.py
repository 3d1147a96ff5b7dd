"""The `serve` process: HTTP in the event loop, the consumer in a thread, one shared cache."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable

import psycopg
import sqlalchemy.exc
import uvloop
from confluent_kafka import KafkaException
from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings
from granian.log import LogLevels
from granian.server.embed import Server

from order_viewer.access import AccessPolicy
from order_viewer.api import create_app
from order_viewer.cache import CachedOrder, OrderCache
from order_viewer.config import MIN_HTTP_CONNECTIONS, Settings
from order_viewer.consumer import OrderConsumer
from order_viewer.metrics import Metrics
from order_viewer.retry import Backoff, Health
from order_viewer.service import OrderIngest, OrderLookup
from order_viewer.store import (
    DatabaseUnavailable,
    PostgresOrderReader,
    PostgresOrderWriter,
    migrate,
)

log = logging.getLogger(__name__)

# Descriptors the service needs besides HTTP connections and the read pool: an idle service
# had 37 open (/proc/PID/fd: writer connection, Kafka sockets and wake-up pipes, logs); the
# rest is room for reconnections and static files being sent.
FILES_BESIDES_CONNECTIONS = 128


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one, as Go's runtime does for every program,
    and return it: the usual soft default of 1,024 is a relic of select(), not a server budget."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            return soft
        return hard
    return soft


def http_connection_limit(wanted: int, open_files_limit: int, read_pool_size: int) -> int:
    """How many HTTP connections may be open at once: as many as wanted, but always leaving the
    descriptors the database and Kafka need. The HTTP server accepts no more than this, so the
    rest wait in the listen backlog; without the cap, accept() failing for want of a descriptor
    makes it retry without pause and spin a core until connections close."""
    return min(wanted, open_files_limit - FILES_BESIDES_CONNECTIONS - read_pool_size)


class Service:
    """Owns the parts of a running service and starts them in order: schema, warm cache, consumer.

    HTTP is up from the first moment (misses go to the database during warm-up); readiness is
    reported once all three steps are done.
    """

    def __init__(self, settings: Settings, access: AccessPolicy | None = None) -> None:
        self.settings = settings
        self.access = access
        database_url = str(settings.database_url)
        self.cache = OrderCache(settings.cache_capacity, settings.cache_max_bytes)
        self.reader = PostgresOrderReader(database_url, settings.database_pool_size)
        self.writer = PostgresOrderWriter(database_url)
        self.stop = threading.Event()
        self.metrics = Metrics(self.cache)
        self.consumer = OrderConsumer(
            settings, OrderIngest(self.writer, self.cache), self.stop, self.metrics
        )
        self.lookup = OrderLookup(self.reader, self.cache)
        self.warmed = False
        self.failed = False
        self._consumer_thread: threading.Thread | None = None
        self._stop_server: Callable[[], object] = lambda: None

    async def not_ready(self) -> dict[str, str]:
        not_ready = {}
        if not await self.reader.ping():
            not_ready["database"] = "unreachable"
        if not self.warmed:
            not_ready["cache"] = "warming up"
        if not self.consumer.running:
            not_ready["consumer"] = "not consuming"
        return not_ready

    def run(self) -> int:
        """Serve until SIGINT or SIGTERM; the exit status."""
        address = (self.settings.http_host, self.settings.http_port)
        try:
            # Asked before anything starts, so a taken port is one clear line, not a traceback
            # from inside the HTTP server after the consumer has joined its group.
            with socket.create_server(address):
                pass
        except OSError as error:
            log.error("cannot listen on %s:%d: %s", *address, error.strerror)
            return 1
        open_files = raise_open_files_limit()
        connections = http_connection_limit(
            self.settings.http_max_connections, open_files, self.settings.database_pool_size
        )
        if connections < MIN_HTTP_CONNECTIONS:
            needed = FILES_BESIDES_CONNECTIONS + self.settings.database_pool_size
            log.error(
                "the open-files limit of %d leaves room for %d HTTP connections; "
                "raise it (ulimit -n) to at least %d",
                open_files,
                max(connections, 0),
                needed + MIN_HTTP_CONNECTIONS,
            )
            return 1
        log.info(
            "serving HTTP on %s://%s:%d (at most %d connections at once)",
            "http" if self.settings.http_tls_cert_file is None else "https",
            *address,
            connections,
        )
        # uvloop's event loop answers cached orders about half again as fast as asyncio's.
        return uvloop.run(self._serve(connections))

    async def _serve(self, connections: int) -> int:
        loop = asyncio.get_running_loop()
        server = Server(
            create_app(
                self.lookup,
                self,
                self.metrics if self.settings.metrics_enabled else None,
                self.access,
            ),
            address=self.settings.http_host,
            port=self.settings.http_port,
            interface=Interfaces.ASGINL,
            # In `auto` mode granian reads a new connection until it can tell HTTP/1 from
            # HTTP/2, with no time limit: a client that sent nothing held it for ever.
            http=HTTPModes.http1,
            websockets=False,
            runtime_threads=self.settings.http_io_threads,
            backlog=1024,
            # granian's name for the most connections it serves at once
            backpressure=connections,
            http1_settings=HTTP1Settings(header_read_timeout=10_000, max_buffer_size=64 * 1024),
            ssl_cert=self.settings.http_tls_cert_file,
            ssl_key=self.settings.http_tls_key_file,
            log_level=LogLevels.error,
            log_access=self.settings.http_access_log,
            # Our own log format for granian's lines too, rather than its own handlers.
            log_dictconfig={
                "loggers": {
                    "_granian": {"propagate": True},
                    "granian.access": {"propagate": True, "level": "INFO"},
                }
            },
        )
        self._stop_server = lambda: loop.call_soon_threadsafe(server.stop)
        for stop_signal in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(stop_signal, self._stopped_by_signal, stop_signal, server)
        await self.reader.open()
        starting = asyncio.create_task(self._start())
        try:
            await server.serve()
        finally:
            self.stop.set()
            starting.cancel()
            if self._consumer_thread is not None:
                await asyncio.to_thread(self._consumer_thread.join)
            self.writer.close()
            await self.reader.close()
        return 1 if self.failed else 0

    def _stopped_by_signal(self, stop_signal: signal.Signals, server: Server) -> None:
        log.info("stopping on %s", stop_signal.name)
        server.stop()

    async def _start(self) -> None:
        await asyncio.to_thread(self._migrate)
        if self.stop.is_set():
            return
        await self._warm_up()
        self._consumer_thread = threading.Thread(target=self._consume, name="consumer")
        self._consumer_thread.start()

    def _migrate(self) -> None:
        health = Health("database", log)
        backoff = Backoff(self.settings.retry_max_backoff_ms / 1000, self.stop)
        while True:
            try:
                migrate(str(self.settings.database_url))
            except (psycopg.OperationalError, sqlalchemy.exc.OperationalError) as error:
                health.failed(str(error).strip().splitlines()[0])
                if not backoff.wait():
                    return
            else:
                health.recovered()
                return

    async def _warm_up(self) -> None:
        health = Health("database", log)
        while True:
            started = time.perf_counter()
            loaded = 0
            try:
                newest = self.reader.most_recent_documents(self.settings.cache_capacity)
                async with contextlib.aclosing(newest) as chunks:
                    async for chunk in chunks:
                        loaded += self.cache.warm(
                            {
                                doc.order_uid: CachedOrder.of(doc.document, doc.sha256)
                                for doc in chunk
                            }
                        )
                        if self.cache.warm_full:
                            break
            except (DatabaseUnavailable, psycopg.OperationalError) as error:
                health.failed(str(error))
                await asyncio.sleep(1)
                continue
            health.recovered()
            self.warmed = True
            seconds = time.perf_counter() - started
            self.metrics.warm_up_duration.set(seconds)
            log.info("cache warmed with %d orders in %.2f s", loaded, seconds)
            return

    def _consume(self) -> None:
        try:
            self.consumer.run()
            return
        except KafkaException as error:
            # librdkafka's own reason (fenced, authorization, ...) says all there is to say.
            log.error(
                "Kafka reported an error the service cannot recover from: %s; stopping the service",
                error.args[0].str(),
            )
        except Exception:
            log.exception("the consumer failed; stopping the service")
        self.failed = True
        self._stop_server()
