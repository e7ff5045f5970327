"""Read the coadded spectrum of an APOGEE apStar file (DR17 and SDSS-V; ``.fits`` or ``.fits.gz``).

An apStar file holds, on the 8575-pixel log-lambda grid (log10 lambda = 4.179 + 6e-6 i):

    HDU0  primary header: identity (OBJID), 2MASS K, SFD E(B-V), NVISITS, SNR, ...
    HDU1  flux          (NROWS, 8575) [1e-17 erg/s/cm^2/Angstrom]; row 0 is the coadd
    HDU2  flux error    (NROWS, 8575), same units
    HDU3  pixel bitmask (NROWS, 8575), APOGEE_PIXMASK
    HDU4+ sky, telluric, LSF, visit tables: never read here

A 1-D HDU (8575,) is the coadd itself (files with a single combination). File names:
``apStar-dr17-<obj>.fits`` (DR17; ``asStar-`` at LCO) and ``apStar-<apred>-<telescope>-<obj>.fits``
(SDSS-V), each optionally ``.gz``.

Only what is needed is read. A plain, well-formed file goes through :mod:`astronn_dist.worker.science.fastfits`
(four headers scanned for a dozen keywords, three rows read: ~0.2 ms from the page cache);
anything else (gzip, scaled data, an unusual header, any damage) through astropy, which opens
HDUs lazily (HDU4 and later are never parsed) and reads only row 0 of HDU1-3 (``section``; for
gzip files by seeking in the decompressed stream), ~2-3 ms a file, nearly all of it header
parsing. Both give the same Spectrum wherever the fast reader answers.

Every problem with a file's content (missing, empty, not FITS, truncated, corrupt, missing HDU,
wrong pixel count, no data) raises :class:`SpectrumError` with a readable reason; an OSError of
the storage itself is kept as its ``__cause__`` so the caller can tell transient failures apart.
Truncation is detected by size, not by astropy's "File may have been truncated" warning: turning
warnings into errors (``warnings.catch_warnings``) is process-global and the pipeline reads files
from several threads.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import re
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.io.fits.verify import VerifyError

from astronn_dist.worker.science import fastfits
N_PIXELS = 8575
"""Pixels of the apStar log-lambda grid."""

MISSING_SENTINEL = -9999.0
"""APOGEE writes -9999.99 for missing header values; anything at or below -9999 is missing."""

_HDUS = ((1, "flux"), (2, "flux error"), (3, "pixel bitmask"))
_HEADER_KEYS = ("K", "SFD_EBV", "OBJID", "OBJ", "NVISITS", "SNR")
"""The primary header's keywords a Spectrum carries."""
_LAYOUT = "an apStar file has HDU1 flux, HDU2 flux error, HDU3 pixel bitmask"
_FITS_BLOCK = 2880
_GZIP_MAGIC = b"\x1f\x8b"

# apStar-dr17-2M17335483-2753043.fits, asStar-dr17-<obj>.fits.gz,
# apStar-1.3-apo25m-2M04482524+4456383.fits: <prefix>-<apred>[-<telescope>]-<obj>
_NAME_RE = re.compile(
    r"^a[ps]Star-(?P<apred>[^-]+)-(?:(?P<telescope>(?:apo|lco)\d+m)-)?(?P<obj>.+?)\.fits(?:\.gz)?$"
)


class SpectrumError(Exception):
    """A spectrum that cannot be used; ``reason`` says why in words. ``str()`` = "path: reason"."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across process pools
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True, eq=False)
class Spectrum:
    """The coadd of one apStar file. Arrays are read-only, native byte order.

    flux: (8575,) float64 [1e-17 erg/s/cm^2/Angstrom].
    err_file: (8575,) float64, the flux error as the file stores it (HDU2 row 0; NaN, inf or 0
        where the reduction had none), same units.
    err, ivar: derived from err_file on first use (:func:`inverse_variance`): ``ivar =
        err_file**-2`` [(1e-17 erg/s/cm^2/Angstrom)^-2] with non-finite ivar set to 0 (0 = no
        information), ``err = ivar**-0.5``, so err is inf where ivar is 0 (never NaN: what the
        continuum normalization expects); :meth:`err_at` gives err at a few pixels only.
    bitmask: (8575,) int64 APOGEE_PIXMASK.
    k_mag: 2MASS Ks [mag] from header ``K``; ebv: E(B-V) [mag] from ``SFD_EBV``; None when the
        card is absent, not a number, non-finite or APOGEE's -9999.99.
    obj_id: ``OBJID``, else ``OBJ``, else parsed from the file name; nvisits: ``NVISITS``;
        snr: ``SNR`` (None when absent or unusable).
    """

    path: str
    flux: np.ndarray
    err_file: np.ndarray
    bitmask: np.ndarray
    k_mag: float | None
    ebv: float | None
    obj_id: str | None
    nvisits: int | None
    snr: float | None

    # Derived lazily: the worker needs the error at the 532 continuum pixels only (err_at), and
    # the two powers over all 8575 pixels cost more than the rest of preparing a spectrum
    # where numpy has no SIMD pow (0.18 ms on an AVX2 core).
    @functools.cached_property
    def _inverse_variance(self) -> tuple[np.ndarray, np.ndarray]:
        ivar, err = inverse_variance(self.err_file)
        ivar.setflags(write=False)
        err.setflags(write=False)
        return ivar, err

    @property
    def ivar(self) -> np.ndarray:
        """(8575,) float64 inverse variance; 0 = no information."""
        return self._inverse_variance[0]

    @property
    def err(self) -> np.ndarray:
        """(8575,) float64 1-sigma error ``ivar**-0.5``; inf where ivar is 0."""
        return self._inverse_variance[1]

    def err_at(self, pixels: np.ndarray) -> np.ndarray:
        """``err[pixels]``, computed at those pixels only (the same numbers, bit for bit)."""
        return inverse_variance(self.err_file[pixels])[1]


def inverse_variance(err_file: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ivar, err)`` from a stored flux error: ``ivar = err_file**-2`` with non-finite values
    set to 0, ``err = ivar**-0.5`` (inf where ivar is 0). Float64, new arrays.

    Element-wise, so a subset of pixels gets the same numbers as the whole row. (The powers
    stay numpy's ``**``: ``1 / (e * e)`` is exact-er but differs in the last bit from numpy's
    pow for ~0.1-5 % of float32 values, depending on the CPU's pow; results must not change.)
    """
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        ivar = np.asarray(err_file, dtype=np.float64) ** -2.0
        ivar[~np.isfinite(ivar)] = 0.0
        err = ivar**-0.5  # inf where ivar is 0
    return ivar, err


def read_apstar(path: str | os.PathLike[str]) -> Spectrum:
    """Read the coadd (row 0 of HDU1-3) and header photometry of an apStar file.

    Args:
        path: an apStar file, ``.fits`` or gzip-compressed ``.fits.gz``.

    Returns:
        The :class:`Spectrum`.

    Raises:
        SpectrumError: for every file that cannot give a usable spectrum; its ``reason`` says
            why. Where an OSError caused it (e.g. an I/O error), that is its ``__cause__``.
    """
    name = os.fspath(path)
    try:
        fast = fastfits.read_rows(name, N_PIXELS, _HEADER_KEYS)
    except OSError:
        fast = None  # astropy's path below opens it again and words the error
    if fast is not None:
        values, images = fast
        return _spectrum(name, values, [image.row0 for image in images])
    return _read_with_astropy(name)


def _read_with_astropy(name: str) -> Spectrum:
    """:func:`read_apstar` through astropy: every file, every error worded."""
    try:
        handle = open(name, "rb")  # noqa: SIM115 - closed below, after astropy is done with it
    except FileNotFoundError as exc:
        raise SpectrumError(name, "file not found") from exc
    except IsADirectoryError as exc:
        raise SpectrumError(name, "is a directory, not an apStar file") from exc
    except OSError as exc:
        raise SpectrumError(name, f"cannot open the file: {exc.strerror or exc}") from exc

    with handle:
        try:
            file_size = os.fstat(handle.fileno()).st_size
            compressed = handle.read(2) == _GZIP_MAGIC
            handle.seek(0)
        except OSError as exc:
            raise SpectrumError(name, f"I/O error while reading: {exc.strerror or exc}") from exc
        if file_size == 0:
            raise SpectrumError(name, "empty file (0 bytes)")
        try:
            # No memmap: section[0] then reads exactly row 0 with one seek + read (plain files)
            # or by seeking in the decompressed stream (gzip). As fast as a memory map here, and
            # unlike one it also serves scaled images (a uint16 bitmask stored with BZERO).
            with fits.open(handle, memmap=False, lazy_load_hdus=True) as hdul:
                return _read_open(name, hdul, file_size, compressed)
        except SpectrumError:
            raise
        except (OSError, EOFError, zlib.error) as exc:
            raise SpectrumError(name, _describe_open_error(exc, compressed)) from exc
        except (ValueError, TypeError, KeyError, IndexError, VerifyError) as exc:
            # astropy's reactions to damaged headers/data; our own checks raise SpectrumError
            raise SpectrumError(name, f"corrupt FITS file ({type(exc).__name__}: {exc})") from exc


def _read_open(name: str, hdul: fits.HDUList, file_size: int, compressed: bool) -> Spectrum:
    rows = [_read_row0(name, hdul, index, what, file_size, compressed) for index, what in _HDUS]
    header = hdul[0].header
    values = {key: _header_value(header, key) for key in _HEADER_KEYS}
    return _spectrum(name, values, rows)


def _spectrum(name: str, header: dict[str, Any], rows: list[np.ndarray]) -> Spectrum:
    """The Spectrum from row 0 of HDU1-3 (as stored) and the primary header's values."""
    flux = np.array(rows[0], dtype=np.float64)
    err_file = np.array(rows[1], dtype=np.float64)
    if rows[2].dtype.kind not in "iu":
        raise SpectrumError(
            name, f"HDU3 (pixel bitmask) holds {rows[2].dtype.name} values; expected integers"
        )
    bitmask = np.array(rows[2], dtype=np.int64)

    finite = np.isfinite(flux)
    if not finite.any():
        raise SpectrumError(name, "no data: the coadd flux (HDU1 row 0) is NaN/inf at every pixel")
    if not np.any((flux != 0.0) & finite):
        raise SpectrumError(name, "no data: the coadd flux (HDU1 row 0) is zero at every pixel")

    for array in (flux, err_file, bitmask):
        array.setflags(write=False)

    return Spectrum(
        path=name,
        flux=flux,
        err_file=err_file,
        bitmask=bitmask,
        k_mag=_header_float(header, "K"),
        ebv=_header_float(header, "SFD_EBV"),
        obj_id=_header_str(header, "OBJID") or _header_str(header, "OBJ") or _obj_from_name(name),
        nvisits=_header_int(header, "NVISITS"),
        snr=_header_float(header, "SNR"),
    )


def _read_row0(
    name: str, hdul: fits.HDUList, index: int, what: str, file_size: int, compressed: bool
) -> np.ndarray:
    """Row 0 of image HDU ``index`` (or the whole HDU when 1-D), as stored: (8575,)."""
    label = f"HDU{index} ({what})"
    try:
        hdu = hdul[index]
    except IndexError:
        reason = _missing_hdu_reason(name, hdul, label, file_size, compressed)
        raise SpectrumError(name, reason) from None
    if not isinstance(hdu, fits.ImageHDU):
        if type(hdu).__name__.startswith("_"):  # astropy's _ValidHDU, _CorruptedHDU, ...
            raise SpectrumError(name, f"{label} has a corrupt or non-standard header")
        kind = type(hdu).__name__
        raise SpectrumError(name, f"{label} is a {kind}, expected an image; {_LAYOUT}")
    shape = hdu.shape  # numpy order, from the header (no data read)
    if len(shape) == 0 or 0 in shape:
        raise SpectrumError(name, f"{label} holds no data; {_LAYOUT}")
    if len(shape) > 2:
        raise SpectrumError(
            name, f"{label} has {len(shape)} axes {shape}; expected (rows, {N_PIXELS})"
        )
    if shape[-1] != N_PIXELS:
        raise SpectrumError(
            name, f"{label} has {shape[-1]} pixels per spectrum; apStar spectra have {N_PIXELS}"
        )
    # A complete FITS file is a whole number of 2880-byte blocks; only when it is not (a cut
    # file, or a writer that skipped the final padding) is the exact extent worth computing
    # (fileinfo() and size re-parse the header: ~0.1 ms per HDU).
    if not compressed and file_size % _FITS_BLOCK:
        end = hdu.fileinfo()["datLoc"] + hdu.size
        if end > file_size:
            raise SpectrumError(
                name,
                f"truncated file: {label} extends to byte {end} but the file has {file_size} bytes",
            )
    try:
        row = hdu.section[0] if len(shape) == 2 else hdu.section[:]
    except (ValueError, TypeError, EOFError, zlib.error) as exc:
        # a short read surfaces as "cannot reshape array of size ..." or "buffer is too small"
        short = isinstance(exc, EOFError) or "reshape" in str(exc) or "too small" in str(exc)
        why = "the file ends inside it" if short else str(exc)
        raise SpectrumError(name, f"truncated or corrupt data in {label}: {why}") from exc
    if row.shape != (N_PIXELS,):  # a short read from a damaged stream
        raise SpectrumError(name, f"truncated or corrupt data in {label}: read {row.shape} values")
    return row


def _missing_hdu_reason(
    name: str, hdul: fits.HDUList, label: str, file_size: int, compressed: bool
) -> str:
    """Why HDU ``label`` is absent: a truncated file, or a file that never had it."""
    if compressed:
        if _gzip_truncated(name):
            return f"truncated gzip stream: it ends before {label}"
    elif file_size % _FITS_BLOCK:
        return (
            f"truncated file: no {label}, and its size ({file_size} bytes) is not a whole number "
            f"of {_FITS_BLOCK}-byte FITS blocks"
        )
    try:
        count = len(hdul)
    except Exception:  # noqa: BLE001 - only for the message; the file is bad either way
        count = None
    has = "only the primary HDU" if count == 1 else f"{count} HDUs" if count else "fewer HDUs"
    return f"no {label}: the file has {has}; {_LAYOUT}"


def _gzip_truncated(name: str) -> bool:
    """True when the gzip stream ends early (the whole stream is read; error path only)."""
    try:
        with gzip.open(name, "rb") as stream:
            while stream.read(1 << 20):
                pass
    except EOFError:
        return True
    except (OSError, zlib.error):
        return False
    return False


def _describe_open_error(exc: BaseException, compressed: bool) -> str:
    """A readable reason for an exception raised while opening/parsing a file."""
    text = str(exc)
    if isinstance(exc, EOFError):
        return f"truncated gzip stream ({text})"
    if isinstance(exc, (zlib.error, gzip.BadGzipFile)):
        return f"corrupt gzip stream ({text})"
    if "No SIMPLE card" in text:
        return "not a FITS file (no SIMPLE card at the start" + (
            " of the decompressed gzip stream)" if compressed else ")"
        )
    if "Empty or corrupt FITS file" in text:
        return "not a FITS file, or its primary header is truncated or corrupt"
    if "END card" in text:
        return "truncated or corrupt FITS header (no END card)"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"I/O error while reading: {exc.strerror or text}"
    return f"cannot read FITS file ({type(exc).__name__}: {text})"


def _header_value(header: fits.Header, key: str) -> Any:
    try:
        return header.get(key)
    except (ValueError, VerifyError):  # an unparsable card counts as absent
        return None


def _header_float(header: dict[str, Any], key: str) -> float | None:
    value = header.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    number = float(value)
    if not math.isfinite(number) or number <= MISSING_SENTINEL:
        return None
    return number


def _header_int(header: dict[str, Any], key: str) -> int | None:
    number = _header_float(header, key)
    return int(number) if number is not None and number == int(number) else None


def _header_str(header: dict[str, Any], key: str) -> str | None:
    value = header.get(key)
    if not isinstance(value, str):
        return None
    return value.strip() or None


def _obj_from_name(name: str) -> str | None:
    match = _NAME_RE.match(os.path.basename(name))
    return match.group("obj") if match else None
