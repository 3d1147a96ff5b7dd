"""The local stack's pure parts: its settings, the files it writes, the paths it picks and the
rules it enforces (destroy, recycled pids, traversal), and the one line a missing tool gives."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from devstack import LocalStack, MissingDependency, StackError, StackSettings, settings_from_env
from devstack.__main__ import parser
from devstack.install import OPTIONAL_INSTALLERS, require_kafka
from devstack.run import environment
from devstack.settings import (
    PROJECT_ROOT,
    SHORT_SOCKET_PREFIX,
    SHORT_SOCKET_ROOT,
    SOCKET_PATH_LIMIT,
    advertised_listener,
    can_traverse,
    destroy_refusal,
    is_broker_command_line,
    kafka_cluster_id,
    kafka_properties,
    pg_socket_dir,
    pg_stack_conf,
)
from devstack.system import process_alive, wait_for_exit

# ---------------------------------------------------------------- settings from the environment


def test_defaults_are_the_documented_ones() -> None:
    settings = settings_from_env({})
    assert settings.directory == (PROJECT_ROOT / ".stack" / "local").resolve()
    assert settings.kafka_libs_dir == (PROJECT_ROOT / ".stack" / "kafka-libs").resolve()
    assert (settings.pg_port, settings.kafka_port, settings.controller_port) == (5432, 9092, 9093)
    assert settings.kafka_heap_opts == "-Xms256m -Xmx512m"
    assert (settings.pg_start_timeout, settings.kafka_start_timeout) == (120, 120)
    assert settings.kafka_stop_timeout == 60
    assert settings.database_url == (
        "postgresql://order_viewer:order_viewer@127.0.0.1:5432/order_viewer"
    )
    assert settings.bootstrap_servers == "127.0.0.1:9092"


def test_every_variable_is_read(tmp_path: Path) -> None:
    settings = settings_from_env(
        {
            "STACK_DIR": str(tmp_path / "a" / ".." / "stack"),
            "KAFKA_LIBS_DIR": str(tmp_path / "libs"),
            "PG_PORT": " 15432 ",
            "KAFKA_PORT": "19092",
            "KAFKA_CONTROLLER_PORT": "19093",
            "KAFKA_HEAP_OPTS": "-Xmx1g",
            "PG_START_TIMEOUT": "30",
            "KAFKA_START_TIMEOUT": "45.5",
            "KAFKA_STOP_TIMEOUT": "5",
        }
    )
    assert settings.directory == tmp_path.resolve() / "stack"
    assert settings.kafka_libs_dir == tmp_path.resolve() / "libs"
    assert (settings.pg_port, settings.kafka_port, settings.controller_port) == (
        15432,
        19092,
        19093,
    )
    assert settings.kafka_heap_opts == "-Xmx1g"
    assert (settings.pg_start_timeout, settings.kafka_start_timeout) == (30, 45.5)
    assert settings.kafka_stop_timeout == 5
    assert settings.database_url.endswith("@127.0.0.1:15432/order_viewer")


def test_empty_values_mean_the_default() -> None:
    empty = dict.fromkeys(("STACK_DIR", "PG_PORT", "KAFKA_HEAP_OPTS", "PG_START_TIMEOUT"), "")
    assert settings_from_env(empty) == settings_from_env({})


@pytest.mark.parametrize(
    "port",
    [
        "abc",
        "-1",
        "0",
        "65536",
        "99999999",
        "1e3",
        "5432.0",
        "0x10",
        "\uff15\uff14\uff13\uff12",
        "54 32",
    ],
)
def test_a_malformed_port_is_refused_naming_the_variable(port: str) -> None:
    with pytest.raises(StackError, match=r"^PG_PORT must be a TCP port number"):
        settings_from_env({"PG_PORT": port})


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "inf", "1e9", "ten", "0.0"])
def test_a_malformed_timeout_is_refused_naming_the_variable(timeout: str) -> None:
    with pytest.raises(StackError, match="KAFKA_START_TIMEOUT"):
        settings_from_env({"KAFKA_START_TIMEOUT": timeout})


@pytest.mark.parametrize("name", ["a,b", "back\\slash", "line\nbreak", "tab\there", "escape\x1b"])
def test_a_stack_dir_that_would_break_the_config_files_is_refused(
    name: str, tmp_path: Path
) -> None:
    with pytest.raises(StackError, match=r"^STACK_DIR may not hold"):
        settings_from_env({"STACK_DIR": str(tmp_path / name)})


def test_a_colon_splits_the_class_path_but_not_the_stack_dir(tmp_path: Path) -> None:
    with pytest.raises(StackError, match=r"^KAFKA_LIBS_DIR may not hold"):
        settings_from_env({"KAFKA_LIBS_DIR": str(tmp_path / "a:b")})
    settings = settings_from_env({"STACK_DIR": str(tmp_path / "a:b c'd")})
    assert settings.directory.name == "a:b c'd"


def test_heap_options_that_cannot_be_split_are_refused() -> None:
    with pytest.raises(StackError, match=r"^KAFKA_HEAP_OPTS cannot be split"):
        settings_from_env({"KAFKA_HEAP_OPTS": "-Xmx1g '-Dx=unclosed"})


def test_two_servers_cannot_share_a_port() -> None:
    with pytest.raises(StackError, match="must differ"):
        settings_from_env({"KAFKA_PORT": "9093"})


# ---------------------------------------------------------------- the files it writes


def properties_of(text: str) -> dict[str, str]:
    pairs = [line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#")]
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), "a key set twice"
    return dict(pairs)


def test_the_broker_properties_follow_the_settings(tmp_path: Path) -> None:
    settings = StackSettings(tmp_path / "s", 15432, 19092, 19093)
    properties = properties_of(kafka_properties(settings))
    assert properties["listeners"] == ("PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093")
    assert properties["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert properties["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert properties["process.roles"] == "broker,controller"
    assert properties["log.dirs"] == str(tmp_path.resolve() / "s" / "kafka-data")
    assert properties["auto.create.topics.enable"] == "false"
    # A killed broker's successor registers once the old session expired: kept short.
    assert int(properties["broker.session.timeout.ms"]) <= 4000
    assert int(properties["broker.heartbeat.interval.ms"]) < 1000
    assert advertised_listener(kafka_properties(settings)) == "127.0.0.1:19092"


def test_no_listener_is_found_in_foreign_properties() -> None:
    assert advertised_listener("listeners=PLAINTEXT://127.0.0.1:1\n") is None
    assert advertised_listener("# advertised.listeners=PLAINTEXT://x:1\n") is None


def test_stack_conf_quotes_the_socket_directory() -> None:
    conf = pg_stack_conf(15432, Path("/srv/it's here/pgsock"))
    assert "port = 15432\n" in conf
    assert "unix_socket_directories = '/srv/it''s here/pgsock'\n" in conf
    assert "listen_addresses = '127.0.0.1'\n" in conf
    for durability in ("fsync = on", "synchronous_commit = on", "full_page_writes = on"):
        assert durability in conf


def test_cluster_ids_are_kafka_uuids() -> None:
    ids = {kafka_cluster_id() for _ in range(500)}
    assert len(ids) == 500
    for cluster_id in ids:
        assert len(cluster_id) == 22
        assert not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


# ---------------------------------------------------------------- the socket path rule


def socket_address(directory: Path, port: int) -> bytes:
    """The socket file's path as the kernel stores it, with its terminating NUL."""
    return os.fsencode(directory / f".s.PGSQL.{port}") + b"\0"


def test_a_short_stack_dir_keeps_its_socket() -> None:
    assert pg_socket_dir(Path("/srv/stack"), 5432) == Path("/srv/stack/pgsock")


def test_a_long_stack_dir_gets_a_short_socket_dir_of_its_own() -> None:
    long_dir = Path("/srv/" + "d" * 120)
    other = Path("/srv/" + "e" * 120)
    chosen = pg_socket_dir(long_dir, 5432)
    assert chosen.parent == SHORT_SOCKET_ROOT
    assert chosen.name.startswith(SHORT_SOCKET_PREFIX)
    assert chosen == pg_socket_dir(long_dir, 5432)
    assert chosen != pg_socket_dir(other, 5432)
    assert len(socket_address(chosen, 65535)) <= SOCKET_PATH_LIMIT


@pytest.mark.parametrize("port", [1, 5432, 65535])
def test_the_socket_file_always_fits(port: int) -> None:
    # Around the limit, character by character, with a multi-byte name counted in bytes.
    for length in range(60, 110):
        for name in ("x" * length, "é" * (length // 2)):
            directory = pg_socket_dir(Path("/" + name), port)
            assert len(socket_address(directory, port)) <= SOCKET_PATH_LIMIT
            if len(socket_address(Path("/" + name) / "pgsock", port)) <= SOCKET_PATH_LIMIT:
                assert directory == Path("/" + name) / "pgsock"


# ---------------------------------------------------------------- the destroy rule


@pytest.fixture
def temp_root(tmp_path: Path) -> Path:
    root = tmp_path / "tmp"
    root.mkdir()
    return root.resolve()


def refusal(path: Path, temp_root: Path, home: Path | None = None) -> str | None:
    return destroy_refusal(path, [temp_root], home)


def test_a_stack_below_a_dot_stack_dir_or_the_temp_dir_may_go(temp_root: Path) -> None:
    assert refusal(Path("/srv/project/.stack/local"), temp_root) is None
    assert refusal(Path("/srv/.stack/a/b"), temp_root) is None
    assert refusal(temp_root / "run-1", temp_root) is None
    assert refusal(temp_root / "run-1" / ".stack", temp_root) is None


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/.stack",
        "/srv/project/.stack",
        "/srv/project",
        "/srv/.stacks/local",
        "/srv/x.stack/local",
        "/srv/project/.stack/..",
        "/srv/project/.stack/local/../..",
        "relative/../../../../../../../..",
    ],
)
def test_anything_else_is_refused(path: str, temp_root: Path) -> None:
    assert refusal(Path(path), temp_root) is not None


def test_the_temp_dir_itself_and_dot_dot_out_of_it_are_refused(temp_root: Path) -> None:
    assert refusal(temp_root, temp_root) is not None
    assert refusal(temp_root / "run-1" / "..", temp_root) is not None
    assert refusal(temp_root / ".." / "elsewhere", temp_root) is not None


def test_a_symlink_is_judged_by_where_it_leads(temp_root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "precious"
    outside.mkdir()
    (temp_root / "link").symlink_to(outside)
    assert refusal(temp_root / "link", temp_root) is not None
    (temp_root / "root-link").symlink_to("/")
    assert refusal(temp_root / "root-link", temp_root) is not None
    dot_stack = tmp_path / "project" / ".stack"
    dot_stack.mkdir(parents=True)
    (dot_stack / "local").symlink_to(outside)
    assert refusal(dot_stack / "local", temp_root) is not None
    inside = temp_root / "run-1"
    inside.mkdir()
    (tmp_path / "to-temp").symlink_to(inside)
    assert refusal(tmp_path / "to-temp", temp_root) is None


def test_home_and_what_holds_it_are_refused_even_below_the_temp_dir(temp_root: Path) -> None:
    home = temp_root / "home" / "dev"
    assert refusal(home, temp_root, home) is not None
    assert refusal(temp_root / "home", temp_root, home) is not None
    assert refusal(Path("/"), temp_root, home) is not None
    assert refusal(home / "work" / ".stack" / "local", temp_root, home) is None


def test_destroy_refuses_before_it_stops_or_deletes_anything(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "data").write_text("precious")
    stack = LocalStack(StackSettings(kept, 15432, 19092, 19093), {"HOME": str(kept)})
    with pytest.raises(StackError, match="refusing to delete"):
        stack.destroy()
    assert (kept / "data").read_text() == "precious"


# ---------------------------------------------------------------- pids and traversal


def test_only_this_stacks_broker_is_recognised() -> None:
    properties = Path("/srv/.stack/local/kafka.properties")
    ours = b"java\0-Xmx512m\0-cp\0/libs/*\0kafka.Kafka\0/srv/.stack/local/kafka.properties\0"
    assert is_broker_command_line(ours, properties)
    for recycled in (
        b"",
        b"bash\0",
        b"java\0kafka.Kafka\0/srv/.stack/other/kafka.properties\0",
        b"java\0kafka.Kafka\0/srv/.stack/local/kafka.properties.bak\0",
        b"java\0kafka.Kafka /srv/.stack/local/kafka.properties\0",
        b"java\0/srv/.stack/local/kafka.properties\0kafka.Kafka\0",
        b"grep\0-F\0kafka.Kafka\0",
    ):
        assert not is_broker_command_line(recycled, properties), recycled


def test_a_child_is_alive_until_it_ended_and_is_then_reaped() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_alive(child.pid)
    finally:
        child.kill()
    assert wait_for_exit(child.pid, 10)
    # process_alive collected its exit status: no zombie is left behind.
    assert not Path(f"/proc/{child.pid}").exists()
    # Popen learns that the status was collected elsewhere (and stops warning it still runs).
    child.wait()


def test_a_pid_that_never_was_is_not_alive() -> None:
    assert not process_alive(2**22 + 1)  # above the kernel's largest pid


@pytest.mark.parametrize(
    ("mode", "owner", "group", "allowed"),
    [
        (0o700, 101, 0, True),  # the user's own, searchable by its owner
        (0o600, 101, 0, False),  # its own, but not searchable
        (0o770, 0, 104, True),  # through its group
        (0o707, 0, 104, False),  # the group's bits decide for a member, not the others'
        (0o701, 0, 0, True),  # through the others' bit
        (0o700, 0, 0, False),  # a private dir of root's (mktemp -d)
    ],
)
def test_traversal_follows_the_permission_bits(
    mode: int, owner: int, group: int, allowed: bool
) -> None:
    assert can_traverse(stat.S_IFDIR | mode, owner, group, 101, [104, 103]) is allowed


# ---------------------------------------------------------------- .env for `make run`


def test_dotenv_adds_what_the_environment_does_not_set(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# local settings\n"
        "export HTTP_PORT=18081\n"
        "DATABASE_URL='postgresql://u:p@db:5432/x?sslmode=require'\n"
        'KAFKA_TOPIC="orders # not a comment"\n'
        "LOG_LEVEL=DEBUG  # a comment\n"
        "NO_VALUE\n"
        "\n"
        "=orphan\n"
        "KAFKA_GROUP_ID=from-file\n"
    )
    env = environment({"KAFKA_GROUP_ID": "from-environment", "PATH": "/bin"}, dotenv)
    assert env["HTTP_PORT"] == "18081"
    assert env["DATABASE_URL"] == "postgresql://u:p@db:5432/x?sslmode=require"
    assert env["KAFKA_TOPIC"] == "orders # not a comment"
    assert env["LOG_LEVEL"] == "DEBUG"
    assert "NO_VALUE" not in env
    assert env["KAFKA_GROUP_ID"] == "from-environment"
    assert env["PATH"] == "/bin"


def test_no_dotenv_is_the_environment_unchanged(tmp_path: Path) -> None:
    assert environment({"A": "1"}, tmp_path / ".env") == {"A": "1"}


# ---------------------------------------------------------------- missing tools


def test_missing_jars_tell_to_run_make_install(tmp_path: Path) -> None:
    with pytest.raises(MissingDependency) as raised:
        require_kafka(tmp_path / "kafka-libs")
    assert str(raised.value) == (
        f"the Kafka broker (jars in {tmp_path / 'kafka-libs'}) is missing: run `make install`"
    )


def test_missing_java_tells_to_run_make_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingDependency, match=r"^Java 17 is missing: run `make install`$"):
        require_kafka(tmp_path)


def test_the_stack_commands_never_install_they_say_one_line(tmp_path: Path) -> None:
    environ = {
        **os.environ,
        "STACK_DIR": str(tmp_path / ".stack"),
        "KAFKA_LIBS_DIR": str(tmp_path / "no-jars"),
        "PG_PORT": "1",
        "KAFKA_PORT": "2",
        "KAFKA_CONTROLLER_PORT": "3",
    }
    for command in ("up", "kafka-start"):
        result = subprocess.run(
            [sys.executable, "-m", "devstack", command],
            env=environ,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 1
        assert result.stderr.splitlines() == [
            f"[stack] ERROR: the Kafka broker (jars in {tmp_path / 'no-jars'}) is missing: "
            "run `make install`"
        ]
        assert not (tmp_path / "no-jars").exists()
        assert not (tmp_path / ".stack" / "postgres").exists()


def test_every_install_flag_has_an_installer() -> None:
    arguments = parser().parse_args(
        ["install", "--browser", "--compose", "--bench-tools", "--deploy-tools"]
    )
    flags = {name for name, value in vars(arguments).items() if value is True}
    assert flags == set(OPTIONAL_INSTALLERS)
