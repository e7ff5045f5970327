"""astronn_dist.worker.science.fastfits against astropy: wherever the fast reader answers, astropy gives the same.

:func:`astronn_dist.worker.science.spectra.read_apstar` reads a plain, well-formed file with the fast reader and
anything else with astropy (``_read_with_astropy``). The fast reader may decline any file, but
it must never answer differently from astropy, nor raise on damage: checked on every file the
tests have (the real DR17 files, synthetic ones, the bad-input corpora) and by a fuzzer that
corrupts header bytes and data and cuts files short.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _service import bad_spectrum_files  # tests/ is on sys.path
from test_spectra import _bad_files
from astronn_dist.worker.science import fastfits, spectra
from astronn_dist.worker.modeling import synth
from astronn_dist.worker.science.spectra import N_PIXELS, SpectrumError, read_apstar

FIELDS = ("flux", "err", "ivar", "bitmask")
HEADER_VALUES = ("k_mag", "ebv", "obj_id", "nvisits", "snr")


def _outcome(read, path: str):
    """A Spectrum, or the SpectrumError's reason."""
    try:
        return read(path)
    except SpectrumError as exc:
        return exc.reason


def _assert_same(fast: spectra.Spectrum, slow: spectra.Spectrum) -> None:
    for name in FIELDS:
        a, b = getattr(fast, name), getattr(slow, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    for name in HEADER_VALUES:
        assert getattr(fast, name) == getattr(slow, name), name
        assert type(getattr(fast, name)) is type(getattr(slow, name)), name


def _check(path: str | Path) -> bool:
    """read_apstar (fast path when it answers) equals astropy's reading; True if fast answered."""
    path = str(path)
    try:
        answered = fastfits.read_rows(path, N_PIXELS, spectra._HEADER_KEYS) is not None
    except OSError:
        answered = False
    slow = _outcome(spectra._read_with_astropy, path)
    both = _outcome(read_apstar, path)
    if isinstance(slow, str):
        assert both == slow  # the same error, worded by astropy's path
        assert not answered or both == slow
    else:
        assert not isinstance(both, str), both
        _assert_same(both, slow)
    return answered


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("synth")
    synth.write_survey(root, 6, seed=5, missing_fraction=0.3, visits=(1, 3))
    return sorted((root / "apstar").glob("*.fits"))


def test_real_and_synthetic_files_take_the_fast_path(apstar_files: list[Path], synthetic: list[Path]) -> None:
    for path in [*apstar_files, *synthetic]:
        assert _check(path), f"{path.name}: the fast reader declined a well-formed file"


@pytest.mark.filterwarnings("ignore::astropy.utils.exceptions.AstropyUserWarning")
def test_bad_inputs_agree_with_astropy(apstar_files: list[Path], tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    corpus = [p for p, _ in _bad_files(apstar_files[0], tmp_path / "a").values()]
    corpus += list(bad_spectrum_files(tmp_path, str(apstar_files[1])).values())
    answered = [p for p in corpus if _check(p)]
    # The all-NaN/all-zero/float-bitmask files are well formed: the fast reader reads them and
    # the content checks (shared by both paths) refuse them with the same words.
    assert all(isinstance(_outcome(read_apstar, str(p)), str) for p in corpus)
    assert answered, "the fast reader should read the well-formed bad-content files"


def test_forms_the_fast_reader_leaves_to_astropy(apstar_files: list[Path], tmp_path: Path) -> None:
    """gzip, scaled data, a duplicated keyword, a long string: declined, and read by astropy."""
    real = apstar_files[1]
    gz = tmp_path / "a.fits.gz"
    with open(real, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    with fits.open(real) as hdul:
        scaled = fits.HDUList([h.copy() for h in hdul[:4]])
        scaled[3].data = scaled[3].data.astype(np.uint16)  # written with BZERO = 32768
        scaled.writeto(tmp_path / "scaled.fits")
        twice = fits.HDUList([h.copy() for h in hdul[:4]])
        twice[0].header.add_comment("x")
        twice.writeto(tmp_path / "twice.fits")
    raw = bytearray((tmp_path / "twice.fits").read_bytes())
    at = raw.index(b"COMMENT x")
    raw[at : at + 80] = b"K       =                 12.5 / a second K card".ljust(80)
    (tmp_path / "twice.fits").write_bytes(bytes(raw))
    for path in (gz, tmp_path / "scaled.fits", tmp_path / "twice.fits"):
        assert fastfits.read_rows(str(path), N_PIXELS, spectra._HEADER_KEYS) is None, path.name
        _check(path)
    assert read_apstar(gz).k_mag == read_apstar(real).k_mag


def test_header_values_as_astropy_parses_them(apstar_files: list[Path], tmp_path: Path) -> None:
    """Fixed and free format, D exponents, integers, quotes in strings, trailing blanks."""
    cards = {
        "K": "K       =              1.25D+1 / Fortran exponent",
        "SFD_EBV": "SFD_EBV =   .5 / free format",
        "OBJID": "OBJID   = 'OBrien  ' / blanks after",
        "NVISITS": "NVISITS =                    7",
        "SNR": "SNR     =                  +42 / an integer",
    }
    raw = bytearray(apstar_files[1].read_bytes())
    for key, card in cards.items():
        at = next(i for i in range(0, 2880 * 8, 80) if raw[i : i + 8] == key.ljust(8).encode())
        raw[at : at + 80] = card.ljust(80).encode()
    path = tmp_path / "cards.fits"
    path.write_bytes(bytes(raw))
    assert _check(path)
    s = read_apstar(path)
    assert (s.k_mag, s.ebv, s.obj_id, s.nvisits, s.snr) == (12.5, 0.5, "OBrien", 7, 42.0)


def test_a_keyword_straddling_two_fields_hides_nothing(apstar_files: list[Path], tmp_path: Path) -> None:
    """'XXXXBLAN' then 'K       ': the bytes 'BLANK   ' straddle the two keyword fields; the K
    card after them is still found, with astropy's value (a search over the keyword fields
    that consumed the straddling match would have skipped it)."""
    raw = bytearray(apstar_files[1].read_bytes())
    at = next(i for i in range(0, 2880 * 8, 80) if raw[i : i + 8] == b"K       ")
    before = next(i for i in range(at - 80, 0, -80) if raw[i : i + 8] not in (b"COMMENT ", b"HISTORY ", b"        "))
    raw[before : before + 80] = b"XXXXBLAN= 'x' / ends with the start of BLANK".ljust(80)
    raw[at : at + 80] = b"K       =                 12.5 / the card after it".ljust(80)
    if before + 80 != at:  # make them adjacent: move K right after the straddling card
        raw[at : at + 80], raw[before + 80 : before + 160] = raw[before + 80 : before + 160], raw[at : at + 80]
    path = tmp_path / "straddle.fits"
    path.write_bytes(bytes(raw))
    assert _check(path)
    assert read_apstar(path).k_mag == 12.5


@pytest.mark.parametrize("card", [
    "k       =                 12.5 / a lower-case keyword (astropy reads it as K)",
    " K      =                 12.5 / shifted by one",
    "K=                        12.5 / the value indicator too early",
    "HIERARCH K = 12.5",
    "OBJID   = 'abc'' / x' / an escaped quote",
])
def test_unusual_cards_are_left_to_astropy(apstar_files: list[Path], tmp_path: Path, card: str) -> None:
    """Forms astropy reads in its own way (a 'k' card is its K): declined, then astropy's."""
    raw = bytearray(apstar_files[1].read_bytes())
    key = "OBJID" if card.startswith("OBJID") else "K"
    at = next(i for i in range(0, 2880 * 8, 80) if raw[i : i + 8] == key.ljust(8).encode())
    raw[at : at + 80] = card.ljust(80).encode()
    path = tmp_path / "unusual.fits"
    path.write_bytes(bytes(raw))
    assert not _check(path)


def test_a_header_without_end_is_declined_at_once(apstar_files: list[Path], tmp_path: Path) -> None:
    raw = apstar_files[1].read_bytes()
    path = tmp_path / "no-end.fits"
    path.write_bytes(raw[:2880].replace(b"END" + b" " * 77, b" " * 80) + b" " * 2880 * 3000)
    assert fastfits.read_rows(str(path), N_PIXELS, spectra._HEADER_KEYS) is None
    assert isinstance(_outcome(read_apstar, str(path)), str)  # astropy words the error


def test_huge_axes_do_not_wrap_around(apstar_files: list[Path], tmp_path: Path) -> None:
    raw = bytearray(apstar_files[1].read_bytes())
    hdu3 = [i for i in range(0, len(raw), 2880) if raw[i : i + 8] == b"XTENSION"][2]
    at = raw.index(b"NAXIS2  ", hdu3)
    raw[at + 10 : at + 30] = f"{4611686018427387904:>20}".encode()
    path = tmp_path / "huge.fits"
    path.write_bytes(bytes(raw))
    assert not _check(path)


class _Small:
    """A one-row apStar-like file (4 HDUs, the real primary header), to fuzz quickly. Not a
    fixture argument: hypothesis would print its 270 kB in every failure report."""

    raw: bytes | None = None

    @classmethod
    def bytes(cls, tmp: Path, real: Path) -> bytes:
        if cls.raw is None:
            path = tmp / "small.fits"
            with fits.open(real) as hdul:
                rows = [fits.ImageHDU(hdul[i].data[:1], hdul[i].header) for i in (1, 2, 3)]
                fits.HDUList([hdul[0].copy(), *rows]).writeto(path)
            cls.raw = path.read_bytes()
        return cls.raw


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory, apstar_files: list[Path]) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    _Small.bytes(folder, apstar_files[1])
    return folder


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], print_blob=True)
@given(data=st.data())
@pytest.mark.filterwarnings("ignore::astropy.utils.exceptions.AstropyUserWarning")
@pytest.mark.filterwarnings("ignore::astropy.io.fits.verify.VerifyWarning")
def test_fuzzed_files_never_disagree(fuzz_dir: Path, data) -> None:
    raw = bytearray(_Small.raw or b"")
    headers = [0, *(i for i in range(0, len(raw), 2880) if raw[i : i + 8] == b"XTENSION")]
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        if not raw:
            break
        kind = data.draw(st.sampled_from(["byte", "header byte", "card", "keyword", "value", "cut"]), label="kind")
        if kind == "byte":  # any byte anywhere, printable or not
            at = data.draw(st.integers(0, len(raw) - 1), label="at")
            raw[at] = data.draw(st.integers(0, 255), label="value")
        elif kind == "header byte":  # a byte of a header: a printable one, or any
            start = data.draw(st.sampled_from(headers), label="header")
            at = min(len(raw) - 1, start + data.draw(st.integers(0, 2880 * 4 - 1), label="at"))
            raw[at] = data.draw(st.one_of(st.integers(32, 126), st.integers(0, 255)), label="value")
        elif kind == "card":  # a whole card of a header replaced by junk or a real keyword
            start = data.draw(st.sampled_from(headers), label="header")
            at = start + 80 * data.draw(st.integers(0, 40), label="card")
            key = data.draw(st.sampled_from(["BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "K", "SFD_EBV", "OBJID", "END", "BZERO", "PCOUNT", "GCOUNT", "XTENSION", "SIMPLE"]), label="key")
            value = data.draw(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20), label="text")
            raw[at : at + 80] = f"{key:<8}= {value}".ljust(80)[:80].encode()
        elif kind == "keyword":  # a needed keyword written as astropy still reads it
            start = data.draw(st.sampled_from(headers), label="header")
            key = data.draw(st.sampled_from([b"K       ", b"SFD_EBV ", b"BITPIX  ", b"NAXIS1  ", b"BZERO   "]), label="key")
            at = raw.find(key, start, start + 2880 * 8)
            if at >= 0 and at % 80 == 0:
                form = data.draw(st.sampled_from(["lower", "shift", "hierarch"]), label="form")
                name = key.rstrip()
                field = {"lower": name.lower().ljust(8), "shift": (b" " + name).ljust(8)[:8],
                         "hierarch": b"HIERARCH"}[form]
                raw[at : at + 8] = field
        elif kind == "value":  # a structural value changed to another number
            start = data.draw(st.sampled_from(headers), label="header")
            key = data.draw(st.sampled_from([b"BITPIX  ", b"NAXIS   ", b"NAXIS1  ", b"NAXIS2  "]), label="key")
            at = raw.find(key, start, start + 2880 * 8)
            if at >= 0:
                number = data.draw(st.sampled_from([-64, -32, 0, 1, 2, 3, 8, 16, 32, 64, 8574, 8576, 8575, -1]), label="number")
                raw[at + 10 : at + 30] = f"{number:>20}".encode()
        else:  # the file cut short, anywhere
            del raw[data.draw(st.integers(0, len(raw) - 1), label="cut") :]
    path = fuzz_dir / "fuzzed.fits"
    path.write_bytes(bytes(raw))
    _check(path)  # fast answer == astropy's; errors are SpectrumErrors with the same reason
