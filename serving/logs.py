"""Structured logs: one JSON object per line on stderr, with the request id when there is one.

Prompts and generated text are never logged (they may be private); ids, sizes, slices,
timings and reasons are.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOGGER_NAME = "meshserve.serving"
log = logging.getLogger(LOGGER_NAME)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "info", stream=None) -> None:
    """Send serving logs to `stream` (stderr) as JSON lines; idempotent."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    log.setLevel(level.upper())
    # absl puts a handler on the root logger; keep our lines from being printed twice.
    log.propagate = False


def event(name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log `name` with key/value fields, e.g. event("request_finished", request_id=...)."""
    if log.isEnabledFor(level):
        log.log(level, name, extra={"fields": fields})
