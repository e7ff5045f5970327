"""One row of a benchmark table, and the table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Row:
    """``spectra`` done in ``seconds`` by ``method`` under ``conditions`` (threads, batch,
    device, MC passes...); ``extra`` is a free note (memory, ratios).

    Optional: ``rss_mb``, a peak resident set [MiB] (a column of its own, shown only when some
    row has one); ``rated=False`` for a row whose spectra/s means nothing (e.g. ``status``).
    ``seconds`` NaN: nothing was measured (a failure), printed as ``-``."""

    section: str
    method: str
    conditions: str
    spectra: int
    seconds: float
    extra: str = ""
    rss_mb: float | None = None
    rated: bool = True

    @property
    def rate(self) -> float:
        """Spectra per second (NaN when nothing ran)."""
        return self.spectra / self.seconds if self.seconds > 0 else float("nan")


def format_rows(rows: Sequence[Row]) -> str:
    """A Markdown table (it reads as plain text too, and pastes into BENCHMARKS.md)."""
    rss = any(r.rss_mb is not None for r in rows)
    lines = ["| section | method | conditions | spectra | seconds | spectra/s | "
             + ("peak RSS MiB | " if rss else "") + "note |",
             "|---|---|---|---:|---:|---:|" + ("---:|" if rss else "") + "---|"]
    for r in rows:
        measured = not math.isnan(r.seconds)
        rate = f"{r.rate:,.1f}" if r.spectra and r.rated and measured else "-"
        seconds = f"{r.seconds:.2f}" if measured else "-"
        peak = ("-" if r.rss_mb is None else f"{r.rss_mb:,.0f}") + " | " if rss else ""
        lines.append(f"| {r.section} | {r.method} | {r.conditions} | {r.spectra} | "
                     f"{seconds} | {rate} | {peak}{r.extra} |")
    return "\n".join(lines)


def print_rows(rows: Sequence[Row]) -> None:
    print(format_rows(rows), flush=True)
