"""The report's numbers: one pass over a model's rows, one over the catalog, in one snapshot.

* The rows of the model come block by block from the export's query
  (:func:`astronn_dist.worker.service.results.export_blocks` in a
  :func:`~astronn_dist.worker.service.results.snapshot`), as the export's columns
  (:func:`astronn_dist.producer.export.block_columns`). With ``compare``, each block's
  spectra are looked up under the other model by index (``rows_for``).
* The catalog is read block by block (:class:`ReportCatalog`) and each block's rows are looked
  up under the model by index: a catalog of any length costs one block of memory.

What is exact and what is sampled: counts by outcome and flag bit, histograms, rates, host
totals, coverage (share of |z| <= 1), the mean and standard deviation of model differences are
exact at any row count. Medians, robust scatters and scatter plots come from uniform samples
of :data:`~astronn_dist.producer.report.stream.SAMPLE_SIZE` rows per bin
(:class:`~astronn_dist.producer.report.stream.Reservoir`): exact while a bin holds no more rows
than that, and :attr:`BinStats.exact` says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from astronn_dist.producer.export import block_columns
from astronn_dist.producer.report.reference import ReportCatalog, fakemag_from_parallax
from astronn_dist.producer.report.stream import BinnedStats, Histogram, RateCounter, Reservoir
from astronn_dist.worker.contract import FLAG_MISSING_PHOTOMETRY, FLAG_NAMES, FLAG_NO_RESULT
from astronn_dist.worker.service.results import export_blocks, export_stats, export_where, rows_for, snapshot

BLOCK_ROWS = 10_000
"""Rows per block of the table and of the catalog: 10,000 keep the transient objects (a block of
table rows as Python tuples, a catalog block's looked-up rows) to a few tens of MB."""

SNR_EDGES = (-np.inf, 50.0, 100.0, 150.0, 200.0, 300.0, np.inf)
"""S/N bins of the comparisons (per pixel, as APOGEE's SNR)."""
MAG_EDGES = (-np.inf, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, np.inf)
"""2MASS Ks bins [mag] of the comparisons."""
Z_EDGES = np.linspace(-5.0, 5.0, 51)

FAKEMAG_LOG_EDGES = np.linspace(-1.0, 4.5, 56)
"""log10 fakemag bins: M_Ks from -15 to +12.5 mag (fakemag = 10^(0.2 M_Ks + 2))."""
DIST_LOG_EDGES = np.linspace(1.0, 6.0, 51)
"""log10 distance [pc] bins: 10 pc to 1 Mpc."""
FRAC_ERR_EDGES = np.linspace(0.0, 1.0, 51)
"""dist_err / dist bins."""


@dataclass
class Comparison:
    """The model against one reference (truth or Gaia)."""

    name: str
    offset_definition: str
    z_definition: str
    by_snr: BinnedStats = field(default_factory=lambda: BinnedStats(SNR_EDGES, ""))
    by_mag: BinnedStats = field(default_factory=lambda: BinnedStats(MAG_EDGES, "mag"))
    z_hist: Histogram = field(default_factory=lambda: Histogram(Z_EDGES))
    sample: Reservoir = field(default_factory=lambda: Reservoir(width=4))
    """(snr, Ks, offset, z) of a uniform sample of the rows compared."""
    no_reference: int = 0
    """Rows matched to the catalog whose reference or result is missing."""

    def add(self, snr: np.ndarray, ks: np.ndarray, offset: np.ndarray, z: np.ndarray) -> None:
        ok = np.isfinite(offset) & np.isfinite(z)
        self.no_reference += int((~ok).sum())
        snr, ks, offset, z = snr[ok], ks[ok], offset[ok], z[ok]
        self.by_snr.add(snr, offset, z)
        self.by_mag.add(ks, offset, z)
        self.z_hist.add(z)
        self.sample.add(snr, ks, offset, z)


@dataclass
class ModelComparison:
    """This model against another on the spectra both have."""

    other: str
    common: int = 0
    only_this: int = 0
    only_other: int = 0
    n: int = 0
    """Pairs with both fakemags finite (the statistics below)."""
    mean: float = float("nan")
    """Mean of the fractional differences (exact)."""
    m2: float = 0.0
    """Sum of squared deviations from the mean, merged per block (Chan et al.): no cancellation."""
    inside: int = 0
    diff_hist: Histogram = field(default_factory=lambda: Histogram(np.linspace(-0.5, 0.5, 51)))
    sample: Reservoir = field(default_factory=lambda: Reservoir(width=4))
    """(fakemag this, fakemag other, fractional difference, z) of a uniform sample."""

    def add(self, a: np.ndarray, a_err: np.ndarray, b: np.ndarray, b_err: np.ndarray) -> None:
        with np.errstate(all="ignore"):
            diff = (b - a) / a
            z = (b - a) / np.hypot(a_err, b_err)
        ok = np.isfinite(diff) & np.isfinite(z)
        values = diff[ok]
        if len(values):
            mean, m2 = float(values.mean()), float(((values - values.mean()) ** 2).sum())
            if self.n:
                total = self.n + len(values)
                delta = mean - self.mean
                self.m2 += m2 + delta**2 * self.n * len(values) / total
                self.mean += delta * len(values) / total
            else:
                self.mean, self.m2 = mean, m2
            self.n += len(values)
        self.inside += int((np.abs(z[ok]) <= 1.0).sum())
        self.diff_hist.add(diff[ok])
        self.sample.add(a[ok], b[ok], diff[ok], z[ok])

    @property
    def std(self) -> float:
        """Standard deviation of the fractional differences (exact, population)."""
        return float(np.sqrt(self.m2 / self.n)) if self.n else float("nan")


@dataclass
class CatalogSummary:
    path: Path
    columns: dict[str, str]
    rows: int = 0
    matched: int = 0


@dataclass
class ReportData:
    """Everything the page shows (see the module's docstring for what is exact)."""

    model_id: str
    generated: datetime
    rows: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: {"good": 0, "bad": 0, "failed": 0})
    flags: dict[str, int] = field(default_factory=lambda: {name: 0 for name in FLAG_NAMES.values()})
    fakemag: Histogram = field(default_factory=lambda: Histogram(FAKEMAG_LOG_EDGES, log=True))
    dist: Histogram = field(default_factory=lambda: Histogram(DIST_LOG_EDGES, log=True))
    frac_err: Histogram = field(default_factory=lambda: Histogram(FRAC_ERR_EDGES))
    rate: RateCounter = field(default_factory=RateCounter)
    catalog: CatalogSummary | None = None
    snr_frac_err: Reservoir | None = None
    """(snr, dist_err / dist) of a sample of the rows the catalog gives an S/N (None: no S/N)."""
    comparisons: list[Comparison] = field(default_factory=list)
    kiel: Reservoir | None = None
    """(teff, logg, M_Ks) of a sample of the rows with a result (None: no teff/logg)."""
    compare: ModelComparison | None = None


def collect(engine: Any, model_id: str, *, catalog: str | Path | None = None, compare: str | None = None,
            block_rows: int = BLOCK_ROWS) -> ReportData:
    """The report's numbers for ``model_id``'s rows (in one snapshot of the table).

    Args:
        engine: the results database. catalog: a catalog with truth, parallaxes, snr, teff,
            logg (:mod:`astronn_dist.producer.report.reference`). compare: another model id.

    Raises:
        CatalogError: an unusable catalog.
    """
    data = ReportData(model_id=model_id, generated=datetime.now(timezone.utc))
    reference = ReportCatalog(catalog) if catalog is not None else None
    with snapshot(engine) as conn:
        if compare is not None:
            data.compare = ModelComparison(other=compare)
            other_rows = export_stats(conn, export_where([compare])).rows
        for block in export_blocks(conn, export_where([model_id]), block_rows):
            columns = block_columns(block)
            _add_rows(data, columns)
            if data.compare is not None:
                _add_compare(conn, data.compare, columns)
        if data.compare is not None:
            data.compare.only_other = other_rows - data.compare.common
        if reference is not None:
            _add_catalog(conn, data, reference, model_id)
    return data


def _add_rows(data: ReportData, c: dict[str, Any]) -> None:
    flags = np.asarray(c["result_flags"], dtype=np.int64)
    failed = (flags & FLAG_NO_RESULT) != 0
    bad = np.asarray(c["flag_bad"], dtype=bool)
    data.rows += len(flags)
    data.outcomes["failed"] += int(failed.sum())
    data.outcomes["bad"] += int((bad & ~failed).sum())
    data.outcomes["good"] += int((~bad).sum())
    for bit, name in FLAG_NAMES.items():
        data.flags[name] += int(c[name].sum())
    data.fakemag.add(c["L_fakemag"][~failed])
    # Without Ks the stored distance was computed from Ks = 0 (flagged): left out.
    with_ks = ~failed & ((flags & FLAG_MISSING_PHOTOMETRY) == 0)
    data.dist.add(c["dist"][with_ks])
    with np.errstate(all="ignore"):
        data.frac_err.add((c["dist_err"] / c["dist"])[with_ks])
    seconds = c["created"].astype("datetime64[us]").astype(np.int64) / 1e6
    data.rate.add(seconds, c["host"], c["t_elapsed"])


def _add_compare(conn: Any, comparison: ModelComparison, c: dict[str, Any]) -> None:
    ids = c["spectrum_id"]
    others = {r["spectrum_id"]: r for r in rows_for(conn, comparison.other, ids, ["L_fakemag", "L_fakemag_err"])}
    comparison.common += len(others)
    comparison.only_this += len(ids) - len(others)
    if not others:
        return
    at = np.array([i for i, sid in enumerate(ids) if sid in others], dtype=np.int64)
    b = np.array([_num(others[ids[i]]["L_fakemag"]) for i in at.tolist()])
    b_err = np.array([_num(others[ids[i]]["L_fakemag_err"]) for i in at.tolist()])
    comparison.add(c["L_fakemag"][at], c["L_fakemag_err"][at], b, b_err)


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


ROW_FIELDS = ("L_fakemag", "L_fakemag_err", "dist", "dist_err", "k_mag", "a_k_mag")


def _add_catalog(conn: Any, data: ReportData, catalog: ReportCatalog, model_id: str) -> None:
    summary = data.catalog = CatalogSummary(catalog.path, dict(catalog.found))
    has_snr = catalog.has("snr")
    if has_snr:
        data.snr_frac_err = Reservoir(width=2)
    if catalog.has("teff", "logg"):
        data.kiel = Reservoir(width=3)
    if catalog.has("fakemag"):
        data.comparisons.append(Comparison(
            "truth: fakemag", "(fakemag - fakemag_true) / fakemag_true", "(fakemag - fakemag_true) / fakemag_err"))
    if catalog.has("dist"):
        data.comparisons.append(Comparison(
            "truth: distance", "(dist - dist_true) / dist_true", "(dist - dist_true) / dist_err"))
    if catalog.has("parallax"):
        data.comparisons.append(Comparison(
            "Gaia parallax", "(fakemag - fakemag_plx) / fakemag",
            "(fakemag - fakemag_plx) / sqrt(fakemag_err^2 + fakemag_plx_err^2)"))
    for block in catalog.blocks():
        summary.rows += len(block.spectrum_ids)
        ids = [sid for sid in block.spectrum_ids if sid is not None]
        found = {r["spectrum_id"]: r for r in rows_for(conn, model_id, ids, [*ROW_FIELDS, "result_flags"])}
        at = np.array([i for i, sid in enumerate(block.spectrum_ids) if sid in found], dtype=np.int64)
        summary.matched += len(at)
        if not len(at):
            continue
        matched = [found[block.spectrum_ids[i]] for i in at.tolist()]
        row = {name: np.array([_num(r[name]) for r in matched]) for name in ROW_FIELDS}
        flags = np.array([r["result_flags"] for r in matched], dtype=np.int64)
        result = (flags & FLAG_NO_RESULT) == 0
        for name in ROW_FIELDS:
            row[name][~result] = np.nan
        # Without Ks the stored distance was computed from Ks = 0 (flagged): no distance, no Ks.
        has_ks = (flags & FLAG_MISSING_PHOTOMETRY) == 0
        ks = np.where(has_ks, row["k_mag"], np.nan)
        row["dist"][~has_ks] = np.nan
        cat = {name: values[at] for name, values in block.columns.items()}
        snr = cat.get("snr", np.full(len(at), np.nan))
        _add_references(data, row, cat, ks, snr)
        with np.errstate(all="ignore"):
            if data.snr_frac_err is not None:
                frac = row["dist_err"] / row["dist"]
                ok = np.isfinite(snr) & np.isfinite(frac)
                data.snr_frac_err.add(snr[ok], frac[ok])
            if data.kiel is not None:
                m_ks = 5.0 * (np.log10(row["L_fakemag"]) - 2.0)  # fakemag = 10^(0.2 M_Ks + 2)
                ok = np.isfinite(cat["teff"]) & np.isfinite(cat["logg"])
                data.kiel.add(cat["teff"][ok], cat["logg"][ok], m_ks[ok])


def _add_references(data: ReportData, row: dict[str, np.ndarray], cat: dict[str, np.ndarray],
                    ks: np.ndarray, snr: np.ndarray) -> None:
    fakemag, fakemag_err = row["L_fakemag"], row["L_fakemag_err"]
    with np.errstate(all="ignore"):
        for comparison in data.comparisons:
            if comparison.name == "truth: fakemag":
                truth = cat["fakemag"]
                offset = (fakemag - truth) / truth
                z = (fakemag - truth) / fakemag_err
            elif comparison.name == "truth: distance":
                truth = cat["dist"]
                offset = (row["dist"] - truth) / truth
                z = (row["dist"] - truth) / row["dist_err"]
            else:
                plx_err = cat.get("parallax_error")
                ref, ref_err = fakemag_from_parallax(ks - row["a_k_mag"], cat["parallax"], plx_err)
                offset = (fakemag - ref) / fakemag
                z = (fakemag - ref) / np.hypot(fakemag_err, ref_err)
            comparison.add(snr, ks, offset, z)
