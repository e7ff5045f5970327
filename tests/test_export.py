"""astronn_dist.producer.export on real SQLite and PostgreSQL: streamed files equal a whole-table read, row
for row, in FITS, Parquet and CSV, and describe themselves (units, flag bits, provenance)."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from astropy.table import Table

from astronn_dist.producer.export import ExportError, export
from astronn_dist.worker.service import results
from astronn_dist.worker.contract import FLAG_NAMES, MAX_ID_CHARS

from test_results import MODEL, OTHER_MODEL, all_rows, engine, db_url, no_result, row  # noqa: F401 (fixtures)

FORMATS = (".fits", ".parquet", ".csv")


def _fill(engine: sa.Engine) -> list[dict]:
    rows = [
        row("2M00000001"),
        row("2M00000002", ebv=math.nan, result_flags=4, flag_warn=True),  # NaN stored as NULL
        row("ünïcode-ß-星", seed=None, mc_passes=None, device=None, mask_rng=None),
        row("x" * MAX_ID_CHARS, L_fakemag=-1.0, dist=math.nan, result_flags=1, flag_bad=True),
        no_result("2M00000003", reason="file missing: é"),
        row("2M00000001", model_id=OTHER_MODEL),
    ]
    results.upsert_results(engine, rows, host="h", task_id="t")
    return rows


def _expected(engine: sa.Engine, model: str | None = MODEL) -> list[dict]:
    """The whole table read directly (not through the export's query), as the export orders it."""
    rows = [{k: v for k, v in r.items() if k != "id"} for r in all_rows(engine)]
    return [r for r in rows if model is None or r["model_id"] == model]


def _same(value, expected) -> bool:
    if expected is None:
        return value in ("", None) or (isinstance(value, float) and math.isnan(value)) or np.ma.is_masked(value)
    if isinstance(expected, datetime):
        text = expected.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return str(value) in (text, text[:-1])  # Parquet: a UTC timestamp read back naive
    if isinstance(expected, bool):  # astropy reads CSV's true/false as text (pyarrow and pandas: bool)
        return value == expected or str(value) == str(expected).lower()
    if isinstance(expected, float):
        return math.isclose(float(value), expected, rel_tol=0, abs_tol=0)
    return value == expected


@pytest.mark.parametrize("suffix", FORMATS)
def test_export_equals_whole_table(engine: sa.Engine, tmp_path: Path, suffix: str):
    _fill(engine)
    out = tmp_path / f"out{suffix}"
    report = export(engine, out, model_ids=[MODEL], block_rows=2)  # several blocks
    expected = _expected(engine)
    assert report.rows == len(expected) == 5 and report.models == (MODEL,)
    table = Table.read(out)
    assert len(table) == len(expected)
    for got, want in zip(table, expected):
        for name, value in want.items():
            assert _same(got[name], value), (suffix, name, got[name], value)
        for bit, flag in FLAG_NAMES.items():
            assert _same(got[flag], want["result_flags"] & bit != 0), (suffix, flag)
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("suffix", (".fits", ".parquet"))
def test_export_describes_itself(engine: sa.Engine, tmp_path: Path, suffix: str):
    _fill(engine)
    out = tmp_path / f"out{suffix}"
    export(engine, out)  # every model
    table = Table.read(out)
    assert str(table["dist"].unit) == "pc" and str(table["k_mag"].unit) == "mag"
    assert str(table["t_elapsed"].unit) == "s"
    assert table["flag_no_result"].dtype == bool and table["flag_bad"].dtype == bool
    assert table["dist"].dtype.kind == "f" and table["result_flags"].dtype.kind == "i"
    if suffix == ".fits":
        assert table.meta["NROWS"] == 6 and table.meta["NMODELS"] == 2
        assert {table.meta["MODEL1"], table.meta["MODEL2"]} == {MODEL, OTHER_MODEL}
        assert table.meta["FLAGB11"] == "flag_no_result" and table.meta["PIPEVER"] == "0.1.0"
        assert str(table["created_mjd"].unit) == "d"
        created = _expected(engine, None)[0]["created"]
        mjd = (created - datetime(1858, 11, 17, tzinfo=timezone.utc)) / timedelta(days=1)
        assert abs(table["created_mjd"][0] - mjd) < 1e-9
        assert np.ma.is_masked(table["seed"][list(table["spectrum_id"]).index("ünïcode-ß-星")])
    else:
        import pandas as pd
        import pyarrow.parquet as pq

        meta = json.loads(pq.read_schema(out).metadata[b"astronn_dist"])
        assert meta["rows"] == 6 and sorted(meta["models"]) == sorted([MODEL, OTHER_MODEL])
        assert meta["flag_bits"]["11"]["column"] == "flag_no_result"
        frame = pd.read_parquet(out)
        assert frame["flag_bad"].dtype == bool and str(frame["created"].dt.tz) == "UTC"


def test_export_filters_and_refuses_to_overwrite(engine: sa.Engine, tmp_path: Path):
    _fill(engine)
    out = tmp_path / "out.parquet"
    assert export(engine, out, model_ids=[MODEL], outcome="failed").rows == 1
    with pytest.raises(ExportError, match="exists"):
        export(engine, out, model_ids=[MODEL])
    assert export(engine, out, model_ids=[MODEL], outcome="bad", force=True).rows == 2
    assert export(engine, out, model_ids=[MODEL], outcome="good", force=True).rows == 3
    later = datetime.now(timezone.utc) + timedelta(minutes=1)
    assert export(engine, out, since=later, force=True).rows == 0
    assert len(Table.read(out)) == 0 and "flag_no_result" in Table.read(out).colnames
    with pytest.raises(ExportError, match="unknown format"):
        export(engine, tmp_path / "out.txt")
