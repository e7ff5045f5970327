"""A worker's log lines: Celery's text format by default, or one JSON object per line
(``ASTRONN_DIST_LOG_FORMAT=json``) for log shippers (Loki, Elasticsearch, CloudWatch).

In JSON, each line has ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``process``,
``message`` (the text line, as in the text format), ``task_id`` inside a task, and the fields
that the call passed with ``extra=`` (worker.tasks gives each chunk's line ``event``,
``spectra``, ``results``, ``no_result``, ``seconds``, ``attempt``...), so that a query can count
and time chunks without parsing text. Nothing secret is logged: URLs are never in a log call
of this project, and Celery masks the broker password in its banner.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

from celery.signals import after_setup_logger, after_setup_task_logger

from worker.config import LOG_FORMATS
# Attributes every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module doc)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        from celery._state import get_current_task

        task = get_current_task()
        if task is not None and task.request.id:
            line["task_id"] = task.request.id
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(log_format: str) -> None:
    """Use ``log_format`` for the loggers Celery sets up in this process from now on."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
    if log_format == "json":
        after_setup_logger.connect(_use_json, weak=False)
        after_setup_task_logger.connect(_use_json, weak=False)


def _use_json(logger: logging.Logger, **_: Any) -> None:
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())
