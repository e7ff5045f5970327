"""Batched DR17 continuum normalization, identical in result to astroNN 1.1.0.

The reference is ``astroNN.apogee.apogee_continuum(flux, err, bitmask=bitmask, dr=17)``, which
works one spectrum at a time (about 0.7 ms each). :func:`normalize` gives the same numbers for a
whole batch at once, with no Python loop over spectra (only over the three detector chips).

What astroNN does, and therefore what this module does, in this order:

1. Cut the 8575-pixel apStar grid to the three chips (blue 246:3274, green 3585:6080,
   red 6344:8335): 7514 pixels.
2. Per chip and per spectrum, fit a degree-2 Chebyshev series to the flux of the DR17 continuum
   pixels (:func:`continuum_mask`) with ``numpy.polynomial.Chebyshev.fit`` weights
   ``w = 1 / (err**2 + 1e-8)``. Note that numpy multiplies the residuals by ``w`` (so the
   least-squares weight is ``w**2``); the domain is [first, last] continuum pixel of the chip.
   The least-squares problem is numpy's: columns scaled to unit norm, solved by SVD with
   singular values ``<= len(x) * eps * s_max`` treated as zero (minimum-norm solution when the
   weights leave fewer than three independent equations).
3. Divide flux and err by the fitted continuum.
4. Flux < 0 (including -inf) -> 0. Then NaN/inf flux -> 1.0. The error is *not* changed by
   either step (astroNN's lines meant to zero the error run after the flux was already replaced,
   so they never match anything).
5. Pixels with any of the bits 0-7 or 12 set in the APOGEE pixel mask: flux 1.0 and error 1.0.

Quirks that follow from this and that are reproduced on purpose:

* a NaN or inf flux at a continuum pixel (even one whose weight is 0) makes the whole chip's fit
  NaN, so the chip's flux becomes 1.0 everywhere and its error NaN (1.0 where masked);
* an all-zero chip fits a zero continuum: flux 0/0 -> 1.0, error x/0 -> inf;
* a NaN *error* at a continuum pixel makes numpy's least squares raise (astroNN fails there);
  :func:`normalize` raises ``ValueError`` instead of inventing a result. Errors derived as
  ``ivar**-0.5`` (what :func:`astronn_dist.worker.science.spectra.read_apstar` gives) are never NaN.

Agreement with astroNN: |difference| <= ~1e-11 x max(1, |value|), on real spectra ~4e-15
(tests/test_continuum.py). The one exception: a pixel where the fitted continuum is zero to
rounding (e.g. a chip with a single weighted continuum pixel), where both divide by noise.
A spectrum gets bit-identical results whatever batch it is normalized in.

Inputs are converted to float64: astroNN's numbers are matched for float64 input (astroNN itself
keeps float32 input in float32, with different rounding).

The continuum mask comes from astroNN's own package data when astroNN is installed (located
without importing it: importing astroNN can pull in TensorFlow), else from the copy shipped in
``worker/data/dr17_contmask.npy`` (same file; see worker/data/NOTICE.md).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from numpy.polynomial import chebyshev

N_PIXELS = 8575
"""Pixels of the apStar log-lambda grid (input length)."""

N_NORMALIZED = 7514
"""Pixels after removing the gaps between the detector chips (output length)."""

CHIP_RANGES: tuple[tuple[int, int], ...] = ((246, 3274), (3585, 6080), (6344, 8335))
"""[start, stop) of the blue, green and red chips on the 8575-pixel grid (DR13-DR17)."""

MASKED_BITS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 12)
"""APOGEE_PIXMASK bits astroNN masks by default: BADPIX, CRPIX, SATPIX, UNFIXABLE, BADDARK,
BADFLAT, BADERR, NOSKY (0-7) and SIG_SKYLINE (12). Bit 9 (PERSIST_HIGH) is *not* masked."""

MASKED_BITMASK = sum(1 << bit for bit in MASKED_BITS)  # 4351

DEGREE = 2
"""Degree of the Chebyshev series fitted to each chip."""

MASK_VALUE = 1.0
"""Value given to masked and non-finite normalized pixels (astroNN's ``mask_value``)."""

_ERR_SOFTENING = 1e-8
"""astroNN's fit weight is 1 / (err**2 + 1e-8) ("for numerical stability")."""

_BLOCK_ROWS = 32
"""Spectra per block in the element-wise stage: 32 x 3028 x 8 B = 0.8 MB per temporary."""

_MASK_NAME = "dr17_contmask.npy"
_SHIPPED_MASK = Path(__file__).resolve().parents[1] / "data" / _MASK_NAME  # worker/data


def continuum_mask_path() -> Path:
    """Where the DR17 continuum mask is read from: astroNN's package data, else the shipped copy.

    ``importlib.util.find_spec`` locates the installed astroNN package without executing its
    ``__init__`` (which imports TensorFlow-dependent modules in some versions).
    """
    try:
        spec = importlib.util.find_spec("astroNN")
    except (ImportError, ValueError):  # a broken install or a stub module without a spec
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / "data" / _MASK_NAME
        if candidate.is_file():
            return candidate
    return _SHIPPED_MASK


@lru_cache(maxsize=1)
def _load_mask() -> np.ndarray:
    path = continuum_mask_path()
    mask = np.load(path, allow_pickle=False)
    if mask.shape != (N_NORMALIZED,) or mask.dtype != np.bool_:
        if path == _SHIPPED_MASK:
            raise RuntimeError(
                f"{path}: expected ({N_NORMALIZED},) bool, got {mask.shape} {mask.dtype}"
            )
        mask = np.load(_SHIPPED_MASK, allow_pickle=False)  # astroNN's copy is damaged: use ours
    mask.setflags(write=False)
    return mask


def continuum_mask() -> np.ndarray:
    """The DR17 continuum pixel mask on the gap-removed grid: (7514,) bool, read-only.

    True marks the pixels the continuum is fitted to (532 of 7514).
    """
    return _load_mask()


@dataclass(frozen=True)
class _Chip:
    """Everything about one chip's fit that does not depend on the spectrum."""

    raw: slice  # the chip on the 8575-pixel grid
    out: slice  # the chip on the 7514-pixel grid
    cont: np.ndarray  # (M,) int: continuum pixels, as indices within the chip
    fit: slice  # the chip's M continuum pixels within continuum_pixels()' 532
    vander: np.ndarray  # (M, 3): Chebyshev T0..T2 at the continuum pixels (domain-mapped)
    x_eval: np.ndarray  # (L,): every pixel of the chip, mapped to the window [-1, 1]
    rcond: float  # numpy's default for Chebyshev.fit: M * eps


@lru_cache(maxsize=1)
def _chips() -> tuple[_Chip, ...]:
    """Per-chip constants, built with the same numpy calls as Chebyshev.fit and __call__.

    Chebyshev.fit maps x from domain [min(x), max(x)] to window [-1, 1] with
    ``pu.mapdomain``: ``off + scl * x``; the fitted series maps its argument the same way.
    Using numpy's own ``mapparms``-style arithmetic keeps the results bit-identical.
    """
    mask = continuum_mask()
    chips = []
    offset = fitted = 0
    for start, stop in CHIP_RANGES:
        length = stop - start
        cont = np.flatnonzero(mask[offset : offset + length])
        lo, hi = float(cont.min()), float(cont.max())
        if lo == hi:  # as Chebyshev.fit does for a one-point domain
            lo, hi = lo - 1.0, hi + 1.0
        # numpy.polynomial.polyutils.mapparms(domain=(lo, hi), window=(-1, 1))
        off = (hi * -1.0 - lo * 1.0) / (hi - lo)
        scl = 2.0 / (hi - lo)
        x_fit = off + scl * cont.astype(np.float64)
        chips.append(
            _Chip(
                raw=slice(start, stop),
                out=slice(offset, offset + length),
                cont=cont,
                fit=slice(fitted, fitted + len(cont)),
                vander=chebyshev.chebvander(x_fit, DEGREE),
                x_eval=off + scl * np.arange(length, dtype=np.float64),
                rcond=len(cont) * float(np.finfo(np.float64).eps),
            )
        )
        offset += length
        fitted += len(cont)
    assert offset == N_NORMALIZED
    return tuple(chips)


@lru_cache(maxsize=1)
def continuum_pixels() -> np.ndarray:
    """The continuum pixels on the 8575-pixel apStar grid, chip after chip: (532,) int, read-only.

    The only pixels whose error the fit reads: :func:`normalize_flux` takes the error there
    alone (``err[..., continuum_pixels()]``).
    """
    pixels = np.concatenate([chip.raw.start + chip.cont for chip in _chips()])
    pixels.setflags(write=False)
    return pixels


def _fit_chip(flux: np.ndarray, err: np.ndarray, chip: _Chip) -> np.ndarray:
    """Chebyshev coefficients of one chip for every spectrum: (N, M) x 2 -> (N, 3).

    Reproduces ``numpy.polynomial.polyutils._fit`` (weights applied to the design matrix and the
    data, columns scaled to unit norm, ``lstsq`` with ``rcond = M * eps``, scale undone),
    batched: ``numpy.linalg.lstsq`` takes one problem at a time, so the same minimum-norm
    solution is computed from a stacked SVD with LAPACK's rank rule (singular values
    ``<= rcond * s_max`` dropped). Coefficients agree with lstsq's to ~1e-15 relative on real
    spectra, ~1e-11 on nearly rank-deficient fits (a chip with 1-2 weighted pixels).
    """
    weight = 1.0 / (np.square(err) + _ERR_SOFTENING)  # (N, M)
    rhs = flux * weight  # (N, M)
    # numpy builds lhs = van.T * w, a (3, M) array laid out column-major, so its column norms
    # are summed pixel after pixel; (N, M, 3) in C order summed over axis 1 adds in that order.
    # order="C" everywhere below: a broadcast product's default layout ("K") depends on N,
    # and with it the summation order; fixed, a spectrum gets the same bits in any batch.
    lhs = np.multiply(chip.vander[None, :, :], weight[:, :, None], order="C")  # (N, M, 3)
    scale = np.sqrt(np.square(lhs).sum(axis=1))  # (N, 3) column norms
    scale[scale == 0] = 1.0
    design = np.divide(lhs, scale[:, None, :], order="C")  # (N, M, 3)

    bad_design = ~np.isfinite(design).all(axis=(1, 2))
    if bad_design.any():
        rows = np.flatnonzero(bad_design)
        raise ValueError(
            f"err is NaN at continuum pixels of spectra {rows[:10].tolist()}"
            f"{' ...' if len(rows) > 10 else ''}: astroNN's Chebyshev fit fails on such input "
            "(numpy LinAlgError). Give err = ivar**-0.5 (inf, not NaN, where ivar is 0), "
            "as astronn_dist.worker.science.spectra.read_apstar does."
        )
    # A NaN/inf in the weighted data makes LAPACK's solution NaN throughout; mark those rows
    # and solve a harmless zero problem in their place (a NaN would break the stacked SVD).
    bad_data = ~np.isfinite(rhs).all(axis=1)
    if bad_data.any():
        rhs = np.where(bad_data[:, None], 0.0, rhs)

    u, s, vt = np.linalg.svd(design, full_matrices=False)  # (N,M,3), (N,3), (N,3,3)
    keep = s > chip.rcond * s[:, :1]
    inv_s = np.divide(1.0, s, out=np.zeros_like(s), where=keep)
    # Explicit products and sums rather than einsum/matmul, for the same reason.
    projected = np.multiply(u, rhs[:, :, None], order="C").sum(axis=1) * inv_s  # S^+ U^T b
    coef = np.multiply(vt, projected[:, :, None], order="C").sum(axis=1) / scale  # (N, 3)
    coef[bad_data] = np.nan
    return coef


def _chebval2(x: np.ndarray, coef: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Degree-2 Chebyshev series at x for each row of coef: (L,), (B, 3) -> out (B, L).

    The operations of numpy's ``chebval`` (Clenshaw recursion) for three coefficients,
    ``(c0 - c2) + (c1 + c2 * 2x) * x``, in the same order (so bit-identical to the fitted
    series' ``__call__``), but written in place into ``out`` instead of four temporaries.
    """
    c0, c1, c2 = coef[:, 0:1], coef[:, 1:2], coef[:, 2:3]  # (B, 1) each
    np.multiply(c2, 2 * x, out=out)
    out += c1
    out *= x
    out += c0 - c2
    return out


def normalize(
    flux: np.ndarray, err: np.ndarray, bitmask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Continuum-normalize APOGEE spectra as astroNN 1.1.0 ``apogee_continuum(..., dr=17)``.

    Args:
        flux: flux on the apStar grid, (N, 8575) or (8575,) [1e-17 erg/s/cm^2/Angstrom].
        err: 1-sigma flux error, same shape and units. The worker passes ``ivar**-0.5`` (inf
            where ivar is 0), never NaN; a NaN at a continuum pixel raises ``ValueError``.
        bitmask: APOGEE_PIXMASK per pixel, same shape, integer dtype; pixels with bits 0-7 or 12
            set become flux 1.0, error 1.0. None: no pixel is masked (as astroNN).

    Returns:
        ``(norm_flux, norm_err)``, float64, (N, 7514) or (7514,) following the input: flux and
        error divided by the fitted continuum, with astroNN's replacements (module docstring).

    Raises:
        ValueError: wrong shapes, or NaN errors at continuum pixels.
        TypeError: a bitmask that is not of integer dtype.
    """
    flux = np.asarray(flux, dtype=np.float64)
    err = np.asarray(err, dtype=np.float64)
    _check_flux(flux)
    if err.shape != flux.shape:
        raise ValueError(f"err has shape {err.shape}, flux {flux.shape}: they must match")
    _check_bitmask(flux, bitmask)
    err2 = err.reshape(-1, N_PIXELS)
    norm_flux, norm_err = _normalize(flux, err2[:, continuum_pixels()], bitmask, err2)
    return norm_flux, norm_err  # type: ignore[return-value]


def normalize_flux(
    flux: np.ndarray, continuum_err: np.ndarray, bitmask: np.ndarray | None = None
) -> np.ndarray:
    """The normalized flux of :func:`normalize` alone, from the error at the continuum pixels.

    The flux's normalization reads the error only where the continuum is fitted, so a caller
    that does not need the normalized error (the worker) derives the error at those 532
    pixels only: the same numbers as ``normalize(flux, err, bitmask)[0]``, bit for bit.

    Args:
        flux: (N, 8575) or (8575,), as for :func:`normalize`.
        continuum_err: ``err[..., continuum_pixels()]``: (N, 532) or (532,).
        bitmask: as for :func:`normalize`.

    Returns:
        norm_flux, float64, (N, 7514) or (7514,) following the input.

    Raises:
        ValueError, TypeError: as :func:`normalize`.
    """
    flux = np.asarray(flux, dtype=np.float64)
    continuum_err = np.asarray(continuum_err, dtype=np.float64)
    _check_flux(flux)
    n_fit = len(continuum_pixels())
    if continuum_err.shape != flux.shape[:-1] + (n_fit,):
        raise ValueError(
            f"continuum_err has shape {continuum_err.shape}, expected {flux.shape[:-1] + (n_fit,)}"
            " (err at continuum_pixels())"
        )
    _check_bitmask(flux, bitmask)
    return _normalize(flux, continuum_err.reshape(-1, n_fit), bitmask, None)[0]


def _check_flux(flux: np.ndarray) -> None:
    if flux.ndim not in (1, 2) or flux.shape[-1] != N_PIXELS:
        raise ValueError(
            f"flux must have shape (N, {N_PIXELS}) or ({N_PIXELS},), got {flux.shape}"
        )


def _check_bitmask(flux: np.ndarray, bitmask: np.ndarray | None) -> None:
    if bitmask is not None:
        bitmask = np.asarray(bitmask)
        if bitmask.shape != flux.shape:
            raise ValueError(
                f"bitmask has shape {bitmask.shape}, flux {flux.shape}: they must match"
            )
        if bitmask.dtype.kind not in "iu":
            raise TypeError(
                f"bitmask must have an integer dtype (APOGEE_PIXMASK), got {bitmask.dtype}"
            )


def _normalize(
    flux: np.ndarray, continuum_err: np.ndarray, bitmask: np.ndarray | None,
    err2: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """normalize's work on checked input: flux (N, 8575) or (8575,), continuum_err (N, 532),
    err2 (N, 8575) or None (no normalized error wanted)."""
    single = flux.ndim == 1
    flux2 = flux.reshape(-1, N_PIXELS)
    n = flux2.shape[0]
    # int64 so that the mask constant fits whatever integer width the file used
    bits = None if bitmask is None else np.asarray(bitmask).reshape(-1, N_PIXELS).astype(
        np.int64, copy=False)
    norm_flux = np.empty((n, N_NORMALIZED))
    norm_err = None if err2 is None else np.empty((n, N_NORMALIZED))

    # Overflow, 0/0 and x/0 are part of astroNN's semantics (they become 1.0, 0 or inf).
    with np.errstate(all="ignore"):
        for chip in _chips():
            chip_flux = flux2[:, chip.raw]  # (N, L) views
            coef = _fit_chip(chip_flux[:, chip.cont], continuum_err[:, chip.fit], chip)  # (N, 3)
            # The element-wise part runs in blocks of rows, so that its temporaries stay in
            # the CPU cache and are reused (whole-batch temporaries are page-faulted afresh).
            scratch = np.empty((min(n, _BLOCK_ROWS), chip.raw.stop - chip.raw.start))
            for lo in range(0, n, _BLOCK_ROWS):
                rows = slice(lo, min(n, lo + _BLOCK_ROWS))
                cont = scratch[: rows.stop - rows.start]
                _chebval2(chip.x_eval, coef[rows], out=cont)
                out_flux = norm_flux[rows, chip.out]
                np.divide(chip_flux[rows], cont, out=out_flux)
                # astroNN's order: negatives (incl. -inf) to 0 first, then NaN/inf to 1.0; the
                # error stays err / continuum in both cases.
                np.copyto(out_flux, 0.0, where=out_flux < 0.0)
                np.copyto(out_flux, MASK_VALUE, where=~np.isfinite(out_flux))
                masked = None if bits is None else (bits[rows, chip.raw] & MASKED_BITMASK) != 0
                if masked is not None:
                    np.copyto(out_flux, MASK_VALUE, where=masked)
                if norm_err is not None:
                    out_err = norm_err[rows, chip.out]
                    np.divide(err2[rows, chip.raw], cont, out=out_err)
                    if masked is not None:
                        np.copyto(out_err, MASK_VALUE, where=masked)

    if single:
        return norm_flux[0], None if norm_err is None else norm_err[0]
    return norm_flux, norm_err
