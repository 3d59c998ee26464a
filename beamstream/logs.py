"""Structured logs for long-running services: one JSON object per line.

Fields passed with ``extra={"dcid": ..., "image": ...}`` become top-level keys, so
a collection's lines can be found with ``grep '"dcid": 1234'`` or a log shipper.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from datetime import UTC, datetime

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as a JSON line with service, host, pid and any extra fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service
        self.host = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "host": self.host,
            "pid": os.getpid(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_json_logging(service: str, level: int = logging.INFO, stream=None) -> None:
    """Send all logging to ``stream`` (stderr) as JSON lines tagged with ``service``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # librdkafka and aiokafka narrate every reconnect; keep their warnings and errors.
    for noisy in ("beamstream.librdkafka", "aiokafka", "faust", "mode"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
