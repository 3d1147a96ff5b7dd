"""The log lines: their formats, and the writer thread that formats and writes them."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from order_viewer.adapters import logs
from order_viewer.adapters.logs import (
    BackgroundHandler,
    ConsoleFormatter,
    JsonFormatter,
    sole_writer,
)

audit = logging.getLogger("order_viewer.audit")

CONSOLE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

HOSTILE = [
    "plain",
    "",
    'quote " and backslash \\',
    "line\nbreak\r\ttab",
    "\x00\x1f\x7f control",
    "naïve café ü ☃ 𝄞",
    "\ud800 lone surrogate",
    "%s %d %(name)s",
    "</script><script>alert(1)</script>",
    "x" * 5000,
]

# Timestamps at the edges of a second and of a millisecond, where rounding decides the text.
TIMESTAMPS = [
    0.0,
    1_764_498_000.0,
    1_764_498_000.9999996,
    1_764_498_000.9999994,
    1_764_498_000.9995,
    1_764_498_000.0004999,
    1_764_498_000.0005,
    1_764_498_000.123456,
    2_147_483_647.5,
]


def record(
    message: str = "event %s",
    args: tuple[object, ...] = ("one",),
    created: float | None = None,
    level: int = logging.INFO,
    **context: object,
) -> logging.LogRecord:
    made = logging.LogRecord("order_viewer.test", level, __file__, 1, message, args, None)
    if created is not None:
        made.created = created
        made.msecs = int((created - int(created)) * 1000) + 0.0
    made.__dict__.update(context)
    return made


def json_reference(made: logging.LogRecord) -> str:
    """The line as a dict through json.dumps: the format the collectors were given."""
    line: dict[str, Any] = {
        "time": datetime.fromtimestamp(made.created, UTC).isoformat(timespec="milliseconds"),
        "level": made.levelname.lower(),
        "logger": made.name,
        "event": made.getMessage(),
    }
    line.update({name: getattr(made, name) for name in logs.CONTEXT_FIELDS if hasattr(made, name)})
    if made.exc_info:
        line["exception"] = logging.Formatter().formatException(made.exc_info)
    return json.dumps(line, ensure_ascii=False, default=str)


@pytest.mark.parametrize("text", HOSTILE)
def test_json_lines_are_what_json_dumps_writes(text: str) -> None:
    formatter = JsonFormatter()
    for made in (
        record(args=(text,)),
        record(args=(text,), order_uid=text, reason=text, level=logging.WARNING),
        record(args=(text,), topic="orders", partition=2, offset=10**12, field=None),
        record(args=(text,), reason={"nested": [text, 1.5]}, order_uid=object()),
    ):
        line = formatter.format(made)
        assert line == json_reference(made)
        assert "\n" not in line  # one record, one line, whatever it carries


@pytest.mark.parametrize("created", TIMESTAMPS)
def test_timestamps_are_written_as_before(created: float) -> None:
    made = record(created=created)
    assert JsonFormatter().format(made) == json_reference(made)
    assert ConsoleFormatter().format(made) == logging.Formatter(CONSOLE_FORMAT).format(made)


def test_times_of_one_second_differ_in_their_milliseconds_only() -> None:
    """The part kept for a second must not be served for the next one."""
    json_formatter, console = JsonFormatter(), ConsoleFormatter()
    reference = logging.Formatter(CONSOLE_FORMAT)
    for created in (1_764_498_000.001, 1_764_498_000.999, 1_764_498_001.0, 1_764_497_999.5):
        made = record(created=created)
        assert json_formatter.format(made) == json_reference(made)
        assert console.format(made) == reference.format(made)


def test_times_of_one_millisecond_share_its_text_and_its_edges_do_not() -> None:
    """The text kept for a millisecond is never served for a time that rounds into the next
    one, whatever came before it."""
    formatter = JsonFormatter()
    edges = [0.0, 0.0000004, 0.0000005, 0.0000006, 0.0005, 0.0009994, 0.0009995, 0.0009996]
    for second in (1_764_498_000, 1_764_498_001, 2_147_483_646):
        for millisecond in (0, 1, 998, 999):
            for order in (edges, edges[::-1]):
                for offset in order:
                    made = record(created=second + millisecond / 1000 + offset)
                    assert formatter.format(made) == json_reference(made)


@pytest.mark.parametrize("text", HOSTILE)
def test_console_lines_are_what_the_standard_formatter_writes(text: str) -> None:
    made = record(args=(text,), level=logging.WARNING)
    assert ConsoleFormatter().format(made) == logging.Formatter(CONSOLE_FORMAT).format(made)


def test_exceptions_are_written_in_both_formats() -> None:
    try:
        raise ValueError('broken "value"\nsecond line')
    except ValueError:
        made = logging.LogRecord(
            "order_viewer.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    line = JsonFormatter().format(made)
    assert line == json_reference(made)
    assert 'ValueError: broken \\"value\\"\\nsecond line' in line
    assert ConsoleFormatter().format(made) == logging.Formatter(CONSOLE_FORMAT).format(made)


@pytest.mark.parametrize("created", TIMESTAMPS)
@pytest.mark.parametrize("text", HOSTILE)
def test_a_deferred_line_is_the_line_of_its_record(text: str, created: float) -> None:
    """The line written without a record is, byte for byte, the one its record would give."""
    fields = (created, logging.WARNING, "order_viewer.audit", text, (("order_uid", text),))
    made = logging.LogRecord("order_viewer.audit", logging.WARNING, __file__, 1, text, (), None)
    made.created = created
    made.msecs = int((created - int(created)) * 1000) + 0.0
    made.order_uid = text
    assert JsonFormatter().line(*fields) == JsonFormatter().format(made) == json_reference(made)
    assert ConsoleFormatter().line(*fields) == logging.Formatter(CONSOLE_FORMAT).format(made)


class SlowStream(io.StringIO):
    """A stream whose writes wait until `release` is set, as a pipe nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.writing = threading.Event()

    def write(self, text: str) -> int:
        self.writing.set()
        self.release.wait()
        return super().write(text)


class BrokenStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.broken = True

    def write(self, text: str) -> int:
        if self.broken:
            raise OSError("no space left on device")
        return super().write(text)


def logger_to(handler: logging.Handler, name: str) -> logging.Logger:
    logger = logging.getLogger(f"order_viewer.test.{name}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.handlers = [handler]
    return logger


@pytest.fixture
def stream() -> Iterator[SlowStream]:
    made = SlowStream()
    yield made
    made.release.set()  # no writer thread is left waiting


def handler_on(stream: io.StringIO, capacity: int = logs.MAX_WAITING_LINES) -> BackgroundHandler:
    handler = BackgroundHandler(stream, capacity)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def test_lines_are_written_in_order_and_flush_waits_for_them(stream: SlowStream) -> None:
    handler = handler_on(stream)
    logger = logger_to(handler, "order")
    for number in range(1000):
        logger.info("line %d", number)
    assert stream.getvalue() == ""
    threading.Timer(0.2, stream.release.set).start()
    handler.flush()
    assert stream.getvalue() == "".join(f"line {number}\n" for number in range(1000))
    handler.stop()


def test_the_message_is_the_one_of_the_moment_of_the_call(stream: SlowStream) -> None:
    handler = handler_on(stream)
    logger = logger_to(handler, "moment")
    state = ["before"]
    logger.info("state %s", state)
    state[0] = "after"
    stream.release.set()
    handler.flush()
    assert stream.getvalue() == "state ['before']\n"
    handler.stop()


def test_a_full_queue_makes_the_logging_thread_wait_and_loses_nothing(
    stream: SlowStream,
) -> None:
    handler = handler_on(stream, capacity=3)
    logger = logger_to(handler, "bounded")
    logger.info("line 0")
    assert stream.writing.wait(5)  # the writer holds line 0, blocked in its write
    logged = []

    def log_nine() -> None:
        for number in range(1, 10):
            logger.info("line %d", number)
            logged.append(number)

    producer = threading.Thread(target=log_nine)
    producer.start()
    deadline = time.monotonic() + 5
    while len(logged) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # time enough for an unbounded queue to take all nine
    assert logged == [1, 2, 3]
    assert producer.is_alive()
    stream.release.set()
    producer.join(5)
    assert not producer.is_alive()
    handler.flush()
    assert stream.getvalue() == "".join(f"line {number}\n" for number in range(10))
    handler.stop()


def test_a_failing_output_is_reported_and_the_writer_goes_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stream = BrokenStream()
    handler = handler_on(stream)
    logger = logger_to(handler, "broken")
    logger.info("lost")
    handler.flush()  # returns although the write failed
    assert "no space left on device" in capsys.readouterr().err
    stream.broken = False
    logger.info("written")
    handler.flush()
    assert stream.getvalue() == "written\n"
    handler.stop()


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("unprintable context")


def test_a_record_that_cannot_be_formatted_spares_the_others(
    capsys: pytest.CaptureFixture[str],
) -> None:
    stream = io.StringIO()
    handler = BackgroundHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logger_to(handler, "unformattable")
    logger.info("before")
    logger.info("%d", "not a number")  # fails at the call
    logger.info("context", extra={"reason": Unprintable()})  # fails in the formatter
    logger.info("after")
    handler.flush()
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == [
        "before",
        "after",
    ]
    reported = capsys.readouterr().err
    assert "not a number" in reported
    assert "unprintable context" in reported
    handler.stop()


def test_closing_writes_what_is_pending_and_the_handler_goes_on(stream: SlowStream) -> None:
    """dictConfig closes the handlers it finds while they stay attached, so a closed
    handler must still write."""
    handler = handler_on(stream)
    logger = logger_to(handler, "closed")
    logger.info("pending")
    threading.Timer(0.2, stream.release.set).start()
    handler.close()
    assert stream.getvalue() == "pending\n"
    logger.info("after close")
    handler.flush()
    assert stream.getvalue() == "pending\nafter close\n"
    handler.stop()


def test_stop_writes_what_is_pending_and_ends_the_thread(stream: SlowStream) -> None:
    handler = handler_on(stream)
    logger = logger_to(handler, "stopped")
    before = threading.active_count()
    logger.info("pending")
    threading.Timer(0.2, stream.release.set).start()
    handler.stop()
    assert stream.getvalue() == "pending\n"
    assert threading.active_count() == before - 1
    logger.info("after the stop")  # another exit hook's line: written at once
    assert stream.getvalue() == "pending\nafter the stop\n"
    handler.flush()  # nothing to wait for once stopped
    handler.stop()


def test_configure_again_replaces_the_writer() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("INFO", "json")
        first = root.handlers[0]
        threads = threading.active_count()
        logs.configure("WARNING", "console")
        assert len(root.handlers) == 1
        assert isinstance(root.handlers[0], BackgroundHandler)
        assert root.handlers[0] is not first
        assert isinstance(root.handlers[0].formatter, ConsoleFormatter)
        assert threading.active_count() == threads  # the first writer ended
    finally:
        for handler in root.handlers:
            if isinstance(handler, BackgroundHandler):
                handler.stop()
        root.handlers, _ = saved
        root.setLevel(saved[1])


EXIT_ON_SIGTERM = """
import logging, logging.config, os, signal, sys
from order_viewer.adapters import logs

logs.configure("INFO", "json")
# As granian does when its server is made: every handler known to logging is closed and
# forgotten, so logging.shutdown at exit no longer flushes ours.
logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
audit = logging.getLogger("order_viewer.audit")
for number in range(20_000):
    audit.info("order read %d", number, extra={"order_uid": str(number)})
os.kill(os.getpid(), signal.SIGTERM)
"""


def test_lines_queued_when_the_process_is_stopped_are_written() -> None:
    """A stop that ends the process the way `serve` does on SIGTERM (the interpreter exits)
    writes every line logged before it, after a dictConfig too."""
    finished = subprocess.run(
        [sys.executable, "-c", EXIT_ON_SIGTERM],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    lines = [json.loads(line) for line in finished.stderr.splitlines()]
    assert [line["order_uid"] for line in lines] == [str(number) for number in range(20_000)]


@dataclass
class ServiceLogging:
    """A logger tree as `configure` leaves the root's (one writer of JSON lines), on a logger
    that does not propagate, made inside the test: pytest adds handlers of its own to the root
    and to the loggers that do not propagate when the test starts."""

    handler: BackgroundHandler
    output: io.StringIO
    top: logging.Logger
    audit: logging.Logger


@contextmanager
def service_logging() -> Iterator[ServiceLogging]:
    top = logging.getLogger("order_viewer.test.service")
    output = io.StringIO()
    handler = BackgroundHandler(output)
    handler.setFormatter(JsonFormatter())
    top.handlers = [handler]
    top.propagate = False
    top.setLevel(logging.INFO)
    try:
        yield ServiceLogging(handler, output, top, logging.getLogger(f"{top.name}.audit"))
    finally:
        handler.stop()
        top.handlers = []
        top.propagate = True


def test_the_service_set_up_has_a_sole_writer() -> None:
    with service_logging() as made:
        assert sole_writer(made.audit, logging.INFO) is made.handler
        assert sole_writer(made.top, logging.WARNING) is made.handler


def test_anything_else_that_would_see_the_record_means_no_sole_writer() -> None:
    other = logging.NullHandler()
    quiet = logging.Filter("nothing")
    with service_logging() as made:
        handler, audit, top = made.handler, made.audit, made.top
        changes: list[tuple[Any, Any]] = [
            (lambda: audit.addHandler(other), lambda: audit.removeHandler(other)),
            (lambda: top.addHandler(other), lambda: top.removeHandler(other)),
            (lambda: audit.addFilter(quiet), lambda: audit.removeFilter(quiet)),
            (lambda: handler.addFilter(quiet), lambda: handler.removeFilter(quiet)),
            (
                lambda: handler.setFormatter(logging.Formatter()),
                lambda: handler.setFormatter(JsonFormatter()),
            ),
            (lambda: handler.setLevel(logging.ERROR), lambda: handler.setLevel(logging.NOTSET)),
            (lambda: setattr(audit, "propagate", False), lambda: setattr(audit, "propagate", True)),
            (lambda: setattr(audit, "disabled", True), lambda: setattr(audit, "disabled", False)),
            # Past a logger that propagates, the root's handlers see the record too.
            (lambda: setattr(top, "propagate", True), lambda: setattr(top, "propagate", False)),
        ]
        for change, undo in changes:
            change()
            try:
                assert sole_writer(audit, logging.INFO) is None
            finally:
                undo()
            assert sole_writer(audit, logging.INFO) is handler


def test_deferred_lines_keep_their_order_among_records() -> None:
    with service_logging() as made:
        for number in range(500):
            made.audit.info("record %d", number)
            made.handler.defer(
                logging.WARNING, made.audit.name, f"deferred {number}", (("order_uid", number),)
            )
        made.handler.flush()
        lines = [json.loads(line) for line in made.output.getvalue().splitlines()]
    assert [(line["level"], line["event"]) for line in lines[:2]] == [
        ("info", "record 0"),
        ("warning", "deferred 0"),
    ]
    assert [line["event"] for line in lines[1::2]] == [f"deferred {n}" for n in range(500)]
    assert [line["order_uid"] for line in lines[1::2]] == list(range(500))
    assert [line["logger"] for line in lines] == [made.audit.name] * 1000


def test_a_deferred_line_after_the_stop_is_written_at_once() -> None:
    output = io.StringIO()
    handler = BackgroundHandler(output)
    handler.setFormatter(ConsoleFormatter())
    handler.stop()
    handler.defer(logging.INFO, audit.name, "late", ())
    assert output.getvalue().endswith(" INFO    order_viewer.audit: late\n")


def test_a_formatter_changed_after_the_check_still_writes_the_deferred_line() -> None:
    output = io.StringIO()
    handler = BackgroundHandler(output)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(order_uid)s %(message)s"))
    handler.defer(logging.INFO, audit.name, "read", (("order_uid", "b563"),))
    handler.stop()
    assert output.getvalue() == "INFO order_viewer.audit b563 read\n"
