"""A small reader of exactly what :func:`astronn_dist.worker.science.spectra.read_apstar` needs, for well-formed files.

astropy parses every card of every header it touches (~2.9 ms for an apStar file, nearly all of
it header parsing in Python), while reading a spectrum needs four headers' worth of ten keywords
and three rows of data: this reader takes ~0.2 ms (BENCHMARKS.md). It is an accelerator, not a
second implementation of FITS: it reads only plain (uncompressed) files in which everything it needs
is written in the standard's plainest form, and *declines* (returns None) on anything else —
gzip, scaled data (BSCALE/BZERO/BLANK), a needed keyword written twice or in a form it does not
parse, non-ASCII header bytes, a size that is not whole 2880-byte blocks, data running past
the end of the file. The caller then reads the file with astropy, which also words the errors.
So whenever this reader returns a value, astropy returns the same (tests/test_fastfits.py checks
it on every test file, the bad-input corpus and a fuzzer of corrupted headers and data).

FITS facts used (FITS Standard 4.0): headers are 80-byte ASCII cards in 2880-byte blocks, ended
by the ``END`` card; a value card has ``= `` in bytes 9-10 and its value in bytes 11-80, before an
optional ``/ comment``; the data follow the header, big-endian, ``|BITPIX| / 8`` bytes a value,
``GCOUNT * (PCOUNT + NAXIS1 * ... * NAXISn)`` values, padded to whole blocks.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

BLOCK = 2880
CARD = 80

_DTYPES = {8: np.dtype("u1"), 16: np.dtype(">i2"), 32: np.dtype(">i4"), 64: np.dtype(">i8"),
           -32: np.dtype(">f4"), -64: np.dtype(">f8")}
# Keywords astropy reads while it builds an HDU: each one present must parse here, else the
# reader declines (astropy refuses some such files, e.g. an unparsable EXTEND value).
_STRUCTURE = ("SIMPLE", "XTENSION", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "PCOUNT",
              "GCOUNT", "BSCALE", "BZERO", "BLANK", "EXTEND", "GROUPS", "EXTNAME", "EXTVER",
              "EXTLEVEL", "BUNIT", "INHERIT", "CHECKSUM", "DATASUM", "ZIMAGE", "ZTABLE")
_PRINTABLE = bytes(range(0x20, 0x7F))
# Every keyword field (bytes 1-8 of a card) as the standard writes it: upper-case letters,
# digits, '-' and '_', left-justified, or blank. astropy also reads lower-case, shifted and
# HIERARCH keywords (and would then find, e.g., a 'k' card as K): such headers are declined.
_KEYWORD_FIELDS = re.compile(
    rb"(?:" + b"|".join(rb"[A-Z0-9_-]{%d}" % k + b" " * (8 - k) for k in range(8, -1, -1)) + rb")*"
)
MAX_HEADER_BLOCKS = 100
"""A longer header (360 cards and more) is left to astropy: no apStar file has one."""
_END_CARD = b"END" + b" " * 77
# A value as the standard's fixed or free format writes it; anything else (complex numbers,
# CONTINUE'd strings, undefined values) makes the reader decline.
_VALUE = re.compile(
    rb" *(?:(?P<str>'(?:[^']|'')*')|(?P<bool>[TF])|(?P<num>[+-]?(?:\.\d+|\d+(?:\.\d*)?)(?:[DE][+-]?\d+)?))"
    rb" *(?:/.*)?$"
)


@dataclass(frozen=True)
class Image:
    """What is read of one image HDU: ``row0`` (8575,) as stored, in native byte order."""

    dtype: np.dtype  # as stored (big-endian)
    shape: tuple[int, ...]  # numpy order, e.g. (rows, 8575)
    row0: np.ndarray


def _parse(field: bytes) -> Any:
    """A card's value field (bytes 11-80) -> the Python value astropy gives; None: decline."""
    match = _VALUE.match(field)
    if match is None:
        return None
    if match["str"] is not None:
        if b"''" in match["str"]:
            return None  # an escaped quote: where the string ends is astropy's call
        text = match["str"][1:-1].decode("ascii").rstrip()
        return None if text.endswith("&") else text  # '&': a long string CONTINUEd: decline
    if match["bool"] is not None:
        return match["bool"] == b"T"
    number = match["num"]
    if b"." in number or b"E" in number or b"D" in number:
        return float(number.replace(b"D", b"E"))
    return int(number)


@functools.cache
def _field(key: str) -> bytes:
    """``key`` as an 8-byte keyword field."""
    return key.encode().ljust(8)


def _names(header: bytes) -> bytes:
    """The keyword fields alone, 8 bytes a card: a tenth of the text to search."""
    return np.frombuffer(header, dtype="S80").astype("S8").tobytes()


def _aligned_find(names: bytes, field: bytes, start: int) -> int:
    """The first keyword field equal to ``field`` at or after byte ``start`` of ``names`` (a
    multiple of 8), or -1; an occurrence straddling two fields does not count."""
    at = names.find(field, start)
    while at >= 0 and at % 8:
        at = names.find(field, at + 1)
    return at


def _cards(header: bytes, keys: tuple[str, ...], names: bytes | None = None
           ) -> dict[str, Any] | None:
    """The values of ``keys`` found as value cards of ``header`` (up to its END card); None
    when one of them is written twice, without a value or in a form that does not parse.
    ``names``: :func:`_names` of the header, when the caller has it."""
    if names is None:
        names = _names(header)
    found: dict[str, Any] = {}
    # One search per key (bytes.find, in C) rather than one regex over the union of the keys:
    # 2-3x faster on a DR17 primary header, and a key straddling two fields cannot hide the
    # aligned field that follows it.
    for key in keys:
        field = _field(key)
        at = _aligned_find(names, field, 0)
        if at < 0:
            continue
        if _aligned_find(names, field, at + 8) >= 0:
            return None  # written twice: which one counts is astropy's call
        card = at // 8 * CARD
        if header[card + 8 : card + 10] != b"= ":
            return None
        value = _parse(header[card + 10 : card + CARD])
        if value is None:
            return None
        found[key] = value
    return found


def _plain_header(header: bytes, names: bytes) -> bool:
    """Only ASCII 0x20-0x7E, and every keyword field as the standard writes it (no HIERARCH)."""
    if header.translate(None, _PRINTABLE):  # a byte outside ASCII 0x20-0x7E
        return False
    return _KEYWORD_FIELDS.fullmatch(names) is not None and b"HIERARCH" not in names


class _File:
    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size

    def read(self, offset: int, n: int) -> bytes | None:
        if offset < 0 or offset + n > self.size:
            return None
        data = os.pread(self.fd, n, offset)
        return data if len(data) == n else None

    def header(self, offset: int, first: int = BLOCK) -> tuple[bytes, int] | None:
        """The header at ``offset`` (up to and including its END card) and where its data
        start; None when it has no END card or runs past the end of the file. Its bytes and
        keywords are not checked here (:func:`_plain_header`)."""
        chunk = self.read(offset, min(first, self.size - offset) // BLOCK * BLOCK)
        blocks, searched = ([chunk] if chunk else []), 0
        while blocks:
            text = blocks[0] if len(blocks) == 1 else b"".join(blocks)
            if len(text) > MAX_HEADER_BLOCKS * BLOCK:
                return None
            end = text.find(_END_CARD, searched)  # only the blocks not searched yet
            while end >= 0 and end % CARD:
                end = text.find(_END_CARD, end + 1)
            if end >= 0:  # not checked yet: the caller does it (_plain_header)
                return text[: end + CARD], offset + (end // BLOCK + 1) * BLOCK
            searched = len(text)  # blocks are whole cards: an END card lies in one block
            more = self.read(offset + len(text), BLOCK)
            if more is None:
                return None
            blocks = [text, more]
        return None


def _layout(header: bytes, cards: dict[str, Any] | None, extension: bool
            ) -> tuple[np.dtype, tuple[int, ...]] | None:
    """(dtype, axes in FITS order) of a plain image HDU from its header and parsed structural
    cards; None: decline."""
    if extension:
        if not header.startswith(b"XTENSION= 'IMAGE   '"):
            return None
    elif not header.startswith(b"SIMPLE  =                    T"):
        return None
    if cards is None or any(k in cards for k in ("BSCALE", "BZERO", "BLANK", "NAXIS3", "GROUPS", "ZIMAGE", "ZTABLE")):
        return None
    bitpix, naxis = cards.get("BITPIX"), cards.get("NAXIS")
    if bitpix not in _DTYPES or type(naxis) is not int or naxis not in (0, 1, 2):
        return None
    axes = tuple(cards.get(f"NAXIS{i}") for i in range(1, naxis + 1))
    if any(type(a) is not int or a < 0 for a in axes):
        return None
    pcount, gcount = cards.get("PCOUNT", 0), cards.get("GCOUNT", 1)
    if extension and (pcount, gcount) != (0, 1) or not extension and ("PCOUNT" in cards or "GCOUNT" in cards):
        return None
    return _DTYPES[bitpix], axes  # type: ignore[return-value]


@functools.lru_cache(maxsize=256)
def _extension_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...]] | None:
    """:func:`_layout` of an extension header (None also when it is not plain). Cached by its
    bytes: a survey's HDU1-3 headers come in a handful of variants (they differ by the number
    of rows), so most files cost a dictionary lookup here instead of a check and a parse."""
    names = _names(header)
    if not _plain_header(header, names):
        return None
    return _layout(header, _cards(header, _STRUCTURE, names), extension=True)


def _row0(f: _File, layout: tuple[np.dtype, tuple[int, ...]] | None, data_at: int, n_pixels: int
          ) -> tuple[np.ndarray, int] | None:
    """Row 0 of the image at ``data_at`` (native byte order) and where the next HDU starts."""
    if layout is None:
        return None
    dtype, axes = layout
    values = math.prod(axes) if axes else 0  # exact: np.prod would wrap around
    next_hdu = data_at + -(-values * dtype.itemsize // BLOCK) * BLOCK
    if next_hdu > f.size or not axes or axes[0] != n_pixels or values == 0:
        return None  # past the end, no data, or not a spectrum's width: astropy words it
    raw = f.read(data_at, n_pixels * dtype.itemsize)
    if raw is None:
        return None
    return np.frombuffer(raw, dtype).astype(dtype.newbyteorder("=")), next_hdu


def read_rows(path: str, n_pixels: int, keys: tuple[str, ...]
              ) -> tuple[dict[str, Any], list[Image]] | None:
    """The primary header's ``keys`` and row 0 of HDU1-3 of an uncompressed FITS file.

    Returns:
        ``(values, [hdu1, hdu2, hdu3])``: values maps each key present to what astropy's
        ``header.get`` gives; None when the file is anything but plain and well formed (the
        caller reads it with astropy then). OSError of the storage propagates.
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0 or size % BLOCK:
            return None
        f = _File(handle.fileno(), size)
        primary = f.header(0, first=8 * BLOCK)  # DR17 primary headers: 3-4 blocks
        if primary is None:
            return None
        header, data_at = primary
        names = _names(header)
        if not _plain_header(header, names):
            return None
        cards = _cards(header, keys + _STRUCTURE, names)  # the values and the layout
        layout = _layout(header, cards, extension=False)
        if cards is None or layout is None:
            return None
        values = {k: cards[k] for k in keys if k in cards}
        dtype, axes = layout
        offset = data_at + -(-math.prod(axes) * dtype.itemsize // BLOCK) * BLOCK if axes else data_at
        if offset > f.size:
            return None
        images = []
        for _ in range(3):
            got = f.header(offset)
            if got is None:
                return None
            layout = _extension_layout(got[0])
            row = _row0(f, layout, got[1], n_pixels)
            if row is None:
                return None
            images.append(Image(layout[0], tuple(reversed(layout[1])), row[0]))
            offset = row[1]
        return values, images
