"""Catalog files of the formats the producer reads (CSV, gzipped CSV, Parquet, FITS), written
from plain columns for the catalog and table-reader tests."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.table import MaskedColumn, Table


def write_catalog(fmt: str, path: Path, columns: dict[str, list]) -> Path:
    """``columns`` (None = an empty cell) as a catalog in ``fmt``; returns the file."""
    path = path.with_name(f"{path.name}.{fmt}")
    text_columns = {name for name, values in columns.items() if any(isinstance(v, str) for v in values)}
    if fmt in ("csv", "csv.gz"):
        def cell(value):
            return "" if value is None else "NaN" if isinstance(value, float) and np.isnan(value) else str(value)
        lines = [",".join(columns)] + [",".join(map(cell, row)) for row in zip(*columns.values())]
        data = ("\n".join(lines) + "\n").encode()
        path.write_bytes(gzip.compress(data) if fmt == "csv.gz" else data)
    elif fmt == "parquet":
        pq.write_table(
            pa.table({name: pa.array(values, pa.string() if name in text_columns else pa.float64())
                      for name, values in columns.items()}),
            path,
        )
    else:
        table = Table()
        for name, values in columns.items():
            if name in text_columns:  # FITS text is bytes; UTF-8 ids survive as bytes
                table[name] = np.array([(v or "").encode() for v in values], dtype="S64")
            else:
                table[name] = MaskedColumn([np.nan if v is None else v for v in values],
                                           mask=[v is None for v in values], dtype=np.float64)
        table.write(path)
    return path
