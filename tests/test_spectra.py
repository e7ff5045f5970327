"""astronn_dist.worker.science.spectra.read_apstar on the two real DR17 apStar files and on damaged copies of them."""

from __future__ import annotations

import gzip
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from astronn_dist.worker.science.spectra import N_PIXELS, Spectrum, SpectrumError, read_apstar

BULGE = "apStar-dr17-2M17335483-2753043.fits"
KEPLER = "apStar-dr17-2M19485057+5005279.fits"


@pytest.fixture(scope="module")
def apstar_dir(sample_dir: Path) -> Path:
    return sample_dir


@pytest.fixture(scope="module")
def bulge(apstar_dir: Path) -> Path:
    return apstar_dir / BULGE


def _raw_rows(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, fits.Header]:
    """Row 0 of HDU1-3 and the primary header, straight from astropy."""
    with fits.open(path) as hdul:
        rows = [hdul[index].data[0].copy() for index in (1, 2, 3)]
        return rows[0], rows[1], rows[2], hdul[0].header.copy()


def _write(path: Path, header: fits.Header | None, *images: np.ndarray) -> Path:
    """An apStar-like file: primary header, then one image HDU per array."""
    hdus = [fits.PrimaryHDU(header=header)] + [fits.ImageHDU(image) for image in images]
    fits.HDUList(hdus).writeto(path)
    return path


def _assert_spectrum_matches_raw(spectrum: Spectrum, path: Path) -> None:
    flux, err_raw, bits, _ = _raw_rows(path)
    np.testing.assert_array_equal(spectrum.flux, flux)
    np.testing.assert_array_equal(spectrum.bitmask, bits)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        ivar = err_raw.astype(np.float64) ** -2.0
        ivar[~np.isfinite(ivar)] = 0.0
        err = ivar**-0.5
    np.testing.assert_array_equal(spectrum.ivar, ivar)
    np.testing.assert_array_equal(spectrum.err, err)


# --- the real files ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [BULGE, KEPLER])
def test_real_file_equals_astropy_row0(apstar_dir: Path, name: str) -> None:
    path = apstar_dir / name
    spectrum = read_apstar(path)
    _assert_spectrum_matches_raw(spectrum, path)
    assert spectrum.path == str(path)
    for array, dtype in ((spectrum.flux, np.float64), (spectrum.err, np.float64),
                         (spectrum.ivar, np.float64), (spectrum.bitmask, np.int64)):
        assert array.shape == (N_PIXELS,)
        assert array.dtype == dtype and array.dtype.isnative  # the file is big-endian
        assert not array.flags.writeable


@pytest.mark.parametrize("name", [BULGE, KEPLER])
def test_err_at_pixels_equals_err_there_bit_for_bit(apstar_dir: Path, name: str) -> None:
    """err_at (what the worker's normalization takes at the continuum pixels) gives err's
    numbers at any subset of pixels, including the non-finite ones of the chip gaps."""
    spectrum = read_apstar(apstar_dir / name)
    _, err_raw, _, _ = _raw_rows(apstar_dir / name)
    np.testing.assert_array_equal(spectrum.err_file, err_raw.astype(np.float64))
    rng = np.random.default_rng(5)
    for pixels in (np.arange(N_PIXELS), np.flatnonzero(~np.isfinite(err_raw)),
                   np.sort(rng.choice(N_PIXELS, 532, replace=False)), np.array([17]), np.arange(3, 8000, 7)):
        assert spectrum.err_at(pixels).tobytes() == spectrum.err[pixels].tobytes()


@pytest.mark.parametrize("name", [BULGE, KEPLER])
def test_err_is_ivar_to_the_minus_half_never_nan(apstar_dir: Path, name: str) -> None:
    spectrum = read_apstar(apstar_dir / name)
    _, err_raw, _, _ = _raw_rows(apstar_dir / name)
    bad = ~np.isfinite(err_raw)  # the real files have NaN errors in the chip gaps
    assert bad.sum() > 700
    assert not np.isnan(spectrum.err).any()
    assert np.all(spectrum.ivar[bad] == 0.0) and np.all(np.isinf(spectrum.err[bad]))
    good = ~bad
    np.testing.assert_allclose(spectrum.err[good], err_raw[good], rtol=1e-14)


def test_bulge_header_photometry(apstar_dir: Path) -> None:
    spectrum = read_apstar(apstar_dir / BULGE)
    assert spectrum.k_mag == pytest.approx(9.811, abs=1e-5)
    assert spectrum.ebv is None  # SFD_EBV = -9999.99 in this file: missing extinction
    assert spectrum.obj_id == "2M17335483-2753043"
    assert spectrum.nvisits == 3
    assert spectrum.snr == pytest.approx(154.155, abs=1e-3)


def test_kepler_header_photometry(apstar_dir: Path) -> None:
    spectrum = read_apstar(apstar_dir / KEPLER)
    assert spectrum.k_mag == pytest.approx(10.522, abs=1e-5)
    assert spectrum.ebv == pytest.approx(0.1927, abs=1e-4)
    assert spectrum.obj_id == "2M19485057+5005279"
    assert spectrum.nvisits == 1


def test_gzip_copy_gives_identical_spectrum(bulge: Path, tmp_path: Path) -> None:
    packed = tmp_path / (BULGE + ".gz")
    with open(bulge, "rb") as src, gzip.open(packed, "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain, zipped = read_apstar(bulge), read_apstar(packed)
    for field in ("flux", "err", "ivar", "bitmask"):
        np.testing.assert_array_equal(getattr(zipped, field), getattr(plain, field))
    assert (zipped.k_mag, zipped.ebv, zipped.obj_id, zipped.nvisits, zipped.snr) == (
        plain.k_mag, plain.ebv, plain.obj_id, plain.nvisits, plain.snr)


def test_reads_are_thread_safe(apstar_dir: Path) -> None:
    paths = [apstar_dir / BULGE, apstar_dir / KEPLER] * 8
    with ThreadPoolExecutor(4) as pool:
        spectra = list(pool.map(read_apstar, paths))
    for path, spectrum in zip(paths, spectra):
        np.testing.assert_array_equal(spectrum.flux, _raw_rows(path)[0])


# --- identity from the file name, layouts -------------------------------------------------------


@pytest.mark.parametrize(
    "file_name, obj",
    [
        ("apStar-1.3-apo25m-2M17335483-2753043.fits", "2M17335483-2753043"),  # SDSS-V
        ("apStar-daily-lco25m-2M04482524+4456383.fits.gz", "2M04482524+4456383"),  # SDSS-V, gz
        ("apStar-dr17-2M19485057+5005279.fits", "2M19485057+5005279"),  # DR17
        ("asStar-dr17-2M12345678-1234567.fits", "2M12345678-1234567"),  # DR17, LCO prefix
        ("my_spectrum.fits", None),  # no identity anywhere
    ],
)
def test_obj_id_from_file_name_when_header_has_none(
    bulge: Path, tmp_path: Path, file_name: str, obj: str | None
) -> None:
    flux, err, bits, header = _raw_rows(bulge)
    del header["OBJID"]
    path = tmp_path / file_name
    if file_name.endswith(".gz"):
        plain = _write(tmp_path / "plain.fits", header, flux, err, bits)
        path.write_bytes(gzip.compress(plain.read_bytes()))
    else:
        _write(path, header, flux, err, bits)
    spectrum = read_apstar(path)
    assert spectrum.obj_id == obj
    np.testing.assert_array_equal(spectrum.flux, flux)


def test_obj_header_is_used_when_objid_is_absent(bulge: Path, tmp_path: Path) -> None:
    flux, err, bits, header = _raw_rows(bulge)
    del header["OBJID"]
    header["OBJ"] = "2M00000000+0000000"
    spectrum = read_apstar(_write(tmp_path / "apStar-dr17-other.fits", header, flux, err, bits))
    assert spectrum.obj_id == "2M00000000+0000000"


def test_one_dimensional_hdus_are_the_coadd(bulge: Path, tmp_path: Path) -> None:
    flux, err, bits, header = _raw_rows(bulge)
    path = _write(tmp_path / "apStar-1.3-apo25m-2M17335483-2753043.fits", header, flux, err, bits)
    with fits.open(path) as hdul:
        assert hdul[1].header["NAXIS"] == 1
    spectrum = read_apstar(path)
    np.testing.assert_array_equal(spectrum.flux, flux)
    np.testing.assert_array_equal(spectrum.bitmask, bits)
    assert spectrum.k_mag == pytest.approx(9.811, abs=1e-5)


def test_unsigned_16_bit_bitmask(bulge: Path, tmp_path: Path) -> None:
    """Bitmasks stored as BITPIX 16 with BZERO 32768 (uint16) come back as int64 values."""
    flux, err, bits, header = _raw_rows(bulge)
    path = _write(tmp_path / "u16.fits", header, flux, err, bits.astype(np.uint16))
    with fits.open(path, do_not_scale_image_data=True) as hdul:
        assert hdul[3].header["BITPIX"] == 16 and hdul[3].header["BZERO"] == 32768
    np.testing.assert_array_equal(read_apstar(path).bitmask, bits)


def test_header_sentinels_and_junk_are_missing(bulge: Path, tmp_path: Path) -> None:
    flux, err, bits, header = _raw_rows(bulge)
    header["K"] = -9999.99
    header["SFD_EBV"] = "n/a"
    header["SNR"] = "NaN"  # FITS headers cannot hold a float NaN; a string is what one finds
    del header["NVISITS"]
    spectrum = read_apstar(_write(tmp_path / "s.fits", header, flux, err, bits))
    assert spectrum.k_mag is None and spectrum.ebv is None
    assert spectrum.snr is None and spectrum.nvisits is None


def test_only_hdus_1_to_3_are_read(bulge: Path, tmp_path: Path) -> None:
    """Garbage after HDU3 (sky, telluric, LSF, tables) does not matter: it is never parsed."""
    with fits.open(bulge) as hdul:
        end_of_hdu3 = hdul[4].fileinfo()["hdrLoc"]
    raw = bytearray(bulge.read_bytes())
    raw[end_of_hdu3:] = b"\x00garbage" * ((len(raw) - end_of_hdu3) // 8)
    path = tmp_path / BULGE
    path.write_bytes(bytes(raw[: len(raw) // 8 * 8]))
    _assert_spectrum_matches_raw(read_apstar(path), bulge)


# --- bad inputs ---------------------------------------------------------------------------------


def _cut(source: Path, dest: Path, size: int) -> Path:
    dest.write_bytes(source.read_bytes()[:size])
    return dest


def _hdu_offsets(path: Path) -> list[dict]:
    with fits.open(path) as hdul:
        return [hdu.fileinfo() for hdu in hdul]


def _bad_files(bulge: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a damaged copy of the bulge star's file, a phrase its reason must contain)."""
    flux, err, bits, header = _raw_rows(bulge)
    offsets = _hdu_offsets(bulge)
    raw = bulge.read_bytes()
    empty = tmp / "empty.fits"
    empty.touch()
    text = tmp / "notes.fits"
    text.write_text("SIMPLE? no: this is a text file that happens to be named .fits\n" * 60)
    corrupt = bytearray(raw)
    corrupt[offsets[1]["hdrLoc"] : offsets[1]["hdrLoc"] + 2880] = b"\xff" * 2880  # HDU1 header
    (tmp / "corrupt.fits").write_bytes(bytes(corrupt))
    all_nan = np.full_like(flux, np.nan)
    cases = {
        "missing": (tmp / "does-not-exist.fits", "file not found"),
        "zero-byte": (empty, "empty file (0 bytes)"),
        "text named .fits": (text, "not a FITS file"),
        "cut in primary header": (_cut(bulge, tmp / "cut0.fits", 5000), "primary header"),
        "cut in HDU1 data": (
            _cut(bulge, tmp / "cut1.fits", offsets[1]["datLoc"] + 1000),
            "truncated file: HDU1 (flux)",
        ),
        "cut in HDU2 header": (
            _cut(bulge, tmp / "cut2h.fits", offsets[2]["hdrLoc"] + 1000),
            "truncated file: no HDU2 (flux error)",
        ),
        "cut in HDU3 data": (
            _cut(bulge, tmp / "cut3.fits", offsets[3]["datLoc"] + 100_001),
            "truncated file: HDU3 (pixel bitmask)",
        ),
        "cut at a block boundary in HDU2's row 0": (
            _cut(bulge, tmp / "cut2b.fits", offsets[2]["datLoc"] + 2880 * 10),
            "truncated or corrupt data in HDU2 (flux error): the file ends inside it",
        ),
        "gzip stream cut": (_gzip_cut(raw, tmp / "cut.fits.gz"), "truncated gzip stream"),
        "gzip of a cut file": (
            _gzip_bytes(raw[: offsets[2]["datLoc"] + 1000], tmp / "cutinside.fits.gz"),
            "truncated or corrupt data in HDU2 (flux error): the file ends inside it",
        ),
        "corrupt HDU1 header": (
            tmp / "corrupt.fits", "HDU1 (flux) has a corrupt or non-standard header"
        ),
        "primary only": (
            _write(tmp / "primary.fits", header),
            "no HDU1 (flux): the file has only the primary HDU",
        ),
        "no error HDU": (_write(tmp / "noerr.fits", header, flux), "no HDU2 (flux error)"),
        "no bitmask HDU": (
            _write(tmp / "nobits.fits", header, flux, err), "no HDU3 (pixel bitmask)"
        ),
        "8000 pixels": (
            _write(tmp / "short.fits", header, flux[:8000], err[:8000], bits[:8000]),
            "HDU1 (flux) has 8000 pixels per spectrum; apStar spectra have 8575",
        ),
        "all-NaN flux": (
            _write(tmp / "nan.fits", header, all_nan, err, bits), "NaN/inf at every pixel"
        ),
        "all-zero flux": (
            _write(tmp / "zero.fits", header, np.zeros_like(flux), err, bits),
            "zero at every pixel",
        ),
        "float bitmask": (
            _write(tmp / "fbits.fits", header, flux, err, bits.astype(np.float32)),
            "expected integers",
        ),
        "empty flux HDU": (
            _write(tmp / "nodata.fits", header, None, err, bits), "HDU1 (flux) holds no data"
        ),
        "directory": (tmp, "is a directory"),
    }
    return cases


def _gzip_bytes(data: bytes, dest: Path) -> Path:
    dest.write_bytes(gzip.compress(data))
    return dest


def _gzip_cut(data: bytes, dest: Path) -> Path:
    packed = gzip.compress(data)
    dest.write_bytes(packed[: len(packed) // 4])  # the stream ends inside HDU1/HDU2
    return dest


BAD_CASES = [
    "missing", "zero-byte", "text named .fits", "cut in primary header", "cut in HDU1 data",
    "cut in HDU2 header", "cut in HDU3 data", "cut at a block boundary in HDU2's row 0",
    "gzip stream cut", "gzip of a cut file", "corrupt HDU1 header", "primary only", "no error HDU",
    "no bitmask HDU", "8000 pixels", "all-NaN flux", "all-zero flux", "float bitmask",
    "empty flux HDU", "directory",
]


@pytest.fixture(scope="module")
def bad_files(bulge: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _bad_files(bulge, tmp_path_factory.mktemp("bad"))


# astropy warns on damaged files (truncation, thousands of junk cards in a corrupt header)
@pytest.mark.filterwarnings("ignore::astropy.utils.exceptions.AstropyUserWarning")
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_spectrum_error_with_reason(bad_files: dict, case: str) -> None:
    path, phrase = bad_files[case]
    with pytest.raises(SpectrumError) as info:
        read_apstar(path)
    error = info.value
    assert phrase in error.reason, error.reason
    assert error.path == str(path)
    assert str(error) == f"{path}: {error.reason}"


def test_all_bad_cases_are_covered(bad_files: dict[str, tuple[Path, str]]) -> None:
    assert sorted(bad_files) == sorted(BAD_CASES)


def test_missing_file_keeps_the_os_error_as_cause(tmp_path: Path) -> None:
    with pytest.raises(SpectrumError) as info:
        read_apstar(tmp_path / "nope.fits")
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_spectrum_error_pickles() -> None:
    error = pickle.loads(pickle.dumps(SpectrumError("/data/x.fits", "empty file (0 bytes)")))
    assert (error.path, error.reason, str(error)) == (
        "/data/x.fits", "empty file (0 bytes)", "/data/x.fits: empty file (0 bytes)")


def test_a_file_cut_after_hdu3_still_gives_its_complete_coadd(bulge: Path, tmp_path: Path) -> None:
    """Documented behaviour: HDU4+ are never read, so a cut after HDU3 does not matter."""
    end_of_hdu3 = _hdu_offsets(bulge)[4]["hdrLoc"]
    path = _cut(bulge, tmp_path / BULGE, end_of_hdu3)
    _assert_spectrum_matches_raw(read_apstar(path), bulge)
