"""astronn_dist.producer.enqueue: chunked JSON messages on the real Redis queue, skipping what is done."""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from astronn_dist.producer.catalog import iter_catalog, read_catalog
from astronn_dist.producer.enqueue import (
    BrokerError,
    chunks,
    enqueue,
    mask_url,
    model_id_of,
    split_done,
)
from astronn_dist.worker.config import QUEUE, TASK_NAME, Settings
from astronn_dist.worker.contract import SpectrumRequest

REPO = Path(__file__).resolve().parents[1]


def queued_messages(redis_url: str) -> list[dict]:
    """The messages on the queue, oldest first, decoded from kombu's Redis envelope:
    ``{"headers", "properties", "content-type", "kwargs"}`` (Celery protocol v2 body)."""
    client = redis.Redis.from_url(redis_url)
    raw = client.lrange(QUEUE, 0, -1)[::-1]  # LPUSH on publish, BRPOP on consume
    client.close()
    out = []
    for item in raw:
        envelope = json.loads(item)
        assert envelope["properties"]["body_encoding"] == "base64"
        body = json.loads(base64.b64decode(envelope["body"]))
        args, kwargs, embed = body  # protocol v2: (args, kwargs, embed)
        assert args == [] and set(embed) >= {"callbacks", "errbacks", "chain", "chord"}
        out.append(
            {
                "headers": envelope["headers"],
                "properties": envelope["properties"],
                "content-type": envelope["content-type"],
                "kwargs": kwargs,
            }
        )
    return out


@pytest.fixture()
def model_file(tmp_path: Path) -> Path:
    """The producer only hashes the checkpoint: any bytes make a model id."""
    path = tmp_path / "demo-model.pt"
    path.write_bytes(b"not really a checkpoint, but a stable content hash")
    return path


@pytest.fixture()
def settings(redis_url: str, sqlite_url: str, model_file: Path) -> Settings:
    return Settings(broker_url=redis_url, database_url=sqlite_url, model_path=model_file)


def _catalog(tmp_path: Path, n: int) -> Path:
    rows = ["path,spectrum_id,K,SFD_EBV"]
    for i in range(n):
        k = "" if i % 3 == 0 else f"{9 + i / 100:.3f}"
        ebv = "NaN" if i % 4 == 0 else f"{0.01 * i:.3f}"
        rows.append(f"spectra/apStar-{i:05d}.fits,star-{i:05d},{k},{ebv}")
    path = tmp_path / "stars.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_model_id_without_torch_matches_the_worker(tmp_path: Path, model_file: Path):
    digest = __import__("hashlib").sha256(model_file.read_bytes()).hexdigest()
    assert model_id_of(model_file) == f"demo-model-{digest[:12]}"
    import astronn_dist.worker.science.model as model
    path = model.save_checkpoint(model.ApogeeDistBCNN(), tmp_path / "random.pt")
    assert model_id_of(path) == model.load_model(path).model_id


def test_messages_on_the_queue(tmp_path: Path, settings: Settings, redis_url: str):
    catalog = _catalog(tmp_path, 5)
    requests = read_catalog(catalog)
    report = enqueue(requests, settings, chunk_size=2, source=str(catalog))
    assert (report.found, report.skipped, report.enqueued, report.messages) == (5, 0, 5, 3)
    assert report.model_id == model_id_of(settings.model_path)

    messages = queued_messages(redis_url)
    assert len(messages) == 3
    sent = []
    for m in messages:
        assert m["content-type"] == "application/json"
        assert m["headers"]["task"] == TASK_NAME
        assert m["properties"]["delivery_info"]["routing_key"] == QUEUE
        assert set(m["kwargs"]) == {"spectra", "provenance"}
        assert m["kwargs"]["provenance"]["model_id"] == report.model_id
        assert m["kwargs"]["provenance"]["source"] == str(catalog)
        sent.append(m["kwargs"]["spectra"])
    assert [len(s) for s in sent] == [2, 2, 1]
    flat = [s for chunk in sent for s in chunk]
    # Each star keeps its own photometry; missing values are JSON null.
    assert flat == [
        {"spectrum_id": r.spectrum_id, "path": r.path, "k_mag": r.k_mag, "ebv": r.ebv} for r in requests
    ]
    assert flat[0] == {
        "spectrum_id": "star-00000",
        "path": str(tmp_path / "spectra/apStar-00000.fits"),
        "k_mag": None,
        "ebv": None,
    }
    assert flat[1]["k_mag"] == 9.01 and flat[1]["ebv"] == 0.01


def _write_rows(database_url: str, model_id: str, spectrum_ids: list[str]) -> None:
    """Rows as a worker leaves them (through the results module's own upsert)."""
    from astronn_dist.worker.service import results
    from astronn_dist.worker.science.pipeline import ResultRecord

    results.migrate(database_url)
    engine = results.make_engine(database_url)
    records = [
        ResultRecord(
            spectrum_id=s, path=f"/data/{s}.fits", model_id=model_id, pipeline_version="test",
            t_elapsed=0.1, k_mag=9.0, ebv=0.1, a_k_mag=0.035, L_fakemag=100.0, L_fakemag_err=5.0,
            dist=1000.0, dist_err=50.0, result_flags=0, flag_warn=False, flag_bad=False,
            error=None, mc_passes=10, seed=0, device="cpu", mask_rng="numpy-SFC64",
        )
        for s in spectrum_ids
    ]
    with engine.begin() as conn:
        results.upsert_results(conn, records, task_id="test", attempts=1, host="test")
    engine.dispose()


def test_skip_done_and_force(tmp_path: Path, settings: Settings, redis_url: str):
    requests = read_catalog(_catalog(tmp_path, 6))
    model_id = model_id_of(settings.model_path)
    _write_rows(settings.database_url, model_id, ["star-00001", "star-00004"])
    _write_rows(settings.database_url, "another-model-0123456789ab", ["star-00002"])

    report = enqueue(requests, settings, chunk_size=10)
    assert (report.found, report.skipped, report.enqueued, report.messages) == (6, 2, 4, 1)
    ids = [s["spectrum_id"] for s in queued_messages(redis_url)[0]["kwargs"]["spectra"]]
    assert ids == ["star-00000", "star-00002", "star-00003", "star-00005"]

    report = enqueue(requests, settings, chunk_size=10, force=True)
    assert (report.skipped, report.enqueued) == (0, 6)
    assert len(queued_messages(redis_url)) == 2


def test_no_results_table_means_nothing_done(settings: Settings):
    from astronn_dist.worker.service.results import make_engine

    engine = make_engine(settings.database_url)
    requests = [SpectrumRequest("a", "/x/a.fits"), SpectrumRequest("b", "/x/b.fits")]
    assert split_done(requests, engine, "m-000000000000") == (requests, [])
    engine.dispose()


def test_unreachable_broker_is_a_clear_error(settings: Settings):
    bad = dataclasses.replace(settings, broker_url="redis://:hunter2@127.0.0.1:1/0")
    t0 = time.perf_counter()
    with pytest.raises(BrokerError, match=r"cannot reach the broker at redis://:\*\*\*@127\.0\.0\.1:1/0") as info:
        enqueue([SpectrumRequest("a", "/x/a.fits")], bad, force=True)
    assert "hunter2" not in str(info.value)
    assert time.perf_counter() - t0 < 30


def test_chunks_and_mask_url():
    requests = [SpectrumRequest(str(i), f"/{i}") for i in range(5)]
    assert [len(c) for c in chunks(requests, 2)] == [2, 2, 1]
    with pytest.raises(ValueError, match="between 1 and 1000"):
        list(chunks(requests, 1001))
    assert mask_url("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert mask_url("postgresql+psycopg://me:p@ss/w@db:5432/x") == "postgresql+psycopg://me:***@db:5432/x"
    assert mask_url("postgresql://me@db/x?sslmode=require&password=s3cret") == (
        "postgresql://me@db/x?sslmode=require&password=***"
    )
    assert mask_url("sqlite:////tmp/a:b@c.sqlite") == "sqlite:////tmp/a:b@c.sqlite"
    assert mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"


def test_producer_never_imports_torch(tmp_path: Path, settings: Settings, redis_url: str):
    """Importing the producer, reading a catalog and enqueueing it leave torch unimported."""
    catalog = _catalog(tmp_path, 3)
    code = f"""
import sys
import astronn_dist.producer.cli, astronn_dist.producer.watch
assert 'torch' not in sys.modules, 'import'
from astronn_dist.producer.catalog import read_catalog
from astronn_dist.producer.enqueue import enqueue
from astronn_dist.worker.config import Settings
report = enqueue(read_catalog({str(catalog)!r}), Settings(broker_url={redis_url!r},
    database_url={settings.database_url!r}, model_path={str(settings.model_path)!r}))
assert report.enqueued == 3
assert 'torch' not in sys.modules, 'enqueue'
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_large_catalog_goes_out_in_full_chunks(tmp_path: Path, settings: Settings, redis_url: str):
    """Catalog -> queue for 20,000 spectra in chunks of 128: every spectrum, in full chunks.
    (The rate is measured by ``python -m bench --sections service``, not here.)"""
    n = 20_000
    report = enqueue(read_catalog(_catalog(tmp_path, n)), settings, chunk_size=128)
    assert report.enqueued == n and report.messages == -(-n // 128)
    assert redis.Redis.from_url(redis_url).llen(QUEUE) == report.messages


def test_blocks_skip_what_is_done_and_chunks_run_across_blocks(tmp_path: Path, settings: Settings, redis_url: str):
    """A catalog read three rows at a time: each block checked against the table, the
    messages as full as for one list (chunks of 4 across blocks), the same report."""
    catalog = _catalog(tmp_path, 10)
    model_id = model_id_of(settings.model_path)
    _write_rows(settings.database_url, model_id, ["star-00001", "star-00004", "star-00009"])
    progress: list[int] = []
    report = enqueue(iter_catalog(catalog, block_rows=3), settings, chunk_size=4, on_progress=progress.append)
    assert (report.found, report.skipped, report.enqueued, report.messages) == (10, 3, 7, 2)
    assert progress == [4, 3]
    sent = [[s["spectrum_id"] for s in m["kwargs"]["spectra"]] for m in queued_messages(redis_url)]
    assert sent == [["star-00000", "star-00002", "star-00003", "star-00005"],
                    ["star-00006", "star-00007", "star-00008"]]
    # The same as the whole list, message for message.
    redis.Redis.from_url(redis_url).flushdb()
    whole = enqueue(read_catalog(catalog), settings, chunk_size=4)
    assert (whole.found, whole.skipped, whole.enqueued, whole.messages) == (10, 3, 7, 2)
    assert [[s["spectrum_id"] for s in m["kwargs"]["spectra"]] for m in queued_messages(redis_url)] == sent


def test_reconcile_over_blocks_reads_the_queue_once(tmp_path: Path, settings: Settings, redis_url: str, monkeypatch):
    catalog = _catalog(tmp_path, 9)
    enqueue(read_catalog(catalog)[:4], settings, chunk_size=2)  # 4 on the queue
    _write_rows(settings.database_url, model_id_of(settings.model_path), ["star-00005"])
    import astronn_dist.producer.enqueue as enqueue_module

    reads: list[int] = []
    real = enqueue_module.queued_spectrum_ids
    monkeypatch.setattr(enqueue_module, "queued_spectrum_ids", lambda client: reads.append(1) or real(client))
    report = enqueue(iter_catalog(catalog, block_rows=2), settings, chunk_size=10, skip_queued=True)
    assert (report.found, report.skipped, report.queued, report.enqueued) == (9, 1, 4, 4)
    assert reads == [1]
    last = queued_messages(redis_url)[-1]["kwargs"]["spectra"]
    assert [s["spectrum_id"] for s in last] == ["star-00004", "star-00006", "star-00007", "star-00008"]


def test_produce_and_reconcile_stream_a_catalog_of_many_blocks(
    capsys, tmp_path: Path, settings: Settings, redis_url: str, monkeypatch
):
    """The commands over a catalog of 50 rows read 7 at a time: the done ones skipped, every
    other one sent once, and no skip check larger than a block."""
    from _service import run_cli

    import astronn_dist.producer.catalog as catalog_module
    from astronn_dist.worker.service import results
    monkeypatch.setattr(catalog_module, "BLOCK_ROWS", 7)
    checks: list[int] = []
    real = results.existing_spectrum_ids
    monkeypatch.setattr(results, "existing_spectrum_ids",
                        lambda engine, model_id, ids: checks.append(len(ids)) or real(engine, model_id, ids))
    catalog = _catalog(tmp_path, 50)
    done = [f"star-{i:05d}" for i in range(0, 50, 5)]
    _write_rows(settings.database_url, model_id_of(settings.model_path), done)
    common = ["--broker", redis_url, "--db", settings.database_url, "--model", str(settings.model_path)]

    code, out, err = run_cli(capsys, "produce", "--catalog", str(catalog), "--chunk-size", "16", *common)
    assert code == 0, out + err
    assert "found 50 spectra" in out and "enqueued 40 spectra in 3 messages" in out and "skipped 10" in out
    assert len(checks) == 8 and max(checks) == 7
    sent = [s["spectrum_id"] for m in queued_messages(redis_url) for s in m["kwargs"]["spectra"]]
    assert sent == [f"star-{i:05d}" for i in range(50) if i % 5]

    code, out, err = run_cli(capsys, "reconcile", "--catalog", str(catalog), *common)
    assert code == 0 and "10 have a row" in out and "40 are on the queue; enqueued 0" in out, out + err
    redis.Redis.from_url(redis_url).delete(QUEUE)
    code, out, err = run_cli(capsys, "reconcile", "--catalog", str(catalog), "--chunk-size", "16", *common)
    assert code == 0 and "0 are on the queue; enqueued 40 in 3 messages" in out, out + err
