"""MC-dropout inference: the fast Predictor against the plain algorithm it replaces.

The reference (``reference_mc``) is SDSS-V astra's ``ApogeeDistBCNN.predict``: ``passes`` full
forward passes of the nn.Module with its nn.Dropout layers active, then mean / Bessel variance /
mean log-variance. The Predictor draws other random masks, so the two agree only within Monte
Carlo noise; the tests below say how much noise and why.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import torch

from _data import astronn_parameters  # noqa: E402 (tests/ is on sys.path)
from astronn_dist.worker.science.inference import (  # noqa: E402
    MaskLayout,
    Schedule,
    module_masks,
    Predictor,
    draw_random16,
    spectrum_seed,
)
from astronn_dist.worker.science.model import (  # noqa: E402
    ApogeeDistBCNN,
    BCNNConfig,
    LoadedModel,
    load_model,
    save_checkpoint,
)



def _net(dropout_rate: float = 0.3, seed: int = 11) -> ApogeeDistBCNN:
    """Random weights (PyTorch's default init, fixed seed) with the real DR17 input_mean and
    labels_std."""
    params = astronn_parameters()
    torch.manual_seed(seed)
    net = ApogeeDistBCNN(BCNNConfig(dropout_rate=dropout_rate))
    with torch.no_grad():
        net.input_mean.copy_(torch.tensor(params["input_mean"]["input"], dtype=torch.float64))
        net.labels_std.fill_(params["labels_std"]["output"][0])
        # Larger weights than the default init, so that the spectra differ in output and
        # the dropout spread is ~15% of fakemag (a trained model's is ~10%), not ~1%.
        net.conv1.weight.mul_(8.0)
        net.conv2.weight.mul_(4.0)
        net.dense_1.weight.mul_(3.0)
        net.dense_2.weight.mul_(3.0)
    return net.eval()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The network through a real checkpoint file, as the worker loads it."""
    path = save_checkpoint(_net(), tmp_path_factory.mktemp("m") / "random-dr17.pt")
    return load_model(path)


@pytest.fixture(scope="module")
def flux() -> np.ndarray:
    """64 plausible normalized spectra: astroNN's mean DR17 spectrum (input_mean), each with
    its own line-depth scaling, smooth continuum error and photon noise; (64, 7514) float64."""
    params = astronn_parameters()
    mean = np.asarray(params["input_mean"]["input"])
    rng = np.random.default_rng(5)
    n = 64
    depth = rng.uniform(0.6, 1.4, (n, 1))
    x = np.linspace(-1, 1, mean.size)
    tilt = rng.normal(0, 0.02, (n, 3)) @ np.stack([np.ones_like(x), x, x**2])
    return 1 - (1 - mean) * depth + tilt + rng.normal(0, 0.01, (n, mean.size))


def reference_mc(net: ApogeeDistBCNN, flux: np.ndarray, passes: int, seed: int,
                 rows_per_call: int = 1600) -> tuple[np.ndarray, ...]:
    """SDSS-V's algorithm: `passes` full forward passes of the nn.Module with dropout on.

    nn.Dropout draws an independent Bernoulli(0.7) mask (scaled by 1/0.7) for every element
    of every row, so one row of a batch is one complete forward pass with fresh masks; the
    passes are run as rows (each spectrum repeated) `rows_per_call` at a time, which changes
    nothing but the speed of this test.

    Returns (fakemag, fakemag_err, out (passes, N), log_var (passes, N)).
    """
    torch.manual_seed(seed)
    x = torch.from_numpy(flux).repeat(passes, 1)  # (passes * N, 7514): pass-major rows
    net.train()  # dropout on
    try:
        with torch.no_grad():
            runs = [net(x[i : i + rows_per_call]) for i in range(0, len(x), rows_per_call)]
    finally:
        net.eval()
    out = torch.cat([r[0] for r in runs]).view(passes, len(flux))
    log_var = torch.cat([r[1] for r in runs]).view(passes, len(flux))
    std = float(net.labels_std)
    fakemag = out.mean(0).double().numpy() * std
    err = torch.sqrt(torch.exp(log_var.mean(0)) + out.var(0)).double().numpy() * std
    return fakemag, err, out.double().numpy(), log_var.double().numpy()


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic max |F_a - F_b|."""
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / a.size
    fb = np.searchsorted(np.sort(b), grid, side="right") / b.size
    return float(np.max(np.abs(fa - fb)))


# ------------------------------------------------------------------------------------------
# Exactness where there is no randomness


def test_no_dropout_equals_module_forward(flux):
    """With dropout off every pass is the plain forward: the fast path (conv1 once, conv2 as a
    Toeplitz product, pooling and flatten order, folded scales) must reproduce nn.Module's
    forward to float32 rounding."""
    net = _net(dropout_rate=0.0)
    loaded = LoadedModel(net=net, model_id="p0", path=Path("p0.pt"), device=torch.device("cpu"))
    pred = Predictor(loaded, mc_passes=3, seed=0)
    got = pred.predict(flux[:16], [f"s{i}" for i in range(16)])
    with torch.no_grad():
        out, log_var = net(torch.from_numpy(flux[:16]))
    std = float(net.labels_std)
    np.testing.assert_allclose(got.fakemag, out.double().numpy() * std, rtol=2e-5)
    np.testing.assert_allclose(got.fakemag_err, np.exp(0.5 * log_var.double().numpy()) * std,
                               rtol=2e-5)
    samples, _ = pred.sample(flux[:4], ["a", "b", "c", "d"])
    assert np.ptp(samples, axis=1).max() <= 1e-6 * np.abs(samples).max()  # passes identical


@pytest.mark.parametrize("passes", [2, 20, 100])
def test_dropout_on_equals_the_reference_forward_with_the_same_masks(flux, passes: int):
    """With dropout on, every pass of the fast path is the module's plain forward with that
    pass's masks (module_masks of the spectrum's random numbers): exact up to float32 rounding,
    so the fast path's tricks (Toeplitz conv2, folded scales, pass groups) change no number."""
    net = _net(dropout_rate=0.3)
    loaded = LoadedModel(net=net, model_id="p3", path=Path("p3.pt"), device=torch.device("cpu"))
    pred = Predictor(loaded, mc_passes=passes, seed=5)
    ids = ["kepler", "bulge", "third"]
    out, log_var = pred.sample(flux[:3], ids)
    for i, sid in enumerate(ids):
        randoms = draw_random16(spectrum_seed(5, sid), passes, pred.layout)
        keep = module_masks(randoms, pred.layout, pred.threshold)
        assert 0.6 < float(keep[0].float().mean()) < 0.8  # about 70 % of units kept
        x = torch.from_numpy(flux[i : i + 1]).repeat(passes, 1)
        with torch.no_grad():
            want_out, want_log_var = net.forward_with_masks(x, keep)
        np.testing.assert_allclose(out[i], want_out.numpy(), rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(log_var[i], want_log_var.numpy(), rtol=2e-5, atol=1e-5)
    # Other masks give other numbers: the comparison above can fail.
    other = module_masks(draw_random16(spectrum_seed(5, "other"), passes, pred.layout), pred.layout, pred.threshold)
    with torch.no_grad():
        moved, _ = net.forward_with_masks(torch.from_numpy(flux[:1]).repeat(passes, 1), other)
    assert not np.allclose(out[0], moved.numpy(), rtol=1e-3)


# ------------------------------------------------------------------------------------------
# Statistics against the reference


def test_mc_statistics_match_reference_over_many_spectra(model, flux):
    """64 spectra, 100 passes each, Predictor vs reference (different random masks).

    fakemag: the two MC means of spectrum i differ by noise of sd sqrt((v_a + v_b) / 100)
    (v = per-pass variance of fakemag), so z_i = diff / that sd is ~N(0, 1) (t with ~200 dof).
    Over 64 spectra a shared bias shows in mean(z): its sd is 1/8, we allow 4 sd (0.5); the
    spread of z must be that of unit normals (sd of the sample sd ~0.09; we allow 0.65..1.4).
    fakemag_err: log(err_a / err_b) per spectrum is noise of unknown but common size, so its
    mean over spectra must be within 4 standard errors of 0 (a paired t-test); a missing or
    extra dropout layer, or a wrong scale, shifts it by far more than that.
    """
    n_spec = len(flux)
    ids = [f"spec-{i}" for i in range(n_spec)]
    pred = Predictor(model, mc_passes=100, seed=3)
    got = pred.predict(flux, ids)
    samples, _ = pred.sample(flux, ids)
    want, want_err, ref_out, _ = reference_mc(model.net, flux, 100, seed=4)
    std = float(model.net.labels_std)
    v_a = samples.astype(np.float64).var(axis=1, ddof=1) * std**2
    v_b = ref_out.var(axis=0, ddof=1) * std**2
    assert np.all(v_a > 0) and np.all(v_b > 0)
    # The MC noise is real (dropout matters) and comparable in both.
    assert np.median(np.sqrt(v_a) / got.fakemag) > 0.01
    z = (got.fakemag - want) / np.sqrt((v_a + v_b) / 100)
    assert abs(z.mean()) < 4 / np.sqrt(n_spec), z
    assert 0.65 < z.std(ddof=1) < 1.4, z
    log_ratio = np.log(got.fakemag_err / want_err)
    t = log_ratio.mean() / (log_ratio.std(ddof=1) / np.sqrt(n_spec))
    assert abs(t) < 4, (t, log_ratio)
    # And the per-pass variances agree on average: log(v_a/v_b) has sd ~sqrt(4/99) = 0.2 per
    # spectrum for near-normal outputs, 0.025 for the mean of 64; allow 0.15.
    assert abs(np.mean(np.log(v_a / v_b))) < 0.15


def test_mc_distribution_matches_reference_2000_passes(model, flux):
    """Two spectra, 2000 passes each: the distributions of the per-pass outputs must be the
    same. Two-sample KS at alpha = 1e-3 for n = m = 2000: D < 1.95 * sqrt(2 / 2000) = 0.062.
    Means: z-test at 4.5 sd."""
    spectra = flux[[0, 1]]
    pred = Predictor(model, mc_passes=2000, seed=1)
    out, log_var = pred.sample(spectra, ["x0", "x1"])
    _, _, ref_out, ref_lv = reference_mc(model.net, spectra, 2000, seed=2)
    for i in range(2):
        a, b = out[i].astype(np.float64), ref_out[:, i]
        assert ks_distance(a, b) < 0.062
        assert ks_distance(log_var[i].astype(np.float64), ref_lv[:, i]) < 0.062
        assert abs(a.mean() - b.mean()) < 4.5 * np.sqrt((a.var() + b.var()) / 2000)
        la, lb = log_var[i].astype(np.float64), ref_lv[:, i]
        assert abs(la.mean() - lb.mean()) < 4.5 * np.sqrt((la.var() + lb.var()) / 2000)
        assert a.std() > 0.05 * a.mean()  # the dropout spread is large enough to test


def test_keep_probability_is_0_7():
    """The masks keep 45875/65536 = 0.6999969 of the units (0.7 to 3e-6). Empirically, over
    20 spectra x 100 passes (45.5 M decisions, binomial sd 6.8e-5) and in each of the four
    16-bit lanes of a 64-bit draw (sd 1.4e-4), the kept fraction is within 5 sd of it; an
    8-bit threshold (0.6992) or a lane with a stuck bit would fail."""
    net = ApogeeDistBCNN()
    pred = Predictor(LoadedModel(net, "m", Path("m.pt"), torch.device("cpu")), mc_passes=100)
    assert pred.keep_probability == 45875 / 65536
    assert abs(pred.keep_probability - 0.7) < 1e-5
    layout = MaskLayout.of(net)
    lanes = np.zeros(4)
    total = 0
    for i in range(20):
        parts = draw_random16(spectrum_seed(0, f"k{i}"), 100, layout)
        for r in parts:
            keep = (r >= pred.threshold).reshape(-1, 4)
            lanes += keep.sum(0).numpy()
            total += keep.shape[0]
    p = pred.keep_probability
    sd_lane = np.sqrt(p * (1 - p) / total)
    assert np.all(np.abs(lanes / total - p) < 5 * sd_lane), lanes / total
    assert abs(lanes.sum() / (4 * total) - p) < 5 * sd_lane / 2


# ------------------------------------------------------------------------------------------
# Reproducibility per spectrum


def test_same_spectrum_same_numbers_in_any_batch(model, flux):
    ids = [f"r{i}" for i in range(6)]
    pred = Predictor(model, mc_passes=100, seed=9, threads=2)
    full = pred.predict(flux[:6], ids)
    picks = [4, 1, 5]
    sub = pred.predict(flux[picks], [ids[i] for i in picks])
    single = Predictor(model, mc_passes=100, seed=9, threads=1).predict(flux[[3]], [ids[3]])
    shared = pred.predict(flux[[2]], [ids[2]])  # one spectrum: its passes split among workers
    tiled = Predictor(model, mc_passes=100, seed=9, pass_tile=7).predict(flux[:6], ids)
    again = Predictor(model, mc_passes=100, seed=9).predict(flux[:6], ids)
    np.testing.assert_allclose(sub.fakemag, full.fakemag[picks], rtol=1e-5)
    np.testing.assert_allclose(sub.fakemag_err, full.fakemag_err[picks], rtol=1e-5)
    np.testing.assert_allclose(single.fakemag, full.fakemag[[3]], rtol=1e-5)
    np.testing.assert_allclose(shared.fakemag, full.fakemag[[2]], rtol=1e-5)
    np.testing.assert_allclose(shared.fakemag_err, full.fakemag_err[[2]], rtol=1e-5)
    np.testing.assert_allclose(tiled.fakemag, full.fakemag, rtol=1e-5)
    np.testing.assert_allclose(tiled.fakemag_err, full.fakemag_err, rtol=1e-5)
    np.testing.assert_array_equal(again.fakemag, full.fakemag)
    np.testing.assert_array_equal(again.fakemag_err, full.fakemag_err)


def test_gpu_schedule_on_the_cpu_equals_the_cpu_schedule(model, flux):
    """The GPU's schedule (several spectra, all passes in one set of kernels, no padding) runs
    on the CPU too: same masks (CPU generator), same numbers as the CPU's schedule."""
    ids = [f"g{i}" for i in range(5)]
    pred = Predictor(model, mc_passes=40, seed=2, max_rows=80)
    want_out, want_lv = pred.sample(flux[:5], ids)
    pred.schedule = Schedule.for_device("cuda", 40, pass_tile=25, max_rows=80)
    assert [(u.start, u.stop) for u in pred.schedule.units(5, pred.threads)] == [(0, 2), (2, 4), (4, 5)]
    out, lv = pred.sample(flux[:5], ids)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(lv, want_lv, rtol=1e-5, atol=1e-6)


def test_gpu_result_tensors_on_the_cpu_equal_the_host_arrays(model, flux):
    """A unit's results written into tensors (the GPU's way: kept on the device until the batch
    ends) are the numbers written into host arrays, padding and views across rows included."""
    ids = [f"t{i}" for i in range(5)]
    pred = Predictor(model, mc_passes=40, seed=2)
    pred.schedule = Schedule.for_device("cuda", 40, pass_tile=25, max_rows=80)
    first = pred.first_layer(flux[:5])
    seeds = [spectrum_seed(2, s) for s in ids]
    want = np.empty((5, 40), np.float32), np.empty((5, 40), np.float32)
    got = torch.empty(5, 40), torch.empty(5, 40)
    for unit in pred.schedule.units(5, pred.threads):
        pred._run_unit(first.conv1_out, seeds, unit, *want)
        pred._run_unit(first.conv1_out, seeds, unit, *got)
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g.numpy(), w)


def test_schedule_units():
    """CPU: padded groups at a few passes, parts of 50 passes shared among idle workers;
    GPU: max_rows spectrum-passes per unit, all passes in one part."""
    few = Schedule.for_device("cpu", 2, pass_tile=25, max_rows=4096)
    assert (few.group, few.parts, few.pad) == (32, ((0, 2),), True)
    assert [(u.start, u.stop) for u in few.units(70, workers=2)] == [(0, 32), (32, 64), (64, 70)]
    many = Schedule.for_device("cpu", 100, pass_tile=25, max_rows=4096)
    assert (many.group, many.parts) == (1, ((0, 50), (50, 100)))
    assert [u.parts for u in many.units(3, workers=2)] == [((0, 50), (50, 100))] * 3
    shared = many.units(1, workers=4)  # one spectrum, idle workers: one unit per part
    assert [(u.start, u.stop, u.parts) for u in shared] == [(0, 1, ((0, 50),)), (0, 1, ((50, 100),))]
    gpu = Schedule.for_device("cuda", 100, pass_tile=25, max_rows=4096)
    assert (gpu.group, gpu.parts, gpu.pass_tile, gpu.pad) == (40, ((0, 100),), 100, False)
    assert [(u.start, u.stop) for u in gpu.units(90, workers=1)] == [(0, 40), (40, 80), (80, 90)]
    assert gpu.units(0, workers=1) == []


def test_masks_depend_on_spectrum_id_and_seed(model, flux):
    layout = MaskLayout.of(model.net)
    a = draw_random16(spectrum_seed(0, "a"), 4, layout)[0]
    b = draw_random16(spectrum_seed(0, "b"), 4, layout)[0]
    c = draw_random16(spectrum_seed(1, "a"), 4, layout)[0]
    assert torch.equal(a, draw_random16(spectrum_seed(0, "a"), 4, layout)[0])
    assert (a == b).float().mean() < 0.01 and (a == c).float().mean() < 0.01
    same_flux = np.repeat(flux[:1], 2, axis=0)
    got = Predictor(model, mc_passes=100, seed=0).predict(same_flux, ["one", "two"])
    assert got.fakemag[0] != got.fakemag[1]
    other_seed = Predictor(model, mc_passes=100, seed=1).predict(same_flux[:1], ["one"])
    assert other_seed.fakemag[0] != got.fakemag[0]


def test_spectrum_seed_is_stable():
    # Fixed values: a change here would silently change every stored result.
    assert spectrum_seed(0, "apStar-dr17-2M19485057+5005279.fits") == 296766188269190571
    assert spectrum_seed(0, "a") == 7340373685759566269
    assert spectrum_seed(1, "a") != spectrum_seed(0, "a") != spectrum_seed(0, "b")
    assert 0 <= spectrum_seed(2**40, "é" * 300) < 2**63


# ------------------------------------------------------------------------------------------
# Interface


def test_input_validation(model, flux):
    pred = Predictor(model, mc_passes=4)
    empty = pred.predict(np.empty((0, 7514)), [])
    assert empty.fakemag.shape == empty.fakemag_err.shape == (0,)
    with pytest.raises(ValueError, match="expected"):
        pred.predict(flux[:2, :7000], ["a", "b"])
    with pytest.raises(ValueError, match="spectrum_ids"):
        pred.predict(flux[:2], ["a"])
    with pytest.raises(ValueError, match="mc_passes"):
        Predictor(model, mc_passes=1)
    assert (pred.model_id, pred.mc_passes, pred.seed) == (model.model_id, 4, 0)
    assert pred.device == torch.device("cpu")
    one = pred.predict(flux[0], ["a"])  # a single spectrum as a 1-D array
    assert one.fakemag.shape == (1,) and np.isfinite(one.fakemag_err).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(flux, tmp_path):
    """On a GPU: the same random numbers give the CPU's numbers (to float32 rounding: every
    kernel of the GPU's path against the CPU's); its own masks give the same statistics; and
    a spectrum keeps its numbers in any batch."""
    path = save_checkpoint(_net(), tmp_path / "p3.pt")
    cpu_pred, gpu_pred = Predictor(load_model(path), mc_passes=3), Predictor(load_model(path, "cuda"), mc_passes=3)
    seeds = [spectrum_seed(0, s) for s in "abcdefgh"]
    drawn = [draw_random16(s, 3, cpu_pred.layout) for s in seeds]
    randoms = [torch.stack(r) for r in zip(*drawn)]  # (8, 3, width) each, drawn on the CPU
    with torch.inference_mode():
        cpu = cpu_pred._mc_forward(cpu_pred.first_layer(flux[:8]).conv1_out, *randoms, pass_tile=3)
        gpu = gpu_pred._mc_forward(gpu_pred.first_layer(flux[:8]).conv1_out,
                                   *(r.to(gpu_pred.device) for r in randoms), pass_tile=3)
    for c, g in zip(cpu, gpu):
        np.testing.assert_allclose(g.cpu().numpy(), c.numpy(), rtol=1e-4, atol=1e-5)
    ids = [f"c{i}" for i in range(len(flux))]
    pred = Predictor(load_model(path, "cuda"), mc_passes=100, seed=0, max_rows=1000)
    full = pred.predict(flux, ids)
    part = pred.predict(flux[[7, 3]], [ids[7], ids[3]])
    # the same masks; cuBLAS may pick another kernel for another row count (last-bit changes)
    np.testing.assert_allclose(part.fakemag, full.fakemag[[7, 3]], rtol=1e-4)
    ref = Predictor(load_model(path), mc_passes=100, seed=0).predict(flux, ids)
    rel = (full.fakemag - ref.fakemag) / ref.fakemag_err
    assert abs(rel.mean()) < 0.1 and np.median(np.abs(np.log(full.fakemag_err / ref.fakemag_err))) < 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_rows_of_the_real_files_match_the_cpu_within_mc_noise(apstar_files):
    """The whole science path (read, normalize, bundled model, 100 passes) on a GPU and on the
    CPU, for the two real DR17 files, each under 24 ids (24 independent sets of masks): the
    mean fakemag of a file agrees within Monte-Carlo noise, the uncertainty within 10 %, and
    everything that does not depend on the masks is equal."""
    from astronn_dist.worker.api import distances
    from astronn_dist.worker.science.inference import MASK_RNG_CPU, MASK_RNG_CUDA

    copies = 24
    paths = [p for p in apstar_files for _ in range(copies)]
    ids = [f"{p.name}#{i}" for p in apstar_files for i in range(copies)]
    cpu = distances(paths, spectrum_ids=ids, device="cpu")
    gpu = distances(paths, spectrum_ids=ids, device="cuda")
    assert set(cpu["mask_rng"]) == {MASK_RNG_CPU} and set(gpu["mask_rng"]) == {MASK_RNG_CUDA}
    assert set(gpu["device"]) == {"cuda"} and not any(gpu["error"])
    for name in ("k_mag", "ebv", "a_k_mag"):
        np.testing.assert_array_equal(gpu[name], cpu[name])
    for f in range(len(apstar_files)):
        rows = slice(f * copies, (f + 1) * copies)
        c, g = np.asarray(cpu["L_fakemag"][rows]), np.asarray(gpu["L_fakemag"][rows])
        spread = np.sqrt((c.var(ddof=1) + g.var(ddof=1)) / copies)  # s.d. of the difference
        assert abs(g.mean() - c.mean()) < 5 * spread, (f, g.mean(), c.mean(), spread)
        ratio = np.median(np.asarray(gpu["L_fakemag_err"][rows]) / np.asarray(cpu["L_fakemag_err"][rows]))
        assert abs(np.log(ratio)) < 0.1, (f, ratio)


@pytest.mark.parametrize("passes", [2, 20, 100])
def test_numbers_do_not_depend_on_the_batch_nor_the_threads(model, flux, passes: int):
    """A spectrum alone or in a batch, with 1-3 worker threads, under 1 or 2 torch threads:
    the same bits (every product runs in a worker thread, one intra-op thread, fixed parts)."""
    ids = [f"s{i}" for i in range(len(flux[:40]))]
    threads_before = torch.get_num_threads()
    seen = []
    try:
        for torch_threads in (1, 2):
            torch.set_num_threads(torch_threads)
            for threads in (1, 2, 3):
                pred = Predictor(model, mc_passes=passes, seed=3, threads=threads)
                alone = pred.sample(flux[5:6], ids[5:6])[0][0]
                in_batch = pred.sample(flux[:40], ids)[0][5]
                pred.close()
                seen += [alone, in_batch]
    finally:
        torch.set_num_threads(threads_before)
    for other in seen[1:]:
        np.testing.assert_array_equal(other, seen[0])


def test_warm_up_changes_no_numbers(model, flux):
    """A warmed-up predictor (worker threads, buffers, first calls done) gives the same bits."""
    ids = [f"w{i}" for i in range(5)]
    cold = Predictor(model, mc_passes=20, seed=3, threads=2)
    warm = Predictor(model, mc_passes=20, seed=3, threads=2)
    try:
        warm.warm_up()
        for a, b in zip(cold.sample(flux[:5], ids), warm.sample(flux[:5], ids)):
            np.testing.assert_array_equal(a, b)
    finally:
        cold.close()
        warm.close()


def test_first_layer_from_another_thread_gives_the_same_bits(model, flux):
    """The pipeline computes the first layer (conv1) in its preparing thread, under that
    thread's torch settings: element-wise work, so the same bits as the flux given directly,
    whatever the torch thread count there."""
    ids = [f"s{i}" for i in range(8)]
    pred = Predictor(model, mc_passes=4, seed=5, threads=2)
    threads_before = torch.get_num_threads()
    try:
        direct = pred.sample(flux[:8], ids)
        for torch_threads in (1, 2):
            torch.set_num_threads(torch_threads)
            with ThreadPoolExecutor(1) as other:
                first = other.submit(pred.first_layer, flux[:8]).result()
            assert len(first) == 8
            got = pred.sample(first, ids)
            for a, b in zip(got, direct):
                assert a.tobytes() == b.tobytes()
    finally:
        torch.set_num_threads(threads_before)
        pred.close()
    with pytest.raises(ValueError, match="expected"):
        pred.first_layer(flux[:2, :7000])
    with pytest.raises(ValueError, match="spectrum_ids"):
        pred.sample(pred.first_layer(flux[:2]), ["a"])
