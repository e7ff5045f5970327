"""astronn_dist.worker.science.distance: parity with astroNN 1.1.0, photometry validation, every flag bit."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from astronn_dist.worker.science.distance import (
    A_K_PER_EBV,
    FLAG_FAKEMAG_UNRELIABLE,
    FLAG_MISSING_EXTINCTION,
    FLAG_MISSING_PHOTOMETRY,
    FLAG_NO_RESULT,
    compute_distances,
    flags_summary,
    validate_photometry,
)

NAN = np.nan

# Inputs chosen to hit every branch: non-positive, NaN, astroNN's magic number, tiny (distances
# above 1e10 pc), ordinary and huge fakemag; missing Ks as NaN, APOGEE's -9999.99, 2MASS's 99 and
# the exact window edges; E(B-V) negative, zero, NaN, sentinel, edges and real values.
GRID_FAKEMAG = [-5.0, 0.0, NAN, -9999.0, 1e-12, 1e-3, 0.5, 50.0, 300.0, 1e4]
GRID_FAKEMAG_ERR = [0.0, 1.0, 60.0, 1e9, NAN]
GRID_K = [NAN, -9999.99, 99.0, 98.0, -1.0, -0.5, 0.0, 5.0, 9.811, 15.0, 97.9]
GRID_EBV = [-0.1, 0.0, NAN, -9999.99, 98.0, 1e-6, 0.05, 0.1927, 2.0, 97.9]


def _grid() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rows = np.array(list(itertools.product(GRID_FAKEMAG, GRID_FAKEMAG_ERR, GRID_K, GRID_EBV)))
    return rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]


def _expected_used(k: np.ndarray, ebv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The design's rule, written independently: missing -> 0."""
    k_ok = np.isfinite(k) & (k > -1) & (k < 98)
    ebv_ok = np.isfinite(ebv) & (ebv > 0) & (ebv < 98)
    return np.where(k_ok, k, 0.0), np.where(ebv_ok, ebv, 0.0)


@pytest.mark.reference
def test_parity_with_astronn_extinction_correction_and_fakemag_to_pc() -> None:
    astronn = pytest.importorskip(
        "astroNN", reason="astroNN 1.1.0 (the `reference` extra) is not installed"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # astroNN's pkg_resources / TensorFlow import chatter
        from astroNN.config import MAGIC_NUMBER
        from astroNN.gaia import extinction_correction, fakemag_to_pc
    assert astronn.__version__ == "1.1.0"

    fakemag, fakemag_err, k, ebv = _grid()
    result = compute_distances(fakemag, fakemag_err, k, ebv)

    k_used, ebv_used = _expected_used(k, ebv)
    np.testing.assert_array_equal(result.k_mag, k_used)
    np.testing.assert_array_equal(result.ebv, ebv_used)
    np.testing.assert_array_equal(result.a_k_mag, A_K_PER_EBV * ebv_used)

    corrected = extinction_correction(k_used, A_K_PER_EBV * ebv_used)
    pc, pc_err = fakemag_to_pc(fakemag, corrected, fakemag_err)
    assert pc.unit.to_string() == "pc"
    pc, pc_err = np.array(pc.value), np.array(pc_err.value)
    # astroNN marks "no distance" with its magic number; we use NaN, plus the 1e10 pc cut.
    magic = pc == MAGIC_NUMBER
    assert magic.any() and not np.isnan(corrected).any()
    exp_dist = np.where(magic | (pc > 1e10), NAN, pc)
    exp_err = np.where(magic | (pc_err > 1e10) | np.isnan(exp_dist), NAN, pc_err)

    # Bit-identical: same expression and operation order as astroNN (max |difference| = 0).
    np.testing.assert_array_equal(result.dist, exp_dist)
    np.testing.assert_array_equal(result.dist_err, exp_err)
    both = np.isfinite(result.dist)
    assert both.sum() > 1000, "the grid must exercise ordinary distances too"
    assert np.isnan(result.dist).sum() > 1000, "and the NaN branches"


@pytest.mark.reference
def test_parity_on_raw_catalog_values_where_photometry_is_valid() -> None:
    """Where photometry is valid our input handling adds nothing: astroNN on the raw values."""
    pytest.importorskip("astroNN", reason="astroNN 1.1.0 (the `reference` extra) is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from astroNN.gaia import extinction_correction, fakemag_to_pc

    rng = np.random.default_rng(1)
    n = 500
    fakemag = rng.uniform(5, 3000, n)
    fakemag_err = fakemag * rng.uniform(0.01, 0.5, n)
    k = rng.uniform(4, 15, n)
    ebv = rng.uniform(0.001, 5, n)
    pc, pc_err = fakemag_to_pc(fakemag, extinction_correction(k, 0.3517 * ebv), fakemag_err)
    result = compute_distances(fakemag, fakemag_err, k, ebv)
    np.testing.assert_array_equal(result.dist, pc.value)
    np.testing.assert_array_equal(result.dist_err, pc_err.value)
    assert (result.result_flags & ~FLAG_FAKEMAG_UNRELIABLE == 0).all()


def test_astronn_documented_example_and_extinction() -> None:
    # astroNN's docs: fakemag_to_pc(300, 10, 100) -> 333.33 pc, 111.11 pc.
    r = compute_distances([300.0], [100.0], [10.0], [NAN])
    np.testing.assert_allclose(r.dist, [1000 / 3], rtol=1e-15)
    np.testing.assert_allclose(r.dist_err, [1000 / 9], rtol=1e-15)
    # E(B-V) = 1 dims Ks by 0.3517 mag: the star is closer by 10^(-0.2 * 0.3517).
    r2 = compute_distances([300.0], [100.0], [10.0], [1.0])
    np.testing.assert_allclose(r2.a_k_mag, [0.3517])
    np.testing.assert_allclose(r2.dist / r.dist, [10 ** (-0.2 * 0.3517)], rtol=1e-14)


@pytest.mark.parametrize(
    ("k", "missing"),
    [(NAN, True), (np.inf, True), (-np.inf, True), (-9999.99, True), (99.0, True),
     (98.0, True), (-1.0, True), (97.999, False), (-0.999, False), (0.0, False), (9.811, False)],
)
def test_k_mag_validation(k: float, missing: bool) -> None:
    k_missing, _ = validate_photometry([k], [0.1])
    assert bool(k_missing[0]) is missing
    r = compute_distances([100.0], [1.0], [k], [0.1])
    assert bool(r.result_flags[0] & FLAG_MISSING_PHOTOMETRY) is missing
    assert r.k_mag[0] == (0.0 if missing else k)
    assert bool(r.flag_bad[0]) is missing  # missing Ks is the only bad thing here
    # Computed (with Ks = 0 when missing, and flagged); Ks near 98 is beyond the 1e10 pc cut.
    assert bool(np.isfinite(r.dist[0])) is bool(r.k_mag[0] < 30)


@pytest.mark.parametrize(
    ("ebv", "missing"),
    [(NAN, True), (np.inf, True), (-0.1, True), (0.0, True), (-9999.99, True), (98.0, True),
     (1e-9, False), (0.1927, False), (97.9, False)],
)
def test_ebv_validation(ebv: float, missing: bool) -> None:
    r = compute_distances([100.0], [1.0], [10.0], [ebv])
    assert bool(r.result_flags[0] & FLAG_MISSING_EXTINCTION) is missing
    assert bool(r.flag_warn[0]) is missing
    assert not r.flag_bad[0]  # missing extinction is only a warning
    assert r.ebv[0] == (0.0 if missing else ebv)
    assert r.a_k_mag[0] == (0.0 if missing else 0.3517 * ebv)


def test_none_means_missing() -> None:
    """JSON nulls arrive as None; they are missing values, not errors."""
    r = compute_distances([100.0, 100.0], [1.0, 1.0], [None, 10.0], [0.1, None])
    assert list(r.result_flags) == [FLAG_MISSING_PHOTOMETRY, FLAG_MISSING_EXTINCTION]


def test_fakemag_unreliable_threshold() -> None:
    fakemag = np.array([100.0, 100.0, 100.0, 50.0, 50.0])
    err = np.array([19.999, 20.0, 20.001, 10.0, 0.0])
    r = compute_distances(fakemag, err, np.full(5, 10.0), np.full(5, 0.1))
    assert list(r.result_flags & FLAG_FAKEMAG_UNRELIABLE) == [0, 1, 1, 1, 0]
    assert list(r.flag_bad) == [False, True, True, True, False]
    assert np.isfinite(r.dist).all()  # unreliable still has a distance


def test_unusable_fakemag() -> None:
    """Non-positive/non-finite fakemag: NaN distance, bit 0; non-finite also bit 11."""
    fakemag = np.array([0.0, -3.0, -9999.0, NAN, np.inf, -np.inf, 100.0])
    err = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, NAN])
    r = compute_distances(fakemag, err, np.full(7, 10.0), np.full(7, 0.1))
    assert np.isnan(r.dist[:6]).all() and np.isnan(r.dist_err[:6]).all()
    assert (r.result_flags & FLAG_FAKEMAG_UNRELIABLE).all()
    assert list(r.result_flags & FLAG_NO_RESULT != 0) == [False, False, False, True, True, True,
                                                          False]
    # A NaN uncertainty: the distance exists, its error does not, and it cannot be "reliable".
    assert np.isfinite(r.dist[6]) and np.isnan(r.dist_err[6])
    assert r.result_flags[6] == FLAG_FAKEMAG_UNRELIABLE
    assert r.flag_bad.all()


def test_huge_distances_become_nan() -> None:
    # 1e-12 fakemag at Ks 15: 1e18 pc. Fakemag 1 at Ks 15: 1e6 pc, error 1e11 pc.
    r = compute_distances([1e-12, 1.0, 1.0], [1e-14, 1e5, 0.1], [15.0, 15.0, 15.0], [NAN] * 3)
    assert np.isnan(r.dist[0]) and np.isnan(r.dist_err[0])
    assert r.dist[1] == pytest.approx(1e6) and np.isnan(r.dist_err[1])
    assert r.result_flags[1] & FLAG_FAKEMAG_UNRELIABLE
    assert r.dist[2] == pytest.approx(1e6) and r.dist_err[2] == pytest.approx(1e5)


def test_every_bit_and_summaries_on_constructed_cases() -> None:
    r = compute_distances(
        fakemag=[300.0, 300.0, 300.0, 300.0, NAN, 300.0],
        fakemag_err=[10.0, 100.0, 10.0, 10.0, NAN, 100.0],
        k_mag=[10.0, 10.0, NAN, 10.0, 10.0, 99.0],
        ebv=[0.1, 0.1, 0.1, -9999.99, 0.1, 0.0],
    )
    assert list(r.result_flags) == [
        0,
        FLAG_FAKEMAG_UNRELIABLE,
        FLAG_MISSING_PHOTOMETRY,
        FLAG_MISSING_EXTINCTION,
        FLAG_FAKEMAG_UNRELIABLE | FLAG_NO_RESULT,
        FLAG_FAKEMAG_UNRELIABLE | FLAG_MISSING_PHOTOMETRY | FLAG_MISSING_EXTINCTION,
    ]
    assert list(r.flag_warn) == [False, False, False, True, False, True]
    assert list(r.flag_bad) == [False, True, True, False, True, True]
    assert r.result_flags.dtype == np.int64
    assert r.flag_warn.dtype == bool and r.flag_bad.dtype == bool


def test_flags_summary_all_combinations() -> None:
    bits = [FLAG_FAKEMAG_UNRELIABLE, FLAG_MISSING_PHOTOMETRY, FLAG_MISSING_EXTINCTION,
            FLAG_NO_RESULT]
    assert bits == [1, 2, 4, 2048]
    values = [sum(c) for n in range(5) for c in itertools.combinations(bits, n)]
    for v in values:
        warn, bad = flags_summary(v)
        assert isinstance(warn, bool) and isinstance(bad, bool)
        assert warn == bool(v & 4)
        assert bad == bool(v & (1 | 2 | 2048))
    warn_arr, bad_arr = flags_summary(np.array(values))
    assert list(warn_arr) == [bool(v & 4) for v in values]
    assert list(bad_arr) == [bool(v & 2051) for v in values]
    assert flags_summary(FLAG_NO_RESULT) == (False, True)
    assert flags_summary(np.int64(FLAG_MISSING_EXTINCTION)) == (True, False)


def test_each_star_uses_its_own_photometry() -> None:
    fakemag = np.array([300.0, 300.0, 300.0, 300.0])
    err = np.full(4, 10.0)
    k = np.array([9.811, 10.522, NAN, 12.0])
    ebv = np.array([NAN, 0.1927, 0.5, 0.05])
    batch = compute_distances(fakemag, err, k, ebv)
    for i in range(4):
        alone = compute_distances(fakemag[i : i + 1], err[i : i + 1], k[i : i + 1], ebv[i : i + 1])
        for field in ("k_mag", "ebv", "a_k_mag", "dist", "dist_err", "result_flags"):
            np.testing.assert_array_equal(getattr(batch, field)[i], getattr(alone, field)[0])
    assert len(set(batch.dist.tolist())) == 4  # not the first star's photometry for everyone
    # A scalar Ks for a whole batch is refused rather than broadcast.
    with pytest.raises(ValueError, match="one value per star"):
        compute_distances(fakemag, err, 10.0, ebv)
    with pytest.raises(ValueError, match="one value per star"):
        compute_distances(fakemag, err[:3], k, ebv)


def test_empty_batch() -> None:
    r = compute_distances([], [], [], [])
    assert len(r) == 0 and r.result_flags.shape == (0,)
