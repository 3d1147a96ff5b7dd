"""What the local stack is made of, as pure functions of its settings: the configuration files it
writes, the paths it picks, the rules it enforces. Nothing here starts a process or touches a file
outside the paths it is given, so all of it is unit-tested."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shlex
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KAFKA_POM = PROJECT_ROOT / "devstack" / "kafka" / "pom.xml"
KAFKA_LOG_CONFIG = PROJECT_ROOT / "devstack" / "kafka" / "log4j2.yaml"
DEFAULT_STACK_DIR = PROJECT_ROOT / ".stack" / "local"
DEFAULT_KAFKA_LIBS_DIR = PROJECT_ROOT / ".stack" / "kafka-libs"

PG_MAJOR = 15
PG_APP_ROLE = "order_viewer"
PG_APP_PASSWORD = "order_viewer"  # noqa: S105  (a local stack on 127.0.0.1 only)
PG_APP_DB = "order_viewer"
PG_SUPERUSER = "postgres"

DEFAULT_KAFKA_HEAP_OPTS = "-Xms256m -Xmx512m"

# The fallback socket directory must be short, so not below TMPDIR, which may be long itself.
SHORT_SOCKET_ROOT = Path("/tmp")  # noqa: S108
SHORT_SOCKET_PREFIX = "order-viewer-pg-"
# The socket file "<dir>/.s.PGSQL.<port>" and its terminating NUL must fit in sun_path (108
# bytes on Linux); 100 leaves a margin.
SOCKET_PATH_LIMIT = 100


class StackError(Exception):
    """A stack command failed; `str()` is the one line to show, `details` what explains it (the
    tail of a server's log), if anything."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class MissingDependency(StackError):
    """Something `make install` provides is not there; the stack commands never install."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} is missing: run `make install`")


@dataclass(frozen=True)
class StackSettings:
    """Where one stack instance lives and how it is reached. `directory` and `kafka_libs_dir` are
    resolved (symlinks and ".." gone), so every rule below sees the real place."""

    directory: Path = DEFAULT_STACK_DIR
    pg_port: int = 5432
    kafka_port: int = 9092
    controller_port: int = 9093
    kafka_libs_dir: Path = DEFAULT_KAFKA_LIBS_DIR
    kafka_heap_opts: str = DEFAULT_KAFKA_HEAP_OPTS
    pg_start_timeout: float = 120
    kafka_start_timeout: float = 120
    kafka_stop_timeout: float = 60

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", Path(os.path.abspath(self.directory)).resolve())
        object.__setattr__(
            self, "kafka_libs_dir", Path(os.path.abspath(self.kafka_libs_dir)).resolve()
        )
        for name in ("pg_port", "kafka_port", "controller_port"):
            port = getattr(self, name)
            if not 1 <= port <= 65535:
                raise StackError(f"{name} must be a TCP port (1-65535), not {port}")
        ports = (self.pg_port, self.kafka_port, self.controller_port)
        if len(set(ports)) != len(ports):
            raise StackError(f"the three ports must differ, got {ports}")
        # The paths go into files of other formats: a comma splits Kafka's log.dirs, a colon
        # the JVM's class path, a backslash is an escape in server.properties, and a line
        # break ends a setting anywhere.
        for name, path, forbidden in (
            ("STACK_DIR", self.directory, ",\\"),
            ("KAFKA_LIBS_DIR", self.kafka_libs_dir, ",\\:"),
        ):
            text = str(path)
            if any(char in forbidden or not char.isprintable() for char in text):
                raise StackError(
                    f"{name} may not hold control characters or any of {' '.join(forbidden)}: "
                    f"{text!r}"
                )
        try:
            shlex.split(self.kafka_heap_opts)
        except ValueError as error:
            raise StackError(f"KAFKA_HEAP_OPTS cannot be split into options: {error}") from None

    @property
    def pg_data(self) -> Path:
        return self.directory / "postgres"

    @property
    def kafka_data(self) -> Path:
        return self.directory / "kafka-data"

    @property
    def kafka_properties(self) -> Path:
        return self.directory / "kafka.properties"

    @property
    def database_url(self) -> str:
        return f"postgresql://{PG_APP_ROLE}:{PG_APP_PASSWORD}@127.0.0.1:{self.pg_port}/{PG_APP_DB}"

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def pg_socket_dir(self) -> Path:
        return pg_socket_dir(self.directory, self.pg_port)


def settings_from_env(environ: Mapping[str, str]) -> StackSettings:
    """The settings of STACK_DIR, KAFKA_LIBS_DIR, the ports, KAFKA_HEAP_OPTS and the timeouts;
    unset or empty means the default, anything malformed is refused naming the variable."""
    default = StackSettings()
    return StackSettings(
        directory=Path(environ.get("STACK_DIR") or default.directory),
        pg_port=_port(environ, "PG_PORT", default.pg_port),
        kafka_port=_port(environ, "KAFKA_PORT", default.kafka_port),
        controller_port=_port(environ, "KAFKA_CONTROLLER_PORT", default.controller_port),
        kafka_libs_dir=Path(environ.get("KAFKA_LIBS_DIR") or default.kafka_libs_dir),
        kafka_heap_opts=environ.get("KAFKA_HEAP_OPTS", "").strip() or default.kafka_heap_opts,
        pg_start_timeout=_seconds(environ, "PG_START_TIMEOUT", default.pg_start_timeout),
        kafka_start_timeout=_seconds(environ, "KAFKA_START_TIMEOUT", default.kafka_start_timeout),
        kafka_stop_timeout=_seconds(environ, "KAFKA_STOP_TIMEOUT", default.kafka_stop_timeout),
    )


def _port(environ: Mapping[str, str], variable: str, default: int) -> int:
    raw = environ.get(variable, "").strip()
    if not raw:
        return default
    if not re.fullmatch(r"[0-9]{1,5}", raw) or not 1 <= int(raw) <= 65535:
        raise StackError(f"{variable} must be a TCP port number (1-65535), not {raw!r}")
    return int(raw)


def _seconds(environ: Mapping[str, str], variable: str, default: float) -> float:
    raw = environ.get(variable, "").strip()
    if not raw:
        return default
    if not re.fullmatch(r"[0-9]{1,6}(\.[0-9]+)?", raw) or float(raw) <= 0:
        raise StackError(f"{variable} must be a positive number of seconds, not {raw!r}")
    return float(raw)


def pg_socket_dir(stack_dir: Path, port: int) -> Path:
    """`<stack_dir>/pgsock`, or a short directory named after the stack when the socket path
    would not fit a unix socket address."""
    directory = stack_dir / "pgsock"
    if len(os.fsencode(directory)) + len(str(port)) + 11 > SOCKET_PATH_LIMIT:
        digest = hashlib.sha256(os.fsencode(stack_dir)).hexdigest()[:12]
        directory = SHORT_SOCKET_ROOT / f"{SHORT_SOCKET_PREFIX}{digest}"
    return directory


def pg_conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def pg_stack_conf(port: int, socket_dir: Path) -> str:
    """stack.conf, included by the cluster's postgresql.conf: rewritten on every start so the
    port and the socket follow the environment of the day."""
    return f"""\
# Written by devstack on every start; edits are lost.
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = {pg_conf_quote(str(socket_dir))}
max_connections = 200
# What docs/OPERATIONS.md recommends for production, measured in docs/PERFORMANCE.md: the
# indexes of random order ids (400 MB at 1,000,000 orders) stay in memory, checkpoints come by
# time rather than every 1 GB of WAL, and the full-page images written after each checkpoint
# (one per index page an insert touches first) are compressed.
shared_buffers = 1GB
max_wal_size = 8GB
checkpoint_timeout = 15min
wal_compression = lz4
# Statement statistics, for `make bench` to show where the database's time goes.
shared_preload_libraries = 'pg_stat_statements'
# The service promises no order is lost: keep durability real.
fsync = on
synchronous_commit = on
full_page_writes = on
password_encryption = scram-sha-256
log_min_messages = warning
log_line_prefix = '%m [%p] %q%u@%d '
"""


def kafka_properties(settings: StackSettings) -> str:
    """The broker's server.properties: one KRaft node that is broker and controller at once."""
    return f"""\
# Written by devstack on every start; edits are lost.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{settings.controller_port}
listeners=PLAINTEXT://127.0.0.1:{settings.kafka_port},CONTROLLER://127.0.0.1:{settings.controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{settings.kafka_port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={settings.kafka_data}
num.partitions=3
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# After a SIGKILL the restarted broker cannot register until the old incarnation's
# session expires (default 9s, plus 2s heartbeats); keep kill+start tests quick.
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=4000
"""


def advertised_listener(properties: str) -> str | None:
    """host:port the broker of these properties advertises (status reports what was started)."""
    found = re.search(r"^advertised\.listeners=PLAINTEXT://(\S+)$", properties, re.MULTILINE)
    return found.group(1) if found else None


def kafka_cluster_id() -> str:
    """A cluster id as Kafka's own `random-uuid` makes it: a random UUID in unpadded URL-safe
    base64, never starting with "-" (the tools would read it as an option)."""
    while True:
        encoded = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not encoded.startswith("-"):
            return encoded


def is_broker_command_line(cmdline: bytes, properties: Path) -> bool:
    """Whether a /proc/PID/cmdline is the broker of these properties: a recycled pid of any other
    process (another stack's broker included) is not."""
    arguments = cmdline.split(b"\0")
    wanted = [b"kafka.Kafka", os.fsencode(properties)]
    return any(arguments[i : i + 2] == wanted for i in range(len(arguments) - 1))


def temp_roots(environ: Mapping[str, str]) -> list[Path]:
    roots = [environ.get("TMPDIR", ""), "/tmp", "/var/tmp"]  # noqa: S108
    return [Path(root).resolve() for root in roots if root and Path(root).is_dir()]


def is_strictly_below(path: Path, roots: Iterable[Path]) -> bool:
    return any(path != root and path.is_relative_to(root) for root in roots)


def destroy_refusal(stack_dir: Path, roots: Iterable[Path], home: Path | None) -> str | None:
    """Why `destroy` must not delete `stack_dir`, or None when it may: only a folder below a
    `.stack` directory or below a temp dir, and never the home directory or one that holds it.
    The path is resolved first, so ".." and symlinks cannot lead the deletion elsewhere."""
    real = Path(os.path.abspath(stack_dir)).resolve()
    if home is not None:
        real_home = home.resolve()
        if real_home == real or real_home.is_relative_to(real):
            return f"refusing to delete {real}: it is or holds the home directory"
    if ".stack" in real.parts[:-1] or is_strictly_below(real, roots):
        return None
    return (
        f"refusing to delete {real}: it is neither below a .stack directory nor below the temp dir"
    )


def can_traverse(mode: int, owner: int, group: int, uid: int, gids: Iterable[int]) -> bool:
    """Whether a user may search a directory, from its permission bits alone."""
    if uid == owner:
        return bool(mode & 0o100)
    if group in set(gids):
        return bool(mode & 0o010)
    return bool(mode & 0o001)


def merge_dotenv(environ: Mapping[str, str], dotenv: Mapping[str, str | None]) -> dict[str, str]:
    """The environment with a .env file's values added: a variable set in the environment keeps
    its value (as the service's own settings do), a line without a value sets nothing."""
    merged = {name: value for name, value in dotenv.items() if value is not None}
    merged.update(environ)
    return merged
