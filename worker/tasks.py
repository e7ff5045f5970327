"""The task ``astronn_dist.process``: a message in, one committed row per spectrum out.

    message ──split_message──> requests (+ invalid entries -> no-result rows)
            ──delivery count (Redis INCR)──> parked chunk? -> no-result rows, done
            ──process_chunk: process_batch + upsert_results in ONE transaction──> commit, ack

The body is :func:`process_chunk`, usable without Celery (``astronn-dist run`` calls it). The
Celery task around it adds what only a queue needs: validation of untrusted messages, retries,
and the delivery count that parks a chunk which keeps killing workers.

Failures and what becomes of them (a spectrum is never lost: it ends with a row, or its message
stays in the queue):

===========================================  ================================================
unreadable spectrum (missing, corrupt file)  no-result row with the reason (the pipeline), once
invalid entry in a message                   no-result row if its spectrum_id is usable
invalid message as a whole                   logged and rejected (removed), never retried
database unavailable (connect / commit)      retried with backoff, without limit
model cannot be loaded (configuration)       retried with backoff, without limit
storage error (EIO, ESTALE, ...), CUDA or    retried with backoff up to ``max_retries``, then
host out of memory, anything unexpected      no-result rows saying why and after how many tries
CUDA / host out of memory                    also: the batch is split in halves, at once
pool process killed (SIGKILL, OOM killer)    message requeued at once (reject_on_worker_lost)
whole worker killed                          message requeued after the visibility timeout
the same chunk killed the worker N times     parked: no-result rows "worker died N times ..."
===========================================  ================================================

Redelivery cannot be told from the message: on Redis ``delivery_info['redelivered']`` is not
set reliably, so each delivery increments a counter in Redis (the broker, same URL) keyed by task
id and retry number; the counter is the truth. A retry is a new message with the same task id, so
the retry number keeps a retried chunk from being counted as a dying one.

One model per process: each pool process loads the checkpoint once (and creates one database
engine and runs the migrations once), on its own device, in the process itself, never in the
forking parent (a CUDA context does not survive fork). Celery kills the pool if a
``worker_process_init`` handler takes longer than ``worker_proc_alive_timeout`` (4 s), and
importing torch plus loading a model can take longer than that, so the handler only starts a
thread that loads them; the first task waits for that thread if it has not finished.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from celery import Task, shared_task
from celery.exceptions import Reject
from celery.signals import worker_process_init, worker_process_shutdown
from celery.utils.log import get_task_logger

from worker import metrics
from worker.config import TASK_NAME, Settings
from worker.distance import FLAG_NO_RESULT
from worker.messages import InvalidSpectrum, MessageError, split_message
from worker.pipeline import ResultRecord, SpectrumRequest, no_result_record, process_batch

if TYPE_CHECKING:  # the parent process never imports torch: it forks the pool
    from sqlalchemy.engine import Engine

    from worker.inference import Predictor

log = get_task_logger(__name__)

RETRY_BACKOFF_BASE_S = 2.0
RETRY_BACKOFF_MAX_S = 300.0
"""Backoff of retry n: ``min(cap, base * 2**n)``, jittered to between half and all of it (so
workers that failed together do not retry together). The cap is also at most half the visibility
timeout: a retry waits in the worker as an unacknowledged ETA message, and one held longer than
the timeout is delivered a second time (celery/celery#4766)."""

DELIVERY_KEY = "astronn_dist:deliveries:{task_id}:{retries}"
"""Redis key counting the deliveries of one message (task id, retry number)."""

DELIVERY_KEY_MIN_TTL_S = 86_400


@dataclass(frozen=True)
class ChunkOutcome:
    """What one chunk did. elapsed_s: wall time of processing and writing [s]."""

    task_id: str | None
    model_id: str
    spectra: int
    results: int
    no_result: int
    batches: int
    attempts: int
    elapsed_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# The body: usable without Celery.


def _is_out_of_memory(exc: BaseException) -> bool:
    """Host (MemoryError) or accelerator (torch.cuda.OutOfMemoryError) memory exhausted."""
    if isinstance(exc, MemoryError):
        return True
    torch = _torch_if_loaded()
    if torch is not None and isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _torch_if_loaded() -> Any:
    """torch if something already imported it (this module never imports it itself)."""
    import sys

    return sys.modules.get("torch")


def _free_accelerator_memory() -> None:
    torch = _torch_if_loaded()
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _run_batches(
    requests: Sequence[SpectrumRequest], predictor: Predictor
) -> tuple[list[ResultRecord], int]:
    """process_batch, splitting the batch in halves while it runs out of memory.

    Returns the records in request order and the number of batches it took. A single spectrum
    that still does not fit raises (the task retries it later, maybe on a freer device).
    """
    try:
        return process_batch(requests, predictor), 1
    except Exception as exc:
        if len(requests) < 2 or not _is_out_of_memory(exc):
            raise
        log.warning(
            "out of memory on a batch of %d spectra (%s); splitting it in halves",
            len(requests), type(exc).__name__,
        )
    # Only reached after running out of memory; outside the except block, so the traceback (and
    # the tensors its frames hold) is released before the halves run.
    _free_accelerator_memory()
    half = len(requests) // 2
    first, n_first = _run_batches(requests[:half], predictor)
    second, n_second = _run_batches(requests[half:], predictor)
    return first + second, n_first + n_second


def _invalid_records(
    invalid: Iterable[InvalidSpectrum], predictor: Predictor
) -> list[ResultRecord]:
    return [
        no_result_record(item.as_request(), item.reason, predictor.provenance())
        for item in invalid
        if item.spectrum_id is not None
    ]


def _write(
    engine: Engine,
    records: Sequence[ResultRecord],
    *,
    task_id: str | None,
    attempts: int,
    host: str,
) -> None:
    """Upsert ``records`` in one transaction (committed when this returns; on SQLite it takes
    the write lock first, BEGIN IMMEDIATE, so concurrent workers queue instead of failing)."""
    from worker.results import upsert_results

    upsert_results(engine, records, task_id=task_id, attempts=attempts, host=host)
    metrics.observe_rows(records)


def process_chunk(
    requests: list[SpectrumRequest],
    *,
    predictor: Predictor,
    engine: Engine,
    task_id: str | None,
    attempts: int,
    host: str,
    invalid: Sequence[InvalidSpectrum] = (),
) -> ChunkOutcome:
    """Process a chunk and write its rows, all of them in one transaction.

    Args:
        requests: the spectra (distinct spectrum_ids).
        predictor: the process's loaded model.
        engine: the results database (migrated).
        task_id, attempts, host: provenance stored in every row (attempts: how many times this
            chunk has been tried, this time included).
        invalid: entries of the message that failed validation; those with a usable
            spectrum_id get a no-result row with the reason, in the same transaction.

    Returns:
        The counts. When it returns, the rows are committed.

    Raises:
        whatever :func:`worker.pipeline.process_batch` raises for transient trouble (after
        splitting batches that ran out of memory), and SQLAlchemy errors from the write. Nothing
        is written then.
    """
    t0 = time.perf_counter()
    records, batches = _run_batches(requests, predictor) if requests else ([], 0)
    records = records + _invalid_records(invalid, predictor)
    _write(engine, records, task_id=task_id, attempts=attempts, host=host)
    no_result = sum(1 for r in records if r.result_flags & FLAG_NO_RESULT)
    elapsed_s = time.perf_counter() - t0
    metrics.observe_chunk(len(records), elapsed_s)
    return ChunkOutcome(
        task_id=task_id,
        model_id=predictor.model_id,
        spectra=len(records),
        results=len(records) - no_result,
        no_result=no_result,
        batches=batches,
        attempts=attempts,
        elapsed_s=elapsed_s,
    )


def write_no_results(
    items: Iterable[tuple[SpectrumRequest, str]],
    *,
    predictor: Predictor,
    engine: Engine,
    task_id: str | None,
    attempts: int,
    host: str,
) -> int:
    """No-result rows for ``(request, reason)`` items, in one transaction (each keeps the
    photometry its request carried); returns how many."""
    records = [
        no_result_record(request, reason, predictor.provenance())
        for request, reason in items
    ]
    _write(engine, records, task_id=task_id, attempts=attempts, host=host)
    return len(records)


# ---------------------------------------------------------------------------------------------
# Per-process state: one model, one engine, one Redis client per pool process.


def _process_index() -> int:
    """This pool process's index (0..concurrency-1; a replacement takes the index it replaces)."""
    from billiard.process import current_process

    return int(getattr(current_process(), "index", 0) or 0)


def device_for_process(spec: str, index: int, n_gpus: int) -> str:
    """The device spec of pool process ``index``.

    ``spec`` may be a comma-separated list (``worker.serve`` passes ``cuda:0,cuda:1``): process i
    takes item ``i % len``. ``cuda`` or ``auto`` with several GPUs: process i takes
    ``cuda:{i % n_gpus}``, so ``-c N`` with N GPUs gives one process per GPU.
    """
    items = [s.strip() for s in spec.split(",") if s.strip()] or ["auto"]
    chosen = items[index % len(items)]
    if chosen in ("auto", "cuda") and n_gpus > 1:
        return f"cuda:{index % n_gpus}"
    return chosen


class WorkerState:
    """What one process loads once: the predictor, the database engine, the Redis client."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        # One lock per resource: counting a delivery must not wait for a model being loaded.
        self._model_lock = threading.Lock()
        self._db_lock = threading.Lock()
        self._redis_lock = threading.Lock()
        self._predictor: Predictor | None = None
        self._engine: Engine | None = None
        self._migrated = False
        self._redis: Any = None

    def predictor(self) -> Predictor:
        """The loaded model (loaded on first call; a failure is raised, and retried next call)."""
        with self._model_lock:
            if self._predictor is None:
                from worker.inference import Predictor, resolve_device
                from worker.model import load_model

                spec = self.settings.device
                n_gpus = 0
                if "cuda" in spec or spec.strip() == "auto":
                    import torch

                    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
                device = resolve_device(device_for_process(spec, _process_index(), n_gpus))
                t0 = time.perf_counter()
                loaded = load_model(self.settings.model_path, device=device)
                self._predictor = Predictor(
                    loaded, mc_passes=self.settings.mc_passes, seed=self.settings.seed
                )
                seconds = time.perf_counter() - t0
                metrics.observe_model_loaded(seconds, str(device), loaded.model_id)
                log.info(
                    "process %d loaded model %s on %s in %.1f s (%d MC passes, seed %d)",
                    self.pid, loaded.model_id, device, seconds,
                    self.settings.mc_passes, self.settings.seed,
                    extra={"event": "model_loaded", "model_id": loaded.model_id,
                           "device": str(device), "seconds": round(seconds, 3)},
                )
            return self._predictor

    def engine(self) -> Engine:
        """The results database, migrated once per process (retried until it succeeds)."""
        with self._db_lock:
            if self._engine is None:
                from worker.results import make_engine

                self._engine = make_engine(self.settings.database_url)
            if not self._migrated:
                from worker.results import migrate

                migrate(self._engine)
                self._migrated = True
            return self._engine

    def redis(self) -> Any:
        with self._redis_lock:
            if self._redis is None:
                import redis

                self._redis = redis.Redis.from_url(
                    self.settings.broker_url, socket_timeout=10, socket_connect_timeout=10
                )
            return self._redis

    def count_delivery(self, task_id: str, retries: int) -> int | None:
        """Increment and return this message's delivery count (None if Redis did not answer:
        then the chunk is processed, as if first delivered)."""
        key = DELIVERY_KEY.format(task_id=task_id, retries=retries)
        ttl = max(
            DELIVERY_KEY_MIN_TTL_S,
            4 * self.settings.visibility_timeout_s * max(self.settings.max_deliveries, 1),
        )
        try:
            pipe = self.redis().pipeline(transaction=True)
            pipe.incr(key)
            pipe.expire(key, ttl)
            count, _ = pipe.execute()
            return int(count)
        except Exception as exc:  # noqa: BLE001 - counting is best effort, processing is not
            log.warning("could not count the delivery of %s in Redis: %s", task_id, exc)
            return None

    def forget_deliveries(self, task_id: str, retries: int) -> None:
        try:
            self.redis().delete(DELIVERY_KEY.format(task_id=task_id, retries=retries))
        except Exception as exc:  # noqa: BLE001 - the key expires anyway
            log.debug("could not delete the delivery count of %s: %s", task_id, exc)

    def warm_up(self) -> None:
        """Load the model and open the database now (in a thread), so the first task need not."""

        def run() -> None:
            t0 = time.perf_counter()
            try:
                predictor = self.predictor()
                self.engine()
            except Exception as exc:  # noqa: BLE001 - the first task retries and reports it
                log.warning("warm-up of process %d: %s: %s", self.pid, type(exc).__name__, exc)
                return
            log.info(
                "process %d warm in %.1f s: model %s on %s, results database migrated",
                self.pid, time.perf_counter() - t0, predictor.model_id, predictor.device,
            )

        threading.Thread(target=run, name="astronn-dist-warm-up", daemon=True).start()


_state: WorkerState | None = None
_state_lock = threading.Lock()


def worker_state(settings: Settings | None = None) -> WorkerState:
    """This process's state (a forked child builds its own: nothing crosses fork)."""
    global _state
    with _state_lock:
        if _state is None or _state.pid != os.getpid():
            if settings is None:
                from celery import current_app

                settings = getattr(current_app, "astronn_settings", None) or Settings.from_env()
            _state = WorkerState(settings)
        return _state


@worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    # Runs in each new pool process; must return within worker_proc_alive_timeout (4 s).
    worker_state().warm_up()


@worker_process_shutdown.connect
def _on_process_shutdown(**_: Any) -> None:
    metrics.process_exited(os.getpid())


# ---------------------------------------------------------------------------------------------
# The Celery task.


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


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


@shared_task(
    bind=True,
    name=TASK_NAME,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,  # bounded here, per kind of failure (see the module docstring)
    ignore_result=True,
)
def process(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Process one chunk message (keyword arguments: DESIGN.md, "Message")."""
    state = worker_state()
    settings = state.settings
    task_id = self.request.id
    retries = int(self.request.retries or 0)
    host = self.request.hostname or socket.gethostname()

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
    sent_for = parsed.provenance.get("model_id")

    deliveries = state.count_delivery(task_id, retries) or 1
    attempts = retries + deliveries
    spectra = parsed.requests
    invalid_rows = [(i.as_request(), i.reason) for i in parsed.invalid if i.spectrum_id is not None]

    def failed(reason: str) -> list[tuple[SpectrumRequest, str]]:
        """Rows for a chunk that gets no results: ``reason`` for its spectra, their own reason
        for the entries that were invalid anyway."""
        return [(request, reason) for request in spectra] + invalid_rows

    def retry(exc: BaseException, why: str) -> None:
        countdown = retry_countdown(retries, settings.visibility_timeout_s)
        log.warning(
            "chunk %s (%d spectra), attempt %d: %s (%s); retrying in %.1f s",
            task_id, len(spectra), attempts, why, _describe(exc), countdown,
            extra={"event": "retry", "reason": why, "error": _describe(exc),
                   "spectra": len(spectra), "attempt": attempts, "countdown": round(countdown, 1)},
        )
        metrics.observe_retry(why)
        raise self.retry(exc=exc, countdown=countdown)

    # Infrastructure first: without a model or a database nothing can be recorded, so the
    # message must stay (retried without limit, with capped backoff).
    try:
        predictor = state.predictor()
    except Exception as exc:  # noqa: BLE001
        retry(exc, "cannot load the model")
        raise  # not reached: retry() raises
    try:
        engine = state.engine()
    except Exception as exc:  # noqa: BLE001
        why = "database unavailable" if database_unavailable(exc) else "cannot open the database"
        retry(exc, why)
        raise

    if sent_for is not None and sent_for != predictor.model_id:
        log.warning(
            "chunk %s was enqueued for model %s; this worker runs %s (rows are keyed by the "
            "worker's model)", task_id, sent_for, predictor.model_id,
        )

    if deliveries > settings.max_deliveries:
        reason = (
            f"worker died {deliveries - 1} times processing this chunk (task {task_id}); "
            f"parked after {settings.max_deliveries} deliveries"
        )
        log.error(
            "chunk %s: %s; writing no-result rows for its %d spectra",
            task_id, reason, len(spectra),
            extra={"event": "parked", "spectra": len(spectra), "attempt": attempts},
        )
        try:
            n = write_no_results(
                failed(reason), predictor=predictor, engine=engine,
                task_id=task_id, attempts=attempts, host=host,
            )
        except Exception as exc:  # noqa: BLE001
            retry(exc, "cannot write the parked chunk's rows")
            raise
        metrics.observe_parked()
        return {"task_id": task_id, "parked": n, "deliveries": deliveries}

    try:
        outcome = process_chunk(
            parsed.requests, predictor=predictor, engine=engine, task_id=task_id,
            attempts=attempts, host=host, invalid=parsed.invalid,
        )
    except Exception as exc:  # noqa: BLE001 - every failure is retried or recorded
        if database_unavailable(exc) or retries < settings.max_retries:
            retry(exc, "database unavailable" if database_unavailable(exc) else "transient failure")
        reason = f"gave up after {attempts} attempts: {_describe(exc)}"
        log.error(
            "chunk %s: %s; writing no-result rows for its %d spectra",
            task_id, reason, len(spectra),
            extra={"event": "failed", "spectra": len(spectra), "attempt": attempts},
        )
        try:
            write_no_results(
                failed(reason), predictor=predictor, engine=engine,
                task_id=task_id, attempts=attempts, host=host,
            )
        except Exception as write_exc:  # noqa: BLE001
            retry(write_exc, "cannot write the failed chunk's rows")
            raise
        state.forget_deliveries(task_id, retries)
        return {"task_id": task_id, "failed": len(spectra), "attempts": attempts, "error": reason}

    state.forget_deliveries(task_id, retries)
    if outcome.elapsed_s > 0.5 * settings.visibility_timeout_s:
        log.warning(
            "chunk %s took %.0f s, more than half the visibility timeout (%d s): a chunk that "
            "outlives it is delivered to a second worker; raise ASTRONN_DIST_VISIBILITY_TIMEOUT "
            "or send smaller chunks", task_id, outcome.elapsed_s, settings.visibility_timeout_s,
        )
    log.info(
        "chunk %s: %d spectra, %d results, %d without result, %.2f s, attempt %d",
        task_id, outcome.spectra, outcome.results, outcome.no_result, outcome.elapsed_s, attempts,
        extra={"event": "chunk", "spectra": outcome.spectra, "results": outcome.results,
               "no_result": outcome.no_result, "batches": outcome.batches,
               "seconds": round(outcome.elapsed_s, 4), "attempt": attempts,
               "model_id": outcome.model_id},
    )
    return outcome.as_dict()

