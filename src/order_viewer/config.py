"""Every setting of the service, read once from the environment (or a `.env` file)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    Field,
    PostgresDsn,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from order_viewer.adapters.http.forwarded import Network, trusted_networks

Port = Annotated[int, Field(ge=1, le=65535)]
Positive = Annotated[int, Field(ge=1)]
# Fewer would leave a browser's handful of parallel requests waiting on each other.
MIN_HTTP_CONNECTIONS = 16
# A year: beyond, a bound on a token's lifetime bounds nothing.
MAX_TOKEN_LIFETIME = 366 * 24 * 3600


class Settings(BaseSettings):
    """The service's configuration; each field is the lower-case name of its variable."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    database_url: PostgresDsn = Field(
        default=PostgresDsn("postgresql://order_viewer:order_viewer@127.0.0.1:5432/order_viewer"),
        description="PostgreSQL connection URL (TLS options go in its query string).",
    )
    database_pool_size: Positive = Field(
        default=4, description="Connections the HTTP side keeps for cache misses."
    )
    database_writers: Annotated[int, Field(ge=1, le=64)] = Field(
        default=1,
        description="Connections that store orders at once, each for the partitions whose "
        "number modulo this is its own (a partition's orders are stored in order by one); 3 "
        "drains a backlog faster.",
    )
    database_write_timeout_seconds: Annotated[int, Field(ge=1, le=3600)] = Field(
        default=30,
        description="Longest a write waits for a lock another session holds; a statement may "
        "run twice this, and a write the server leaves unanswered for twice this plus 10 s is "
        "cut. Then the write is rolled back, logged with what blocked it, shown by /readyz, "
        "and retried. A batch of 1,000 orders of 1,000 items (217 MB) takes about 29 s.",
    )
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092", min_length=1, description="Kafka brokers, host:port[,host:port]."
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        default="PLAINTEXT", description="How clients talk to the brokers (librdkafka names)."
    )
    kafka_sasl_mechanism: str | None = Field(
        default=None, description="SASL mechanism, e.g. PLAIN, SCRAM-SHA-256, SCRAM-SHA-512."
    )
    kafka_sasl_username: str | None = Field(default=None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(
        default=None, description="SASL password (never printed)."
    )
    kafka_ssl_ca_location: str | None = Field(
        default=None, description="File of the CA certificates that sign the brokers' ones."
    )
    kafka_ssl_certificate_location: str | None = Field(
        default=None, description="Client certificate file, for TLS client authentication."
    )
    kafka_ssl_key_location: str | None = Field(default=None, description="Client key file.")
    kafka_ssl_key_password: SecretStr | None = Field(
        default=None, description="Password of the client key (never printed)."
    )
    kafka_topic: str = Field(default="orders", min_length=1, description="Topic of order messages.")
    kafka_dlq_topic: str = Field(
        default="orders.dlq", min_length=1, description="Dead-letter topic for rejected messages."
    )
    kafka_group_id: str = Field(default="order-viewer", min_length=1, description="Consumer group.")
    kafka_group_protocol: Literal["classic", "consumer"] = Field(
        default="classic",
        description="classic: the group protocol every broker speaks. consumer: KIP-848's "
        "broker-driven protocol (Kafka 4.0 and later): a consumer keeps its place in the group "
        "while the broker restarts, but the session timeout is the broker's "
        "(group.consumer.session.timeout.ms) and there is no static membership.",
    )
    kafka_group_instance_id: str | None = Field(
        default=None,
        min_length=1,
        description="Static group membership, one id per instance: restarted (after a crash or "
        "an upgrade), the instance takes its partitions back at once instead of after the "
        "session timeout; but a stopped one keeps them for that timeout too.",
    )
    kafka_topic_partitions: Positive = Field(
        default=3, description="Partitions of the topics when the service has to create them."
    )
    kafka_session_timeout_ms: Annotated[int, Field(ge=6_000, le=300_000)] = Field(
        default=45_000,
        description="How long an instance that stopped answering (killed, frozen) keeps its "
        "partitions before the group hands them to the others.",
    )
    kafka_max_poll_interval_ms: Annotated[int, Field(ge=10_000)] = Field(
        default=600_000,
        description="How long one batch may take (a database outage included) before the "
        "consumer gives its partitions to another instance.",
    )
    kafka_stall_timeout_ms: Annotated[int, Field(ge=5_000, le=3_600_000)] = Field(
        default=30_000,
        description="How long the consumer may ask for messages and get none while the broker "
        "holds some beyond its position before it is closed and made again (librdkafka can "
        "stop fetching after a broker restart without a word); after 3 such restarts in a row "
        "without a message, /livez fails. A consumer with no partition is made again when "
        "messages wait and its group has committed nothing for as long (a member left out of "
        "its group); that one never fails /livez.",
    )
    kafka_tombstones: Literal["dead-letter", "delete"] = Field(
        default="dead-letter",
        description="What a message with a key and no value does. dead-letter: it is rejected "
        "as empty_value. delete: it deletes the order of that key (an older message of it "
        "delivered afterwards does not bring it back).",
    )
    order_retention_days: Positive | None = Field(
        default=None,
        description="Delete orders whose date_created is older than this many days, in the "
        "background; unset: keep them for ever.",
    )
    order_trail_enabled: bool = Field(
        default=True,
        description="Record what became of every message of an order (stored, unchanged, older, "
        "dead-lettered, deleted) in its trail, served at /order/{id}/trail and by "
        "`order-viewer trail`; false: nothing is recorded and the route answers 404.",
    )
    batch_max_orders: Positive = Field(
        default=2000, description="Most messages written in one database transaction."
    )
    batch_max_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=4 * 1024 * 1024,
        description="Most bytes of messages written in one database transaction (a larger "
        "single message is a batch of its own); the consumer reads ahead twice this.",
    )
    batch_max_wait_ms: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=50,
        description="Longest a message waits for others to join its batch while the database "
        "writes the batch before (a message that finds the database idle is written at once).",
    )
    retry_max_backoff_ms: Annotated[int, Field(ge=10)] = Field(
        default=5000,
        description="Cap of the exponential backoff between retries of a failed write.",
    )
    http_host: str = Field(default="127.0.0.1", description="Address the HTTP server binds.")
    http_port: Port = Field(default=8081, description="Port of the HTTP server.")
    http_io_threads: Annotated[int, Field(ge=1, le=16)] = Field(
        default=1,
        description="Threads of the HTTP server's network I/O. Request handlers share one event "
        "loop with the cache, so instances, not threads, scale the Python side.",
    )
    ingest_niceness: Annotated[int, Field(ge=0, le=19)] = Field(
        default=0,
        description="How much lower the ingest process's CPU priority is than the serving "
        "process's (a nice value, added to the service's own), for cache hits to get the cores "
        "first while a backlog drains. 5 changed hits during a drain by less than the noise and "
        "slowed freshness (p50 25-34 against 21 ms at 1,000 orders/s).",
    )
    interpreter_switch_interval_us: Annotated[int, Field(ge=100, le=100_000)] = Field(
        default=500,
        description="Longest a thread of either process waits for the interpreter's lock "
        "while another computes: in the serving process, a request handler waits this for the "
        "thread that puts the ingest's orders into the cache. When both ran in one process, "
        "CPython's own 5,000 put a p99 of 55-59 ms on cache hits during a drain, and 500 gave "
        "18-21 ms.",
    )
    http_max_connections: Annotated[int, Field(ge=MIN_HTTP_CONNECTIONS)] = Field(
        default=1024,
        description="HTTP connections served at once; more wait in the listen backlog. Kept "
        "below the open-files limit, which the service raises to its hard maximum at start.",
    )
    http_access_log: bool = Field(
        default=False,
        description="Log one line per HTTP request (client, method, path, status, duration; "
        "never headers or bodies).",
    )
    http_auth: Literal["none", "token", "jwt"] = Field(
        default="none",
        description="Who may read orders and metrics. none: anyone who reaches the port (refused "
        "on an address other than loopback unless HTTP_ALLOW_ANONYMOUS). token: bearer tokens "
        "of HTTP_TOKENS_FILE. jwt: JWTs of an identity provider (HTTP_JWT_*).",
    )
    http_allow_anonymous: bool = Field(
        default=False,
        description="Serve orders without authentication on an address other than loopback, "
        "on purpose (HTTP_AUTH=none).",
    )
    http_tokens_file: Path | None = Field(
        default=None,
        description="With HTTP_AUTH=token: one client a line, name:sha256-hex-of-token:scope,scope "
        "(`order-viewer token create` makes one); re-read when it changes.",
    )
    http_jwt_jwks_url: AnyHttpUrl | None = Field(
        default=None,
        description="With HTTP_AUTH=jwt: the identity provider's JSON Web Key Set (RS256, ES256 "
        "and EdDSA keys).",
    )
    http_jwt_max_lifetime_seconds: Annotated[int, Field(ge=1, le=MAX_TOKEN_LIFETIME)] | None = (
        Field(
            default=None,
            description="With HTTP_AUTH=jwt: the longest a token may be valid, from its `iat` "
            "to its `exp`; a token that lives longer or has no `iat` is refused. Unset: no "
            "bound.",
        )
    )
    http_jwt_issuer: str | None = Field(
        default=None, min_length=1, description="With HTTP_AUTH=jwt: the `iss` tokens must carry."
    )
    http_jwt_audience: str | None = Field(
        default=None,
        min_length=1,
        description="With HTTP_AUTH=jwt: the `aud` tokens must carry (this service's name at the "
        "identity provider).",
    )
    http_tls_cert_file: Path | None = Field(
        default=None,
        description="Certificate chain (PEM) to serve HTTPS with; needs HTTP_TLS_KEY_FILE.",
    )
    http_tls_key_file: Path | None = Field(
        default=None, description="Private key (PEM) of HTTP_TLS_CERT_FILE."
    )
    http_trusted_proxies: Annotated[tuple[Network, ...], NoDecode] = Field(
        default=(),
        description="The reverse proxies in front of the service, as comma-separated addresses "
        "and CIDR networks (10.0.0.0/8,fd00::/8; at most 100): from a peer among them, the "
        "client the failure limit counts and the audit line names is the right-most "
        "X-Forwarded-For hop not among them. Empty: the peer is the client and the header is "
        "ignored, as any client can send it.",
    )
    http_events_max_streams: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=1000,
        description="Event streams of orders' changes (GET /order/{id}/events) open at once; "
        "beyond it 503 with Retry-After. Each holds an HTTP connection, so it must stay below "
        "HTTP_MAX_CONNECTIONS, leaving connections for the other requests.",
    )
    metrics_enabled: bool = Field(
        default=True,
        description="Serve Prometheus metrics at /metrics and count every HTTP request.",
    )
    cache_capacity: Annotated[int, Field(ge=0)] = Field(
        default=100_000, description="Most orders kept in memory (least recently used evicted)."
    )
    cache_max_bytes: Annotated[int, Field(ge=0)] = Field(
        default=256 * 1024 * 1024,
        description="Most bytes of order bodies kept in memory, counted as they are held there: "
        "compressed (least recently used evicted); binds before CACHE_CAPACITY when orders are "
        "large. With HTTP_AUTH set, masked views of orders are kept in a second cache with the "
        "same bounds, so up to twice this.",
    )
    # Every id a client makes up may take an entry: the bound caps that memory at about 2 GB.
    cache_absent_capacity: Annotated[int, Field(ge=0, le=10_000_000)] = Field(
        default=100_000,
        description="Most ids of orders not stored kept in memory, so that asking for one again "
        "is answered 404 without a query (least recently asked evicted; about 160 bytes each, "
        "205 for ids of 64 characters); 0 keeps none.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Lowest level of log lines printed."
    )
    log_format: Literal["console", "json"] = Field(
        default="console",
        description="console: readable lines; json: one JSON object per line, for a collector.",
    )
    # OpenTelemetry's own variables, most read by its SDK from the process environment (not
    # from .env); the service reads the few that turn tracing on, that the SDK would misread
    # in silence (a sampler ratio it cannot parse samples everything), to refuse them in one
    # line, and those of the span batching, which is the service's own (adapters/otlp.py).
    otel_sdk_disabled: bool = Field(
        default=False, description="true: no tracing, whatever the other OTEL_* variables say."
    )
    otel_traces_exporter: Literal["otlp", "none"] | None = Field(
        default=None,
        description="otlp: export traces over OTLP/HTTP; none: no tracing. Unset: otlp when an "
        "OTLP endpoint is set, else no tracing.",
    )
    otel_exporter_otlp_endpoint: AnyHttpUrl | None = Field(
        default=None,
        description="The OTLP/HTTP collector (e.g. http://jaeger:4318): traces go to its "
        "/v1/traces. The other OTEL_* variables (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, "
        "OTEL_EXPORTER_OTLP_HEADERS, ...) are the SDK's, as documented by OpenTelemetry.",
    )
    otel_exporter_otlp_traces_endpoint: AnyHttpUrl | None = Field(
        default=None, description="The full OTLP/HTTP URL of traces, instead of the one above."
    )
    otel_traces_sampler: (
        Literal[
            "always_on",
            "always_off",
            "traceidratio",
            "parentbased_always_on",
            "parentbased_always_off",
            "parentbased_traceidratio",
        ]
        | None
    ) = Field(
        default=None,
        description="Which traces are kept; unset: parentbased_always_on (every trace, and "
        "the producer's decision for a message that carries one).",
    )
    otel_traces_sampler_arg: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = (
        Field(
            default=None,
            description="The ratio of the traceidratio samplers, 0 to 1 (0.01: one trace in "
            "a hundred).",
        )
    )

    otel_bsp_schedule_delay: Annotated[int, Field(gt=0, le=3_600_000)] = Field(
        default=5000,
        description="Milliseconds at most between two exports of the finished spans.",
    )
    otel_bsp_max_export_batch_size: Annotated[int, Field(gt=0, le=100_000)] = Field(
        default=512, description="Spans at most in one export."
    )
    otel_bsp_max_queue_size: Annotated[int, Field(gt=0, le=10_000_000)] | None = Field(
        default=None,
        description="Finished spans waiting for export at most; when full the oldest are "
        "dropped (and counted in a warning). Unset: two of the largest batches' spans "
        "(BATCH_MAX_ORDERS), at least 2048, since a traced batch ends all its spans at once.",
    )

    @model_validator(mode="after")
    def _span_batches_fit_their_queue(self) -> Settings:
        if self.otel_bsp_max_export_batch_size > span_queue_size(self):
            raise ValueError(
                f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE={self.otel_bsp_max_export_batch_size} must not "
                f"exceed the span queue ({span_queue_size(self)}, OTEL_BSP_MAX_QUEUE_SIZE)"
            )
        return self

    @model_validator(mode="after")
    def _streams_leave_connections(self) -> Settings:
        if self.http_events_max_streams >= self.http_max_connections:
            raise ValueError(
                f"HTTP_EVENTS_MAX_STREAMS={self.http_events_max_streams} must be below "
                f"HTTP_MAX_CONNECTIONS={self.http_max_connections}: each stream holds a "
                "connection, and other requests need some too"
            )
        return self

    @model_validator(mode="after")
    def _classic_protocol_only(self) -> Settings:
        # Under the consumer protocol the broker holds the session timeout, and a static
        # member restarted after a crash is refused as long as its old session lasts.
        if self.kafka_group_protocol == "consumer":
            for name in ("kafka_session_timeout_ms", "kafka_group_instance_id"):
                if name in self.model_fields_set:
                    raise ValueError(f"{name.upper()} applies to KAFKA_GROUP_PROTOCOL=classic only")
        return self

    @model_validator(mode="after")
    def _authentication_is_complete(self) -> Settings:
        needed = {
            "token": ("http_tokens_file",),
            "jwt": ("http_jwt_jwks_url", "http_jwt_issuer", "http_jwt_audience"),
        }.get(self.http_auth, ())
        for name in needed:
            if getattr(self, name) is None:
                raise ValueError(f"HTTP_AUTH={self.http_auth} needs {name.upper()}")
        if (self.http_tls_cert_file is None) != (self.http_tls_key_file is None):
            raise ValueError("HTTP_TLS_CERT_FILE and HTTP_TLS_KEY_FILE go together")
        return self

    @field_validator("http_jwt_jwks_url")
    @classmethod
    def _keys_fetched_over_https(cls, url: AnyHttpUrl | None) -> AnyHttpUrl | None:
        # Keys fetched in clear could be swapped for an attacker's on the way; plain http only
        # where no network is crossed (tests, a provider beside the service).
        if url is not None and url.scheme != "https" and not is_loopback(url.host or ""):
            raise ValueError("must be an https:// URL (http:// only to a loopback address)")
        return url

    @field_validator("http_trusted_proxies", mode="before")
    @classmethod
    def _trusted_networks(cls, value: object) -> object:
        # The variable's text; a tuple of networks passed in code goes on as it is.
        return trusted_networks(value) if isinstance(value, str) else value

    @field_validator("kafka_max_poll_interval_ms")
    @classmethod
    def _poll_interval_covers_session(cls, value: int, info: ValidationInfo) -> int:
        # librdkafka's rule for the classic protocol only: under the consumer one the session
        # timeout is the broker's, and the client compares nothing.
        if info.data.get("kafka_group_protocol") != "classic":
            return value
        session_timeout = info.data.get("kafka_session_timeout_ms")
        if session_timeout is not None and value < session_timeout:
            raise ValueError("must be at least KAFKA_SESSION_TIMEOUT_MS (librdkafka's rule)")
        return value


def is_loopback(host: str) -> bool:
    """Whether `host` (a name, or an address with or without brackets) is this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def span_queue_size(settings: Settings) -> int:
    """The finished spans that may wait for export: OTEL_BSP_MAX_QUEUE_SIZE, else two of the
    largest batches' (a span a message, and its write's), at least the SDK's 2048."""
    if settings.otel_bsp_max_queue_size is not None:
        return settings.otel_bsp_max_queue_size
    return max(2048, 2 * (settings.batch_max_orders + 1))


def tracing_enabled(settings: Settings) -> bool:
    """Whether the service traces: only when asked, by an OTLP endpoint or OTEL_TRACES_EXPORTER,
    and never with OTEL_SDK_DISABLED=true, as OpenTelemetry's own start-up would decide."""
    if settings.otel_sdk_disabled or settings.otel_traces_exporter == "none":
        return False
    return settings.otel_traces_exporter == "otlp" or (
        settings.otel_exporter_otlp_endpoint is not None
        or settings.otel_exporter_otlp_traces_endpoint is not None
    )


def kafka_client(settings: Settings) -> dict[str, Any]:
    """What every Kafka client of the service shares, under librdkafka's names: the brokers and
    how to reach them. Computed where the settings are read and handed to the Kafka adapters,
    each of which adds what its own client needs."""
    return {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        **kafka_security(settings),
        # librdkafka logs every failed reconnect (at level 3); the service reports state changes
        # once itself, from the errors the client returns.
        "log_level": 2,
    }


def kafka_security(settings: Settings) -> dict[str, str]:
    """The Kafka client settings for TLS and SASL, under librdkafka's names; only those set."""
    secrets = {
        "sasl.password": settings.kafka_sasl_password,
        "ssl.key.password": settings.kafka_ssl_key_password,
    }
    plain = {
        "security.protocol": settings.kafka_security_protocol,
        "sasl.mechanism": settings.kafka_sasl_mechanism,
        "sasl.username": settings.kafka_sasl_username,
        "ssl.ca.location": settings.kafka_ssl_ca_location,
        "ssl.certificate.location": settings.kafka_ssl_certificate_location,
        "ssl.key.location": settings.kafka_ssl_key_location,
    }
    return {
        **{name: value for name, value in plain.items() if value is not None},
        **{name: value.get_secret_value() for name, value in secrets.items() if value is not None},
    }


class ConfigurationError(Exception):
    """A setting is missing or malformed; the message names the variable."""


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        first = error.errors()[0]
        if not first["loc"]:  # a rule between settings, whose message names them
            raise ConfigurationError(f"invalid settings: {first['msg']}") from None
        variable = str(first["loc"][0]).upper()
        raise ConfigurationError(f"invalid setting {variable}: {first['msg']}") from None
