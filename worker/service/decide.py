"""What the task does with a chunk: process it, park it, retry it or give up, decided by pure
functions of the delivery count and the failure (no Celery, no I/O: tested directly).

===========================================  ================================================
model cannot be loaded (configuration)       retry with backoff, without limit
database unavailable (connect / commit)      retry with backoff, without limit
a database that opens but cannot be migrated retry with backoff, without limit
storage error (EIO, ESTALE, ...), CUDA or    retry with backoff up to ``max_retries``, then
host out of memory, anything unexpected      give up: no-result rows saying why
the same chunk killed the worker N times     park: no-result rows "worker died N times ..."
the process's GPU failed (fatal CUDA error)  the process exits (tasks.py): delivered again
the rows of a parked or failed chunk cannot  retry (the message stays until its rows are in)
be written
===========================================  ================================================
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

RETRY_BACKOFF_BASE_S = 2.0
RETRY_BACKOFF_MAX_S = 300.0
"""Backoff of retry n: ``min(cap, base * 2**n)``, jittered to between half and all of it (so
workers that failed together do not retry together). The cap is also at most half the visibility
timeout: a retry waits in the worker as an unacknowledged ETA message, and one held longer than
the timeout is delivered a second time (celery/celery#4766)."""


class Action(Enum):
    PROCESS = "process"
    PARK = "park"
    RETRY = "retry"
    GIVE_UP = "give up"


@dataclass(frozen=True)
class Decision:
    """An action and why (the reason goes into the log, the metrics and no-result rows)."""

    action: Action
    reason: str = ""


class Stage(Enum):
    """Where a failure happened."""

    LOAD_MODEL = "load the model"
    OPEN_DATABASE = "open the database"
    PROCESS = "process the chunk"
    WRITE_PARKED = "write the parked chunk's rows"
    WRITE_FAILED = "write the failed chunk's rows"


def on_delivery(deliveries: int, max_deliveries: int, task_id: str) -> Decision:
    """Process the chunk, or park it when its worker died ``max_deliveries`` times already."""
    if deliveries > max_deliveries:
        return Decision(Action.PARK, (
            f"worker died {deliveries - 1} times processing this chunk (task {task_id}); "
            f"parked after {max_deliveries} deliveries"
        ))
    return Decision(Action.PROCESS)


def on_failure(exc: BaseException, stage: Stage, *, retries: int, max_retries: int,
               attempts: int) -> Decision:
    """Retry or give up after ``exc`` at ``stage`` (``retries``: retries so far)."""
    unavailable = database_unavailable(exc)
    if stage is Stage.LOAD_MODEL:
        return Decision(Action.RETRY, "cannot load the model")
    if stage is Stage.OPEN_DATABASE:
        return Decision(Action.RETRY, "database unavailable" if unavailable else "cannot open the database")
    if stage is Stage.WRITE_PARKED:
        return Decision(Action.RETRY, "cannot write the parked chunk's rows")
    if stage is Stage.WRITE_FAILED:
        return Decision(Action.RETRY, "cannot write the failed chunk's rows")
    if unavailable:
        return Decision(Action.RETRY, "database unavailable")
    if retries < max_retries:
        return Decision(Action.RETRY, "transient failure")
    return Decision(Action.GIVE_UP, f"gave up after {attempts} attempts: {describe(exc)}")


def retry_countdown(retries: int, visibility_timeout_s: float) -> float:
    """Seconds before retry number ``retries + 1``: exponential, capped, jittered."""
    cap = min(RETRY_BACKOFF_MAX_S, visibility_timeout_s / 2)
    ceiling = min(cap, RETRY_BACKOFF_BASE_S * 2.0**retries)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def database_unavailable(exc: BaseException) -> bool:
    """The database cannot be reached or lost the connection (not a problem of the data)."""
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)


def describe(exc: BaseException) -> str:
    """One line naming an exception (for logs and no-result rows)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__
