"""astronn_dist.worker.science.pipeline.process_batch on the real apStar files, with a real (randomly initialized)
network carrying the real astroNN DR17 normalization constants."""

from __future__ import annotations

import errno
import gzip
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import torch

import astronn_dist.worker.science.pipeline as pipeline  # noqa: E402
from _service import bad_spectrum_files  # noqa: E402 (tests/ is on sys.path)
from _data import astronn_parameters  # noqa: E402
from astronn_dist.worker import PIPELINE_VERSION  # noqa: E402
from astronn_dist.worker.science.distance import (  # noqa: E402
    FLAG_MISSING_EXTINCTION,
    FLAG_MISSING_PHOTOMETRY,
    FLAG_NO_RESULT,
)
from astronn_dist.worker.science.inference import Predictor  # noqa: E402
from astronn_dist.worker.science.model import ApogeeDistBCNN, load_model, save_checkpoint  # noqa: E402
from astronn_dist.worker.science.pipeline import ResultRecord, SpectrumRequest, process_batch  # noqa: E402
from astronn_dist.worker.science.spectra import SpectrumError, read_apstar  # noqa: E402

BULGE = "apStar-dr17-2M17335483-2753043.fits"  # header K 9.811, SFD_EBV -9999.99 (missing)
KEPLER = "apStar-dr17-2M19485057+5005279.fits"  # header K 10.522, SFD_EBV 0.1927
MC_PASSES = 20  # statistics do not matter here, speed does
BAD_MASK = 1 | 2 | 2048


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights (fixed seed) + the real input_mean and labels_std, saved as a checkpoint."""
    params = astronn_parameters()
    torch.manual_seed(1234)
    net = ApogeeDistBCNN()
    state = net.state_dict()
    state["input_mean"] = torch.tensor(params["input_mean"]["input"], dtype=torch.float64)
    state["labels_std"] = torch.tensor(params["labels_std"]["output"], dtype=torch.float64)
    net.load_state_dict(state)
    return save_checkpoint(net, tmp_path_factory.mktemp("model") / "random-dr17.pt")


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    return Predictor(load_model(checkpoint), mc_passes=MC_PASSES, seed=0)


@pytest.fixture(scope="module")
def real(sample_dir: Path) -> dict[str, str]:
    return {name: str(sample_dir / name) for name in (BULGE, KEPLER)}


def _req(path: str, sid: str | None = None, **photometry: float | None) -> SpectrumRequest:
    return SpectrumRequest(spectrum_id=sid or Path(path).name, path=path, **photometry)


def _numbers(r: ResultRecord) -> tuple:
    return (r.k_mag, r.ebv, r.a_k_mag, r.L_fakemag, r.L_fakemag_err, r.dist, r.dist_err,
            r.result_flags)


# ---------------------------------------------------------------------------------------------
# Bad inputs, each built from scratch or from a real file.


@pytest.mark.filterwarnings("ignore:File may have been truncated")
def test_bad_inputs_give_no_result_records_and_the_batch_goes_on(
    tmp_path: Path, real: dict[str, str], predictor: Predictor
) -> None:
    bad = bad_spectrum_files(tmp_path, real[KEPLER])
    for name, path in bad.items():  # the reader itself refuses every one of them
        with pytest.raises(SpectrumError):
            read_apstar(path)
    requests = [_req(real[BULGE], "good-bulge")]
    requests += [_req(path, f"bad-{name}") for name, path in bad.items()]
    requests += [_req(real[KEPLER], "good-kepler")]

    records = process_batch(requests, predictor)

    assert [r.spectrum_id for r in records] == [q.spectrum_id for q in requests]
    for record, request in zip(records, requests):
        assert record.path == request.path
        assert record.model_id == predictor.model_id
        assert record.pipeline_version == PIPELINE_VERSION
        assert record.mc_passes == MC_PASSES and record.seed == 0
        assert record.t_elapsed > 0 and math.isfinite(record.t_elapsed)
        if request.spectrum_id.startswith("bad-"):
            assert record.result_flags == FLAG_NO_RESULT, request.spectrum_id
            assert record.flag_bad and not record.flag_warn
            assert isinstance(record.error, str) and len(record.error) > 5, request.spectrum_id
            assert "Traceback" not in record.error
            assert all(math.isnan(x) for x in _numbers(record)[:-1])
            row = record.as_row()
            assert row["dist"] is None and row["L_fakemag"] is None and row["error"]
        else:
            assert record.error is None
            assert not record.result_flags & FLAG_NO_RESULT
            assert math.isfinite(record.L_fakemag) and math.isfinite(record.L_fakemag_err)
            assert record.L_fakemag > 0  # softplus output times labels_std
    missing = records[[q.spectrum_id for q in requests].index("bad-missing-file")]
    assert "exist" in missing.error.lower() or "not found" in missing.error.lower()


def test_bulge_star_missing_extinction_is_a_warning_not_bad(
    real: dict[str, str], predictor: Predictor
) -> None:
    """The real bulge star has SFD_EBV = -9999.99 in its header and no catalog E(B-V)."""
    (record,) = process_batch([_req(real[BULGE])], predictor)
    assert record.result_flags & FLAG_MISSING_EXTINCTION
    assert record.flag_warn
    # Missing extinction alone never makes a result bad: only bits 0, 1, 11 do (bit 0 may be set
    # by the random network's uncertainty, bit 1 must not be: the header has K).
    assert record.flag_bad == bool(record.result_flags & BAD_MASK)
    assert not record.result_flags & (FLAG_MISSING_PHOTOMETRY | FLAG_NO_RESULT)
    assert record.ebv == 0.0 and record.a_k_mag == 0.0
    assert record.k_mag == pytest.approx(9.811, abs=1e-5)
    expected = 1000 * 10 ** (0.2 * record.k_mag) / record.L_fakemag
    assert record.dist == pytest.approx(expected, rel=1e-12)
    # With a catalog E(B-V) the warning goes away and the star moves closer.
    (with_ebv,) = process_batch([_req(real[BULGE], ebv=1.5)], predictor)
    assert not with_ebv.result_flags & FLAG_MISSING_EXTINCTION and not with_ebv.flag_warn
    assert with_ebv.a_k_mag == pytest.approx(0.3517 * 1.5)
    assert with_ebv.dist < record.dist


def test_header_fallback_versus_catalog_value(real: dict[str, str], predictor: Predictor) -> None:
    # One spectrum_id for the Kepler star: its dropout masks, so its fakemag, are then the same
    # in every record and the distances differ by photometry alone. Records come back in order.
    kid = "kepler"
    requests = [
        _req(real[KEPLER], kid),                                   # None: header K and SFD_EBV
        _req(real[KEPLER], kid, k_mag=math.nan, ebv=math.nan),     # NaN: header too
        _req(real[KEPLER], kid, k_mag=-9999.99, ebv=-9999.99),     # missing: header too
        _req(real[KEPLER], kid, k_mag=11.0, ebv=0.3),              # catalog wins
        _req(real[KEPLER], kid, k_mag=12.0),                       # catalog Ks, header E(B-V)
        _req(real[BULGE], "bulge", ebv=None),                      # no E(B-V) anywhere
    ]
    header, nan, sentinel, catalog, mixed, neither = process_batch(requests, predictor)
    h_k, h_ebv = 10.52200031280518, 0.192664697766304  # the header's values (float32 in FITS)
    for r in (header, nan, sentinel):
        assert r.k_mag == pytest.approx(h_k, abs=1e-6)
        assert r.ebv == pytest.approx(h_ebv, abs=1e-6)
        assert r.result_flags & ~1 == 0
    assert (catalog.k_mag, catalog.ebv) == (11.0, 0.3)
    assert mixed.k_mag == 12.0 and mixed.ebv == pytest.approx(h_ebv, abs=1e-6)
    assert neither.result_flags & FLAG_MISSING_EXTINCTION
    assert catalog.L_fakemag == header.L_fakemag
    ratio = 10 ** (0.2 * ((11.0 - 0.3517 * 0.3) - (header.k_mag - header.a_k_mag)))
    assert catalog.dist / header.dist == pytest.approx(ratio, rel=1e-12)


def test_gzipped_file_is_processed_like_the_plain_one(
    tmp_path: Path, real: dict[str, str], predictor: Predictor
) -> None:
    gz = tmp_path / (KEPLER + ".gz")
    with open(real[KEPLER], "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    plain, zipped = process_batch(
        [_req(real[KEPLER], "star"), _req(str(gz), "star")], predictor
    )
    assert zipped.error is None and not zipped.result_flags & FLAG_NO_RESULT
    assert _numbers(zipped) == _numbers(plain)


def test_same_spectrum_same_numbers_in_any_batch(
    tmp_path: Path, real: dict[str, str], predictor: Predictor
) -> None:
    alone = process_batch([_req(real[KEPLER], "kepler")], predictor)[0]
    missing = str(tmp_path / "nope.fits")
    mixed = process_batch(
        [_req(real[BULGE], "bulge"), _req(missing, "gone"), _req(real[KEPLER], "kepler")],
        predictor,
    )
    again = process_batch([_req(real[KEPLER], "kepler"), _req(real[BULGE], "bulge")], predictor)
    np.testing.assert_array_equal(_numbers(mixed[2]), _numbers(alone))
    np.testing.assert_array_equal(_numbers(again[0]), _numbers(alone))
    np.testing.assert_array_equal(_numbers(again[1]), _numbers(mixed[0]))
    # A different identity draws different dropout masks (the seed is per spectrum_id).
    other = process_batch([_req(real[KEPLER], "kepler-under-another-id")], predictor)[0]
    assert other.L_fakemag != alone.L_fakemag


def test_one_normalize_and_one_predict_per_batch(
    monkeypatch: pytest.MonkeyPatch, real: dict[str, str], checkpoint: Path, tmp_path: Path
) -> None:
    calls: dict[str, list] = {"normalize": [], "predict": []}
    real_normalize = pipeline.normalize_flux

    def counting_normalize(flux, continuum_err, bitmask):  # the real function, counted
        calls["normalize"].append(flux.shape)
        return real_normalize(flux, continuum_err, bitmask)

    class CountingPredictor(Predictor):
        def predict(self, norm_flux, spectrum_ids):
            # the pipeline hands over the first layer, computed in its preparing thread
            calls["predict"].append((tuple(norm_flux.conv1_out.shape[:1]), list(spectrum_ids)))
            return super().predict(norm_flux, spectrum_ids)

    monkeypatch.setattr(pipeline, "normalize_flux", counting_normalize)
    counting = CountingPredictor(load_model(checkpoint), mc_passes=MC_PASSES, seed=0)
    requests = [_req(real[BULGE], "a"), _req(str(tmp_path / "missing.fits"), "b"),
                _req(real[KEPLER], "c"), _req(real[BULGE], "d")]
    records = process_batch(requests, counting)
    assert len(calls["normalize"]) == 1 and calls["normalize"][0] == (3, 8575)
    assert calls["predict"] == [((3,), ["a", "c", "d"])]
    assert [r.result_flags & FLAG_NO_RESULT for r in records] == [0, FLAG_NO_RESULT, 0, 0]

    # Nothing readable: no call at all, still one record per request.
    calls["normalize"].clear(), calls["predict"].clear()
    only_bad = process_batch([_req(str(tmp_path / "x.fits"), "x")], counting)
    assert calls == {"normalize": [], "predict": []}
    assert only_bad[0].result_flags == FLAG_NO_RESULT
    assert process_batch([], counting) == []


@pytest.mark.parametrize("kind", ["raw-eio", "wrapped-eio", "wrapped-memory"])
def test_transient_errors_propagate(
    monkeypatch: pytest.MonkeyPatch, real: dict[str, str], predictor: Predictor, kind: str
) -> None:
    """EIO on a network file system is not the file's fault: the batch must be retried.

    The real reader runs for every other path; one path fails as a dying disk would.
    """
    real_read = pipeline.read_apstar
    flaky = real[KEPLER] + ".flaky"

    def read(path: str):
        if path == flaky:
            cause = (MemoryError() if kind == "wrapped-memory"
                     else OSError(errno.EIO, "Input/output error", path))
            if kind == "raw-eio":
                raise cause
            raise SpectrumError(path, "I/O error while reading") from cause
        return real_read(path)

    monkeypatch.setattr(pipeline, "read_apstar", read)
    expected = MemoryError if kind == "wrapped-memory" else OSError
    with pytest.raises(expected) as info:
        process_batch([_req(real[BULGE]), _req(flaky)], predictor)
    assert not isinstance(info.value, SpectrumError)
    assert flaky in str(info.value)  # says which file
    if expected is OSError:
        assert info.value.errno == errno.EIO


def test_as_row_is_plain_python(real: dict[str, str], predictor: Predictor) -> None:
    (record,) = process_batch([_req(real[KEPLER], ebv=0.2)], predictor)
    row = record.as_row()
    assert set(row) == {
        "spectrum_id", "path", "model_id", "pipeline_version", "t_elapsed", "k_mag", "ebv",
        "a_k_mag", "L_fakemag", "L_fakemag_err", "dist", "dist_err", "result_flags",
        "flag_warn", "flag_bad", "error", "mc_passes", "seed", "device", "mask_rng",
    }
    assert (row["device"], row["mask_rng"]) == ("cpu", "numpy-SFC64")  # how it was computed
    for key, value in row.items():
        assert value is None or type(value) in (str, float, int, bool), (key, type(value))
    json.dumps(row)  # storable anywhere


def test_missing_ks_everywhere_is_bad(tmp_path: Path, real: dict[str, str],
                                      predictor: Predictor) -> None:
    """A header without K and no catalog Ks: flagged bad; a catalog Ks rescues it."""
    no_k = tmp_path / KEPLER
    with fits.open(real[KEPLER]) as hdul:
        del hdul[0].header["K"]
        hdul.writeto(no_k)
    bare, rescued, normal = process_batch(
        [_req(str(no_k), "kepler"), _req(str(no_k), "kepler", k_mag=10.522),
         _req(real[KEPLER], "kepler")],
        predictor,
    )
    assert bare.result_flags & FLAG_MISSING_PHOTOMETRY and bare.flag_bad
    assert bare.k_mag == 0.0 and bare.error is None  # computed with Ks = 0, and flagged
    assert not rescued.result_flags & FLAG_MISSING_PHOTOMETRY
    assert rescued.L_fakemag == normal.L_fakemag  # the header edit does not touch the spectrum
    assert rescued.dist == pytest.approx(normal.dist, rel=1e-6)  # header K is float32


def test_non_finite_network_output_is_a_no_result_record(
    tmp_path: Path, real: dict[str, str]
) -> None:
    """A real network whose float32 activations overflow (inf - inf = NaN) yields NaN fakemag."""
    torch.manual_seed(0)
    net = ApogeeDistBCNN()
    with torch.no_grad():
        net.dense_1.weight.fill_(1e30)
        net.dense_2.weight.copy_(torch.sign(torch.randn_like(net.dense_2.weight)) * 1e30)
    broken = Predictor(load_model(save_checkpoint(net, tmp_path / "overflow.pt")), mc_passes=5)
    (record,) = process_batch([_req(real[KEPLER])], broken)
    assert math.isnan(record.L_fakemag) and math.isnan(record.dist)
    # No result: the row keeps the photometry that was sent (none here), not the header's.
    assert math.isnan(record.k_mag) and math.isnan(record.ebv) and math.isnan(record.a_k_mag)
    (sent,) = process_batch([SpectrumRequest("s", real[KEPLER], k_mag=11.0, ebv=0.3)], broken)
    assert (sent.k_mag, sent.ebv) == (11.0, 0.3) and sent.result_flags & FLAG_NO_RESULT
    assert record.result_flags & FLAG_NO_RESULT and record.result_flags & 1
    assert record.flag_bad
    assert record.error == pipeline.NON_FINITE_PREDICTION
