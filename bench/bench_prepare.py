"""Preparation per core: reading an apStar file (each reader option side by side), the DR17
continuum and the network's deterministic first layer (conv1), one thread.

    python -m bench.bench_prepare [--files 200] [--seconds 3]

Readers, each giving row 0 of HDU1-3 and the primary header's K:
  * astropy, plain: ``fits.open(p)[i].data[0]`` (what a user writes first);
  * astropy, memmap: ``fits.open(p, memmap=True, lazy_load_hdus=True)``, rows copied out;
  * astropy, lazy + section: what read_apstar falls back to (``_read_with_astropy``);
  * fitsio (cfitsio), when installed: ``fitsio.FITS(p)[i][0:1, :]``;
  * read_apstar: astronn_dist.worker.science.fastfits for plain well-formed files, the astropy path for the rest;
  * numpy, whole file: ``np.fromfile`` of all its bytes (what the I/O alone costs).
Files: the two real DR17 files and ``--files`` synthetic ones (astronn_dist.worker.modeling.synth, 1-3 visits), page
cache warm. "prepare" = read_apstar + normalize_spectra + conv1 for batches of 32, the work a
preparing process does before the MC passes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from astropy.io import fits

from bench.table import Row, print_rows
from astronn_dist.worker.science import spectra
from astronn_dist.worker.modeling import synth
from astronn_dist.worker.science.pipeline import normalize_spectra

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "apstar"


def _astropy_plain(path: str) -> None:
    with fits.open(path) as hdul:
        hdul[0].header.get("K")
        for i in (1, 2, 3):
            np.array(hdul[i].data[0])


def _astropy_memmap(path: str) -> None:
    with fits.open(path, memmap=True, lazy_load_hdus=True) as hdul:
        hdul[0].header.get("K")
        for i in (1, 2, 3):
            np.array(hdul[i].data[0])


def _fitsio(path: str) -> None:
    import fitsio

    with fitsio.FITS(path) as f:
        f[0].read_header().get("K")
        for i in (1, 2, 3):
            f[i][0:1, :]


def _numpy_whole(path: str) -> None:
    np.fromfile(path, dtype=np.uint8)


def readers() -> list[tuple[str, Callable[[str], object]]]:
    out = [
        ("astropy, plain (fits.open, .data[0])", _astropy_plain),
        ("astropy, memmap + lazy HDUs", _astropy_memmap),
        ("astropy, lazy HDUs + section (read_apstar's fallback)", spectra._read_with_astropy),
    ]
    try:
        import fitsio  # noqa: F401
        out.append(("fitsio 1.x (cfitsio)", _fitsio))
    except ImportError:
        out.append(("fitsio (not installed: pip install fitsio)", None))  # type: ignore[arg-type]
    out += [("read_apstar (astronn_dist.worker.science.fastfits)", spectra.read_apstar),
            ("numpy, whole file (I/O bound)", _numpy_whole)]
    return out


def _rate(fn: Callable[[], int], seconds: float) -> tuple[int, float]:
    fn()  # warm: page cache, imports
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        done += fn()
    return done, time.perf_counter() - t0


def _conv1():
    import torch

    from astronn_dist.worker.config import BUNDLED_MODEL
    from astronn_dist.worker.science.inference import Predictor
    from astronn_dist.worker.science.model import load_model

    torch.set_num_threads(1)
    predictor = Predictor(load_model(BUNDLED_MODEL, device=torch.device("cpu")), mc_passes=2, threads=1)

    return predictor.first_layer  # input mean, conv1, ReLU: as the pipeline's preparing thread


def run(n_files: int = 200, seconds: float = 3.0) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        synth.write_survey(Path(tmp), n_files, seed=11, visits=(1, 3))
        sets = {
            # the two files 32 times each, so that batches are whole here too
            "real DR17 files": [str(p) for p in sorted(SAMPLES.glob("apStar-*.fits"))] * 32,
            f"{n_files} synthetic files": sorted(str(p) for p in (Path(tmp) / "apstar").glob("*.fits")),
        }
        conv1 = _conv1()
        for label, files in sets.items():
            plain = None
            for method, read in readers():
                if read is None:
                    rows.append(Row("prepare", method, label, 0, 0.0))
                    continue
                done, took = _rate(lambda: [read(p) for p in files] and len(files), seconds)
                note = ""
                if method.startswith("astropy, plain"):
                    plain = done / took
                elif plain:
                    note = f"{done / took / plain:.1f}x astropy plain"
                rows.append(Row("read", method, f"{label}, 1 core", done, took, note))

            def prepare() -> int:
                for start in range(0, len(files), 32):
                    part = [spectra.read_apstar(p) for p in files[start:start + 32]]
                    conv1(normalize_spectra(part))  # as the worker's pipeline does
                return len(files)

            done, took = _rate(prepare, seconds)
            rows.append(Row("prepare", "read_apstar + normalize_spectra + conv1", f"{label}, batches of 32, 1 core",
                            done, took, f"{done / took / plain:.1f}x astropy plain" if plain else ""))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    print_rows(run(args.files, args.seconds))


if __name__ == "__main__":
    main()
