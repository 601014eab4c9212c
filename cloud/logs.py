"""Structured (JSON lines) logging for the cloud tier; secrets never reach it.

Log calls pass an event name and fields: `log.info("request", extra=fields(code="OK", split=3))`. The
formatter writes one JSON object per line. A filter redacts anything that looks like a bearer token in case
a message ever carries one (the code never logs metadata).
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time

_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',}]+")
_FIELDS = "rapnet_fields"


def fields(**values) -> dict:
    return {_FIELDS: values}


def redact(text: str) -> str:
    return _BEARER.sub(r"\1[redacted]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update(getattr(record, _FIELDS, {}) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(entry, default=str))


def get_logger(name: str = "rapnet.cloud") -> logging.Logger:
    return logging.getLogger(name)


def configure(level: int = logging.INFO, stream=None) -> None:
    """JSON lines on stderr for the rapnet.cloud loggers (idempotent)."""
    logger = logging.getLogger("rapnet.cloud")
    for handler in logger.handlers:
        if getattr(handler, "_rapnet", False):
            return
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._rapnet = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def now_ms() -> float:
    return time.perf_counter() * 1e3
