"""One-off: where do the GPU's numbers leave the CPU's with dropout off? (not committed)"""
import sys, time
import numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, "tests")
from test_inference import _net
from astronn_dist.worker.science.model import save_checkpoint, load_model
from astronn_dist.worker.science.inference import Predictor, BLOCK

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
rng = np.random.default_rng(0)
flux = 1 + 0.05 * rng.standard_normal((8, 7514))
path = save_checkpoint(_net(dropout_rate=0.0), "/tmp/p0.pt")
pc = Predictor(load_model(path), mc_passes=3)
pg = Predictor(load_model(path, dev), mc_passes=3)
print("devices", pc.device, pg.device, "thresholds", pc.threshold, pg.threshold)

def cmp(name, a, b):
    a = a.detach().double().cpu(); b = b.detach().double().cpu()
    print(f"{name:28s} {tuple(a.shape)} {tuple(b.shape)} maxdiff {float((a - b).abs().max()):.3e} max {float(a.abs().max()):.3e}")

for k in ("input_mean", "b_conv1", "toeplitz", "b_toeplitz", "w_dense1", "b_dense1", "w_dense2", "b_dense2", "w_heads", "b_heads"):
    cmp(k, getattr(pc, k), getattr(pg, k))
fc = pc.first_layer(flux).conv1_out
fg = pg.first_layer(flux).conv1_out
cmp("conv1_out", fc, fg)

def steps(pred, conv1_out, r):
    lay, thr = pred.layout, pred.threshold
    s, P = r[0].shape[:2]; t = s * P; out = {}
    chunk = 2 * BLOCK * lay.c1; per_block = (BLOCK // lay.pool) * lay.c2
    conv2_in = torch.empty(t * lay.n_x1 + chunk, device=conv1_out.device)
    conv2_in[t * lay.n_x1:].zero_()
    masked = conv2_in[: t * lay.n_x1].view(s, P, lay.n_x1)
    torch.ge(r[0], thr, out=masked); out["mask_float"] = masked.clone()
    masked.mul_(conv1_out[:, None, :]); out["masked"] = masked.clone()
    pooled = torch.empty(s, P, lay.n_feat, device=conv1_out.device)
    tile_blocks = pooled.view(t, lay.n_chunks, 2, per_block)
    for grid in (0, 1):
        x = conv2_in[grid * chunk // 2:][: t * lay.n_x1].view(t * lay.n_chunks, chunk)
        y = torch.empty(t * lay.n_chunks, BLOCK * lay.c2, device=conv1_out.device)
        torch.mm(x, pred.toeplitz, out=y); out[f"y{grid}"] = y.clone()
        out[f"y{grid}_plain"] = x @ pred.toeplitz
        maxed = F.max_pool1d(y.view(1, 1, -1), lay.pool); out[f"maxed{grid}"] = maxed.clone()
        out[f"amax{grid}"] = y.view(-1, lay.pool).amax(1)
        torch.add(maxed.view(t, lay.n_chunks, per_block), pred.b_toeplitz, out=tile_blocks[:, :, grid])
    out["pooled"] = pooled.clone()
    flat = pooled.view(t, lay.n_feat)[:, : lay.n_flat].clamp(min=0)
    hidden = torch.addmm(pred.b_dense1, flat, pred.w_dense1).clamp_(min=0); out["hidden"] = hidden.clone()
    hidden = torch.addmm(pred.b_dense2, hidden, pred.w_dense2).clamp_(min=0); out["hidden2"] = hidden.clone()
    out["heads"] = torch.addmm(pred.b_heads, hidden, pred.w_heads)
    return out

keep = [torch.full((8, 3, w), 32767, dtype=torch.int16) for w in pc.layout.widths]
with torch.inference_mode():
    sc = steps(pc, fc, keep)
    sg = steps(pg, fg, [k.to(pg.device) for k in keep])
    for k in sc:
        cmp(k, sc[k], sg[k])
    oc, lc = pc._mc_forward(fc, *keep, pass_tile=3)
    og, lg = pg._mc_forward(fg, *[k.to(pg.device) for k in keep], pass_tile=3)
    cmp("_mc_forward out", oc, og)
    seeds = [1, 2, 3, 4, 5, 6, 7, 8]
    unit = pg.schedule.units(8, pg.threads)[0]
    spectra, rands = pg._unit_inputs(fg, seeds, unit)
    print("unit", unit, "rand dtypes", [r.dtype for r in rands], [tuple(r.shape) for r in rands],
          "min", [int(r.min()) for r in rands])
    spectra_c, rands_c = pc._unit_inputs(fc, seeds, pc.schedule.units(8, pc.threads)[0])
    print("cpu unit rand shapes", [tuple(r.shape) for r in rands_c])
a = pc.predict(flux, list("abcdefgh")); b = pg.predict(flux, list("abcdefgh"))
print("predict cpu", a.fakemag[:4], "gpu", b.fakemag[:4])
