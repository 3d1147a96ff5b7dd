"""`python -m devstack COMMAND`: the local stack's commands (see `--help`)."""

from __future__ import annotations

import argparse
import os
import sys

from devstack.install import OPTIONAL_INSTALLERS, bootstrap
from devstack.run import environment, run
from devstack.settings import PROJECT_ROOT, StackError, settings_from_env
from devstack.stack import LocalStack
from devstack.system import fail, say

STACK_COMMANDS = {
    "up": "start both servers (reusing running ones) and wait until they are ready",
    "down": "stop both servers gracefully, keep the data",
    "status": "tell whether each server is running",
    "destroy": "down, then delete STACK_DIR (only below a .stack directory or the temp dir)",
    "pg-start": "start PostgreSQL and wait until the application role can connect",
    "pg-stop": "fast-mode stop of PostgreSQL",
    "pg-crash": "immediate-mode stop of PostgreSQL (crash recovery at the next start)",
    "kafka-start": "start the broker and wait until it could create a topic",
    "kafka-stop": "SIGTERM the broker and wait for it to exit",
    "kafka-kill": "SIGKILL the broker",
}

ENVIRONMENT_HELP = """\
environment (defaults):
  STACK_DIR              <project>/.stack/local       data, logs, pid file, socket of this instance
  KAFKA_LIBS_DIR         <project>/.stack/kafka-libs  broker jars, shared by all instances
  PG_PORT                5432
  KAFKA_PORT             9092
  KAFKA_CONTROLLER_PORT  9093
  KAFKA_HEAP_OPTS        -Xms256m -Xmx512m
  PG_START_TIMEOUT 120, KAFKA_START_TIMEOUT 120, KAFKA_STOP_TIMEOUT 60 (seconds)
  PG_BIN                 a PostgreSQL 15 bin directory, if not Debian's
"""


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="python -m devstack",
        description="A private PostgreSQL 15 and a single-node Kafka broker (KRaft) on this "
        "machine, no Docker. Only `install` installs anything.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = main.add_subparsers(dest="command", required=True, metavar="COMMAND")
    install = commands.add_parser(
        "install", help="install what is missing: PostgreSQL 15, Java 17, Maven, the Kafka jars"
    )
    install.add_argument("--browser", action="store_true", help="and chromium (browser tests)")
    install.add_argument(
        "--compose", action="store_true", help="and docker-compose (validates the compose file)"
    )
    install.add_argument("--bench-tools", action="store_true", help="and wrk (make bench)")
    install.add_argument(
        "--deploy-tools",
        action="store_true",
        help="and helm and prometheus (the chart and alert-rule tests)",
    )
    for name, description in STACK_COMMANDS.items():
        commands.add_parser(name, help=description)
    commands.add_parser(
        "run",
        help="start the servers unless DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS are set, migrate, "
        "send demo orders, then serve",
    )
    return main


def main(argv: list[str] | None = None) -> int:
    arguments = parser().parse_args(argv)
    try:
        # Every command sees `.env` as `run` and the service do, so that they all act on the
        # same stack directory and jars.
        env = environment(os.environ, PROJECT_ROOT / ".env")
        settings = settings_from_env(env)
        if arguments.command == "install":
            extras = [name for name in OPTIONAL_INSTALLERS if getattr(arguments, name)]
            bootstrap(settings.kafka_libs_dir, extras)
        elif arguments.command == "run":
            run(env)
        elif arguments.command == "status":
            for line in LocalStack(settings, env).status():
                say(line)
        else:
            stack = LocalStack(settings, env)
            getattr(stack, arguments.command.replace("-", "_"))()
    except StackError as error:
        fail(error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
