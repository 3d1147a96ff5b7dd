"""The chaos soak's last check against a real instance: it must see a stale cached order and an
instance that does not answer, or its "0 stale" would prove nothing."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest
from benchmarks.soak import ask_every_order, stored_digests

from order_viewer.entrypoints.generate import make_order
from tests.conftest import (
    ServiceProcess,
    Stack,
    Topics,
    encode_orders,
    free_port,
    produce,
    wait_until,
)

pytestmark = pytest.mark.integration


def test_a_stale_cached_order_and_an_instance_that_does_not_answer_are_found(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    service = start_service()
    rng = random.Random(2201)
    orders = [make_order(rng) for _ in range(3)]
    uids = [order["order_uid"] for order in orders]
    produce(stack, topics.orders, encode_orders(orders))
    wait_until(
        lambda: all(service.get(f"/order/{uid}").status_code == 200 for uid in uids),
        30,
        "the orders served (and cached)",
    )
    assert asyncio.run(ask_every_order([service.base_url], stored_digests(stack, uids))) == (
        [],
        [],
    )

    # Another version stored behind the instance's back, without the notification a writer
    # sends: its cached copy is now stale.
    changed = uids[0]
    with stack.connect() as connection:
        connection.execute(
            "UPDATE orders SET content_sha256 = sha256(content_sha256) WHERE order_uid = %s",
            (changed,),
        )
    nobody = f"http://127.0.0.1:{free_port()}"
    stale, unanswered = asyncio.run(
        ask_every_order([service.base_url, nobody], stored_digests(stack, uids))
    )
    assert len(stale) == 1
    assert stale[0].startswith(f"{service.base_url}/order/{changed}: 200 ")
    assert sorted(line.split(": ")[0] for line in unanswered) == sorted(
        f"{nobody}/order/{uid}" for uid in uids
    )
