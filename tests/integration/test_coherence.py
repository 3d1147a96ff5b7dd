"""Three instances of one group over six partitions: whichever instance stores a new version or
a deletion, every instance serves it within a second of the commit (the issue's contract)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest

from order_viewer.entrypoints.generate import make_order
from tests.coherence import DELETED, Observer, percentile, update_in_rounds
from tests.conftest import ServiceProcess, Stack, Topics, produce, wait_until

pytestmark = pytest.mark.integration

SETTINGS = {
    "KAFKA_TOPIC_PARTITIONS": "6",
    "KAFKA_SESSION_TIMEOUT_MS": "6000",
    "KAFKA_TOMBSTONES": "delete",
    "BATCH_MAX_WAIT_MS": "20",
}


def three_instances(start_service: Callable[..., ServiceProcess]) -> list[ServiceProcess]:
    first = start_service(**SETTINGS)  # creates the topics with six partitions
    return [first, start_service(**SETTINGS), start_service(**SETTINGS)]


def test_every_instance_serves_the_newest_version_and_deletion_within_a_second(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    services = three_instances(start_service)
    rng = random.Random(1001)
    orders = [make_order(rng) for _ in range(24)]
    uids = [order["order_uid"] for order in orders]
    with Observer(stack, services, uids) as observer:
        update_in_rounds(stack, topics, observer, orders, range(6), pause=1.5)
        deleted = uids[::2]
        produce(stack, topics.orders, [(uid.encode(), None) for uid in deleted])
        wait_until(
            lambda: all(observer.committed_version(uid) == DELETED for uid in deleted),
            30,
            "the deletions to be committed",
            interval=0.02,
        )
        time.sleep(1.5)
    assert not observer.errors
    # Every instance was read, often, and served older versions before newer ones came.
    assert {read.instance for read in observer.reads} == {0, 1, 2}
    assert len(observer.reads) > 1000
    assert observer.stale_reads() == []
    print(
        f"\ncoherence: {len(observer.reads)} reads of {len(uids)} orders over 3 instances, "
        f"6 versions then {len(deleted)} deletions; stale reads 0"
    )
    for service in services:
        for uid in deleted:
            assert service.get(f"/order/{uid}").status_code == 404
        kept = service.get(f"/order/{uids[1]}")
        assert kept.json()["delivery"]["name"] == "v5"


@pytest.mark.perf
def test_coherence_delay(
    stack: Stack, topics: Topics, start_service: Callable[..., ServiceProcess]
) -> None:
    """From a commit (as polled every 10 ms) to each instance serving it, over 3 instances."""
    services = three_instances(start_service)
    rng = random.Random(1002)
    orders = [make_order(rng) for _ in range(5)]
    with Observer(stack, services, [o["order_uid"] for o in orders], readers=4) as observer:
        update_in_rounds(stack, topics, observer, orders, range(41), pause=0.4)
    delays = observer.delays()
    assert observer.stale_reads() == []
    p50, p99 = percentile(delays, 0.5), percentile(delays, 0.99)
    print(
        f"\ncoherence delay over {len(delays)} (version, instance) pairs: "
        f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms"
    )
    assert p99 < 1.0
