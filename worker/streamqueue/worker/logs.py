"""JSON-lines logging for the worker process, so log pipelines can filter by field."""

from __future__ import annotations

import json
import logging
import sys
import time

_STANDARD = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, extras and any exception."""

    def __init__(self, consumer: str) -> None:
        super().__init__()
        self.consumer = consumer

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "consumer": self.consumer,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and k != "message"})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str, consumer: str) -> None:
    """Send every log record to stderr as JSON at ``level`` (third-party noise kept at WARNING)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(consumer))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("streamqueue").setLevel(level)
