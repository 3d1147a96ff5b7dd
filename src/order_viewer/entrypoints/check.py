"""`order-viewer check`: is the configuration usable, and are the database and the broker there?"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from order_viewer.config import Settings, kafka_client

TIMEOUT_SECONDS = 5


@dataclass(frozen=True, slots=True)
class Verdict:
    part: str
    ok: bool
    detail: str

    def __str__(self) -> str:
        return f"{self.part}: {'ok' if self.ok else 'FAILED'} - {self.detail}"


def check(settings: Settings) -> list[Verdict]:
    return [_database(settings), _broker(settings)]


def _database(settings: Settings) -> Verdict:
    url = settings.database_url
    host = url.hosts()[0]
    where = f"database {host.get('host')}:{host.get('port')}/{(url.path or '').lstrip('/')}"
    try:
        with psycopg.connect(str(url), connect_timeout=TIMEOUT_SECONDS) as connection:
            version = connection.info.parameter_status("server_version") or "?"
            schema = connection.execute("SELECT to_regclass('alembic_version') IS NOT NULL")
            migrated = schema.fetchone() == (True,)
            revision = (
                connection.execute("SELECT version_num FROM alembic_version").fetchone()
                if migrated
                else None
            )
    except psycopg.Error as error:
        # psycopg's messages name host and port but never the password.
        return Verdict(where, False, str(error).strip().splitlines()[0])
    state = f"schema at revision {revision[0]}" if revision else "schema not migrated yet"
    return Verdict(where, True, f"PostgreSQL {version}, {state}")


def _broker(settings: Settings) -> Verdict:
    where = f"kafka {settings.kafka_bootstrap_servers}"
    admin = AdminClient(kafka_client(settings))
    try:
        metadata = admin.list_topics(timeout=TIMEOUT_SECONDS)
    except KafkaException as error:
        return Verdict(where, False, str(error.args[0]))
    topics = []
    for name in (settings.kafka_topic, settings.kafka_dlq_topic):
        topic = metadata.topics.get(name)
        topics.append(
            f"{name}: {len(topic.partitions)} partitions"
            if topic is not None
            else f"{name}: missing (created at start)"
        )
    return Verdict(where, True, f"{len(metadata.brokers)} broker(s); " + "; ".join(topics))
