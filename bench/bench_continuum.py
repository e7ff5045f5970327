"""Throughput of the DR17 continuum normalization: the project's batched ``normalize`` beside
astroNN 1.1.0's ``apogee_continuum`` called spectrum by spectrum (when astroNN is installed).

    python -m bench.bench_continuum [--spectra 512]

The spectra are the coadds of the real DR17 files in samples/apstar, repeated.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bench.table import Row, print_rows
from astronn_dist.worker.science.continuum import continuum_pixels, normalize, normalize_flux
from astronn_dist.worker.science.spectra import read_apstar

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "apstar"


def real_coadds(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` coadds (flux, err, bitmask), each (n, 8575): the sample files, repeated."""
    spectra = [read_apstar(p) for p in sorted(SAMPLES.glob("apStar-*.fits"))]
    pick = [spectra[i % len(spectra)] for i in range(n)]
    return (np.stack([s.flux for s in pick]), np.stack([s.err for s in pick]),
            np.stack([s.bitmask for s in pick]))


def run(n: int = 512, batch: int = 128) -> list[Row]:
    flux, err, bitmask = real_coadds(n)
    rows = []
    normalize(flux[:batch], err[:batch], bitmask[:batch])  # warm up
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        normalize(flux[start:start + batch], err[start:start + batch], bitmask[start:start + batch])
    rows.append(Row("continuum", "astronn_dist.worker.science.continuum.normalize", f"batch {batch}, 1 process",
                    n, time.perf_counter() - t0))
    # What the worker calls: the flux alone, from the error at the continuum pixels (the same
    # normalized flux bit for bit, no normalized error).
    cont_err = np.ascontiguousarray(err[:, continuum_pixels()])
    normalize_flux(flux[:batch], cont_err[:batch], bitmask[:batch])
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        normalize_flux(flux[start:start + batch], cont_err[start:start + batch], bitmask[start:start + batch])
    took = time.perf_counter() - t0
    rows.append(Row("continuum", "astronn_dist.worker.science.continuum.normalize_flux (the worker's)",
                    f"batch {batch}, 1 process", n, took,
                    f"{(rows[-1].seconds - took) / rows[-1].seconds:.0%} less time than normalize"))
    try:
        from astroNN.apogee import apogee_continuum
    except Exception as exc:  # noqa: BLE001 - astroNN (TensorFlow) is the optional reference
        rows.append(Row("continuum", "astroNN apogee_continuum", f"not installed: {exc}", 0, 0.0))
        return rows
    m = min(n, 128)
    apogee_continuum(flux[:1], err[:1], bitmask=bitmask[:1], dr=17)
    t0 = time.perf_counter()
    for i in range(m):
        apogee_continuum(flux[i:i + 1], err[i:i + 1], bitmask=bitmask[i:i + 1], dr=17)
    rows.append(Row("continuum", "astroNN 1.1.0 apogee_continuum", "one spectrum per call",
                    m, time.perf_counter() - t0))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spectra", type=int, default=512)
    args = parser.parse_args(argv)
    print_rows(run(args.spectra))


if __name__ == "__main__":
    main()
