"""The report as one self-contained HTML page: figures embedded as base64 PNG, styles inline, no
script, no link to anything outside the file (it opens offline)."""

from __future__ import annotations

import re
from html import escape

import numpy as np

from astronn_dist.producer.report import plots
from astronn_dist.producer.report.collect import MAG_EDGES, SNR_EDGES, Comparison, ReportData
from astronn_dist.producer.report.stream import ONE_SIGMA, SAMPLE_SIZE, BinStats, robust_sigma
from astronn_dist.worker.contract import FLAG_MEANINGS, FLAG_NAMES

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc; padding: 2px 8px; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.figs { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; } .figs img { max-width: 100%; border: 1px solid #eee; }
.note { color: #555; font-size: 0.9em; }
"""


def fmt(value: float, spec: str = ".4f") -> str:
    """A number as the page shows it ("n/a" when not finite)."""
    return format(value, spec) if np.isfinite(value) else "n/a"


def _img(data: str, alt: str) -> str:
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'


NUMBER = re.compile(r"^[-+]?[\d,]*\.?\d+$|^n/a$")


def _cell(text: str) -> str:
    """A table cell: numbers right-aligned (class n), text left."""
    return f'<td class="n">{escape(text)}</td>' if NUMBER.match(text) else f"<td>{escape(text)}</td>"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _stats_rows(stats: list[BinStats]) -> list[list[str]]:
    return [[s.label, f"{s.n:,}", fmt(s.coverage), fmt(s.median_offset), fmt(s.median_z, ".3f"),
             fmt(s.scatter), "exact" if s.exact else f"sample of {SAMPLE_SIZE:,}"] for s in stats]


STATS_HEADER = ["bin", "rows", "1-sigma coverage", "median offset", "median z", "robust scatter", "medians"]


def _comparison(c: Comparison) -> str:
    overall = c.by_snr.overall()
    anchor = re.sub(r"[^a-z0-9]+", "-", c.name.lower()).strip("-")
    parts = [f'<h2 id="{anchor}">{escape(c.name)}</h2>',
             f'<p class="note">offset = {escape(c.offset_definition)}; z = {escape(c.z_definition)}; '
             f"1-sigma coverage = share of rows with |z| &le; 1 (honest errors: {ONE_SIGMA:.3f}). "
             f"{c.no_reference:,} matched rows have no reference or no result and are left out.</p>",
             _table(STATS_HEADER, _stats_rows([overall]))]
    if c.by_snr.n[:-1].any():
        parts += ["<p>by S/N (catalog <code>snr</code>)</p>", _table(STATS_HEADER, _stats_rows(c.by_snr.bins()))]
    parts += ["<p>by Ks (the row's k_mag)</p>", _table(STATS_HEADER, _stats_rows(c.by_mag.bins()))]
    figures = [plots.z_histogram(c.z_hist, f"{c.name}: z-scores")]
    if c.by_snr.n[:-1].any():
        figures.append(plots.scatter(c.sample, 0, 2, "S/N", "offset", f"{c.name}: offset against S/N",
                                     logx=True, hline=0.0, ylim=(-1, 1)))
    figures.append(plots.scatter(c.sample, 1, 2, "Ks [mag]", "offset", f"{c.name}: offset against Ks",
                                 hline=0.0, ylim=(-1, 1)))
    parts.append('<div class="figs">' + "".join(_img(f, c.name) for f in figures) + "</div>")
    return "\n".join(parts)


def render(data: ReportData) -> str:
    """The page's HTML text."""
    title = f"astronn-dist report: {data.model_id}"
    parts = [f"<h1>{escape(title)}</h1>",
             f'<p class="note">{data.rows:,} rows of model <code>{escape(data.model_id)}</code>, read '
             f"{data.generated:%Y-%m-%d %H:%M:%S} UTC in one snapshot of the results table. Counts, histograms, "
             f"rates and coverages are exact; medians, scatters and scatter plots use every row up to "
             f"{SAMPLE_SIZE:,} per bin and a uniform sample past that.</p>"]

    parts.append("<h2>Counts</h2>")
    flag_rows = [[name, f"{bit.bit_length() - 1}", f"{data.flags[name]:,}", FLAG_MEANINGS[bit]]
                 for bit, name in FLAG_NAMES.items()]
    parts.append(_table(["outcome", "rows"], [[k, f"{v:,}"] for k, v in data.outcomes.items()]))
    parts.append(_table(["flag", "bit", "rows", "meaning"], flag_rows))
    parts.append('<div class="figs">'
                 + _img(plots.bars(list(data.outcomes), list(data.outcomes.values()), "rows by outcome"), "outcomes")
                 + _img(plots.bars(list(data.flags), list(data.flags.values()), "rows by flag bit", "#dd8452"), "flags")
                 + "</div>")

    parts.append("<h2>Distributions</h2>")
    parts.append('<div class="figs">'
                 + _img(plots.histogram(data.fakemag, "fakemag", "fakemag (rows with a result)"), "fakemag")
                 + _img(plots.histogram(data.dist, "distance [pc]", "distance (rows with a result and Ks)"), "distance")
                 + _img(plots.histogram(data.frac_err, "dist_err / dist", "fractional distance error (rows with a result and Ks)"),
                        "frac err")
                 + "</div>")
    if data.snr_frac_err is not None:
        parts.append('<p class="note">S/N: the catalog\'s <code>snr</code> column (the results table holds no S/N).</p>')
        parts.append('<div class="figs">' + _img(plots.scatter(
            data.snr_frac_err, 0, 1, "S/N (catalog)", "dist_err / dist", "fractional error against S/N",
            logx=True, ylim=(0, 1)), "frac err vs snr") + "</div>")
    else:
        parts.append('<p class="note">Fractional error against S/N: the results table holds no S/N; give '
                     "<code>--catalog</code> with an <code>snr</code> column.</p>")

    parts.append("<h2>Processing</h2>")
    host_rows = []
    for host, h in sorted(data.rate.hosts.items()):
        span = (h.last - h.first) if h.first is not None and h.last is not None else 0.0
        host_rows.append([host, f"{h.rows:,}", fmt(h.seconds / h.rows if h.rows else float("nan"), ".4f"),
                          fmt(h.rows / span if span > 0 else float("nan"), ".2f")])
    parts.append(_table(["host", "rows", "s per spectrum (t_elapsed)", "rows/s (first to last write)"], host_rows))
    hosts = sorted(data.rate.hosts)
    parts.append('<div class="figs">' + _img(plots.rate(data.rate.bins, data.rate.step_s), "rate")
                 + _img(plots.bars(hosts, [data.rate.hosts[h].rows for h in hosts], "rows by worker host", "#55a868"),
                        "hosts") + "</div>")

    if data.catalog is not None:
        cat = data.catalog
        columns = ", ".join(f"{k} ({v})" for k, v in sorted(cat.columns.items()))
        parts.append("<h2>Catalog</h2>")
        parts.append(f"<p><code>{escape(str(cat.path))}</code>: {cat.rows:,} rows, {cat.matched:,} with a row of this "
                     f"model. Columns used: {escape(columns)}.</p>")
        if not data.comparisons:
            parts.append('<p class="note">No reference: the catalog has no fakemag, dist or parallax column.</p>')
        parts.append(f'<p class="note">S/N bins: {escape(_edges(SNR_EDGES))}; Ks bins: {escape(_edges(MAG_EDGES))} mag. '
                     "Gaia parallaxes become fakemag as astroNN's mag_to_fakemag does: parallax [mas] &times; "
                     "10^(0.2 (Ks - A_K)), error |parallax_error / parallax| &times; fakemag; negative parallaxes "
                     "are kept, missing ones (NaN, -9999) and rows without Ks give no reference.</p>")
        for comparison in data.comparisons:
            parts.append(_comparison(comparison))
        if data.kiel is not None:
            parts.append("<h2>Kiel diagram</h2>")
            parts.append('<div class="figs">' + _img(plots.kiel(data.kiel), "Kiel diagram") + "</div>")

    if data.compare is not None:
        c = data.compare
        parts.append(f"<h2>Against model {escape(c.other)}</h2>")
        parts.append(f'<p class="note">difference = (fakemag_other - fakemag) / fakemag; z = (fakemag_other - fakemag) / '
                     f"sqrt(err^2 + err_other^2).</p>")
        sample = c.sample.sample
        median = float(np.median(sample[:, 2])) if len(sample) else float("nan")
        rows = [["spectra of both models", f"{c.common:,}"], ["only this model", f"{c.only_this:,}"],
                ["only the other", f"{c.only_other:,}"], ["pairs with both fakemags", f"{c.n:,}"],
                ["mean difference", fmt(c.mean)], ["standard deviation", fmt(c.std)],
                ["median difference", fmt(median)], ["robust scatter", fmt(robust_sigma(sample[:, 2]))],
                ["|z| <= 1", fmt(c.inside / c.n if c.n else float("nan"))]]
        parts.append(_table(["", ""], rows))
        if c.n:
            parts.append('<div class="figs">'
                         + _img(plots.one_to_one(c.sample, f"fakemag ({_short(data.model_id)})", f"fakemag ({_short(c.other)})"), "1:1")
                         + _img(plots.histogram(c.diff_hist, "(fakemag_other - fakemag) / fakemag", "difference"), "diff")
                         + "</div>")

    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<link rel="icon" href="data:,"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _short(model_id: str) -> str:
    return model_id if len(model_id) <= 30 else model_id[:27] + "..."


def _edges(edges: tuple[float, ...]) -> str:
    return ", ".join(f"{e:g}" for e in edges if np.isfinite(e))
