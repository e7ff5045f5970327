"""The main job with no broker: ``astronn-dist run`` spreads chunks over processes as a worker does.

A worker's pool is one process per core on the CPU (one torch thread each) or several per GPU
(:func:`astronn_dist.worker.devices.plan_worker`), because one process's reading, normalization and database
writes hold its GIL while its inference threads wait. ``run`` uses the same plan: each process
loads the model once, takes chunks from the parent and writes their rows itself through
:func:`astronn_dist.worker.service.chunks.process_chunk` (the task's body), exactly as a pool process would; the
parent only hands out chunks and counts. Processes are spawned, not forked, so no process
inherits a CUDA context (nor the parent's torch threads).

A job of one chunk, or a plan of one process, runs in the calling process: starting a process
costs more than such a job.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any

from astronn_dist.worker.config import Settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from astronn_dist.worker.service.chunks import ChunkOutcome
    from astronn_dist.worker.contract import SpectrumRequest
    from astronn_dist.worker.devices import WorkerPlan


@dataclass
class LocalReport:
    """What the job did: one outcome per chunk (in completion order), the processes that ran
    them."""

    outcomes: list[ChunkOutcome] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)

    def add(self, done: tuple[ChunkOutcome, int]) -> ChunkOutcome:
        self.outcomes.append(done[0])
        self.pids.add(done[1])
        return done[0]


@dataclass(frozen=True)
class LocalRun:
    """What the job ran on: the plan and the model's identity and device, for the summary."""

    plan: WorkerPlan
    model_id: str
    devices: tuple[str, ...]
    processes: int  # processes that run chunks (1: this one)
    threads: int  # the predictor's CPU workers in each


def plan_local(settings: Settings, processes: int | None) -> WorkerPlan:
    """The worker's plan for this machine (one process per core or GPU; ``processes`` sets it).

    Raises:
        ValueError: a device that is not there, or processes < 1.
    """
    from astronn_dist.worker.devices import plan_here

    return plan_here(settings.device, processes)  # checks the spec before anything is loaded


# -- one process's state --------------------------------------------------------------------

_STATE: dict[str, Any] = {}


def _start(settings: Settings, plan: WorkerPlan, index: Any, *, threads: int | None = None,
           engine: Engine | None = None) -> tuple[str, str]:
    """Load the model and open the database in this process; returns (model_id, device).

    threads: the predictor's CPU workers; None (a spawned process of the plan): the plan's,
    with as many torch threads. engine: an engine to use instead of a new one (the caller's).
    """
    import torch

    from astronn_dist.worker.service.results import make_engine
    from astronn_dist.worker.service.state import load_predictor

    if hasattr(index, "get_lock"):  # a shared counter: this process takes the next index
        with index.get_lock():
            index.value += 1
            index = index.value - 1
    if threads is None:  # a process of its own: its torch threads are the plan's
        torch.set_num_threads(plan.threads_per_process)
    predictor = load_predictor(settings, plan.device, int(index),
                               threads=threads or plan.threads_per_process)
    _STATE.update(
        predictor=predictor,
        engine=engine if engine is not None else make_engine(settings.database_url),
        own_engine=engine is None,
        host=socket.gethostname(),
    )
    # Start-up, not the first chunk's work: the task body's modules (the reader brings astropy)
    # and the database connection (SQLite: WAL set up), which the first chunk of each process
    # paid otherwise (~0.5 s of a 2,000-spectrum job at 2 passes, counted as processing).
    from astronn_dist.worker.service.chunks import process_chunk  # noqa: F401

    with _STATE["engine"].connect():
        pass
    return predictor.model_id, str(predictor.device)


def _chunk(requests: list[SpectrumRequest], run_id: str) -> tuple[ChunkOutcome, int]:
    """One chunk through the task's body: (its outcome, the process that ran it)."""
    from astronn_dist.worker.service.chunks import process_chunk

    outcome = process_chunk(requests, predictor=_STATE["predictor"], engine=_STATE["engine"],
                            task_id=run_id, attempts=1, host=_STATE["host"])
    return outcome, os.getpid()


def _stop() -> None:
    predictor = _STATE.pop("predictor", None)
    if predictor is not None:
        predictor.close()
    engine = _STATE.pop("engine", None)
    if engine is not None and _STATE.pop("own_engine", True):
        engine.dispose()


def _ready(settings: Settings, plan: WorkerPlan, counter: Any, barrier: Any) -> None:
    """Pool initializer: the model is loaded before the first chunk arrives. A failure (a bad
    checkpoint, a device that will not open) is kept and raised by :func:`_identity` in the
    parent: raised here, it would only kill the process and break the pool without a word."""
    _STATE["barrier"] = barrier
    try:
        _start(settings, plan, counter)
    except Exception as exc:  # noqa: BLE001 - handed to the parent as it is
        _STATE["error"] = exc


def _identity() -> tuple[str, str]:
    """(model_id, device) of this process, once every process has loaded its model: one such
    call per process makes the pool start them all (it would start them one at a time, as
    work waits), each loading its model in parallel with the others."""
    _STATE["barrier"].wait(timeout=600)
    if "error" in _STATE:
        raise _STATE["error"]
    predictor = _STATE["predictor"]
    return predictor.model_id, str(predictor.device)


# -- the job --------------------------------------------------------------------------------

BATCHES_PER_PROCESS = 4
BATCH_RANGE = (128, 512)


def batch_size(n: int, processes: int) -> int:
    """Spectra per batch when the job does not say: about BATCHES_PER_PROCESS batches for each
    process, within BATCH_RANGE. Each batch pays a start and an end where a process's reading
    and predicting threads do not overlap, so larger batches go faster (on 2 cores at 2 passes:
    8,000 spectra 2,177-2,218 spectra/s in batches of 128, 2,343-2,423 in 512; 2,000 spectra
    1,587-1,824 in 128, 1,949-2,009 in 250); several per process keep the processes' last
    batches even and the progress bar moving. At most 512: a batch's spectra are all in memory
    (~0.1 MB each), and on an H200 batches of 1,000 were no faster than 256."""
    low, high = BATCH_RANGE
    return max(low, min(high, -(-n // (BATCHES_PER_PROCESS * max(1, processes)))))


def run_local(
    requests: Sequence[SpectrumRequest],
    settings: Settings,
    *,
    chunk_size: int | None,
    plan: WorkerPlan,
    on_start: Callable[[LocalRun], None] = lambda run: None,
    on_chunk: Callable[[ChunkOutcome], None] = lambda outcome: None,
    engine: Engine | None = None,
) -> LocalReport:
    """Process ``requests`` in chunks of ``chunk_size`` (None: :func:`batch_size` for the plan)
    and write their rows (database migrated beforehand). ``on_start`` is called once the model
    is loaded, ``on_chunk`` after each chunk's rows are committed (in the calling process, in
    completion order). ``engine``: the
    caller's engine for a job run in this process (an in-memory SQLite database lives in it).

    Returns:
        One outcome per chunk, and the processes that ran them.

    Raises:
        whatever a chunk raises (a database that went away, ...): the rows of the chunks done
        until then are committed.
    """
    size = chunk_size or batch_size(len(requests), plan.concurrency)
    chunks = [list(requests[i : i + size]) for i in range(0, len(requests), size)]
    run_id = f"run-{uuid.uuid4()}"
    report = LocalReport()
    processes = min(plan.concurrency, len(chunks))
    if processes <= 1:
        # Here, in the calling process: every core of the plan for the predictor's workers
        # (the numbers do not depend on it), and the caller's engine if it gave one.
        from astronn_dist.worker.devices import usable_cores

        threads = usable_cores()
        model_id, device = _start(settings, plan, 0, threads=threads, engine=engine)
        try:
            on_start(LocalRun(plan, model_id, (device,), 1, threads))
            for chunk in chunks:
                on_chunk(report.add(_chunk(chunk, run_id)))
        finally:
            _stop()
        return report

    ctx = get_context("spawn")
    counter, barrier = ctx.Value("i", 0), ctx.Barrier(processes)
    with ProcessPoolExecutor(processes, mp_context=ctx, initializer=_ready,
                             initargs=(settings, plan, counter, barrier)) as pool:
        ready = [pool.submit(_identity) for _ in range(processes)]
        # The chunks' outcomes are ChunkOutcome objects: the first one unpickled imports their
        # module, and with it the science stack (astropy, ~0.6 s of a core), in the executor's
        # manager thread, which meanwhile hands out no queued chunk (a process sat idle ~0.3 s
        # after its first chunk). Imported here instead, while the processes load their models.
        import astronn_dist.worker.service.chunks  # noqa: F401

        identities = [future.result() for future in ready]
        devices = tuple(sorted({device for _, device in identities}))
        on_start(LocalRun(plan, identities[0][0], devices, processes, plan.threads_per_process))
        # At most two chunks queued per process: a failure stops the job early, and the
        # progress bar moves with the work done rather than the work handed out.
        pending: set = set()
        for chunk in chunks:
            pending.add(pool.submit(_chunk, chunk, run_id))
            if len(pending) >= 2 * processes:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    on_chunk(report.add(future.result()))
        for future in pending:
            on_chunk(report.add(future.result()))
    return report
