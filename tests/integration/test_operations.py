"""What an operator sees: Prometheus metrics and logs of a running service."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from order_viewer.adapters.http.auth.tokens import new_token, token_digest
from order_viewer.entrypoints.generate import break_order, make_order
from tests.conftest import (
    ORDER_VIEWER,
    Servers,
    ServiceProcess,
    Stack,
    Topics,
    consume_all,
    encode_orders,
    fresh_database,
    produce,
    scrape,
    wait_until,
)
from tests.conftest import metric_value as value

pytestmark = pytest.mark.integration


def test_metrics_follow_what_was_consumed_stored_and_served(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    # Room for every order earlier tests stored, so that new ones add to the cache, not evict.
    service = start_service(CACHE_CAPACITY="2000000", CACHE_MAX_BYTES=str(2**40))
    before = scrape(service)
    cached_before = value(before, "order_viewer_cache_entries")
    rng = random.Random(31)
    valid = [make_order(rng) for _ in range(40)]
    invalid = [break_order(rng, make_order(rng), "missing_field")[0] for _ in range(5)]
    produce(stack, topics.orders, [*encode_orders(valid), *((b"k", v) for v in invalid)])

    def stored_all() -> bool:
        return value(scrape(service), "order_viewer_orders_stored_total") == len(valid)

    wait_until(stored_all, 30, "every valid order to be counted")
    samples = scrape(service)
    assert value(samples, "order_viewer_messages_consumed_total") == len(valid) + len(invalid)
    assert value(samples, "order_viewer_messages_dead_lettered_total", reason="missing_field") == 5
    assert value(samples, "order_viewer_orders_replaced_total") == 0
    assert value(samples, "order_viewer_cache_entries") == cached_before + len(valid)
    cached_bytes = value(samples, "order_viewer_cache_bytes")
    assert cached_bytes > value(before, "order_viewer_cache_bytes")
    assert value(samples, "order_viewer_cache_max_bytes") == 2**40
    assert value(samples, "order_viewer_batch_size_messages_count") >= 1
    assert value(samples, "order_viewer_database_write_duration_seconds_count") >= 1
    assert value(samples, "order_viewer_newest_order_age_seconds") > 0

    service.get(f"/order/{valid[0]['order_uid']}")
    service.get("/order/not-there")
    service.get("/order/bad%20id")
    samples = scrape(service)
    order_route = "/order/{order_uid}"
    assert value(samples, "order_viewer_http_requests_total", route=order_route, status="200") == 1
    assert value(samples, "order_viewer_http_requests_total", route=order_route, status="404") == 1
    assert value(samples, "order_viewer_http_requests_total", route=order_route, status="400") == 1
    assert (
        value(samples, "order_viewer_http_request_duration_seconds_count", route=order_route) == 3
    )
    assert value(samples, "order_viewer_cache_hits_total") >= 1
    assert not any("not-there" in str(labels) for _, labels in samples)

    def lag_is_zero() -> bool:
        lags = {
            labels: sample
            for (name, labels), sample in scrape(service).items()
            if name == "order_viewer_consumer_lag_messages"
        }
        return bool(lags) and all(lag == 0 for lag in lags.values())

    wait_until(lag_is_zero, 30, "the consumer lag to fall to 0", interval=1)


def test_metrics_can_be_turned_off(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    service = start_service(METRICS_ENABLED="false")
    assert service.get("/metrics").status_code == 404


def test_json_logs_carry_no_personal_data(
    stack: Stack,
    topics: Topics,
    start_service: Callable[..., ServiceProcess],
    tmp_path: Path,
) -> None:
    # With authentication, so that order reads leave audit lines to check as well.
    token = new_token()
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"auditor:{token_digest(token)}:orders:read:pii\n")
    service = start_service(LOG_FORMAT="json", HTTP_AUTH="token", HTTP_TOKENS_FILE=str(tokens))
    authorized = {"Authorization": f"Bearer {token}"}
    rng = random.Random(32)
    order = make_order(rng)
    order["delivery"].update(name="Zelda Personal", phone="+70001112233", email="zelda@example.org")
    broken = dict(order, payment="not an object")
    produce(
        stack, topics.orders, [*encode_orders([order]), (b"broken", json.dumps(broken).encode())]
    )
    wait_until(
        lambda: service.get(f"/order/{order['order_uid']}", headers=authorized).status_code == 200,
        30,
        "stored",
    )
    assert service.get(f"/order/{order['order_uid']}").status_code == 401
    wait_until(lambda: "wrong_type" in service.log(), 30, "the rejection to be logged")
    service.terminate()
    lines = [line for line in service.log_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "event"} <= set(record) for record in records)
    audited = [record for record in records if record["logger"] == "order_viewer.audit"]
    assert any(" status=200 view=whole " in record["event"] for record in audited)
    assert any(" status=401 " in record["event"] for record in audited)
    rejected = next(record for record in records if record.get("reason") == "wrong_type")
    assert rejected["partition"] >= 0
    assert rejected["offset"] >= 0
    text = "\n".join(lines)
    assert token not in text
    for personal in (
        "Zelda Personal",
        "+70001112233",
        "zelda@example.org",
        order["delivery"]["address"],
    ):
        assert personal not in text


def run_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ORDER_VIEWER), "check"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_gives_a_verdict_for_each_dependency(stack: Stack) -> None:
    reachable = run_check(
        {"DATABASE_URL": stack.database_url, "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers}
    )
    assert reachable.returncode == 0, reachable.stdout + reachable.stderr
    lines = reachable.stdout.splitlines()
    assert lines[0] == "configuration: ok"
    assert lines[1].startswith("database 127.0.0.1:")
    assert ": ok - PostgreSQL 15" in lines[1]
    assert lines[2].startswith(f"kafka {stack.bootstrap_servers}: ok - 1 broker(s)")

    unreachable = run_check(
        {
            "DATABASE_URL": "postgresql://someone:s3cret@127.0.0.1:1/nowhere",
            "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
            "KAFKA_SASL_PASSWORD": "kafka-s3cret",
        }
    )
    assert unreachable.returncode == 1
    assert "database 127.0.0.1:1/nowhere: FAILED" in unreachable.stdout
    assert "kafka 127.0.0.1:1: FAILED" in unreachable.stdout
    everything = unreachable.stdout + unreachable.stderr
    assert "s3cret" not in everything
    assert len(unreachable.stderr.splitlines()) == 0


def test_produce_sends_the_orders_it_reports(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    start_service()  # creates the topics
    result = subprocess.run(
        [str(ORDER_VIEWER), "produce", "--count", "60", "--invalid-ratio", "0.25", "--seed", "4"],
        env={
            **os.environ,
            "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers,
            "KAFKA_TOPIC": topics.orders,
            "KAFKA_DLQ_TOPIC": topics.dead_letters,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    summary = re.fullmatch(
        rf"sent 60 messages \((\d+) invalid\) to {topics.orders} "
        r"in [\d.]+ s \([\d,]+/s\); 0 failed\n",
        result.stdout,
    )
    assert summary is not None, result.stdout
    invalid = int(summary[1])
    assert 0 < invalid < 60
    dead = consume_all(stack, topics.dead_letters, invalid, timeout=60)
    assert len(dead) == invalid  # the service rejected exactly those the emulator broke


def test_a_start_up_step_that_fails_for_good_stops_the_service_with_its_reason(
    servers: Servers, topics: Topics, tmp_path: Path
) -> None:
    """A migration that cannot run (the schema names a revision this version does not know, as
    after a downgrade of the service) is no outage to wait out: the process must end with
    status 1 and say why, not stay up and unready."""
    with fresh_database(servers, "broken_schema") as broken:
        with broken.connect() as connection:
            connection.execute("UPDATE alembic_version SET version_num = 'from_the_future'")
        service = ServiceProcess(broken, topics, tmp_path)
        try:
            service.start(ready=False)
            assert service.process is not None
            assert service.process.wait(timeout=60) == 1
        finally:
            service.kill()
    assert "from_the_future" in service.log()
    assert "the service cannot go on; stopping" in service.log()
