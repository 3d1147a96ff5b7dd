"""The `serve` process: HTTP in the event loop, its cache filled by the ingest process beside it
(`bootstrap.ingest_process_main`), which it starts, watches and stops."""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import socket
import ssl
from pathlib import Path

import uvloop
from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings
from granian.log import LogLevels
from granian.server.embed import Server

from order_viewer import bootstrap
from order_viewer.adapters.http.access import AccessPolicy
from order_viewer.config import MIN_HTTP_CONNECTIONS, Settings

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


def tls_problem(cert_file: Path, key_file: Path) -> str | None:
    """What makes these files unfit to serve HTTPS with, naming the setting at fault, or None.
    Checked with OpenSSL before anything starts: the HTTP server would only find out after
    the Kafka and database clients were built, with a traceback."""
    for setting, path in (("HTTP_TLS_CERT_FILE", cert_file), ("HTTP_TLS_KEY_FILE", key_file)):
        try:
            with path.open("rb"):
                pass
        except OSError as error:
            return f"{setting} {path}: cannot read it: {error.strerror}"
    try:
        ssl.create_default_context(cafile=cert_file)
    except ssl.SSLError:
        return f"HTTP_TLS_CERT_FILE {cert_file}: no PEM certificate in it"
    try:
        # A password callback, so that an encrypted key fails here instead of prompting.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(
            cert_file, key_file, password=lambda: b""
        )
    except (OSError, ssl.SSLError) as error:
        if getattr(error, "reason", None) == "KEY_VALUES_MISMATCH":
            return (
                f"HTTP_TLS_KEY_FILE {key_file}: not the key of the HTTP_TLS_CERT_FILE certificate"
            )
        return f"HTTP_TLS_KEY_FILE {key_file}: no unencrypted PEM private key in it"
    return None


def serve(settings: Settings, access: AccessPolicy | None) -> int:
    """Serve until SIGINT or SIGTERM, with `access` guarding the routes with order data (None:
    open to all, refused unless HTTP_AUTH=none); the exit status: 0 after a stop, 1 if the
    service could not start or go on (the reason is logged)."""
    address = (settings.http_host, settings.http_port)
    try:
        # Asked before anything starts, so a taken port is one clear line, not a traceback
        # from inside the HTTP server after the consumer has joined its group.
        with socket.create_server(address):
            pass
    except OSError as error:
        log.error("cannot listen on %s:%d: %s", *address, error.strerror)
        return 1
    if settings.http_tls_cert_file is not None:
        assert settings.http_tls_key_file is not None  # the settings validated it
        problem = tls_problem(settings.http_tls_cert_file, settings.http_tls_key_file)
        if problem is not None:
            log.error("cannot serve HTTPS: %s", problem)
            return 1
    open_files = raise_open_files_limit()
    connections = http_connection_limit(
        settings.http_max_connections, open_files, settings.database_pool_size
    )
    if connections < MIN_HTTP_CONNECTIONS:
        needed = FILES_BESIDES_CONNECTIONS + settings.database_pool_size
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
        "http" if settings.http_tls_cert_file is None else "https",
        *address,
        connections,
    )
    # uvloop's event loop answers cached orders about half again as fast as asyncio's.
    return uvloop.run(_serve(bootstrap.build(settings, access), connections))


async def _serve(parts: bootstrap.Parts, connections: int) -> int:
    settings = parts.settings
    loop = asyncio.get_running_loop()
    server = Server(
        parts.app,
        address=settings.http_host,
        port=settings.http_port,
        interface=Interfaces.ASGINL,
        # In `auto` mode granian reads a new connection until it can tell HTTP/1 from
        # HTTP/2, with no time limit: a client that sent nothing held it for ever.
        http=HTTPModes.http1,
        websockets=False,
        runtime_threads=settings.http_io_threads,
        backlog=1024,
        # granian's name for the most connections it serves at once
        backpressure=connections,
        http1_settings=HTTP1Settings(header_read_timeout=10_000, max_buffer_size=64 * 1024),
        ssl_cert=settings.http_tls_cert_file,
        ssl_key=settings.http_tls_key_file,
        log_level=LogLevels.error,
        log_access=settings.http_access_log,
        # Our own log format for granian's lines too, rather than its own handlers.
        log_dictconfig={
            "loggers": {
                "_granian": {"propagate": True},
                "granian.access": {"propagate": True, "level": "INFO"},
            }
        },
    )
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(stop_signal, _stopped_by_signal, stop_signal, parts, server)
    await parts.reader.open()
    background = bootstrap.run_in_background(
        parts, lambda: loop.call_soon_threadsafe(_stop_serving, parts, server)
    )
    try:
        await server.serve()
    finally:
        parts.stop.set()
        for thread in background:
            await asyncio.to_thread(thread.join)
        bootstrap.close(parts)
        await parts.reader.close()
    return 1 if parts.readiness.failed.is_set() else 0


def _stopped_by_signal(stop_signal: signal.Signals, parts: bootstrap.Parts, server: Server) -> None:
    log.info("stopping on %s", stop_signal.name)
    _stop_serving(parts, server)


def _stop_serving(parts: bootstrap.Parts, server: Server) -> None:
    # The streams of orders' changes end first: the server waits for the answers under way.
    parts.events.close()
    server.stop()
