from __future__ import annotations

import gc
import re
import sys
from pathlib import Path

import pytest

from order_viewer.adapters.postgres.writer import DEFAULT_WRITE_TIMEOUT_SECONDS
from order_viewer.bootstrap import tune_interpreter
from order_viewer.config import (
    ConfigurationError,
    Settings,
    kafka_security,
    load_settings,
    span_queue_size,
    tracing_enabled,
)
from order_viewer.entrypoints.cli import main

ROOT = Path(__file__).resolve().parents[2]


def readme_settings() -> dict[str, str]:
    rows = re.findall(r"^\| `([A-Z_]+)` \| `([^`]*)` \|", (ROOT / "README.md").read_text(), re.M)
    return dict(rows)


def test_readme_documents_every_setting_with_its_default() -> None:
    defaults = {name.upper(): str(field.default) for name, field in Settings.model_fields.items()}
    assert readme_settings() == defaults


def test_defaults_are_the_documented_contract() -> None:
    settings = Settings(_env_file=None)
    assert str(settings.database_url) == (
        "postgresql://order_viewer:order_viewer@127.0.0.1:5432/order_viewer"
    )
    assert settings.kafka_bootstrap_servers == "127.0.0.1:9092"
    assert (settings.kafka_topic, settings.kafka_dlq_topic) == ("orders", "orders.dlq")
    assert settings.kafka_group_id == "order-viewer"
    assert (settings.http_host, settings.http_port) == ("127.0.0.1", 8081)
    assert settings.cache_capacity == 100_000
    assert settings.cache_absent_capacity == 100_000
    assert settings.database_writers == 1
    assert settings.database_write_timeout_seconds == DEFAULT_WRITE_TIMEOUT_SECONDS
    assert settings.log_level == "INFO"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HTTP_PORT", "eighty"),
        ("HTTP_PORT", "70000"),
        ("CACHE_CAPACITY", "-1"),
        ("CACHE_ABSENT_CAPACITY", "-1"),
        ("CACHE_ABSENT_CAPACITY", "10000001"),
        ("CACHE_ABSENT_CAPACITY", "9" * 5000),
        ("CACHE_ABSENT_CAPACITY", "1e5"),
        ("CACHE_ABSENT_CAPACITY", "100k"),
        ("CACHE_ABSENT_CAPACITY", "0x10"),
        ("CACHE_ABSENT_CAPACITY", ""),
        ("DATABASE_WRITERS", "0"),
        ("DATABASE_WRITERS", "65"),
        ("DATABASE_WRITERS", "two"),
        ("DATABASE_WRITE_TIMEOUT_SECONDS", "0"),
        ("DATABASE_WRITE_TIMEOUT_SECONDS", "-5"),
        ("DATABASE_WRITE_TIMEOUT_SECONDS", "3601"),
        ("DATABASE_WRITE_TIMEOUT_SECONDS", "99999999999999999999999"),
        ("DATABASE_WRITE_TIMEOUT_SECONDS", "2.5"),
        ("DATABASE_WRITE_TIMEOUT_SECONDS", "thirty"),
        ("DATABASE_WRITE_TIMEOUT_SECONDS", "30s"),
        ("DATABASE_WRITE_TIMEOUT_SECONDS", ""),
        ("INGEST_NICENESS", "-1"),
        ("INGEST_NICENESS", "20"),
        ("INGEST_NICENESS", "2.5"),
        ("INGEST_NICENESS", "low"),
        ("INGEST_NICENESS", "9" * 5000),
        ("INGEST_NICENESS", ""),
        ("INTERPRETER_SWITCH_INTERVAL_US", "0"),
        ("INTERPRETER_SWITCH_INTERVAL_US", "-5000"),
        ("INTERPRETER_SWITCH_INTERVAL_US", "99"),
        ("INTERPRETER_SWITCH_INTERVAL_US", "100001"),
        ("INTERPRETER_SWITCH_INTERVAL_US", "9" * 5000),
        ("INTERPRETER_SWITCH_INTERVAL_US", "0.5"),
        ("INTERPRETER_SWITCH_INTERVAL_US", "5ms"),
        ("INTERPRETER_SWITCH_INTERVAL_US", "fast"),
        ("INTERPRETER_SWITCH_INTERVAL_US", ""),
        ("LOG_LEVEL", "LOUD"),
        ("DATABASE_URL", "mysql://nope"),
        ("KAFKA_TOPIC", ""),
        ("KAFKA_GROUP_PROTOCOL", "new"),
        ("KAFKA_STALL_TIMEOUT_MS", "0"),
        ("KAFKA_STALL_TIMEOUT_MS", "-30000"),
        ("KAFKA_STALL_TIMEOUT_MS", "4999"),
        ("KAFKA_STALL_TIMEOUT_MS", "3600001"),
        ("KAFKA_STALL_TIMEOUT_MS", "1" + "0" * 30),
        ("KAFKA_STALL_TIMEOUT_MS", "thirty"),
        ("KAFKA_STALL_TIMEOUT_MS", "30s"),
        ("KAFKA_STALL_TIMEOUT_MS", "30000.5"),
        ("KAFKA_STALL_TIMEOUT_MS", ""),
        ("KAFKA_TOMBSTONES", "Delete"),
        ("KAFKA_TOMBSTONES", ""),
        ("ORDER_RETENTION_DAYS", "0"),
        ("ORDER_RETENTION_DAYS", "-3"),
        ("ORDER_RETENTION_DAYS", "1.5"),
        ("ORDER_RETENTION_DAYS", "forever"),
        ("ORDER_TRAIL_ENABLED", "maybe"),
        ("ORDER_TRAIL_ENABLED", "2"),
        ("ORDER_TRAIL_ENABLED", "-1"),
        ("ORDER_TRAIL_ENABLED", ""),
        ("ORDER_TRAIL_ENABLED", "1" + "0" * 30),
        ("ORDER_TRAIL_ENABLED", "true false"),
        ("HTTP_AUTH", "basic"),
        ("HTTP_JWT_JWKS_URL", "file:///etc/passwd"),
        ("HTTP_JWT_JWKS_URL", "not a url"),
        ("HTTP_JWT_ISSUER", ""),
        ("HTTP_JWT_JWKS_URL", "http://idp.example.com/jwks"),
        ("HTTP_JWT_JWKS_URL", "http://10.0.0.1/jwks"),
        ("HTTP_JWT_JWKS_URL", "http://127.0.0.1.nip.io/jwks"),
        ("HTTP_JWT_JWKS_URL", "ftp://127.0.0.1/jwks"),
        ("HTTP_JWT_MAX_LIFETIME_SECONDS", "0"),
        ("HTTP_JWT_MAX_LIFETIME_SECONDS", "-60"),
        ("HTTP_JWT_MAX_LIFETIME_SECONDS", "1.5"),
        ("HTTP_JWT_MAX_LIFETIME_SECONDS", "an hour"),
        ("HTTP_JWT_MAX_LIFETIME_SECONDS", "31622401"),
        ("HTTP_JWT_MAX_LIFETIME_SECONDS", "9" * 5000),
        ("HTTP_EVENTS_MAX_STREAMS", "0"),
        ("HTTP_EVENTS_MAX_STREAMS", "-1"),
        ("HTTP_EVENTS_MAX_STREAMS", "1000001"),
        ("HTTP_EVENTS_MAX_STREAMS", "9" * 5000),
        ("HTTP_EVENTS_MAX_STREAMS", "1.5"),
        ("HTTP_EVENTS_MAX_STREAMS", "many"),
        ("HTTP_EVENTS_MAX_STREAMS", ""),
        ("OTEL_SDK_DISABLED", "maybe"),
        ("OTEL_TRACES_EXPORTER", "zipkin"),
        ("OTEL_TRACES_EXPORTER", "otlp,console"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "jaeger:4318"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "file:///etc/passwd"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "not a url"),
        ("OTEL_TRACES_SAMPLER", "sometimes"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.01%"),
        ("OTEL_TRACES_SAMPLER_ARG", "-0.5"),
        ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
        ("OTEL_TRACES_SAMPLER_ARG", "1e400"),
        ("OTEL_TRACES_SAMPLER_ARG", "nan"),
        ("OTEL_TRACES_SAMPLER_ARG", "one percent"),
        ("OTEL_TRACES_SAMPLER_ARG", "9" * 5000),
        ("OTEL_BSP_SCHEDULE_DELAY", "0"),
        ("OTEL_BSP_SCHEDULE_DELAY", "-100"),
        ("OTEL_BSP_SCHEDULE_DELAY", "0.5"),
        ("OTEL_BSP_SCHEDULE_DELAY", "5s"),
        ("OTEL_BSP_SCHEDULE_DELAY", "3600001"),
        ("OTEL_BSP_SCHEDULE_DELAY", "9" * 5000),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "0"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "-1"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "100001"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "many"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", ""),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "-2048"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "10000001"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "1e6"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "9" * 5000),
    ],
)
def test_a_malformed_setting_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=f"^invalid setting {variable}: "):
        load_settings()


def test_keys_are_fetched_over_https_unless_from_this_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for url in (
        "https://idp.example.com/jwks",
        "http://127.0.0.1:8080/jwks",
        "http://127.0.0.2/jwks",
        "http://[::1]:8080/jwks",
        "http://localhost/jwks",
    ):
        monkeypatch.setenv("HTTP_JWT_JWKS_URL", url)
        assert str(load_settings().http_jwt_jwks_url) == url
    monkeypatch.setenv("HTTP_JWT_JWKS_URL", "http://idp.example.com/jwks")
    with pytest.raises(ConfigurationError) as refused:
        load_settings()
    assert str(refused.value) == (
        "invalid setting HTTP_JWT_JWKS_URL: Value error, must be an https:// URL "
        "(http:// only to a loopback address)"
    )


def test_a_tokens_lifetime_is_unbounded_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().http_jwt_max_lifetime_seconds is None
    monkeypatch.setenv("HTTP_JWT_MAX_LIFETIME_SECONDS", "3600")
    assert load_settings().http_jwt_max_lifetime_seconds == 3600


@pytest.mark.parametrize(
    ("settings", "queue"),
    [
        ({"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "5000"}, 4002),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "100"}, 100),
    ],
)
def test_an_export_batch_must_fit_the_span_queue(
    monkeypatch: pytest.MonkeyPatch, settings: dict[str, str], queue: int
) -> None:
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    batch = settings.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512")
    with pytest.raises(ConfigurationError) as refused:
        load_settings()
    assert str(refused.value) == (
        f"invalid settings: Value error, OTEL_BSP_MAX_EXPORT_BATCH_SIZE={batch} must not "
        f"exceed the span queue ({queue}, OTEL_BSP_MAX_QUEUE_SIZE)"
    )


@pytest.mark.parametrize(("streams", "connections"), [("1024", "1024"), ("5000", "1024")])
def test_event_streams_must_leave_connections_for_other_requests(
    monkeypatch: pytest.MonkeyPatch, streams: str, connections: str
) -> None:
    monkeypatch.setenv("HTTP_EVENTS_MAX_STREAMS", streams)
    monkeypatch.setenv("HTTP_MAX_CONNECTIONS", connections)
    with pytest.raises(ConfigurationError) as refused:
        load_settings()
    assert str(refused.value) == (
        f"invalid settings: Value error, HTTP_EVENTS_MAX_STREAMS={streams} must be below "
        f"HTTP_MAX_CONNECTIONS={connections}: each stream holds a connection, and other "
        "requests need some too"
    )
    monkeypatch.setenv("HTTP_EVENTS_MAX_STREAMS", "1023")
    assert load_settings().http_events_max_streams == 1023


@pytest.mark.parametrize(
    ("variable", "value"), [("KAFKA_SESSION_TIMEOUT_MS", "45000"), ("KAFKA_GROUP_INSTANCE_ID", "a")]
)
def test_settings_of_the_classic_group_protocol_are_refused_under_the_consumer_one(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv("KAFKA_GROUP_PROTOCOL", "consumer")
    monkeypatch.setenv(variable, value)
    with pytest.raises(
        ConfigurationError,
        match=f"^invalid settings: .*{variable} applies to KAFKA_GROUP_PROTOCOL=classic only$",
    ):
        load_settings()
    monkeypatch.setenv("KAFKA_GROUP_PROTOCOL", "classic")
    load_settings()


def test_the_poll_interval_must_cover_the_session_under_the_classic_protocol_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAFKA_MAX_POLL_INTERVAL_MS", "10000")
    with pytest.raises(
        ConfigurationError,
        match=r"^invalid setting KAFKA_MAX_POLL_INTERVAL_MS: .*at least KAFKA_SESSION_TIMEOUT_MS",
    ):
        load_settings()
    monkeypatch.setenv("KAFKA_GROUP_PROTOCOL", "consumer")
    assert load_settings().kafka_max_poll_interval_ms == 10_000


def test_the_command_reports_a_bad_setting_in_one_line_without_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://user:s3cret@host:notaport/db")
    assert main(["migrate"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1
    assert stderr.startswith("order-viewer: invalid setting DATABASE_URL")
    assert "s3cret" not in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("command", [[], ["serve"], ["migrate"], ["produce"]])
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: order-viewer")


def test_kafka_security_settings_pass_through_and_stay_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", "viewer")
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "s3cret")
    monkeypatch.setenv("KAFKA_SSL_CA_LOCATION", "/etc/ssl/ca.pem")
    settings = load_settings()
    assert kafka_security(settings) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "viewer",
        "sasl.password": "s3cret",
        "ssl.ca.location": "/etc/ssl/ca.pem",
    }
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in str(settings)


def test_plaintext_kafka_needs_no_security_settings() -> None:
    assert kafka_security(Settings(_env_file=None)) == {"security.protocol": "PLAINTEXT"}


@pytest.mark.parametrize(("value", "enabled"), [("false", False), ("0", False), ("true", True)])
def test_trails_are_on_unless_turned_off(
    monkeypatch: pytest.MonkeyPatch, value: str, enabled: bool
) -> None:
    assert Settings(_env_file=None).order_trail_enabled
    monkeypatch.setenv("ORDER_TRAIL_ENABLED", value)
    assert load_settings().order_trail_enabled is enabled


@pytest.mark.parametrize(
    ("environment", "enabled"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "orders", "OTEL_TRACES_SAMPLER": "always_on"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                "OTEL_TRACES_EXPORTER": "none",
            },
            False,
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"},
            False,
        ),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}, False),
    ],
)
def test_tracing_is_off_unless_an_otel_variable_asks_for_it(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], enabled: bool
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert tracing_enabled(load_settings()) is enabled


def test_the_switch_interval_is_the_whole_processs_once_tuned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gc, "set_threshold", lambda *thresholds: None)  # the suite's own stay
    before = sys.getswitchinterval()
    monkeypatch.setenv("INTERPRETER_SWITCH_INTERVAL_US", "250")
    try:
        tune_interpreter(load_settings())
        assert sys.getswitchinterval() == pytest.approx(250e-6)
    finally:
        sys.setswitchinterval(before)


def test_the_span_queue_holds_two_of_the_largest_batches_unless_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sizes = []
    for largest_batch in ("1", "2000", "50000"):
        monkeypatch.setenv("BATCH_MAX_ORDERS", largest_batch)
        sizes.append(span_queue_size(load_settings()))
    assert sizes == [2048, 4002, 100_002]
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "1000")
    assert span_queue_size(load_settings()) == 1000
