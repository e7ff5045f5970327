"""Train an ApogeeDistBCNN on a catalog of apStar spectra with known fakemag.

What it reproduces of astroNN 1.1.0's ``ApogeeBCNN`` training (the recipe of the published DR17
distance model; see ``astroNN/models/base_bayesian_cnn.py`` and ``astroNN/nn/losses.py``):

- inputs: the spectra normalized exactly as at inference (:func:`astronn_dist.worker.science.continuum.normalize`),
  centred pixel by pixel by ``input_mean`` (astroNN's input normalization mode 3; no scaling);
- labels: fakemag divided by ``labels_std``, the standard deviation of the training fakemag
  (mode 4: scaled, *not* centred, so the softplus head stays positive and
  ``fakemag = output * labels_std``); label errors are divided by the same ``labels_std``;
- loss: astroNN's heteroscedastic ``robust_mse`` on the fakemag head, with the second head
  predicting the log-variance ``s``; the known label error ``e`` is added to the predicted
  variance before the Gaussian negative log-likelihood::

      s' = log(exp(s) + e**2)
      loss = mean(0.5 * (y - y_hat)**2 * exp(-s') + 0.5 * s')

  plus Keras's L2 penalty ``5e-9 * sum(w**2)`` on the kernels of both convolutions and both
  hidden dense layers (astroNN's ``l2``), Adam, and ReduceLROnPlateau (factor 0.5, patience 2);
- dropout (rate 0.3) active while training;
- astroNN's initial weights: kernels of both convolutions and both hidden dense layers drawn
  from N(0, 0.05), the two heads Glorot-uniform (Keras's default), all biases zero. PyTorch's
  default (uniform +-1/sqrt(fan_in), 0.012 for dense_1) starts dense_1 seven times smaller,
  and on a few thousand stars the network then barely moves in the first epochs.

What differs, and why:

- ``input_mean`` and ``labels_std`` come from the training split only (astroNN computed them
  before its train/validation split); the validation stars stay unseen;
- validation runs with dropout off (astroNN's MCDropout never switches off): a deterministic
  validation loss makes early stopping (best weights restored) meaningful;
- label errors: a catalog column ``fakemag_err`` is used when present. Without one (the
  synthetic survey's fakemag is the noise-free truth) every star gets
  ``label_err_fraction * fakemag`` (default 1 %), standing in for the Gaia-parallax errors
  of the real training set; it also keeps the predicted variance from collapsing onto
  stars the network happens to fit perfectly.

- the variance head is calibrated at the end (:func:`calibrate_variance_head`). astroNN's
  total uncertainty is ``sqrt(exp(mean s) + var(out))``, but the loss fits ``exp(s)`` to the
  residuals of single dropout passes, which already contain the dropout scatter that
  ``var(out)`` adds a second time; on the synthetic survey the total came out 2x too large
  (pull standard deviation 0.50, 96 % of stars within 1 sigma) while ``var(out)`` alone was
  calibrated. So, with every other weight frozen, ``dense_var`` alone is refitted on the
  validation stars to the Gaussian likelihood of the MC mean under that very total; the
  fakemag head does not change.

Rows without a usable fakemag (empty, NaN, not positive) or whose spectrum cannot be read are
skipped and counted in the :class:`TrainingReport`.
"""

from __future__ import annotations

import copy
import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from astronn_dist.worker.science.continuum import N_NORMALIZED, normalize
from astronn_dist.worker.science.model import ApogeeDistBCNN
from astronn_dist.worker.science.spectra import SpectrumError, read_apstar
from astronn_dist.worker.tables import (
    float_values,
    match_columns,
    open_table,
    text_values,
    unreadable_is_catalog_error,
)

DEFAULT_LABEL_ERR_FRACTION = 0.01
L2 = 5e-9  # astroNN's kernel_regularizer=l2(5e-9) on conv1, conv2, dense_1, dense_2
LR_FACTOR, LR_PATIENCE, LR_MIN = 0.5, 2, 1e-8  # astroNN's ReduceLROnPlateau
CALIBRATION_PASSES = 32  # MC passes per validation star when calibrating the variance head
CALIBRATION_STEPS = 500  # full-batch Adam steps on dense_var's 65 parameters
_NORMALIZE_CHUNK = 256  # spectra per normalize() call: bounds the float64 (n, 8575) buffers
_MAX_SKIPPED_LISTED = 100
_CATALOG_BLOCK_ROWS = 50_000  # catalog rows read at a time (the labels of all rows are kept)


@dataclass
class TrainingReport:
    """What :func:`train` did. Losses are per star, in label-std units; MAPE in percent."""

    checkpoint: Path
    history: Path
    n_rows: int
    n_train: int
    n_val: int
    n_missing_label: int
    n_unreadable: int
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    best_val_mape: float
    labels_std: float
    label_err_source: str
    stopped_early: bool
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), first 100
    calibration: dict[str, float] = field(default_factory=dict)  # calibrate_variance_head's


@dataclass(frozen=True)
class _Dataset:
    flux: np.ndarray  # (N, 7514) float32, normalized (not yet centred)
    fakemag: np.ndarray  # (N,) float64
    fakemag_err: np.ndarray  # (N,) float64, fakemag units
    n_rows: int
    n_missing_label: int
    skipped: list[tuple[str, str]]
    n_unreadable: int
    label_err_source: str


def robust_mse(
    y_true: torch.Tensor, y_pred: torch.Tensor, log_var: torch.Tensor, labels_err: torch.Tensor
) -> torch.Tensor:
    """astroNN's heteroscedastic loss, averaged over the batch.

    All arguments have shape (B,) and are in label-std units; ``log_var`` is the network's
    predicted log-variance, ``labels_err`` the known label error (0 when unknown).
    """
    # log(exp(s) + e^2) computed as logaddexp(s, 2 log e): no overflow for large s, and e = 0
    # gives log(0) = -inf, for which logaddexp returns s exactly (as astroNN's formula does).
    corrected = torch.logaddexp(log_var, 2.0 * torch.log(labels_err))
    return (0.5 * (y_true - y_pred) ** 2 * torch.exp(-corrected) + 0.5 * corrected).mean()


_TRAINING_COLUMNS = {"path": ("path",), "fakemag": ("fakemag",), "fakemag_err": ("fakemag_err",)}


def _read_catalog(catalog: Path) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Columns ``path``, ``fakemag`` and, if present, ``fakemag_err`` of a CSV/FITS/Parquet table,
    through the producer's reader (:mod:`astronn_dist.worker.tables`).

    Missing values (empty cells, masked entries) come back as NaN; an empty path as "".

    Raises:
        CatalogError (a ValueError): the file is missing, unreadable, of unknown format, lacks
            path or fakemag, or has a cell that is not a number (naming its row and column).
    """
    source = open_table(catalog)
    columns = match_columns(source.names, _TRAINING_COLUMNS, catalog, required=("path", "fakemag"),
                            hint="Training needs path and fakemag.")
    paths: list[str] = []
    floats: dict[str, list[np.ndarray]] = {"fakemag": [], "fakemag_err": []}
    first_row = 1
    with unreadable_is_catalog_error(catalog):
        for raw in source.blocks(_CATALOG_BLOCK_ROWS, list(columns.values())):
            block_paths = [p or "" for p in text_values(raw[columns["path"]])]
            for key in floats:
                if key in columns:
                    floats[key].append(float_values(raw[columns[key]], columns[key], catalog, first_row))
            paths += block_paths
            first_row += len(block_paths)
    fakemag = np.concatenate(floats["fakemag"]) if paths else np.zeros(0)
    err = (np.concatenate(floats["fakemag_err"]) if paths else np.zeros(0)) if "fakemag_err" in columns else None
    return paths, fakemag, err


def _load_dataset(catalog: Path, label_err_fraction: float, progress) -> _Dataset:
    """Read the catalog and its spectra; normalize them in chunks. See module doc for skips."""
    paths, fakemag, fakemag_err = _read_catalog(catalog)
    n_rows = len(paths)
    if fakemag_err is not None:
        source = "catalog column fakemag_err"
        err = fakemag_err
    else:
        source = f"{label_err_fraction:g} x fakemag (no fakemag_err column)"
        err = label_err_fraction * fakemag
    # A label error that is not finite or negative is unknown: 0, as astroNN treats unknowns.
    err = np.where(np.isfinite(err) & (err >= 0), err, 0.0)
    usable = np.isfinite(fakemag) & (fakemag > 0) & np.array([bool(p) for p in paths], dtype=bool)
    n_missing_label = int(np.count_nonzero(~usable))
    rows = np.flatnonzero(usable)

    base = catalog.parent
    flux_out = np.empty((len(rows), N_NORMALIZED), dtype=np.float32)
    kept = np.zeros(len(rows), dtype=bool)
    skipped: list[tuple[str, str]] = []
    n_unreadable = 0
    task = progress.add_task("reading spectra", total=len(rows), metrics="")
    for start in range(0, len(rows), _NORMALIZE_CHUNK):
        chunk = range(start, min(start + _NORMALIZE_CHUNK, len(rows)))
        fluxes, errs, masks, where = [], [], [], []
        for i in chunk:
            path = paths[rows[i]]
            try:
                spectrum = read_apstar(base / path)
            except SpectrumError as exc:
                n_unreadable += 1
                if len(skipped) < _MAX_SKIPPED_LISTED:
                    skipped.append((path, exc.reason))
                continue
            fluxes.append(spectrum.flux)
            errs.append(spectrum.err)
            masks.append(spectrum.bitmask)
            where.append(i)
        if where:
            norm, _ = normalize(np.stack(fluxes), np.stack(errs), np.stack(masks))
            flux_out[where] = norm
            kept[where] = True
        progress.update(task, advance=len(chunk))
    progress.remove_task(task)
    index = rows[kept]
    return _Dataset(
        flux=flux_out[kept],
        fakemag=fakemag[index],
        fakemag_err=err[index],
        n_rows=n_rows,
        n_missing_label=n_missing_label,
        skipped=skipped,
        n_unreadable=n_unreadable,
        label_err_source=source,
    )


def astronn_init_(net: nn.Module) -> None:
    """Re-initialize ``net``'s weights in place as astroNN's ApogeeBCNN does (see module doc).

    Draws from torch's global generator: seed it first for reproducible weights.
    """
    with torch.no_grad():
        for name in ("conv1", "conv2", "dense_1", "dense_2"):
            layer = getattr(net, name)
            layer.weight.normal_(0.0, 0.05)  # Keras RandomNormal(mean=0.0, stddev=0.05)
            layer.bias.zero_()
        for name in ("dense_output", "dense_var"):
            layer = getattr(net, name)
            nn.init.xavier_uniform_(layer.weight)  # Keras Dense default: glorot_uniform
            layer.bias.zero_()


def calibrate_variance_head(
    net: ApogeeDistBCNN, x: torch.Tensor, y: torch.Tensor, e: torch.Tensor, *,
    passes: int = CALIBRATION_PASSES, steps: int = CALIBRATION_STEPS, lr: float = 0.01,
    batch_size: int = 256,
) -> dict[str, float]:
    """Refit ``dense_var`` so that the total uncertainty is calibrated on held-out stars.

    ``x`` (N, 7514) normalized flux, ``y`` labels and ``e`` label errors (N,), in label-std
    units, on the network's device; stars the network was not fitted to (the validation split).
    Everything before the heads is frozen: dense_2's activations are computed once for
    ``passes`` dropout passes (seeded from torch's global generator), then dense_var's weights
    minimize the mean Gaussian negative log-likelihood of the MC mean::

        V = exp(mean_k s_k) + var_k(out_k) + e**2
        loss = mean(0.5 (y - mean_k out_k)**2 / V + 0.5 log V)

    which is the inference formula's total (astronn_dist.worker.science.inference) plus the label error. Returns
    the pull standard deviation ``std((y - mean) / sqrt(exp(mean s) + var))`` and the share of
    stars within one sigma, before and after, and the NLL after.
    """
    net.train()  # dropout on
    with torch.no_grad():
        h = torch.stack([
            torch.cat([net.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
            for _ in range(passes)
        ])  # (passes, N, 64)  # fmt: skip
        out = torch.nn.functional.softplus(net.dense_output(h)).squeeze(-1)  # (passes, N)
        mean, mc_var = out.mean(0), out.var(0)  # Bessel's correction, as at inference
        resid2 = (y - mean) ** 2

    def total_variance() -> torch.Tensor:
        """exp(mean log-variance) + MC variance (N,), as at inference."""
        return torch.exp(net.dense_var(h).squeeze(-1).mean(0)) + mc_var

    def quality() -> dict[str, float]:
        with torch.no_grad():
            pull = (y - mean) / torch.sqrt(total_variance())
            return {"pull_std": float(pull.std()), "within_1_sigma": float((pull.abs() < 1).double().mean())}

    before = quality()
    optimizer = torch.optim.Adam(net.dense_var.parameters(), lr=lr)
    for _ in range(steps):
        var = total_variance() + e**2
        loss = (0.5 * resid2 / var + 0.5 * torch.log(var)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    after = quality()
    net.eval()
    return {
        "stars": float(len(x)), "passes": float(passes), "nll": float(loss.detach()),
        **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
    }


def _l2_penalty(net: nn.Module) -> torch.Tensor:
    return L2 * sum(
        (getattr(net, name).weight ** 2).sum() for name in ("conv1", "conv2", "dense_1", "dense_2")
    )


def _evaluate(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, e: torch.Tensor, batch_size: int, device
) -> tuple[float, float]:
    """(mean robust_mse, MAPE of fakemag in %) with dropout off; x, y, e on the CPU."""
    net.eval()
    total, ape = 0.0, 0.0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            eb = e[start : start + batch_size].to(device)
            out, log_var = net(xb)
            total += float(robust_mse(yb, out, log_var, eb)) * len(xb)
            # labels are not centred, so the ratio is the same in label-std and fakemag units
            ape += float((torch.abs(out - yb) / yb).sum())
    return total / len(x), 100.0 * ape / len(x)


def _history_path(out: Path) -> Path:
    """``model.pt`` -> ``model.history.csv`` beside it."""
    return out.with_name(out.stem + ".history.csv")


def train(
    catalog: Path,
    out: Path,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-3,
    val_fraction: float = 0.1,
    patience: int = 5,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    label_err_fraction: float = DEFAULT_LABEL_ERR_FRACTION,
    calibrate: bool = True,
) -> TrainingReport:
    """Train ApogeeDistBCNN on ``catalog``; write the checkpoint ``out`` and its history CSV.

    Parameters
    ----------
    catalog : Path
        CSV, FITS or Parquet table with ``path`` (apStar file, relative to the catalog's folder),
        ``fakemag`` (the label, 10**(0.2 M_Ks + 2)) and optionally ``fakemag_err``.
    out : Path
        Checkpoint to write (:func:`astronn_dist.worker.science.model.save_checkpoint`); the per-epoch history goes
        to ``<out stem>.history.csv`` beside it (epoch, loss, val_loss, val_mape, lr, seconds).
    epochs, batch_size, lr : training length, minibatch size, Adam's initial learning rate.
    val_fraction : share of the usable stars held out for validation (0 < val_fraction < 1).
    patience : epochs without a better validation loss before stopping; the best epoch's weights
        are the ones saved.
    seed : seeds the split, the shuffling, the initial weights and dropout: the same seed, data
        and thread count give the same checkpoint.
    device : ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``...
    progress : show rich progress bars and a line per epoch.
    label_err_fraction : label error as a fraction of fakemag when the catalog has no
        ``fakemag_err`` column.
    calibrate : refit the variance head on the validation stars at the end
        (:func:`calibrate_variance_head`; see the module doc).

    Returns
    -------
    TrainingReport
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from astronn_dist.worker import PIPELINE_VERSION
    from astronn_dist.worker.devices import resolve_device
    from astronn_dist.worker.science.model import save_checkpoint

    catalog, out = Path(catalog), Path(out)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1, not {val_fraction}")
    if epochs < 1 or batch_size < 1 or patience < 1:
        raise ValueError("epochs, batch_size and patience must be positive")
    t0 = time.perf_counter()
    dev = resolve_device(device)

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[metrics]}"),
    )
    with Progress(*columns, disable=not progress, transient=False) as bar:
        data = _load_dataset(catalog, label_err_fraction, bar)
        n = len(data.fakemag)
        n_val = int(round(val_fraction * n))
        if n - n_val < 1 or n_val < 1:
            raise ValueError(
                f"{catalog}: {n} usable stars ({data.n_missing_label} without fakemag, "
                f"{data.n_unreadable} unreadable spectra): too few to train and validate"
            )

        rng = np.random.default_rng(seed)
        order = rng.permutation(n)
        val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
        input_mean = data.flux[train_idx].astype(np.float64).mean(axis=0)  # (7514,)
        labels_std = float(np.std(data.fakemag[train_idx]))  # ddof 0, as numpy.ma in astroNN
        if not labels_std > 0:
            raise ValueError(f"{catalog}: all training fakemag are equal; nothing to learn")

        def tensors(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return (
                torch.from_numpy(data.flux[idx]),
                torch.from_numpy((data.fakemag[idx] / labels_std).astype(np.float32)),
                torch.from_numpy((data.fakemag_err[idx] / labels_std).astype(np.float32)),
            )

        x_train, y_train, e_train = tensors(train_idx)
        x_val, y_val, e_val = tensors(val_idx)

        torch.manual_seed(seed)  # initial weights and dropout masks
        shuffle = torch.Generator().manual_seed(seed)
        net = ApogeeDistBCNN()
        astronn_init_(net)
        with torch.no_grad():
            net.input_mean.copy_(torch.from_numpy(input_mean))
            net.labels_std.fill_(labels_std)
        net.to(dev)
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=LR_FACTOR, patience=LR_PATIENCE, min_lr=LR_MIN
        )

        history: list[dict[str, float]] = []
        best = {"val_loss": math.inf, "epoch": 0, "val_mape": math.nan, "state": None}
        n_batches = math.ceil(len(x_train) / batch_size)
        stopped_early = False
        for epoch in range(1, epochs + 1):
            t_epoch = time.perf_counter()
            task = bar.add_task(f"epoch {epoch}/{epochs}", total=n_batches, metrics="")
            net.train()
            running = 0.0
            perm = torch.randperm(len(x_train), generator=shuffle)
            for start in range(0, len(x_train), batch_size):
                batch = perm[start : start + batch_size]
                xb, yb, eb = x_train[batch].to(dev), y_train[batch].to(dev), e_train[batch].to(dev)
                out_b, log_var_b = net(xb)
                loss = robust_mse(yb, out_b, log_var_b, eb)
                optimizer.zero_grad(set_to_none=True)
                (loss + _l2_penalty(net)).backward()
                optimizer.step()
                running += float(loss.detach()) * len(batch)
                bar.update(task, advance=1, metrics=f"loss {float(loss.detach()):.4f}")
            train_loss = running / len(x_train)
            val_loss, val_mape = _evaluate(net, x_val, y_val, e_val, max(batch_size, 256), dev)
            lr_now = optimizer.param_groups[0]["lr"]
            scheduler.step(val_loss)
            history.append(
                {
                    "epoch": epoch,
                    "loss": train_loss,
                    "val_loss": val_loss,
                    "val_mape": val_mape,
                    "lr": lr_now,
                    "seconds": time.perf_counter() - t_epoch,
                }
            )
            improved = val_loss < best["val_loss"]
            if improved:
                best = {
                    "val_loss": val_loss,
                    "epoch": epoch,
                    "val_mape": val_mape,
                    "state": copy.deepcopy(net.state_dict()),
                }
            bar.remove_task(task)
            if progress:
                bar.console.print(
                    f"epoch {epoch:3d}  loss {train_loss:8.4f}  val_loss {val_loss:8.4f}  "
                    f"val MAPE {val_mape:6.2f}%  lr {lr_now:.2e}" + ("  *" if improved else "")
                )
            if epoch - best["epoch"] >= patience:
                stopped_early = epoch < epochs
                break

    if best["state"] is None:  # every validation loss was NaN: nothing worth saving
        raise RuntimeError(
            f"training diverged (validation loss {history[-1]['val_loss']}); try a smaller lr"
        )
    net.load_state_dict(best["state"])
    calibration: dict[str, float] = {}
    if calibrate:
        torch.manual_seed(seed)
        calibration = calibrate_variance_head(net, x_val.to(dev), y_val.to(dev), e_val.to(dev))
        if progress:
            print(
                f"variance head calibrated on {len(x_val)} validation stars: pull std "
                f"{calibration['pull_std_before']:.2f} -> {calibration['pull_std_after']:.2f}, "
                f"within 1 sigma {calibration['within_1_sigma_before']:.2f} -> "
                f"{calibration['within_1_sigma_after']:.2f}"
            )
    net.to("cpu")
    history_file = _history_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with history_file.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)

    config = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "val_fraction": val_fraction,
        "patience": patience,
        "seed": seed,
        "device": str(dev),
        "label_err_fraction": label_err_fraction,
        "label_err_source": data.label_err_source,
        "l2": L2,
        "loss": "astroNN robust_mse (heteroscedastic, log-variance head)",
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "best_epoch": best["epoch"],
        "variance_head_calibration": calibration,
        "pipeline_version": PIPELINE_VERSION,
        "torch_version": torch.__version__,
    }
    save_checkpoint(net, out, history=history, training_config=config, catalog=catalog.name)
    report = TrainingReport(
        checkpoint=out,
        history=history_file,
        n_rows=data.n_rows,
        n_train=len(train_idx),
        n_val=len(val_idx),
        n_missing_label=data.n_missing_label,
        n_unreadable=data.n_unreadable,
        epochs_run=len(history),
        best_epoch=best["epoch"],
        best_val_loss=best["val_loss"],
        best_val_mape=best["val_mape"],
        labels_std=labels_std,
        label_err_source=data.label_err_source,
        stopped_early=stopped_early,
        seconds=time.perf_counter() - t0,
        skipped=data.skipped,
        calibration=calibration,
    )
    return report
