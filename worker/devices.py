"""Devices in one place: what a device spec names (check, resolve), how a machine is divided
into processes and threads (plan), and which device each process takes (assign).

A device spec is ``auto`` (CUDA when there is a GPU, else the CPU), ``cpu``, ``cuda`` (every
GPU) or ``cuda:N``. The worker (``astronn-dist worker``), ``astronn-dist run`` and the Python
API all go through here. Importing this module never imports torch: the planning parent of a
worker must not touch CUDA (a CUDA context does not survive fork), so it counts GPUs in a
subprocess (:func:`probe_gpus`); only :func:`resolve_device`, :func:`device_of_process` and
:func:`gpu_works`, which run where the model lives, import torch.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# GPU processes: one per core, because each prepares its own chunks on its core while the GPU
# infers (on an H200 with 16 cores, `run` end to end at 100 passes: 4 processes 4,900
# spectra/s, 8 8,100, 16 10,800; BENCHMARKS.md, 2026-12-04). Each holds a CUDA context and its
# units (~2 GB measured at 16 processes), so a GPU with less memory takes fewer.
MAX_PROCESSES_PER_GPU = 16
GPU_GIB_PER_PROCESS = 3.0
MAX_CPU_PROCESSES = 8  # default CPU pool size cap (each process holds a model: ~0.4 GB)

_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_spec(spec: str | None) -> str:
    """``spec`` normalized (stripped, lower case; None or empty: ``auto``), before anything is
    loaded. Raises ValueError for a name that is not a device spec."""
    text = (spec or "auto").strip().lower()
    if not _SPEC.fullmatch(text):
        raise ValueError(f"device {spec!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return text


# -------------------------------------------------------------------------------------- resolve


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device of a spec on this machine: ``auto`` is ``cuda:0`` when CUDA is
    available, else the CPU; ``cuda`` is ``cuda:0``.

    Raises:
        ValueError: not a device spec, or CUDA asked for where this machine/build has none, or
            a GPU index that is not visible.
    """
    import torch

    text = check_spec(spec)
    if text == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {spec!r}: CUDA is not available here; use 'cpu' or 'auto'")
    index = int(text.split(":", 1)[1]) if ":" in text else 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", index)


# ----------------------------------------------------------------------------------------- plan


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask, e.g. a container's or a SLURM job's
    allocation, rather than the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def probe_gpus(timeout_s: float = 120.0, *, probe: bool = False) -> tuple[int, float | None]:
    """(number of CUDA devices torch sees, the smallest one's memory in GiB), asked in a
    subprocess so this process never initializes CUDA (it will fork the pool). (0, None) when
    torch has no CUDA or the probe fails. Without a GPU device node the answer is (0, None) at
    once, unless ``probe`` (CUDA asked for by name: a sandbox may expose the GPU without the
    usual nodes, and torch is then the one to ask)."""
    if not probe and not (glob.glob("/dev/nvidia[0-9]*") or any(map(os.path.exists, ("/dev/kfd", "/dev/dxg")))):
        return 0, None  # no GPU device node (NVIDIA, ROCm's, WSL2's): skip the 2-3 s torch import
    # The count first, on a line of its own: a failing memory query must not hide the GPUs.
    code = ("import torch\n"
            "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
            "print(n, flush=True)\n"
            "print(min(torch.cuda.get_device_properties(i).total_memory for i in range(n)) / 2**30)")
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )
        return parse_gpu_probe(out.stdout)
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        log.warning("could not count CUDA devices (%s); assuming none", exc)
        return 0, None


def parse_gpu_probe(stdout: str) -> tuple[int, float | None]:
    """(count, smallest memory in GiB or None) from :func:`probe_gpus`' subprocess output: a
    line with the count, then (when there are GPUs and their memory could be read) a line
    with the memory. Raises ValueError when there is no count."""
    lines = stdout.split()
    if not lines:
        raise ValueError("no GPU count in the probe's output")
    count = int(lines[0])
    try:
        gib = float(lines[1]) if count > 0 else None
    except (IndexError, ValueError):
        gib = None
    return count, gib


@dataclass(frozen=True)
class WorkerPlan:
    """How to run: the device spec each process resolves (``cuda:0,cuda:1`` = process i takes
    item i), the number of processes, and torch threads per process."""

    device: str
    concurrency: int
    threads_per_process: int


def plan_worker(device: str, concurrency: int | None, *, n_gpus: int, cores: int,
                gpu_gib: float | None = None) -> WorkerPlan:
    """Choose device assignment, process count and threads (pure; see
    :mod:`astronn_dist.worker.service.serve` for why one process per core). ``gpu_gib``: the
    smallest GPU's memory, which bounds the processes per GPU (GPU_GIB_PER_PROCESS each).

    Raises:
        ValueError: not a device spec, a CUDA device asked for that is not there, or
            concurrency < 1.
    """
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"--concurrency must be at least 1, got {concurrency}")
    spec = check_spec(device)
    if spec == "auto":
        spec = "cuda" if n_gpus > 0 else "cpu"
    per_gpu = MAX_PROCESSES_PER_GPU
    if gpu_gib is not None:
        per_gpu = max(1, min(per_gpu, int(gpu_gib // GPU_GIB_PER_PROCESS)))
    if spec == "cuda":
        if n_gpus < 1:
            raise ValueError("--device cuda: no CUDA device is visible (use --device cpu or auto)")
        n = concurrency or n_gpus * max(1, min(cores // n_gpus, per_gpu))
        devices = ",".join(f"cuda:{i}" for i in range(n_gpus))
        return WorkerPlan(devices, n, max(1, cores // n))
    if spec.startswith("cuda:"):
        index = int(spec.split(":", 1)[1])
        if index >= n_gpus:
            raise ValueError(
                f"--device {device}: only {n_gpus} CUDA device(s) visible "
                f"(cuda:0..cuda:{n_gpus - 1})"
                if n_gpus else f"--device {device}: no CUDA device is visible"
            )
        n = concurrency or max(1, min(cores, per_gpu))
        return WorkerPlan(spec, n, max(1, cores // n))
    n = concurrency or max(1, min(cores, MAX_CPU_PROCESSES))
    return WorkerPlan(spec, n, max(1, cores // n))


def plan_here(device: str | None, concurrency: int | None) -> WorkerPlan:
    """:func:`plan_worker` for this machine: its usable cores, and its GPUs when the spec may
    use one (counted in a subprocess)."""
    spec = check_spec(device)
    n_gpus, gpu_gib = 0, None
    if spec == "auto" or spec.startswith("cuda"):
        n_gpus, gpu_gib = probe_gpus(probe=spec.startswith("cuda"))
    return plan_worker(spec, concurrency, n_gpus=n_gpus, cores=usable_cores(), gpu_gib=gpu_gib)


# --------------------------------------------------------------------------------------- assign


def device_for_process(spec: str, index: int, n_gpus: int) -> str:
    """The device spec of process ``index`` of a plan (pure).

    ``spec`` may be a comma-separated list (a plan's ``cuda:0,cuda:1``): process i takes item
    ``i % len``. ``cuda`` or ``auto`` with several GPUs: process i takes ``cuda:{i % n_gpus}``,
    so ``-c N`` with N GPUs gives one process per GPU.
    """
    items = [s.strip() for s in spec.split(",") if s.strip()] or ["auto"]
    chosen = items[index % len(items)]
    if chosen in ("auto", "cuda") and n_gpus > 1:
        return f"cuda:{index % n_gpus}"
    return chosen


def device_of_process(spec: str, index: int) -> torch.device:
    """The torch device process ``index`` of a plan takes, resolved in that process (which may
    open CUDA: it is where the model lives)."""
    n_gpus = 0
    if "cuda" in spec or spec.strip() == "auto":
        import torch

        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return resolve_device(device_for_process(spec, index, n_gpus))


# --------------------------------------------------------------------------------------- health


def gpu_works(device: torch.device) -> bool:
    """Whether ``device`` (a GPU) still runs work in this process: False after a fatal CUDA
    error (an illegal memory access, a hardware fault reported as an Xid), which leaves the
    process's CUDA context unusable, so that every later call fails too. A recoverable error
    (running out of memory) leaves it working."""
    import torch

    try:
        torch.cuda.synchronize(device)
        return bool(torch.ones(1, device=device).add_(1).item() == 2.0)
    except Exception:  # noqa: BLE001 - whatever the error, the GPU does not work here
        return False
