"""astronn_dist.worker.api.distances: the notebook entry point equals the service's rows and carries units."""

from __future__ import annotations

from pathlib import Path

import astropy.units as u
import numpy as np
import pytest

from _service import build_checkpoint  # tests/ is on sys.path
from astronn_dist.worker.api import distances
from astronn_dist.worker.science.distance import FLAG_MISSING_EXTINCTION, FLAG_NO_RESULT

KEPLER = "apStar-dr17-2M19485057+5005279.fits"
BULGE = "apStar-dr17-2M17335483-2753043.fits"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("model") / "random-dr17.pt")


def test_table_with_units_and_flags(model: Path, sample_dir: Path, tmp_path: Path) -> None:
    paths = [sample_dir / KEPLER, sample_dir / BULGE, tmp_path / "missing.fits"]
    table = distances(paths, k_mag=[11.0, None, 10.0], ebv=[0.3, None, 0.1], model=model,
                      mc_passes=4, device="cpu")
    assert list(table["spectrum_id"]) == [str(p) for p in paths]
    assert table["dist"].unit == u.pc and table["k_mag"].unit == u.mag and table["t_elapsed"].unit == u.s
    assert table.meta["model_id"].startswith("random-dr17-") and table.meta["mc_passes"] == 4
    kepler, bulge, missing = table
    assert kepler["k_mag"] == 11.0 and kepler["a_k_mag"] == pytest.approx(0.3517 * 0.3)
    assert np.isfinite(kepler["dist"]) and kepler["error"] == ""
    assert bulge["k_mag"] == pytest.approx(9.811)  # the header's Ks
    assert bulge["result_flags"] & FLAG_MISSING_EXTINCTION and bulge["flag_missing_extinction"]
    assert bulge["flag_warn"] and not bulge["flag_no_result"]
    assert missing["result_flags"] == FLAG_NO_RESULT and missing["flag_no_result"] and missing["flag_bad"]
    assert np.isnan(missing["dist"]) and missing["error"] == "file not found"


def test_same_numbers_as_the_service(model: Path, sample_dir: Path) -> None:
    """The rows of process_batch (what a worker writes) for the same ids: identical."""
    from astronn_dist.worker.science.inference import Predictor
    from astronn_dist.worker.science.model import load_model
    from astronn_dist.worker.science.pipeline import SpectrumRequest, process_batch

    table = distances([sample_dir / KEPLER], spectrum_ids=["kepler"], model=model, mc_passes=4,
                      seed=3, device="cpu")
    predictor = Predictor(load_model(model), mc_passes=4, seed=3)
    (record,) = process_batch([SpectrumRequest("kepler", str(sample_dir / KEPLER))], predictor)
    for name in ("L_fakemag", "L_fakemag_err", "dist", "dist_err", "k_mag", "ebv", "result_flags"):
        assert table[name][0] == getattr(record, name), name


def test_mismatched_lengths_are_refused(model: Path, sample_dir: Path) -> None:
    with pytest.raises(ValueError, match="one per path"):
        distances([sample_dir / KEPLER], k_mag=[1.0, 2.0], model=model)
    with pytest.raises(ValueError, match="distinct"):
        distances([sample_dir / KEPLER] * 2, model=model)
