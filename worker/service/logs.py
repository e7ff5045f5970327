"""A worker's log lines: Celery's text format by default, or one JSON object per line
(``ASTRONN_DIST_LOG_FORMAT=json``) for log shippers (Loki, Elasticsearch, CloudWatch).

In JSON, each line has ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``process``,
``message`` (the text line, as in the text format), ``task_id`` inside a task, and the fields
that the call passed with ``extra=`` (astronn_dist.worker.service.tasks gives each chunk's line ``event``,
``spectra``, ``results``, ``no_result``, ``seconds``, ``attempt``...), so that a query can count
and time chunks without parsing text. Nothing secret is logged: URLs are never in a log call
of this project, and Celery masks the broker password in its banner.

In text, a line logged by a task module outside a task (a pool process loading its model at
start) has the worker's format; Celery's task format would print ``???[???]:`` for the task
name and id there. Alembic's loggers stay at WARNING unless the worker logs at DEBUG: its INFO
lines ("setup plugin ...", "Context impl SQLiteImpl.", "Will assume transactional DDL.") are
noise at every start, and :mod:`astronn_dist.worker.service.tasks` logs a line once the database is migrated.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

from celery.app.log import TaskFormatter
from celery.signals import after_setup_logger, after_setup_task_logger
from celery.utils.log import ColorFormatter

from astronn_dist.worker.config import LOG_FORMATS

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


class TaskTextFormatter(TaskFormatter):
    """Celery's task format inside a task (``astronn_dist.process[<id>]: ...``), the same format
    without the task fields outside one, where Celery would print ``???[???]:``."""

    TASK_FIELDS = "%(task_name)s[%(task_id)s]: "  # as in Celery's worker_task_log_format

    def __init__(self, fmt: str, datefmt: str | None = None, use_color: bool = False) -> None:
        super().__init__(fmt, datefmt=datefmt, use_color=use_color)
        self._outside = ColorFormatter(fmt.replace(self.TASK_FIELDS, ""), datefmt=datefmt, use_color=use_color)

    def format(self, record: logging.LogRecord) -> str:
        from celery._state import get_current_task

        task = get_current_task()
        if task is None or not task.request.id:
            return self._outside.format(record)
        return super().format(record)


_chosen = {"format": "text"}  # the last configure()'s choice, read when Celery sets up logging


def configure(log_format: str) -> None:
    """Use ``log_format`` for the loggers Celery sets up in this process from now on."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: use one of {', '.join(LOG_FORMATS)}")
    _chosen["format"] = log_format
    after_setup_logger.connect(_setup_worker_logger, weak=False)
    after_setup_task_logger.connect(_setup_task_logger, weak=False)


def _setup_worker_logger(logger: logging.Logger, loglevel: int | str = logging.INFO, **_: Any) -> None:
    """The root logger, set up by Celery at worker start (the pool processes inherit it)."""
    level = logging.getLevelName(loglevel) if isinstance(loglevel, str) else loglevel
    logging.getLogger("alembic").setLevel(logging.INFO if level <= logging.DEBUG else logging.WARNING)
    if _chosen["format"] == "json":
        _use_json(logger)


def _setup_task_logger(logger: logging.Logger, format: str | None = None, colorize: bool = False, **_: Any) -> None:
    """Celery's ``celery.task`` logger, which the task modules' loggers write through."""
    if _chosen["format"] == "json":
        _use_json(logger)
        return
    for handler in logger.handlers:
        if isinstance(handler.formatter, TaskFormatter) and format:
            handler.setFormatter(TaskTextFormatter(format, datefmt=handler.formatter.datefmt, use_color=colorize))


def _use_json(logger: logging.Logger, **_: Any) -> None:
    for handler in logger.handlers:
        handler.setFormatter(JsonFormatter())
