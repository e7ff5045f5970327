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

The file formats are read by :mod:`astronn_dist.worker.tables` (shared with training). Nothing
here imports torch.
"""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from astronn_dist.worker.contract import SpectrumRequest
from astronn_dist.worker.tables import (
    CatalogError,
    converted_blocks,
    float_values,
    match_columns,
    open_table,
    text_values,
)

__all__ = [
    "BLOCK_ROWS", "COLUMN_ALIASES", "CatalogBlocks", "CatalogError", "RequestBlocks", "SpectrumFile",
    "find_spectra", "gather", "gather_blocks", "is_spectrum_name", "iter_catalog", "open_catalog",
    "read_catalog", "scan_spectra",
]

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


# --------------------------------------------------------------------------------------------
# Blocks of the catalog's rows, read through astronn_dist.worker.tables.

BLOCK_ROWS = 50_000
"""Rows per block: a block's requests (~20 MB) are in memory at a time, and one skip check
against the results table covers a block."""

_NOT_NUMERIC_HINT = " (give a magnitude, or leave the cell empty to use the apStar header's)"
_NO_PATH_HINT = "Add a column 'path' with each apStar file, relative to the catalog's folder."


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
    paths = text_values(raw[columns["path"]])
    if None in paths:
        raise CatalogError(f"{catalog}: row {first_row + paths.index(None)} has an empty 'path'")
    if "spectrum_id" in columns:
        ids = text_values(raw[columns["spectrum_id"]])
        spectrum_ids = [sid or path for sid, path in zip(ids, paths)]
    else:
        spectrum_ids = paths
    photometry = {}
    for key in ("k_mag", "ebv"):
        if key not in columns:
            photometry[key] = np.full(len(paths), np.nan)
            continue
        photometry[key] = float_values(raw[columns[key]], columns[key], catalog, first_row, _NOT_NUMERIC_HINT)
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
        self._source = open_table(self.path)
        self._columns = match_columns(
            self._source.names, COLUMN_ALIASES, self.path, required=("path",), hint=_NO_PATH_HINT
        )
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
        columns = self._columns
        yield from converted_blocks(self._source, self.path, self.block_rows, list(columns.values()),
                                    lambda raw, first_row: _values(raw, columns, self.path, first_row))

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
