"""astronn_dist.worker.devices: device specs, the plan of processes and threads, and which
device each process takes."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from astronn_dist.worker.devices import (
    check_spec,
    device_for_process,
    device_of_process,
    gpu_works,
    plan_here,
    parse_gpu_probe,
    plan_worker,
    resolve_device,
    usable_cores,
)


def test_check_spec():
    assert [check_spec(s) for s in (None, "", " Auto ", "CPU", "cuda", "cuda:3")] == [
        "auto", "auto", "auto", "cpu", "cuda", "cuda:3"
    ]
    for bad in ("gpu", "cuda:x", "cuda:", "mps", "cpu,cuda"):
        with pytest.raises(ValueError, match="expected 'auto', 'cpu', 'cuda' or 'cuda:N'"):
            check_spec(bad)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    want = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == want
    assert resolve_device() == want
    with pytest.raises(ValueError, match="expected 'auto'"):
        resolve_device("gpu please")
    with pytest.raises(ValueError, match="expected 'auto'"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")
    else:
        assert resolve_device("cuda") == torch.device("cuda", 0)
        with pytest.raises(ValueError, match="visible"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_device_for_process() -> None:
    assert [device_for_process("cuda:0,cuda:1", i, 2) for i in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert [device_for_process("cuda", i, 4) for i in range(5)] == [f"cuda:{i % 4}" for i in range(5)]
    assert device_for_process("auto", 3, 0) == "auto"
    assert device_for_process("cuda:2", 5, 4) == "cuda:2"
    assert device_for_process("cpu", 1, 8) == "cpu"


def test_plan_worker() -> None:
    cpu = plan_worker("auto", None, n_gpus=0, cores=16)  # a process per core, at most 8
    assert (cpu.device, cpu.concurrency, cpu.threads_per_process) == ("cpu", 8, 2)
    two = plan_worker("cpu", None, n_gpus=0, cores=2)
    assert (two.concurrency, two.threads_per_process) == (2, 1)
    assert plan_worker("cpu", None, n_gpus=0, cores=1).concurrency == 1
    assert plan_worker("cpu", 4, n_gpus=2, cores=16).threads_per_process == 4
    assert plan_worker("cpu", 32, n_gpus=0, cores=16).threads_per_process == 1
    # GPUs: the cores prepare, several processes per GPU share it (one per core, at most 16,
    # and GPU_GIB_PER_PROCESS of the smallest GPU's memory each).
    gpus = plan_worker("auto", None, n_gpus=4, cores=16)
    assert (gpus.device, gpus.concurrency, gpus.threads_per_process) == (
        "cuda:0,cuda:1,cuda:2,cuda:3", 16, 1
    )
    h200 = plan_worker("auto", None, n_gpus=1, cores=16, gpu_gib=139.8)
    assert (h200.device, h200.concurrency, h200.threads_per_process) == ("cuda:0", 16, 1)
    assert plan_worker("auto", None, n_gpus=1, cores=64, gpu_gib=139.8).concurrency == 16
    small = plan_worker("cuda", None, n_gpus=2, cores=32, gpu_gib=16.0)  # 5 per 16 GiB GPU
    assert (small.concurrency, small.threads_per_process) == (10, 3)
    assert plan_worker("cuda", None, n_gpus=1, cores=8, gpu_gib=2.0).concurrency == 1
    assert plan_worker("cuda", 3, n_gpus=2, cores=16).concurrency == 3
    one = plan_worker("cuda:1", None, n_gpus=2, cores=8)
    assert (one.device, one.concurrency) == ("cuda:1", 8)
    assert plan_worker("cuda:1", None, n_gpus=2, cores=8, gpu_gib=16.0).concurrency == 5
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        plan_worker("cuda", None, n_gpus=0, cores=4)
    with pytest.raises(ValueError, match="only 2 CUDA device"):
        plan_worker("cuda:2", None, n_gpus=2, cores=4)
    with pytest.raises(ValueError, match="at least 1"):
        plan_worker("cpu", 0, n_gpus=0, cores=4)


def test_plan_here_and_the_process_devices_on_this_machine():
    """The machine's own plan: its usable cores, and on a machine without a GPU the CPU
    whatever the spec's ``auto``; each process of it resolves its device."""
    plan = plan_here("auto", None)
    if not torch.cuda.is_available():
        assert plan.device == "cpu" and plan.concurrency == min(usable_cores(), 8)
        assert device_of_process(plan.device, 1) == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device is visible"):
            plan_here("cuda", None)
    with pytest.raises(ValueError, match="expected 'auto'"):
        plan_here("gpu", 2)


def test_importing_devices_loads_no_torch():
    """The worker's planning parent must not touch CUDA before it forks its pool."""
    code = "import sys, astronn_dist.worker.devices; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_parse_gpu_probe_keeps_the_count_when_the_memory_is_missing():
    assert parse_gpu_probe("2\n139.8\n") == (2, 139.8)
    assert parse_gpu_probe("0\n") == (0, None)  # no GPU: the memory line fails, as it should
    assert parse_gpu_probe("1\n") == (1, None)  # the memory query failed: the GPU still counts
    with pytest.raises(ValueError):
        parse_gpu_probe("")  # torch would not even import: no count (probe_gpus says 0)


def test_gpu_works_is_false_where_no_gpu_runs():
    # A CPU has no CUDA context to synchronize: "not a working GPU", never an exception.
    assert gpu_works(torch.device("cpu")) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_works_on_a_working_gpu():
    assert gpu_works(torch.device("cuda", 0)) is True


def test_worker_state_on_the_cpu_never_reports_a_failed_device(tmp_path):
    from astronn_dist.worker.config import BUNDLED_MODEL, Settings
    from astronn_dist.worker.service.state import WorkerState

    state = WorkerState(Settings(model_path=BUNDLED_MODEL, device="cpu", mc_passes=2,
                                 database_url=f"sqlite:///{tmp_path / 'r.sqlite'}"))
    assert state.device_failed() is False  # no model loaded yet
    assert str(state.predictor().device) == "cpu"
    assert state.device_failed() is False
