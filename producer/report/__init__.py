"""``astronn-dist report``: one self-contained HTML page of a model's results, for a person.

Counts by outcome and flag bit, distributions of fakemag, distance and fractional error,
processing rate over time and by host; with a catalog, residuals and z-scores against truth
(``fakemag``, ``dist``) or Gaia parallaxes, binned by S/N and Ks, with 1-sigma coverage and the
median offset, fractional error against S/N and a Kiel diagram; with a second model, the
differences on the spectra both have.

The table and the catalog are streamed a block at a time (bounded memory at any row count):
:mod:`.collect` says what is exact and what is sampled; :mod:`.page` writes the HTML and
:mod:`.plots` the figures (matplotlib, Agg).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from astronn_dist.producer.report.collect import ReportData, collect

__all__ = ["ReportData", "ReportError", "collect", "write_report"]


class ReportError(RuntimeError):
    """The report cannot be written as asked (the file exists, no rows of the model)."""


def write_report(engine: Any, out: str | Path, model_id: str, *, catalog: str | Path | None = None,
                 compare: str | None = None, force: bool = False) -> ReportData:
    """Write the report of ``model_id``'s rows to ``out`` (HTML) and return its numbers.

    The page is written under a temporary name and renamed when complete.

    Raises:
        ReportError: ``out`` exists and not ``force``; the model has no rows.
        CatalogError: an unusable catalog.
    """
    from astronn_dist.producer.report.page import render

    out = Path(out)
    if out.exists() and not force:
        raise ReportError(f"{out} exists; pass --force to replace it")
    data = collect(engine, model_id, catalog=catalog, compare=compare)
    if not data.rows:
        raise ReportError(f"no rows of model {model_id} in the results table")
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        partial.write_text(render(data), encoding="utf-8")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return data
