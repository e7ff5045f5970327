"""The main job, ``astronn-dist run``, end to end beside what bounds it, in the same run:
plain astropy reading of the same files, the predictor's fixed cost per spectrum (2 MC passes),
and the reference algorithm's inference (SDSS-V's: full forward passes with dropout on).

    python -m bench.bench_run [--spectra 2000] [--files 200]

The spectra are ``--files`` synthetic apStar files (astronn_dist.worker.modeling.synth), each listed several times in
a catalog under distinct spectrum_ids (the masks differ by id). ``run`` is a subprocess with its
default plan (one process per core); its rate is taken once the model is loaded (its summary
line), and the wall clock with start-up is noted beside it.
"""

from __future__ import annotations

import argparse
import csv
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.bench_prepare import _astropy_plain, _rate
from bench.table import Row, print_rows
from astronn_dist.worker.modeling import synth
def _catalog(work: Path, n_files: int, n_spectra: int) -> tuple[Path, list[str]]:
    synth.write_survey(work, n_files, seed=13, visits=(1, 2))
    files = sorted(str(p) for p in (work / "apstar").glob("*.fits"))
    catalog = work / "many.csv"
    with open(catalog, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["path", "spectrum_id"])
        for i in range(n_spectra):
            out.writerow([files[i % len(files)], f"copy-{i:07d}"])
    return catalog, files


def _run(catalog: Path, db: Path, passes: int) -> tuple[float, float, str]:
    """(spectra/s once loaded, wall seconds, the plan line) of one ``astronn-dist run``."""
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "astronn_dist.producer.cli", "run", "--catalog", str(catalog), "--db",
         f"sqlite:///{db}", "--mc-passes", str(passes), "--device", "cpu"],
        capture_output=True, text=True, check=True,
    ).stdout
    wall = time.perf_counter() - t0
    rate = re.search(r"([\d,]+) spectra/s once loaded", out)
    plan = re.search(r"(\d+ process(?:es)? x \d+ threads?)", out)
    return float(rate.group(1).replace(",", "")) if rate else float("nan"), wall, plan.group(1) if plan else "?"


def _predictor_fixed_cost(spectra: int = 256) -> Row:
    """Predictor at 2 MC passes, one thread: what a spectrum costs beyond its passes."""
    import torch

    from astronn_dist.worker.config import BUNDLED_MODEL
    from astronn_dist.worker.science.inference import Predictor
    from astronn_dist.worker.science.model import load_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pred = Predictor(load_model(BUNDLED_MODEL), mc_passes=2, seed=0, threads=1)
        flux = 1.0 + 0.05 * np.random.default_rng(0).standard_normal((spectra, 7514))
        ids = [f"s{i}" for i in range(spectra)]
        pred.warm_up()
        t0 = time.perf_counter()
        pred.predict(flux, ids)
        took = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return Row("predictor", "Predictor, 2 MC passes", f"cpu, batch {spectra}, 1 thread", spectra, took,
               f"{took / spectra * 1e3:.2f} ms per spectrum")


def _reference_rate(passes: int = 100, spectra: int = 64) -> Row:
    import torch

    from bench.bench_inference import reference_rate
    from astronn_dist.worker.science.model import ApogeeDistBCNN

    torch.manual_seed(0)
    flux = 1.0 + 0.05 * np.random.default_rng(0).standard_normal((spectra, 7514))
    return reference_rate(ApogeeDistBCNN().eval(), flux, 32, passes, torch.device("cpu"))


def run(n_spectra: int = 2000, n_files: int = 200) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        catalog, files = _catalog(work, n_files, n_spectra)
        done, took = _rate(lambda: [_astropy_plain(p) for p in files] and len(files), 3.0)
        plain = done / took
        rows.append(Row("run", "astropy, plain reading of the same files", "1 core", done, took))
        rows.append(_predictor_fixed_cost())
        reference = _reference_rate()
        rows.append(reference)
        for passes in (2, 100):
            rate, wall, plan = _run(catalog, work / f"run{passes}.sqlite", passes)
            ratio = (f"{rate / plain:.1f}x astropy plain reading" if passes == 2
                     else f"{rate / reference.rate:.1f}x the reference inference")
            rows.append(Row("run", f"astronn-dist run, {passes} MC passes",
                            f"{plan}, once the model is loaded", n_spectra, n_spectra / rate,
                            f"{ratio}; {wall:.1f} s wall clock with start-up"))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spectra", type=int, default=2000)
    parser.add_argument("--files", type=int, default=200)
    args = parser.parse_args(argv)
    print_rows(run(args.spectra, args.files))


if __name__ == "__main__":
    main()
