"""Throughput of MC-dropout inference: the fast Predictor against the reference algorithm.

The reference is SDSS-V astra's ``ApogeeDistBCNN.predict``: for a batch, ``passes`` full forward
passes of the network with dropout on (here :class:`astronn_dist.worker.science.model.ApogeeDistBCNN` in train mode),
then the mean/variance. Both run in the same process, on the same spectra and weights, so the
ratio is meaningful even on a busy machine (the absolute numbers are not).

    python -m bench.bench_inference                 # batches 1, 32, 256; reference at 1, 32, 256
    python -m bench.bench_inference --quick         # fewer spectra, a rough number in seconds
    python -m bench.bench_inference --device cuda --batches 256 1024
    python -m bench.bench_inference --device cuda --batches 4096 --max-rows 4096 16384

Weights are random (throughput does not depend on their values); the spectra are synthetic
normalized fluxes around 1.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bench.table import Row, format_rows
from astronn_dist.worker.devices import resolve_device
from astronn_dist.worker.science.inference import Predictor
from astronn_dist.worker.science.model import ApogeeDistBCNN, LoadedModel


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_rate(net: ApogeeDistBCNN, flux: np.ndarray, batch: int, passes: int,
                   device: torch.device) -> Row:
    """SDSS-V's loop: for each batch, `passes` forward passes with dropout on."""
    net.train()
    n_done = 0
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(flux), batch):
            x = torch.from_numpy(flux[start : start + batch]).to(device)
            runs = [net(x) for _ in range(passes)]
            out = torch.stack([r[0] for r in runs])
            log_var = torch.stack([r[1] for r in runs])
            _ = (out.mean(0), torch.sqrt(torch.exp(log_var.mean(0)) + out.var(0)))
            n_done += len(x)
    _sync(device)
    net.eval()
    return Row("inference", "reference: full forward passes", _conditions(device, batch, passes),
               n_done, time.perf_counter() - t0)


def predictor_rate(pred: Predictor, flux: np.ndarray, batch: int) -> Row:
    """The Predictor over ``flux`` in batches of ``batch`` (a GPU's ``max_rows`` noted)."""
    ids = [f"bench-{i}" for i in range(len(flux))]
    _sync(pred.device)
    t0 = time.perf_counter()
    for start in range(0, len(flux), batch):
        pred.predict(flux[start : start + batch], ids[start : start + batch])
    _sync(pred.device)
    conditions = _conditions(pred.device, batch, pred.mc_passes, pred.threads)
    if pred.device.type == "cuda":
        conditions += f", max_rows {pred.max_rows}"
    return Row("inference", "astronn_dist.worker.science.inference.Predictor", conditions,
               len(flux), time.perf_counter() - t0)


def unit_phases(pred: Predictor, flux: np.ndarray, repeat: int = 20) -> list[Row]:
    """Where one unit's time goes: drawing its spectra's random numbers, and its forward from
    conv2 on, each run ``repeat`` times alone and synchronized; the note gives the host's time
    to queue the work (on a GPU, the launches) beside the time until it is done."""
    first = pred.first_layer(flux)
    unit = pred.schedule.units(len(flux), pred.threads)[0]
    seeds = [i + 1 for i in range(len(flux))]
    with torch.inference_mode():
        spectra, randoms = pred._unit_inputs(first.conv1_out, seeds, unit)
        (p0, p1), n = unit.parts[0], unit.stop - unit.start
        phases = {
            "draws": lambda: pred._unit_inputs(first.conv1_out, seeds, unit),
            "forward": lambda: pred._mc_forward(spectra, *(r[:, p0:p1] for r in randoms),
                                                pass_tile=pred.schedule.pass_tile),
        }
        rows = []
        for name, phase in phases.items():
            phase()
            _sync(pred.device)
            t0 = time.perf_counter()
            for _ in range(repeat):
                phase()
            queued = time.perf_counter() - t0
            _sync(pred.device)
            seconds = time.perf_counter() - t0
            rows.append(Row("unit", f"{name} of one unit ({n} spectra x {p1 - p0} passes)",
                            _conditions(pred.device, n, p1 - p0), n * repeat, seconds,
                            f"{seconds / repeat * 1e3:.2f} ms a unit, "
                            f"{queued / repeat * 1e3:.2f} ms of it to queue"))
    return rows


def _conditions(device: torch.device, batch: int, passes: int, workers: int | None = None) -> str:
    threads = f"{torch.get_num_threads()} torch threads" + (
        f", {workers} CPU workers" if workers and device.type == "cpu" else "")
    return f"{device}, batch {batch}, {passes} passes, {threads}"


def run(batches: Sequence[int] = (1, 32, 256), reference_batches: Sequence[int] = (1, 32, 256),
        passes: int = 100, device: str = "auto", threads: int | None = None,
        min_spectra: int = 256, reference_spectra: int = 128, repeat: int = 2,
        max_rows: Sequence[int | None] = (None,), phases: bool = False) -> list[Row]:
    """Measure; each figure is the best of ``repeat`` runs over at least ``min_spectra``.
    ``max_rows``: the Predictor's GPU group sizes to measure (None: its default); ``phases``:
    add :func:`unit_phases` for each."""
    dev = resolve_device(device)
    torch.manual_seed(0)
    net = ApogeeDistBCNN().to(dev).eval()
    loaded = LoadedModel(net=net, model_id="bench", path=Path("bench.pt"), device=dev)
    rng = np.random.default_rng(0)
    n = max(min_spectra, max(batches), max(reference_batches, default=1))
    flux = 1.0 + 0.05 * rng.standard_normal((n, 7514))
    rows = []
    for rows_per_group in max_rows:
        pred = Predictor(loaded, mc_passes=passes, seed=0, threads=threads, max_rows=rows_per_group)
        pred.warm_up()
        for b in batches:
            rows.append(min((predictor_rate(pred, flux[: max(b, min_spectra)], b)
                             for _ in range(repeat)), key=lambda r: r.seconds))
        if phases:
            rows += unit_phases(pred, flux[: pred.schedule.group])
        pred.close()
    for b in reference_batches:
        m = max(b, min(reference_spectra, n))
        rows.append(min((reference_rate(net, flux[:m], b, passes, dev)
                         for _ in range(max(1, repeat - 1))), key=lambda r: r.seconds))
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
        for r in rows:
            r.extra = "; ".join(filter(None, [r.extra, f"peak GPU memory {peak:,.0f} MiB (whole run)"]))
    return rows


def with_speedup(rows: list[Row]) -> list[Row]:
    """Note on each Predictor row its ratio to the best reference batch size."""
    best = max((r.rate for r in rows if r.method.startswith("reference")), default=float("nan"))
    for r in rows:
        if r.section == "inference" and not r.method.startswith("reference") and best == best:
            r.extra = "; ".join(filter(None, [f"{r.rate / best:.1f}x the best reference", r.extra]))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--passes", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None,
                        help="Predictor CPU workers (default: torch.get_num_threads())")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--reference-batches", type=int, nargs="*", default=[1, 32, 256])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="64 spectra, one run each")
    parser.add_argument("--max-rows", type=int, nargs="+", default=[None],
                        help="GPU: the Predictor's spectrum-passes per group, each measured")
    parser.add_argument("--phases", action="store_true",
                        help="also time a unit's draws and forward apart (unit_phases)")
    args = parser.parse_args(argv)
    n = 64 if args.quick else 256
    rows = run(args.batches, args.reference_batches, args.passes, args.device, args.threads,
               min_spectra=n, reference_spectra=128 if not args.quick else 32,
               repeat=1 if args.quick else args.repeat, max_rows=args.max_rows,
               phases=args.phases)
    print(format_rows(with_speedup(rows)))


if __name__ == "__main__":
    main()
