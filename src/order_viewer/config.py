"""Every setting of the service, read once from the environment (or a `.env` file)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PostgresDsn, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

Port = Annotated[int, Field(ge=1, le=65535)]
Positive = Annotated[int, Field(ge=1)]


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
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092", min_length=1, description="Kafka brokers, host:port[,host:port]."
    )
    kafka_topic: str = Field(default="orders", min_length=1, description="Topic of order messages.")
    kafka_dlq_topic: str = Field(
        default="orders.dlq", min_length=1, description="Dead-letter topic for rejected messages."
    )
    kafka_group_id: str = Field(default="order-viewer", min_length=1, description="Consumer group.")
    kafka_topic_partitions: Positive = Field(
        default=3, description="Partitions of the topics when the service has to create them."
    )
    kafka_max_poll_interval_ms: Annotated[int, Field(ge=10_000)] = Field(
        default=600_000,
        description="How long one batch may take (a database outage included) before the "
        "consumer gives its partitions to another instance.",
    )
    batch_max_orders: Positive = Field(
        default=2000, description="Most messages written in one database transaction."
    )
    batch_max_wait_ms: Annotated[int, Field(ge=1, le=10_000)] = Field(
        default=50,
        description="Longest a message waits for its batch to fill before it is written.",
    )
    retry_max_backoff_ms: Annotated[int, Field(ge=10)] = Field(
        default=5000,
        description="Cap of the exponential backoff between retries of a failed write.",
    )
    http_host: str = Field(default="127.0.0.1", description="Address the HTTP server binds.")
    http_port: Port = Field(default=8081, description="Port of the HTTP server.")
    http_access_log: bool = Field(
        default=False,
        description="Log one line per HTTP request (client, method, path, status, duration; "
        "never headers or bodies).",
    )
    cache_capacity: Annotated[int, Field(ge=0)] = Field(
        default=100_000, description="Most orders kept in memory (least recently used evicted)."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Lowest level of log lines printed."
    )


class ConfigurationError(Exception):
    """A setting is missing or malformed; the message names the variable."""


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        first = error.errors()[0]
        variable = str(first["loc"][0]).upper() if first["loc"] else "configuration"
        raise ConfigurationError(f"invalid setting {variable}: {first['msg']}") from None
