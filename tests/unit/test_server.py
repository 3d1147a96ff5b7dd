from __future__ import annotations

import resource
import subprocess
import sys

from order_viewer.config import MIN_HTTP_CONNECTIONS
from order_viewer.entrypoints.server import FILES_BESIDES_CONNECTIONS, http_connection_limit
from tests.conftest import ORDER_VIEWER, free_port, with_open_files_limit


def test_connections_are_as_many_as_wanted_when_files_are_plenty() -> None:
    assert http_connection_limit(1024, 1_048_576, 4) == 1024


def test_connections_leave_the_files_the_database_and_kafka_need() -> None:
    assert http_connection_limit(1024, 1024, 4) == 1024 - FILES_BESIDES_CONNECTIONS - 4
    assert http_connection_limit(1024, 300, 10) == 300 - FILES_BESIDES_CONNECTIONS - 10


def test_the_soft_open_files_limit_is_raised_to_the_hard_one() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    script = (
        "import resource\n"
        "from order_viewer.entrypoints.server import raise_open_files_limit\n"
        "_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == [str(hard), str(hard)]


def test_too_low_an_open_files_limit_stops_start_up_with_what_to_raise_it_to() -> None:
    low = 100
    result = subprocess.run(
        with_open_files_limit(low, [str(ORDER_VIEWER), "serve"]),
        env={
            "HTTP_PORT": str(free_port()),
            # Nothing listens there: start-up must stop before it connects to anything.
            "DATABASE_URL": "postgresql://order_viewer:secret@127.0.0.1:1/order_viewer",
            "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    needed = FILES_BESIDES_CONNECTIONS + 4 + MIN_HTTP_CONNECTIONS
    assert result.returncode == 1, result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"the open-files limit of {low} leaves room for 0 HTTP connections; "
            f"raise it (ulimit -n) to at least {needed}"
        )
    )
