"""A test seam: the service's Kafka consumers stop fetching when told to, as librdkafka's
consumer sometimes does after a broker restart under KIP-848 (confluentinc/librdkafka#5153), a
fault that cannot be made to happen at will.

A consumer told to freeze pauses its assigned partitions behind the service's back: nothing is
fetched, nothing revoked, no error reported, while the broker answers and holds the messages.
It is the real client, only paused, and the seam lives in the tests alone: `freezing` makes the
consumer class to put in place of the service's in-process, and `python -m tests.frozen_fetching
SWITCH serve` runs the service's command line with it. While the file SWITCH holds a number n,
the first n consumers the process made are frozen (1: the one made at start, which the
watchdog replaces; a large n: every one); once the file is gone they fetch again.

With "n unassigned" in SWITCH, a frozen consumer drops its partitions instead, as a member
left out of its group after a broker outage: its group still counts them as its, so no other
member is given them, and it has nothing to fetch from; it stays so, and cannot say what its
group committed, as such a member cannot.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka import Message as KafkaMessage

import order_viewer.adapters.kafka.consumer
from order_viewer.entrypoints.cli import main

Rebalance = Callable[[Consumer, list[TopicPartition]], None]


def frozen_marker(switch: Path) -> Path:
    """The file a consumer writes once it has paused for `switch`: what a test waits for before
    it produces the messages that must wait, since a poll under way when the switch is written
    may still return them."""
    return switch.with_name(switch.name + ".frozen")


def freezing(switch: Path) -> type[Consumer]:
    """The consumer class whose first n instances fetch nothing while `switch` holds n."""
    made = itertools.count(1)

    class FreezingConsumer(Consumer):
        def __init__(self, config: dict[str, Any]) -> None:
            super().__init__(config)
            self._number = next(made)
            self._incremental = config.get("group.protocol") == "consumer"
            self._paused = False

        def subscribe(
            self,
            topics: list[str],
            on_assign: Rebalance | None = None,
            on_revoke: Rebalance | None = None,
            on_lost: Rebalance | None = None,
        ) -> None:
            def assigned(consumer: Consumer, partitions: list[TopicPartition]) -> None:
                if on_assign is not None:
                    on_assign(consumer, partitions)
                if self._frozen():
                    # Assigned here, and paused before a poll can return one of their
                    # messages (the client assigns them after the callback otherwise).
                    if self._incremental:
                        consumer.incremental_assign(partitions)
                    else:
                        consumer.assign(partitions)
                    consumer.pause(partitions)

            # The client refuses a None callback.
            others = {"on_revoke": on_revoke, "on_lost": on_lost}
            given = {name: callback for name, callback in others.items() if callback is not None}
            super().subscribe(topics, on_assign=assigned, **given)

        def poll(self, timeout: float = -1) -> KafkaMessage | None:
            assigned = self.assignment()
            frozen = self._frozen()
            if assigned and frozen and _unassigning(switch):
                # What it consumed is committed first, as a revocation would.
                with contextlib.suppress(KafkaException):  # _NO_OFFSET: nothing new to commit
                    self.commit(asynchronous=False)
                if self._incremental:
                    self.incremental_unassign(assigned)
                else:
                    self.unassign()
                frozen_marker(switch).write_text(str(self._number))
            elif assigned and frozen != self._paused:
                # Paused, the messages it has fetched already are dropped, not delivered.
                (self.pause if frozen else self.resume)(assigned)
                self._paused = frozen
                if frozen:
                    frozen_marker(switch).write_text(str(self._number))
            return super().poll(timeout)

        def committed(
            self, partitions: list[TopicPartition], timeout: float = -1
        ) -> list[TopicPartition]:
            if self._frozen() and _unassigning(switch):
                # A member whose group state is not up (left out, rejoining) cannot say what
                # its group committed: librdkafka answers committed() itself with
                # _WAIT_COORD, without asking the broker.
                raise KafkaException(KafkaError(KafkaError._WAIT_COORD))
            return super().committed(partitions, timeout)

        def _frozen(self) -> bool:
            try:
                return self._number <= int(switch.read_text().split()[0])
            except (FileNotFoundError, ValueError, IndexError):
                return False

    return FreezingConsumer


def _unassigning(switch: Path) -> bool:
    try:
        return switch.read_text().split()[1:] == ["unassigned"]
    except FileNotFoundError:
        return False


def command(switch: Path) -> list[str]:
    """`order-viewer serve` with consumers that follow `switch`."""
    return [sys.executable, "-m", "tests.frozen_fetching", str(switch), "serve"]


# The service's ingest process imports this module again as "__mp_main__" (multiprocessing's
# spawn) before it runs: its consumers, which are the ones to freeze, follow the switch too.
if __name__ in ("__main__", "__mp_main__"):
    order_viewer.adapters.kafka.consumer.Consumer = freezing(Path(sys.argv[1]))  # type: ignore[attr-defined]
if __name__ == "__main__":
    sys.exit(main(sys.argv[2:]))
