"""The service end to end: real Redis, real Celery worker processes, real SQLite and PostgreSQL.

Each test starts its own workers (subprocess, own session) on its own Redis database, with a
small checkpoint (random weights, real astroNN DR17 normalization) and 10 MC passes. Chunks are
symlinks to the two real apStar files under distinct spectrum_ids, plus a broken file.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from _service import (  # tests/ is on sys.path
    Worker,
    build_checkpoint,
    publish,
    queue_length,
    redis_client,
    rows,
    spectra_farm,
    wait_for,
    worker_env,
)
from astronn_dist.worker.science.distance import FLAG_NO_RESULT
from astronn_dist.worker.service.state import DELIVERY_KEY

pytestmark = [pytest.mark.service, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("model") / "random-dr17.pt")


def _one_row_each(database_url: str, ids: list[str]) -> list[dict]:
    found = rows(database_url)
    counts = Counter(r["spectrum_id"] for r in found)
    assert sorted(counts) == sorted(ids), f"rows for {sorted(counts)}, expected {sorted(ids)}"
    assert set(counts.values()) == {1}, f"duplicated rows: {counts}"
    return found


def _all_written(database_url: str, ids: list[str]):
    return lambda: {r["spectrum_id"] for r in rows(database_url)} >= set(ids)


def _delivery_count(redis_url: str, task_id: str, retries: int = 0) -> int:
    value = redis_client(redis_url).get(DELIVERY_KEY.format(task_id=task_id, retries=retries))
    return int(value) if value is not None else 0


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_chunks_become_one_row_per_spectrum_and_a_redelivery_rewrites_them(
    database: str, request: pytest.FixtureRequest, redis_url: str, checkpoint: Path,
    apstar_files: list[Path], tmp_path: Path, workers: list[Worker],
) -> None:
    database_url = request.getfixturevalue(f"{database}_url")
    env = worker_env(redis_url=redis_url, database_url=database_url, model=checkpoint,
                     ASTRONN_DIST_DATA_ROOTS=str(tmp_path))
    # SQLite through `celery -A astronn_dist.worker.service.app worker`; PostgreSQL through astronn_dist.worker.service.serve.run_worker.
    worker = Worker(env, tmp_path / "worker.log", name=f"w-{database}", serve=database == "postgres")
    workers.append(worker)

    entries = spectra_farm(apstar_files, tmp_path / "spectra", 12, broken=1)
    outside = {"spectrum_id": "outside", "path": "/etc/hosts"}  # outside the data roots
    invalid = {"spectrum_id": "bad-photometry", "path": entries[0]["path"], "k_mag": "9.8"}
    chunks = [entries[0:5], entries[5:10], entries[10:] + [outside, invalid]]
    task_ids = [publish(redis_url, {"spectra": c, "provenance": {"source": "test"}}) for c in chunks]
    ids = [e["spectrum_id"] for e in entries] + ["outside", "bad-photometry"]

    t0 = time.monotonic()
    wait_for(_all_written(database_url, ids), 120, "rows of all chunks", worker)
    first = {r["spectrum_id"]: r for r in _one_row_each(database_url, ids)}
    elapsed = time.monotonic() - t0

    good = [e["spectrum_id"] for e in entries if not e["spectrum_id"].startswith("broken")]
    for sid in good:
        row = first[sid]
        assert row["error"] is None and not row["result_flags"] & FLAG_NO_RESULT
        assert row["dist"] is not None and row["dist"] > 0 and row["L_fakemag"] is not None
        assert row["mc_passes"] == 10 and row["attempts"] == 1
        assert row["task_id"] in task_ids and row["host"].startswith(f"w-{database}@")
    assert first["broken-0"]["result_flags"] & FLAG_NO_RESULT
    assert "not a FITS file" in first["broken-0"]["error"]
    assert "outside the allowed data roots" in first["outside"]["error"]
    assert "k_mag must be a number" in first["bad-photometry"]["error"]

    # Redelivery: the first chunk's message again, same task id (as Redis gives it back).
    publish(redis_url, {"spectra": chunks[0]}, task_id=task_ids[0])
    wait_for(lambda: worker.log().count(f"chunk {task_ids[0]}: 5 spectra") == 2, 60,
             "the redelivered chunk", worker)
    again = {r["spectrum_id"]: r for r in _one_row_each(database_url, ids)}
    for e in chunks[0]:
        sid = e["spectrum_id"]
        assert again[sid]["dist"] == first[sid]["dist"]
    print(f"\n{database}: {len(ids)} spectra in {len(chunks)} chunks -> {len(ids)} rows in "
          f"{elapsed:.1f} s; redelivery rewrote {len(chunks[0])} rows, no duplicates")


def test_a_killed_worker_s_chunk_comes_back_within_the_visibility_timeout(
    redis_url: str, sqlite_url: str, checkpoint: Path, apstar_files: list[Path], tmp_path: Path,
    workers: list[Worker],
) -> None:
    vt = 5
    entries = spectra_farm(apstar_files, tmp_path / "spectra", 40)
    ids = [e["spectrum_id"] for e in entries]
    # Worker A is slow (1000 MC passes: ~10 s for this chunk); it dies, machine and all, mid-chunk.
    slow = worker_env(redis_url=redis_url, database_url=sqlite_url, model=checkpoint,
                      ASTRONN_DIST_VISIBILITY_TIMEOUT=vt, ASTRONN_DIST_MC_PASSES=1000)
    a = Worker(slow, tmp_path / "a.log", name="a")
    workers.append(a)
    a.wait_ready()
    task_id = publish(redis_url, {"spectra": entries})
    wait_for(lambda: _delivery_count(redis_url, task_id) == 1, 60, "worker A starting the chunk", a)
    t_delivered = time.monotonic()
    a.kill()
    assert rows(sqlite_url) == []
    assert queue_length(redis_url) == 0  # the message sits in Redis's unacked set, not the queue

    b = Worker(worker_env(redis_url=redis_url, database_url=sqlite_url, model=checkpoint,
                          ASTRONN_DIST_VISIBILITY_TIMEOUT=vt), tmp_path / "b.log", name="b")
    workers.append(b)
    wait_for(_all_written(sqlite_url, ids), 90, "worker B writing the chunk", b)
    back_after = time.monotonic() - t_delivered
    found = _one_row_each(sqlite_url, ids)
    assert {r["attempts"] for r in found} == {2}  # second delivery of the same message
    assert all(r["error"] is None for r in found)
    # Not before the visibility timeout (the message was not given back early), and within it
    # plus a restore sweep (1 s here), worker B's start-up and the chunk.
    assert vt - 1 <= back_after < 60
    print(f"\nkilled worker's chunk of {len(ids)} spectra written by another worker "
          f"{back_after:.1f} s after delivery (visibility timeout {vt} s)")


def test_a_chunk_that_keeps_killing_workers_is_parked(
    redis_url: str, sqlite_url: str, checkpoint: Path, apstar_files: list[Path], tmp_path: Path,
    workers: list[Worker],
) -> None:
    max_deliveries = 2
    entries = spectra_farm(apstar_files, tmp_path / "spectra", 20)
    typo = {"spectrum_id": "typo", "path": entries[0]["path"], "kmag": 9.0}  # invalid anyway
    ids = [e["spectrum_id"] for e in entries] + ["typo"]
    env = worker_env(redis_url=redis_url, database_url=sqlite_url, model=checkpoint,
                     ASTRONN_DIST_MAX_DELIVERIES=max_deliveries, ASTRONN_DIST_MC_PASSES=1000)
    w = Worker(env, tmp_path / "w.log", name="poison")
    workers.append(w)
    w.wait_ready()
    task_id = publish(redis_url, {"spectra": entries + [typo]})
    killed = []
    for delivery in range(1, max_deliveries + 1):
        # Each time the chunk starts, its pool process dies (as under the OOM killer); the
        # worker requeues the message at once (reject_on_worker_lost) and forks a new process.
        wait_for(lambda: _delivery_count(redis_url, task_id) == delivery, 60,
                 f"delivery {delivery}", w)
        killed.append(w.kill_pool_process())
    wait_for(_all_written(sqlite_url, ids), 60, "the parked chunk's rows", w)
    found = _one_row_each(sqlite_url, ids)
    for r in found:
        assert r["result_flags"] & FLAG_NO_RESULT and r["dist"] is None
        assert r["attempts"] == max_deliveries + 1
        if r["spectrum_id"] == "typo":  # keeps its own reason
            assert "unknown key(s) kmag" in r["error"]
        else:
            assert f"worker died {max_deliveries} times processing this chunk" in r["error"]
    assert w.proc.poll() is None  # the worker itself lives on
    assert len(set(killed)) == max_deliveries
    print(f"\nchunk parked after {len(killed)} killed pool processes: {len(found)} no-result rows")


def test_a_database_outage_is_retried_until_the_rows_are_written(
    redis_url: str, postgres_url: str, checkpoint: Path, apstar_files: list[Path], tmp_path: Path,
    workers: list[Worker],
) -> None:
    import sqlalchemy as sa

    from conftest import TEST_POSTGRES_URL

    name = postgres_url.rsplit("/", 1)[1]
    admin = sa.create_engine(TEST_POSTGRES_URL, isolation_level="AUTOCOMMIT")

    def set_available(on: bool) -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(on).lower()}'))
            if not on:  # and drop the worker's open connections
                conn.execute(sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": name})

    entries = spectra_farm(apstar_files, tmp_path / "spectra", 4)
    ids = [e["spectrum_id"] for e in entries]
    env = worker_env(redis_url=redis_url, database_url=postgres_url, model=checkpoint)
    w = Worker(env, tmp_path / "w.log", name="outage")
    workers.append(w)
    w.wait_ready()
    # A first chunk: the worker is connected and migrated, with a connection in its pool.
    publish(redis_url, {"spectra": entries[:2]})
    wait_for(_all_written(postgres_url, ids[:2]), 60, "the first chunk", w)

    set_available(False)
    try:
        task_id = publish(redis_url, {"spectra": entries[2:]})
        # At least two attempts fail and are retried (retry n counts as delivery key n).
        wait_for(lambda: _delivery_count(redis_url, task_id, retries=1) >= 1, 60, "a retry", w)
        wait_for(lambda: "database unavailable" in w.log(), 30, "the retry's reason logged", w)
    finally:
        set_available(True)
    wait_for(_all_written(postgres_url, ids), 90, "the rows after the outage", w)
    found = {r["spectrum_id"]: r for r in _one_row_each(postgres_url, ids)}
    assert all(found[s]["error"] is None for s in ids)
    assert all(found[s]["attempts"] >= 2 for s in ids[2:])
    admin.dispose()
    print(f"\noutage: chunk written at attempt {found[ids[2]]['attempts']}")


def test_a_failure_that_persists_ends_in_no_result_rows_after_bounded_retries(
    redis_url: str, sqlite_url: str, checkpoint: Path, apstar_files: list[Path], tmp_path: Path,
    workers: list[Worker],
) -> None:
    import sqlalchemy as sa

    from astronn_dist.worker.service.results import make_engine, migrate

    # The database refuses one spectrum's result (not a connection problem: an error that no
    # retry cures), but accepts rows that record a failure.
    engine = make_engine(sqlite_url)
    migrate(engine)
    with engine.begin() as conn:
        conn.execute(sa.text(
            "CREATE TRIGGER refuse BEFORE INSERT ON astro_nn_dist "
            "WHEN NEW.spectrum_id = 'star-0001' AND NEW.error IS NULL "
            "BEGIN SELECT RAISE(ABORT, 'refused by the test database'); END"))
    engine.dispose()
    entries = spectra_farm(apstar_files, tmp_path / "spectra", 3)
    ids = [e["spectrum_id"] for e in entries]
    # A visibility timeout of 4 s caps the backoff at 2 s, so the retries take seconds.
    max_retries = 3
    w = Worker(worker_env(redis_url=redis_url, database_url=sqlite_url, model=checkpoint,
                          ASTRONN_DIST_VISIBILITY_TIMEOUT=4, ASTRONN_DIST_MAX_RETRIES=max_retries),
               tmp_path / "w.log", name="persist")
    workers.append(w)
    # Warm first: a chunk that waits longer than the visibility timeout for its process to load
    # the model would (rightly) be delivered a second time.
    wait_for(lambda: " warm in " in w.log(), 60, "the worker's warm-up", w)
    t0 = time.monotonic()
    task_id = publish(redis_url, {"spectra": entries})
    wait_for(_all_written(sqlite_url, ids), 120, "the failed chunk's rows", w)
    found = _one_row_each(sqlite_url, ids)
    attempts = max_retries + 1
    for r in found:  # the whole chunk shares the fate of its transaction
        assert r["result_flags"] & FLAG_NO_RESULT and r["attempts"] == attempts
        assert r["error"].startswith(f"gave up after {attempts} attempts: IntegrityError")
        assert "refused by the test database" in r["error"]
    assert w.log().count(f"chunk {task_id} (3 spectra), attempt") == max_retries
    print(f"\npersistent failure: {len(found)} no-result rows after {attempts} attempts in "
          f"{time.monotonic() - t0:.1f} s")


def test_invalid_message_is_rejected_and_not_retried(
    redis_url: str, sqlite_url: str, checkpoint: Path, apstar_files: list[Path], tmp_path: Path,
    workers: list[Worker],
) -> None:
    entries = spectra_farm(apstar_files, tmp_path / "spectra", 2)
    w = Worker(worker_env(redis_url=redis_url, database_url=sqlite_url, model=checkpoint),
               tmp_path / "w.log", name="reject")
    workers.append(w)
    w.wait_ready()
    bad = publish(redis_url, {"spectra": "not a list"})
    good = publish(redis_url, {"spectra": entries})
    wait_for(_all_written(sqlite_url, [e["spectrum_id"] for e in entries]), 60, "the good chunk", w)
    log = w.log()
    assert f"rejected message {bad}: 'spectra' must be a list, got str" in log
    assert log.count(f"rejected message {bad}") == 1 and queue_length(redis_url) == 0
    assert f"chunk {good}" in log
