"""Start a Celery worker on queue ``astronn_dist``: processes, devices and threads.

``astronn-dist worker [--device auto|cpu|cuda|cuda:N] [--concurrency N] [--model PATH]`` calls
:func:`run_worker`, which is ``celery -A astronn_dist.worker.service.app worker -Q astronn_dist -P prefork -c N`` with
the choices below made for the hardware.

Processes: the prefork pool (one OS process per concurrent chunk; the model and a batch live in
each process's memory, and a chunk that crashes its process takes nothing else down).

* With CUDA: several processes per GPU, one per core (at most
  :data:`~astronn_dist.worker.devices.MAX_PROCESSES_PER_GPU` each, and one per
  :data:`~astronn_dist.worker.devices.GPU_GIB_PER_PROCESS` GiB of the GPU's memory), process i
  on ``cuda:{i % GPUs}`` (by pool process index; a replacement process takes
  the index, hence the GPU, of the one it replaces). Reading and normalizing a spectrum costs
  ~0.5 ms of a core (BENCHMARKS.md) while a GPU infers 10^4-10^5 spectra/s, so one process per
  GPU, preparing in a thread of its own, would leave the GPU idle most of the time; each pool
  process prepares its own chunks on its core and sends them to the shared GPU in parts of
  512 spectra. (Preparation processes under one inference process per GPU cannot be had inside
  Celery's prefork pool: its processes are daemonic and may not start children.) Running
  NVIDIA's MPS lets the processes' kernels share the GPU without context switches. This
  parent never touches CUDA: a CUDA context does not survive fork, so the GPU count comes from
  a short-lived subprocess, and each pool process opens its own device when it loads the
  model.
* On CPU: one process per core by default (at most :data:`~astronn_dist.worker.devices.MAX_CPU_PROCESSES`), each with
  ``cores // N`` torch threads (``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, read by torch at import
  in the pool process, unless the environment already sets them). Measured on 2 cores
  (BENCHMARKS.md): one process with 2 threads reached 94-108 spectra/s end to end, two
  single-threaded processes 147-154, because a process's Python work (reading FITS headers,
  the task, the database) holds its GIL while its inference threads wait, whereas two
  processes overlap one's reading with the other's inference. Each process holds its own model
  and batch (about 0.4 GB resident on the CPU), hence the cap; ``--concurrency N`` sets N.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from astronn_dist.worker.config import QUEUE, Settings
from astronn_dist.worker.devices import WorkerPlan, plan_here

log = logging.getLogger(__name__)

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def thread_environment(plan: WorkerPlan) -> dict[str, str]:
    """The torch thread counts of the pool processes (read by torch at its import in each
    process), unless the environment already sets them.

    Only these: the settings reach the pool processes in the app they fork with
    (``app.astronn_settings``), never through the environment, so a URL resolved from a
    ``*_FILE`` secret stays out of ``os.environ`` and ``/proc/<pid>/environ``.
    """
    return {name: str(plan.threads_per_process) for name in THREAD_ENV if not os.environ.get(name)}


def worker_argv(
    plan: WorkerPlan, *, loglevel: str = "INFO", hostname: str | None = None
) -> list[str]:
    """``celery worker`` arguments. Gossip and mingle are off: they are chatter between workers
    that this service does not use (no revokes, no shared state), and mingle delays startup."""
    return [
        "worker",
        "--queues", QUEUE,
        "--pool", "prefork",
        "--concurrency", str(plan.concurrency),
        "--loglevel", loglevel,
        "--hostname", hostname or f"astronn-dist-{os.getpid()}@%h",
        "--without-gossip",
        "--without-mingle",
    ]


def run_worker(
    settings: Settings,
    *,
    device: str,
    concurrency: int | None,
    model: Path | None,
    loglevel: str = "INFO",
    hostname: str | None = None,
) -> None:
    """Run a worker in this process until it is stopped (SIGTERM: warm shutdown, finishing the
    running chunks; a second SIGTERM or SIGQUIT: cold, their messages go back to the queue).

    Args:
        settings: broker, database, visibility timeout, MC passes, ... (flags already applied).
        device: ``auto``, ``cpu``, ``cuda`` (every GPU), ``cuda:N``.
        concurrency: pool processes; None = the plan of the module docstring (one per core, at
            most MAX_PROCESSES_PER_GPU per GPU or MAX_CPU_PROCESSES on the CPU).
        model: checkpoint (None: ``settings.model_path``).
        loglevel: Celery log level.
        hostname: Celery node name (default ``astronn-dist-<pid>@<host>``, unique per worker).
    """
    plan = plan_here(device, concurrency)
    settings = dataclasses.replace(
        settings, device=plan.device, model_path=Path(model) if model else settings.model_path
    )
    os.environ.update(thread_environment(plan))
    from celery.signals import celeryd_after_setup

    from astronn_dist.worker.service import metrics
    from astronn_dist.worker.service.app import make_app

    def after_setup(**_: object) -> None:
        # Celery has set up logging (lines logged before it are lost) and not forked the pool
        # yet, which the metrics server must precede (see astronn_dist.worker.service.metrics).
        log.info(
            "starting worker: %d process(es), device %s, %d thread(s) per process",
            plan.concurrency, plan.device, plan.threads_per_process,
        )
        metrics.serve(settings.metrics_port, settings.metrics_addr, settings)

    celeryd_after_setup.connect(after_setup, weak=False)
    app = make_app(settings)
    app.worker_main(worker_argv(plan, loglevel=loglevel, hostname=hostname))
