"""The report's figures, drawn with matplotlib's Agg canvas (no display, no pyplot state) and
returned as PNG bytes encoded in base64, to be embedded in the page."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from astronn_dist.producer.report.stream import Histogram, Reservoir

WIDTH_IN, HEIGHT_IN, DPI = 5.8, 3.5, 100  # 580 px wide: two figures side by side at 1280 px


def _size(n: int) -> float:
    """Marker area [pt^2]: bigger dots for a few points, small ones for thousands."""
    return 12.0 if n < 3000 else 3.0


def png(draw: Callable[[Figure], None], width: float = WIDTH_IN, height: float = HEIGHT_IN) -> str:
    """A figure drawn by ``draw(figure)``, as base64 PNG text."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    draw(figure)
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return base64.b64encode(out.getvalue()).decode("ascii")


def bars(labels: Sequence[str], counts: Sequence[int], title: str, color: str = "#4878a8") -> str:
    def draw(figure: Figure) -> None:
        ax = figure.add_subplot()
        y = np.arange(len(labels))
        ax.barh(y, counts, color=color)
        ax.set_yticks(y, labels)
        ax.invert_yaxis()
        ax.set_xlabel("rows")
        ax.set_title(title)
        for yi, count in zip(y, counts):
            ax.annotate(f" {count:,}", (count, yi), va="center", fontsize=8)
    return png(draw, height=0.5 + 0.4 * max(2, len(labels)))


def histogram(hist: Histogram, xlabel: str, title: str) -> str:
    """A fixed-bin histogram; log histograms are drawn on a log x axis."""
    def draw(figure: Figure) -> None:
        ax = figure.add_subplot()
        edges = 10.0**hist.edges if hist.log else hist.edges
        ax.stairs(hist.counts, edges, fill=True, color="#4878a8")
        if hist.log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("rows")
        ax.set_title(f"{title}\n({hist.below:,} below, {hist.above:,} above the range, {hist.missing:,} without a value)",
                     fontsize=9)
    return png(draw)


def z_histogram(hist: Histogram, title: str) -> str:
    """z-scores against a unit normal of the same count (what honest errors give)."""
    def draw(figure: Figure) -> None:
        ax = figure.add_subplot()
        ax.stairs(hist.counts, hist.edges, fill=True, color="#4878a8", label="rows")
        x = np.linspace(hist.edges[0], hist.edges[-1], 201)
        width = hist.edges[1] - hist.edges[0]
        ax.plot(x, hist.total * width * np.exp(-0.5 * x**2) / np.sqrt(2 * np.pi), color="#c44e52", label="N(0, 1)")
        ax.set_xlabel("z")
        ax.set_ylabel("rows")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    return png(draw)


def binned_medians(x: np.ndarray, y: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bin centres, medians of y) over the bins of x that hold at least 5 points."""
    centres, medians = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (x >= lo) & (x < hi)
        if inside.sum() >= 5:
            centres.append(np.median(x[inside]))
            medians.append(np.median(y[inside]))
    return np.array(centres), np.array(medians)


def scatter(sample: Reservoir, x: int, y: int, xlabel: str, ylabel: str, title: str, *,
            logx: bool = False, hline: float | None = None, ylim: tuple[float, float] | None = None) -> str:
    """Columns ``x`` and ``y`` of a sample, with running medians in 10 bins of x."""
    values = sample.sample
    xs, ys = values[:, x], values[:, y]

    def draw(figure: Figure) -> None:
        ax = figure.add_subplot()
        ok = np.isfinite(xs) & np.isfinite(ys) & ((xs > 0) if logx else True)
        ax.scatter(xs[ok], ys[ok], s=_size(int(ok.sum())), alpha=0.5, color="#4878a8", linewidths=0)
        if ok.sum() >= 10:
            lo, hi = np.nanpercentile(xs[ok], [1, 99])
            edges = np.geomspace(lo, hi, 11) if logx and lo > 0 else np.linspace(lo, hi, 11)
            cx, my = binned_medians(xs[ok], ys[ok], edges)
            ax.plot(cx, my, color="#c44e52", marker="o", label="median")
            ax.legend(fontsize=8)
        if hline is not None:
            ax.axhline(hline, color="0.4", lw=0.8)
        if logx:
            ax.set_xscale("log")
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        shown = "all" if sample.exact else f"a sample of {len(values):,} of {sample.seen:,}"
        ax.set_title(f"{title} ({shown})", fontsize=9)
    return png(draw)


def rate(bins: dict[int, int], step_s: int) -> str:
    """Rows written per second, per interval of ``step_s`` seconds."""
    def draw(figure: Figure) -> None:
        ax = figure.add_subplot()
        if bins:
            keys = np.array(sorted(bins))
            counts = np.array([bins[k] for k in keys])
            start = keys[0]
            minutes = (keys - start) * step_s / 60.0
            ax.bar(minutes, counts / step_s, width=step_s / 60.0, align="edge", color="#4878a8")
        ax.set_xlabel("minutes since the first row")
        ax.set_ylabel("rows / s")
        ax.set_title(f"processing rate (rows written per {step_s} s)", fontsize=9)
    return png(draw)


def kiel(sample: Reservoir) -> str:
    """teff against logg, coloured by the predicted M_Ks."""
    values = sample.sample

    def draw(figure: Figure) -> None:
        ax = figure.add_subplot()
        ok = np.isfinite(values[:, 2])
        points = ax.scatter(values[ok, 0], values[ok, 1], c=values[ok, 2], s=_size(len(values)), cmap="viridis_r", linewidths=0)
        ax.scatter(values[~ok, 0], values[~ok, 1], s=_size(len(values)), color="0.7", linewidths=0, label="no result")
        figure.colorbar(points, ax=ax, label="predicted M_Ks [mag]")
        ax.invert_xaxis()
        ax.invert_yaxis()
        ax.set_xlabel("Teff [K] (catalog)")
        ax.set_ylabel("log g [dex] (catalog)")
        shown = "all" if sample.exact else f"a sample of {len(values):,} of {sample.seen:,}"
        ax.set_title(f"Kiel diagram ({shown})", fontsize=9)
    return png(draw, height=4.4)


def one_to_one(sample: Reservoir, xlabel: str, ylabel: str) -> str:
    """Column 1 against column 0 of a sample on log axes, with the 1:1 line."""
    values = sample.sample

    def draw(figure: Figure) -> None:
        ax = figure.add_subplot()
        ok = (values[:, 0] > 0) & (values[:, 1] > 0)
        ax.scatter(values[ok, 0], values[ok, 1], s=_size(int(ok.sum())), alpha=0.5, linewidths=0, color="#4878a8")
        if ok.any():
            lo = min(values[ok, 0].min(), values[ok, 1].min())
            hi = max(values[ok, 0].max(), values[ok, 1].max())
            ax.plot([lo, hi], [lo, hi], color="#c44e52", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        shown = "all" if sample.exact else f"a sample of {len(values):,} of {sample.seen:,}"
        ax.set_title(f"fakemag, model against model ({shown})", fontsize=9)
    return png(draw, height=4.4)
