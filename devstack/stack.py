"""One local stack: a private PostgreSQL cluster and a single-node Kafka broker (KRaft) below one
directory, started and stopped by the CLI (`python -m devstack`) and by the test suite alike."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from psycopg import sql

from devstack.install import require_kafka, require_postgres
from devstack.settings import (
    KAFKA_LOG_CONFIG,
    PG_APP_DB,
    PG_APP_PASSWORD,
    PG_APP_ROLE,
    PG_SUPERUSER,
    SHORT_SOCKET_PREFIX,
    SHORT_SOCKET_ROOT,
    StackError,
    StackSettings,
    advertised_listener,
    can_traverse,
    destroy_refusal,
    is_broker_command_line,
    is_strictly_below,
    kafka_cluster_id,
    kafka_properties,
    pg_stack_conf,
    temp_roots,
)
from devstack.system import (
    as_pg_owner,
    is_root,
    locked,
    log_tail,
    port_in_use,
    postgres_account,
    process_alive,
    run_quietly,
    say,
    signal_process,
    wait_for_exit,
)

KAFKA_JVM_FLAGS = (
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
    f"-Dlog4j2.configurationFile={KAFKA_LOG_CONFIG}",
)
# A topic name no one uses: the readiness probe only asks whether it *could* be created.
READINESS_PROBE_TOPIC = "devstack-readiness-probe"


class LocalStack:
    """The servers of one stack directory. Every method is idempotent: starting a running server
    waits for it to be ready, stopping a stopped one says so."""

    def __init__(self, settings: StackSettings, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self.environ = dict(os.environ if environ is None else environ)
        self._broker: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------ how to reach it

    @property
    def directory(self) -> Path:
        return self.settings.directory

    @property
    def database_url(self) -> str:
        """The application role's URL (it may create databases, e.g. one per test module)."""
        return self.settings.database_url

    @property
    def bootstrap_servers(self) -> str:
        return self.settings.bootstrap_servers

    @property
    def superuser_conninfo(self) -> str:
        """The superuser over the unix socket, which trusts local connections."""
        return psycopg.conninfo.make_conninfo(
            host=str(self.settings.pg_socket_dir),
            port=self.settings.pg_port,
            user=PG_SUPERUSER,
            dbname="postgres",
        )

    def superuser_connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.superuser_conninfo, autocommit=True)

    @cached_property
    def pg_bindir(self) -> Path:
        """PostgreSQL's programs, looked up once (a missing one is looked up again next time)."""
        return require_postgres(self.environ)

    # ------------------------------------------------------------ whole stack

    def up(self) -> None:
        """Start both servers (or find them running) and return once both are ready."""
        with self._lock(create=True):
            _ = self.pg_bindir
            require_kafka(self.settings.kafka_libs_dir)
            # The broker boots in the background while PostgreSQL starts.
            broker = self._kafka_launch()
            self._pg_start()
            self._kafka_wait_ready(broker)

    def down(self) -> None:
        """Stop both servers gracefully; the data stays."""
        if not self.directory.is_dir():
            say(f"nothing to stop: {self.directory} does not exist")
            return
        with self._lock(create=False):
            self._kafka_end(signal.SIGTERM)
            self._pg_stop("fast")

    def destroy(self) -> None:
        """Stop both servers and delete the stack directory, if it is one that may be deleted."""
        home = self.environ.get("HOME")
        refusal = destroy_refusal(
            self.directory, temp_roots(self.environ), Path(home) if home else None
        )
        if refusal is not None:
            raise StackError(refusal)
        if not self.directory.is_dir():
            say(f"nothing to destroy: {self.directory} does not exist")
            return
        with self._lock(create=False):
            self._kafka_end(signal.SIGTERM)
            self._pg_stop("fast")
            socket_dir = self.settings.pg_socket_dir
            if socket_dir.parent == SHORT_SOCKET_ROOT and socket_dir.name.startswith(
                SHORT_SOCKET_PREFIX
            ):
                shutil.rmtree(socket_dir, ignore_errors=True)
            shutil.rmtree(self.directory)
        say(f"destroyed {self.directory}")

    def status(self) -> list[str]:
        """One line per server, with the ports it was started with (not today's environment's)."""
        lines = []
        pg_data = self.settings.pg_data
        if self.pg_running():
            fields = (pg_data / "postmaster.pid").read_text().splitlines()
            pid, port = (fields[0], fields[3]) if len(fields) > 3 else ("?", "?")
            lines.append(f"postgres: running on 127.0.0.1:{port} (pid {pid}, data {pg_data})")
        else:
            lines.append("postgres: stopped")
        if (pid_number := self.kafka_pid()) is not None:
            properties = self.settings.kafka_properties
            listener = advertised_listener(properties.read_text()) if properties.is_file() else None
            lines.append(
                f"kafka: running on {listener or '?'} (pid {pid_number}, "
                f"data {self.settings.kafka_data})"
            )
        else:
            lines.append("kafka: stopped")
        return lines

    # ------------------------------------------------------------ PostgreSQL

    def pg_start(self) -> None:
        with self._lock(create=True):
            self._pg_start()

    def pg_stop(self) -> None:
        with self._lock(create=False):
            self._pg_stop("fast")

    def pg_crash(self) -> None:
        """An immediate-mode stop: in-flight transactions are lost, recovery runs at start."""
        with self._lock(create=False):
            self._pg_stop("immediate")

    def pg_running(self) -> bool:
        if not (self.settings.pg_data / "PG_VERSION").is_file():
            return False
        try:
            status = subprocess.run(
                self._pg_ctl("status"), capture_output=True, cwd="/", check=False
            )
        except StackError:
            return False
        return status.returncode == 0

    def _pg_ctl(self, *arguments: str) -> list[str]:
        pg_ctl = self.pg_bindir / "pg_ctl"
        return as_pg_owner([str(pg_ctl), "-D", str(self.settings.pg_data), *arguments])

    def _pg_start(self) -> None:
        self._ensure_directory()
        if self.pg_running():
            self._pg_wait_ready()
            return
        self._ensure_postgres_can_reach_directory()
        if port_in_use(self.settings.pg_port):
            raise StackError(
                f"port {self.settings.pg_port} is already in use by another process "
                "(a system PostgreSQL? try: pg_lsclusters)"
            )
        self._pg_init_cluster()
        socket_dir = self.settings.pg_socket_dir
        socket_dir.mkdir(parents=True, exist_ok=True)
        log = self.directory / "postgres.log"
        log.touch()
        stack_conf = self.settings.pg_data / "stack.conf"
        stack_conf.write_text(pg_stack_conf(self.settings.pg_port, socket_dir))
        self._give_to_postgres(socket_dir, log, stack_conf)
        timeout = str(int(self.settings.pg_start_timeout))
        started = run_quietly(
            self._pg_ctl("start", "-w", "-t", timeout, "-l", str(log)), log, cwd=Path("/")
        )
        if not started:
            raise StackError(
                f"PostgreSQL did not start (data {self.settings.pg_data}, "
                f"port {self.settings.pg_port})",
                log_tail(log),
            )
        self._pg_provision()
        self._pg_wait_ready()

    def _pg_init_cluster(self) -> None:
        pg_data = self.settings.pg_data
        if (pg_data / "PG_VERSION").is_file():
            return
        say(f"initialising PostgreSQL cluster in {pg_data}")
        shutil.rmtree(pg_data, ignore_errors=True)
        pg_data.mkdir(mode=0o700, parents=True)
        self._give_to_postgres(pg_data)
        init_log = self.directory / "initdb.log"
        initdb = [
            str(self.pg_bindir / "initdb"), "-D", str(pg_data), "-U", PG_SUPERUSER, "-E", "UTF8",
            "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=scram-sha-256",
        ]  # fmt: skip
        if not run_quietly(as_pg_owner(initdb), init_log, cwd=Path("/")):
            raise StackError("initdb failed", log_tail(init_log))
        # Ports and paths follow the environment: stack.conf is rewritten on every start.
        with (pg_data / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude_if_exists = 'stack.conf'\n")

    def _pg_provision(self) -> None:
        role = sql.Identifier(PG_APP_ROLE)
        with self.superuser_connect() as connection:
            exists = connection.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", (PG_APP_ROLE,)
            ).fetchone()
            connection.execute(
                sql.SQL("{} ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                    sql.SQL("ALTER" if exists else "CREATE"), role, sql.Literal(PG_APP_PASSWORD)
                )
            )
            # Lets the benchmarks settle the server (CHECKPOINT) before timing HTTP, and read
            # every statement's statistics.
            connection.execute(sql.SQL("GRANT pg_checkpoint, pg_read_all_stats TO {}").format(role))
        # In the template, so that every database made afterwards (the benchmarks', the tests')
        # has the statement statistics view.
        template = psycopg.conninfo.make_conninfo(self.superuser_conninfo, dbname="template1")
        with psycopg.connect(template, autocommit=True) as connection:
            connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        with self.superuser_connect() as connection:
            if not connection.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (PG_APP_DB,)
            ).fetchone():
                connection.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(PG_APP_DB), role)
                )

    def _pg_app_connection_works(self) -> bool:
        try:
            with psycopg.connect(self.database_url, connect_timeout=5) as connection:
                return connection.execute("SELECT 1").fetchone() == (1,)
        except psycopg.Error:
            return False

    def _pg_wait_ready(self) -> None:
        """Ready means the application role can connect to its database and run a query."""
        deadline = time.monotonic() + self.settings.pg_start_timeout
        while not self._pg_app_connection_works():
            if time.monotonic() > deadline:
                raise StackError(
                    f"PostgreSQL does not accept connections for {PG_APP_ROLE} on "
                    f"127.0.0.1:{self.settings.pg_port}",
                    log_tail(self.directory / "postgres.log"),
                )
            time.sleep(0.2)
        say(f"postgres ready: {self.database_url}")

    def _pg_stop(self, mode: str) -> None:
        if not self.pg_running():
            say("postgres: not running")
            return
        log = self.directory / "postgres.log"
        if not run_quietly(self._pg_ctl("stop", "-m", mode, "-w", "-t", "60"), log, Path("/")):
            raise StackError(f"PostgreSQL did not stop ({mode})", log_tail(log))
        say(f"postgres stopped ({mode})")

    def _give_to_postgres(self, *paths: Path) -> None:
        if is_root():
            account = postgres_account()
            for path in paths:
                os.chown(path, account.pw_uid, account.pw_gid)

    def _ensure_postgres_can_reach_directory(self) -> None:
        """As root the cluster belongs to `postgres`, which must be able to traverse every parent
        of the stack directory. A private temp dir of ours (`mktemp -d` makes them 0700) is
        opened for search, which is all postgres needs; anything else is the user's call."""
        if not is_root():
            return
        account = postgres_account()
        groups = os.getgrouplist(account.pw_name, account.pw_gid)
        roots = temp_roots(self.environ)
        for directory in (self.directory, *self.directory.parents):
            info = directory.stat()
            if can_traverse(info.st_mode, info.st_uid, info.st_gid, account.pw_uid, groups):
                continue
            if info.st_uid == os.geteuid() and is_strictly_below(directory, roots):
                directory.chmod(info.st_mode | 0o001)
                continue
            raise StackError(
                f"the postgres user cannot traverse {directory} (needed for "
                f"{self.settings.pg_data}); chmod o+x it or choose another STACK_DIR"
            )

    # ------------------------------------------------------------ Kafka

    def kafka_start(self) -> None:
        with self._lock(create=True):
            require_kafka(self.settings.kafka_libs_dir)
            self._kafka_wait_ready(self._kafka_launch())

    def kafka_stop(self) -> None:
        """SIGTERM, and wait for the broker's orderly shutdown (SIGKILL if it hangs)."""
        with self._lock(create=False):
            self._kafka_end(signal.SIGTERM)

    def kafka_kill(self) -> None:
        with self._lock(create=False):
            self._kafka_end(signal.SIGKILL)

    @property
    def _pid_file(self) -> Path:
        return self.directory / "kafka.pid"

    def kafka_pid(self) -> int | None:
        """The broker's pid, checked against recycled pids: the process must be the broker of
        this stack directory's properties."""
        try:
            pid = int(self._pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        if not is_broker_command_line(cmdline, self.settings.kafka_properties):
            return None
        return pid if process_alive(pid) else None

    def _kafka_end(self, how: signal.Signals) -> None:
        """Signal the broker and wait until it is gone; after a SIGTERM it is given
        KAFKA_STOP_TIMEOUT to shut down in order, then killed."""
        pid = self.kafka_pid()
        if pid is None:
            say("kafka: not running")
            self._pid_file.unlink(missing_ok=True)
            return
        if how == signal.SIGTERM:
            signal_process(pid, signal.SIGTERM)
            timeout = self.settings.kafka_stop_timeout
            if not wait_for_exit(pid, timeout):
                say(f"WARNING: Kafka (pid {pid}) still runs {timeout:.0f}s after SIGTERM; SIGKILL")
                how = signal.SIGKILL
        if how == signal.SIGKILL:
            signal_process(pid, signal.SIGKILL)
            if not wait_for_exit(pid, 30):
                raise StackError(f"Kafka (pid {pid}) survived SIGKILL")
        self._pid_file.unlink(missing_ok=True)
        if self._broker is not None:
            # Its exit status may already have been collected while waiting; wait() knows that.
            self._broker.wait()
            self._broker = None
        say("kafka killed" if how == signal.SIGKILL else "kafka stopped")

    def _java(self, *arguments: str, heap: list[str]) -> list[str]:
        libs = f"{self.settings.kafka_libs_dir}/*"
        return ["java", *heap, *KAFKA_JVM_FLAGS, "-cp", libs, *arguments]

    def _kafka_format_storage(self) -> None:
        if (self.settings.kafka_data / "meta.properties").is_file():
            return
        id_file = self.directory / "kafka-cluster-id"
        if not id_file.is_file() or not id_file.read_text().strip():
            id_file.write_text(kafka_cluster_id() + "\n")
        cluster_id = id_file.read_text().strip()
        say(f"formatting Kafka storage in {self.settings.kafka_data} (cluster id {cluster_id})")
        log = self.directory / "kafka-format.log"
        # A short-lived tool: small heap, quick start.
        storage_tool = self._java(
            "kafka.tools.StorageTool", "format", "--ignore-formatted", "-t", cluster_id,
            "-c", str(self.settings.kafka_properties),
            heap=["-Xmx256m", "-XX:TieredStopAtLevel=1"],
        )  # fmt: skip
        if not run_quietly(storage_tool, log):
            raise StackError("formatting Kafka storage failed", log_tail(log))

    def _kafka_launch(self) -> subprocess.Popen[bytes] | None:
        """Start the broker unless it runs; the process started, if any. The broker outlives us: it
        has a session of its own (a Ctrl-C or the end of a test run's process group does not
        reach it), none of our descriptors (the stack lock), and nothing kills it when we exit."""
        self._ensure_directory()
        if self.kafka_pid() is not None:
            return None
        for port in (self.settings.kafka_port, self.settings.controller_port):
            if port_in_use(port):
                raise StackError(
                    f"port {port} is already in use by another process "
                    "(Kafka of another STACK_DIR?)"
                )
        self.settings.kafka_data.mkdir(parents=True, exist_ok=True)
        self.settings.kafka_properties.write_text(kafka_properties(self.settings))
        self._kafka_format_storage()
        self._pid_file.unlink(missing_ok=True)
        log = self.directory / "kafka.log"
        command = self._java(
            "kafka.Kafka",
            str(self.settings.kafka_properties),
            heap=shlex.split(self.settings.kafka_heap_opts),
        )
        with log.open("ab") as output:
            output.write(f"=== kafka start by devstack at {datetime.now():%F %T} ===\n".encode())
            output.flush()
            broker = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                start_new_session=True,
            )
        self._pid_file.write_text(f"{broker.pid}\n")
        # Kept while this object lives, so that a broker that outlives it is not taken for a
        # child forgotten (Popen warns when dropped while its process runs).
        self._broker = broker
        return broker

    def _kafka_wait_ready(self, broker: subprocess.Popen[bytes] | None) -> None:
        """Ready means a metadata request lists the broker and a topic could be created now (the
        controller answers and has an unfenced broker to place it on)."""
        started = time.monotonic()
        deadline = started + self.settings.kafka_start_timeout
        log = self.directory / "kafka.log"
        probe = BrokerProbe(self.bootstrap_servers, self.settings.kafka_port)
        while not probe():
            # Our own child is asked directly: while it execs, its /proc entry shows no command.
            alive = broker.poll() is None if broker else self.kafka_pid() is not None
            if not alive:
                raise StackError("Kafka is not running (it exited during startup?)", log_tail(log))
            if time.monotonic() > deadline:
                raise StackError(
                    f"Kafka not ready on {self.bootstrap_servers} after "
                    f"{self.settings.kafka_start_timeout:.0f}s",
                    log_tail(log),
                )
            time.sleep(0.2)
        took = f" (started in {time.monotonic() - started:.1f}s)" if broker else ""
        say(f"kafka ready: {self.bootstrap_servers}{took}")

    # ------------------------------------------------------------ the directory

    def _ensure_directory(self) -> None:
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True)
            # The postgres user must be able to traverse it when we are root.
            self.directory.chmod(0o755)

    @contextmanager
    def _lock(self, create: bool) -> Iterator[None]:
        """Serialises commands on one stack directory; a missing one needs no lock to stop."""
        if create:
            self._ensure_directory()
        elif not self.directory.is_dir():
            yield
            return
        with locked(self.directory / ".lock"):
            yield


class BrokerProbe:
    """Whether the broker is ready: a metadata request lists it, and the controller would create
    a topic now (it answers, and has an unfenced broker to place the topic on). The admin client
    is made once the port accepts connections, and then kept for the following probes."""

    def __init__(self, bootstrap_servers: str, port: int) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.port = port
        self.admin: AdminClient | None = None

    def __call__(self) -> bool:
        if not port_in_use(self.port):
            return False
        if self.admin is None:
            # librdkafka would log each refused connection of a broker still booting; a broker
            # that never gets ready is reported by us, with its log.
            self.admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 0})
        try:
            if not self.admin.list_topics(timeout=2).brokers:
                return False
            futures = self.admin.create_topics(
                [NewTopic(READINESS_PROBE_TOPIC, num_partitions=1, replication_factor=1)],
                validate_only=True,
                request_timeout=5,
            )
            futures[READINESS_PROBE_TOPIC].result(timeout=10)
        except KafkaException as error:
            # Someone made the probe's topic: the broker that says so is ready all the same.
            return bool(error.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS)
        return True
