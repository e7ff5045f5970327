"""astronn_dist.producer.catalog: catalogs in three formats with column aliases, and file/folder/glob expansion."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.table import MaskedColumn, Table

from astronn_dist.producer.catalog import (
    CatalogError,
    find_spectra,
    gather,
    gather_blocks,
    iter_catalog,
    open_catalog,
    read_catalog,
    scan_spectra,
)
from astronn_dist.worker.contract import SpectrumRequest

from _catalogs import write_catalog  # tests/ is on sys.path


def _tree(root: Path, apstar_files: list[Path]) -> dict[str, Path]:
    """A small survey tree: real apStar files (symlinked), a gzipped one, and decoys."""
    a, b = apstar_files
    files = {
        "apo25m/f1/" + a.name: a,
        "apo25m/f2/deeper/" + b.name: b,
    }
    for rel, src in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(src)
    gz = root / "lco25m" / "asStar-dr17-2M00000000+0000000.fits.gz"
    gz.parent.mkdir(parents=True)
    with gzip.open(gz, "wb") as fh:
        fh.write(a.read_bytes()[:2880])
    files["lco25m/" + gz.name] = gz
    # Not spectra: a catalog, a visit file, an rsync temporary copy, a hidden folder.
    (root / "catalog.csv").write_text("path\n")
    (root / "apo25m" / "f1" / "apVisit-dr17-1.fits").write_bytes(b"x")
    (root / "apo25m" / "f1" / ".apStar-dr17-2M1.fits.Xk3j").write_bytes(b"x")
    (root / ".snapshot").mkdir()
    (root / ".snapshot" / a.name).symlink_to(a)
    return files


def test_csv_with_aliases_missing_values_and_text_ids(tmp_path: Path, apstar_files: list[Path]):
    a, b = apstar_files
    folder = tmp_path / "survey"
    folder.mkdir()
    shutil.copy(a, folder / a.name)
    catalog = folder / "stars.csv"
    catalog.write_text(
        "SPECTRUM_ID,Path,K,E_BV,teff\n"
        f"00123,{a.name},9.811,,4500\n"
        f",{b},NaN,0.1927,5000\n"  # absolute path, empty id, NaN Ks
        f"x,sub/../{a.name},  ,0.05,4800\n"
    )
    requests = read_catalog(catalog)
    assert requests == [
        SpectrumRequest("00123", str(folder / a.name), 9.811, None),  # leading zeros kept
        SpectrumRequest(str(b), str(b), None, 0.1927),  # id defaults to the path as written
        SpectrumRequest("x", str(folder / a.name), None, 0.05),  # normalized, blank -> None
    ]


@pytest.mark.parametrize("k_name, ebv_name", [("ks_m", "SFD_EBV"), ("KMAG", "ebv"), ("k_mag", "e_bv")])
def test_fits_table_with_aliases_and_masked_cells(tmp_path: Path, k_name: str, ebv_name: str):
    table = Table()
    table["PATH"] = ["a/apStar-1.fits", "apStar-2.fits", "/abs/apStar-3.fits"]
    table[k_name] = MaskedColumn([9.5, 99.0, np.nan], mask=[False, True, False])
    table[ebv_name] = np.array([0.1, 0.2, np.nan], dtype=np.float32)
    catalog = tmp_path / "stars.fits"
    table.write(catalog)
    requests = read_catalog(catalog)
    assert [r.path for r in requests] == [
        str(tmp_path / "a/apStar-1.fits"), str(tmp_path / "apStar-2.fits"), "/abs/apStar-3.fits"
    ]
    assert [r.spectrum_id for r in requests] == ["a/apStar-1.fits", "apStar-2.fits", "/abs/apStar-3.fits"]
    assert [r.k_mag for r in requests] == [9.5, None, None]  # masked and NaN -> None
    assert requests[0].ebv == pytest.approx(0.1) and requests[1].ebv == pytest.approx(0.2)
    assert requests[2].ebv is None


def test_parquet_with_nulls_and_numeric_ids(tmp_path: Path):
    table = pa.table(
        {
            "spectrum_id": pa.array([17, 18, 19], pa.int64()),
            "path": ["apStar-a.fits", "apStar-b.fits", "apStar-c.fits"],
            "kmag": pa.array([10.0, None, 11.5], pa.float32()),
            "SFD_EBV": pa.array([None, 0.3, float("nan")]),
            "unused": ["x", "y", "z"],
        }
    )
    catalog = tmp_path / "stars.parquet"
    pq.write_table(table, catalog)
    requests = read_catalog(catalog)
    assert [r.spectrum_id for r in requests] == ["17", "18", "19"]
    assert [r.k_mag for r in requests] == [10.0, None, 11.5]
    assert [r.ebv for r in requests] == [None, 0.3, None]


def test_catalog_errors_say_what_to_do(tmp_path: Path):
    with pytest.raises(CatalogError, match="catalog not found"):
        read_catalog(tmp_path / "nope.csv")
    (tmp_path / "stars.txt").write_text("path\nx\n")
    with pytest.raises(CatalogError, match=r"unknown catalog format '\.txt'.*\.csv, \.fits or \.parquet"):
        read_catalog(tmp_path / "stars.txt")
    (tmp_path / "nopath.csv").write_text("file,K\napStar-1.fits,9\n")
    with pytest.raises(CatalogError, match=r"no 'path' column \(columns: file, K\)"):
        read_catalog(tmp_path / "nopath.csv")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(CatalogError, match="cannot read this .parquet catalog"):
        read_catalog(tmp_path / "broken.parquet")
    (tmp_path / "text.csv").write_text("path,k_mag\napStar-1.fits,bright\n")
    with pytest.raises(CatalogError, match="column 'k_mag' is not numeric.*'bright'"):
        read_catalog(tmp_path / "text.csv")
    (tmp_path / "empty.csv").write_text("path,k_mag\napStar-1.fits,9\n,10\n")
    with pytest.raises(CatalogError, match="row 2 has an empty 'path'"):
        read_catalog(tmp_path / "empty.csv")
    from astropy.io import fits

    fits.PrimaryHDU(np.zeros(3)).writeto(tmp_path / "image.fits", overwrite=True)
    with pytest.raises(CatalogError, match="image.fits"):
        read_catalog(tmp_path / "image.fits")


def test_duplicate_ids(tmp_path: Path):
    (tmp_path / "dups.csv").write_text("path,spectrum_id,k_mag\na.fits,s1,9\na.fits,s1,9\nb.fits,s2,\n")
    assert [r.spectrum_id for r in read_catalog(tmp_path / "dups.csv")] == ["s1", "s2"]
    (tmp_path / "clash.csv").write_text("path,spectrum_id\na.fits,s1\nb.fits,s1\n")
    with pytest.raises(CatalogError, match="'s1' is used by rows 1 and 2"):
        read_catalog(tmp_path / "clash.csv")


def test_folder_glob_and_file_expansion(tmp_path: Path, apstar_files: list[Path]):
    files = _tree(tmp_path, apstar_files)
    found = find_spectra([tmp_path])
    assert sorted(r.spectrum_id for r in found) == sorted(files)
    assert all(r.k_mag is None and r.ebv is None for r in found)
    assert {r.path for r in found} == {str(tmp_path / rel) for rel in files}

    # A glob: ids relative to its fixed part; ** recurses.
    pattern = str(tmp_path / "apo25m" / "**" / "apStar-*.fits")
    assert sorted(r.spectrum_id for r in find_spectra([pattern])) == sorted(
        rel.removeprefix("apo25m/") for rel in files if rel.startswith("apo25m/")
    )
    # A file named directly: its name; the same file twice is one request.
    one = tmp_path / next(iter(files))
    assert find_spectra([one, one]) == [SpectrumRequest(one.name, str(one))]
    # Relative arguments become absolute paths.
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "apo25m")
        assert {r.path for r in find_spectra(["f1"])} == {str(tmp_path / "apo25m/f1" / apstar_files[0].name)}
    finally:
        os.chdir(cwd)

    with pytest.raises(CatalogError, match="no such file or folder"):
        find_spectra([tmp_path / "missing"])
    with pytest.raises(CatalogError, match="no file matches"):
        find_spectra([str(tmp_path / "*.nothing")])


def test_scan_reports_size_and_mtime(tmp_path: Path, apstar_files: list[Path]):
    _tree(tmp_path, apstar_files)
    scanned = {f.spectrum_id: f for f in scan_spectra(tmp_path)}
    a = apstar_files[0]
    entry = scanned["apo25m/f1/" + a.name]
    assert entry.size == a.stat().st_size and entry.mtime_ns == a.stat().st_mtime_ns


def test_real_files_and_gather(tmp_path: Path, apstar_files: list[Path], sample_dir: Path):
    found = find_spectra([sample_dir])
    assert [r.spectrum_id for r in found] == [p.name for p in apstar_files]
    assert [r.path for r in found] == [str(p) for p in apstar_files]

    # A catalog row and the same file among the paths: the catalog's row wins, once.
    a = apstar_files[0]
    catalog = tmp_path / "one.csv"
    catalog.write_text(f"path,spectrum_id,K,E_BV\n{a},star-a,9.811,0.5\n")
    requests = gather([sample_dir], catalog)
    assert requests[0] == SpectrumRequest("star-a", str(a), 9.811, 0.5)
    assert [r.spectrum_id for r in requests[1:]] == [apstar_files[1].name]
    with pytest.raises(CatalogError, match="nothing to process"):
        gather([], None)


# ------------------------------------------------------------------------------------------
# Block by block: the same requests as the whole file, in bounded memory.

FORMATS = ["csv", "csv.gz", "parquet", "fits"]


def _flat(blocks) -> list[SpectrumRequest]:
    return [request for block in blocks for request in block]


@pytest.mark.parametrize("fmt", FORMATS)
def test_blocks_equal_the_whole_file(tmp_path: Path, fmt: str):
    """Aliases, empty and NaN cells, non-ASCII ids, an exact repeat across a block boundary and
    one written differently (``./b/../x`` and ``x``): three rows per block."""
    catalog = write_catalog(fmt, tmp_path / "stars", {
        "Path": ["a/apStar-1.fits", "apStar-2.fits", "/abs/apStar-3.fits", "a/apStar-1.fits",
                 "./b/../apStar-5.fits", "apStar-5.fits", "c/apStar-7.fits"],
        "SPECTRUM_ID": ["00123", "étoile-β", None, "00123", "s5", "s5", "日本"],
        "ks_m": [9.5, float("nan"), None, 9.5, 10.25, 10.25, 11.0],
        "E_BV": [None, 0.1, float("nan"), None, 0.3, 0.3, 0.2],
    })
    expected = [
        SpectrumRequest("00123", str(tmp_path / "a/apStar-1.fits"), 9.5, None),
        SpectrumRequest("étoile-β", str(tmp_path / "apStar-2.fits"), None, 0.1),
        SpectrumRequest("/abs/apStar-3.fits", "/abs/apStar-3.fits", None, None),
        SpectrumRequest("s5", str(tmp_path / "apStar-5.fits"), 10.25, 0.3),
        SpectrumRequest("日本", str(tmp_path / "c/apStar-7.fits"), 11.0, 0.2),
    ]
    blocks = list(iter_catalog(catalog, block_rows=3))
    assert [len(b) for b in blocks] == [3, 1, 1]  # rows 4 and 6 (repeats) left out of block 2
    assert _flat(blocks) == expected
    assert read_catalog(catalog) == expected
    assert _flat(iter_catalog(catalog, block_rows=1)) == expected
    checked = open_catalog(catalog, block_rows=2)
    assert (checked.rows, checked.requests) == (7, 5)
    assert _flat(checked) == _flat(checked) == expected  # each iteration reads the file again


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_photometry_columns_mean_the_headers(tmp_path: Path, fmt: str):
    catalog = write_catalog(fmt, tmp_path / "paths", {"path": ["apStar-1.fits", "apStar-2.fits", "apStar-3.fits"]})
    assert _flat(iter_catalog(catalog, block_rows=2)) == [
        SpectrumRequest(f"apStar-{i}.fits", str(tmp_path / f"apStar-{i}.fits")) for i in (1, 2, 3)
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_conflict_across_blocks_names_both_rows(tmp_path: Path, fmt: str):
    catalog = write_catalog(fmt, tmp_path / "clash", {
        "path": ["a.fits", "b.fits", "c.fits", "d.fits", "e.fits"],
        "spectrum_id": ["s1", "s2", "s3", "s4", "s2"],
        "k_mag": [9.0, 9.0, 9.0, 9.0, 9.0],
    })
    with pytest.raises(CatalogError, match=r"spectrum_id 's2' is used by rows 2 and 5 with different values"):
        open_catalog(catalog, block_rows=3)
    # The same id with the same file but other photometry is a conflict too.
    catalog = write_catalog(fmt, tmp_path / "photometry", {
        "path": ["a.fits", "b.fits", "c.fits", "a.fits"], "spectrum_id": ["s1", "s2", "s3", "s1"],
        "k_mag": [9.0, 9.0, 9.0, 9.5],
    })
    with pytest.raises(CatalogError, match=r"'s1' is used by rows 1 and 4"):
        read_catalog(catalog)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "fits"])
def test_errors_name_the_row_and_the_column(tmp_path: Path, fmt: str):
    catalog = write_catalog(fmt, tmp_path / "text", {
        "path": [f"apStar-{i}.fits" for i in range(1, 7)],
        "K": ["9.1", "9.2", "9.3", "9.4", "bright", "9.6"],
    })
    with pytest.raises(CatalogError, match=r"row 5, column 'K' is not numeric: .?'bright'"):
        read_catalog(catalog)
    catalog = write_catalog(fmt, tmp_path / "nopath", {
        "path": ["apStar-1.fits", "apStar-2.fits", "apStar-3.fits", None, "apStar-5.fits"],
        "K": [9.0, 9.0, 9.0, 9.0, 9.0],
    })
    with pytest.raises(CatalogError, match="row 4 has an empty 'path'"):
        open_catalog(catalog, block_rows=3)


def test_hash_collisions_are_told_apart(tmp_path: Path, monkeypatch):
    """Every id hashed alike: the closer look still keeps distinct ids apart, drops repeats and
    finds the conflict (the hashes only choose which rows to compare)."""
    import astronn_dist.producer.catalog as catalog_module

    monkeypatch.setattr(catalog_module, "_hashes", lambda texts: np.zeros(len(texts), dtype=np.uint64))
    catalog = write_catalog("csv", tmp_path / "same", {
        "path": ["a.fits", "b.fits", "a.fits", "c.fits"], "spectrum_id": ["s1", "s2", "s1", "s3"],
    })
    assert [r.spectrum_id for r in _flat(iter_catalog(catalog, block_rows=2))] == ["s1", "s2", "s3"]
    catalog = write_catalog("csv", tmp_path / "clash", {
        "path": ["a.fits", "b.fits", "c.fits"], "spectrum_id": ["s1", "s2", "s1"],
    })
    with pytest.raises(CatalogError, match="'s1' is used by rows 1 and 3"):
        open_catalog(catalog, block_rows=2)


def test_a_csv_column_that_changes_type_between_blocks(tmp_path: Path):
    """Numbers for the first megabytes (pyarrow's first block), then text and blanks: read as
    text, nothing to infer, nothing breaks; ids keep their leading zeros."""
    n = 60_000
    rows = [f"apStar-{i}.fits,{i:06d},9.5" for i in range(n)] + ["apStar-x.fits,star-x,  "]
    catalog = tmp_path / "long.csv"
    catalog.write_text("path,spectrum_id,k_mag\n" + "\n".join(rows) + "\n")
    assert catalog.stat().st_size > 1 << 20
    requests = _flat(iter_catalog(catalog, block_rows=25_000))
    assert len(requests) == n + 1
    assert requests[0].spectrum_id == "000000" and requests[-1] == SpectrumRequest(
        "star-x", str(tmp_path / "apStar-x.fits"), None, None
    )


def test_a_catalog_rewritten_between_the_passes(tmp_path: Path):
    catalog = tmp_path / "growing.csv"
    catalog.write_text("path\napStar-1.fits\n")
    checked = open_catalog(catalog)
    catalog.write_text("path\napStar-1.fits\napStar-2.fits\n")
    os.utime(catalog, ns=(catalog.stat().st_atime_ns, catalog.stat().st_mtime_ns + 10**9))
    with pytest.raises(CatalogError, match="changed while it was being read"):
        list(checked)


def test_gather_blocks_with_files(apstar_files: list[Path], sample_dir: Path, tmp_path: Path):
    a, b = apstar_files
    catalog = tmp_path / "one.csv"
    catalog.write_text(f"path,spectrum_id,K\n{a},star-a,9.811\n")
    requests = gather_blocks([sample_dir], catalog, block_rows=1)
    assert requests.total == 3  # the file in both counts twice here, is sent once
    assert list(requests) == [
        [SpectrumRequest("star-a", str(a), 9.811, None)], [SpectrumRequest(b.name, str(b))]
    ]
    assert _flat(requests) == gather([sample_dir], catalog)
