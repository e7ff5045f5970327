"""astronn_dist.worker.service.results on a real SQLite file and a real PostgreSQL database (every test runs on both)."""

from __future__ import annotations

import math
import multiprocessing
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from astronn_dist.worker.service import results
from astronn_dist.worker.service.results import astro_nn_dist as table

MODEL = "astronn-dist-test-0123456789ab"
OTHER_MODEL = "other-model-ba9876543210"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")


@pytest.fixture()
def engine(db_url: str) -> Iterator[sa.Engine]:
    results.migrate(db_url)
    engine = results.make_engine(db_url)
    yield engine
    engine.dispose()


def row(spectrum_id: str, model_id: str = MODEL, **values) -> dict:
    """A result row as astronn_dist.worker.science.pipeline.ResultRecord.as_row() gives it (a good star by default)."""
    base = dict(
        spectrum_id=spectrum_id, path=f"/data/apstar/{spectrum_id}.fits", model_id=model_id,
        pipeline_version="0.1.0", t_elapsed=0.01, k_mag=9.5, ebv=0.05, a_k_mag=0.3517 * 0.05,
        L_fakemag=120.0, L_fakemag_err=6.0, dist=1500.0, dist_err=75.0, result_flags=0,
        flag_warn=False, flag_bad=False, error=None, mc_passes=100, seed=0, device="cpu",
        mask_rng="numpy-SFC64",
    )
    base.update(values)
    return base


def no_result(spectrum_id: str, model_id: str = MODEL, reason: str = "not a FITS file") -> dict:
    nan = math.nan
    return row(
        spectrum_id, model_id, t_elapsed=nan, k_mag=nan, ebv=nan, a_k_mag=nan, L_fakemag=nan,
        L_fakemag_err=nan, dist=nan, dist_err=nan, result_flags=2048, flag_bad=True, error=reason,
    )


def all_rows(engine: sa.Engine) -> list[dict]:
    with engine.connect() as conn:
        query = sa.select(table).order_by(table.c.model_id, table.c.spectrum_id)
        return [dict(r._mapping) for r in conn.execute(query)]


# ---------------------------------------------------------------------------------- migrations


def test_migrate_creates_the_table_and_is_idempotent(db_url: str):
    results.migrate(db_url)
    results.migrate(db_url)  # the second finds the schema current
    engine = results.make_engine(db_url)
    inspector = sa.inspect(engine)
    assert inspector.has_table("astro_nn_dist") and inspector.has_table(results.VERSION_TABLE)
    assert not inspector.has_table("alembic_version")  # never collides with another app's
    columns = {c["name"] for c in inspector.get_columns("astro_nn_dist")}
    assert columns == {
        "id", "spectrum_id", "path", "model_id", "pipeline_version", "created", "t_elapsed",
        "k_mag", "ebv", "a_k_mag", "L_fakemag", "L_fakemag_err", "dist", "dist_err",
        "result_flags", "flag_warn", "flag_bad", "attempts", "error", "mc_passes", "seed",
        "host", "task_id", "device", "mask_rng",
    }
    unique = inspector.get_unique_constraints("astro_nn_dist")
    assert [set(u["column_names"]) for u in unique] == [{"spectrum_id", "model_id"}]
    with engine.connect() as conn:
        version = conn.execute(sa.text(f"SELECT version_num FROM {results.VERSION_TABLE}")).scalars().all()
    assert version == [results.head_revision()]
    engine.dispose()


def test_migrations_match_the_model(engine: sa.Engine):
    """The table the migrations build is the one the code declares (no pending autogenerate)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "version_table": results.VERSION_TABLE}
        )
        diff = compare_metadata(context, results.Base.metadata)
    assert diff == []


def test_a_newer_schema_is_refused_with_a_clear_error(engine: sa.Engine, db_url: str):
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {results.VERSION_TABLE} SET version_num = 'ffff_future'"))
    with pytest.raises(results.SchemaError, match="newer astronn-dist"):
        results.migrate(db_url)


def _migrate_in_process(url: str, barrier) -> None:
    from astronn_dist.worker.service import results
    barrier.wait(timeout=60)
    results.migrate(url)


def test_concurrent_migrate_from_two_processes(db_url: str):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_migrate_in_process, args=(db_url, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    engine = results.make_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT version_num FROM {results.VERSION_TABLE}")).scalars().all() == [results.head_revision()]
    assert results.upsert_results(engine, [row("a")]) == 1
    engine.dispose()


def test_engine_urls(tmp_path):
    assert results.make_engine("postgresql://u@h/db").url.drivername == "postgresql+psycopg"
    assert results.make_engine("postgres://u@h/db").url.drivername == "postgresql+psycopg"
    assert results.make_engine("postgresql+psycopg://u@h/db").url.drivername == "postgresql+psycopg"
    with pytest.raises(sa.exc.ArgumentError, match="unsupported database backend 'mysql'"):
        results.make_engine("mysql://u@h/db")


def test_a_workers_dead_client_settings_keep_the_users_own_options(postgres_url: str, monkeypatch):
    """The worker's server-side TCP settings go beside the options of the URL or of PGOPTIONS:
    a search_path or statement_timeout given by the operator stays in force on the workers."""
    monkeypatch.delenv("PGOPTIONS", raising=False)
    sep = "&" if "?" in postgres_url else "?"
    cases = [(postgres_url + sep + "options=-c%20statement_timeout%3D4321", None),
             (postgres_url, "-c statement_timeout=4321")]
    for url, pgoptions in cases:
        if pgoptions:
            monkeypatch.setenv("PGOPTIONS", pgoptions)
        engine = results.make_engine(url, dead_client_s=10)
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("SHOW statement_timeout")).scalar() == "4321ms"
                assert conn.execute(sa.text("SHOW tcp_user_timeout")).scalar() == "10000"  # ms
        finally:
            engine.dispose()


def test_sqlite_engine_is_shareable(sqlite_url: str):
    engine = results.make_engine(sqlite_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == results.SQLITE_BUSY_TIMEOUT_S * 1000
    engine.dispose()


def test_the_contracts_import_nothing_heavy():
    """The producer's side (contracts, messages, the results store) loads neither numpy nor
    torch: one definition of each flag, name and limit, without the science core."""
    code = ("import sys, astronn_dist.worker.contract, astronn_dist.worker.service.messages, astronn_dist.worker.service.results; "
            "heavy = sorted({'numpy', 'torch', 'astropy'} & set(sys.modules)); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    from astronn_dist.worker import contract
    from astronn_dist.worker.science import distance
    from astronn_dist.worker.service import messages
    assert results.MAX_SPECTRUM_ID_CHARS is contract.MAX_ID_CHARS is messages.MAX_ID_CHARS
    assert distance.FLAG_NO_RESULT is contract.FLAG_NO_RESULT and messages.SpectrumRequest is contract.SpectrumRequest


# -------------------------------------------------------------------------------------- writes


def test_upsert_inserts_then_updates_without_duplicates(engine: sa.Engine):
    t0 = datetime.now(timezone.utc)
    assert results.upsert_results(engine, [row("a"), row("b"), row("a", model_id=OTHER_MODEL)], attempts=1, host="h1", task_id="t1") == 3
    first = {(r["model_id"], r["spectrum_id"]): r for r in all_rows(engine)}
    assert len(first) == 3
    assert first[(MODEL, "a")]["created"] >= t0 - timedelta(seconds=1)
    assert first[(MODEL, "a")]["created"].tzinfo == timezone.utc
    assert (first[(MODEL, "a")]["attempts"], first[(MODEL, "a")]["host"], first[(MODEL, "a")]["task_id"]) == (1, "h1", "t1")

    time.sleep(0.01)
    # Reprocessed: a new value, a failure this time, provenance from the row itself.
    changed = no_result("a", reason="truncated file") | {"attempts": 3, "host": "h2", "task_id": "t2"}
    assert results.upsert_results(engine, [changed, row("b", dist=1600.0)], attempts=1, host="h1") == 2
    after = {(r["model_id"], r["spectrum_id"]): r for r in all_rows(engine)}
    assert len(after) == 3
    a = after[(MODEL, "a")]
    assert a["id"] == first[(MODEL, "a")]["id"]  # the same row, updated in place
    assert (a["error"], a["result_flags"], a["flag_bad"], a["dist"]) == ("truncated file", 2048, True, None)
    assert (a["attempts"], a["host"], a["task_id"]) == (3, "h2", "t2")
    assert a["created"] > first[(MODEL, "a")]["created"]  # created = the latest write
    assert after[(MODEL, "b")]["dist"] == 1600.0 and after[(MODEL, "b")]["host"] == "h1"
    assert after[(OTHER_MODEL, "a")] == first[(OTHER_MODEL, "a")]  # another model's row untouched

    # The same key twice in one call: one row, the last one wins.
    results.upsert_results(engine, [row("c", dist=1.0), row("c", dist=2.0)])
    assert [r["dist"] for r in all_rows(engine) if r["spectrum_id"] == "c"] == [2.0]


def test_nan_and_numpy_values(engine: sa.Engine):
    import numpy as np
    results.upsert_results(engine, [
        no_result("failed"),
        row("np", k_mag=np.float32(9.25), dist=np.float64(np.inf), result_flags=np.int64(4),
            flag_warn=np.bool_(True), mc_passes=np.int64(10)),
    ])
    failed, good = sorted(all_rows(engine), key=lambda r: r["spectrum_id"])
    for name in ("t_elapsed", "k_mag", "ebv", "a_k_mag", "L_fakemag", "L_fakemag_err", "dist", "dist_err"):
        assert failed[name] is None, name
    with engine.connect() as conn:  # NULL in SQL, not a stored NaN
        assert conn.execute(sa.select(sa.func.count()).where(table.c.dist.is_(None))).scalar() == 2
    assert (good["k_mag"], good["dist"], good["result_flags"], good["flag_warn"], good["mc_passes"]) == (9.25, None, 4, True, 10)


def test_upsert_accepts_result_records_inside_the_callers_transaction(engine: sa.Engine):
    from astronn_dist.worker.science.pipeline import ResultRecord

    record = ResultRecord(**{k: v for k, v in row("rec").items()})
    with engine.connect() as conn:
        with conn.begin() as tx:
            results.upsert_results(conn, [record], task_id="t", attempts=2, host="h")
            tx.rollback()  # the caller owns the transaction: nothing was committed
    assert all_rows(engine) == []
    with engine.begin() as conn:
        results.upsert_results(conn, [record], task_id="t", attempts=2, host="h")
    (stored,) = all_rows(engine)
    assert (stored["spectrum_id"], stored["attempts"], stored["dist"]) == ("rec", 2, 1500.0)


def test_bad_rows_are_refused_and_nothing_is_written(engine: sa.Engine):
    with pytest.raises(ValueError, match="not columns of astro_nn_dist: distance"):
        results.upsert_results(engine, [row("a"), row("b") | {"distance": 1.0}])
    with pytest.raises(ValueError, match="'b' lacks model_id"):
        results.upsert_results(engine, [row("a"), row("b", model_id=None)])
    assert all_rows(engine) == []


def test_bulk_write_of_5000_rows(engine: sa.Engine, db_url: str):
    rows = [row(f"star-{i:05d}", dist=1000.0 + i) for i in range(5000)]
    t0 = time.perf_counter()
    assert results.upsert_results(engine, rows, attempts=1, host="bulk") == 5000
    insert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    results.upsert_results(engine, [r | {"dist": 2.0} for r in rows], attempts=2, host="bulk")
    update_s = time.perf_counter() - t0
    print(f"\n{sa.make_url(db_url).get_backend_name()}: 5000 rows inserted in {insert_s:.3f} s, updated in {update_s:.3f} s")
    with engine.connect() as conn:
        counts = conn.execute(sa.select(sa.func.count(), sa.func.min(table.c.dist), sa.func.max(table.c.attempts))).one()
    assert tuple(counts) == (5000, 2.0, 2)


# --------------------------------------------------------------------------------------- reads


def test_existing_spectrum_ids(engine: sa.Engine):
    results.upsert_results(engine, [row(f"s{i}") for i in range(0, 3000, 3)] + [row("s1", model_id=OTHER_MODEL)])
    asked = [f"s{i}" for i in range(3000)] + ["s0", "unknown"]
    t0 = time.perf_counter()
    found = results.existing_spectrum_ids(engine, MODEL, iter(asked))
    elapsed = time.perf_counter() - t0
    assert found == {f"s{i}" for i in range(0, 3000, 3)}
    assert results.existing_spectrum_ids(engine, OTHER_MODEL, asked) == {"s1"}
    assert results.existing_spectrum_ids(engine, MODEL, []) == set()
    print(f"\nexisting_spectrum_ids: 3002 ids in {elapsed:.3f} s")


def test_existing_spectrum_ids_100k(engine: sa.Engine):
    results.upsert_results(engine, [row(f"star-{i:06d}") for i in range(0, 100_000, 10)])
    asked = [f"star-{i:06d}" for i in range(100_000)]
    t0 = time.perf_counter()
    found = results.existing_spectrum_ids(engine, MODEL, asked)
    print(f"\nexisting_spectrum_ids: 100k ids against 10k rows in {time.perf_counter() - t0:.3f} s")
    assert len(found) == 10_000 and "star-000010" in found and "star-000011" not in found


def _seed_requeue(engine: sa.Engine) -> None:
    results.upsert_results(engine, [
        row("good"),
        row("warn", ebv=0.0, a_k_mag=0.0, result_flags=4, flag_warn=True),
        row("unreliable", L_fakemag_err=50.0, result_flags=1, flag_bad=True),
        row("no-ks", k_mag=0.0, result_flags=2 | 4, flag_warn=True, flag_bad=True),
        no_result("broken"),
        no_result("broken-kept", reason="x") | {"k_mag": 8.0, "ebv": 0.2},
        no_result("other-model", model_id=OTHER_MODEL),
    ])


def test_select_for_requeue(engine: sa.Engine):
    from astronn_dist.worker.contract import SpectrumRequest

    _seed_requeue(engine)
    failed = results.select_for_requeue(engine, MODEL, failed=True, bad=False, spectrum_ids=None)
    assert failed == [
        SpectrumRequest("broken", "/data/apstar/broken.fits", None, None),
        SpectrumRequest("broken-kept", "/data/apstar/broken-kept.fits", 8.0, 0.2),
    ]
    bad = results.select_for_requeue(engine, MODEL, bad=True)
    assert [r.spectrum_id for r in bad] == ["broken", "broken-kept", "no-ks", "unreliable"]
    by_id = {r.spectrum_id: r for r in bad}
    # Photometry flagged missing goes back as None (the 0 stored is not a measurement).
    assert (by_id["no-ks"].k_mag, by_id["no-ks"].ebv) == (None, None)
    assert (by_id["unreliable"].k_mag, by_id["unreliable"].ebv) == (9.5, 0.05)

    named = results.select_for_requeue(engine, MODEL, spectrum_ids=["warn", "good", "nope", "warn"])
    assert named == [
        SpectrumRequest("warn", "/data/apstar/warn.fits", 9.5, None),
        SpectrumRequest("good", "/data/apstar/good.fits", 9.5, 0.05),
    ]
    both = results.select_for_requeue(engine, MODEL, failed=True, spectrum_ids=["good", "broken"])
    assert [r.spectrum_id for r in both] == ["broken", "broken-kept", "good"]
    assert results.select_for_requeue(engine, OTHER_MODEL, failed=True)[0].spectrum_id == "other-model"
    with pytest.raises(ValueError, match="choose what to requeue"):
        results.select_for_requeue(engine, MODEL, failed=False, bad=False, spectrum_ids=[])


def test_summary(engine: sa.Engine):
    assert results.summary(engine) == [{
        "model_id": "", "rows": 0, "results": 0, "no_result": 0, "flag_bad": 0, "flag_warn": 0,
        "fakemag_unreliable": 0, "missing_photometry": 0, "missing_extinction": 0,
        "max_attempts": None, "last_created": None,
    }]
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    _seed_requeue(engine)
    results.upsert_results(engine, [row("good")], attempts=4)
    lines = results.summary(engine)
    assert [line["model_id"] for line in lines] == [MODEL, OTHER_MODEL, "(all models)"]
    mine = lines[0]
    assert {k: v for k, v in mine.items() if k != "last_created"} == {
        "model_id": MODEL, "rows": 6, "results": 4, "no_result": 2, "flag_bad": 4, "flag_warn": 2,
        "fakemag_unreliable": 1, "missing_photometry": 1, "missing_extinction": 2, "max_attempts": 4,
    }
    assert before <= mine["last_created"] <= datetime.now(timezone.utc)
    assert mine["last_created"].tzinfo == timezone.utc
    assert lines[2]["rows"] == 7 and lines[2]["no_result"] == 3 and lines[2]["max_attempts"] == 4
    assert results.summary(engine, model_id=OTHER_MODEL) == [lines[1]]


def _counts_from_rows(engine: sa.Engine) -> dict[tuple, int]:
    """The truth the counts table must tell, counted here in Python from the rows themselves."""
    out: dict[tuple, int] = {}
    for r in all_rows(engine):
        key = (r["model_id"], r["result_flags"], r["flag_warn"], r["flag_bad"], r["dist"] is not None,
               r["attempts"], r["device"], r["mask_rng"])
        out[key] = out.get(key, 0) + 1
    return out


def _counts_kept(engine: sa.Engine) -> dict[tuple, int]:
    """What the database's triggers kept (deltas summed per key, zero counts left out)."""
    counts = results.result_counts
    with engine.connect() as conn:
        rows = conn.execute(sa.select(counts))
    out: dict[tuple, int] = {}
    for r in rows:
        m = r._mapping
        key = tuple(bool(m[k]) if k in ("flag_warn", "flag_bad", "has_dist") else m[k] for k in results.COUNT_KEY)
        out[key] = out.get(key, 0) + r.row_count
    return {k: n for k, n in out.items() if n}


def test_the_counts_follow_every_kind_of_write(engine: sa.Engine):
    """Inserts, upserts that change a row's flags, upserts that rewrite a row as it was, plain
    UPDATE and DELETE statements: after each, the counts equal the rows counted one by one, and
    summary() equals the aggregate over the rows."""
    def check() -> None:
        assert _counts_kept(engine) == _counts_from_rows(engine)

    check()
    results.upsert_results(engine, [row(f"s{i}") for i in range(20)] + [no_result("broken")])
    check()
    results.upsert_results(engine, [row("s1", result_flags=4, flag_warn=True), no_result("s2"),
                                    row("s3", device=None, mask_rng=None), row("o1", OTHER_MODEL)])
    check()
    results.upsert_results(engine, [row("s1", result_flags=4, flag_warn=True)])  # as it was
    results.upsert_results(engine, [row("s4")], attempts=3)
    check()
    with engine.begin() as conn:
        conn.execute(sa.update(table).where(table.c.spectrum_id.in_(["s5", "s6"])).values(flag_bad=True, result_flags=1))
        conn.execute(sa.delete(table).where(table.c.spectrum_id.in_(["s7", "broken", "o1"])))
    check()
    assert sorted(results.computed_by(engine), key=lambda line: line["rows"]) == [
        {"model_id": MODEL, "device": None, "mask_rng": None, "rows": 1},
        {"model_id": MODEL, "device": "cpu", "mask_rng": "numpy-SFC64", "rows": 18},
    ]
    (line,) = results.summary(engine)
    assert {k: v for k, v in line.items() if k != "last_created"} == {
        "model_id": MODEL, "rows": 19, "results": 18, "no_result": 1, "flag_bad": 3, "flag_warn": 1,
        "fakemag_unreliable": 2, "missing_photometry": 0, "missing_extinction": 1, "max_attempts": 3,
    }
    assert line["last_created"] == max(r["created"] for r in all_rows(engine))
    with engine.begin() as conn:
        conn.execute(sa.delete(table))
    check()
    assert results.summary(engine)[0]["rows"] == 0


def test_postgresql_folds_the_count_deltas(postgres_url: str):
    """Each statement appends its deltas (no lock on a shared counter); compact_counts folds
    them into one row per key without changing a count, and TRUNCATE empties them."""
    results.migrate(postgres_url)
    engine = results.make_engine(postgres_url)
    for i in range(30):
        results.upsert_results(engine, [row(f"s{i}"), row(f"t{i}", result_flags=4, flag_warn=True)])
    results.upsert_results(engine, [row(f"s{i}", attempts=2) for i in range(10)])
    with engine.connect() as conn:
        deltas = conn.scalar(sa.select(sa.func.count()).select_from(results.result_counts))
    before = _counts_kept(engine)
    assert deltas > len(before) == 3
    assert results.compact_counts(engine, at_least=deltas + 1) == 0  # not yet worth it
    assert results.compact_counts(engine, at_least=1) == deltas
    with engine.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(results.result_counts)) == 3
    assert _counts_kept(engine) == before == _counts_from_rows(engine)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {results.TABLE_NAME}"))
    assert _counts_kept(engine) == {}
    engine.dispose()


def test_bulk_writes_go_through_copy_and_stay_idempotent(engine: sa.Engine, monkeypatch):
    """From COPY_AT rows on PostgreSQL, COPY into a temporary table and one upsert: the rows are
    those the plain INSERT path writes (NaN as NULL, aware UTC times, non-ASCII ids), twice in
    one transaction leaves no row of the first call behind, and writing again changes nothing
    but the values written."""
    monkeypatch.setattr(results, "COPY_AT", 3)
    batch = [row("é-1", k_mag=math.nan), no_result("b-2"), row("c-3", device=None), row("d-4")]
    with engine.begin() as conn:
        assert results.upsert_results(conn, batch[:3]) == 3
        assert results.upsert_results(conn, [row("e-5"), row("f-6", ebv=math.nan), row("é-1", dist=7.0)]) == 3
    copied = all_rows(engine)
    monkeypatch.setattr(results, "COPY_AT", 10**9)
    results.upsert_results(engine, [row("é-1", dist=7.0), no_result("b-2"), row("c-3", device=None),
                                    row("e-5"), row("f-6", ebv=math.nan)])
    plain = all_rows(engine)
    ignore = ("id", "created")
    assert [{k: v for k, v in r.items() if k not in ignore} for r in copied] == \
        [{k: v for k, v in r.items() if k not in ignore} for r in plain]
    assert [r["id"] for r in copied] == [r["id"] for r in plain]  # updated in place
    assert copied[-1]["spectrum_id"] == "é-1" and copied[-1]["dist"] == 7.0 and copied[-2]["ebv"] is None
    assert all(r["created"].tzinfo == timezone.utc for r in copied)
    assert _counts_kept(engine) == _counts_from_rows(engine)


def test_summary_asks_for_migrate_before_the_counts(db_url: str):
    from alembic import command

    engine = results.make_engine(db_url)
    config = results.alembic_config()
    with results.migration_transaction(engine) as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0002")
    with pytest.raises(results.SchemaError, match="run astronn-dist migrate"):
        results.summary(engine)
    results.upsert_results(engine, [row("kept"), no_result("lost")])
    results.migrate(engine)  # counts the rows already there
    assert _counts_kept(engine) == _counts_from_rows(engine)
    assert results.summary(engine)[0]["rows"] == 2
    engine.dispose()


def test_export_rows(engine: sa.Engine):
    _seed_requeue(engine)
    exported = list(results.export_rows(engine, batch_size=2))
    assert [(r["model_id"], r["spectrum_id"]) for r in exported] == sorted(
        (r["model_id"], r["spectrum_id"]) for r in all_rows(engine)
    )
    assert list(exported[0]) == list(results.EXPORT_COLUMNS) and "id" not in exported[0]
    assert all(r["created"].tzinfo == timezone.utc for r in exported)
    mine = list(results.export_rows(engine, model_id=OTHER_MODEL))
    assert [r["spectrum_id"] for r in mine] == ["other-model"] and mine[0]["dist"] is None


# --------------------------------------------------------------------------------- concurrency


def _upsert_in_process(url: str, barrier, first: int, worker: str) -> None:
    from astronn_dist.worker.service import results
    engine = results.make_engine(url)
    rows = [row(f"star-{i:05d}", host=worker, dist=float(first)) for i in range(first, first + 3000)]
    barrier.wait(timeout=60)
    for attempt in range(5):
        # The two processes hand their rows over in opposite orders (as two chunks listing the
        # same spectra differently would): the module must still not deadlock.
        ordered = rows if (attempt + (first > 0)) % 2 else rows[::-1]
        results.upsert_results(engine, ordered, attempts=attempt + 1)
    engine.dispose()


def test_concurrent_upserts_leave_one_row_per_key(engine: sa.Engine, db_url: str):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [
        ctx.Process(target=_upsert_in_process, args=(db_url, barrier, first, f"w{first}"))
        for first in (0, 1500)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    rows = all_rows(engine)
    assert len(rows) == 4500 and len({r["spectrum_id"] for r in rows}) == 4500
    hosts = {r["spectrum_id"]: r["host"] for r in rows}
    assert hosts["star-00000"] == "w0" and hosts["star-04499"] == "w1500"
    assert {hosts[f"star-{i:05d}"] for i in range(1500, 3000)} <= {"w0", "w1500"}
    assert {r["attempts"] for r in rows} == {5}
    assert _counts_from_rows(engine) == _counts_kept(engine)  # the triggers raced as the writers did


def test_upgrade_from_0001_keeps_rows_and_adds_how_they_were_computed(db_url: str):
    """A database made by the previous version (revision 0001, rows in it) upgrades in place:
    the rows stay, device and mask_rng are NULL for them and filled for new ones."""
    from alembic import command

    engine = results.make_engine(db_url)
    config = results.alembic_config()
    with results.migration_transaction(engine) as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
    old = {k: v for k, v in row("old").items() if k not in ("device", "mask_rng")}
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO astro_nn_dist (" + ", ".join(f'"{k}"' for k in old) + ", created, attempts) VALUES ("
            + ", ".join(f":{k}" for k in old) + ", :created, 1)"),
            {**old, "created": datetime.now(timezone.utc)})
    results.migrate(engine)
    assert results.upsert_results(engine, [row("new")]) == 1
    with engine.connect() as conn:
        got = {r.spectrum_id: r for r in conn.execute(sa.select(results.astro_nn_dist))}
        version = conn.execute(sa.text(f"SELECT version_num FROM {results.VERSION_TABLE}")).scalars().all()
    assert version == [results.head_revision()] and results.head_revision() != "0001"
    assert (got["old"].device, got["old"].mask_rng, got["old"].dist) == (None, None, 1500.0)
    assert (got["new"].device, got["new"].mask_rng) == ("cpu", "numpy-SFC64")
    by = results.computed_by(engine, MODEL)
    assert {(b["device"], b["mask_rng"]): b["rows"] for b in by} == {(None, None): 1, ("cpu", "numpy-SFC64"): 1}
    engine.dispose()
