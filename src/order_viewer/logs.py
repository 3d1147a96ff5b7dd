"""Log set-up: readable lines for a terminal, or one JSON object per line for a collector."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Literal

# Context a log call may attach with `extra=`; the JSON lines carry them as fields of their own.
CONTEXT_FIELDS = ("topic", "partition", "offset", "order_uid", "reason", "field")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        line.update(
            {name: getattr(record, name) for name in CONTEXT_FIELDS if hasattr(record, name)}
        )
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(level: str, log_format: Literal["console", "json"]) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # One line per connection attempt would drown the state changes that matter.
    for noisy in ("alembic", "psycopg.pool"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
