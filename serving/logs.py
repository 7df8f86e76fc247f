"""Structured logs: one JSON object per line on stderr, one line per event that matters.

Callers log with `extra={"event": ..., ...}`; those fields become keys of the line, so a
log pipeline can filter on `event`, `model` or `session` without parsing prose.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str) -> None:
    """Send memserve's logs to stderr as JSON lines at `level` (debug, info, warning, error)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("memserve")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def log_session(
    logger: logging.Logger, event: str, model: str, session: str, **fields: Any
) -> None:
    """One line about a session: message "session EVENT", event name "session_EVENT"."""
    logger.info(
        f"session {event}",
        extra={"event": f"session_{event}", "model": model, "session": session, **fields},
    )
