"""Log set-up: readable lines for a terminal, or one JSON object per line for a collector,
formatted and written by a thread of their own."""

from __future__ import annotations

import atexit
import json
import logging
import math
import queue
import sys
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Literal, NamedTuple, TextIO, TypeGuard

# Context a log call may attach with `extra=`; the JSON lines carry them as fields of their own.
CONTEXT_FIELDS = ("topic", "partition", "offset", "order_uid", "reason", "field")

# Records waiting for the writer at most (a record takes about 1 KiB): half a second of audit
# lines at 20,000 reads/s, so a slow moment of the output does not reach the request path.
QUEUE_CAPACITY = 10_000
# How long the writer lets lines gather before it writes them: the most a line waits.
GATHER_SECONDS = 0.01


# A JSON string literal, non-ASCII kept: what json.dumps(..., ensure_ascii=False) writes for one.
_json_string = json.encoder.encode_basestring
_json_ascii = json.encoder.encode_basestring_ascii
_json_value = json.JSONEncoder(ensure_ascii=False, default=str).encode


class LineFormatter(logging.Formatter):
    """A formatter that can also write the line of a record never made (see `Deferred`)."""

    def line(self, deferred: Deferred) -> str:
        raise NotImplementedError


class JsonFormatter(LineFormatter):
    """The fields in a fixed order, as `json.dumps` of a dict would write them, built from
    string literals: the writer formats every audit line, and a generic encoder per line cost
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

    def line(self, deferred: Deferred) -> str:
        created, level, logger, message, context = deferred
        return self._line(created, level, logger, message, context)

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
        if inside and self._millisecond[0] == millisecond:
            return self._millisecond[1]
        # datetime's own rounding: the fraction to the nearest microsecond, half to even.
        fraction, whole = math.modf(created)
        micros = round(fraction * 1_000_000)
        second = int(whole) + micros // 1_000_000
        if self._second[0] != second:
            text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = (second, text)  # one assignment: a reader sees a pair that matches
        text = f"{self._second[1]}.{micros % 1_000_000 // 1000:03d}+00:00"
        if inside:
            self._millisecond = (millisecond, text)
        return text


class ConsoleFormatter(LineFormatter):
    """Time, level, logger, message; the date and time up to the second made once a second."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._clock(record.created, record.msecs)

    def line(self, deferred: Deferred) -> str:
        level_name = logging.getLevelName(deferred.levelno)
        return (
            f"{self._clock(deferred.created, _milliseconds(deferred.created))} {level_name:<7} "
            f"{deferred.logger}: {deferred.message}"
        )

    def _clock(self, created: float, milliseconds: float) -> str:
        # time.localtime takes the whole seconds of a timestamp, as int() does.
        second = int(created)
        if self._second[0] != second:
            text = time.strftime(self.default_time_format, self.converter(second))
            self._second = (second, text)
        return f"{self._second[1]},{int(milliseconds):03d}"


def printable(text: str) -> str:
    """Text a client sent, which may be anything, escaped for a log line: what json.dumps
    writes for a string, without its quotes or its per-call checks, spaces too, so that no
    value can pass for the fields after it."""
    return _json_ascii(text)[1:-1].replace(" ", "\\u0020")


def _milliseconds(created: float) -> float:
    """The milliseconds of a time as a LogRecord takes them."""
    return int((created - int(created)) * 1000) + 0.0


class Deferred(NamedTuple):
    """A line logged without a LogRecord: what its formatter needs of one. See `sole_writer`."""

    created: float
    levelno: int
    logger: str
    message: str
    context: tuple[tuple[str, object], ...]


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


class _Flushed(threading.Event):
    """Put in the queue by `flush`: set once every record queued before it is written."""


class _Stop:
    """Put in the queue by `stop`: the writer's last item."""


_Item = logging.LogRecord | Deferred | _Flushed | _Stop


def _has_line(item: _Item) -> TypeGuard[logging.LogRecord | Deferred]:
    return isinstance(item, logging.LogRecord | Deferred)


class BackgroundHandler(logging.Handler):
    """Queues each record for a thread of its own, which formats what has come and writes it to
    `stream` in one write: the thread that logs (the event loop, for the audit line of every
    order read) pays for a record and a queue entry, not for formatting and a system call.

    At most `capacity` records wait; with the queue full, a thread that logs waits for room, so
    when the output cannot keep up the service slows to its pace (as with a direct write to a
    slow output) and no line is dropped. `flush` returns once every record queued before it is
    written, and `stop`, called at exit, writes what is pending: a stop (SIGTERM included)
    loses nothing.
    """

    def __init__(self, stream: TextIO, capacity: int = QUEUE_CAPACITY) -> None:
        super().__init__()
        self._stream = stream
        self._capacity = capacity
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._room = threading.Condition()
        self._stopped = False
        self._writer = threading.Thread(target=self._write, name="log-writer", daemon=True)
        self._writer.start()
        # Not left to logging.shutdown at exit: a dictConfig (granian's) makes logging forget
        # the handlers it had, and the lines still queued were lost.
        atexit.register(self.stop)

    def emit(self, record: logging.LogRecord) -> None:
        # The message as it reads now: its arguments may change before the writer formats it.
        try:
            record.msg = record.getMessage()
        except Exception:
            self.handleError(record)  # as a direct write would: reported, never raised
            return
        record.args = None
        # Handler.handle holds the handler's lock around emit.
        self._enqueue(record)

    def defer(
        self, level: int, logger: str, message: str, context: tuple[tuple[str, object], ...]
    ) -> None:
        """Write the line of a record of `logger` at `level` with this message and these
        context fields, without making the record: for a line so frequent that making and
        dispatching the record would be most of its cost (the audit line of every order read).
        Only where `sole_writer` names this handler: no other would see the line."""
        # tuple.__new__ and the lock's own context: a NamedTuple's constructor and acquire()
        # are Python calls, and this runs for every order read.
        line = tuple.__new__(Deferred, (time.time(), level, logger, message, context))
        with self.lock:  # type: ignore[union-attr]  # made by Handler.__init__
            self._enqueue(line)

    def _enqueue(self, item: logging.LogRecord | Deferred) -> None:
        """Queue a line for the writer, with the handler's lock held: one thread at a time gets
        here, so the queue never exceeds its capacity."""
        if self._stopped:  # a line after the exit hook (another hook's, a late thread's)
            self._write_out([item])
            return
        if self._queue.qsize() >= self._capacity:
            with self._room:
                self._room.wait_for(lambda: self._queue.qsize() < self._capacity)
        self._queue.put(item)

    def flush(self) -> None:
        flushed = _Flushed()
        self.acquire()  # as in stop: the mark goes in before the end, or not at all
        try:
            if self._stopped:
                return
            self._queue.put(flushed)
        finally:
            self.release()
        flushed.wait()

    def close(self) -> None:
        # dictConfig closes every handler it finds (granian configures its loggers with it
        # after ours), while this one stays the root's: closing writes what is pending and
        # keeps the writer; `stop` ends it.
        self.flush()
        super().close()

    def stop(self) -> None:
        """Write what is pending and end the writer thread; later records are written at once."""
        atexit.unregister(self.stop)
        self.acquire()  # emit holds it: each record goes either before the end or after it
        try:
            if self._stopped:
                return
            self._stopped = True
            self._queue.put(_Stop())
        finally:
            self.release()
        self._writer.join()

    def _write(self) -> None:
        while True:
            batch = [self._queue.get()]
            # Each wake-up of this thread takes the GIL from the event loop: lines gathered
            # for a moment make one wake-up and one write for hundreds under load.
            time.sleep(GATHER_SECONDS)
            # Single reader: whatever qsize counts is there to take.
            batch += [self._queue.get_nowait() for _ in range(self._queue.qsize())]
            with self._room:
                self._room.notify_all()
            if self._write_out(batch):
                return

    def _write_out(self, items: list[_Item]) -> bool:
        """Write the lines of `items`, then wake those waiting for a flush mark among them; true
        when the end mark was there. One pass, each item told by its exact type: this runs for
        every audit line."""
        lines: list[str] = []
        # sole_writer saw a LineFormatter; one set since then writes the record's line.
        formatter = self.formatter
        deferred_line = (
            formatter.line if isinstance(formatter, LineFormatter) else self._line_of_record
        )
        flushed: list[_Flushed] = []
        stopped = False
        for item in items:
            try:
                if type(item) is Deferred:
                    lines.append(deferred_line(item))
                elif type(item) is _Flushed:
                    flushed.append(item)
                elif type(item) is _Stop:
                    stopped = True
                elif isinstance(item, logging.LogRecord):
                    lines.append(self.format(item))
            except Exception:
                self.handleError(_record_of(item))  # type: ignore[arg-type]  # a line's item
        if lines:
            lines.append("")  # the last line's end
            try:
                self._stream.write("\n".join(lines))
                self._stream.flush()
            except Exception:
                self.handleError(_record_of(next(filter(_has_line, items))))
        for mark in flushed:
            mark.set()
        return stopped

    def _line_of_record(self, deferred: Deferred) -> str:
        return self.format(_record_of(deferred))


def _record_of(item: logging.LogRecord | Deferred) -> logging.LogRecord:
    """The record a deferred line stands for, for a formatter of another kind or an error
    report."""
    if isinstance(item, logging.LogRecord):
        return item
    made = logging.LogRecord(item.logger, item.levelno, __file__, 0, item.message, None, None)
    made.created = item.created
    made.msecs = _milliseconds(item.created)
    made.__dict__.update(item.context)
    return made


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
