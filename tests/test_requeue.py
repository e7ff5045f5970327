"""``requeue`` re-sends what was first sent: a failed row keeps the photometry of its message.

The flow of an operator: a catalog whose Ks and E(B-V) differ from the apStar header's is
produced, one file is missing, a real worker writes its no-result row; the file is repaired,
``requeue --failed`` sends it again and the worker computes the row from the catalog's values,
never the header's. A spectrum sent without catalog photometry is re-sent without it (the
header is read again).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from _service import Worker, build_checkpoint, rows, run_cli, wait_for, worker_env  # tests/ is on sys.path
from test_producer import queued_messages
from astronn_dist.worker.science.distance import FLAG_MISSING_EXTINCTION, FLAG_NO_RESULT

KEPLER = "apStar-dr17-2M19485057+5005279.fits"  # header K 10.522, SFD_EBV 0.1927
BULGE = "apStar-dr17-2M17335483-2753043.fits"  # header K 9.811, SFD_EBV missing
CATALOG_K, CATALOG_EBV = 11.0, 0.3  # not the header's


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    code, out, err = run_cli(capsys, *args)
    return code, out + err


def by_id(database_url: str) -> dict[str, dict]:
    return {r["spectrum_id"]: r for r in rows(database_url)}


def test_requeue_sends_the_catalog_photometry_again(
    capsys: pytest.CaptureFixture, redis_url: str, sqlite_url: str, sample_dir: Path,
    tmp_path: Path, workers: list[Worker],
) -> None:
    folder = tmp_path / "spectra"
    folder.mkdir()
    shutil.copy(sample_dir / BULGE, folder / BULGE)  # present; no catalog photometry
    catalog = tmp_path / "stars.csv"
    catalog.write_text(
        "path,spectrum_id,K,E_BV\n"
        f"spectra/{KEPLER},kepler,{CATALOG_K},{CATALOG_EBV}\n"  # the file is missing at first
        f"spectra/{BULGE},bulge,,\n"
        "spectra/gone.fits,gone,,\n"  # missing, and sent without photometry
    )
    model = build_checkpoint(tmp_path / "random-dr17.pt")
    common = ["--broker", redis_url, "--db", sqlite_url, "--model", str(model)]
    code, out = cli(capsys, "produce", "--catalog", str(catalog), *common)
    assert code == 0, out

    env = worker_env(redis_url=redis_url, database_url=sqlite_url, model=model,
                     ASTRONN_DIST_MC_PASSES=4)
    worker = Worker(env, tmp_path / "worker.log", name="requeue")
    workers.append(worker)
    worker.wait_ready()
    wait_for(lambda: len(rows(sqlite_url)) == 3, 60, "3 rows", worker)

    first = by_id(sqlite_url)
    failed = first["kepler"]
    assert failed["result_flags"] == FLAG_NO_RESULT and failed["error"]
    assert (failed["k_mag"], failed["ebv"]) == (CATALOG_K, CATALOG_EBV)  # as sent
    assert failed["a_k_mag"] is None and failed["dist"] is None
    assert (first["gone"]["k_mag"], first["gone"]["ebv"]) == (None, None)  # none was sent

    # The operator repairs the file, then requeues what failed.
    shutil.copy(sample_dir / KEPLER, folder / KEPLER)
    code, out = cli(capsys, "requeue", "--failed", *common)
    assert code == 0 and "requeued 2 spectra" in out, out
    wait_for(lambda: by_id(sqlite_url)["kepler"]["dist"] is not None, 60, "the requeued row", worker)
    wait_for(lambda: by_id(sqlite_url)["gone"]["created"] > first["gone"]["created"], 60,
             "the requeued missing file's row", worker)

    done = by_id(sqlite_url)["kepler"]
    assert done["result_flags"] & FLAG_NO_RESULT == 0
    assert (done["k_mag"], done["ebv"]) == (CATALOG_K, CATALOG_EBV)  # the catalog's, not 10.522
    assert done["a_k_mag"] == pytest.approx(0.3517 * CATALOG_EBV)
    gone = by_id(sqlite_url)["gone"]
    assert gone["result_flags"] == FLAG_NO_RESULT and (gone["k_mag"], gone["ebv"]) == (None, None)
    # The bulge star was computed from its header all along (SFD_EBV missing there).
    bulge = by_id(sqlite_url)["bulge"]
    assert bulge["k_mag"] == pytest.approx(9.811) and bulge["result_flags"] & FLAG_MISSING_EXTINCTION


def test_requeued_message_carries_the_first_inputs(
    capsys: pytest.CaptureFixture, redis_url: str, sqlite_url: str, tmp_path: Path,
) -> None:
    """What goes on the queue: exactly the photometry of the first message, None where it had
    none (so the worker falls back to the header then, and only then)."""
    from astronn_dist.worker.science.inference import Predictor
    from astronn_dist.worker.science.model import load_model
    from astronn_dist.worker.contract import SpectrumRequest
    from astronn_dist.worker.service.results import make_engine, migrate
    from astronn_dist.worker.service.chunks import process_chunk

    model = build_checkpoint(tmp_path / "random-dr17.pt")
    engine = make_engine(sqlite_url)
    migrate(engine)
    sent = [
        SpectrumRequest("a", str(tmp_path / "a.fits"), k_mag=CATALOG_K, ebv=CATALOG_EBV),
        SpectrumRequest("b", str(tmp_path / "b.fits"), k_mag=12.25, ebv=None),
        SpectrumRequest("c", str(tmp_path / "c.fits")),
        SpectrumRequest("d", str(tmp_path / "d.fits"), k_mag=99.0, ebv=-1.0),  # sentinels, as given
    ]
    predictor = Predictor(load_model(model), mc_passes=2, seed=0, threads=1)
    process_chunk(sent, predictor=predictor, engine=engine, task_id="t", attempts=1, host="h")
    engine.dispose()

    code, out = cli(capsys, "requeue", "--failed", "--broker", redis_url, "--db", sqlite_url,
                    "--model", str(model))
    assert code == 0, out
    (message,) = queued_messages(redis_url)
    assert message["kwargs"]["spectra"] == [
        {"spectrum_id": r.spectrum_id, "path": r.path, "k_mag": r.k_mag, "ebv": r.ebv} for r in sent
    ]
