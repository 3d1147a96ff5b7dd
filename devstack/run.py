"""`make run`: the local servers (unless the settings point elsewhere), the schema, a handful of
demo orders with the sample among them, then the service in the foreground."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from dotenv import dotenv_values

from devstack.settings import (
    PROJECT_ROOT,
    MissingDependency,
    StackError,
    merge_dotenv,
    settings_from_env,
)
from devstack.stack import LocalStack

SAMPLE_ORDER = PROJECT_ROOT / "src" / "order_viewer" / "entrypoints" / "sample_order.json"
SAMPLE_ORDER_UID = "b563feb7b2b84b6test"


def environment(environ: Mapping[str, str], dotenv_file: Path) -> dict[str, str]:
    """The environment with `.env` added, as the service reads it (set variables win)."""
    if not dotenv_file.is_file():
        return dict(environ)
    return merge_dotenv(environ, dotenv_values(dotenv_file))


def run(env: dict[str, str]) -> NoReturn:
    """`env`: the environment with `.env` added (`environment`)."""
    env = dict(env)
    stack = LocalStack(settings_from_env(env), env)
    # The servers started here are the ones the service must use, whatever their ports.
    if not env.get("DATABASE_URL"):
        stack.pg_start()
        env["DATABASE_URL"] = stack.database_url
    if not env.get("KAFKA_BOOTSTRAP_SERVERS"):
        stack.kafka_start()
        env["KAFKA_BOOTSTRAP_SERVERS"] = stack.bootstrap_servers
    order_viewer = Path(sys.executable).parent / "order-viewer"
    if not order_viewer.is_file():
        raise MissingDependency("the order-viewer command of the project's virtualenv")
    for step in (
        ["migrate"],
        ["produce", "--file", str(SAMPLE_ORDER)],
        ["produce", "--count", "20", "--seed", "2021"],
    ):
        if subprocess.run(
            [str(order_viewer), *step], env=env, cwd=PROJECT_ROOT, check=False
        ).returncode:
            raise StackError(f"`order-viewer {' '.join(step)}` failed")
    host = env.get("HTTP_HOST", "127.0.0.1")
    port = env.get("HTTP_PORT", "8081")
    print(f"order-viewer: open http://{host}:{port}/?id={SAMPLE_ORDER_UID}", flush=True)
    os.chdir(PROJECT_ROOT)
    # The service takes this process's place, so Ctrl-C and SIGTERM reach it directly.
    os.execve(order_viewer, [str(order_viewer), "serve"], env)  # noqa: S606
