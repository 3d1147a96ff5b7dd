"""Log set-up: readable lines for a terminal, or one JSON object per line for a collector,
formatted by the thread that logs and written by a thread of their own."""

from __future__ import annotations

import atexit
import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Literal, TextIO

# Context a log call may attach with `extra=`; the JSON lines carry them as fields of their own.
CONTEXT_FIELDS = ("topic", "partition", "offset", "order_uid", "reason", "field")

# The current span's trace and span ids for the JSON lines, set when tracing is on
# (`tracing.start_tracing`): one check of None per line otherwise.
trace_ids: Callable[[], tuple[str, str] | None] | None = None

# Lines waiting for the writer at most: enough for the audit lines of a busy moment while the
# output is slow, so that it does not reach the request path, and few enough that a stuck output
# holds little memory (the sizing is in docs/PERFORMANCE.md).
MAX_WAITING_LINES = 10_000
# How long the writer lets lines gather before it writes them: the most a line waits.
GATHER_SECONDS = 0.01


# A JSON string literal, non-ASCII kept: what json.dumps(..., ensure_ascii=False) writes for one.
_json_string = json.encoder.encode_basestring
_json_ascii = json.encoder.encode_basestring_ascii
_json_value = json.JSONEncoder(ensure_ascii=False, default=str).encode


class LineFormatter(logging.Formatter):
    """A formatter that can also write the line of a record never made (see `sole_writer`).

    Lines are formatted by the threads that log, so its caches are replaced whole, never
    changed in place, and read once per line."""

    def line(
        self, created: float, levelno: int, logger: str, message: str, context: Context
    ) -> str:
        raise NotImplementedError


class JsonFormatter(LineFormatter):
    """The fields in a fixed order, as `json.dumps` of a dict would write them, built from
    string literals: every order read has an audit line, and a generic encoder per line cost
    several times the rest of the line."""

    def __init__(self) -> None:
        super().__init__()
        self._second: tuple[int, str] = (-1, "")
        self._millisecond: tuple[int, str] = (-1, "")
        # The level and logger fields, written once per pair (loggers are named in the code).
        self._heads: dict[tuple[int | str, str], str] = {}

    def format(self, record: logging.LogRecord) -> str:
        context = [
            (name, getattr(record, name)) for name in CONTEXT_FIELDS if hasattr(record, name)
        ]
        if record.exc_info:
            context.append(("exception", self.formatException(record.exc_info)))
        return self._line(
            record.created, record.levelname, record.name, record.getMessage(), context
        )

    def line(
        self, created: float, levelno: int, logger: str, message: str, context: Context
    ) -> str:
        return self._line(created, levelno, logger, message, context)

    def _line(
        self,
        created: float,
        level: int | str,
        logger: str,
        message: str,
        context: Iterable[tuple[str, object]],
    ) -> str:
        head = self._heads.get((level, logger)) or self._head(level, logger)
        line = f'{{"time": "{self._time(created)}", {head}, "event": {_json_string(message)}'
        for name, value in context:
            encoded = _json_string(value) if type(value) is str else _json_value(value)
            line += f', "{name}": {encoded}'
        if trace_ids is not None and (ids := trace_ids()) is not None:
            line += f', "trace_id": "{ids[0]}", "span_id": "{ids[1]}"'
        return line + "}"

    def _head(self, level: int | str, logger: str) -> str:
        """The level and logger fields; a record names its level, a deferred line numbers it."""
        name = logging.getLevelName(level) if isinstance(level, int) else level
        head = f'"level": {_json_string(name.lower())}, "logger": {_json_string(logger)}'
        self._heads[(level, logger)] = head
        return head

    def _time(self, created: float) -> str:
        """ISO 8601 in UTC to the millisecond, as datetime writes it; the part up to the second
        is made once a second, and the whole text once a millisecond."""
        in_milliseconds = created * 1000
        millisecond = int(in_milliseconds)
        # Away from a millisecond's edges, rounding to the microsecond cannot carry a time into
        # the next one (the product's error is a tenth of a microsecond): those of one
        # millisecond share its text. At the edges, the text is made as below.
        inside = 0.002 <= in_milliseconds - millisecond <= 0.998
        cached = self._millisecond
        if inside and cached[0] == millisecond:
            return cached[1]
        # datetime's own rounding: the fraction to the nearest microsecond, half to even.
        fraction, whole = math.modf(created)
        micros = round(fraction * 1_000_000)
        second = int(whole) + micros // 1_000_000
        up_to_second = self._second
        if up_to_second[0] != second:
            up_to_second = (
                second,
                datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"),
            )
            self._second = up_to_second
        text = f"{up_to_second[1]}.{micros % 1_000_000 // 1000:03d}+00:00"
        if inside:
            self._millisecond = (millisecond, text)
        return text


class ConsoleFormatter(LineFormatter):
    """Time, level, logger, message; the date and time up to the second made once a second."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._second: tuple[int, str] = (-1, "")
        # What follows the time, up to the message, made once per level and logger.
        self._heads: dict[tuple[int, str], str] = {}

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._clock(record.created, record.msecs)

    def line(
        self, created: float, levelno: int, logger: str, message: str, context: Context
    ) -> str:
        head = self._heads.get((levelno, logger))
        if head is None:
            head = f" {logging.getLevelName(levelno):<7} {logger}: "
            self._heads[(levelno, logger)] = head
        return f"{self._clock(created, _milliseconds(created))}{head}{message}"

    def _clock(self, created: float, milliseconds: float) -> str:
        # time.localtime takes the whole seconds of a timestamp, as int() does.
        second = int(created)
        up_to_second = self._second
        if up_to_second[0] != second:
            up_to_second = (second, time.strftime(self.default_time_format, self.converter(second)))
            self._second = up_to_second
        return f"{up_to_second[1]},{int(milliseconds):03d}"


def escaped_for_log(text: str) -> str:
    """Text a client sent, which may be anything, escaped for a log line: what json.dumps
    writes for a string, without its quotes or its per-call checks, spaces too, so that no
    value can pass for the fields after it."""
    if text.isascii() and text.isalnum():  # nothing to escape (most ids), and no escaping paid
        return text
    return _json_ascii(text)[1:-1].replace(" ", "\\u0020")


def _milliseconds(created: float) -> float:
    """The milliseconds of a time as a LogRecord takes them."""
    return int((created - int(created)) * 1000) + 0.0


# The context fields of a line logged without a record, as (name, value) pairs.
Context = tuple[tuple[str, object], ...]


def sole_writer(logger: logging.Logger, level: int) -> BackgroundHandler | None:
    """The writer that a record of `logger` at `level` would reach, when it is the only
    handler there, nothing filters on the way and its formatter is one of these: the service's
    own set-up, in which `BackgroundHandler.defer` writes the same line as logging would.
    None otherwise (a handler or a filter added, as tests and embedding applications do):
    then only a record shows them the line."""
    if logger.disabled or logger.filters:
        return None
    writer = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if (
                writer is not None
                or type(handler) is not BackgroundHandler
                or handler.filters
                or not isinstance(handler.formatter, LineFormatter)
            ):
                return None
            writer = handler
        current = current.parent if current.propagate else None
    return writer if writer is not None and level >= writer.level else None


class BackgroundHandler(logging.Handler):
    """Formats each record on the thread that logs it and leaves the line to a thread of its
    own, which writes what has gathered in one write: the thread that logs (the event loop,
    for the audit line of every order read) pays for its line, not for a system call, nor for
    a queue entry and a hand-over to another thread per line.

    At most `capacity` lines wait; with that many waiting, a thread that logs waits for room,
    so when the output cannot keep up the service slows to its pace (as with a direct write to
    a slow output) and no line is dropped. `flush` returns once every line logged before it is
    written, and `stop`, called at exit, writes what is pending: a stop (SIGTERM included)
    loses nothing.
    """

    def __init__(self, stream: TextIO, capacity: int = MAX_WAITING_LINES) -> None:
        super().__init__()
        self._stream = stream
        self._capacity = capacity
        self._line_of = self._line_of_record
        # Guards what follows; notified when lines or flushes arrive and when room is made.
        # Taken as the lock alone where nothing waits: a Condition's `with` is a Python call.
        self._lock = threading.Lock()
        self._gate = threading.Condition(self._lock)
        self._lines: list[str] = []
        self._flushes: list[threading.Event] = []
        self._stopped = False
        self._writer = threading.Thread(target=self._write, name="log-writer", daemon=True)
        self._writer.start()
        # Not left to logging.shutdown at exit: a dictConfig (granian's) makes logging forget
        # the handlers it had, and the lines still pending were lost.
        atexit.register(self.stop)

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        super().setFormatter(fmt)
        self._line_of = fmt.line if isinstance(fmt, LineFormatter) else self._line_of_record

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)  # as a direct write would: reported, never raised
            return
        self._add(line)

    def defer(self, level: int, logger: str, message: str, context: Context) -> None:
        """Write the line of a record of `logger` at `level` with this message and these
        context fields, without making the record: for a line so frequent that making and
        dispatching the record would be most of its cost (the audit line of every order read).
        Only where `sole_writer` names this handler: no other would see the line."""
        self._add(self._line_of(time.time(), level, logger, message, context))

    def _add(self, line: str) -> None:
        with self._lock:
            if len(self._lines) >= self._capacity:
                self._gate.wait_for(lambda: len(self._lines) < self._capacity or self._stopped)
            if self._stopped:  # a line after the exit hook (another hook's, a late thread's)
                self._write_out([line])
                return
            if not self._lines:
                self._gate.notify_all()  # the writer waits for a first line
            self._lines.append(line)

    def flush(self) -> None:
        flushed = threading.Event()
        with self._gate:
            if self._stopped:  # lines are written at once
                return
            self._flushes.append(flushed)
            self._gate.notify_all()
        flushed.wait()

    def close(self) -> None:
        # dictConfig closes every handler it finds (granian configures its loggers with it
        # after ours), while this one stays the root's: closing writes what is pending and
        # keeps the writer; `stop` ends it.
        self.flush()
        super().close()

    def stop(self) -> None:
        """Write what is pending and end the writer thread; later lines are written at once."""
        atexit.unregister(self.stop)
        with self._gate:
            if self._stopped:
                return
            self._stopped = True
            self._gate.notify_all()
        self._writer.join()

    def _write(self) -> None:
        while True:
            with self._gate:
                self._gate.wait_for(lambda: self._lines or self._flushes or self._stopped)
            # Each wake-up of this thread takes the GIL from the event loop: lines gathered
            # for a moment make one wake-up and one write for hundreds under load.
            time.sleep(GATHER_SECONDS)
            with self._gate:
                lines, self._lines = self._lines, []
                flushes, self._flushes = self._flushes, []
                stopped = self._stopped
                self._gate.notify_all()  # room for those waiting
            if lines:
                self._write_out(lines)
            for flushed in flushes:
                flushed.set()
            if stopped:
                return

    def _write_out(self, lines: list[str]) -> None:
        lines.append("")  # the last line's end
        try:
            self._stream.write("\n".join(lines))
            self._stream.flush()
        except Exception:
            self.handleError(
                logging.makeLogRecord(
                    {"msg": "%d log lines not written", "args": (len(lines) - 1,)}
                )
            )

    def _line_of_record(
        self, created: float, levelno: int, logger: str, message: str, context: Context
    ) -> str:
        """The line of a record made for a line logged without one, for a formatter of
        another kind."""
        made = logging.LogRecord(logger, levelno, __file__, 0, message, None, None)
        made.created = created
        made.msecs = _milliseconds(created)
        made.__dict__.update(context)
        return self.format(made)


def configure(level: str, log_format: Literal["console", "json"]) -> None:
    for previous in logging.getLogger().handlers:
        if isinstance(previous, BackgroundHandler):
            previous.stop()
    handler = BackgroundHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else ConsoleFormatter())
    # Fields no format here shows, which every record would otherwise look up.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # One line per connection attempt would drown the state changes that matter.
    for noisy in ("alembic", "psycopg.pool"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
