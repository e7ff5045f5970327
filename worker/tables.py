"""Catalog files (CSV, FITS table, Parquet), read block by block: the one reader of tables that
the producer (:mod:`astronn_dist.producer.catalog`) and training
(:mod:`astronn_dist.worker.modeling.training`) share.

:func:`open_table` opens a file and names its columns; :func:`match_columns` finds the columns
a reader wants among them (names compared lower-case, aliases in order of preference); the
source's ``blocks`` yields those columns a block of rows at a time, and :func:`text_values` and
:func:`float_values` turn a block's column into plain values, naming the row and the column of
a bad cell. Any file the libraries cannot read becomes one :class:`CatalogError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar, Union

import numpy as np

CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2")
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")


class _HasLen(Protocol):
    def __len__(self) -> int: ...


_Sized = TypeVar("_Sized", bound=_HasLen)


class CatalogError(ValueError):
    """A catalog (or a list of paths) that cannot be used; the message says what to do."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in CSV_SUFFIXES + FITS_SUFFIXES + PARQUET_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def match_columns(
    names: Sequence[str], aliases: Mapping[str, Sequence[str]], catalog: Path, *,
    required: Sequence[str], hint: str = "",
) -> dict[str, str]:
    """Canonical name -> the catalog's own column name, for the columns present.

    Args:
        names: the file's columns. aliases: canonical name -> accepted names (lower case),
            first preferred. required: canonical names that must be present.
        hint: what to do about a missing one (appended to the error).

    Raises:
        CatalogError: a required column is missing (the message lists the columns found).
    """
    by_lower = {name.lower(): name for name in names}
    found = {}
    for canonical, accepted in aliases.items():
        for alias in accepted:
            if alias in by_lower:
                found[canonical] = by_lower[alias]
                break
    missing = [name for name in required if name not in found]
    if missing:
        raise CatalogError(
            f"{catalog}: no {' and no '.join(repr(m) for m in missing)} column "
            f"(columns: {', '.join(names) or 'none'}). {hint}".rstrip()
        )
    return found


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
            self.names: list[str] = list(reader.schema.names)

    def _open(self, convert: Any = None) -> Any:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        return pacsv.open_csv(
            pa.input_stream(str(self.path), compression="detect"),
            read_options=pacsv.ReadOptions(block_size=_CSV_READ_BYTES),
            convert_options=convert,
        )

    def blocks(self, block_rows: int, columns: Sequence[str]) -> Iterator[Any]:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        # All as text: no type inference, so a column that looks numeric in one block and not
        # in the next cannot break the stream; numbers are parsed by float_values.
        names = list(columns)
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
            self.names: list[str] = list(parquet.schema_arrow.names)

    def blocks(self, block_rows: int, columns: Sequence[str]) -> Iterator[Any]:
        import pyarrow.parquet as pq

        # pre_buffer (the default) holds whole row groups (1 Mi rows, ~100 MB for our columns)
        # and reads ahead: 400 MB more at 10 M rows; 1 MB reads are also faster here.
        with pq.ParquetFile(str(self.path), pre_buffer=False, buffer_size=1 << 20) as parquet:
            batches = parquet.iter_batches(batch_size=block_rows, columns=list(columns))
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
        self.names: list[str] = list(self.table.colnames)

    def blocks(self, block_rows: int, columns: Sequence[str]) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self.table), block_rows):
            stop = start + block_rows
            yield {name: self.table[name][start:stop] for name in columns}


TableSource = Union["_CsvSource", "_ParquetSource", "_FitsSource"]


def open_table(catalog: Path) -> TableSource:
    """A catalog file, opened: its column ``names`` and ``blocks(block_rows, columns)``, which
    yields per block of rows the named columns (pyarrow arrays for CSV and Parquet, astropy
    column slices for FITS: :func:`text_values` and :func:`float_values` read both).

    Raises:
        CatalogError: missing, of unknown format, or unreadable.
    """
    catalog = Path(catalog)
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
    with unreadable_is_catalog_error(catalog):
        return sources[suffix](catalog)


@contextmanager
def unreadable_is_catalog_error(catalog: Path) -> Iterator[None]:
    """pyarrow and astropy raise many types for a corrupt file: one CatalogError for all."""
    try:
        yield
    except CatalogError:
        raise
    except Exception as exc:
        raise CatalogError(
            f"{catalog}: cannot read this {_suffix(catalog)} catalog ({type(exc).__name__}: {exc})"
        ) from exc


def converted_blocks(source: TableSource, catalog: Path, block_rows: int, columns: Sequence[str],
                     convert: Callable[[Any, int], _Sized]) -> Iterator[_Sized]:
    """``convert(raw, first_row)`` of each block of ``columns`` (``first_row``: the block's first
    data row, 1-based), in order. An error of the file's library while reading or converting a
    block becomes one CatalogError (:func:`unreadable_is_catalog_error`)."""
    first_row = 1
    raw_blocks = source.blocks(block_rows, list(columns))
    while True:
        with unreadable_is_catalog_error(catalog):
            raw = next(raw_blocks, None)
            if raw is None:
                return
            block = convert(raw, first_row)
        yield block
        first_row += len(block)


def _is_arrow(column: Any) -> bool:
    return hasattr(column, "to_pylist")


def text_values(column: Any) -> list[str | None]:
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


def _not_numeric(catalog: Path, row: int, name: str, value: Any, hint: str) -> CatalogError:
    return CatalogError(f"{catalog}: row {row}, column '{name}' is not numeric: {value!r}{hint}")


def float_values(column: Any, name: str, catalog: Path, first_row: int, hint: str = "") -> np.ndarray:
    """A block's column as float64, NaN where a cell is empty, masked or null; a cell that is
    not a number is a CatalogError naming its row (``first_row`` is the block's first, 1-based)
    and column, followed by ``hint``."""
    as_float = _arrow_float if _is_arrow(column) else _astropy_float
    return as_float(column, name, catalog, first_row, hint)


def _arrow_float(column: Any, name: str, catalog: Path, first_row: int, hint: str) -> np.ndarray:
    """A pyarrow column as float64, NaN where the cell is empty or null."""
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
                raise _not_numeric(catalog, first_row + offset, name, value, hint) from None
        raise
    return column.to_numpy(zero_copy_only=False).astype(np.float64)


def _astropy_float(column: Any, name: str, catalog: Path, first_row: int, hint: str) -> np.ndarray:
    """An astropy column slice as float64, NaN where masked."""
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
                raise _not_numeric(catalog, first_row + offset, name, value, hint) from None
        raise
    return data.filled(np.nan)
