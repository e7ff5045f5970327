"""Independent references for the report: truth columns and Gaia parallaxes from a catalog.

A catalog row is matched to its result row by ``spectrum_id`` (absent column or empty cell: the
``path`` as written, the rule of :mod:`astronn_dist.producer.catalog`). The columns it may carry
(names compared lower-case, first alias preferred):

* truth: ``fakemag`` and ``dist`` [pc], as ``astronn-dist synth`` writes;
* Gaia: ``parallax`` and ``parallax_error`` [mas] (:data:`REPORT_ALIASES` lists the aliases);
* ``snr`` (the spectrum's S/N: the results table holds none), ``teff`` [K], ``logg`` [dex].

The parallax becomes a fakemag exactly as astroNN 1.1.0's ``mag_to_fakemag`` does
(:func:`fakemag_from_parallax`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from astronn_dist.worker.tables import converted_blocks, float_values, match_columns, open_table, text_values

REPORT_ALIASES: dict[str, tuple[str, ...]] = {
    "spectrum_id": ("spectrum_id",),
    "path": ("path",),
    "fakemag": ("fakemag", "fakemag_true"),
    "dist": ("dist", "dist_true", "distance"),
    "parallax": ("parallax", "plx", "gaia_parallax", "gaiadr3_parallax", "gaiaedr3_parallax", "gaia_plx"),
    "parallax_error": ("parallax_error", "parallax_err", "e_plx", "plx_err", "plx_error", "gaia_parallax_error",
                       "gaiadr3_parallax_error", "gaiaedr3_parallax_error", "gaia_parallax_err"),
    "snr": ("snr", "snrev", "s_n", "sn"),
    "teff": ("teff",),
    "logg": ("logg",),
}
"""Canonical column -> accepted names (lower case), in order of preference."""

ASTRONN_MAGIC_NUMBER = -9999.0
"""astroNN's default "missing" value (``astroNN.config.MAGIC_NUMBER``): a parallax or magnitude
equal to it is missing, as in astroNN."""

BLOCK_ROWS = 10_000
"""Catalog rows per block (each block's result rows are looked up by index)."""


def fakemag_from_parallax(mag: np.ndarray, parallax: np.ndarray, parallax_error: np.ndarray | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """astroNN's ``mag_to_fakemag`` (astroNN 1.1.0, ``astroNN.gaia.gaia_shared``), with NaN where
    astroNN writes its magic number.

    fakemag = parallax [mas] * 10^(0.2 mag); fakemag_err = |parallax_error / parallax * fakemag|.

    Args:
        mag: extinction-corrected apparent Ks, Ks - A_K [mag], shape (n,).
        parallax, parallax_error: [mas], shape (n,); parallax_error None: no error (NaN).

    Returns:
        (fakemag, fakemag_err), shape (n,) each. As astroNN: a negative parallax is kept (a
        negative fakemag: the point of fakemag is that a noisy parallax stays unbiased); a zero
        parallax gives fakemag 0 and an error of NaN (0/0); a NaN or -9999 parallax, a NaN or
        -9999 magnitude or one below -90 gives NaN for both (astroNN: -9999 for both); a NaN
        parallax_error gives a NaN error.
    """
    mag = np.asarray(mag, dtype=np.float64)
    parallax = np.asarray(parallax, dtype=np.float64)
    missing = ((parallax == ASTRONN_MAGIC_NUMBER) | (mag == ASTRONN_MAGIC_NUMBER) | (mag < -90.0)
               | np.isnan(parallax) | np.isnan(mag))
    with np.errstate(all="ignore"):
        fakemag = parallax * 10.0 ** (0.2 * mag)
        if parallax_error is None:
            error = np.full_like(fakemag, np.nan)
        else:
            error = np.abs(np.asarray(parallax_error, dtype=np.float64) / parallax * fakemag)
    fakemag = np.where(missing, np.nan, fakemag)
    error = np.where(missing, np.nan, error)
    return fakemag, error


@dataclass
class CatalogBlock:
    """One block of a catalog: ids and the report's columns (NaN where absent or empty)."""

    first_row: int
    spectrum_ids: list[str | None]
    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.spectrum_ids)


class ReportCatalog:
    """A catalog opened for the report: which columns it has, and its blocks.

    Raises:
        CatalogError: missing or unreadable file, no ``spectrum_id`` and no ``path`` column, a
            non-numeric cell (named by row and column).
    """

    def __init__(self, path: str | Path, block_rows: int = BLOCK_ROWS) -> None:
        self.path = Path(path)
        self.block_rows = block_rows
        self._source = open_table(self.path)
        found = match_columns(self._source.names, REPORT_ALIASES, self.path, required=())
        if "spectrum_id" not in found and "path" not in found:
            match_columns(self._source.names, REPORT_ALIASES, self.path, required=("spectrum_id",),
                          hint="The report matches catalog rows to results by spectrum_id (or path).")
        self.found = found
        """Canonical name -> the catalog's column, for the columns present."""

    def has(self, *names: str) -> bool:
        return all(name in self.found for name in names)

    def blocks(self) -> Iterator[CatalogBlock]:
        yield from converted_blocks(self._source, self.path, self.block_rows, list(self.found.values()), self._block)

    def _block(self, raw: Any, first_row: int) -> CatalogBlock:
        found = self.found
        ids = text_values(raw[found["spectrum_id"]]) if "spectrum_id" in found else None
        if "path" in found:
            paths = text_values(raw[found["path"]])
            ids = paths if ids is None else [i if i is not None else p for i, p in zip(ids, paths)]
        assert ids is not None
        columns = {name: float_values(raw[column], column, self.path, first_row)
                   for name, column in found.items() if name not in ("spectrum_id", "path")}
        return CatalogBlock(first_row, ids, columns)
