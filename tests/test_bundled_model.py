"""The bundled demonstration model, closed loop: a held-out synthetic survey (a seed the model
never saw) through the full pipeline recovers the true distances, with calibrated uncertainties.

The survey is written by astronn_dist.worker.modeling.synth, so every star's true fakemag and distance are known
exactly and its photometry carries no noise: the distance error is the fakemag error alone.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest

import torch  # noqa: F401  (the bundled model needs it)

from astronn_dist.worker.modeling import synth  # noqa: E402
from astronn_dist.worker.config import BUNDLED_MODEL  # noqa: E402
from astronn_dist.worker.science.distance import (  # noqa: E402
    FLAG_MISSING_EXTINCTION,
    FLAG_MISSING_PHOTOMETRY,
    FLAG_NO_RESULT,
)
from astronn_dist.worker.science.inference import Predictor  # noqa: E402
from astronn_dist.worker.science.model import load_model  # noqa: E402
from astronn_dist.worker.science.pipeline import SpectrumRequest, process_batch  # noqa: E402

HELD_OUT_SEED = 20261201  # the bundled model was trained on seed 1 (see its MODEL_CARD.md)
N_STARS = 600
BATCH = 100


@pytest.fixture(scope="module")
def closed_loop(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Truth and pipeline output, one entry per star of the held-out survey."""
    catalog = synth.write_survey(
        tmp_path_factory.mktemp("held-out"), N_STARS, HELD_OUT_SEED, visits=(1, 1)
    )
    with catalog.open(newline="") as fh:
        stars = list(csv.DictReader(fh))
    requests = [
        SpectrumRequest(
            spectrum_id=s["spectrum_id"], path=str(catalog.parent / s["path"]),
            k_mag=float(s["k_mag"]), ebv=float(s["ebv"]),
        )
        for s in stars
    ]  # fmt: skip
    predictor = Predictor(load_model(BUNDLED_MODEL), mc_passes=100, seed=0)
    try:
        records = [
            r for start in range(0, len(requests), BATCH)
            for r in process_batch(requests[start : start + BATCH], predictor)
        ]  # fmt: skip
    finally:
        predictor.close()
    return {
        "true_fakemag": np.array([float(s["fakemag"]) for s in stars]),
        "true_dist": np.array([float(s["dist"]) for s in stars]),
        "fakemag": np.array([r.L_fakemag for r in records]),
        "fakemag_err": np.array([r.L_fakemag_err for r in records]),
        "dist": np.array([r.dist for r in records]),
        "dist_err": np.array([r.dist_err for r in records]),
        "flags": np.array([r.result_flags for r in records]),
    }


def test_the_bundled_model_is_the_default_and_loads():
    loaded = load_model(BUNDLED_MODEL)
    assert loaded.model_id.startswith("astronn-dist-demo-")
    assert BUNDLED_MODEL.stat().st_size < 10 * 2**20  # "a few MB" inside the package
    assert (BUNDLED_MODEL.parent / "MODEL_CARD.md").is_file()


def test_every_held_out_star_has_a_result(closed_loop):
    assert not np.any(closed_loop["flags"] & FLAG_NO_RESULT)
    assert np.all(np.isfinite(closed_loop["fakemag"])) and np.all(closed_loop["fakemag"] > 0)


def test_distances_are_recovered(closed_loop):
    usable = (closed_loop["flags"] & (FLAG_MISSING_PHOTOMETRY | FLAG_MISSING_EXTINCTION)) == 0
    assert usable.sum() >= 0.9 * N_STARS
    rel = (closed_loop["dist"][usable] - closed_loop["true_dist"][usable]) / closed_loop[
        "true_dist"
    ][usable]
    median = float(np.median(rel))
    scatter = float(1.4826 * np.median(np.abs(rel - median)))  # robust standard deviation
    print(f"\n(dist - true)/true over {usable.sum()} held-out stars: median {median:+.4f}, "
          f"robust scatter {scatter:.4f}, std {np.std(rel):.4f}")
    assert abs(median) < 0.05
    assert scatter < 0.25


def test_uncertainties_are_calibrated(closed_loop):
    pull = (closed_loop["fakemag"] - closed_loop["true_fakemag"]) / closed_loop["fakemag_err"]
    usable = (closed_loop["flags"] & (FLAG_MISSING_PHOTOMETRY | FLAG_MISSING_EXTINCTION)) == 0
    inside = np.abs(closed_loop["dist"] - closed_loop["true_dist"]) <= closed_loop["dist_err"]
    share = float(inside[usable].mean())
    print(f"\nstd of (fakemag - true)/fakemag_err {np.std(pull):.3f} over {len(pull)} stars; "
          f"true distance within dist_err for {share:.3f} of {usable.sum()}")
    assert 0.7 <= float(np.std(pull)) <= 1.4
    assert 0.55 <= share <= 0.8
