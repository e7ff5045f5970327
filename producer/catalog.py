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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.contract import SpectrumRequest

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
# Reading the three formats into plain columns: str lists for text, float64 arrays (NaN = none).


def _read_csv(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    # The header first, so that identity columns can be read as text: a spectrum_id such as
    # "00123" must not become the integer 123.
    with pacsv.open_csv(pa.input_stream(str(path), compression="detect")) as reader:
        names = reader.schema.names
    columns = _match_columns(names, path)
    # All as text: numbers are parsed by _as_float, which also accepts blank-padded cells.
    types = {name: pa.string() for name in columns.values()}
    table = pacsv.read_csv(
        str(path),
        convert_options=pacsv.ConvertOptions(
            column_types=types, include_columns=list(columns.values()), strings_can_be_null=True
        ),
    )
    return columns, {name: table.column(name) for name in columns.values()}


def _read_parquet(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    import pyarrow.parquet as pq

    columns = _match_columns(pq.read_schema(str(path)).names, path)
    # Only the columns we use: survey catalogs carry hundreds.
    table = pq.read_table(str(path), columns=list(columns.values()))
    return columns, {name: table.column(name) for name in columns.values()}


def _read_fits(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    from astropy.table import Table

    try:
        # memmap keeps a wide table (allStar: hundreds of columns) on disk; we copy 4 columns.
        table = Table.read(str(path), memmap=True)
    except ValueError as exc:
        raise CatalogError(f"{path}: no table found in this FITS file ({exc})") from exc
    columns = _match_columns(table.colnames, path)
    return columns, {name: table[name] for name in columns.values()}


def _as_text(column: Any) -> list[str | None]:
    """A text/number column as stripped strings; null, masked and empty cells are None."""
    if hasattr(column, "to_pylist"):  # pyarrow
        values = column.to_pylist()
    else:  # astropy Column / MaskedColumn (FITS text comes as str after Table.read)
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


def _as_float(column: Any, name: str, catalog: Path) -> np.ndarray:
    """A photometry column as float64 [mag], NaN where the cell is empty, masked or null."""
    if hasattr(column, "to_numpy"):  # pyarrow ChunkedArray: nulls -> NaN
        import pyarrow as pa
        import pyarrow.compute as pc

        try:
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                column = pc.utf8_trim_whitespace(column)
                column = pc.if_else(pc.equal(column, ""), pa.scalar(None, column.type), column)
            column = pc.cast(column, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise CatalogError(f"{catalog}: column '{name}' is not numeric ({exc})") from exc
        return column.to_numpy(zero_copy_only=False).astype(np.float64)
    try:
        data = np.ma.masked_invalid(np.ma.asarray(column, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise CatalogError(f"{catalog}: column '{name}' is not numeric ({exc})") from exc
    return data.filled(np.nan)


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


def read_catalog(catalog: str | Path) -> list[SpectrumRequest]:
    """Spectrum requests from a catalog file, in row order.

    Args:
        catalog: a ``.csv`` (``.csv.gz``), ``.fits`` (first table HDU) or ``.parquet`` file.

    Returns:
        One :class:`SpectrumRequest` per row, with an absolute ``path``; rows that repeat an
        earlier row exactly are dropped.

    Raises:
        CatalogError: the file is missing, unreadable, of unknown format, has no ``path``
            column, an empty path, a non-numeric photometry column, or two different files
            under one ``spectrum_id``.
    """
    catalog = Path(catalog)
    if not catalog.is_file():
        raise CatalogError(f"{catalog}: catalog not found (give a .csv, .fits or .parquet file)")
    suffix = _suffix(catalog)
    readers = {
        **dict.fromkeys(CSV_SUFFIXES, _read_csv),
        **dict.fromkeys(FITS_SUFFIXES, _read_fits),
        **dict.fromkeys(PARQUET_SUFFIXES, _read_parquet),
    }
    if suffix not in readers:
        raise CatalogError(
            f"{catalog}: unknown catalog format '{suffix}'; use .csv, .fits or .parquet"
        )
    try:
        columns, data = readers[suffix](catalog)
    except CatalogError:
        raise
    except Exception as exc:  # pyarrow/astropy raise many types for a corrupt file
        raise CatalogError(
            f"{catalog}: cannot read this {suffix} catalog ({type(exc).__name__}: {exc})"
        ) from exc

    paths = _as_text(data[columns["path"]])
    n = len(paths)
    ids = _as_text(data[columns["spectrum_id"]]) if "spectrum_id" in columns else [None] * n
    photometry = {}
    for key in ("k_mag", "ebv"):
        if key in columns:
            photometry[key] = _photometry(_as_float(data[columns[key]], columns[key], catalog))
        else:
            photometry[key] = [None] * n

    base = str(catalog.resolve().parent)
    requests: list[SpectrumRequest] = []
    first_row: dict[str, tuple[int, SpectrumRequest]] = {}
    for row, (path, sid, k_mag, ebv) in enumerate(
        zip(paths, ids, photometry["k_mag"], photometry["ebv"])
    ):
        if path is None:
            raise CatalogError(f"{catalog}: row {row + 1} has an empty 'path'")
        request = SpectrumRequest(
            spectrum_id=sid or path, path=_absolute(path, base), k_mag=k_mag, ebv=ebv
        )
        seen = first_row.get(request.spectrum_id)
        if seen is not None:
            if seen[1] == request:
                continue  # an exact repeat: harmless
            raise CatalogError(
                f"{catalog}: spectrum_id '{request.spectrum_id}' is used by rows {seen[0] + 1} "
                f"and {row + 1} with different values; each spectrum needs its own spectrum_id "
                "(there is one result row per spectrum_id and model)"
            )
        first_row[request.spectrum_id] = (row, request)
        requests.append(request)
    return requests


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
    if catalog is None and not paths:
        raise CatalogError("nothing to process: give apStar files or folders, or --catalog FILE")
    requests = read_catalog(catalog) if catalog is not None else []
    in_catalog = {r.path for r in requests}
    requests += [r for r in find_spectra(paths) if r.path not in in_catalog]
    return requests
