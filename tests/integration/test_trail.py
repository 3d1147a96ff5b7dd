"""Orders' trails against the real PostgreSQL (and Kafka, through `order-viewer serve`): each
outcome recorded where it is decided, paged through the API, guarded by its scope, audited, and
printed by `order-viewer trail`."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from order_viewer.adapters.http.api import create_app
from order_viewer.adapters.http.auth.tokens import new_token, token_digest
from order_viewer.adapters.http.trail import cursor_of
from order_viewer.adapters.postgres.expirer import PostgresOrderExpirer
from order_viewer.adapters.postgres.reader import PostgresOrderReader
from order_viewer.adapters.postgres.trail import PostgresDeadLetterTrail
from order_viewer.adapters.postgres.writer import PostgresOrderWriter
from order_viewer.domain.model import Rejection
from order_viewer.entrypoints.generate import make_order
from order_viewer.service.ingest import prepare_batch
from order_viewer.service.ports import ConsumedMessage, OrderTrail, RejectedMessage
from tests.conftest import (
    ORDER_VIEWER,
    Record,
    ServiceProcess,
    Stack,
    new_topics,
    produce,
    wait_until,
)
from tests.integration.test_api import HOSTILE_IDS
from tests.integration.test_app import App, run

pytestmark = pytest.mark.integration

_rng = random.Random(23)


def new_uid() -> str:
    return f"trail-{uuid.uuid4().hex[:16]}"


def value(uid: str, name: str) -> bytes:
    order = make_order(_rng)
    order["order_uid"] = order["payment"]["transaction"] = uid
    order["delivery"]["name"] = name
    return json.dumps(order).encode()


def message(uid: str, offset: int, body: bytes | None, **extra: Any) -> ConsumedMessage:
    return ConsumedMessage("orders", 0, offset, uid.encode(), body, **extra)


def write(stack: Stack, messages: list[ConsumedMessage]) -> None:
    """The messages written as one batch, with their trail, as the ingest writes them."""
    batch = prepare_batch(messages, delete_on_tombstone=True)
    writer = PostgresOrderWriter(stack.database_url, "tests")
    try:
        writer.write(
            [prepared for prepared, _ in batch.orders.values()],
            [deletion for deletion, _ in batch.deletions.values()],
            batch.handled(),
        )
    finally:
        writer.close()


def read_trail(stack: Stack, uid: str, limit: int = 1000, after: int = 0) -> OrderTrail | None:
    async def read() -> OrderTrail | None:
        reader = PostgresOrderReader(stack.database_url, 1)
        await reader.open()
        try:
            return await reader.trail(uid, limit, after)
        finally:
            await reader.close()

    return asyncio.run(read())


def outcomes(trail: OrderTrail | None) -> list[tuple[int, str]]:
    assert trail is not None
    return [(entry.offset, entry.outcome) for entry in trail.entries]


def test_each_outcome_of_a_write_is_recorded_with_its_version(stack: Stack) -> None:
    uid = new_uid()
    first, second, third, fourth = (value(uid, name) for name in ("A", "B", "C", "D"))
    write(stack, [message(uid, 10, first, timestamp_ms=1_700_000_000_123)])
    write(stack, [message(uid, 10, first)])  # the same message again: a redelivery
    write(stack, [message(uid, 12, second)])
    write(stack, [message(uid, 11, third)])  # delivered after a later version
    # In one batch the later message is written; the earlier one is an older version too.
    write(stack, [message(uid, 14, third), message(uid, 15, fourth)])
    trail = read_trail(stack, uid)
    assert outcomes(trail) == [
        (10, "stored"), (10, "unchanged"), (12, "stored"), (11, "older"), (14, "older"),
        (15, "stored"),
    ]  # fmt: skip
    assert trail is not None
    assert trail.entries[0].message_timestamp is not None
    assert trail.entries[0].message_timestamp.timestamp() == 1_700_000_000.123
    assert trail.entries[1].message_timestamp is None
    assert trail.entries[0].sha256 == trail.entries[1].sha256 != trail.entries[2].sha256
    assert trail.entries[4].sha256 == trail.entries[3].sha256
    assert trail.stored is not None
    assert (trail.stored.offset, trail.stored.sha256) == (15, trail.entries[5].sha256)
    assert trail.counts == {
        "stored": 3, "unchanged": 1, "older": 2, "dead_lettered": 0, "deleted": 0,
    }  # fmt: skip
    assert trail.latest == trail.entries[-1]
    assert not trail.more


def test_copies_of_a_version_in_one_batch_are_redeliveries_of_it(stack: Stack) -> None:
    """A producer's retries land in one batch: the copies before the one written changed
    nothing, like any redelivery; an earlier other version in that batch lost to it."""
    uid = new_uid()
    first, second = value(uid, "A"), value(uid, "B")
    write(stack, [message(uid, 20, first), message(uid, 21, second), message(uid, 22, second)])
    write(stack, [message(uid, 23, second), message(uid, 24, second)])
    assert outcomes(read_trail(stack, uid)) == [
        (20, "older"), (21, "unchanged"), (22, "stored"), (23, "unchanged"), (24, "unchanged"),
    ]  # fmt: skip
    older = new_uid()
    write(stack, [message(older, 31, value(older, "C"))])
    write(stack, [message(older, 29, value(older, "D")), message(older, 30, value(older, "D"))])
    assert outcomes(read_trail(stack, older)) == [(31, "stored"), (29, "older"), (30, "older")]


def test_a_deletion_leaves_only_its_own_entry_and_older_messages_stay_older(stack: Stack) -> None:
    uid = new_uid()
    write(stack, [message(uid, 1, value(uid, "A"))])
    write(stack, [message(uid, 2, value(uid, "B")), message(uid, 3, None)])
    deleted = read_trail(stack, uid)
    assert outcomes(deleted) == [(3, "deleted")]
    assert deleted is not None
    assert (deleted.stored, deleted.entries[0].sha256) == (None, None)
    assert deleted.deleted_at is not None
    write(stack, [message(uid, 2, value(uid, "B"))])  # older than the tombstone
    write(stack, [message(uid, 3, None)])  # the tombstone again
    write(stack, [message(uid, 1, None)])  # an older tombstone
    assert outcomes(read_trail(stack, uid)) == [
        (3, "deleted"), (2, "older"), (3, "unchanged"), (1, "older"),
    ]  # fmt: skip


def test_a_tombstone_older_than_the_stored_version_deletes_nothing(stack: Stack) -> None:
    uid = new_uid()
    write(stack, [message(uid, 5, value(uid, "A"))])
    write(stack, [message(uid, 4, None)])
    trail = read_trail(stack, uid)
    assert outcomes(trail) == [(5, "stored"), (4, "older")]
    assert trail is not None
    assert trail.stored is not None


def dead_letter(uid: str, offset: int, **extra: Any) -> tuple[str, RejectedMessage]:
    rejection = Rejection("out_of_range", "Field payment.amount must be at least 0.", "amount")
    return uid, RejectedMessage(message(uid, offset, b"{}", **extra), rejection)


def test_a_dead_letter_is_recorded_with_its_reason_and_where_it_was_replayed_from(
    stack: Stack,
) -> None:
    uid = new_uid()
    trail = PostgresDeadLetterTrail(stack.database_url)
    try:
        trail.dead_lettered([dead_letter(uid, 7), dead_letter(uid, 9, replayed_from="dlq/0/3")])
    finally:
        trail.close()
    read = read_trail(stack, uid)
    assert read is not None
    assert [(e.offset, e.outcome, e.reason_code, e.replayed_from) for e in read.entries] == [
        (7, "dead_lettered", "out_of_range", None),
        (9, "dead_lettered", "out_of_range", "dlq/0/3"),
    ]
    assert read.entries[0].reason_detail == "Field payment.amount must be at least 0."
    assert (read.stored, read.deleted_at) == (None, None)


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01".encode()


def test_an_entry_keeps_the_trace_its_message_named(stack: Stack) -> None:
    """Whether the message was stored or dead-lettered, its entry keeps the trace id of its
    traceparent, so that the producer's trace is found from the trail; none without one."""
    uid = new_uid()
    traced = (("traceparent", TRACEPARENT),)
    write(stack, [message(uid, 1, value(uid, "A"), trace=traced)])
    write(stack, [message(uid, 2, value(uid, "B"))])
    trail = PostgresDeadLetterTrail(stack.database_url)
    try:
        trail.dead_lettered([dead_letter(uid, 3, trace=traced)])
    finally:
        trail.close()
    read = read_trail(stack, uid)
    assert read is not None
    assert [(e.offset, e.trace_id) for e in read.entries] == [
        (1, TRACE_ID),
        (2, None),
        (3, TRACE_ID),
    ]


def test_nothing_known_is_none(stack: Stack) -> None:
    assert read_trail(stack, new_uid()) is None


def many_dead_letters(stack: Stack, uid: str, count: int) -> None:
    trail = PostgresDeadLetterTrail(stack.database_url)
    try:
        trail.dead_lettered([dead_letter(uid, offset) for offset in range(count)])
    finally:
        trail.close()


def test_the_api_pages_a_long_trail_oldest_first_and_refuses_hostile_requests(
    stack: Stack,
) -> None:
    uid, other = new_uid(), new_uid()
    many_dead_letters(stack, uid, 250)
    many_dead_letters(stack, other, 3)
    other_key = read_trail(stack, other)
    assert other_key is not None

    async def scenario(app: App) -> None:
        offsets: list[int] = []
        after: str | None = None
        pages = 0
        while True:
            params = {"limit": "100"} | ({} if after is None else {"after": after})
            response = await app.client.get(f"/order/{uid}/trail", params=params)
            assert response.status_code == 200
            body = response.json()
            assert body["counts"]["dead_lettered"] == 250
            assert body["latest"]["offset"] == 249
            assert body["state"] == {"status": "never_stored", "version": None, "deleted_at": None}
            offsets += [entry["offset"] for entry in body["entries"]]
            pages += 1
            after = body["next"]
            if after is None:
                break
        assert (pages, offsets) == (3, list(range(250)))
        first = (await app.client.get(f"/order/{uid}/trail")).json()
        assert len(first["entries"]) == 100
        assert first["entries"][0]["reason"] == {
            "code": "out_of_range",
            "detail": "Field payment.amount must be at least 0.",
        }
        # Another order's cursor only moves within this order's trail.
        forged = cursor_of(other_key.entries[0].key)
        response = await app.client.get(f"/order/{other}/trail", params={"after": forged})
        assert [entry["offset"] for entry in response.json()["entries"]] == [1, 2]

        unknown = await app.client.get(f"/order/{new_uid()}/trail")
        assert unknown.status_code == 404
        assert "error" in unknown.json()
        for hostile in HOSTILE_IDS:
            response = await app.client.get(f"/order/{hostile}/trail")
            assert response.status_code == 400, hostile
            assert "error" in response.json()
        for limit in ("0", "-1", "1001", "1" + "0" * 30, "abc", "", "1.5"):
            response = await app.client.get(f"/order/{uid}/trail", params={"limit": limit})
            assert response.status_code == 400, limit
            assert "error" in response.json()
        near = cursor_of(1)
        for cursor in (
            "", "x", near[:-1] + "F", "_" * 11, near + "A", "AAAAAAAAAA=",
            "é" * 11, "A" * 65, "%00" * 11,
        ):  # fmt: skip
            response = await app.client.get(f"/order/{uid}/trail", params={"after": cursor})
            assert response.status_code == 400, cursor
            assert "error" in response.json()

    run(stack.database_url, scenario)


def test_trails_off_answer_404_saying_so(stack: Stack) -> None:
    uid = new_uid()
    many_dead_letters(stack, uid, 1)

    async def scenario(app: App) -> None:
        off = httpx.AsyncClient(
            transport=httpx.ASGITransport(
                create_app(app.lookup, app.readiness, app.metrics, trails=False)
            ),
            base_url="http://order-viewer",
        )
        async with off:
            response = await off.get(f"/order/{uid}/trail")
        assert response.status_code == 404
        assert "ORDER_TRAIL_ENABLED=false" in response.json()["error"]

    run(stack.database_url, scenario)


# Through the service: a token that reads orders, and one that reads trails.
TOKEN_SCOPES = {"support": "orders:read", "helpdesk": "orders:trail"}


@pytest.fixture(scope="module")
def guarded(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    directory = tmp_path_factory.mktemp("trail")
    tokens = {name: new_token() for name in TOKEN_SCOPES}
    (directory / "tokens.txt").write_text(
        "".join(f"{name}:{token_digest(tokens[name])}:{TOKEN_SCOPES[name]}\n" for name in tokens)
    )
    (directory / "tokens.json").write_text(json.dumps(tokens))
    service = ServiceProcess(
        stack,
        new_topics("trail"),
        directory,
        LOG_FORMAT="json",
        HTTP_AUTH="token",
        HTTP_TOKENS_FILE=str(directory / "tokens.txt"),
        KAFKA_TOMBSTONES="delete",
    ).start()
    try:
        yield service
    finally:
        service.kill()


def tokens_of(service: ServiceProcess) -> dict[str, str]:
    tokens: dict[str, str] = json.loads((service.log_path.parent / "tokens.json").read_text())
    return tokens


def trail_of(service: ServiceProcess, uid: str, token: str) -> httpx.Response:
    return service.get(f"/order/{uid}/trail", headers={"Authorization": f"Bearer {token}"})


def test_every_message_of_an_order_is_in_its_trail_through_the_service(
    stack: Stack, guarded: ServiceProcess
) -> None:
    tokens = tokens_of(guarded)
    topic = guarded.env["KAFKA_TOPIC"]
    uid, gone, replayed = new_uid(), new_uid(), new_uid()

    def entries(order_uid: str, count: int) -> list[dict[str, Any]] | None:
        response = trail_of(guarded, order_uid, tokens["helpdesk"])
        if response.status_code != 200 or len(response.json()["entries"]) < count:
            return None
        found: list[dict[str, Any]] = response.json()["entries"]
        return found

    first = value(uid, "A")
    produce(stack, topic, [(uid.encode(), first)])
    origin = "orders.dlq/2/41"
    hostile_headers: list[bytes] = [b"x" * 300, b"\xff\xfe/0/1", b"orders.dlq/-1/5", b"a/b"]
    produce(
        stack,
        topic,
        [
            Record(replayed.encode(), value(replayed, "R"), [("replayed.from", origin.encode())]),
            *(
                Record(replayed.encode(), value(replayed, f"H{n}"), [("replayed.from", header)])
                for n, header in enumerate(hostile_headers)
            ),
        ],
    )
    produce(stack, topic, [(gone.encode(), value(gone, "G"))])
    produce(stack, topic, [(gone.encode(), None)])

    wait_until(lambda: entries(uid, 1), 60, "the order's first message")
    # Apart, so that the duplicate is not a batch's earlier message of the order (then older).
    produce(stack, topic, [(uid.encode(), first)])
    wait_until(lambda: entries(uid, 2), 60, "the duplicate")
    produce(stack, topic, [(uid.encode(), b'{"order_uid": 1}'), (b"not an id!", b"{")])
    trail = wait_until(lambda: entries(uid, 3), 60, "the order's three messages")
    assert [entry["outcome"] for entry in trail] == ["stored", "unchanged", "dead_lettered"]
    assert trail[2]["reason"]["code"] == "wrong_type"
    assert trail[0]["sha256"] == trail[1]["sha256"]
    assert trail[0]["message_timestamp"] is not None
    assert [entry["offset"] for entry in trail] == sorted(entry["offset"] for entry in trail)

    replays = wait_until(lambda: entries(replayed, 5), 60, "the replayed messages")
    assert [entry["replayed_from"] for entry in replays] == [origin, None, None, None, None]

    deleted = wait_until(
        lambda: (found := entries(gone, 1)) and found[0]["outcome"] == "deleted" and found,
        60,
        "the deletion",
    )
    assert len(deleted) == 1
    body = trail_of(guarded, gone, tokens["helpdesk"]).json()
    assert body["state"]["status"] == "deleted"
    assert body["counts"]["deleted"] == 1

    # The scope: reading orders is not reading trails, and reading trails not reading orders.
    forbidden = trail_of(guarded, uid, tokens["support"])
    assert forbidden.status_code == 403
    assert 'scope="orders:trail"' in forbidden.headers["www-authenticate"]
    assert trail_of(guarded, uid, "made-up").status_code == 401
    order = guarded.get(f"/order/{uid}", headers={"Authorization": f"Bearer {tokens['helpdesk']}"})
    assert order.status_code == 403

    def audited() -> list[str] | None:
        lines = [json.loads(line) for line in guarded.log().splitlines() if line.startswith("{")]
        trail_lines = [
            line["event"]
            for line in lines
            if line["logger"] == "order_viewer.audit"
            and line["event"].startswith("order trail read")
            and line.get("order_uid") == uid
        ]
        return trail_lines if len(trail_lines) >= 3 else None

    lines = wait_until(audited, 10, "the trail reads' audit lines")
    assert any("principal=helpdesk" in line and "status=200" in line for line in lines)
    assert any("principal=support" in line and "status=403" in line for line in lines)
    # Coordinates, digests and codes: nothing else, so no personal data.
    assert {key for entry in trail for key in entry} == {
        "topic", "partition", "offset", "message_timestamp", "handled_at", "outcome", "sha256",
        "reason", "replayed_from", "trace_id",
    }  # fmt: skip


def trail_command(stack: Stack, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ORDER_VIEWER), *arguments],
        env={**os.environ, "DATABASE_URL": stack.database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_trail_command_prints_the_state_then_every_entry(stack: Stack) -> None:
    uid = new_uid()
    write(stack, [message(uid, 3, value(uid, "A"))])
    many_dead_letters(stack, uid, 1200)
    shown = trail_command(stack, "trail", uid)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"order {uid}: stored, version ")
    assert "1 stored" in lines[1]
    assert "1200 dead_lettered" in lines[1]
    assert shown.stdout.count("dead_lettered") == 1201  # every page, and the counts line
    assert "out_of_range: Field payment.amount must be at least 0." in shown.stdout

    never = trail_command(stack, "trail", new_uid())
    assert never.returncode == 1
    assert "nothing is known of order" in never.stderr
    for bad in ("a/b", "x" * 65, "é", ""):
        refused = trail_command(stack, "trail", bad)
        assert refused.returncode == 2, bad
        assert "order id" in refused.stderr


def test_retention_expires_trail_entries_recorded_before_it(stack: Stack) -> None:
    old, recent = new_uid(), new_uid()
    many_dead_letters(stack, old, 3)
    many_dead_letters(stack, recent, 2)
    with stack.connect() as connection:
        connection.execute(
            "UPDATE order_trail SET handled_at = now() - interval '40 days' WHERE order_uid = %s",
            (old,),
        )
    expirer = PostgresOrderExpirer(stack.database_url, "tests")
    try:
        before = datetime.now(UTC) - timedelta(days=30)
        expired = expirer.expire(before, 2)
        assert expired.trail_entries == 2
        expired = expirer.expire(before, 2)
        assert expired.trail_entries == 1
    finally:
        expirer.close()
    assert read_trail(stack, old) is None
    assert outcomes(read_trail(stack, recent)) == [(0, "dead_lettered"), (1, "dead_lettered")]
