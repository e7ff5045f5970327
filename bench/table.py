"""One row of a benchmark table, and the table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Row:
    """``spectra`` done in ``seconds`` by ``method`` under ``conditions`` (threads, batch,
    device, MC passes...); ``extra`` is a free note (memory, ratios)."""

    section: str
    method: str
    conditions: str
    spectra: int
    seconds: float
    extra: str = ""

    @property
    def rate(self) -> float:
        """Spectra per second (NaN when nothing ran)."""
        return self.spectra / self.seconds if self.seconds > 0 else float("nan")


def format_rows(rows: Sequence[Row]) -> str:
    """A Markdown table (it reads as plain text too, and pastes into BENCHMARKS.md)."""
    lines = ["| section | method | conditions | spectra | seconds | spectra/s | note |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        rate = f"{r.rate:,.1f}" if r.spectra else "-"
        lines.append(f"| {r.section} | {r.method} | {r.conditions} | {r.spectra} | "
                     f"{r.seconds:.2f} | {rate} | {r.extra} |")
    return "\n".join(lines)


def print_rows(rows: Sequence[Row]) -> None:
    print(format_rows(rows), flush=True)
