"""A real Prometheus (Debian's) scrapes a real `order-viewer serve` and evaluates the project's
rules and the dashboard's queries on what the service really exposes."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from order_viewer.adapters.http.auth.tokens import new_token, token_digest
from order_viewer.entrypoints.generate import make_order
from tests.conftest import (
    ServiceProcess,
    Stack,
    Topics,
    encode_orders,
    free_port,
    kill,
    produce,
    wait_http_ready,
    wait_until,
)
from tests.deploy.conftest import ALERTS
from tests.deploy.test_dashboard import queries

pytestmark = pytest.mark.integration

# Dashboard queries with no series while nothing fails: retries exist once a write was retried,
# and the 5xx ratio once a request failed.
SILENT_WHEN_HEALTHY = {
    ("Retries after transient failures, by what failed", "{{kind}}"),
    ("5xx ratio (readiness probes left out)", "5xx"),
}

SCRAPE_INTERVAL = "1s"

# The service runs as deployed, with bearer tokens: Prometheus scrapes with a metrics:read one,
# the tests read orders with another.
SCRAPER_TOKEN = new_token()
READER_TOKEN = new_token()
READER = {"Authorization": f"Bearer {READER_TOKEN}"}


class Prometheus:
    """Prometheus as a subprocess on a free port, over one service, with the project's rules."""

    def __init__(self, binary: Path, directory: Path, target: str, token: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": "order-viewer",
                    "authorization": {"type": "Bearer", "credentials": token},
                    "static_configs": [{"targets": [target]}],
                }
            ],
        }
        config_file = directory / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.log_path = directory / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    str(binary),
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self) -> None:
        wait_http_ready(f"{self.url}/-/ready", self.process, self.log_path, "prometheus")

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        kill(self.process)


@pytest.fixture
def observed(
    start_service: Callable[..., ServiceProcess], prometheus: Path, tmp_path: Path
) -> Iterator[tuple[ServiceProcess, Prometheus]]:
    tokens = tmp_path / "tokens"
    tokens.write_text(
        f"prometheus:{token_digest(SCRAPER_TOKEN)}:metrics:read\n"
        f"support:{token_digest(READER_TOKEN)}:orders:read\n"
    )
    service = start_service(HTTP_AUTH="token", HTTP_TOKENS_FILE=str(tokens))
    server = Prometheus(prometheus, tmp_path, f"127.0.0.1:{service.port}", SCRAPER_TOKEN)
    try:
        server.wait_ready()
        wait_until(lambda: server.value('up{job="order-viewer"}') == 1, 30, "the first scrape")
        yield service, server
    finally:
        server.stop()


def test_the_rules_load_and_evaluate_on_the_real_metrics(
    observed: tuple[ServiceProcess, Prometheus], stack: Stack, topics: Topics
) -> None:
    _, server = observed
    orders = [make_order(random.Random(seed)) for seed in range(40)]
    produce(stack, topics.orders, encode_orders(orders))

    stored = 'sum(order_viewer_orders_stored_total{job="order-viewer"})'
    wait_until(lambda: server.value(stored) == len(orders), 60, "every order stored")
    lag = f'order_viewer:consumer_lag_messages:sum{{topic="{topics.orders}"}}'
    # The lag comes from librdkafka's statistics every 5 s; it reaches 0 once committed.
    wait_until(lambda: server.value(lag) == 0, 60, "the recorded lag to fall to 0")
    wait_until(
        lambda: (server.value("order_viewer:orders_stored:rate5m") or 0) > 0,
        30,
        "a stored rate",
    )

    groups = server.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    with ALERTS.open() as file:
        expected = sum(len(group["rules"]) for group in yaml.safe_load(file)["groups"])
    assert len(rules) == expected
    unhealthy = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert unhealthy == {}
    firing = {alert["labels"]["alertname"] for alert in server.api("alerts")["alerts"]}
    assert firing == set(), "a healthy service raised alerts"


def test_every_dashboard_query_returns_data_from_the_real_service(
    observed: tuple[ServiceProcess, Prometheus], stack: Stack, topics: Topics
) -> None:
    service, server = observed
    rng = random.Random(7)
    orders = [make_order(rng) for _ in range(20)]
    produce(stack, topics.orders, encode_orders(orders))
    produce(stack, topics.orders, [(b"bad", b"{not json")])

    def served(uid: str) -> bool:
        return service.get(f"/order/{uid}", headers=READER).status_code == 200

    for order in orders:
        wait_until(partial(served, order["order_uid"]), 30, "an order to be served")
    service.get("/order/0000000000000000unknown", headers=READER)
    lag = 'order_viewer_consumer_lag_messages{job="order-viewer"}'
    # librdkafka's statistics come every 5 s.
    wait_until(lambda: server.query(lag), 30, "the consumer lag to be scraped")
    dead_letters = 'order_viewer_messages_dead_lettered_total{job="order-viewer"}'
    wait_until(lambda: server.query(dead_letters), 30, "the dead letter to be scraped")
    # Two scrapes after the traffic, so every rate has two samples to compare.
    last_scrape = 'max(timestamp(up{job="order-viewer"}))'
    scraped = server.value(last_scrape) or 0
    wait_until(lambda: (server.value(last_scrape) or 0) > scraped + 2, 30, "two more scrapes")

    answers = {key: server.query(expr) for key, expr in queries().items()}
    empty = {key for key, answer in answers.items() if not answer}
    # Those two may also show data: a busy broker can make a first dead letter wait for its
    # topic's leader, which is a retry.
    assert empty <= SILENT_WHEN_HEALTHY


def test_the_dead_letter_alert_fires_after_a_burst_of_invalid_messages(
    observed: tuple[ServiceProcess, Prometheus], stack: Stack, topics: Topics
) -> None:
    _, server = observed
    invalid = "order_viewer_messages_dead_lettered_total"
    # A labelled counter appears with its first increment: Prometheus needs one sample of it
    # before a rise shows.
    produce(stack, topics.orders, [(b"first", b"{not json")])
    wait_until(
        lambda: server.value(f'sum({invalid}{{reason="invalid_json"}})') == 1,
        60,
        "the first dead letter scraped",
    )
    produce(stack, topics.orders, [(f"bad-{n}".encode(), b"{not json") for n in range(60)])

    def alert() -> dict[str, Any] | None:
        for found in server.api("alerts")["alerts"]:
            if found["labels"]["alertname"] == "OrderViewerDeadLetterRateHigh":
                return dict(found)
        return None

    raised = wait_until(alert, 60, "the dead-letter alert")
    assert raised["state"] in ("pending", "firing")
    assert raised["labels"]["reason"] == "invalid_json"
    assert raised["labels"]["severity"] == "warning"
    assert float(raised["value"]) > 0.1
