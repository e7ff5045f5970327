"""Training ApogeeDistBCNN on a small synthetic survey (astronn_dist.worker.modeling.synth), end to end on the CPU."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

import torch

from astronn_dist.worker.science.continuum import normalize  # noqa: E402
from astronn_dist.worker.science.model import load_model  # noqa: E402
from astronn_dist.worker.science.spectra import read_apstar  # noqa: E402
from astronn_dist.worker.modeling.synth import write_survey  # noqa: E402
from astronn_dist.worker.modeling.training import calibrate_variance_head, robust_mse, train  # noqa: E402

N_STARS = 200


@pytest.fixture(scope="module")
def survey(tmp_path_factory) -> Path:
    """A synthetic survey of 200 stars: its catalog CSV (apStar files beside it)."""
    torch.set_num_threads(2)  # the CI runners (and this machine) have two cores
    return Path(write_survey(tmp_path_factory.mktemp("survey"), N_STARS, 11))


def read_rows(catalog: Path) -> list[dict[str, str]]:
    with catalog.open(newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(catalog: Path, rows: list[dict[str, str]]) -> None:
    with catalog.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_short_run_learns_and_writes_a_loadable_checkpoint(survey, tmp_path):
    out = tmp_path / "models" / "tiny.pt"
    report = train(survey, out, epochs=4, batch_size=32, seed=0, progress=False)

    assert report.checkpoint == out and out.is_file()
    assert report.n_rows == N_STARS and report.n_missing_label == 0 and report.n_unreadable == 0
    assert report.n_train + report.n_val == N_STARS and report.n_val == 20
    assert report.epochs_run == 4 and not report.stopped_early

    history = read_rows(report.history)
    assert report.history == tmp_path / "models" / "tiny.history.csv"
    assert [int(r["epoch"]) for r in history] == [1, 2, 3, 4]
    assert {"epoch", "loss", "val_loss", "val_mape"} <= set(history[0])
    val_loss = [float(r["val_loss"]) for r in history]
    assert all(math.isfinite(v) for v in val_loss)
    # Training goes on improving after the first epoch, and the saved weights are the best epoch's.
    assert report.best_val_loss < val_loss[0]
    assert report.best_val_loss == min(val_loss) and val_loss[report.best_epoch - 1] == min(val_loss)
    assert 0 < report.best_val_mape < float(history[0]["val_mape"])

    # The checkpoint is the worker's format: load_model reads it, constants are set.
    fakemag = np.array([float(r["fakemag"]) for r in read_rows(survey)])
    model = load_model(out)
    state = model.net.state_dict()
    assert state["labels_std"].item() == pytest.approx(report.labels_std)
    assert 0.5 * fakemag.std() < report.labels_std < 2 * fakemag.std()
    input_mean = state["input_mean"].numpy()
    assert input_mean.shape == (7514,) and np.all(np.isfinite(input_mean))
    assert 0.5 < np.median(input_mean) < 1.5  # continuum-normalized flux
    extras = torch.load(out, map_location="cpu", weights_only=False)
    assert extras["catalog"] == survey.name
    assert [h["epoch"] for h in extras["history"]] == [1, 2, 3, 4]
    assert extras["training_config"]["seed"] == 0
    assert extras["training_config"]["n_val"] == 20
    assert all(v.dtype in (torch.float32, torch.float64) for v in state.values())
    assert out.stat().st_size < 10e6

    # The restored best network predicts positive fakemag of the right order for the survey.
    spectra = [read_apstar(survey.parent / r["path"]) for r in read_rows(survey)[:16]]
    flux, _ = normalize(
        np.stack([s.flux for s in spectra]),
        np.stack([s.err for s in spectra]),
        np.stack([s.bitmask for s in spectra]),
    )
    with torch.no_grad():
        out_units, _ = model.net.eval()(torch.as_tensor(flux, dtype=torch.float32))
    pred = out_units.double().numpy() * report.labels_std
    assert np.all(pred > 0) and np.all(np.isfinite(pred))


def test_same_seed_same_weights_other_seed_differs(survey, tmp_path):
    kwargs = dict(epochs=1, batch_size=64, progress=False)
    a = train(survey, tmp_path / "a.pt", seed=3, **kwargs)
    b = train(survey, tmp_path / "b.pt", seed=3, **kwargs)
    c = train(survey, tmp_path / "c.pt", seed=4, **kwargs)
    sa, sb, sc = (load_model(r.checkpoint).net.state_dict() for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.best_val_loss == b.best_val_loss
    assert not torch.equal(sa["dense_1.weight"], sc["dense_1.weight"])


def test_unusable_rows_are_skipped_and_counted(survey, tmp_path):
    rows = read_rows(survey)[:60]
    for row in rows:  # the catalog moves; its paths are relative to its own folder
        row["path"] = str((survey.parent / row["path"]).resolve())
    rows[0]["fakemag"] = ""  # missing label
    rows[1]["fakemag"] = "nan"
    rows[2]["fakemag"] = "-3.5"  # not a luminosity
    rows[3]["path"] = str(tmp_path / "gone.fits")  # file does not exist
    corrupt = tmp_path / "corrupt.fits"
    corrupt.write_bytes(b"SIMPLE  =  this is not FITS" * 40)
    rows[4]["path"] = str(corrupt)
    rows = [{**r, "fakemag_err": "0.5"} for r in rows]
    catalog = tmp_path / "catalog.csv"
    write_rows(catalog, rows)

    report = train(catalog, tmp_path / "m.pt", epochs=1, batch_size=16, progress=False)
    assert report.n_rows == 60
    assert report.n_missing_label == 3
    assert report.n_unreadable == 2
    assert report.n_train + report.n_val == 55
    assert {Path(p).name for p, _ in report.skipped} == {"gone.fits", "corrupt.fits"}
    assert all(reason for _, reason in report.skipped)
    assert "fakemag_err" in report.label_err_source


def test_too_little_data_and_bad_arguments(survey, tmp_path):
    rows = read_rows(survey)[:1]
    rows[0]["path"] = str((survey.parent / rows[0]["path"]).resolve())
    catalog = tmp_path / "one.csv"
    write_rows(catalog, rows)
    with pytest.raises(ValueError, match="too few"):
        train(catalog, tmp_path / "m.pt", progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        train(survey, tmp_path / "m.pt", val_fraction=0.0, progress=False)
    no_label = tmp_path / "nolabel.csv"
    no_label.write_text("path\nx.fits\n")
    with pytest.raises(ValueError, match="fakemag"):
        train(no_label, tmp_path / "m.pt", progress=False)
    assert not (tmp_path / "m.pt").exists()


def test_robust_mse_is_astronn_formula():
    """astroNN's robust_mse: 0.5 (y - y')^2 exp(-s') + 0.5 s', s' = log(exp(s) + e^2)."""
    rng = np.random.default_rng(0)
    y, y_hat, s = rng.normal(1, 0.3, 50), rng.normal(1, 0.3, 50), rng.normal(-3, 1, 50)
    e = np.abs(rng.normal(0, 0.05, 50))
    e[:10] = 0.0  # unknown label errors
    corrected = np.log(np.exp(s) + e**2)
    want = np.mean(0.5 * (y - y_hat) ** 2 * np.exp(-corrected) + 0.5 * corrected)
    tensors = [torch.tensor(a, requires_grad=True) for a in (y, y_hat, s)]
    got = robust_mse(*tensors, torch.tensor(e))
    assert got.item() == pytest.approx(want, rel=1e-12)
    got.backward()
    assert all(torch.isfinite(t.grad).all() for t in tensors)  # e = 0 must not poison gradients


def test_calibrating_the_variance_head_makes_the_total_uncertainty_fit_the_errors():
    """Labels = the network's own MC mean + Gaussian noise of a known, star-dependent sigma:
    after calibration the pulls have standard deviation ~1 and ~68 % lie within 1 sigma, and
    nothing but dense_var has changed."""
    from astronn_dist.worker.science.model import ApogeeDistBCNN

    torch.manual_seed(3)
    net = ApogeeDistBCNN()
    with torch.no_grad():
        net.dense_var.bias.fill_(3.0)  # exp(3) ~ 20: wildly too large a variance
    rng = np.random.default_rng(0)
    x = torch.from_numpy((1.0 + 0.05 * rng.standard_normal((300, 7514))).astype(np.float32))
    net.train()
    with torch.no_grad():
        mean = torch.stack([net(x)[0] for _ in range(16)]).mean(0)
    sigma = 0.05 + 0.2 * mean.abs()  # the residual scale the head must learn
    y = mean + sigma * torch.from_numpy(rng.standard_normal(300).astype(np.float32))
    before = {k: v.clone() for k, v in net.state_dict().items()}

    result = calibrate_variance_head(net, x, y, torch.zeros_like(y), passes=16)

    assert result["pull_std_before"] < 0.2
    assert 0.8 < result["pull_std_after"] < 1.2
    assert 0.58 < result["within_1_sigma_after"] < 0.78
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"dense_var.weight", "dense_var.bias"}
