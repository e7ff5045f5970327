"""`astronn-dist report`: its numbers against a direct computation from the table and the
catalog, the parallax conversion against astroNN, and the page in headless Chromium."""

from __future__ import annotations

import csv
import io
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from astronn_dist.producer.report import collect, write_report
from astronn_dist.producer.report.collect import MAG_EDGES, SNR_EDGES
from astronn_dist.producer.report.page import fmt
from astronn_dist.producer.report.reference import fakemag_from_parallax
from astronn_dist.producer.report.stream import SAMPLE_SIZE
from astronn_dist.worker.contract import FLAG_MISSING_PHOTOMETRY, FLAG_NO_RESULT
from astronn_dist.worker.service.results import export_rows, make_engine, migrate, upsert_results

from _catalogs import write_catalog  # noqa: E402  (tests/ is on sys.path)
from _service import run_cli  # noqa: E402

N_STARS = 40


def _cli(*args: str) -> str:
    """astronn-dist ARGS in a process of its own (module fixtures have no capsys)."""
    done = subprocess.run([sys.executable, "-m", "astronn_dist.producer.cli", *args], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if not k.startswith("ASTRONN_DIST_")})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def survey(tmp_path_factory) -> dict:
    """A synthetic survey (truth in its catalog) processed by `run` at 5 MC passes (bundled model)."""
    folder = tmp_path_factory.mktemp("survey")
    _cli("synth", str(folder), "--n", str(N_STARS), "--seed", "5")
    db = f"sqlite:///{folder / 'results.sqlite'}"
    _cli("run", "--catalog", str(folder / "catalog.csv"), "--db", db, "--mc-passes", "5")
    engine = make_engine(db)
    (model_id,) = {r["model_id"] for r in export_rows(engine)}
    engine.dispose()
    return {"folder": folder, "catalog": folder / "catalog.csv", "db": db, "model_id": model_id}


def _median(values: list[float]) -> float:
    return float(np.median(np.array(values))) if values else float("nan")


def direct_truth(db: str, catalog: Path, model_id: str) -> dict:
    """What the report must say, computed row by row from the whole table and the whole catalog."""
    engine = make_engine(db)
    rows = {r["spectrum_id"]: r for r in export_rows(engine, model_id)}
    engine.dispose()
    out: dict = {"fakemag": {"offset": [], "z": [], "snr": [], "ks": []}, "dist": {"offset": [], "z": [], "snr": [], "ks": []}}
    with catalog.open() as fh:
        for star in csv.DictReader(fh):
            row = rows.get(star["spectrum_id"])
            if row is None or row["result_flags"] & FLAG_NO_RESULT or row["L_fakemag"] is None:
                continue
            has_ks = not row["result_flags"] & FLAG_MISSING_PHOTOMETRY
            truth_l, truth_d = float(star["fakemag"]), float(star["dist"])
            pairs = [("fakemag", row["L_fakemag"], row["L_fakemag_err"], truth_l)]
            if has_ks and row["dist"] is not None:
                pairs.append(("dist", row["dist"], row["dist_err"], truth_d))
            for name, value, error, truth in pairs:
                out[name]["offset"].append((value - truth) / truth)
                out[name]["z"].append((value - truth) / error)
                out[name]["snr"].append(float(star["snr"]))
                out[name]["ks"].append(row["k_mag"] if has_ks else math.nan)
    return out


def _summary(values: dict, which: np.ndarray | None = None) -> tuple[int, float, float]:
    z = np.array(values["z"])
    offset = np.array(values["offset"])
    if which is not None:
        z, offset = z[which], offset[which]
    return len(z), float(np.mean(np.abs(z) <= 1.0)) if len(z) else math.nan, _median(list(offset))


def test_coverage_and_median_offsets_equal_a_direct_computation(survey, tmp_path: Path):
    page = tmp_path / "report.html"
    data = write_report(make_engine(survey["db"]), page, survey["model_id"], catalog=survey["catalog"])
    expected = direct_truth(survey["db"], survey["catalog"], survey["model_id"])
    html = page.read_text()
    names = {"truth: fakemag": "fakemag", "truth: distance": "dist"}
    assert [c.name for c in data.comparisons] == list(names)
    for comparison in data.comparisons:
        values = expected[names[comparison.name]]
        n, coverage, median = _summary(values)
        overall = comparison.by_snr.overall()
        assert (overall.n, overall.exact) == (n, True) and n >= N_STARS - 5
        assert overall.coverage == pytest.approx(coverage, abs=1e-12)
        assert overall.median_offset == pytest.approx(median, abs=1e-12)
        assert comparison.by_mag.overall().coverage == overall.coverage
        # per bin of S/N and of Ks: counts, coverage, medians
        snr, ks = np.array(values["snr"]), np.array(values["ks"])
        for stats, x, edges in ((comparison.by_snr.bins(), snr, SNR_EDGES), (comparison.by_mag.bins(), ks, MAG_EDGES)):
            which = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
            which[~np.isfinite(x)] = len(edges) - 1
            assert sum(s.n for s in stats) == n
            bins = [b for b in range(len(edges)) if (which == b).any()]
            assert len(bins) == len(stats)
            for b, s in zip(bins, stats):
                count, cov, med = _summary(values, which == b)
                assert (s.n, s.coverage, s.median_offset) == (count, pytest.approx(cov, abs=1e-12), pytest.approx(med, abs=1e-12))
        # the page shows the numbers
        assert f"<td class=\"n\">{fmt(overall.coverage)}</td><td class=\"n\">{fmt(overall.median_offset)}</td>" in html
    assert data.catalog is not None and data.catalog.rows == N_STARS and data.catalog.matched == N_STARS
    # counts by outcome and flag bit against the table
    engine = make_engine(survey["db"])
    rows = list(export_rows(engine, survey["model_id"]))
    engine.dispose()
    assert data.rows == len(rows) == N_STARS
    assert data.outcomes["failed"] == sum(bool(r["result_flags"] & FLAG_NO_RESULT) for r in rows)
    assert data.outcomes["good"] == sum(not r["flag_bad"] for r in rows)
    assert data.flags["flag_missing_photometry"] == sum(bool(r["result_flags"] & FLAG_MISSING_PHOTOMETRY) for r in rows)
    assert data.fakemag.total == sum(r["L_fakemag"] is not None for r in rows)
    assert sum(data.rate.bins.values()) == N_STARS and sum(h.rows for h in data.rate.hosts.values()) == N_STARS
    assert data.snr_frac_err is not None and data.snr_frac_err.seen == sum(r["dist"] is not None for r in rows) - \
        sum(bool(r["result_flags"] & FLAG_MISSING_PHOTOMETRY) for r in rows)
    assert data.kiel is not None and data.kiel.seen == N_STARS
    assert "the results table holds no S/N" in html


def test_the_page_is_self_contained(survey, tmp_path: Path):
    page = tmp_path / "report.html"
    write_report(make_engine(survey["db"]), page, survey["model_id"], catalog=survey["catalog"])
    html = page.read_text()
    links = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", html)
    assert links and all(link.startswith("data:") for link in links), [link[:40] for link in links if not link.startswith("data:")]
    assert "<script" not in html and "@import" not in html and "url(" not in html
    assert html.count("data:image/png;base64,") >= 10


def test_compare_two_models_on_the_spectra_both_have(survey, tmp_path: Path):
    """A second model's rows for most of the survey's spectra, fakemag scaled by known factors."""
    engine = make_engine(survey["db"])
    rows = list(export_rows(engine, survey["model_id"]))
    rng = np.random.default_rng(1)
    other, expected = [], []
    for row in rows[5:]:  # the first five: only in the first model
        new = {k: v for k, v in row.items() if k not in ("created",)}
        new["model_id"] = "other-000000000000"
        if row["L_fakemag"] is not None:
            factor = 1.0 + 0.05 * rng.standard_normal()
            new["L_fakemag"] = row["L_fakemag"] * factor
            expected.append(factor - 1.0)
        other.append(new)
    other.append({**other[0], "spectrum_id": "only-in-other"})
    upsert_results(engine, other)
    data = collect(engine, survey["model_id"], compare="other-000000000000")
    engine.dispose()
    c = data.compare
    assert c is not None
    assert (c.common, c.only_this, c.only_other, c.n) == (len(rows) - 5, 5, 1, len(expected))
    assert c.mean == pytest.approx(np.mean(expected), abs=1e-12)
    assert c.std == pytest.approx(np.std(expected), abs=1e-9)
    assert np.median(c.sample.sample[:, 2]) == pytest.approx(np.median(expected), abs=1e-12)


def _fake_rows(model_id: str, truth: np.ndarray, ks: np.ndarray, rng: np.random.Generator) -> list[dict]:
    """Rows whose fakemag scatters around the truth by exactly its stated 10 % error."""
    error = 0.1 * truth
    fakemag = truth + error * rng.standard_normal(len(truth))
    rows = []
    for i in range(len(truth)):
        rows.append({"spectrum_id": f"s{i:06d}", "model_id": model_id, "path": f"/data/s{i:06d}.fits",
                     "pipeline_version": "test", "k_mag": ks[i], "ebv": 0.1, "a_k_mag": 0.03517,
                     "L_fakemag": fakemag[i], "L_fakemag_err": error[i], "dist": 1000.0, "dist_err": 100.0,
                     "result_flags": 0, "flag_warn": False, "flag_bad": False, "host": f"node{i % 3}",
                     "t_elapsed": 0.01})
    return rows


@pytest.mark.service
def test_gaia_parallaxes_at_scale_on_postgresql(postgres_url: str, tmp_path: Path):
    """35,000 rows (more than a sample holds) against a Parquet catalog with Gaia parallaxes
    under alias names, negative and missing ones included: coverage and counts are exact, the
    sampled median is within its sampling error of the true one."""
    n = 35_000
    rng = np.random.default_rng(7)
    ks = rng.uniform(7.5, 13.5, n)
    truth = 10 ** rng.uniform(1.0, 3.0, n)
    migrate(postgres_url)
    engine = make_engine(postgres_url)
    rows = _fake_rows("gaia-test", truth, ks, rng)
    for start in range(0, n, 5000):
        upsert_results(engine, rows[start : start + 5000])
    # parallax [mas] whose fakemag is the truth, then noise; some missing, some without an error
    mag = ks - 0.03517
    plx_true = truth / 10 ** (0.2 * mag)
    plx_err = 0.05 * plx_true + 0.02
    plx = plx_true + plx_err * rng.standard_normal(n)
    plx[:200] = -np.abs(plx[:200])  # negative parallaxes: kept, as astroNN keeps them
    plx[200:300] = np.nan
    plx_err[300:400] = np.nan
    snr = rng.uniform(40, 400, n)
    catalog = write_catalog("parquet", tmp_path / "gaia", {
        "spectrum_id": [r["spectrum_id"] for r in rows], "PLX": plx.tolist(), "e_plx": plx_err.tolist(),
        "SNR": snr.tolist()})
    # a second model on 1,000 of the spectra: compared while the first model's rows stream
    # (PostgreSQL: a server-side cursor with lookups between its fetches)
    second = [{**r, "model_id": "second", "L_fakemag": r["L_fakemag"] * 1.1} for r in rows[::35]]
    upsert_results(engine, second)
    data = collect(engine, "gaia-test", catalog=catalog, compare="second")
    engine.dispose()
    assert data.compare is not None
    assert (data.compare.common, data.compare.only_this, data.compare.only_other) == (1000, n - 1000, 0)
    assert data.compare.mean == pytest.approx(0.1, abs=1e-9) and data.compare.std < 1e-9
    (gaia,) = data.comparisons
    ref = plx * 10 ** (0.2 * mag)
    ref_err = np.abs(plx_err / plx * ref)
    fakemag = np.array([r["L_fakemag"] for r in rows])
    z = (fakemag - ref) / np.hypot(truth * 0.1, ref_err)
    offset = (fakemag - ref) / fakemag
    ok = np.isfinite(z)
    assert ok.sum() == n - 200 and gaia.no_reference == 200
    overall = gaia.by_snr.overall()
    assert overall.n == ok.sum() and not overall.exact
    assert overall.coverage == pytest.approx(np.mean(np.abs(z[ok]) <= 1), abs=1e-12)
    assert abs(overall.coverage - 0.6827) < 0.02
    assert abs(overall.median_offset - np.median(offset[ok])) < 0.01
    for stats in gaia.by_snr.bins():
        assert stats.n <= SAMPLE_SIZE or not stats.exact
    assert {h: s.rows for h, s in data.rate.hosts.items()} == {f"node{k}": len(range(k, n, 3)) for k in range(3)}
    assert data.rows == n and data.outcomes["good"] == n


@pytest.mark.reference
def test_parallax_conversion_equals_astroNNs_mag_to_fakemag_on_edge_cases():
    pytest.importorskip("astroNN", reason="astroNN 1.1.0 (the `reference` extra) is not installed")
    from astroNN.config import MAGIC_NUMBER
    from astroNN.gaia import mag_to_fakemag

    #                 usual  negative  zero  NaN plx  magic plx  NaN err  zero err  magic mag  NaN mag  mag<-90
    mag = np.array([10.2, 11.0, 9.5, 10.0, 10.0, 12.0, 12.0, -9999.0, np.nan, -95.0, 7.3])
    plx = np.array([1.5, -0.3, 0.0, np.nan, -9999.0, 0.8, 0.8, 1.0, 1.0, 1.0, 4.2])
    err = np.array([0.1, 0.2, 0.1, 0.1, 0.1, np.nan, 0.0, 0.1, 0.1, 0.1, 0.03])
    with np.errstate(all="ignore"):  # astroNN divides by the zero parallax
        theirs, theirs_err = mag_to_fakemag(mag, plx, err)
    ours, ours_err = fakemag_from_parallax(mag, plx, err)

    def astronn_missing_is_nan(values: np.ndarray) -> np.ndarray:
        return np.where(values == MAGIC_NUMBER, np.nan, values)

    np.testing.assert_array_equal(ours, astronn_missing_is_nan(theirs))
    np.testing.assert_array_equal(ours_err, astronn_missing_is_nan(theirs_err))
    assert ours[1] < 0 and ours[2] == 0 and np.isnan(ours_err[2]) and np.isnan(ours[3])
    # without an error: the same fakemag, errors NaN
    only, only_err = fakemag_from_parallax(mag, plx)
    np.testing.assert_array_equal(only, astronn_missing_is_nan(mag_to_fakemag(mag, plx)))
    assert np.isnan(only_err).all()


def test_report_command(capsys, survey, tmp_path: Path, monkeypatch):
    for name in [k for k in os.environ if k.startswith("ASTRONN_DIST_")]:
        monkeypatch.delenv(name)
    out = tmp_path / "r.html"
    args = ["report", str(out), "--db", survey["db"], "--catalog", str(survey["catalog"])]
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0 and out.is_file(), stdout + err
    assert "truth: fakemag" in stdout and "1-sigma coverage" in stdout
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "exists; pass --force" in err
    assert run_cli(capsys, *args, "--force")[0] == 0
    code, _, err = run_cli(capsys, "report", str(tmp_path / "r.txt"), "--db", survey["db"])
    assert code == 2 and "name it .html" in err
    code, _, err = run_cli(capsys, "report", str(tmp_path / "x.html"), "--db", survey["db"], "--model-id", "nope")
    assert code == 2 and "no rows of model nope" in err
    code, _, err = run_cli(capsys, "report", str(tmp_path / "y.html"), "--db", survey["db"],
                           "--catalog", str(tmp_path / "missing.csv"))
    assert code == 2 and "catalog not found" in err


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--window-size=1400,2400")
"""Headless, and nothing that reaches for the network (the machine has none)."""


def test_the_page_opens_in_headless_chromium_without_console_errors(survey, tmp_path: Path, monkeypatch):
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.fail("Chromium or chromedriver is not installed: run `bash scripts/system-packages.sh` as root "
                    "(Debian's chromium and chromium-driver); make test does")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    page = tmp_path / "report.html"
    write_report(make_engine(survey["db"]), page, survey["model_id"], catalog=survey["catalog"])
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not look for downloads
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        driver.get(page.as_uri())
        assert driver.title == f"astronn-dist report: {survey['model_id']}"
        images = driver.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        assert len(images) >= 10 and all(done and width > 100 for done, width in images), images
        logs = driver.get_log("browser")
        screenshot = driver.get_screenshot_as_png()
    finally:
        driver.quit()
    assert [entry for entry in logs if entry["level"] in ("SEVERE", "WARNING")] == []
    from matplotlib.image import imread

    pixels = imread(io.BytesIO(screenshot))  # (H, W, 3 or 4) floats in [0, 1]
    assert pixels.shape[0] > 1000 and pixels.shape[1] > 1000
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert pixels[..., :3].std() > 0.05 and len(colours) > 50, (pixels.std(), len(colours))
    assert (pixels[..., :3] < 0.5).mean() > 0.005  # text and plots, not a white page


def test_the_rows_without_a_result_and_a_missing_catalog_column(tmp_path: Path):
    """Failed rows count as failed and enter no histogram; a catalog with neither spectrum_id nor
    path is refused by name."""
    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    migrate(url)
    engine = make_engine(url)
    upsert_results(engine, [
        {"spectrum_id": "a", "model_id": "m", "path": "/a", "pipeline_version": "t", "result_flags": FLAG_NO_RESULT,
         "flag_warn": False, "flag_bad": True, "error": "unreadable"},
        {"spectrum_id": "b", "model_id": "m", "path": "/b", "pipeline_version": "t", "result_flags": 0,
         "flag_warn": False, "flag_bad": False, "L_fakemag": 100.0, "L_fakemag_err": 5.0, "dist": 800.0,
         "dist_err": 40.0, "k_mag": 10.0, "ebv": 0.1, "a_k_mag": 0.035},
    ])
    data = collect(engine, "m")
    assert data.outcomes == {"good": 1, "bad": 0, "failed": 1}
    assert data.fakemag.total == 1 and data.dist.total == 1 and data.flags["flag_no_result"] == 1
    from astronn_dist.worker.tables import CatalogError

    bad = write_catalog("csv", tmp_path / "bad", {"name": ["b"], "parallax": [1.0]})
    with pytest.raises(CatalogError, match="spectrum_id"):
        collect(engine, "m", catalog=bad)
    with sa.create_engine(url).connect() as conn:  # nothing was written by the report
        assert conn.execute(sa.text("SELECT count(*) FROM astro_nn_dist")).scalar() == 2
    engine.dispose()
