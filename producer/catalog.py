"""What to process: catalogs (CSV, FITS table, Parquet) and apStar files, as spectrum requests.

A catalog has one row per spectrum::

    path                                       spectrum_id   k_mag    ebv
    apo25m/000+02/apStar-dr17-2M17335483.fits   2M17335483   9.811
    /abs/path/apStar-dr17-2M19485057.fits                   10.522   0.1927

* ``path`` (required): the apStar file, relative to the catalog's folder (absolute allowed).
* ``spectrum_id`` (optional): the row's identity in the results table; an absent column or an
  empty cell means the ``path`` exactly as written in the catalog.
* ``k_mag`` (2MASS Ks) and ``ebv`` (E(B-V)) [mag] (optional; aliases ``K``, ``ks_m``, ``kmag``
  and ``E_BV``, ``SFD_EBV``; column names are case-insensitive). An empty, masked or NaN cell is
  ``None``: the worker then uses the apStar header's ``K`` / ``SFD_EBV``.

A catalog of any length is read in blocks (:func:`open_catalog`, :func:`iter_catalog`): a first
pass checks every row (a path, numeric photometry) and hashes each spectrum_id and each row to
64-bit integers (16 bytes a row: 160 MB at 10 million rows), so that repeated ids are found
with numpy; only their rows are compared (an exact repeat is dropped, two different rows under
one id are an error naming both). The second pass yields the requests a block at a time.
Errors name the data row (1-based) and the column. :func:`read_catalog` is the list of it all.

Files and folders given directly (``astronn-dist run DIR``) become requests without photometry.
Their ``spectrum_id`` is the file's path relative to the folder the user named (the directory,
or the fixed part of a glob; a file named directly: its file name), so that ``produce DIR``,
``watch DIR`` and ``run DIR`` give the same file the same identity.

Nothing here imports torch; the only worker import is the request type of the message contract.
"""

from __future__ import annotations

import fnmatch
import glob
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from astronn_dist.worker.contract import SpectrumRequest

# Canonical column -> accepted names (compared lower-case), in order of preference.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "path": ("path",),
    "spectrum_id": ("spectrum_id",),
    "k_mag": ("k_mag", "k", "ks_m", "kmag"),
    "ebv": ("ebv", "e_bv", "sfd_ebv"),
}

# DR17 apStar (APO 2.5 m) and asStar (LCO 2.5 m) files, plain or gzipped.
SPECTRUM_PATTERNS: tuple[str, ...] = (
    "apStar-*.fits",
    "apStar-*.fits.gz",
    "asStar-*.fits",
    "asStar-*.fits.gz",
)

CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2")
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")


class CatalogError(ValueError):
    """A catalog or a list of paths the producer cannot use; the message says what to do."""


@dataclass(frozen=True)
class SpectrumFile:
    """One spectrum file found on disk: absolute path, size [bytes], mtime [ns since epoch]."""

    path: str
    spectrum_id: str
    size: int
    mtime_ns: int


def is_spectrum_name(name: str) -> bool:
    """True for file names such as ``apStar-dr17-2M...fits`` or ``asStar-...fits.gz``."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in SPECTRUM_PATTERNS)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in CSV_SUFFIXES + FITS_SUFFIXES + PARQUET_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _match_columns(names: Sequence[str], catalog: Path) -> dict[str, str]:
    """Canonical name -> the catalog's own column name, for the columns present."""
    by_lower = {name.lower(): name for name in names}
    found = {}
    for canonical, aliases in COLUMN_ALIASES.items():
        for alias in aliases:
            if alias in by_lower:
                found[canonical] = by_lower[alias]
                break
    if "path" not in found:
        raise CatalogError(
            f"{catalog}: no 'path' column (columns: {', '.join(names) or 'none'}). "
            "Add a column 'path' with each apStar file, relative to the catalog's folder."
        )
    return found


# --------------------------------------------------------------------------------------------
# Reading the three formats block by block. A source yields, per block of rows, the catalog's
# own columns (pyarrow arrays for CSV and Parquet, astropy column slices for FITS); _values turns
# them into plain values: str lists for text, float64 arrays for photometry (NaN = none).

BLOCK_ROWS = 50_000
"""Rows per block: a block's requests (~20 MB) are in memory at a time, and one skip check
against the results table covers a block."""

_CSV_READ_BYTES = 1 << 20  # pyarrow's CSV blocks (regrouped): larger ones read ahead more


def _rebatch(batches: Iterable[Any], block_rows: int) -> Iterator[Any]:
    """pyarrow record batches of any sizes -> tables of exactly ``block_rows`` rows (the last
    one shorter). Slices only: no data is copied."""
    import pyarrow as pa

    pending: list[Any] = []
    count = 0
    for batch in batches:
        if batch.num_rows == 0:
            continue
        pending.append(batch)
        count += batch.num_rows
        while count >= block_rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, block_rows)
            rest = table.slice(block_rows)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending)


class _CsvSource:
    """A CSV catalog (``.csv``, ``.csv.gz``, ``.csv.bz2``), read as a stream."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # The header first, so that identity columns can be read as text: a spectrum_id such
        # as "00123" must not become the integer 123.
        with self._open() as reader:
            names = reader.schema.names
        self.columns = _match_columns(names, path)

    def _open(self, convert: Any = None) -> Any:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        return pacsv.open_csv(
            pa.input_stream(str(self.path), compression="detect"),
            read_options=pacsv.ReadOptions(block_size=_CSV_READ_BYTES),
            convert_options=convert,
        )

    def blocks(self, block_rows: int) -> Iterator[Any]:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        # All as text: no type inference, so a column that looks numeric in one block and not
        # in the next cannot break the stream; numbers are parsed by _arrow_float.
        names = list(self.columns.values())
        convert = pacsv.ConvertOptions(
            column_types={name: pa.string() for name in names},
            include_columns=names,
            strings_can_be_null=True,
        )
        with self._open(convert) as reader:
            yield from _rebatch(reader, block_rows)


class _ParquetSource:
    """A Parquet catalog, read by record batches of the columns we use only (survey catalogs
    carry hundreds)."""

    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        self.path = path
        with pq.ParquetFile(str(path)) as parquet:
            self.columns = _match_columns(parquet.schema_arrow.names, path)

    def blocks(self, block_rows: int) -> Iterator[Any]:
        import pyarrow.parquet as pq

        # pre_buffer (the default) holds whole row groups (1 Mi rows, ~100 MB for our columns)
        # and reads ahead: 400 MB more at 10 M rows; 1 MB reads are also faster here.
        with pq.ParquetFile(str(self.path), pre_buffer=False, buffer_size=1 << 20) as parquet:
            batches = parquet.iter_batches(
                batch_size=block_rows, columns=list(self.columns.values())
            )
            yield from _rebatch(batches, block_rows)


class _FitsSource:
    """A FITS catalog's first table HDU, memory-mapped: a block is a row slice of its columns
    (allStar has hundreds of columns; only the slices of ours are read)."""

    def __init__(self, path: Path) -> None:
        from astropy.table import Table

        self.path = path
        try:
            self.table = Table.read(str(path), memmap=True)
        except ValueError as exc:
            raise CatalogError(f"{path}: no table found in this FITS file ({exc})") from exc
        self.columns = _match_columns(self.table.colnames, path)

    def blocks(self, block_rows: int) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self.table), block_rows):
            stop = start + block_rows
            yield {name: self.table[name][start:stop] for name in self.columns.values()}


def _source(catalog: Path) -> _CsvSource | _ParquetSource | _FitsSource:
    if not catalog.is_file():
        raise CatalogError(f"{catalog}: catalog not found (give a .csv, .fits or .parquet file)")
    suffix = _suffix(catalog)
    sources = {
        **dict.fromkeys(CSV_SUFFIXES, _CsvSource),
        **dict.fromkeys(FITS_SUFFIXES, _FitsSource),
        **dict.fromkeys(PARQUET_SUFFIXES, _ParquetSource),
    }
    if suffix not in sources:
        raise CatalogError(
            f"{catalog}: unknown catalog format '{suffix}'; use .csv, .fits or .parquet"
        )
    with _unreadable_is_catalog_error(catalog):
        return sources[suffix](catalog)


@contextmanager
def _unreadable_is_catalog_error(catalog: Path) -> Iterator[None]:
    """pyarrow and astropy raise many types for a corrupt file: one CatalogError for all."""
    try:
        yield
    except CatalogError:
        raise
    except Exception as exc:
        raise CatalogError(
            f"{catalog}: cannot read this {_suffix(catalog)} catalog ({type(exc).__name__}: {exc})"
        ) from exc


def _is_arrow(column: Any) -> bool:
    return hasattr(column, "to_pylist")


def _as_text(column: Any) -> list[str | None]:
    """A text/number column as stripped strings; null, masked and empty cells are None."""
    if _is_arrow(column):
        import pyarrow as pa
        import pyarrow.compute as pc

        # The common types in pyarrow (20x faster than the loop below); str() of an integer
        # is the same text as pyarrow's cast.
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            return [v or None for v in pc.utf8_trim_whitespace(column).to_pylist()]
        if pa.types.is_integer(column.type):
            return pc.cast(column, pa.string()).to_pylist()
        values = column.to_pylist()
    else:  # astropy Column / MaskedColumn (FITS text comes as bytes with memmap)
        mask = np.ma.getmaskarray(column)
        data = np.asarray(column)
        values = [None if m else v for v, m in zip(data.tolist(), mask.tolist())]
    out: list[str | None] = []
    for value in values:
        if isinstance(value, bytes):
            value = value.decode()
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            out.append(None)
            continue
        text = str(value).strip()
        out.append(text or None)
    return out


def _not_numeric(catalog: Path, row: int, name: str, value: Any) -> CatalogError:
    return CatalogError(
        f"{catalog}: row {row}, column '{name}' is not numeric: {value!r} "
        "(give a magnitude, or leave the cell empty to use the apStar header's)"
    )


def _arrow_float(column: Any, name: str, catalog: Path, first_row: int) -> np.ndarray:
    """A pyarrow photometry column as float64 [mag], NaN where the cell is empty or null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = pc.utf8_trim_whitespace(column)
        column = pc.if_else(pc.equal(column, ""), pa.scalar(None, column.type), column)
    try:
        column = pc.cast(column, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        # Name the first bad cell: one cast per value, on this error path only.
        for offset, value in enumerate(column.to_pylist()):
            try:
                pa.scalar(value, column.type).cast(pa.float64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise _not_numeric(catalog, first_row + offset, name, value) from None
        raise
    return column.to_numpy(zero_copy_only=False).astype(np.float64)


def _astropy_float(column: Any, name: str, catalog: Path, first_row: int) -> np.ndarray:
    """An astropy photometry column slice as float64 [mag], NaN where masked."""
    try:
        data = np.ma.masked_invalid(np.ma.asarray(column, dtype=np.float64))
    except (TypeError, ValueError):
        mask = np.ma.getmaskarray(column)
        for offset, (value, masked) in enumerate(zip(np.asarray(column).tolist(), mask.tolist())):
            if masked:
                continue
            try:
                float(value.decode() if isinstance(value, bytes) else value)
            except (TypeError, ValueError):
                raise _not_numeric(catalog, first_row + offset, name, value) from None
        raise
    return data.filled(np.nan)


@dataclass
class _Block:
    """The values of rows ``first_row``.. (1-based data rows) of a catalog."""

    first_row: int
    paths: list[str]  # as written (stripped)
    spectrum_ids: list[str]  # the spectrum_id cell, or the path as written where it is empty
    k_mag: np.ndarray  # float64 [mag], NaN = none
    ebv: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


def _values(raw: Any, columns: dict[str, str], catalog: Path, first_row: int) -> _Block:
    """One block of a source as plain values, checked: every row has a path, photometry is
    numeric (else CatalogError naming the row and the column)."""
    paths = _as_text(raw[columns["path"]])
    if None in paths:
        raise CatalogError(f"{catalog}: row {first_row + paths.index(None)} has an empty 'path'")
    if "spectrum_id" in columns:
        ids = _as_text(raw[columns["spectrum_id"]])
        spectrum_ids = [sid or path for sid, path in zip(ids, paths)]
    else:
        spectrum_ids = paths
    photometry = {}
    for key in ("k_mag", "ebv"):
        if key not in columns:
            photometry[key] = np.full(len(paths), np.nan)
            continue
        column = raw[columns[key]]
        as_float = _arrow_float if _is_arrow(column) else _astropy_float
        photometry[key] = as_float(column, columns[key], catalog, first_row)
    return _Block(first_row, paths, spectrum_ids, photometry["k_mag"], photometry["ebv"])  # type: ignore[arg-type]


def _photometry(values: np.ndarray) -> list[float | None]:
    """float64 array -> list of floats, None where not finite (JSON has no NaN)."""
    finite = np.isfinite(values)
    return [float(v) if ok else None for v, ok in zip(values.tolist(), finite.tolist())]


def _absolute(path: str, base: str | Path) -> str:
    """``path`` made absolute against ``base`` and normalized, without resolving symlinks
    (a symlinked mount keeps the name that workers on other machines also see)."""
    if path.startswith("~"):
        path = os.path.expanduser(path)
    if not path.startswith(os.sep):
        path = f"{base}{os.sep}{path}"
    return os.path.normpath(path)


def _absolute_all(paths: list[str], base: str) -> list[str]:
    """:func:`_absolute` of each path, three times faster: normpath only where the text can
    change by it (a '.' or '..' part, a doubled or trailing separator)."""
    sep, prefix, normpath = os.sep, base + os.sep, os.path.normpath
    joined = [
        path if path[0] == sep else prefix + path if path[0] != "~" else _absolute(path, base)
        for path in paths  # never empty: _values checked
    ]
    dot, double = sep + ".", sep + sep
    return [
        normpath(path) if dot in path or double in path or path[-1] == sep else path
        for path in joined
    ]


def _requests(block: _Block, base: str, keep: np.ndarray | None = None) -> list[SpectrumRequest]:
    """The block's requests (only the rows where ``keep``, if given)."""
    paths = _absolute_all(block.paths, base)
    rows = zip(block.spectrum_ids, paths, _photometry(block.k_mag), _photometry(block.ebv))
    if keep is not None:
        rows = (row for row, kept in zip(rows, keep.tolist()) if kept)  # type: ignore[assignment]
    return [SpectrumRequest(sid, path, k, e) for sid, path, k, e in rows]


# --------------------------------------------------------------------------------------------
# Repeated spectrum_ids across the whole catalog, in bounded memory: 16 bytes per row.

_MIX = np.uint64(0x9E3779B97F4A7C15)


def _hashes(texts: list[str]) -> np.ndarray:
    """Python's 64-bit hash of each string (stable within one process, which is all we need)."""
    return np.fromiter(map(hash, texts), dtype=np.int64, count=len(texts)).view(np.uint64)


def _float_bits(values: np.ndarray) -> np.ndarray:
    """The bits of each value, with every kind of none as one NaN and -0.0 as 0.0 (equal as
    requests, so equal here)."""
    return np.where(np.isfinite(values), values + 0.0, np.nan).view(np.uint64)


def _row_hashes(block: _Block) -> np.ndarray:
    """A 64-bit hash of each row's (spectrum_id, path as written, k_mag, ebv), independent of
    :func:`_hashes` of the ids: the text hashed is another string, so two different rows
    whose id hashes collide still differ here (odds 2^-64)."""
    texts = [f"{sid}\x1f{path}" for sid, path in zip(block.spectrum_ids, block.paths)]
    out = np.fromiter(map(hash, texts), dtype=np.int64, count=len(texts)).view(np.uint64)
    for part in (_float_bits(block.k_mag), _float_bits(block.ebv)):
        out = (out ^ part) * _MIX  # wraps around, as intended
        out ^= out >> np.uint64(29)
    return out


def _find_repeats(id_hashes: np.ndarray, row_hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(exact repeats, suspects): 0-based row indices, ascending.

    Rows are grouped by the hash of their spectrum_id. In a group whose rows all have the first
    row's row hash, the later rows are exact repeats: a different row passes for one only if
    its row hash collides too (about 1 in 10^19 for a conflict under one id, 1 in 10^38 for
    two different ids). Every row of any other group is a suspect: a conflict, a repeat
    written differently (``./a.fits`` and ``a.fits``) or a hash collision of two ids;
    :meth:`CatalogBlocks._look_closer` compares their values. A catalog that is mostly
    repeats (one file twice) costs ~40 bytes a row more here, for a moment.
    """
    empty = np.zeros(0, dtype=np.int64)
    ordered = np.sort(id_hashes)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    del ordered
    if not repeated.size:
        return empty, empty
    rows = np.flatnonzero(np.isin(id_hashes, repeated))  # usually few: only those are grouped
    order = np.argsort(id_hashes[rows], kind="stable")  # stable: file order within a group
    rows, ids, row_hashes = rows[order], id_hashes[rows][order], row_hashes[rows][order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    sizes = np.diff(np.r_[starts, len(ids)])
    same_as_first = row_hashes == np.repeat(row_hashes[starts], sizes)
    clean_group = np.repeat(np.logical_and.reduceat(same_as_first, starts), sizes)
    first = np.zeros(len(rows), dtype=bool)
    first[starts] = True
    return np.sort(rows[clean_group & ~first]), np.sort(rows[~clean_group])


def _within(rows: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The sorted ``rows`` in [start, stop)."""
    return rows[np.searchsorted(rows, start) : np.searchsorted(rows, stop)]


class CatalogBlocks:
    """A catalog checked in full and then read block by block: iterating it yields lists of
    at most ``block_rows`` :class:`SpectrumRequest`, in row order, rows that repeat an earlier
    row exactly left out. Each iteration reads the file again; memory stays bounded (16 bytes
    per row for the check, one block of requests).

    The check (:func:`open_catalog`) reads the whole file once: every row has a path, the
    photometry is numeric, and no spectrum_id is used by two different rows.

    Attributes:
        path: the catalog file.
        rows: its data rows.
        requests: the requests it gives (rows less exact repeats).
    """

    def __init__(self, catalog: str | Path, block_rows: int | None = None) -> None:
        self.path = Path(catalog)
        self.block_rows = block_rows or BLOCK_ROWS
        if self.block_rows < 1:
            raise ValueError(f"block_rows must be at least 1, got {block_rows}")
        self._source = _source(self.path)
        self._version = self._stat()
        self._base = str(self.path.resolve().parent)
        self.rows, self._repeats = self._check()
        self.requests = self.rows - len(self._repeats)

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def _blocks(self) -> Iterator[_Block]:
        """The checked values of every block, in order."""
        if self._stat() != self._version:  # a second pass must see what the first checked
            raise CatalogError(
                f"{self.path}: the catalog changed while it was being read; "
                "run again once it is complete"
            )
        columns = self._source.columns
        first_row = 1
        raw_blocks = self._source.blocks(self.block_rows)
        while True:
            with _unreadable_is_catalog_error(self.path):
                raw = next(raw_blocks, None)
                if raw is None:
                    return
                block = _values(raw, columns, self.path, first_row)
            yield block
            first_row += len(block)

    def _check(self) -> tuple[int, np.ndarray]:
        """The first pass: (rows, 0-based indices of the exact repeats to leave out)."""
        id_parts: list[np.ndarray] = []
        row_parts: list[np.ndarray] = []
        for block in self._blocks():
            id_parts.append(_hashes(block.spectrum_ids))
            row_parts.append(_row_hashes(block))
        rows = sum(len(part) for part in id_parts)
        if rows < 2:
            return rows, np.zeros(0, dtype=np.int64)
        id_hashes = np.concatenate(id_parts)
        del id_parts
        row_hashes = np.concatenate(row_parts)
        del row_parts
        repeats, suspects = _find_repeats(id_hashes, row_hashes)
        del id_hashes, row_hashes
        if suspects.size:
            repeats = np.union1d(repeats, self._look_closer(suspects))
        return rows, repeats

    def _look_closer(self, suspects: np.ndarray) -> np.ndarray:
        """The suspects' requests compared, in row order: returns the exact repeats among
        them; raises CatalogError at the first spectrum_id used by two different rows."""
        first_of: dict[str, tuple[int, SpectrumRequest]] = {}
        repeats: list[int] = []
        for block in self._blocks():
            start = block.first_row - 1
            rows = _within(suspects, start, start + len(block))
            if not rows.size:
                continue
            keep = np.zeros(len(block), dtype=bool)
            keep[rows - start] = True
            for row, request in zip(rows.tolist(), _requests(block, self._base, keep)):
                seen = first_of.setdefault(request.spectrum_id, (row, request))
                if seen[0] == row:
                    continue
                if seen[1] != request:
                    raise CatalogError(
                        f"{self.path}: spectrum_id '{request.spectrum_id}' is used by rows "
                        f"{seen[0] + 1} and {row + 1} with different values; each spectrum "
                        "needs its own spectrum_id (there is one result row per spectrum_id "
                        "and model)"
                    )
                repeats.append(row)  # an exact repeat written differently: harmless
        return np.array(repeats, dtype=np.int64)

    def __iter__(self) -> Iterator[list[SpectrumRequest]]:
        for block in self._blocks():
            start = block.first_row - 1
            dropped = _within(self._repeats, start, start + len(block))
            keep = None
            if dropped.size:
                keep = np.ones(len(block), dtype=bool)
                keep[dropped - start] = False
            requests = _requests(block, self._base, keep)
            if requests:
                yield requests


def open_catalog(catalog: str | Path, block_rows: int | None = None) -> CatalogBlocks:
    """A catalog, checked in full, to be read block by block (see :class:`CatalogBlocks`).

    Args:
        catalog: a ``.csv`` (``.csv.gz``), ``.fits`` (first table HDU) or ``.parquet`` file.
        block_rows: rows per block (default :data:`BLOCK_ROWS`).

    Raises:
        CatalogError: the file is missing, unreadable, of unknown format, has no ``path``
            column, an empty path, a non-numeric photometry cell, or two different rows under
            one ``spectrum_id`` (the message names the rows, and the column).
    """
    return CatalogBlocks(catalog, block_rows)


def iter_catalog(
    catalog: str | Path, block_rows: int | None = None
) -> Iterator[list[SpectrumRequest]]:
    """The requests of a catalog, block by block (:func:`open_catalog`; the check runs at the
    first ``next``, so before any block is handed out)."""
    yield from open_catalog(catalog, block_rows)


def read_catalog(catalog: str | Path) -> list[SpectrumRequest]:
    """Spectrum requests from a catalog file, in row order.

    Args:
        catalog: a ``.csv`` (``.csv.gz``), ``.fits`` (first table HDU) or ``.parquet`` file.

    Returns:
        One :class:`SpectrumRequest` per row, with an absolute ``path``; rows that repeat an
        earlier row exactly are dropped.

    Raises:
        CatalogError: as :func:`open_catalog`.
    """
    return [request for block in iter_catalog(catalog) for request in block]


# --------------------------------------------------------------------------------------------
# Files and folders.


def scan_spectra(root: str | Path) -> Iterator[SpectrumFile]:
    """Every apStar/asStar file under ``root`` (recursive; hidden folders and files skipped,
    such as rsync's temporary ``.apStar-...`` copies), with its size and mtime.

    ``spectrum_id`` is the path relative to ``root``, with ``/`` separators.
    """
    root_abs = _absolute(str(root), os.getcwd())
    stack = [root_abs]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue  # vanished or unreadable meanwhile: the next scan sees the truth
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=True):
                    stack.append(entry.path)
                elif is_spectrum_name(entry.name) and entry.is_file(follow_symlinks=True):
                    st = entry.stat(follow_symlinks=True)
                    rel = os.path.relpath(entry.path, root_abs).replace(os.sep, "/")
                    yield SpectrumFile(entry.path, rel, st.st_size, st.st_mtime_ns)
            except FileNotFoundError:
                continue


def _glob_base(pattern: str) -> str:
    """The leading folders of a glob pattern that contain no wildcard."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def find_spectra(paths: Sequence[str | Path]) -> list[SpectrumRequest]:
    """Spectrum requests (no photometry) from files, folders and glob patterns.

    Args:
        paths: each a spectrum file (any name), a folder (searched recursively for
            ``apStar-*.fits[.gz]`` and ``asStar-*.fits[.gz]``) or a glob pattern (``**``
            allowed, e.g. ``'data/**/apStar-*.fits'``).

    Returns:
        Requests sorted by path, each file once.

    Raises:
        CatalogError: a path that does not exist, or a pattern that matches nothing.
    """
    found: dict[str, SpectrumRequest] = {}

    def add(path: str, base: str) -> None:
        absolute = _absolute(path, os.getcwd())
        sid = os.path.relpath(absolute, _absolute(base, os.getcwd())).replace(os.sep, "/")
        found.setdefault(absolute, SpectrumRequest(spectrum_id=sid, path=absolute))

    for item in map(str, paths):
        if os.path.isdir(item):
            for spectrum in scan_spectra(item):
                add(spectrum.path, item)
        elif os.path.isfile(item):
            add(item, os.path.dirname(item) or ".")
        elif glob.has_magic(item):
            matches = [m for m in glob.glob(item, recursive=True) if os.path.isfile(m)]
            if not matches:
                raise CatalogError(f"{item}: no file matches this pattern")
            base = _glob_base(item)
            for match in matches:
                add(match, base)
        else:
            raise CatalogError(f"{item}: no such file or folder")
    return sorted(found.values(), key=lambda r: r.path)


class RequestBlocks:
    """The requests of a catalog and of files/folders together, block by block (iterate it;
    again for a second pass): the catalog's blocks in row order, then the files that are not
    in the catalog, each file once.

    Attributes:
        total: how many requests there are; a file both in the catalog and among the paths
            counts twice here (it is sent once), so this is exact unless they overlap.
    """

    def __init__(
        self, catalog: CatalogBlocks | None, files: list[SpectrumRequest], block_rows: int
    ) -> None:
        self.catalog = catalog
        self.files = files
        self.block_rows = block_rows
        self.total = (catalog.requests if catalog is not None else 0) + len(files)

    def __iter__(self) -> Iterator[list[SpectrumRequest]]:
        not_in_catalog = {r.path: r for r in self.files}
        if self.catalog is not None:
            for block in self.catalog:
                if not_in_catalog:  # the catalog's row wins: it carries the photometry and id
                    for request in block:
                        not_in_catalog.pop(request.path, None)
                yield block
        rest = list(not_in_catalog.values())
        for start in range(0, len(rest), self.block_rows):
            yield rest[start : start + self.block_rows]


def gather_blocks(
    paths: Sequence[str | Path] = (),
    catalog: str | Path | None = None,
    block_rows: int | None = None,
) -> RequestBlocks:
    """:func:`gather`, block by block: the catalog is checked in full here and read again,
    block by block, when the result is iterated; the files are listed here (they are few).

    Raises:
        CatalogError: as :func:`gather`.
    """
    if catalog is None and not paths:
        raise CatalogError("nothing to process: give apStar files or folders, or --catalog FILE")
    block_rows = block_rows or BLOCK_ROWS
    checked = open_catalog(catalog, block_rows) if catalog is not None else None
    return RequestBlocks(checked, find_spectra(paths) if paths else [], block_rows)


def gather(
    paths: Sequence[str | Path] = (), catalog: str | Path | None = None
) -> list[SpectrumRequest]:
    """The requests of a catalog and of files/folders together, each file once.

    Where a file is both in the catalog and among ``paths``, the catalog's row wins (it
    carries the photometry and the chosen spectrum_id). Catalog rows come first, in order.

    Raises:
        CatalogError: as :func:`read_catalog` and :func:`find_spectra`; also when neither a
            catalog nor any path was given.
    """
    return [request for block in gather_blocks(paths, catalog) for request in block]
