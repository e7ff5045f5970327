"""astronn_dist.worker.tables: the catalog reader the producer and training share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from _catalogs import write_catalog  # tests/ is on sys.path
from astronn_dist.worker.tables import CatalogError, float_values, match_columns, open_table, text_values

ALIASES = {"path": ("path",), "mag": ("mag", "kmag"), "err": ("err",)}


def _catalogs(tmp_path: Path) -> list[Path]:
    """One table (a text column with an empty cell, a float column with a missing cell, a column
    nobody reads) as CSV, Parquet and FITS."""
    columns = {"Path": ["a.fits", None, "c.fits", "d.fits", "e.fits"],
               "KMAG": [9.5, None, 10.25, -0.0, 12.0], "other": ["x"] * 5}
    return [write_catalog(fmt, tmp_path / "t", columns) for fmt in ("csv", "parquet", "fits")]


def test_every_format_reads_the_same_values_in_any_blocks(tmp_path: Path):
    for catalog in _catalogs(tmp_path):
        source = open_table(catalog)
        columns = match_columns(source.names, ALIASES, catalog, required=("path",))
        assert columns == {"path": "Path", "mag": "KMAG"}
        for block_rows in (1, 2, 5, 100):
            texts, values, first = [], [], 1
            for raw in source.blocks(block_rows, list(columns.values())):
                block = text_values(raw["Path"])
                texts += block
                values.append(float_values(raw["KMAG"], "KMAG", catalog, first))
                first += len(block)
            assert texts == ["a.fits", None, "c.fits", "d.fits", "e.fits"], catalog
            np.testing.assert_array_equal(np.concatenate(values), [9.5, np.nan, 10.25, 0.0, 12.0])


def test_errors_name_the_file_the_row_and_the_column(tmp_path: Path):
    catalog = tmp_path / "bad.csv"
    catalog.write_text("path,mag\na,1\nb,2\nc,bright\n")
    source = open_table(catalog)
    (raw,) = source.blocks(10, ["mag"])
    with pytest.raises(CatalogError, match=r"bad.csv: row 3, column 'mag' is not numeric: 'bright' \(a hint\)"):
        float_values(raw["mag"], "mag", catalog, 1, " (a hint)")
    with pytest.raises(CatalogError, match=r"no 'err' and no 'mag' column \(columns: path\)\. Add them\."):
        match_columns(["path"], ALIASES, catalog, required=("err", "mag"), hint="Add them.")
    with pytest.raises(CatalogError, match="catalog not found"):
        open_table(tmp_path / "missing.csv")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(CatalogError, match="unknown catalog format '.xlsx'"):
        open_table(tmp_path / "t.xlsx")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(CatalogError, match="cannot read this .parquet catalog"):
        open_table(tmp_path / "broken.parquet")
