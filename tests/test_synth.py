"""The synthetic survey (astronn_dist.worker.modeling.synth): layout, statistics and truth against the real DR17 files.

The benchmarks are the two real apStar files in samples/apstar; each statistical test
asserts the real files inside the same bounds as the synthetic ones, so the bounds say what
"realistic" means here and cannot drift away from the real data unnoticed.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from astronn_dist.worker.modeling import synth
from astronn_dist.worker.science.continuum import N_NORMALIZED, normalize
from astronn_dist.worker.science.distance import A_K_PER_EBV, compute_distances
from astronn_dist.worker.science.spectra import read_apstar

N_STARS = 40
SEED = 5
MISSING = 0.2  # high, so that the survey has stars with missing Ks and missing E(B-V)

# DR17 chip edges: the [min, max] pixel over the visits of the two real files (HDU1 rows 2+)
# of the first covered pixel of each chip and of the first gap pixel after it.
REAL_EDGE_RANGES = (
    (197, 202), (3320, 3324), (3533, 3538), (6126, 6130), (6291, 6295), (8378, 8382)
)  # fmt: skip
MASKED = 0xFF | (1 << 12)  # the bits the continuum code masks


@pytest.fixture(scope="module")
def survey(tmp_path_factory) -> Path:
    return synth.write_survey(
        tmp_path_factory.mktemp("synth"), N_STARS, SEED, missing_fraction=MISSING
    )


@pytest.fixture(scope="module")
def rows(survey: Path) -> list[dict[str, str]]:
    with survey.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def files(survey: Path, rows) -> list[Path]:
    return [survey.parent / r["path"] for r in rows]


def col(rows, name: str) -> np.ndarray:
    return np.array([float(r[name]) for r in rows])


def coadd(path: Path) -> tuple[fits.Header, np.ndarray, np.ndarray, np.ndarray]:
    with fits.open(path) as hdul:
        return (hdul[0].header, *(hdul[i].data[0].copy() for i in (1, 2, 3)))


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
    return [(int(a), int(b)) for a, b in edges.reshape(-1, 2)]


# ------------------------------------------------------------------------------------ layout


def test_catalog_lists_every_file_with_its_identity(survey: Path, rows, files):
    assert survey.name == "catalog.csv"
    assert tuple(rows[0]) == synth.CATALOG_COLUMNS
    assert len(rows) == N_STARS
    assert all(p.is_file() and p.name.startswith("apStar-dr17-2MSYN") and p.suffix == ".fits"
               for p in files)  # fmt: skip
    ids = [r["spectrum_id"] for r in rows]
    assert len(set(ids)) == N_STARS
    for r, p in zip(rows, files):
        assert p.name == f"apStar-dr17-{r['spectrum_id']}.fits"
        assert not Path(r["path"]).is_absolute()


def test_hdu_layout_is_dr17(rows, files, apstar_files):
    real = {p.name: fits.open(p) for p in apstar_files}
    try:
        (bulge,) = [h for n, h in real.items() if "2M17335483" in n]  # 3 visits, 5 rows
        (kepler,) = [h for n, h in real.items() if "2M19485057" in n]  # 1 visit, 2 rows
        assert bulge[1].data.shape[0] == 2 + bulge[0].header["NVISITS"]
        assert kepler[1].data.shape[0] == 2 and kepler[0].header["NVISITS"] == 1
        for r, p in zip(rows, files):
            with fits.open(p) as hdul:
                assert len(hdul) == len(bulge) == 11
                nvis = int(r["nvisits"])
                assert hdul[0].header["NVISITS"] == nvis and hdul[0].header["SYNTHETC"] is True
                n_rows = 2 + nvis if nvis > 1 else 2
                for i in (1, 2, 3):
                    assert hdul[i].data.shape == (n_rows, synth.N_PIXELS)
                    assert hdul[i].data.dtype == bulge[i].data.dtype  # >f8, >f8, >i8
                    for key in ("CRVAL1", "CDELT1", "CRPIX1", "CTYPE1", "BUNIT"):
                        assert hdul[i].header[key] == bulge[i].header[key]
                for key in ("CRVAL1", "CDELT1", "CTYPE1", "NWAVE"):
                    assert hdul[0].header[key] == bulge[0].header[key]
                if nvis == 1:  # row 1 is all zeros, as in the single-visit DR17 file
                    assert not hdul[1].data[1].any() and not hdul[3].data[1].any()
                    assert hdul[0].header["SNRVIS1"] == kepler[0].header["SNRVIS1"] == 0.0
                else:  # row 1 unflagged, visit rows zero outside their own coverage
                    assert not hdul[3].data[1].any() and not bulge[3].data[1].any()
                    for v in range(nvis):
                        flux = hdul[1].data[2 + v]
                        covered = flux != 0
                        assert not hdul[2].data[2 + v][~covered].any()
                        snr = np.median(flux[covered] / hdul[2].data[2 + v][covered])
                        assert hdul[0].header[f"SNRVIS{v + 1}"] == pytest.approx(snr)
    finally:
        for h in real.values():
            h.close()


def test_chip_gaps_are_where_and_as_dr17_has_them(files, apstar_files):
    kept = np.zeros(synth.N_PIXELS, dtype=bool)
    for s, e in synth.DR17_KEPT:
        kept[s:e] = True
    for path in [*apstar_files, *files]:
        header, flux, err, bitmask = coadd(path)
        gap = ~np.isfinite(flux)
        # The coadd's gaps: NaN flux and error, bitmask 0, four runs at the chip edges.
        assert np.array_equal(gap, ~np.isfinite(err)) and not bitmask[gap].any()
        gaps = runs(gap)
        assert len(gaps) == 4 and gaps[0][0] == 0 and gaps[-1][1] == synth.N_PIXELS
        edges = [gaps[0][1], gaps[1][0], gaps[1][1], gaps[2][0], gaps[2][1], gaps[3][0]]
        assert all(lo <= x <= hi for x, (lo, hi) in zip(edges, REAL_EDGE_RANGES)), (path, edges)
        assert 770 <= gap.sum() <= 790
        assert not (gap & kept).any()  # the normalised 7514 pixels never touch a gap
        # Header SNR: the median per-pixel flux/err over the covered pixels (DR17's definition).
        assert header["SNR"] == pytest.approx(np.median(flux[~gap] / err[~gap]), rel=1e-9)


# ------------------------------------------------------------------------------- statistics


def pixel_stats(path: Path) -> dict[str, float]:
    header, flux, err, bitmask = coadd(path)
    ok = np.isfinite(flux)
    b = bitmask[ok]
    clean = ok & (bitmask == 0)
    rel = err[clean] / flux[clean] * header["SNR"]
    return {
        "flagged": float((b != 0).mean()),
        "masked": float(((b & MASKED) != 0).mean()),
        "huge_err": float((err[ok] > 1e9).mean()),
        "rel_err_p5": float(np.percentile(rel, 5)),
        "rel_err_p50": float(np.percentile(rel, 50)),
        "rel_err_p95": float(np.percentile(rel, 95)),
        # median flux brought to H = 10.44 (flux ~ 10^(-0.4 H) [1e-17 erg/s/cm^2/A])
        "flux_at_h": float(np.median(flux[ok]) * 10 ** (0.4 * (header["H"] - 10.44))),
        **{f"bit{k}": float(((b >> k) & 1).mean()) for k in range(15)},
    }


# name: (low, high) bounds that both real files and the synthetic survey's median satisfy.
# Real values: flagged 0.136/0.183, masked 0.022/0.040, err > 1e9 0.006/0.018, clean
# err/flux*SNR p5 0.80/0.86, p50 0.97/0.96, p95 1.88/1.89, flux at H=10.44 743/749.
BOUNDS = {
    "flagged": (0.08, 0.25),
    "masked": (0.015, 0.05),
    "huge_err": (0.004, 0.03),
    "rel_err_p5": (0.75, 0.92),
    "rel_err_p50": (0.93, 1.02),
    "rel_err_p95": (1.6, 2.1),
    "flux_at_h": (650.0, 850.0),
    "bit12": (0.012, 0.03),  # SIG_SKYLINE
    "bit13": (0.04, 0.07),  # SIG_TELLURIC
}


def test_pixel_statistics_are_those_of_the_real_files(files, apstar_files):
    real = [pixel_stats(p) for p in apstar_files]
    fake = [pixel_stats(p) for p in files]
    for name, (lo, hi) in BOUNDS.items():
        for r in real:
            assert lo <= r[name] <= hi, f"real file outside the bound of {name}: {r[name]}"
        median = float(np.median([f[name] for f in fake]))
        assert lo <= median <= hi, f"synthetic median {name} = {median} outside [{lo}, {hi}]"
    # flux_at_h is a per-star law, not only a median: every star follows it
    assert all(600 <= f["flux_at_h"] <= 900 for f in fake)
    # Masked (0-7, 12) and unmasked (8-11, 13, 14) bits occur, as in the real files (which
    # show 0, 4, 5, 7, 8, 10-14); PERSIST_HIGH (9) and CRPIX (1) are rarer but present.
    for bit in (0, 1, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14):
        assert any(f[f"bit{bit}"] > 0 for f in fake), bit
    assert not any(f[f"bit{k}"] for f in fake for k in (2, 3, 6))


def test_unusable_pixels_have_dr17_sized_errors(files):
    for path in files[:10]:
        _, flux, err, bitmask = coadd(path)
        bad = (bitmask & (synth.BADPIX | synth.NOSKY)) != 0
        assert bad.any() and (err[bad] > 1e12).all() and np.isfinite(flux[bad]).all()


# ------------------------------------------------------------- the project's own readers


def test_files_load_and_normalize_without_warnings(rows, files):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spectra = [read_apstar(p) for p in files]
        norm_flux, norm_err = normalize(
            np.stack([s.flux for s in spectra]),
            np.stack([s.err for s in spectra]),
            np.stack([s.bitmask for s in spectra]),
        )
    for r, s in zip(rows, spectra):
        assert s.obj_id == r["spectrum_id"]
        assert s.nvisits == int(r["nvisits"]) and s.snr == pytest.approx(float(r["snr"]))
        for attr, name in (("k_mag", "k_mag"), ("ebv", "ebv")):
            value = float(r[name])
            assert (getattr(s, attr) is None) if math.isnan(value) else getattr(s, attr) == value
    assert norm_flux.shape == (N_STARS, N_NORMALIZED) and np.isfinite(norm_flux).all()
    # No chip spoiled (a NaN at a continuum pixel would turn a whole chip into 1.0), and the
    # normalised level is a spectrum's: lines below 1, continuum about 1 (real: 0.92 and 0.99).
    for chip in np.split(norm_flux, [3028, 3028 + 2495], axis=1):
        assert ((chip == 1.0).mean(axis=1) < 0.1).all()
    medians = np.median(norm_flux, axis=1)
    assert ((medians > 0.7) & (medians < 1.02)).all()
    assert (np.percentile(norm_flux, 1, axis=1) < 0.95).all()


def test_header_photometry_and_missing_values_as_dr17(rows, files, apstar_files):
    (bulge,) = [p for p in apstar_files if "2M17335483" in p.name]  # SFD_EBV missing there
    missing_value = fits.getheader(bulge)["SFD_EBV"]
    n_k = n_ebv = 0
    for r, p in zip(rows, files):
        header = fits.getheader(p)
        k, ebv = float(r["k_mag"]), float(r["ebv"])
        n_k += math.isnan(k)
        n_ebv += math.isnan(ebv)
        assert header["K"] == missing_value if math.isnan(k) else header["K"] == k
        assert header["SFD_EBV"] == missing_value if math.isnan(ebv) else header["SFD_EBV"] == ebv
    assert n_k >= 1 and n_ebv >= 1 and n_k + n_ebv <= N_STARS // 2


# ------------------------------------------------------------------------------------ truth


def test_truth_is_self_consistent(rows):
    m_ks, dist, a_k, fakemag = (col(rows, c) for c in ("m_ks", "dist", "a_k", "fakemag"))
    k_mag, ebv = col(rows, "k_mag"), col(rows, "ebv")
    teff, logg, mass = col(rows, "teff"), col(rows, "logg"), col(rows, "mass")
    has_k, has_ebv = np.isfinite(k_mag), np.isfinite(ebv)

    np.testing.assert_allclose(k_mag[has_k], (m_ks + 5 * np.log10(dist / 10) + a_k)[has_k],
                               rtol=0, atol=1e-9)  # fmt: skip
    np.testing.assert_allclose(fakemag, 10 ** (0.2 * m_ks + 2), rtol=1e-12)
    np.testing.assert_allclose(a_k[has_ebv], A_K_PER_EBV * ebv[has_ebv], rtol=1e-12)
    np.testing.assert_allclose(m_ks, synth.absolute_ks(teff, logg, mass), rtol=0, atol=1e-9)
    # The stated luminosity relation, written out once more from first principles.
    log_l = np.log10(mass) + 4.438 - logg + 4 * np.log10(teff / 5772)
    bc_k = 1.47 + 0.65 * (5772 - teff) / 1000
    np.testing.assert_allclose(m_ks, 4.74 - 2.5 * log_l - bc_k, atol=1e-9)
    # Known anchors: the Sun; a red-clump giant has M_Ks ~ -1.6.
    assert synth.absolute_ks(5772, 4.438, 1.0) == pytest.approx(3.27)
    assert -2.0 < synth.absolute_ks(4750, 2.45, 1.2) < -1.3

    # The project's own distance code gives back the true distance from the true fakemag.
    both = has_k & has_ebv
    result = compute_distances(fakemag[both], 0.05 * fakemag[both], k_mag[both], ebv[both])
    np.testing.assert_allclose(result.dist, dist[both], rtol=1e-9)

    # Ranges of the brief (APOGEE-like).
    assert ((k_mag[has_k] >= 7) & (k_mag[has_k] <= 13.5)).all()
    assert ((ebv[has_ebv] >= 0.01) & (ebv[has_ebv] <= 1.0)).all()
    assert ((dist >= 50) & (dist <= 20_000)).all()
    kind = np.array([r["kind"] for r in rows])
    giants = kind != "dwarf"
    assert 0.6 <= giants.mean() <= 0.95
    assert ((teff[giants] >= 3800) & (teff[giants] <= 5200)).all()
    assert ((logg[giants] >= 0.8) & (logg[giants] <= 3.5)).all()
    assert ((teff[~giants] >= 4500) & (teff[~giants] <= 6500)).all()
    assert ((logg[~giants] >= 4.0) & (logg[~giants] <= 4.7)).all()
    m_h = col(rows, "m_h")
    assert ((m_h >= -1.5) & (m_h <= 0.4)).all()
    assert ((col(rows, "snr") > 30) & (col(rows, "snr") < 400)).all()


def test_luminosity_can_be_read_from_the_spectrum():
    """A linear (kernel ridge) fit on 500 noisy model spectra recovers M_Ks on 100 others."""
    n, n_train = 600, 500
    stars = [synth.draw_star(synth.star_rng(99, i), i, "x") for i in range(n)]
    model = synth.absorption_spectra(
        *([getattr(s, k) for s in stars] for k in ("teff", "logg", "m_h", "alpha_m", "c_n"))
    )
    keep = np.concatenate([np.arange(s, e) for s, e in synth.DR17_KEPT])
    snr = np.array([s.snr_target for s in stars])[:, None]
    x = model[:, keep] + np.random.default_rng(0).standard_normal((n, keep.size)) / snr
    x = -np.log(np.clip(x, 1e-3, None))
    x -= x[:n_train].mean(axis=0)
    y = np.array([s.m_ks for s in stars])
    gram = x[:n_train] @ x[:n_train].T
    alpha = np.linalg.solve(gram + 0.1 * np.eye(n_train), y[:n_train] - y[:n_train].mean())
    pred = x[n_train:] @ (x[:n_train].T @ alpha) + y[:n_train].mean()
    rms = float(np.sqrt(np.mean((pred - y[n_train:]) ** 2)))
    assert rms < 0.8 and rms < 0.3 * y[n_train:].std()  # measured: 0.52 mag vs 2.75 mag


def test_gravity_alone_changes_the_spectrum_beyond_the_noise():
    """Two giants that differ only in log g by 0.2 dex are > 10 sigma apart at S/N 100."""
    a, b = synth.absorption_spectra(4700.0, [2.4, 2.6], 0.0, 0.0, -0.1)
    keep = np.concatenate([np.arange(s, e) for s, e in synth.DR17_KEPT])
    chi2 = np.sum(((a - b)[keep] * 100.0) ** 2)
    assert chi2 > 100.0


# ------------------------------------------------------------------------------ determinism


def test_same_seed_same_bytes_and_prefix_stable(tmp_path, rows, files):
    first = synth.write_survey(tmp_path / "a", 3, SEED, missing_fraction=MISSING)
    again = synth.write_survey(tmp_path / "b", 3, SEED, missing_fraction=MISSING)
    assert first.read_bytes() == again.read_bytes()
    with first.open(newline="") as fh:
        small = list(csv.DictReader(fh))
    assert small == rows[:3]  # star i does not depend on how many stars are drawn
    for r, big in zip(small, files):
        a, b = (first.parent / r["path"]).read_bytes(), (again.parent / r["path"]).read_bytes()
        assert a == b == big.read_bytes()


def test_other_seed_other_stars(tmp_path, rows):
    other = synth.write_survey(tmp_path / "c", 3, SEED + 1, missing_fraction=MISSING)
    with other.open(newline="") as fh:
        small = list(csv.DictReader(fh))
    assert not {r["spectrum_id"] for r in small} & {r["spectrum_id"] for r in rows}
    for a, b in zip(small, rows):
        assert a["teff"] != b["teff"] and a["dist"] != b["dist"]


def test_line_list_is_fixed_and_spares_the_continuum_pixels():
    lines = synth.line_list()
    assert lines is synth.line_list() and len(lines.center) > 5000
    # Another process draws the same list: it is seeded by a constant, not the survey seed.
    synth.line_list.cache_clear()
    again = synth.line_list()
    np.testing.assert_array_equal(lines.center, again.center)
    np.testing.assert_array_equal(lines.coef, again.coef)
    # Randomly placed lines keep 3 pixels away from DR17 continuum pixels.
    cont = np.flatnonzero(synth.dr17_continuum_pixels())
    random_lines = np.isin(lines.group, ["metal", "alpha", "gravity", "ion", "C", "OH", "CN"])
    nearest = np.min(np.abs(lines.center[random_lines][:, None] - cont[None, :]), axis=1)
    assert nearest.min() > 2.5


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="visits"):
        synth.write_survey(tmp_path, 1, visits=(0, 2))
    with pytest.raises(ValueError, match="seed"):
        synth.write_survey(tmp_path, 1, seed=-1)
    with pytest.raises(ValueError, match="missing_fraction"):
        synth.write_survey(tmp_path, 1, missing_fraction=1.5)
