"""astronn_dist.worker.science.continuum.normalize: parity with astroNN 1.1.0 on real DR17 spectra and their variants.

The ``reference`` tests run astroNN's ``apogee_continuum(flux, err, bitmask=bitmask, dr=17)``
live, one spectrum at a time, and compare it with one batched :func:`normalize` call. They feed
both the error the worker feeds (``ivar**-0.5`` with ``ivar = err_file**-2``, non-finite -> 0)
and the file's error directly. The other tests check the documented behaviour on their own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from astronn_dist.worker.science import continuum
from astronn_dist.worker.science.continuum import (
    CHIP_RANGES,
    MASKED_BITS,
    N_NORMALIZED,
    N_PIXELS,
    continuum_mask,
    continuum_pixels,
    normalize,
    normalize_flux,
)

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6  # max |ours - astroNN| / max(1, |astroNN|), flux and error
BULGE = "apStar-dr17-2M17335483-2753043.fits"
KEPLER = "apStar-dr17-2M19485057+5005279.fits"

RAW_INDEX = np.concatenate([np.arange(start, stop) for start, stop in CHIP_RANGES])  # (7514,)


def _chip_continuum_pixels() -> list[np.ndarray]:
    """Per chip, its continuum pixels as indices on the 8575-pixel grid."""
    cont = RAW_INDEX[continuum_mask()]
    return [cont[(cont >= start) & (cont < stop)] for start, stop in CHIP_RANGES]


BLUE_CONT, GREEN_CONT, RED_CONT = _chip_continuum_pixels()
_IN_CHIPS = np.zeros(N_PIXELS, bool)
_IN_CHIPS[RAW_INDEX] = True
_IN_CHIPS[np.concatenate([BLUE_CONT, GREEN_CONT, RED_CONT])] = False
NON_CONT = np.flatnonzero(_IN_CHIPS)  # chip pixels outside the continuum mask


def worker_err(err_file: np.ndarray) -> np.ndarray:
    """The error the worker gives normalize(): ivar**-0.5, ivar = err**-2, non-finite ivar -> 0."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        ivar = np.asarray(err_file, dtype=np.float64) ** -2.0
        ivar[~np.isfinite(ivar)] = 0.0
        return ivar**-0.5


def _read_all_rows(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with fits.open(path) as hdul:
        return (
            hdul[1].data.astype(np.float64),
            hdul[2].data.astype(np.float64),
            hdul[3].data.astype(np.int64),
        )


def make_variants(flux: np.ndarray, err: np.ndarray, bits: np.ndarray) -> dict[str, tuple]:
    """Damaged/edge-case copies of one real spectrum: name -> (flux, file error, bitmask).

    The file errors never hold NaN at continuum pixels (astroNN cannot fit those; tested apart).
    """
    out: dict[str, tuple] = {}

    def variant(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        copies = (flux.copy(), err.copy(), bits.copy())
        out[name] = copies
        return copies

    f, e, b = variant("nan_pixels")  # bad pixels outside the continuum: those pixels -> 1.0
    f[NON_CONT[::300]] = np.nan
    e[NON_CONT[::300]] = np.nan
    f, e, b = variant("nan_continuum_pixel")  # quirk: the green chip's fit is NaN -> all 1.0
    f[GREEN_CONT[10]] = np.nan
    f, e, b = variant("nan_flux_zero_weight")  # NaN * weight 0 is still NaN: red chip -> 1.0
    f[RED_CONT[5]] = np.nan
    e[RED_CONT[5]] = np.inf
    f, e, b = variant("zero_ivar")  # err inf / 0 (ivar 0) on continuum and other pixels
    e[BLUE_CONT[:40]] = np.inf
    e[GREEN_CONT[:15]] = 0.0  # worker: ivar inf -> 0 -> err inf; direct: weight 1e8
    e[4000:4100] = 0.0
    e[NON_CONT[-50:]] = np.nan
    f, e, b = variant("masked_bits")  # bits 0-7 and 12 masked, bit 9 not
    for k, bit in enumerate(range(8)):
        b[300 + 60 * k : 330 + 60 * k] |= 1 << bit
    b[1000:1100] |= 1 << 9
    b[1200:1300] |= 1 << 12
    b[1400:1450] |= (1 << 9) | (1 << 12)
    b[BLUE_CONT[:30]] |= 1 << 9
    b[GREEN_CONT[:30]] |= 1 << 3  # masking never changes the fit itself
    f, e, b = variant("bit9_everywhere")
    b[:] = 1 << 9
    f, e, b = variant("negative_flux")  # -> 0, error kept; incl. continuum pixels
    f[4000:4100] *= -1.0
    f[NON_CONT[::500]] *= -1.0
    f, e, b = variant("nan_chip")  # the whole red chip NaN
    f[6344:8335] = np.nan
    f, e, b = variant("all_zero")  # 0/0 -> 1.0, error / 0 -> inf
    f[:] = 0.0
    f, e, b = variant("inf_flux")  # +inf -> 1.0, -inf -> 0; inf at a green continuum pixel
    f[NON_CONT[100]] = np.inf
    f[NON_CONT[200]] = -np.inf
    f[GREEN_CONT[3]] = np.inf
    f, e, b = variant("neg_inf_continuum")
    f[BLUE_CONT[7]] = -np.inf
    f, e, b = variant("rank_deficient")  # blue: 2 weighted continuum pixels; red: 1
    e[BLUE_CONT[np.r_[0:50, 51:120, 121 : len(BLUE_CONT)]]] = np.inf
    e[RED_CONT[np.r_[0:40, 41 : len(RED_CONT)]]] = np.inf
    f, e, b = variant("no_weight_chip")  # green: no weight at all -> zero continuum
    e[GREEN_CONT] = np.inf
    f, e, b = variant("tiny_units")  # err**2 << 1e-8: the weights saturate at 1e8
    f *= 1e-5
    e *= 1e-5
    f, e, b = variant("huge_units")
    f *= 1e200
    e *= 1e200
    return out


@pytest.fixture(scope="module")
def real_rows(sample_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every HDU1 row of both real files (coadds, combinations, visits), with HDU2/HDU3 rows."""
    rows = {}
    for name in (BULGE, KEPLER):
        flux, err, bits = _read_all_rows(sample_dir / name)
        for i in range(flux.shape[0]):
            rows[f"{name}[{i}]"] = (flux[i], err[i], bits[i])
    return rows


@pytest.fixture(scope="module")
def cases(real_rows: dict) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The real rows plus the variants of the bulge coadd and of the Kepler coadd."""
    out = dict(real_rows)
    for name in (BULGE, KEPLER):
        for key, value in make_variants(*real_rows[f"{name}[0]"]).items():
            out[f"{name}:{key}"] = value
    return out


def _stack(cases: dict, use_worker_err: bool) -> tuple[list[str], np.ndarray, ...]:
    """All cases as one batch: names, flux, err (the worker's or the file's), bitmask."""
    names = list(cases)
    flux = np.stack([cases[n][0] for n in names])
    err = np.stack([cases[n][1] for n in names])
    bits = np.stack([cases[n][2] for n in names])
    return names, flux, worker_err(err) if use_worker_err else err, bits


def _max_difference(ours: np.ndarray, ref: np.ndarray, what: str) -> float:
    """Max of |ours - ref| / max(1, |ref|) over finite values (NaN, +inf, -inf must coincide).

    That is the absolute difference for values up to 1 (normalized flux ~1, error ~0.01) and
    the relative one above: an absolute 1e-6 is below float64 resolution for the 1e10 errors of
    unmasked bad pixels (one ulp of 2e10 is 4e-6).
    """
    assert ours.shape == ref.shape
    for test in (np.isnan, np.isposinf, np.isneginf):
        mismatch = np.flatnonzero(test(ours) != test(ref))
        assert mismatch.size == 0, f"{what}: {test.__name__} differs at pixels {mismatch[:10]}"
    finite = np.isfinite(ref)
    scaled = np.abs(ours[finite] - ref[finite]) / np.maximum(1.0, np.abs(ref[finite]))
    return float(np.max(scaled, initial=0.0))


# --- parity with astroNN (live) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def apogee_continuum():
    """astroNN's function, imported once for the module (its import takes about a second)."""
    pytest.importorskip("astroNN", reason="astroNN 1.1.0 (the `reference` extra) is not installed")
    from astroNN.apogee import apogee_continuum as reference

    return reference


def _astronn(apogee_continuum, flux, err, bits) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings():  # "gaps are removed automatically", numpy RankWarning, ...
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            norm, norm_err = apogee_continuum(flux, err, bitmask=bits, dr=17)
    return norm[0], norm_err[0]


@pytest.mark.reference
@pytest.mark.parametrize("use_worker_err", [True, False], ids=["worker-err", "file-err"])
def test_batched_normalize_matches_astronn_per_spectrum(
    apogee_continuum, cases: dict, use_worker_err: bool
) -> None:
    names, flux, err, bits = _stack(cases, use_worker_err)
    ours, ours_err = normalize(flux, err, bits)  # one call for the whole batch
    assert ours.shape == ours_err.shape == (len(names), N_NORMALIZED)
    worst_flux = worst_err = 0.0
    for i, name in enumerate(names):
        ref, ref_err = _astronn(apogee_continuum, flux[i], err[i], bits[i])
        worst_flux = max(worst_flux, _max_difference(ours[i], ref, f"{name} flux"))
        worst_err = max(worst_err, _max_difference(ours_err[i], ref_err, f"{name} error"))
    print(f"\nmax |diff|/max(1,|ref|) vs astroNN, {len(names)} spectra: "
          f"flux {worst_flux:.3g}, err {worst_err:.3g}")
    assert worst_flux <= TOLERANCE
    assert worst_err <= TOLERANCE


@pytest.mark.reference
def test_quirks_really_happen_in_astronn(apogee_continuum, cases: dict) -> None:
    """The variants exercise what they claim to (else parity on them would prove little)."""
    green = slice(3274 - 246, 3274 - 246 + 6080 - 3585)
    red = slice(N_NORMALIZED - (8335 - 6344), N_NORMALIZED)
    for key, chip in (("nan_continuum_pixel", green), ("nan_flux_zero_weight", red),
                      ("inf_flux", green), ("nan_chip", red)):
        flux, err, bits = cases[f"{BULGE}:{key}"]
        ref, _ = _astronn(apogee_continuum, flux, worker_err(err), bits)
        masked = (bits[RAW_INDEX][chip] & continuum.MASKED_BITMASK) != 0
        assert np.all(ref[chip] == 1.0), key
        assert not masked.all()
    flux, err, bits = cases[f"{BULGE}:all_zero"]
    ref, ref_err = _astronn(apogee_continuum, flux, worker_err(err), bits)
    unmasked = (bits[RAW_INDEX] & continuum.MASKED_BITMASK) == 0
    assert np.all(ref == 1.0) and np.all(np.isinf(ref_err[unmasked]))


@pytest.mark.reference
def test_only_divergence_is_a_continuum_root_on_a_pixel(apogee_continuum, real_rows: dict) -> None:
    """The one known difference, kept visible: where the fitted continuum is zero to rounding.

    With a single weighted continuum pixel at the edge of its chip, the minimum-norm fit is
    c * (T0 - T1 + T2)(x) = c * x (2x - 1): zero at the chip's domain midpoint, exactly on a
    pixel. There flux and error are divided by a rounding-level number (ours exactly 0, astroNN's
    about -3e-14), so the results differ (inf vs -2e14); both mean nothing. Every other pixel
    agrees.
    """
    flux, err, bits = real_rows[f"{KEPLER}[0]"]
    err = worker_err(err)
    err[RED_CONT[1:]] = np.inf  # only RED_CONT[0], the first pixel of the red domain, weighs
    root = N_NORMALIZED - (8335 - 6344) + (RED_CONT[0] + RED_CONT[-1] - 2 * 6344) // 2
    ours, ours_err = normalize(flux, err, bits)
    ref, ref_err = _astronn(apogee_continuum, flux, err, bits)
    others = np.arange(N_NORMALIZED) != root
    assert _max_difference(ours[others], ref[others], "flux") <= TOLERANCE
    assert _max_difference(ours_err[others], ref_err[others], "error") <= TOLERANCE
    assert np.isinf(ours_err[root]) and abs(ref_err[root]) > 1e12


@pytest.mark.reference
def test_nan_error_at_a_continuum_pixel_fails_in_both(apogee_continuum, real_rows: dict) -> None:
    flux, err, bits = real_rows[f"{BULGE}[0]"]
    err = err.copy()
    err[RED_CONT[3]] = np.nan
    with pytest.raises(np.linalg.LinAlgError):
        _astronn(apogee_continuum, flux, err, bits)
    with pytest.raises(ValueError, match="err is NaN at continuum pixels"):
        normalize(flux, err, bits)


@pytest.mark.reference
def test_continuum_mask_is_astronns(apogee_continuum) -> None:
    import astroNN.data

    theirs = np.load(Path(astroNN.data.datapath()) / "dr17_contmask.npy")
    np.testing.assert_array_equal(continuum_mask(), theirs)
    assert continuum.continuum_mask_path() == Path(astroNN.data.datapath()) / "dr17_contmask.npy"


# --- behaviour on its own (no astroNN needed) --------------------------------------------------


def test_batched_equals_per_spectrum_calls(cases: dict) -> None:
    names, flux, err, bits = _stack(cases, use_worker_err=True)
    ours, ours_err = normalize(flux, err, bits)
    for i in range(len(names)):
        single, single_err = normalize(flux[i], err[i], bits[i])  # (8575,) -> (7514,)
        assert single.shape == single_err.shape == (N_NORMALIZED,)
        np.testing.assert_array_equal(single, ours[i], err_msg=names[i])
        np.testing.assert_array_equal(single_err, ours_err[i], err_msg=names[i])


def test_flux_alone_from_continuum_errors_is_bit_identical(cases: dict) -> None:
    """normalize_flux (what the worker calls, with the error at the continuum pixels only)
    gives normalize's flux bit for bit, in a batch and one spectrum at a time."""
    names, flux, err, bits = _stack(cases, use_worker_err=True)
    pixels = continuum_pixels()
    np.testing.assert_array_equal(pixels, np.concatenate([BLUE_CONT, GREEN_CONT, RED_CONT]))
    ours = normalize(flux, err, bits)[0]
    alone = normalize_flux(flux, err[:, pixels], bits)
    assert alone.view(np.uint64).tobytes() == ours.view(np.uint64).tobytes()
    for i in (0, len(names) - 1):
        single = normalize_flux(flux[i], err[i, pixels], bits[i])
        assert single.shape == (N_NORMALIZED,)
        assert single.view(np.uint64).tobytes() == ours[i].view(np.uint64).tobytes(), names[i]
    unmasked = normalize_flux(flux, err[:, pixels], None)
    assert unmasked.view(np.uint64).tobytes() == normalize(flux, err, None)[0].view(np.uint64).tobytes()
    with pytest.raises(ValueError, match="continuum_pixels"):
        normalize_flux(flux, err, bits)  # the whole error row is not what it takes


def test_documented_replacements(real_rows: dict) -> None:
    flux, err_file, bits = real_rows[f"{BULGE}[0]"]
    err = worker_err(err_file)
    base, base_err = normalize(flux, err, bits)
    variants = make_variants(flux, err_file, bits)
    unmasked = (bits[RAW_INDEX] & continuum.MASKED_BITMASK) == 0
    where = {index: position for position, index in enumerate(RAW_INDEX)}

    f, e, b = variants["masked_bits"]
    norm, norm_err = normalize(f, worker_err(e), b)
    masked = (b[RAW_INDEX] & ((1 << 8) - 1 | 1 << 12)) != 0
    assert np.all(norm[masked] == 1.0) and np.all(norm_err[masked] == 1.0)
    np.testing.assert_array_equal(norm[~masked], base[~masked])  # bit 9 masks nothing
    np.testing.assert_array_equal(*[normalize(f, worker_err(e), b)[0] for b in (bits, bits | 512)])

    f, e, b = variants["nan_continuum_pixel"]
    norm, norm_err = normalize(f, worker_err(e), b)
    green = slice(3274 - 246, 3274 - 246 + 6080 - 3585)
    assert np.all(norm[green] == 1.0)
    assert np.all(np.isnan(norm_err[green][unmasked[green]]))  # err / NaN continuum
    outside = np.ones(N_NORMALIZED, bool)
    outside[green] = False
    np.testing.assert_array_equal(norm[outside], base[outside])

    f = flux.copy()
    f[NON_CONT[::500]] *= -1.0  # outside the continuum: the fit is unchanged
    norm, norm_err = normalize(f, err, bits)
    flipped = [where[i] for i in NON_CONT[::500]]
    assert np.all(norm[flipped][unmasked[flipped]] == 0.0)
    np.testing.assert_array_equal(norm_err[flipped], base_err[flipped])  # error kept

    norm, norm_err = normalize(np.zeros_like(flux), err, bits)
    assert np.all(norm == 1.0)
    assert np.all(np.isinf(norm_err[unmasked])) and np.all(norm_err[~unmasked] == 1.0)


def test_recovers_an_exact_quadratic_continuum() -> None:
    """Flux that *is* a quadratic per chip normalizes to 1 (to rounding); err scales alike."""
    pixels = np.arange(N_PIXELS, dtype=np.float64)
    flux = np.empty(N_PIXELS)
    for start, stop in CHIP_RANGES:
        x = (pixels[start:stop] - start) / (stop - start)
        flux[start:stop] = 800.0 + 150.0 * x - 90.0 * x**2
    err = np.full(N_PIXELS, 4.0)
    norm, norm_err = normalize(flux, err, np.zeros(N_PIXELS, np.int64))
    np.testing.assert_allclose(norm, 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(norm_err, err[RAW_INDEX] / flux[RAW_INDEX], rtol=1e-12)


def test_inputs_untouched_and_dtypes(real_rows: dict) -> None:
    flux, err_file, bits = real_rows[f"{KEPLER}[0]"]
    err = worker_err(err_file)
    copies = (flux.copy(), err.copy(), bits.copy())
    norm, norm_err = normalize(flux, err, bits)
    for before, after in zip(copies, (flux, err, bits)):
        np.testing.assert_array_equal(before, after)
    assert norm.dtype == norm_err.dtype == np.float64
    # float32 and narrow-integer inputs are accepted (converted to float64 / int64 first)
    norm32, _ = normalize(flux.astype(np.float32), err.astype(np.float32), bits.astype(np.int16))
    ref32, _ = normalize(flux.astype(np.float32).astype(np.float64),
                         err.astype(np.float32).astype(np.float64), bits)
    np.testing.assert_array_equal(norm32, ref32)
    # no bitmask: nothing is masked
    unmasked, _ = normalize(flux, err, None)
    assert np.array_equal(unmasked, normalize(flux, err, np.zeros_like(bits))[0])


@pytest.mark.parametrize(
    "args, error, phrase",
    [
        ((np.ones(8000), np.ones(8000), np.zeros(8000, int)), ValueError, "8575"),
        ((np.ones((2, N_PIXELS)), np.ones((3, N_PIXELS)), None), ValueError, "must match"),
        ((np.ones(N_PIXELS), np.ones(N_PIXELS), np.zeros(N_PIXELS)), TypeError, "integer"),
        ((np.ones((1, 1, N_PIXELS)), np.ones((1, 1, N_PIXELS)), None), ValueError, "shape"),
    ],
)
def test_bad_arguments(args: tuple, error: type, phrase: str) -> None:
    with pytest.raises(error, match=phrase):
        normalize(*args)


def test_nan_error_in_continuum_raises_naming_the_spectrum(real_rows: dict) -> None:
    flux, err_file, bits = real_rows[f"{BULGE}[0]"]
    err = np.stack([worker_err(err_file)] * 3)
    err[2, GREEN_CONT[0]] = np.nan
    with pytest.raises(ValueError, match=r"spectra \[2\]"):
        normalize(np.stack([flux] * 3), err, np.stack([bits] * 3))


def test_continuum_mask() -> None:
    mask = continuum_mask()
    assert mask.shape == (N_NORMALIZED,) and mask.dtype == np.bool_
    assert mask.sum() == len(BLUE_CONT) + len(GREEN_CONT) + len(RED_CONT) == 532
    assert not mask.flags.writeable
    shipped = np.load(REPO / "worker" / "data" / "dr17_contmask.npy")
    np.testing.assert_array_equal(mask, shipped)
    assert MASKED_BITS == (0, 1, 2, 3, 4, 5, 6, 7, 12) and continuum.MASKED_BITMASK == 4351


def _python(code: str, pythonpath: Path | None = None) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (pythonpath, REPO) if p)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_imports_neither_torch_nor_astronn() -> None:
    out = _python(
        "import sys, astronn_dist.worker.science.continuum as c; c.continuum_mask(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'astroNN', 'tensorflow'}))"
    )
    assert out == "[]"


def test_mask_source_astronn_package_data_else_shipped_copy(tmp_path: Path) -> None:
    """A package named astroNN earlier on the path decides which file is read (never imported)."""
    fake = tmp_path / "astroNN"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('astroNN must not be imported')\n")
    code = "import astronn_dist.worker.science.continuum as c; print(c.continuum_mask_path()); c.continuum_mask()"
    assert _python(code, tmp_path) == str(REPO / "worker" / "data" / "dr17_contmask.npy")
    (fake / "data").mkdir()
    shutil.copy(REPO / "worker" / "data" / "dr17_contmask.npy", fake / "data")
    assert _python(code, tmp_path) == str(fake / "data" / "dr17_contmask.npy")
