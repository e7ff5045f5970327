"""A chunk of spectra through the science core into the results table, without Celery.

:func:`process_chunk` is the task's body (``astronn-dist run`` calls it too): the batch through
:func:`astronn_dist.worker.science.pipeline.process_batch`, split in halves while it runs out of memory, and every
row written in ONE transaction. :func:`write_no_results` writes the rows of a chunk that gets
no results (parked, or given up).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from astronn_dist.worker.service import metrics
from astronn_dist.worker.contract import FLAG_NO_RESULT, SpectrumRequest
from astronn_dist.worker.service.messages import InvalidSpectrum
from astronn_dist.worker.science.pipeline import ResultRecord, no_result_record, process_batch

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from astronn_dist.worker.science.inference import Predictor

log = logging.getLogger("astronn_dist.worker.service.tasks")  # one logger for the task's lines, whichever module


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
    from astronn_dist.worker.service.results import upsert_results

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
        whatever :func:`astronn_dist.worker.science.pipeline.process_batch` raises for transient trouble (after
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
