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
from datetime import UTC, datetime
from typing import Literal, TextIO

# Context a log call may attach with `extra=`; the JSON lines carry them as fields of their own.
CONTEXT_FIELDS = ("topic", "partition", "offset", "order_uid", "reason", "field")

# Records waiting for the writer at most (a record takes about 1 KiB): half a second of audit
# lines at 20,000 reads/s, so a slow moment of the output does not reach the request path.
QUEUE_CAPACITY = 10_000
# How long the writer lets lines gather before it writes them: the most a line waits.
GATHER_SECONDS = 0.01


# A JSON string literal, non-ASCII kept: what json.dumps(..., ensure_ascii=False) writes for one.
_json_string = json.encoder.encode_basestring
_json_value = json.JSONEncoder(ensure_ascii=False, default=str).encode


class JsonFormatter(logging.Formatter):
    """The fields in a fixed order, as `json.dumps` of a dict would write them, built from
    string literals: the writer formats every audit line, and a generic encoder per line cost
    several times the rest of the line."""

    def __init__(self) -> None:
        super().__init__()
        self._second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f'{{"time": "{self._time(record.created)}", '
            f'"level": {_json_string(record.levelname.lower())}, '
            f'"logger": {_json_string(record.name)}, '
            f'"event": {_json_string(record.getMessage())}'
        ]
        for name in CONTEXT_FIELDS:
            if hasattr(record, name):
                value = getattr(record, name)
                encoded = _json_string(value) if isinstance(value, str) else _json_value(value)
                parts.append(f', "{name}": {encoded}')
        if record.exc_info:
            parts.append(f', "exception": {_json_string(self.formatException(record.exc_info))}')
        parts.append("}")
        return "".join(parts)

    def _time(self, created: float) -> str:
        """ISO 8601 in UTC to the millisecond, as datetime writes it; the part up to the second
        is made once a second."""
        # datetime's own rounding: the fraction to the nearest microsecond, half to even.
        fraction, whole = math.modf(created)
        micros = round(fraction * 1_000_000)
        second = int(whole) + micros // 1_000_000
        if self._second[0] != second:
            text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = (second, text)  # one assignment: a reader sees a pair that matches
        return f"{self._second[1]}.{micros % 1_000_000 // 1000:03d}+00:00"


class ConsoleFormatter(logging.Formatter):
    """Time, level, logger, message; the date and time up to the second made once a second."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # time.localtime takes the whole seconds of a timestamp, as int() does.
        second = int(record.created)
        if self._second[0] != second:
            text = time.strftime(self.default_time_format, self.converter(second))
            self._second = (second, text)
        return f"{self._second[1]},{int(record.msecs):03d}"


class _Flushed(threading.Event):
    """Put in the queue by `flush`: set once every record queued before it is written."""


_STOP = object()


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
        self._queue: queue.SimpleQueue[logging.LogRecord | _Flushed | object] = queue.SimpleQueue()
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
        if self._stopped:  # a line after the exit hook (another hook's, a late thread's)
            self._write_out([record])
            return
        # Handler.handle holds the handler's lock around emit, so one thread at a time gets
        # here and the queue never exceeds its capacity.
        if self._queue.qsize() >= self._capacity:
            with self._room:
                self._room.wait_for(lambda: self._queue.qsize() < self._capacity)
        self._queue.put(record)

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
            self._queue.put(_STOP)
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
            self._write_out([item for item in batch if isinstance(item, logging.LogRecord)])
            for item in batch:
                if isinstance(item, _Flushed):
                    item.set()
            if _STOP in batch:
                return

    def _write_out(self, records: list[logging.LogRecord]) -> None:
        lines = []
        for record in records:
            try:
                lines.append(self.format(record) + "\n")
            except Exception:
                self.handleError(record)
        if lines:
            try:
                self._stream.write("".join(lines))
                self._stream.flush()
            except Exception:
                self.handleError(records[0])


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
