"""astronn_dist.worker.service.local: the main job without a broker, in processes planned as a worker's pool.

The process structure is the same on the CPU as with GPUs (one spawned process per device or
core, each with its own model and database engine); the CPU stands in here.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from _service import build_checkpoint, rows, run_cli, spectra_farm  # tests/ is on sys.path
from astronn_dist.worker.config import Settings
from astronn_dist.worker.service.local import batch_size, plan_local, run_local
from astronn_dist.worker.science.pipeline import SpectrumRequest, process_batch
from astronn_dist.worker.service.results import migrate
from astronn_dist.worker.devices import WorkerPlan

NUMBERS = ("L_fakemag", "L_fakemag_err", "dist", "dist_err", "k_mag", "ebv", "result_flags")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("model") / "random-dr17.pt")


def _requests(apstar_files: list[Path], folder: Path, n: int) -> list[SpectrumRequest]:
    entries = spectra_farm(apstar_files, folder, n, broken=1)
    return [SpectrumRequest(e["spectrum_id"], e["path"], e["k_mag"], e["ebv"]) for e in entries]


def test_two_processes_write_the_rows_one_process_computes(
    model: Path, apstar_files: list[Path], sqlite_url: str, tmp_path: Path
) -> None:
    from astronn_dist.worker.science.inference import Predictor
    from astronn_dist.worker.science.model import load_model

    requests = _requests(apstar_files, tmp_path / "spectra", 11)  # 12 with the broken file
    settings = Settings(database_url=sqlite_url, model_path=model, device="cpu", mc_passes=4)
    migrate(sqlite_url)
    plan = WorkerPlan("cpu", concurrency=2, threads_per_process=1)
    started, counted = [], []
    report = run_local(requests, settings, chunk_size=3, plan=plan, on_start=started.append,
                       on_chunk=lambda outcome: counted.append(outcome.spectra))
    assert len(report.pids) == 2 and os.getpid() not in report.pids  # two spawned processes
    assert len(started) == 1 and started[0].devices == ("cpu",)
    assert sorted(counted) == [3, 3, 3, 3] and sum(o.no_result for o in report.outcomes) == 1

    # The same numbers as the science core gives in one process with the same thread count
    # (torch's intra-op threads too: a product split over two threads rounds differently).
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        direct = {r.spectrum_id: r for r in process_batch(
            requests, Predictor(load_model(model), mc_passes=4, seed=0, threads=1))}
    finally:
        torch.set_num_threads(threads)
    written = {r["spectrum_id"]: r for r in rows(sqlite_url)}
    assert sorted(written) == sorted(direct)
    for sid, record in direct.items():
        for name in NUMBERS:
            want = getattr(record, name)
            got = written[sid][name]
            assert (got is None and want != want) or got == want, (sid, name, got, want)
        assert written[sid]["task_id"].startswith("run-") and written[sid]["device"] == "cpu"


def test_one_chunk_runs_in_this_process(
    model: Path, apstar_files: list[Path], sqlite_url: str, tmp_path: Path
) -> None:
    requests = _requests(apstar_files, tmp_path / "spectra", 3)
    settings = Settings(database_url=sqlite_url, model_path=model, device="cpu", mc_passes=2)
    migrate(sqlite_url)
    report = run_local(requests, settings, chunk_size=10, plan=WorkerPlan("cpu", 4, 1))
    assert report.pids == {os.getpid()} and len(rows(sqlite_url)) == 4


def test_plan_is_the_workers(model: Path) -> None:
    settings = Settings(model_path=model, device="cpu")
    assert plan_local(settings, 3) == WorkerPlan("cpu", 3, max(1, len(os.sched_getaffinity(0)) // 3))
    with pytest.raises(ValueError, match="no CUDA device"):
        plan_local(Settings(model_path=model, device="cuda"), None)


def test_run_command_uses_the_processes(
    capsys: pytest.CaptureFixture, model: Path, apstar_files: list[Path], sqlite_url: str,
    tmp_path: Path,
) -> None:
    paths = [e["path"] for e in spectra_farm(apstar_files, tmp_path / "spectra", 8)]
    code, out, err = run_cli(capsys, "run", *paths, "--model", str(model), "--db", sqlite_url,
                             "--mc-passes", "2", "--chunk-size", "2", "--processes", "2",
                             "--device", "cpu")
    assert code == 0, out + err
    assert "2 processes x 1 thread" in out and "8 spectra processed in this run" in out
    assert "spectra/s once loaded" in out and len(rows(sqlite_url)) == 8


def test_status_and_export_say_how_rows_were_computed(
    capsys: pytest.CaptureFixture, model: Path, apstar_files: list[Path], sqlite_url: str,
    redis_url: str, tmp_path: Path,
) -> None:
    from astropy.table import Table

    def cli(*args: str) -> str:
        code, out, err = run_cli(capsys, *args)
        assert code == 0, out + err
        return out

    cli("run", *map(str, apstar_files), "--model", str(model), "--db", sqlite_url, "--mc-passes", "2")
    out = cli("status", "--broker", redis_url, "--db", sqlite_url)
    assert "computed on cpu, masks from numpy-SFC64: 2 rows" in out
    cli("export", str(tmp_path / "rows.csv"), "--db", sqlite_url, "--model", str(model))
    table = Table.read(tmp_path / "rows.csv")
    assert list(table["device"]) == ["cpu", "cpu"] and set(table["mask_rng"]) == {"numpy-SFC64"}


def test_a_bad_checkpoint_in_the_processes_is_one_line(
    capsys: pytest.CaptureFixture, model: Path, apstar_files: list[Path], sqlite_url: str,
    tmp_path: Path,
) -> None:
    """The processes' model loading fails: the parent says why, in one line, exit 2 (not a
    broken pool's traceback)."""
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(model.read_bytes()[:1000])
    paths = [e["path"] for e in spectra_farm(apstar_files, tmp_path / "spectra", 4)]
    code, out, err = run_cli(capsys, "run", *paths, "--model", str(corrupt), "--db", sqlite_url,
                             "--chunk-size", "1", "--processes", "2", "--device", "cpu")
    assert code == 2 and str(corrupt) in err and "Traceback" not in err + out, out + err
    assert len(err.strip().splitlines()) == 1, err


def test_run_on_an_in_memory_database(capsys: pytest.CaptureFixture, model: Path, apstar_files: list[Path]) -> None:
    code, out, err = run_cli(capsys, "run", *map(str, apstar_files), "--model", str(model),
                             "--db", "sqlite://", "--mc-passes", "2")
    assert code == 0 and "2 spectra processed in this run" in out, out + err


def test_batch_size_gives_each_process_about_four_batches_of_128_to_512():
    assert batch_size(2000, 2) == 250  # 8 batches
    assert batch_size(100, 2) == 128  # a small job: one batch of at least 128
    assert batch_size(0, 1) == 128
    assert batch_size(10**6, 16) == batch_size(10**6, 0) == 512  # a survey: the largest
    assert batch_size(5000, 4) == 313
