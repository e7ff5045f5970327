"""The Python API for notebooks: spectra in, an astropy Table of distances out.

    >>> from astronn_dist.worker.api import distances
    >>> table = distances(["samples/apstar/apStar-dr17-2M19485057+5005279.fits"],
    ...                   k_mag=[10.522], ebv=[0.1927])
    >>> table["spectrum_id", "dist", "dist_err", "flag_bad"]

It runs the service's own code path (:func:`astronn_dist.worker.science.pipeline.process_batch`: reading, DR17
continuum, MC dropout, distance and flags), so its numbers equal the rows a worker writes for the
same spectrum_id, model, MC passes, seed and kind of device. Nothing is written anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.table import Table

from astronn_dist.worker.config import BUNDLED_MODEL, DEFAULT_MC_PASSES, DEFAULT_SEED
from astronn_dist.worker.contract import FLAG_NAMES
from astronn_dist.worker.science.pipeline import ResultRecord, SpectrumRequest, process_batch

UNITS = {
    "k_mag": u.mag, "ebv": u.mag, "a_k_mag": u.mag,
    "dist": u.pc, "dist_err": u.pc, "t_elapsed": u.s,
}
"""Units of the physical columns; L_fakemag and L_fakemag_err are in fakemag units
(fakemag = 10^(0.2 M_Ks + 2), a luminosity: dimensionless)."""

_DESCRIPTIONS = {
    "k_mag": "2MASS Ks used (0 if missing, see result_flags)",
    "ebv": "E(B-V) used (0 if missing, see result_flags)",
    "a_k_mag": "Ks extinction A_K = 0.3517 E(B-V)",
    "L_fakemag": "fakemag = 10^(0.2 M_Ks + 2), MC-dropout mean",
    "L_fakemag_err": "total fakemag uncertainty (predictive and MC)",
    "dist": "distance", "dist_err": "distance uncertainty",
    "t_elapsed": "processing time per spectrum",
}


def _per_spectrum(name: str, values: Sequence[float | None] | float | None, n: int) -> list[float | None]:
    if values is None or np.isscalar(values):
        return [values] * n  # type: ignore[list-item]
    values = list(values)  # type: ignore[arg-type]
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values for {n} paths: give one per path (None: header)")
    return [None if v is None or not np.isfinite(v) else float(v) for v in values]


def distances(
    paths: Sequence[str | Path],
    k_mag: Sequence[float | None] | None = None,
    ebv: Sequence[float | None] | None = None,
    *,
    spectrum_ids: Sequence[str] | None = None,
    model: str | Path | None = None,
    mc_passes: int = DEFAULT_MC_PASSES,
    seed: int = DEFAULT_SEED,
    device: str = "auto",
) -> Table:
    """Distances of apStar spectra, one table row per path, in order.

    Args:
        paths: apStar files (.fits or .fits.gz).
        k_mag: 2MASS Ks [mag] per path; None (or NaN) for a path means the apStar header's ``K``.
        ebv: E(B-V) [mag] per path; None (or NaN) means the header's ``SFD_EBV``.
        spectrum_ids: identities (default: the paths as given); with ``seed`` they fix each
            spectrum's dropout masks, so a spectrum keeps its numbers in any batch.
        model: a checkpoint (``{"model_state_dict": ...}``; default: the bundled demonstration
            model, which is not for science).
        mc_passes: MC-dropout passes (>= 2).
        seed: global seed of the dropout masks.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        An astropy Table with the columns of the results table ``astro_nn_dist`` (units on
        k_mag, ebv, a_k_mag [mag], dist, dist_err [pc], t_elapsed [s]; NaN where there is no
        value), ``result_flags`` with one boolean column per flag bit, and ``error`` (empty
        unless the spectrum could not be processed: then flag_no_result is set). Its ``meta``
        holds the model id, MC passes, seed and device.

    Raises:
        ValueError: lengths that do not match, a bad device or ``mc_passes``.
        astronn_dist.worker.science.model.CheckpointError: the checkpoint cannot be loaded.
    """
    from astronn_dist.worker.devices import resolve_device
    from astronn_dist.worker.science.inference import Predictor
    from astronn_dist.worker.science.model import load_model

    names = [str(p) for p in paths]
    ids = [str(s) for s in spectrum_ids] if spectrum_ids is not None else names
    if len(ids) != len(names):
        raise ValueError(f"{len(ids)} spectrum_ids for {len(names)} paths")
    if len(set(ids)) != len(ids):
        raise ValueError("spectrum_ids must be distinct (they seed each spectrum's masks)")
    ks, ebvs = _per_spectrum("k_mag", k_mag, len(names)), _per_spectrum("ebv", ebv, len(names))
    requests = [SpectrumRequest(i, p, k_mag=k, ebv=e) for i, p, k, e in zip(ids, names, ks, ebvs)]

    loaded = load_model(Path(model) if model is not None else BUNDLED_MODEL, device=resolve_device(device))
    predictor = Predictor(loaded, mc_passes=mc_passes, seed=seed)
    try:
        records = process_batch(requests, predictor) if requests else []
    finally:
        predictor.close()
    return results_table(records, meta={
        "model_id": loaded.model_id, "mc_passes": predictor.mc_passes, "seed": predictor.seed,
        "device": str(loaded.device),
    })


def results_table(records: Sequence[ResultRecord], meta: dict | None = None) -> Table:
    """Records as an astropy Table with units and one boolean column per flag bit."""
    fields = list(ResultRecord.__dataclass_fields__)
    columns = {name: [getattr(r, name) for r in records] for name in fields}
    columns["error"] = [e or "" for e in columns["error"]]
    table = Table(meta=dict(meta or {}))
    for name in fields:
        values = columns[name]
        if name in UNITS or name in ("L_fakemag", "L_fakemag_err"):
            table[name] = np.asarray(values, dtype=np.float64)
            table[name].unit = UNITS.get(name)
            table[name].description = _DESCRIPTIONS[name]
        elif name in ("flag_warn", "flag_bad"):
            table[name] = np.asarray(values, dtype=bool)
        elif name in ("result_flags", "mc_passes", "seed"):
            table[name] = np.asarray(values, dtype=np.int64)
        else:
            table[name] = np.asarray(values, dtype=str) if values else np.asarray([], dtype=str)
    flags = np.asarray(columns["result_flags"], dtype=np.int64)
    for bit, name in FLAG_NAMES.items():
        table[name] = (flags & bit) != 0
    return table
