"""The task ``astronn_dist.process``: a message in, one committed row per spectrum out.

    message ──split_message──> requests (+ invalid entries -> no-result rows)
            ──delivery count (Redis INCR)──> decide: process, or park (no-result rows)
            ──process_chunk: process_batch + upsert_results in ONE transaction──> commit, ack
            ──a failure──> decide: retry (the message stays) or give up (no-result rows)

The task is thin: validate, decide, act. What it decides is :mod:`astronn_dist.worker.service.decide` (pure
functions, with the table of failures); the body is :func:`astronn_dist.worker.service.chunks.process_chunk`, usable
without Celery (``astronn-dist run`` calls it); the per-process model, engine and Redis client
are :mod:`astronn_dist.worker.service.state`. A spectrum is never lost: it ends with a row, or its message stays.
An invalid message as a whole is logged and rejected (removed), never retried; a pool process
killed mid-chunk gets its message requeued at once (reject_on_worker_lost), a whole worker
after the visibility timeout. A pool process whose GPU failed (a fatal CUDA error leaves its
context unusable) exits the same way, mid-chunk: a process that stayed would fail every chunk
it took at once, and being the idle one it would take most of them, retrying them into
no-result rows; a new process gets a new context.

Redelivery cannot be told from the message: on Redis ``delivery_info['redelivered']`` is not
set reliably, so each delivery increments a counter in Redis (the broker, same URL) keyed by task
id and retry number; the counter is the truth. A retry is a new message with the same task id, so
the retry number keeps a retried chunk from being counted as a dying one.

Celery kills the pool if a ``worker_process_init`` handler takes longer than
``worker_proc_alive_timeout`` (4 s), and importing torch plus loading a model can take longer
than that, so the handler only starts the state's warm-up thread.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any, NoReturn

from celery import Task, shared_task
from celery.exceptions import Reject
from celery.signals import worker_process_init, worker_process_shutdown
from celery.utils.log import get_task_logger

from astronn_dist.worker.service import metrics
from astronn_dist.worker.service.chunks import ChunkOutcome, process_chunk, write_no_results
from astronn_dist.worker.config import TASK_NAME
from astronn_dist.worker.contract import SpectrumRequest
from astronn_dist.worker.service.decide import Action, Decision, Stage, describe, on_delivery, on_failure, retry_countdown
from astronn_dist.worker.service.messages import MessageError, split_message
from astronn_dist.worker.service.state import DELIVERY_KEY, WorkerState, worker_state

__all__ = ["DELIVERY_KEY", "ChunkOutcome", "WorkerState", "process",
           "process_chunk", "worker_state", "write_no_results"]

log = get_task_logger(__name__)

EXIT_DEVICE_FAILED = 75
"""Exit status of a pool process that leaves because its GPU failed (EX_TEMPFAIL)."""


@worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    # Runs in each new pool process; must return within worker_proc_alive_timeout (4 s).
    worker_state().warm_up()


@worker_process_shutdown.connect
def _on_process_shutdown(**_: Any) -> None:
    metrics.process_exited(os.getpid())


@shared_task(
    bind=True,
    name=TASK_NAME,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,  # bounded by astronn_dist.worker.service.decide, per kind of failure
    ignore_result=True,
)
def process(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Process one chunk message (keyword arguments: DESIGN.md, "Message")."""
    state = worker_state()
    settings = state.settings
    task_id = self.request.id
    retries = int(self.request.retries or 0)
    host = self.request.hostname or socket.gethostname()

    # Validate: an unusable message is removed; unusable entries get their own rows.
    try:
        if args:
            raise MessageError(
                f"the message has {len(args)} positional argument(s); it must be keyword "
                "arguments only: spectra=[...]"
            )
        parsed = split_message(kwargs, data_roots=settings.data_roots)
    except MessageError as exc:
        log.error("rejected message %s: %s", task_id, exc,
                  extra={"event": "rejected", "reason": str(exc)[:500]})
        metrics.observe_rejected()
        raise Reject(f"invalid message: {exc}", requeue=False) from None
    for item in parsed.invalid:
        log.warning("message %s: %s", task_id, item.reason)

    deliveries = state.count_delivery(task_id, retries) or 1
    attempts = retries + deliveries
    spectra = parsed.requests
    invalid_rows = [(i.as_request(), i.reason) for i in parsed.invalid if i.spectrum_id is not None]

    def failed(reason: str) -> list[tuple[SpectrumRequest, str]]:
        """Rows for a chunk that gets no results: ``reason`` for its spectra, their own reason
        for the entries that were invalid anyway."""
        return [(request, reason) for request in spectra] + invalid_rows

    def decide_failure(exc: BaseException, stage: Stage) -> Decision:
        decision = on_failure(exc, stage, retries=retries, max_retries=settings.max_retries,
                              attempts=attempts)
        if decision.action is Action.RETRY:
            retry(exc, decision.reason)
        return decision

    def retry(exc: BaseException, why: str) -> NoReturn:
        countdown = retry_countdown(retries, settings.visibility_timeout_s)
        log.warning(
            "chunk %s (%d spectra), attempt %d: %s (%s); retrying in %.1f s",
            task_id, len(spectra), attempts, why, describe(exc), countdown,
            extra={"event": "retry", "reason": why, "error": describe(exc),
                   "spectra": len(spectra), "attempt": attempts, "countdown": round(countdown, 1)},
        )
        metrics.observe_retry(why)
        raise self.retry(exc=exc, countdown=countdown)

    def write_failed(reason: str, event: str, stage: Stage) -> int:
        log.error(
            "chunk %s: %s; writing no-result rows for its %d spectra", task_id, reason, len(spectra),
            extra={"event": event, "spectra": len(spectra), "attempt": attempts},
        )
        try:
            return write_no_results(failed(reason), predictor=predictor, engine=engine,
                                    task_id=task_id, attempts=attempts, host=host)
        except Exception as exc:  # noqa: BLE001 - the message stays until its rows are in
            decide_failure(exc, stage)
            raise

    # Infrastructure first: without a model or a database nothing can be recorded.
    try:
        predictor = state.predictor()
    except Exception as exc:  # noqa: BLE001
        decide_failure(exc, Stage.LOAD_MODEL)
        raise
    try:
        engine = state.engine()
    except Exception as exc:  # noqa: BLE001
        decide_failure(exc, Stage.OPEN_DATABASE)
        raise
    sent_for = parsed.provenance.get("model_id")
    if sent_for is not None and sent_for != predictor.model_id:
        log.warning(
            "chunk %s was enqueued for model %s; this worker runs %s (rows are keyed by the "
            "worker's model)", task_id, sent_for, predictor.model_id,
        )

    delivery = on_delivery(deliveries, settings.max_deliveries, task_id)
    if delivery.action is Action.PARK:
        n = write_failed(delivery.reason, "parked", Stage.WRITE_PARKED)
        metrics.observe_parked()
        return {"task_id": task_id, "parked": n, "deliveries": deliveries}

    try:
        outcome = process_chunk(
            spectra, predictor=predictor, engine=engine, task_id=task_id,
            attempts=attempts, host=host, invalid=parsed.invalid,
        )
    except Exception as exc:  # noqa: BLE001 - every failure is retried or recorded
        if state.device_failed():
            _leave_for_a_new_process(task_id, len(spectra), exc)
        given_up = decide_failure(exc, Stage.PROCESS)  # returns only when giving up
        write_failed(given_up.reason, "failed", Stage.WRITE_FAILED)
        state.forget_deliveries(task_id, retries)
        return {"task_id": task_id, "failed": len(spectra), "attempts": attempts,
                "error": given_up.reason}

    state.forget_deliveries(task_id, retries)
    _log_outcome(outcome, settings.visibility_timeout_s)
    return outcome.as_dict()


def _leave_for_a_new_process(task_id: str, n_spectra: int, exc: BaseException) -> NoReturn:
    """End this pool process without acknowledging the chunk: the pool starts a new process,
    and the chunk goes back to the queue at once (reject_on_worker_lost), counted as a
    delivery, so a GPU that keeps failing parks it after ``max_deliveries`` like any chunk
    that kills its workers."""
    pid = os.getpid()
    log.error(
        "chunk %s (%d spectra): the GPU of process %d failed (%s); the process exits so that a "
        "new one takes its place, and the chunk is delivered again", task_id, n_spectra, pid,
        describe(exc),
        extra={"event": "device_failed", "error": describe(exc), "spectra": n_spectra},
    )
    metrics.process_exited(pid)
    for handler in logging.getLogger().handlers + log.handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_DEVICE_FAILED)  # at once: nothing more runs here, the chunk is not acknowledged


def _log_outcome(outcome: ChunkOutcome, visibility_timeout_s: int) -> None:
    task_id = outcome.task_id
    if outcome.elapsed_s > 0.5 * visibility_timeout_s:
        log.warning(
            "chunk %s took %.0f s, more than half the visibility timeout (%d s): a chunk that "
            "outlives it is delivered to a second worker; raise ASTRONN_DIST_VISIBILITY_TIMEOUT "
            "or send smaller chunks", task_id, outcome.elapsed_s, visibility_timeout_s,
        )
    log.info(
        "chunk %s: %d spectra, %d results, %d without result, %.2f s, attempt %d",
        task_id, outcome.spectra, outcome.results, outcome.no_result, outcome.elapsed_s, outcome.attempts,
        extra={"event": "chunk", "spectra": outcome.spectra, "results": outcome.results,
               "no_result": outcome.no_result, "batches": outcome.batches,
               "seconds": round(outcome.elapsed_s, 4), "attempt": outcome.attempts,
               "model_id": outcome.model_id},
    )

