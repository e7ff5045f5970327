"""Monte-Carlo-dropout prediction of fakemag for a batch of spectra, on the CPU or a GPU.

What is computed (SDSS-V astra ``Network.ApogeeDistBCNN.predict``): ``mc_passes`` forward
passes of :class:`astronn_dist.worker.science.model.ApogeeDistBCNN` with dropout active (keep probability 0.7,
inverted scaling 1/0.7), then per spectrum::

    fakemag     = mean(out) * labels_std
    fakemag_err = sqrt(exp(mean(log_var)) + var(out, unbiased)) * labels_std

How, fast (each step is the same arithmetic as the reference, in another order):

1. conv1 and its ReLU come before the first dropout, so they are computed once per spectrum,
   not once per pass. (As eight shifted multiply-adds per channel: no cuDNN, so no TF32 on
   GPUs, and 6-8x faster on the CPU than conv1d or an unfolded product.)
2. The passes are folded into the batch dimension: a spectrum's 100 passes are 100 rows.
3. conv2 (2 -> 4 channels, 8 taps) is a 32 x 32 matrix product: the padded, channel-last
   input of each pass is cut into chunks of 16 positions x 2 channels, and each chunk gives
   the 8 x 4 outputs of its middle 8 positions (a banded "Toeplitz" matrix holds the taps).
   Two grids of chunks, offset by 8 positions, cover all outputs; both are plain strided
   views of one buffer, so nothing is copied. (oneDNN's direct convolution with 2 and 4
   channels is ~2x slower here.) Max pooling (4 positions) stays inside a block: a 1-D max
   pool over the product's columns, whose outputs interleave straight into Keras's
   channel-last flatten order.
4. conv2's bias and ReLU are applied after max pooling (max(y + b) = max(y) + b for a
   per-channel b, and ReLU commutes with max), on a quarter of the values.
5. The inverted-dropout scale 1/keep is folded into the next layer's weights (conv2, dense_1,
   dense_2), so a mask is a multiplication by 0 or 1; the 0/1 mask is a comparison written
   straight into float32 (5x faster than multiplying by a bool tensor).
6. Masks come from 16-bit random integers: one 64-bit draw of the generator (numpy's SFC64 on
   the CPU, torch's on a GPU; see :func:`draw_random16`) gives four. A unit
   is dropped when its 16-bit value is among the lowest ``round(0.3 * 65536)`` = 19661 of 65536,
   so the keep probability is 45875/65536 = 0.6999969 (0.7 to 3e-6). ``torch.bernoulli_`` costs
   about 10x more; 8-bit draws would give 0.6992, off by 8e-4.
7. One scheduler for both devices (:class:`Schedule`): a batch is cut into units of work,
   each a group of spectra and the pass parts it runs; a unit draws its spectra's random
   numbers and runs the network from conv2 on (``Predictor._run_unit``).
   On the CPU, units go to a pool of single-threaded workers (one per core): each unit's
   working set stays in that core's cache, mask generation (serial per generator) runs on all
   cores at once, and no OpenMP team spins on a busy machine. At 100 passes a unit is one
   spectrum; at a few passes it is a group of spectra padded to CPU_GROUP_ROWS rows, so the
   dense weights are streamed once per group, not per spectrum. With fewer units than
   workers, a spectrum's pass parts are shared among them. Passes are processed in tiles of
   25 so the per-tile buffers stay in cache, and the buffers are reused from unit to unit
   (a fresh multi-MB tensor costs page faults that can exceed the arithmetic).
   On a GPU, units are groups of ``max_rows`` spectrum-passes, one after the other, all
   passes of a group in one set of kernels.

Reproducibility: the masks of a spectrum come from a generator seeded with
``spectrum_seed(seed, spectrum_id)`` and are drawn in a fixed layout for all passes at once, so a
spectrum gives the same numbers (to float32 rounding) whatever batch, worker or run it is in.
On the CPU the SFC64 generator takes all 64 bits of the seed; on a GPU torch's generator, so
the same spectrum gets other (equally valid) masks there.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from astronn_dist.worker.config import DEFAULT_MC_PASSES, DEFAULT_SEED
from astronn_dist.worker.science.model import ApogeeDistBCNN, LoadedModel

__all__ = ["spectrum_seed", "Prediction", "FirstLayer", "Predictor", "MaskLayout", "Schedule"]

RANDOM_LEVELS = 1 << 16  # masks use 16-bit random integers
BLOCK = 8  # output positions per conv2 block (the Toeplitz product's width / 4 channels)


def spectrum_seed(global_seed: int, spectrum_id: str) -> int:
    """The seed of one spectrum's dropout masks: BLAKE2b of (global seed, id), 63 bits.

    Stable across processes, machines and Python versions (unlike ``hash()``).
    """
    digest = hashlib.blake2b(f"{int(global_seed)}:{spectrum_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class Prediction:
    """Per spectrum: fakemag and its total uncertainty, both in fakemag units, shape (N,)."""

    fakemag: np.ndarray
    fakemag_err: np.ndarray


@dataclass(frozen=True)
class FirstLayer:
    """:meth:`Predictor.first_layer` of N spectra: conv1's ReLU output in the padded
    channel-last layout, (N, 7520 * 2) float32 on the predictor's device."""

    conv1_out: torch.Tensor

    def __len__(self) -> int:
        return int(self.conv1_out.shape[0])


@dataclass(frozen=True)
class MaskLayout:
    """Geometry of the fast path and of one pass's row of 16-bit random numbers.

    A pass's row holds, in order: the conv2-input mask (``n_pos`` padded positions x 2
    channels), the flattened-pooling mask (``n_feat`` >= 7512) and the dense_1 mask (192).
    """

    n_pixels: int  # 7514
    c1: int  # conv1 channels (2)
    c2: int  # conv2 channels (4)
    taps: int  # 8
    pool: int  # 4
    n_flat: int  # 7512
    hidden1: int  # 192
    margin: int  # zeros before pixel 0 in the padded conv2 input (4)
    n_chunks: int  # chunks of 2 * BLOCK positions per pass (470)

    @classmethod
    def of(cls, net: ApogeeDistBCNN) -> "MaskLayout":
        cfg = net.config
        left, right = net.same_pad
        n_out = cfg.n_pooled * cfg.pool_length  # conv2 outputs the pooling uses (7512)
        if BLOCK % cfg.pool_length or BLOCK < cfg.filter_len - 1:
            raise NotImplementedError("fast MC path: pooling must tile 8 positions, taps <= 9")
        n_blocks = -(-n_out // BLOCK)
        layout = cls(
            n_pixels=cfg.n_pixels, c1=cfg.filters[0], c2=cfg.filters[1], taps=cfg.filter_len,
            pool=cfg.pool_length, n_flat=cfg.n_flat, hidden1=cfg.hidden[0],
            margin=left + 1, n_chunks=-(-n_blocks // 2),
        )
        # The last output's window must end inside the padded row (7511 + 4 + margin < 7520).
        assert n_out - 1 + right + layout.margin < layout.n_pos, "padded row too short"
        assert all(w % 4 == 0 for w in layout.widths), "masks must use whole 64-bit draws"
        return layout

    @property
    def n_pos(self) -> int:
        """Padded positions of the conv2 input per pass (470 chunks x 16 = 7520)."""
        return self.n_chunks * 2 * BLOCK

    @property
    def n_x1(self) -> int:
        """Width of the conv2 input per pass, channel-last (7520 x 2)."""
        return self.n_pos * self.c1

    @property
    def n_feat(self) -> int:
        """Pooled features per pass incl. the unused tail of the last block (7520 >= 7512)."""
        return self.n_chunks * 2 * (BLOCK // self.pool) * self.c2

    @property
    def widths(self) -> tuple[int, int, int]:
        """16-bit random numbers per pass for the three masks (each a multiple of 4)."""
        return self.n_x1, self.n_feat, self.hidden1

    def draw_sizes(self, n_passes: int) -> list[int]:
        """64-bit draws of the three masks for ``n_passes`` passes (four 16-bit numbers each)."""
        return [n_passes * width // 4 for width in self.widths]


def draw_random16(seed: int, n_passes: int, layout: MaskLayout,
                  generator: torch.Generator | None = None,
                  out: torch.Tensor | None = None,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """The 16-bit random numbers of one spectrum's three masks, for all passes.

    Returns int16 tensors (n_passes, 15040), (n_passes, 7520), (n_passes, 192): the conv2
    input (channel-last padded positions), the flattened pooling, dense_1's output. They are
    drawn in this order from one generator seeded with ``seed``, in one call, as full-range
    64-bit values viewed as four int16 each (each 16-bit lane is uniform), so the numbers a
    pass gets do not depend on how the work is later tiled; the three are views of one int64
    buffer of n_passes * sum(widths) / 4 values: ``out`` (filled) or a new one.

    On the CPU the generator is numpy's SFC64 (seeded through a SeedSequence with all 64 bits
    of ``seed``): twice as fast as torch's mt19937 here (0.9 vs 1.9 ms for a spectrum's 100
    passes), which was a sixth of the CPU inference time. Its stream is sequential, so one
    call gives the bits that three calls (one per mask) gave. On a GPU (``generator`` or
    ``device`` on CUDA) it is torch's generator of that device, drawn in place in one kernel
    (a kernel per mask cost the host 1.3 ms of launches per 40 spectra on an H200).
    """
    dev = torch.device(generator.device if generator is not None else device)
    sizes = layout.draw_sizes(n_passes)
    if dev.type == "cpu":
        raw = torch.from_numpy(np.random.SFC64(seed).random_raw(sum(sizes)).view(np.int64))
        if out is not None:
            raw = out.copy_(raw)
    else:
        gen = generator if generator is not None else torch.Generator(device=dev)
        gen.manual_seed(seed)
        raw = out if out is not None else torch.empty(sum(sizes), dtype=torch.int64, device=dev)
        raw.random_(-(2**63), None, generator=gen)  # from int64 min, no 'to': all 64 bits
    parts = torch.split(raw, sizes)
    return tuple(r.view(torch.int16).view(n_passes, width) for r, width in zip(parts, layout.widths))


MASK_RNG_CPU = "numpy-SFC64"
MASK_RNG_CUDA = "torch-cuda-Philox4x32-10"

CPU_PASS_PART = 50
"""CPU: the most passes of one spectrum in one forward call (100 passes: two parts)."""

CPU_GROUP_ROWS = 64
"""CPU: the fewest spectrum-passes one forward call carries when a spectrum alone has fewer."""


def module_masks(randoms: tuple[torch.Tensor, ...], layout: MaskLayout, threshold: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dropout masks a spectrum's random numbers (:func:`draw_random16`, P passes) stand
    for, in the network module's layout, for :meth:`ApogeeDistBCNN.forward_with_masks`:
    conv1 output (P, 2, 7514), flattened pooling (P, 7512), dense_1 output (P, 192); bool.

    The fast path keeps unit i of pass p when its 16-bit number is >= ``threshold``; the conv2
    input is laid out channel-last on padded positions (pixel j at position margin + j).
    """
    rand_conv2_in, rand_pooled, rand_hidden = randoms
    passes = rand_conv2_in.shape[0]
    conv1 = rand_conv2_in.view(passes, layout.n_pos, layout.c1)[
        :, layout.margin : layout.margin + layout.n_pixels]
    return (conv1.permute(0, 2, 1) >= threshold, rand_pooled[:, : layout.n_flat] >= threshold,
            rand_hidden >= threshold)


@dataclass(frozen=True)
class WorkUnit:
    """Spectra ``start .. stop - 1`` of a batch and the pass ranges ``parts`` to run for them."""

    start: int
    stop: int
    parts: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Schedule:
    """How a batch is cut into units of work: the one scheduler of the CPU and the GPU.

    CPU: groups of ``CPU_GROUP_ROWS // mc_passes`` spectra (padded: same shapes, same
    rounding), parts of CPU_PASS_PART passes in tiles of ``pass_tile``, a unit per worker job;
    with fewer units than workers, a spectrum's parts are shared among them. GPU: groups of
    ``max_rows // mc_passes`` spectra, all passes in one part and one tile (one set of kernels
    per group), not padded.
    """

    group: int  # spectra per unit
    parts: tuple[tuple[int, int], ...]  # pass ranges, one forward call each
    pass_tile: int  # passes per tile of the convolution stage
    pad: bool  # pad a partial group to ``group`` spectra
    share: bool  # split units by part when there are fewer units than workers

    @classmethod
    def for_device(cls, kind: str, mc_passes: int, *, pass_tile: int, max_rows: int
                   ) -> "Schedule":
        """The schedule of a device type ('cpu' or 'cuda')."""
        if kind == "cpu":
            group, part, tile = max(1, CPU_GROUP_ROWS // mc_passes), CPU_PASS_PART, pass_tile
        else:  # the GPU wants large kernels
            group, part, tile = max(1, max_rows // mc_passes), mc_passes, mc_passes
        parts = tuple((p0, min(mc_passes, p0 + part)) for p0 in range(0, mc_passes, part))
        return cls(group, parts, tile, pad=kind == "cpu", share=kind == "cpu")

    def units(self, n: int, workers: int) -> list[WorkUnit]:
        """The units of a batch of n spectra (results are placed by index, any order)."""
        units = [WorkUnit(start, min(n, start + self.group), self.parts)
                 for start in range(0, n, self.group)]
        if self.share and len(units) < workers and len(self.parts) > 1:
            units = [WorkUnit(u.start, u.stop, (part,)) for u in units for part in self.parts]
        return units


class Predictor:
    """MC-dropout predictions of one loaded model.

    Parameters
    ----------
    model
        From :func:`astronn_dist.worker.science.model.load_model`; its device is where the work runs.
    mc_passes
        Forward passes per spectrum (>= 2: the spread needs two).
    seed
        Global seed; with a spectrum's id it seeds that spectrum's masks.
    threads
        CPU only: single-threaded workers, one spectrum at a time each (default
        ``torch.get_num_threads()``, the cores PyTorch uses). The numbers do not depend on it:
        every product runs in a worker thread with one intra-op thread, in fixed parts.
        Several worker processes on one machine should share the cores out (e.g. 4 processes x
        ``threads=4`` on 16 cores).
    pass_tile
        CPU only: passes per tile of the convolution stage (cache-sized buffers).
    max_rows
        GPU only: spectrum-passes per group (~0.25 MB of GPU memory each).
    """

    def __init__(self, model: LoadedModel, mc_passes: int = DEFAULT_MC_PASSES,
                 seed: int = DEFAULT_SEED, *, threads: int | None = None,
                 pass_tile: int = 25, max_rows: int | None = None) -> None:
        if int(mc_passes) < 2:
            raise ValueError(f"mc_passes must be >= 2 (the MC variance needs two), got {mc_passes}")
        self.model = model
        self.model_id = model.model_id
        self.mc_passes = int(mc_passes)
        self.seed = int(seed)
        self.device = model.device
        net = model.net
        self.layout = MaskLayout.of(net)
        rate = float(net.config.dropout_rate)
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout rate {rate} must be in [0, 1)")
        drop_levels = round(rate * RANDOM_LEVELS)
        # Keep a unit when its int16 value is >= this (the lowest drop_levels values drop it).
        self.threshold = -(RANDOM_LEVELS // 2) + drop_levels
        self.keep_probability = 1.0 - drop_levels / RANDOM_LEVELS
        self.threads = max(1, int(threads if threads is not None else torch.get_num_threads()))
        self.pass_tile = max(1, int(pass_tile))
        # CPU: a spectrum's passes always run in the same parts of CPU_PASS_PART passes (one
        # forward call each), whatever the batch holds and however many threads there are, in
        # the worker threads (one intra-op thread each). Products of other row counts, or split
        # over more threads, may round differently (MKL picks kernels by shape), so fixed parts
        # and one thread per product keep a spectrum's numbers identical in any batch and on any
        # CPU thread count; the parts also let workers share one spectrum when a batch has
        # fewer spectra than workers.
        # CPU, few passes: the dense layers' weights (5.8 MB) would be streamed from memory for
        # every spectrum's handful of rows, a fixed cost per spectrum larger than the arithmetic.
        # So spectra go through in groups of a fixed size (partial groups padded), giving every
        # matrix product at least CPU_GROUP_ROWS rows; at 100 passes a group is one spectrum.
        # Rows (spectrum x pass) per block of work on a GPU: bounds its memory (~0.4 MB a row).
        self.max_rows = int(max_rows or 4096)
        self.schedule = Schedule.for_device(self.device.type, self.mc_passes,
                                            pass_tile=self.pass_tile, max_rows=self.max_rows)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._local = threading.local()

        scale = 1.0 / (1.0 - rate)  # inverted dropout, folded into the layer after each mask
        dev, f32 = self.device, torch.float32
        with torch.no_grad():
            p = {k: v.detach().to(dev) for k, v in net.state_dict().items()}
            self.input_mean = p["input_mean"].to(torch.float64)  # (7514,)
            self.labels_std = float(p["labels_std"].reshape(-1)[0])
            self.same_pad = net.same_pad
            # conv1's taps as Python floats (2 x 8): scalars for the shifted multiply-adds.
            self.conv1_taps = p["conv1.weight"][:, 0, :].to(f32).cpu().tolist()
            self.b_conv1 = p["conv1.bias"].to(f32)  # (2,)
            toeplitz, b_toeplitz = self._conv2_as_matrix(  # built on the CPU: 512 small writes
                p["conv2.weight"].double().cpu() * scale, p["conv2.bias"].double().cpu())
            self.toeplitz, self.b_toeplitz = toeplitz.to(dev), b_toeplitz.to(dev)
            self.w_dense1 = (p["dense_1.weight"].double() * scale).to(f32).T  # (7512, 192) view
            self.b_dense1 = p["dense_1.bias"].to(f32)
            self.w_dense2 = (p["dense_2.weight"].double() * scale).to(f32).T  # (192, 64) view
            self.b_dense2 = p["dense_2.bias"].to(f32)
            heads_w = torch.cat([p["dense_output.weight"], p["dense_var.weight"]])  # (2, 64)
            self.w_heads = heads_w.to(f32).T  # (64, 2)
            self.b_heads = torch.cat([p["dense_output.bias"], p["dense_var.bias"]]).to(f32)

    # -- weights -------------------------------------------------------------------------------

    def _conv2_as_matrix(self, weight: torch.Tensor, bias: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """conv2 (c2, c1, taps) as a (2*BLOCK*c1, BLOCK*c2) = (32, 32) matrix on one chunk,
        and the bias of each pooled feature of a block (8,).

        Rows: chunk position ``u`` (0..15) x input channel ``ci``, index ``u * c1 + ci``
        (channel-last). Columns: output position ``j = g * pool + q`` of the block x output
        channel ``co``, index ``(g * c2 + co) * pool + q``: the pool slot ``q`` innermost, so
        max pooling is a 1-D max pool of width 4 over the product's rows, and it leaves the
        block's features in Keras order (pooled position g, then channel co).
        Output j of block b is pixel ``8b + j``; its tap k reads pixel ``8b + j + k - left``,
        which sits at chunk position ``j + k - left + margin``. The bias is added after the
        pooling (max(y + b) = max(y) + b: it is per channel), on a quarter of the values.
        """
        lay = self.layout
        left = self.same_pad[0]
        mat = torch.zeros(2 * BLOCK * lay.c1, BLOCK * lay.c2, dtype=torch.float64,
                          device=weight.device)
        for j in range(BLOCK):
            g, q = divmod(j, lay.pool)
            for k in range(lay.taps):
                u = j + k - left + lay.margin
                for ci in range(lay.c1):
                    for co in range(lay.c2):
                        mat[u * lay.c1 + ci, (g * lay.c2 + co) * lay.pool + q] = weight[co, ci, k]
        return mat.to(torch.float32), bias.repeat(BLOCK // lay.pool).to(torch.float32)

    # -- public --------------------------------------------------------------------------------

    @property
    def mask_rng(self) -> str:
        """The random generator that draws this predictor's dropout masks (see draw_random16):
        CPU and GPU draw different, equally valid masks, so rows record which."""
        return MASK_RNG_CPU if self.device.type == "cpu" else MASK_RNG_CUDA

    def provenance(self) -> dict[str, Any]:
        """What every result row records of how it was computed."""
        return {"model_id": self.model_id, "mc_passes": self.mc_passes, "seed": self.seed,
                "device": self.device.type, "mask_rng": self.mask_rng}

    def predict(self, norm_flux: np.ndarray | FirstLayer, spectrum_ids: Sequence[str]
                ) -> Prediction:
        """fakemag and fakemag_err of each spectrum.

        Parameters
        ----------
        norm_flux
            Continuum-normalized flux, (N, 7514) (from :func:`astronn_dist.worker.science.continuum.normalize`),
            or its :meth:`first_layer` (computed beforehand, e.g. in a preparing thread).
        spectrum_ids
            N identities; with the global seed they fix each spectrum's dropout masks.
        """
        out, log_var = self.sample(norm_flux, spectrum_ids)
        out64 = out.astype(np.float64)
        var = out64.var(axis=1, ddof=1)  # Bessel's correction, as torch.var
        mean_log_var = log_var.astype(np.float64).mean(axis=1)
        std = self.labels_std
        return Prediction(
            fakemag=out64.mean(axis=1) * std,
            fakemag_err=np.sqrt(np.exp(mean_log_var) + var) * std,
        )

    def first_layer(self, norm_flux: np.ndarray) -> FirstLayer:
        """The deterministic start of the network (input mean, conv1, ReLU), the same for
        every pass: what :meth:`predict` and :meth:`sample` take instead of the flux.

        Element-wise arithmetic only, so its numbers do not depend on the thread that computes
        it nor on torch's thread count: the pipeline computes it in its preparing thread, with
        the reading and normalization (in the predicting thread, its dozen short torch calls
        each waited for the GIL held by the reading: 3 ms a spectrum on a busy machine).

        Raises:
            ValueError: norm_flux not (N, 7514) (or (7514,)).
        """
        flux = np.asarray(norm_flux, dtype=np.float64)
        if flux.ndim == 1:
            flux = flux[None, :]
        lay = self.layout
        if flux.ndim != 2 or flux.shape[1] != lay.n_pixels:
            raise ValueError(f"norm_flux has shape {flux.shape}, expected (N, {lay.n_pixels})")
        with torch.inference_mode():
            return FirstLayer(self._conv1(torch.from_numpy(flux).to(self.device)))

    def sample(self, norm_flux: np.ndarray | FirstLayer, spectrum_ids: Sequence[str]
               ) -> tuple[np.ndarray, np.ndarray]:
        """Every MC pass: (out, log_var), each (N, mc_passes) float32, in label-std units.

        ``out`` is the softplus head (fakemag / labels_std), ``log_var`` the log-variance head.
        ``norm_flux``: (N, 7514), or its :meth:`first_layer`.
        """
        first = norm_flux if isinstance(norm_flux, FirstLayer) else self.first_layer(norm_flux)
        conv1_out = first.conv1_out
        if conv1_out.device != self.device:
            raise ValueError(f"first layer on {conv1_out.device}, the predictor on {self.device}")
        n = conv1_out.shape[0]
        ids = [str(s) for s in spectrum_ids]
        if len(ids) != n:
            raise ValueError(f"{len(ids)} spectrum_ids for {n} spectra")
        out = np.empty((n, self.mc_passes), dtype=np.float32)
        log_var = np.empty_like(out)
        if n == 0:
            return out, log_var
        seeds = [spectrum_seed(self.seed, s) for s in ids]
        units = self.schedule.units(n, self.threads)
        if self.device.type == "cpu":
            # Always in the worker threads, never the caller's (whose torch threads are its own).
            pool = self._worker_pool()
            jobs = [pool.submit(self._run_unit, conv1_out, seeds, u, out, log_var) for u in units]
            for job in jobs:
                job.result()  # re-raises a worker's exception here
        else:
            # One GPU stream: the units go one after the other, each a set of kernels, and
            # their results stay on the GPU until the last: no unit waits for the one before
            # (a copy to the host per unit held the launches of the next one back).
            out_dev = torch.empty(out.shape, dtype=torch.float32, device=self.device)
            log_var_dev = torch.empty_like(out_dev)
            for unit in units:
                self._run_unit(conv1_out, seeds, unit, out_dev, log_var_dev)
            out[:], log_var[:] = out_dev.cpu().numpy(), log_var_dev.cpu().numpy()
        return out, log_var

    def warm_up(self) -> None:
        """Predict a few flat spectra once, so that the first real batch pays no first calls:
        the worker threads started with their scratch buffers, the kernels' first calls and, on
        a GPU, its libraries' handles (~45 ms of a process's first chunk of 128 spectra at 2
        passes on the CPU). Spectra have their own masks: nothing carries over to later numbers.
        """
        n = min(64, self.schedule.group) * (self.threads if self.device.type == "cpu" else 1)
        self.predict(np.ones((n, self.layout.n_pixels)), [f"warm-up-{i}" for i in range(n)])

    def close(self) -> None:
        """Stop the CPU worker threads (they also stop when the Predictor is collected)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self) -> None:  # pragma: no cover - interpreter-dependent timing
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    # -- the computation -----------------------------------------------------------------------

    def _conv1(self, flux: torch.Tensor) -> torch.Tensor:
        """ReLU(conv1(flux - input_mean)) in the padded channel-last layout: (N, 7520 * 2).

        Positions ``margin .. margin + 7513`` hold pixels 0..7513; the rest are zeros (conv2's
        'same' padding).
        """
        lay = self.layout
        n = flux.shape[0]
        out = torch.zeros(n, lay.n_pos, lay.c1, dtype=torch.float32, device=flux.device)
        for start in range(0, n, 512):  # bounds the float64 temporaries (512 x 7514)
            x = (flux[start : start + 512] - self.input_mean).to(torch.float32)  # (n, 7514)
            padded = F.pad(x, self.same_pad)  # (n, 7521)
            h = torch.empty(x.shape[0], lay.c1, lay.n_pixels, dtype=torch.float32, device=x.device)
            # Eight shifted multiply-adds per channel, in tap order: 6-8x faster on the CPU than
            # conv1d or an unfolded (n, 7514, 8) x (8, 2) product, whose kernels are made for
            # wide layers (tests/test_inference.py compares it with the module's forward).
            for c in range(lay.c1):
                acc = torch.mul(padded[:, : lay.n_pixels], self.conv1_taps[c][0], out=h[:, c])
                for k in range(1, lay.taps):
                    acc.add_(padded[:, k : k + lay.n_pixels], alpha=self.conv1_taps[c][k])
            h.add_(self.b_conv1[None, :, None]).clamp_(min=0)
            out[start : start + 512, lay.margin : lay.margin + lay.n_pixels] = h.transpose(1, 2)
        return out.view(n, lay.n_x1)

    def _mc_forward(self, conv1_out: torch.Tensor, rand_conv2_in: torch.Tensor,
                    rand_pooled: torch.Tensor, rand_hidden: torch.Tensor, pass_tile: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """P passes of S spectra from conv1's output on -> out, log_var (S, P).

        conv1_out: (S, 15040) (:meth:`_conv1`); the random numbers of the three masks, int16
        (:func:`draw_random16`): conv2 input (S, P, 15040), flattened pooling (S, P, 7520),
        dense_1 output (S, P, 192). A unit is kept where its number is >= ``threshold``.
        """
        lay = self.layout
        s, n_passes = rand_conv2_in.shape[:2]
        rows = s * n_passes
        thr, dev = self.threshold, conv1_out.device
        pooled = self._buffer("pooled", (s, n_passes, lay.n_feat), torch.float32, dev)
        chunk = 2 * BLOCK * lay.c1  # floats per chunk (32)
        per_block = (BLOCK // lay.pool) * lay.c2  # pooled features per block (8)
        for p0 in range(0, n_passes, pass_tile):
            p1 = min(n_passes, p0 + pass_tile)
            t = s * (p1 - p0)
            # conv2 input: (t, 15040) masked copies of conv1_out, then one chunk of zeros so
            # that grid 1's last (unused) chunk of the last pass stays inside the buffer.
            conv2_in = self._buffer("conv2_in", (t * lay.n_x1 + chunk,), torch.float32, dev)
            conv2_in[t * lay.n_x1 :].zero_()
            masked = conv2_in[: t * lay.n_x1].view(s, p1 - p0, lay.n_x1)
            # A comparison written straight into float32 is ~5x faster than bool * float.
            torch.ge(rand_conv2_in[:, p0:p1], thr, out=masked).mul_(conv1_out[:, None, :])
            tile_blocks = pooled[:, p0:p1].view(t, lay.n_chunks, 2, per_block)
            for grid in (0, 1):  # grid 1 starts BLOCK positions (16 floats) later
                x = conv2_in[grid * chunk // 2 :][: t * lay.n_x1].view(t * lay.n_chunks, chunk)
                y = self._buffer("conv2_out", (t * lay.n_chunks, BLOCK * lay.c2), torch.float32, dev)
                torch.mm(x, self.toeplitz, out=y)  # (t * 470, 32) conv2 outputs
                maxed = F.max_pool1d(y.view(1, 1, -1), lay.pool)  # (1, 1, t * 470 * 8)
                torch.add(maxed.view(t, lay.n_chunks, per_block), self.b_toeplitz,
                          out=tile_blocks[:, :, grid])  # interleave the grids: Keras flatten order
            tile = pooled[:, p0:p1]
            keep_pooled = self._buffer("keep_pooled", tile.shape, torch.float32, dev)
            tile.clamp_(min=0).mul_(torch.ge(rand_pooled[:, p0:p1], thr, out=keep_pooled))  # ReLU, dropout
        flat = pooled.view(rows, lay.n_feat)[:, : lay.n_flat]  # (rows, 7512); the tail unused
        hidden = torch.addmm(self.b_dense1, flat, self.w_dense1).clamp_(min=0)  # (rows, 192)
        keep_hidden = self._buffer("keep_hidden", (rows, lay.hidden1), torch.float32, dev)
        # the comparison reads the masks' numbers where they lie (strided across spectra)
        torch.ge(rand_hidden, thr, out=keep_hidden.view(s, n_passes, lay.hidden1))
        hidden.mul_(keep_hidden)
        hidden = torch.addmm(self.b_dense2, hidden, self.w_dense2).clamp_(min=0)  # (rows, 64)
        heads = torch.addmm(self.b_heads, hidden, self.w_heads).view(s, n_passes, 2)
        return F.softplus(heads[..., 0]), heads[..., 1]

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
        """A per-thread scratch tensor, reused across spectra (CPU; avoids page faults)."""
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        store = self._local.__dict__.setdefault("buffers", {})
        size = math.prod(shape)
        buf = store.get(name)
        if buf is None or buf.numel() < size or buf.dtype != dtype:
            buf = store[name] = torch.empty(size, dtype=dtype)
        return buf[:size].view(shape)

    # -- one unit of work (either device) -------------------------------------------------------

    def _run_unit(self, conv1_out: torch.Tensor, seeds: list[int], unit: WorkUnit,
                  out: np.ndarray | torch.Tensor, log_var: np.ndarray | torch.Tensor) -> None:
        """One unit: draw its spectra's random numbers, then run its pass parts. ``out`` and
        ``log_var``: host arrays (CPU), or tensors on the unit's device (GPU)."""
        with torch.inference_mode():  # grad mode is per thread: set it in the worker
            spectra, randoms = self._unit_inputs(conv1_out, seeds, unit)
            real = unit.stop - unit.start
            for p0, p1 in unit.parts:
                tiles = (r[:, p0:p1] for r in randoms)
                o, lv = self._mc_forward(spectra, *tiles, pass_tile=self.schedule.pass_tile)
                if isinstance(out, np.ndarray):
                    o, lv = o.cpu().numpy(), lv.cpu().numpy()
                out[unit.start : unit.stop, p0:p1] = o[:real]
                log_var[unit.start : unit.stop, p0:p1] = lv[:real]

    def _unit_inputs(self, conv1_out: torch.Tensor, seeds: list[int], unit: WorkUnit
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """A unit's conv1 rows and random numbers (S, P, width) int16 for the three masks.

        Every spectrum draws all its passes from its own generator stream (draw_random16), so
        its numbers do not depend on the unit it is in. A padded schedule (CPU) fills a partial
        group with zero spectra and zero random numbers (results discarded): every forward call
        then has the same shape, so a spectrum rounds the same wherever it sits in a batch.
        """
        lay, dev, passes = self.layout, conv1_out.device, self.mc_passes
        real = unit.stop - unit.start
        rows = self.schedule.group if self.schedule.pad else real
        spectra = conv1_out[unit.start : unit.stop]
        generator = None if dev.type == "cpu" else torch.Generator(device=dev)
        if rows == 1:  # one spectrum: its numbers as drawn, not copied (4.5 MB at 100 passes)
            drawn = draw_random16(seeds[unit.start], passes, lay, generator)
            return spectra, tuple(r[None] for r in drawn)
        sizes = lay.draw_sizes(passes)
        raw = self._buffer("random", (rows, sum(sizes)), torch.int64, dev)  # a spectrum a row
        for i in range(real):
            draw_random16(seeds[unit.start + i], passes, lay, generator, raw[i])
        if rows > real:
            raw[real:].zero_()
            padded = self._buffer("spectra", (rows, lay.n_x1), torch.float32, dev)
            padded[:real] = spectra
            padded[real:].zero_()
            spectra = padded
        randoms = tuple(r.view(torch.int16).view(rows, passes, width)  # views, across rows
                        for r, width in zip(torch.split(raw, sizes, dim=1), lay.widths))
        return spectra, randoms

    def _worker_pool(self) -> ThreadPoolExecutor:
        # A pool made before a fork (Celery prefork) has no threads in the child: remake it.
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(
                max_workers=self.threads, thread_name_prefix="astronn-mc",
                initializer=torch.set_num_threads, initargs=(1,),  # per thread under OpenMP
            )
            self._pool_pid = os.getpid()
        return self._pool
