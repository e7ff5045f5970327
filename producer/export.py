"""``astronn-dist export``: the results table to FITS, Parquet or CSV, streamed in blocks.

Memory holds one block of rows (:data:`BLOCK_ROWS`), whatever the table's size: the rows come
from a server-side cursor (:func:`astronn_dist.worker.service.results.export_blocks`) and go to the file block by
block. The count and the text widths a FITS header needs are read first, in the same snapshot.

The files describe themselves:

* the results table's columns, in its order and with its names (``id`` left out), then one
  boolean column per flag bit (``flag_no_result``, ...) after ``result_flags``;
* units on physical columns (FITS ``TUNIT``, astropy's metadata in Parquet): mag, pc, s; fakemag
  is dimensionless (its definition is in the column's description);
* booleans as booleans; ``created`` as ISO-8601 UTC text (``2026-12-02T10:11:12.123456Z``; a
  UTC timestamp in Parquet) and, in FITS, also ``created_mjd`` [d, UTC];
* NULL floats as NaN, NULL text as empty, NULL integers as the FITS column's ``TNULL`` (a
  masked value in astropy) and as a Parquet/CSV null;
* the models, pipeline versions, export time, row count and the flag bits in the FITS header
  and in the Parquet schema's metadata (key ``astronn_dist``, JSON).

A file is written under a temporary name beside the target and renamed when complete, so a
failed export leaves no partial file; an existing file is refused unless ``force``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from astronn_dist.worker.contract import FLAG_MEANINGS, FLAG_NAMES
from astronn_dist.worker.service.results import EXPORT_COLUMNS, ExportStats, astro_nn_dist, export_blocks, export_stats, export_where, snapshot

BLOCK_ROWS = 20_000
"""Rows per block (and per Parquet row group): 20,000 keep an export of any size under ~300 MB
of memory (50,000: ~380 MB) at the same speed."""

FORMATS = (".fits", ".parquet", ".csv")

UNITS = {
    "t_elapsed": "s",
    "k_mag": "mag",
    "ebv": "mag",
    "a_k_mag": "mag",
    "dist": "pc",
    "dist_err": "pc",
    "created_mjd": "d",
}
"""Column -> unit (FITS and astropy spelling). fakemag has none: it is 10^(0.2 M_Ks + 2)."""

DESCRIPTIONS = {
    "spectrum_id": "the spectrum's identity",
    "path": "the apStar file read",
    "model_id": "checkpoint file name + SHA-256 prefix",
    "pipeline_version": "version of the pipeline's code",
    "created": "UTC time of the row's latest write (ISO-8601)",
    "created_mjd": "UTC time of the row's latest write (MJD)",
    "t_elapsed": "wall time per spectrum of its batch",
    "k_mag": "2MASS Ks used (missing: 0)",
    "ebv": "E(B-V) used (missing: 0)",
    "a_k_mag": "A_K = 0.3517 E(B-V)",
    "L_fakemag": "fakemag = 10^(0.2 M_Ks + 2), dimensionless",
    "L_fakemag_err": "1-sigma uncertainty of fakemag (MC dropout + predicted variance)",
    "dist": "distance",
    "dist_err": "1-sigma uncertainty of the distance",
    "result_flags": "flag bits (FLAGBn keywords / flag_bits metadata)",
    "flag_warn": "missing extinction",
    "flag_bad": "fakemag unreliable, missing Ks, or no result",
    "attempts": "tries of the chunk, this one included",
    "error": "why there is no result",
    "mc_passes": "MC-dropout passes",
    "seed": "global seed of the dropout masks",
    "device": "where the network ran",
    "mask_rng": "generator of the dropout masks",
    "host": "host that wrote the row",
    "task_id": "Celery task id",
    **{name: FLAG_MEANINGS[bit] for bit, name in FLAG_NAMES.items()},
}

INT_NULL = -(2**63)
"""FITS TNULL of the 64-bit integer columns that can be NULL (mc_passes, seed, attempts)."""


class ExportError(RuntimeError):
    """The export cannot be written as asked (the file exists, an unknown format)."""


def file_format(out: str | Path) -> str:
    """The format ``out``'s suffix names (one of :data:`FORMATS`).

    Raises:
        ExportError: any other suffix.
    """
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise ExportError(f"{out}: unknown format '{suffix}'; use {', '.join(FORMATS)}")
    return suffix


@dataclass(frozen=True)
class Field:
    """One column of the exported file: its name and kind (float, int, bool, text, time)."""

    name: str
    kind: str


def fields(with_mjd: bool = False) -> list[Field]:
    """The exported columns in order: the table's, the flag bits after ``result_flags``,
    ``created_mjd`` after ``created`` when ``with_mjd`` (FITS)."""
    kinds = {float: "float", int: "int", bool: "bool", str: "text", datetime: "time"}
    out = []
    for name in EXPORT_COLUMNS:
        out.append(Field(name, "time" if name == "created" else kinds[astro_nn_dist.c[name].type.python_type]))
        if name == "created" and with_mjd:
            out.append(Field("created_mjd", "float"))
        if name == "result_flags":
            out += [Field(flag, "bool") for flag in FLAG_NAMES.values()]
    return out


@dataclass(frozen=True)
class ExportReport:
    path: Path
    rows: int
    seconds: float
    models: tuple[str, ...]


def file_metadata(stats: ExportStats, exported: datetime) -> dict[str, Any]:
    """What the file says of itself (FITS header keywords, Parquet schema metadata)."""
    return {
        "origin": "astronn-dist",
        "table": str(astro_nn_dist.name),
        "models": list(stats.models),
        "pipeline_versions": list(stats.pipeline_versions),
        "exported": _iso(exported),
        "rows": stats.rows,
        "flag_bits": {
            str(bit.bit_length() - 1): {"column": name, "meaning": FLAG_MEANINGS[bit]}
            for bit, name in FLAG_NAMES.items()
        },
    }


# ------------------------------------------------------------------------------ a block's columns


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def block_columns(block: Sequence[tuple[Any, ...]]) -> dict[str, Any]:
    """A block of table rows as columns: numpy arrays for numbers (NULL floats NaN), lists
    for text (NULL empty), ``created`` as datetime64[us] (UTC), the flag-bit booleans added."""
    raw = dict(zip(EXPORT_COLUMNS, zip(*block))) if block else {name: () for name in EXPORT_COLUMNS}
    out: dict[str, Any] = {}
    for f in fields():
        if f.name not in raw:  # a flag bit: derived below
            continue
        values = raw[f.name]
        if f.kind == "float":
            out[f.name] = np.array(values, dtype=np.float64)  # None -> NaN
        elif f.kind == "bool":
            out[f.name] = np.array(values, dtype=bool)
        elif f.kind == "int":
            out[f.name] = list(values)  # may hold None: each writer has its own NULL
        elif f.kind == "text":
            out[f.name] = ["" if v is None else v for v in values]
        else:  # created: aware UTC datetimes
            out[f.name] = np.array([v.replace(tzinfo=None) for v in values], dtype="datetime64[us]")
    flags = np.array(raw["result_flags"], dtype=np.int64)
    for bit, name in FLAG_NAMES.items():
        out[name] = (flags & bit) != 0
    return out


def _iso_texts(created: np.ndarray) -> list[str]:
    return [f"{text}Z" for text in np.datetime_as_string(created, unit="us")]


# ------------------------------------------------------------------------------------- writers


class _ArrowWriter:
    """Parquet (pyarrow's ParquetWriter) or CSV (pyarrow's CSVWriter), a record batch per block."""

    def __init__(self, path: Path, stats: ExportStats, meta: dict[str, Any], parquet: bool) -> None:
        self.parquet = parquet
        self.fields = fields()
        types = {"float": pa.float64(), "int": pa.int64(), "bool": pa.bool_(), "text": pa.string(),
                 # CSV: ISO-8601 text (pyarrow's CSV timestamps put a space before the time)
                 "time": pa.timestamp("us", tz="UTC") if parquet else pa.string()}
        schema = pa.schema([pa.field(f.name, types[f.kind]) for f in self.fields])
        if parquet:
            import pyarrow.parquet as pq

            schema = schema.with_metadata(_parquet_metadata(self.fields, stats, meta))
            self.writer: Any = pq.ParquetWriter(path, schema)
        else:
            import pyarrow.csv as pacsv

            self.writer = pacsv.CSVWriter(path, schema)
        self.schema = schema

    def write(self, columns: dict[str, Any]) -> None:
        arrays = []
        for f in self.fields:
            values = columns[f.name]
            if f.kind == "time" and not self.parquet:
                values = _iso_texts(values)
            arrays.append(pa.array(values, type=self.schema.field(f.name).type))
        self.writer.write_batch(pa.record_batch(arrays, schema=self.schema))

    def close(self) -> None:
        self.writer.close()

    abort = close


def _parquet_metadata(columns: Sequence[Field], stats: ExportStats, meta: dict[str, Any]) -> dict[bytes, bytes]:
    """astropy's own Parquet metadata (units, descriptions, text widths: what astropy's
    Table.read restores) plus ours as JSON under ``astronn_dist``."""
    from astropy.table import Column, Table
    from astropy.table import meta as table_meta

    dtypes = {"float": "f8", "int": "i8", "bool": "?", "time": "M8[us]"}
    empty = Table(meta={"astronn_dist": meta})
    widths: dict[str, int] = {}
    for f in columns:
        width = max(1, stats.max_bytes.get(f.name, 1))
        empty[f.name] = Column(np.zeros(0, dtype=f"U{width}" if f.kind == "text" else dtypes[f.kind]),
                               unit=UNITS.get(f.name), description=DESCRIPTIONS.get(f.name))
        if f.kind == "text":
            widths[f.name] = width
    metadata = {"table_meta_yaml": "\n".join(table_meta.get_yaml_from_table(empty)), "astronn_dist": json.dumps(meta)}
    metadata.update({f"table::len::{name}": str(width) for name, width in widths.items()})
    return {k.encode(): v.encode() for k, v in metadata.items()}


class _FitsWriter:
    """A FITS binary table written by hand after astropy's header: records are fixed width,
    so each block is one numpy structured array in FITS's big-endian layout."""

    FORMATS = {"float": ("D", ">f8"), "int": ("K", ">i8"), "bool": ("L", "i1")}

    def __init__(self, path: Path, stats: ExportStats, meta: dict[str, Any]) -> None:
        from astropy.io import fits

        self.fields = fields(with_mjd=True)
        self.rows_expected = stats.rows
        self.rows_written = 0
        cols, dtype = [], []
        for f in self.fields:
            if f.kind in ("text", "time"):
                width = 27 if f.kind == "time" else max(1, stats.max_bytes[f.name])  # UTF-8 bytes
                fmt, np_type = f"{width}A", f"S{width}"
            else:
                fmt, np_type = self.FORMATS[f.kind]
            null = INT_NULL if f.kind == "int" else None
            cols.append(fits.Column(name=f.name, format=fmt, unit=UNITS.get(f.name), null=null,
                                    array=np.zeros(0, dtype=np_type)))
            dtype.append((f.name, np_type))
        self.dtype = np.dtype(dtype)
        table = fits.BinTableHDU.from_columns(cols)
        header = table.header
        header["NAXIS2"] = stats.rows
        if header["NAXIS1"] != self.dtype.itemsize:  # astropy and this layout must agree
            raise AssertionError(f"FITS record of {header['NAXIS1']} bytes, numpy of {self.dtype.itemsize}")
        for i, f in enumerate(self.fields, start=1):
            if f.name in DESCRIPTIONS:
                header[f"TCOMM{i}"] = DESCRIPTIONS[f.name]
        _fits_provenance(header, meta)
        primary = fits.PrimaryHDU()
        primary.header["ORIGIN"] = "astronn-dist"
        primary.header["DATE"] = (meta["exported"][:19], "UTC time of the export")
        self.fh = path.open("wb")
        self.fh.write(primary.header.tostring().encode("ascii"))
        self.fh.write(header.tostring().encode("ascii"))

    def write(self, columns: dict[str, Any]) -> None:
        n = len(columns["spectrum_id"])
        records = np.zeros(n, dtype=self.dtype)
        for f in self.fields:
            if f.name == "created_mjd":
                # MJD = days since 1858-11-17 00:00 UTC (no leap seconds in datetime64's count)
                records[f.name] = (columns["created"] - np.datetime64("1858-11-17T00:00:00", "us")) / np.timedelta64(86_400_000_000, "us")
            elif f.kind == "time":
                records[f.name] = [t.encode("ascii") for t in _iso_texts(columns[f.name])]
            elif f.kind == "text":
                records[f.name] = [v.encode("utf-8") for v in columns[f.name]]
            elif f.kind == "bool":
                records[f.name] = np.where(columns[f.name], ord("T"), ord("F"))
            elif f.kind == "int":
                records[f.name] = [INT_NULL if v is None else v for v in columns[f.name]]
            else:
                records[f.name] = columns[f.name]
        self.fh.write(records.tobytes())
        self.rows_written += n

    def close(self) -> None:
        if self.rows_written != self.rows_expected:  # the snapshot makes this impossible
            raise RuntimeError(f"wrote {self.rows_written} rows, the header says {self.rows_expected}")
        data_bytes = self.rows_written * self.dtype.itemsize
        self.fh.write(b"\0" * (-data_bytes % 2880))
        self.fh.close()

    def abort(self) -> None:
        self.fh.close()


def _fits_provenance(header: Any, meta: dict[str, Any]) -> None:
    header["EXTNAME"] = meta["table"].upper()
    header["ORIGIN"] = meta["origin"]
    header["NMODELS"] = (len(meta["models"]), "models of the rows")
    for i, model in enumerate(meta["models"], start=1):
        header[f"MODEL{i}"] = model
    header["PIPEVER"] = (", ".join(meta["pipeline_versions"]), "pipeline versions of the rows")
    header["EXPORTED"] = (meta["exported"], "UTC time of the export")
    header["NROWS"] = (meta["rows"], "rows exported")
    header["TIMESYS"] = ("UTC", "created and created_mjd are UTC")
    header["MJDREF"] = (0.0, "created_mjd is a plain MJD")
    for bit, flag in meta["flag_bits"].items():
        header[f"FLAGB{bit}"] = (flag["column"], f"result_flags bit {bit}")
        header.add_comment(f"bit {bit}: {flag['meaning']}")


# ------------------------------------------------------------------------------------ the export


def export(
    engine: Any,
    out: str | Path,
    *,
    model_ids: Sequence[str] | None = None,
    outcome: str | None = None,
    since: datetime | None = None,
    force: bool = False,
    block_rows: int = BLOCK_ROWS,
    on_progress: Callable[[int, int], None] | None = None,
) -> ExportReport:
    """Write the selected rows to ``out`` (its suffix picks the format: :data:`FORMATS`).

    Args:
        engine: the results database.
        model_ids: only these models' rows (None: every model).
        outcome: ``good``, ``bad`` or ``failed`` (see ``astronn_dist.worker.service.results.OUTCOMES``), or all.
        since: only rows written at or after this time (naive: UTC).
        force: replace an existing file.
        on_progress: called with (rows written so far, rows in all) after each block.

    Raises:
        ExportError: an unknown suffix, or the file exists and ``force`` is not set.
    """
    out = Path(out)
    suffix = file_format(out)
    if out.exists() and not force:
        raise ExportError(f"{out} exists; choose another name or pass --force to replace it")
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    t0 = time.perf_counter()
    where = export_where(model_ids, outcome, since)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        with snapshot(engine) as conn:
            stats = export_stats(conn, where)
            meta = file_metadata(stats, datetime.now(timezone.utc))
            writer: Any = (_FitsWriter(partial, stats, meta) if suffix == ".fits"
                           else _ArrowWriter(partial, stats, meta, parquet=suffix == ".parquet"))
            written = 0
            try:
                for block in export_blocks(conn, where, block_rows):
                    writer.write(block_columns(block))
                    written += len(block)
                    if on_progress is not None:
                        on_progress(written, stats.rows)
                if not written:  # a file with its columns and no row
                    writer.write(block_columns([]))
            except BaseException:
                writer.abort()
                raise
            writer.close()
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return ExportReport(out, stats.rows, time.perf_counter() - t0, stats.models)
