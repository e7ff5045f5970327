"""The whole service at once: a catalog of a few hundred spectra (the real DR17 files, copies,
variants with bad pixels, a gzipped copy and the science core's bad inputs) goes through
``astronn-dist produce`` into a real Redis, two real worker processes, and SQLite or PostgreSQL;
every spectrum ends with exactly one row, equal to the science core's direct output."""

from __future__ import annotations

import csv
import gzip
import math
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from _service import (  # tests/ is on sys.path
    Worker,
    bad_spectrum_files,
    build_checkpoint,
    rows,
    wait_for,
    worker_env,
)
from astronn_dist.producer.cli import main as cli_main
from astronn_dist.worker.science.distance import FLAG_NO_RESULT

pytestmark = [pytest.mark.service, pytest.mark.timeout(600)]

N_COPIES = 260  # symlinks to the two real files, under distinct spectrum ids
MC_PASSES = 10
NUMBERS = ("k_mag", "ebv", "a_k_mag", "L_fakemag", "L_fakemag_err", "dist", "dist_err")


def _variants(real: Path, folder: Path) -> list[Path]:
    """Copies of a real file with what real spectra have: NaN and negative pixels, masked bit
    blocks, zero-error pixels, a NaN chip."""
    out = []
    with fits.open(real) as hdul:
        base = [h.copy() for h in hdul]
    edits = {
        "nan-pixels": lambda f, e, m: f.__setitem__((0, slice(1000, 1040)), np.nan),
        "negative": lambda f, e, m: f.__setitem__((0, slice(5000, 5100)), -3.0),
        "masked-bits": lambda f, e, m: m.__setitem__((0, slice(2000, 2300)), 1 | 2**12),
        "zero-error": lambda f, e, m: e.__setitem__((0, slice(7000, 7100)), 0.0),
        "nan-chip": lambda f, e, m: f.__setitem__((0, slice(3400, 6000)), np.nan),
    }
    for name, edit in edits.items():
        hdus = fits.HDUList([h.copy() for h in base])
        flux, err, mask = (np.array(hdus[i].data) for i in (1, 2, 3))
        edit(flux, err, mask)
        for i, data in zip((1, 2, 3), (flux, err, mask)):
            hdus[i].data = data
        path = folder / f"apStar-dr17-variant-{name}.fits"
        hdus.writeto(path)
        out.append(path)
    gz = folder / f"{real.stem}-gz.fits.gz"
    with real.open("rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    out.append(gz)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("model") / "random-dr17.pt")


def _catalog(folder: Path, apstar_files: list[Path]) -> tuple[Path, list[dict]]:
    """A CSV catalog (paths relative to it) with per-star photometry, some of it missing."""
    spectra = folder / "spectra"
    spectra.mkdir()
    entries: list[dict] = []
    for i in range(N_COPIES):
        target = apstar_files[i % len(apstar_files)]
        link = spectra / f"{i:04d}-{target.name}"
        link.symlink_to(target)
        # Every star its own photometry; every 13th has no catalog Ks (the header's is used),
        # every 17th no catalog E(B-V).
        k = "" if i % 13 == 0 else f"{9.0 + 0.01 * i:.3f}"
        ebv = "" if i % 17 == 0 else f"{0.05 + 0.001 * i:.4f}"
        entries.append({"spectrum_id": f"copy-{i:04d}", "path": link, "k_mag": k, "ebv": ebv})
    for path in _variants(apstar_files[0], spectra):
        entries.append({"spectrum_id": path.name, "path": path, "k_mag": "10.1", "ebv": "0.2"})
    for name, path in bad_spectrum_files(spectra, str(apstar_files[1])).items():
        entries.append({"spectrum_id": f"bad-{name}", "path": Path(path), "k_mag": "10", "ebv": "0.1"})
    catalog = folder / "catalog.csv"
    with catalog.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["spectrum_id", "path", "k_mag", "ebv"])
        writer.writeheader()
        for e in entries:
            writer.writerow({**e, "path": e["path"].relative_to(folder).as_posix()})
    return catalog, entries


def _direct(entries: list[dict], checkpoint: Path) -> dict[str, object]:
    """The science core's output for the same spectra, weights, passes and seed, in one batch."""
    from astronn_dist.worker.science.inference import Predictor
    from astronn_dist.worker.science.model import load_model
    from astronn_dist.worker.science.pipeline import SpectrumRequest, process_batch

    def value(text: str) -> float | None:
        return float(text) if text else None

    requests = [SpectrumRequest(spectrum_id=e["spectrum_id"], path=str(e["path"]),
                                k_mag=value(e["k_mag"]), ebv=value(e["ebv"])) for e in entries]
    predictor = Predictor(load_model(checkpoint), mc_passes=MC_PASSES, seed=0, threads=1)
    try:
        return {r.spectrum_id: r for r in process_batch(requests, predictor)}
    finally:
        predictor.close()


@pytest.mark.filterwarnings("ignore:File may have been truncated")
@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_catalog_through_two_workers_gives_the_science_core_s_numbers(
    database: str, request: pytest.FixtureRequest, redis_url: str, checkpoint: Path,
    apstar_files: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    database_url = request.getfixturevalue(f"{database}_url")
    catalog, entries = _catalog(tmp_path, apstar_files)
    ids = [e["spectrum_id"] for e in entries]
    env = worker_env(redis_url=redis_url, database_url=database_url, model=checkpoint,
                     ASTRONN_DIST_DATA_ROOTS=str(tmp_path))
    workers = [Worker(env, tmp_path / f"worker-{i}.log", name=f"e2e-{i}", serve=True)
               for i in range(2)]
    try:
        for w in workers:
            w.wait_ready()
        t0 = time.monotonic()
        with pytest.raises(SystemExit) as done:
            cli_main(["produce", "--catalog", str(catalog), "--chunk-size", "16",
                      "--broker", redis_url, "--db", database_url, "--model", str(checkpoint)])
        assert done.value.code in (0, None)
        assert f"enqueued {len(ids)} spectra" in capsys.readouterr().out
        wait_for(lambda: {r["spectrum_id"] for r in rows(database_url)} >= set(ids), 300,
                 "a row for every spectrum", workers[0])
        elapsed = time.monotonic() - t0
        hosts = Counter(r["host"].split("@")[0] for r in rows(database_url))
    finally:
        for w in workers:
            w.stop()

    found = rows(database_url)
    counts = Counter(r["spectrum_id"] for r in found)
    assert sorted(counts) == sorted(ids) and set(counts.values()) == {1}
    assert set(hosts) == {"e2e-0", "e2e-1"}, f"both workers took chunks: {hosts}"

    direct = _direct(entries, checkpoint)
    for row in found:
        sid, expected = row["spectrum_id"], direct[row["spectrum_id"]]
        assert row["result_flags"] == expected.result_flags, sid
        assert (row["error"] is None) == (expected.error is None), sid
        for name in NUMBERS:
            want = getattr(expected, name)
            got = row[name]
            if want is None or (isinstance(want, float) and not math.isfinite(want)):
                assert got is None, (sid, name, got)
            else:  # same masks (seeded by spectrum id), float32 rounding of another batch
                assert got == pytest.approx(want, rel=2e-5, abs=1e-9), (sid, name)
    bad = [r for r in found if r["spectrum_id"].startswith("bad-")]
    assert bad and all(r["result_flags"] & FLAG_NO_RESULT and r["error"] for r in bad)
    good = [r for r in found if not r["spectrum_id"].startswith("bad-")]
    assert all(not r["result_flags"] & FLAG_NO_RESULT for r in good)
    with capsys.disabled():
        print(f"\n[{database}] {len(ids)} spectra through 2 workers in {elapsed:.1f} s "
              f"(rows by worker: {dict(hosts)}); every row equals the direct output")
