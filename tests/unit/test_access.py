"""The audit line of an order read: its logger, level and fields, whatever id a client sent."""

from __future__ import annotations

import json
import logging

import pytest

from order_viewer.access import _audit
from order_viewer.auth import ORDERS_READ, Principal

SUPPORT = Principal("support", frozenset({ORDERS_READ}))


def audit_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "order_viewer.audit"]


def test_the_line_names_who_read_which_order_with_what_answer_from_where(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="order_viewer.audit")
    _audit(SUPPORT, "/order/b563feb7b2b84b6test", 200, "masked", "10.0.0.7")
    _audit(None, "/order/b563feb7b2b84b6test", 401, "-", "10.0.0.8")
    read, refused = audit_records(caplog)
    assert read.getMessage() == (
        "order read principal=support order_uid=b563feb7b2b84b6test status=200 view=masked "
        "client=10.0.0.7"
    )
    assert read.levelno == logging.INFO
    assert read.order_uid == "b563feb7b2b84b6test"  # type: ignore[attr-defined]
    assert (read.funcName, read.module) == ("_audit", "access")
    assert refused.getMessage() == (
        "order read principal=- order_uid=b563feb7b2b84b6test status=401 view=- client=10.0.0.8"
    )


@pytest.mark.parametrize(
    ("status", "level"),
    [
        (200, logging.INFO),
        (304, logging.INFO),
        (404, logging.INFO),
        (401, logging.WARNING),
        (403, logging.WARNING),
        (429, logging.WARNING),
        (500, logging.WARNING),
    ],
)
def test_refusals_are_warnings_and_reads_are_info(
    caplog: pytest.LogCaptureFixture, status: int, level: int
) -> None:
    caplog.set_level(logging.INFO, logger="order_viewer.audit")
    _audit(SUPPORT, "/order/x", status, "masked", "10.0.0.7")
    assert [record.levelno for record in audit_records(caplog)] == [level]


def test_a_level_above_info_keeps_only_the_refusals(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="order_viewer.audit")
    for status in (200, 304, 404, 403):
        _audit(SUPPORT, "/order/x", status, "masked", "10.0.0.7")
    assert [record.getMessage().split()[4] for record in audit_records(caplog)] == ["status=403"]


@pytest.mark.parametrize(
    "uid",
    [
        'quote"and\\backslash',
        "line\nbreak\r\nforged status=200 view=whole",
        "\x00\x1b[31mred\x7f",
        "naïve-☃-𝄞",
        "\ud800",
        "x" * 5000,
        "",
    ],
)
def test_an_id_of_any_kind_is_escaped_and_cut_on_one_line(
    caplog: pytest.LogCaptureFixture, uid: str
) -> None:
    caplog.set_level(logging.INFO, logger="order_viewer.audit")
    _audit(SUPPORT, f"/order/{uid}", 404, "masked", "10.0.0.7")
    (record,) = audit_records(caplog)
    message = record.getMessage()
    assert message.isascii()
    assert message.isprintable()
    written = message.split(" order_uid=")[1].rsplit(" status=404 ", 1)[0]
    assert json.loads(f'"{written}"') == uid[:80]
    assert record.order_uid == uid[:80]  # type: ignore[attr-defined]
