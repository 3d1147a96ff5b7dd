"""The ceiling of the HTTP server on this machine, for `make bench` to measure beside the service.

granian, run as the service runs it (embedded, ASGI on uvloop, HTTP/1.1 only, one I/O thread),
answers `GET /order/{id}` with the same bodies and headers the service sends for a cache hit,
from a plain dict: no routing, no cache bookkeeping, no metrics, no access control. Whatever the
service spends beyond this is the service's own.

    DATABASE_URL=... python -m benchmarks.bare_server --port PORT --ids-file FILE
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import psycopg
import uvloop
from granian.constants import HTTPModes, Interfaces
from granian.log import LogLevels
from granian.server.embed import Server

from order_viewer.adapters.cache import etag_of
from order_viewer.adapters.http.api import ORDER_CACHE_CONTROL

Response = tuple[list[tuple[bytes, bytes]], bytes]
NOT_FOUND: Response = ([(b"content-type", b"application/json")], b'{"error":"not found"}')


def stored_bodies(database_url: str, ids: list[str]) -> dict[str, Response]:
    """The stored body of each order and the headers of the service's cache-hit answer."""
    bodies: dict[str, Response] = {}
    with psycopg.connect(database_url) as connection:
        rows = connection.execute(
            "SELECT order_uid, document, content_sha256 FROM orders WHERE order_uid = ANY(%s)",
            (ids,),
        )
        for order_uid, document, sha256 in rows:
            headers = [
                (b"etag", etag_of(sha256).encode()),
                (b"cache-control", ORDER_CACHE_CONTROL.encode()),
                (b"content-type", b"application/json"),
            ]
            bodies[order_uid] = (headers, document.encode())
    return bodies


def bare_app(bodies: dict[str, Response]) -> Any:
    async def app(scope: dict[str, Any], _receive: Any, send: Any) -> None:
        found = bodies.get(scope["path"][7:])
        headers, body = NOT_FOUND if found is None else found
        await send(
            {
                "type": "http.response.start",
                "status": 404 if found is None else 200,
                "headers": headers,
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


async def serve(app: Any, port: int) -> None:
    """`app` served as the service serves its own."""
    server = Server(
        app,
        address="127.0.0.1",
        port=port,
        interface=Interfaces.ASGINL,
        http=HTTPModes.http1,
        websockets=False,
        runtime_threads=1,
        backlog=1024,
        log_level=LogLevels.error,
    )
    loop = asyncio.get_running_loop()
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(stop_signal, server.stop)
    await server.serve()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare_server", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ids-file", type=Path, required=True)
    arguments = parser.parse_args()
    ids = arguments.ids_file.read_text().split()
    bodies = stored_bodies(os.environ["DATABASE_URL"], ids)
    if len(bodies) != len(ids):
        raise SystemExit(f"{len(ids) - len(bodies)} of the ids are not stored")
    uvloop.run(serve(bare_app(bodies), arguments.port))


if __name__ == "__main__":
    main()
