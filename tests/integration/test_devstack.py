"""The local stack on a private directory and ports: `up` leaves the servers running after the
command returned, and each server comes back ready after a stop or a kill."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from confluent_kafka.admin import AdminClient

from devstack.settings import PROJECT_ROOT
from devstack.system import port_in_use, process_alive
from tests.conftest import Servers

# One worker runs the module, so that its tests share its private stack.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("devstack")]


def devstack(stack: Servers, command: str) -> None:
    env = {
        **os.environ,
        "STACK_DIR": str(stack.directory),
        "PG_PORT": str(stack.settings.pg_port),
        "KAFKA_PORT": str(stack.settings.kafka_port),
        "KAFKA_CONTROLLER_PORT": str(stack.settings.controller_port),
    }
    subprocess.run(
        [sys.executable, "-m", "devstack", command], env=env, cwd=PROJECT_ROOT, check=True
    )


def database_answers(stack: Servers) -> bool:
    try:
        with psycopg.connect(stack.database_url, connect_timeout=3) as connection:
            return connection.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def brokers_listed(stack: Servers) -> int:
    admin = AdminClient({"bootstrap.servers": stack.bootstrap_servers})
    return len(admin.list_topics(timeout=10).brokers)


@pytest.fixture(scope="module")
def private_stack() -> Iterator[Servers]:
    base = Path(tempfile.mkdtemp(prefix="order-viewer-devstack-"))
    servers = Servers(base / ".stack")
    try:
        # The command returns, and the servers it started go on without it.
        devstack(servers, "up")
        yield servers
    finally:
        # Through this object, which started the broker again in the kill test and must reap it.
        servers.destroy()
        base.rmdir()


def test_up_leaves_both_servers_running_and_ready(private_stack: Servers) -> None:
    assert private_stack.pg_running()
    assert private_stack.kafka_pid() is not None
    assert database_answers(private_stack)
    assert brokers_listed(private_stack) == 1
    with private_stack.superuser_connect() as connection:
        role = connection.execute(
            "SELECT rolcreatedb FROM pg_roles WHERE rolname = 'order_viewer'"
        ).fetchone()
    assert role == (True,), "the application role creates the per-module test databases"


def test_postgres_is_ready_again_after_a_stop_and_a_crash(private_stack: Servers) -> None:
    private_stack.pg_stop()
    assert not database_answers(private_stack)
    assert not private_stack.pg_running()
    private_stack.pg_start()
    assert database_answers(private_stack)
    private_stack.pg_crash()
    assert not database_answers(private_stack)
    private_stack.pg_start()
    assert database_answers(private_stack)


def test_kafka_is_ready_again_after_a_kill(private_stack: Servers) -> None:
    killed = private_stack.kafka_pid()
    private_stack.kafka_kill()
    assert private_stack.kafka_pid() is None
    assert killed is not None
    assert not process_alive(killed)
    assert not port_in_use(private_stack.settings.kafka_port)
    private_stack.kafka_start()
    assert private_stack.kafka_pid() not in (None, killed)
    assert brokers_listed(private_stack) == 1
