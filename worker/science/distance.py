"""Extinction, fakemag -> parsec, and the result flags (pure numpy; no torch, no astropy).

This is the last science stage: the network's fakemag (a Ks-band luminosity,
``fakemag = 10^(0.2 M_Ks + 2)``) and each star's own 2MASS Ks and E(B-V) become a distance.
The numbers are those of astroNN 1.1.0 (``astroNN.gaia.extinction_correction`` followed by
``astroNN.gaia.fakemag_to_pc``) with astroNN's magic number -9999 replaced by NaN:

    A_K      = 0.3517 * E(B-V)                                        [mag]
    Ks_0     = Ks - A_K                                                [mag]
    dist     = 1000 * 10^(0.2 * Ks_0) / fakemag                        [pc]
    dist_err = (fakemag_err / fakemag) * dist                          [pc]

Photometry validation (DESIGN.md, "Photometry"): Ks is missing when it is not finite,
``<= -1`` or ``>= 98`` (this catches astroNN/APOGEE's -9999.99 and 2MASS's 99 sentinels);
E(B-V) is missing when it is not finite, ``<= 0`` or ``>= 98``. A missing value is replaced by
0 for the computation (so a star without extinction gets the uncorrected distance, and one
without Ks gets a distance that is only a placeholder) and the flags say so.

Decisions where the design leaves room (all tested in tests/test_distance.py):

* fakemag that is non-positive or not finite gives NaN ``dist`` and ``dist_err`` (astroNN gives
  -9999 for non-positive/NaN; for +inf it would give 0 pc, which is not a distance).
* ``dist > 1e10`` pc gives NaN ``dist``; ``dist_err > 1e10`` pc, or a NaN ``dist``, gives NaN
  ``dist_err`` (an error without a value means nothing). A huge error alone keeps the distance;
  bit 0 marks such a star anyway, since ``dist_err > dist`` implies ``fakemag_err > fakemag``.
* Bit 0 (fakemag unreliable) is set when ``fakemag_err >= 0.2 * fakemag`` and also whenever
  that test cannot be made honestly: fakemag non-positive or not finite, or fakemag_err not
  finite (a NaN comparison is False, which would otherwise call a NaN prediction reliable).
* Bit 11 (no result) is set here when fakemag is not finite: the network gave no number, which
  is "could not be processed". Rows for spectra that never reached the network are built by
  the pipeline, which uses :func:`flags_summary` for their summary flags.

Every star uses its own photometry: all inputs must have the same shape (N,); a scalar Ks is not
broadcast over a batch (SDSS-V's astronn_dist used the first star's photometry for the whole
batch; shapes are checked so that cannot happen here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

# The flag bits, their names and the warn/bad masks are contracts (DESIGN.md, "Flags").
from astronn_dist.worker.contract import (  # re-exported: the science core's names
    BAD_MASK,
    FLAG_FAKEMAG_UNRELIABLE,
    FLAG_MISSING_EXTINCTION,
    FLAG_MISSING_PHOTOMETRY,
    FLAG_NO_RESULT,
    WARN_MASK,
)

A_K_PER_EBV = 0.3517
"""A_Ks / E(B-V) for the 2MASS Ks band (the SDSS-V astronn_dist pipeline's coefficient)."""

UNRELIABLE_FRACTION = 0.2
"""fakemag_err / fakemag at or above which the prediction is flagged unreliable."""

MAX_DISTANCE_PC = 1e10
"""Distances and errors above this (parsec) are numerical garbage and become NaN."""

# Validity windows of the photometry (DESIGN.md): strictly inside (low, high).
K_MAG_RANGE = (-1.0, 98.0)
EBV_RANGE = (0.0, 98.0)


@dataclass(frozen=True)
class DistanceResult:
    """Distances of N stars; every field is an array of shape (N,).

    k_mag, ebv, a_k_mag: the values used, in magnitudes (a missing Ks or E(B-V) is 0 here).
    dist, dist_err: parsec; NaN where there is no meaningful distance.
    result_flags: int64 bit field (FLAG_*). flag_warn, flag_bad: bool summaries.
    """

    k_mag: np.ndarray
    ebv: np.ndarray
    a_k_mag: np.ndarray
    dist: np.ndarray
    dist_err: np.ndarray
    result_flags: np.ndarray
    flag_warn: np.ndarray
    flag_bad: np.ndarray

    def __len__(self) -> int:
        return int(self.dist.shape[0])


def _as_float_array(name: str, values: ArrayLike) -> np.ndarray:
    """float64 1-D array; None entries (e.g. from JSON null) become NaN."""
    arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per star), got shape {arr.shape}")
    return arr


def validate_photometry(k_mag: ArrayLike, ebv: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Which Ks and E(B-V) values are missing: two bool arrays of shape (N,)."""
    k = _as_float_array("k_mag", k_mag)
    e = _as_float_array("ebv", ebv)
    with np.errstate(invalid="ignore"):
        k_missing = ~np.isfinite(k) | (k <= K_MAG_RANGE[0]) | (k >= K_MAG_RANGE[1])
        ebv_missing = ~np.isfinite(e) | (e <= EBV_RANGE[0]) | (e >= EBV_RANGE[1])
    return k_missing, ebv_missing


def flags_summary(result_flags: Any) -> tuple[Any, Any]:
    """(flag_warn, flag_bad) of a result_flags value or array (bool, or bool arrays).

    flag_warn = missing extinction; flag_bad = fakemag unreliable | missing Ks | no result.
    """
    flags = np.asarray(result_flags, dtype=np.int64)
    warn = (flags & WARN_MASK) != 0
    bad = (flags & BAD_MASK) != 0
    if flags.ndim == 0:
        return bool(warn), bool(bad)
    return warn, bad


def compute_distances(
    fakemag: ArrayLike, fakemag_err: ArrayLike, k_mag: ArrayLike, ebv: ArrayLike
) -> DistanceResult:
    """Distances and flags of N stars from their predictions and their own photometry.

    Args:
        fakemag: (N,) predicted Ks luminosity, fakemag units (10^(0.2 M_Ks + 2)).
        fakemag_err: (N,) its 1-sigma uncertainty, same units.
        k_mag: (N,) apparent 2MASS Ks [mag]; NaN/None/sentinels mean missing.
        ebv: (N,) E(B-V) [mag]; NaN/None/non-positive/sentinels mean missing.

    Returns:
        DistanceResult of N stars (see the module docstring for every rule).

    Raises:
        ValueError: the four inputs do not have one and the same shape (N,).
    """
    fm = _as_float_array("fakemag", fakemag)
    fm_err = _as_float_array("fakemag_err", fakemag_err)
    k = _as_float_array("k_mag", k_mag)
    e = _as_float_array("ebv", ebv)
    shapes = {"fakemag": fm.shape, "fakemag_err": fm_err.shape, "k_mag": k.shape, "ebv": e.shape}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"one value per star is required for every input, got shapes {shapes}")

    k_missing, ebv_missing = validate_photometry(k, e)
    k_used = np.where(k_missing, 0.0, k)
    ebv_used = np.where(ebv_missing, 0.0, e)
    a_k = A_K_PER_EBV * ebv_used
    k_corrected = k_used - a_k  # astroNN extinction_correction; A_K >= 0 and Ks finite here

    fm_finite = np.isfinite(fm)
    with np.errstate(invalid="ignore"):
        fm_usable = fm_finite & (fm > 0.0)
    # Divide only where fakemag is usable (no warnings, no inf/0 leaking out); same expression
    # and operation order as astroNN's fakemag_to_pc so the floats are bit-identical.
    safe_fm = np.where(fm_usable, fm, 1.0)
    dist = np.where(fm_usable, 1000.0 * (10.0 ** (0.2 * k_corrected)) / safe_fm, np.nan)
    with np.errstate(invalid="ignore", over="ignore"):
        dist_err = np.where(fm_usable, (fm_err / safe_fm) * dist, np.nan)
        dist = np.where(dist > MAX_DISTANCE_PC, np.nan, dist)
        dist_err = np.where((dist_err > MAX_DISTANCE_PC) | np.isnan(dist), np.nan, dist_err)
        unreliable = ~fm_usable | ~np.isfinite(fm_err) | (fm_err >= UNRELIABLE_FRACTION * fm)

    flags = np.zeros(fm.shape, dtype=np.int64)
    flags |= np.where(unreliable, FLAG_FAKEMAG_UNRELIABLE, 0)
    flags |= np.where(k_missing, FLAG_MISSING_PHOTOMETRY, 0)
    flags |= np.where(ebv_missing, FLAG_MISSING_EXTINCTION, 0)
    flags |= np.where(~fm_finite, FLAG_NO_RESULT, 0)
    warn, bad = flags_summary(flags)
    return DistanceResult(
        k_mag=k_used,
        ebv=ebv_used,
        a_k_mag=a_k,
        dist=dist,
        dist_err=dist_err,
        result_flags=flags,
        flag_warn=np.asarray(warn, dtype=bool),
        flag_bad=np.asarray(bad, dtype=bool),
    )
