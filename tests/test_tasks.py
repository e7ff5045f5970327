"""The task layer: message validation, the Celery app's settings, process_chunk on real files
and a real database, and a real worker refusing a pickled message."""

from __future__ import annotations

import json
import math
import os
import ssl
from pathlib import Path

import pytest

from astronn_dist.worker.service.app import broker_ssl_options, broker_transport_options, make_app, restore_interval_s
from astronn_dist.worker.config import QUEUE, TASK_NAME, Settings
from astronn_dist.worker.service.messages import (
    MAX_CHUNK,
    MAX_ID_CHARS,
    MAX_PATH_CHARS,
    MessageError,
    make_message,
    parse_message,
    split_message,
)
from astronn_dist.worker.contract import SpectrumRequest


def _entry(i: int = 0, **over: object) -> dict:
    entry = {"spectrum_id": f"s{i}", "path": f"/data/s{i}.fits", "k_mag": 10.0, "ebv": 0.1}
    entry.update(over)
    return entry


# ---------------------------------------------------------------------------------------------
# Messages


def test_valid_message_gives_requests_in_order() -> None:
    msg = {"spectra": [_entry(0), _entry(1, k_mag=None, ebv=None), _entry(2, k_mag=9)]}
    assert parse_message(msg) == [
        SpectrumRequest("s0", "/data/s0.fits", 10.0, 0.1),
        SpectrumRequest("s1", "/data/s1.fits", None, None),
        SpectrumRequest("s2", "/data/s2.fits", 9.0, 0.1),
    ]


def test_photometry_keys_are_optional() -> None:
    (req,) = parse_message({"spectra": [{"spectrum_id": "a", "path": "/x.fits"}]})
    assert req.k_mag is None and req.ebv is None


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_photometry_is_missing(value: float) -> None:
    # Python's json writes and reads NaN/Infinity, so such messages do arrive.
    payload = json.loads(json.dumps({"spectra": [_entry(k_mag=value, ebv=value)]}))
    (req,) = parse_message(payload)
    assert req.k_mag is None and req.ebv is None


def test_out_of_window_photometry_is_kept_for_the_distance_step_to_flag() -> None:
    (req,) = parse_message({"spectra": [_entry(k_mag=-9999.99, ebv=99.0)]})
    assert req.k_mag == -9999.99 and req.ebv == 99.0


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        ({"k_mag": "9.8"}, "k_mag must be a number or null, got str"),
        ({"ebv": True}, "ebv must be a number or null, got bool"),
        ({"ebv": [0.1]}, "ebv must be a number or null, got list"),
        ({"k_mag": 10**400}, "photometry out of range"),
        ({"spectrum_id": 42}, "spectrum_id must be a string, got int"),
        ({"spectrum_id": ""}, "spectrum_id must not be empty"),
        ({"spectrum_id": "x" * (MAX_ID_CHARS + 1)}, f"at most {MAX_ID_CHARS} allowed"),
        ({"path": None}, "path must be a string, got null"),
        ({"path": "/a" * MAX_PATH_CHARS}, f"at most {MAX_PATH_CHARS} allowed"),
        ({"path": "/data/a\x00b"}, "path contains a NUL character"),
        ({"kmag": 10.0}, "unknown key(s) kmag"),
    ],
)
def test_bad_entries_are_refused_with_the_reason(over: dict, expected: str) -> None:
    msg = {"spectra": [_entry(0), _entry(1, **over)]}
    with pytest.raises(MessageError, match="entry 1: ") as info:
        parse_message(msg)
    assert expected in str(info.value)
    # split_message keeps the good one and says why the other is out.
    parsed = split_message(msg)
    assert [r.spectrum_id for r in parsed.requests] == ["s0"]
    (bad,) = parsed.invalid
    assert bad.index == 1 and expected in bad.reason


def test_missing_keys_are_named() -> None:
    with pytest.raises(MessageError, match=r"entry 0: missing key\(s\) spectrum_id, path"):
        parse_message({"spectra": [{"k_mag": 1.0}]})


def test_invalid_entries_keep_a_usable_spectrum_id_for_their_row() -> None:
    parsed = split_message({"spectra": [_entry(0, k_mag="x"), {"spectrum_id": 5, "path": "/p"}, 7]})
    assert parsed.requests == []
    assert [(i.spectrum_id, i.path) for i in parsed.invalid] == [
        ("s0", "/data/s0.fits"), (None, "/p"), (None, None)
    ]


def test_a_repeated_spectrum_id_gets_one_row() -> None:
    msg = {"spectra": [_entry(0, k_mag="bad"), _entry(0), _entry(0, path="/other.fits")]}
    parsed = split_message(msg)
    # The valid entry claims the id; the invalid one and the copy are refused without a row.
    assert [r.path for r in parsed.requests] == ["/data/s0.fits"]
    assert [i.spectrum_id for i in parsed.invalid] == [None, None]
    assert "appears more than once" in parsed.invalid[1].reason


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ([_entry()], "must be an object with key 'spectra', got list"),
        ({"stars": []}, "must have key 'spectra'"),
        ({"spectra": {"a": 1}}, "'spectra' must be a list, got dict"),
        ({"spectra": []}, "'spectra' is empty"),
        ({"spectra": [_entry(i) for i in range(MAX_CHUNK + 1)]}, f"at most {MAX_CHUNK} per message"),
        ({"spectra": [_entry()], "provenance": "me"}, "provenance must be an object"),
        ({"spectra": [_entry()], "note": {"a": 1}}, "provenance field 'note' must be a string"),
        ({"spectra": [_entry()], "note": "x" * 2000}, "at most 1024 allowed"),
        ({"spectra": [_entry()], **{f"k{i}": i for i in range(40)}}, "at most 32 allowed"),
    ],
)
def test_bad_messages_are_refused_as_a_whole(payload: object, expected: str) -> None:
    with pytest.raises(MessageError) as info:
        split_message(payload)
    assert expected in str(info.value)
    assert isinstance(info.value, ValueError)


def test_provenance_is_returned() -> None:
    parsed = split_message(
        {"spectra": [_entry()], "provenance": {"source": "cat.csv", "model_id": "m-1"}, "n": 3}
    )
    assert parsed.provenance == {"n": 3, "source": "cat.csv", "model_id": "m-1"}


def test_data_roots(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)  # a symlink inside the root is the operator's choice
    ok = [str(root / "a.fits"), str(root / "link" / "b.fits")]
    out = [str(tmp_path / "c.fits"), str(root / ".." / "d.fits"), "/etc/passwd"]
    entries = [{"spectrum_id": p, "path": p} for p in ok + out]
    parsed = split_message({"spectra": entries}, data_roots=[root.resolve()])
    assert [r.path for r in parsed.requests] == ok
    assert [i.path for i in parsed.invalid] == out
    assert all("outside the allowed data roots" in i.reason for i in parsed.invalid)


def test_make_message_round_trips_as_strict_json() -> None:
    reqs = [SpectrumRequest("a", "/a.fits", 9.5, math.nan), SpectrumRequest("b", "/b.fits")]
    msg = make_message(reqs, {"source": "test"})
    text = json.dumps(msg, allow_nan=False)  # NaN went out as null
    assert parse_message(json.loads(text)) == [
        SpectrumRequest("a", "/a.fits", 9.5, None), SpectrumRequest("b", "/b.fits", None, None)
    ]
    with pytest.raises(MessageError):
        make_message([SpectrumRequest("", "/a.fits")])


# ---------------------------------------------------------------------------------------------
# The Celery app


def test_app_settings() -> None:
    settings = Settings(broker_url="redis://:s3cr%40t@redis.example:6380/4", visibility_timeout_s=120)
    app = make_app(settings)
    conf = app.conf
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_disable_prefetch
    assert conf.result_backend is None and conf.task_ignore_result
    assert conf.task_default_queue == QUEUE and conf.task_routes[TASK_NAME]["queue"] == QUEUE
    assert conf.broker_connection_retry_on_startup
    assert conf.worker_send_task_events and conf.task_send_sent_event
    assert conf.broker_transport_options["visibility_timeout"] == 120
    assert conf.result_backend_transport_options["visibility_timeout"] == 120
    assert app.astronn_settings is settings
    conn = app.connection_for_write()
    # The password is decoded from the URL; the transport gets the options.
    assert conn.password == "s3cr@t" and conn.hostname == "redis.example" and conn.port == 6380
    assert conn.transport_options["visibility_timeout"] == 120
    assert conn.ssl in (False, None)


def test_visibility_timeout_sweeps_are_bounded_by_it() -> None:
    opts = broker_transport_options(Settings(visibility_timeout_s=5))
    assert opts == {
        "visibility_timeout": 5,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": 5,
    }
    assert restore_interval_s(1800) == 10 and restore_interval_s(60) == 6
    with pytest.raises(ValueError, match="VISIBILITY_TIMEOUT"):
        broker_transport_options(Settings(visibility_timeout_s=0))


def test_rediss_url_gets_certificate_checks() -> None:
    assert broker_ssl_options("redis://localhost:6379/0") is None
    assert broker_ssl_options("rediss://:pw@host:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert broker_ssl_options(
        "rediss://host/0?ssl_cert_reqs=none&ssl_ca_certs=/etc/ca.pem"
    ) == {"ssl_cert_reqs": ssl.CERT_NONE, "ssl_ca_certs": "/etc/ca.pem"}
    with pytest.raises(ValueError, match="ssl_cert_reqs='maybe'"):
        broker_ssl_options("rediss://host/0?ssl_cert_reqs=maybe")
    app = make_app(Settings(broker_url="rediss://:pw@host:6380/0?ssl_cert_reqs=optional"))
    assert app.connection_for_write().ssl["ssl_cert_reqs"] == ssl.CERT_OPTIONAL


def test_importing_the_app_does_not_import_torch_or_the_task() -> None:
    import subprocess
    import sys

    code = "import sys, astronn_dist.worker.service.app; print('torch' in sys.modules, 'astronn_dist.worker.service.tasks' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_the_app_is_built_from_settings_never_at_import() -> None:
    """Importing the module reads no settings (a bad environment cannot break an import); the
    ``app`` of ``celery -A`` is built at its first read, from the environment, once."""
    import subprocess
    import sys

    code = (
        "import os, astronn_dist.worker.service.app as m\n"
        "assert m._from_environment is None\n"
        "print('imported', flush=True)\n"
        "os.environ['ASTRONN_DIST_BROKER_URL'] = 'redis://broker.example:6390/3'\n"
        "app = m.app\n"
        "assert app is m.app and app.conf.broker_url == 'redis://broker.example:6390/3'\n"
        "assert app.astronn_settings.broker_url == 'redis://broker.example:6390/3'\n"
        "try:\n"
        "    m.nothing\n"
        "except AttributeError:\n"
        "    print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASTRONN_DIST_")}
    env["ASTRONN_DIST_VISIBILITY_TIMEOUT"] = "not a number"  # read only when the app is built
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.split() == ["imported"] and "'not a number'" in done.stderr, done.stdout + done.stderr
    env.pop("ASTRONN_DIST_VISIBILITY_TIMEOUT")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout.split() == ["imported", "ok"], done.stderr


def test_the_worker_environment_carries_thread_counts_only(monkeypatch) -> None:
    from astronn_dist.worker.devices import WorkerPlan
    from astronn_dist.worker.service.serve import THREAD_ENV, thread_environment

    for name in THREAD_ENV:
        monkeypatch.delenv(name, raising=False)
    plan = WorkerPlan("cpu", 2, 3)
    assert thread_environment(plan) == {name: "3" for name in THREAD_ENV}
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the operator's choice stands
    assert thread_environment(plan) == {"MKL_NUM_THREADS": "3"}


# ---------------------------------------------------------------------------------------------
# Pure helpers of the task and the worker launcher


def test_retry_countdown_grows_is_jittered_and_stays_below_the_visibility_timeout() -> None:
    from astronn_dist.worker.service.decide import RETRY_BACKOFF_BASE_S, retry_countdown

    for retries in range(12):
        values = [retry_countdown(retries, 1800) for _ in range(200)]
        ceiling = min(300.0, RETRY_BACKOFF_BASE_S * 2**retries)
        assert all(ceiling / 2 <= v <= ceiling for v in values)
        assert len(set(values)) > 1
    assert max(retry_countdown(20, 10) for _ in range(100)) <= 5


def test_database_unavailable_is_told_from_other_errors(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from astronn_dist.worker.service.decide import database_unavailable

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.sqlite'}")
    with pytest.raises(sa.exc.OperationalError) as unreachable:
        engine.connect()
    assert database_unavailable(unreachable.value)
    ok = sa.create_engine(f"sqlite:///{tmp_path / 'ok.sqlite'}")
    with ok.begin() as conn:
        conn.execute(sa.text("CREATE TABLE t (k TEXT PRIMARY KEY)"))
        conn.execute(sa.text("INSERT INTO t VALUES ('a')"))
    with pytest.raises(sa.exc.IntegrityError) as duplicate, ok.begin() as conn:
        conn.execute(sa.text("INSERT INTO t VALUES ('a')"))
    assert not database_unavailable(duplicate.value)
    assert not database_unavailable(OSError(5, "EIO"))


# ---------------------------------------------------------------------------------------------
# process_chunk: the task's body, on the real files and a real database


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory):
    from _service import build_checkpoint

    from astronn_dist.worker.science.inference import Predictor
    from astronn_dist.worker.science.model import load_model

    checkpoint = build_checkpoint(tmp_path_factory.mktemp("model") / "random-dr17.pt")
    return Predictor(load_model(checkpoint), mc_passes=10, seed=0)


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest):
    from astronn_dist.worker.service.results import make_engine, migrate

    engine = make_engine(request.getfixturevalue(f"{request.param}_url"))
    migrate(engine)
    yield engine
    engine.dispose()


def _table(engine) -> dict[str, dict]:
    import sqlalchemy as sa

    from astronn_dist.worker.service.results import astro_nn_dist

    with engine.connect() as conn:
        return {r.spectrum_id: dict(r._mapping) for r in conn.execute(sa.select(astro_nn_dist))}


def _requests(apstar_files: list[Path], tmp_path: Path) -> list[SpectrumRequest]:
    broken = tmp_path / "broken.fits"
    broken.write_bytes(b"SIMPLE  =  nonsense")
    return [
        SpectrumRequest("bulge", str(apstar_files[0]), k_mag=None, ebv=None),
        SpectrumRequest("kepler", str(apstar_files[1]), k_mag=10.5, ebv=0.19),
        SpectrumRequest("broken", str(broken), k_mag=10.0, ebv=0.1),
        SpectrumRequest("missing", str(tmp_path / "nope.fits")),
    ]


def test_process_chunk_writes_one_row_per_spectrum(
    predictor, engine, apstar_files: list[Path], tmp_path: Path
) -> None:
    from astronn_dist.worker.science.distance import FLAG_MISSING_EXTINCTION, FLAG_NO_RESULT
    from astronn_dist.worker.service.messages import InvalidSpectrum
    from astronn_dist.worker.service.chunks import process_chunk

    invalid = [
        InvalidSpectrum(4, "typo", "/x.fits", "invalid message entry 4: unknown key(s) kmag"),
        InvalidSpectrum(5, None, None, "invalid message entry 5: must be an object, got int"),
    ]
    outcome = process_chunk(
        _requests(apstar_files, tmp_path), predictor=predictor, engine=engine, task_id="t-1",
        attempts=2, host="node@here", invalid=invalid,
    )
    assert (outcome.spectra, outcome.results, outcome.no_result, outcome.batches) == (5, 2, 3, 1)
    table = _table(engine)
    assert sorted(table) == ["broken", "bulge", "kepler", "missing", "typo"]
    for row in table.values():
        assert (row["task_id"], row["attempts"], row["host"]) == ("t-1", 2, "node@here")
        assert row["model_id"] == predictor.model_id and row["mc_passes"] == 10
    assert table["bulge"]["k_mag"] == pytest.approx(9.811)  # header photometry
    assert table["bulge"]["result_flags"] & FLAG_MISSING_EXTINCTION  # header SFD_EBV missing
    assert table["kepler"]["k_mag"] == 10.5 and table["kepler"]["dist"] > 0
    for sid in ("broken", "missing", "typo"):
        assert table[sid]["result_flags"] & FLAG_NO_RESULT and table[sid]["flag_bad"]
        assert table[sid]["dist"] is None and table[sid]["error"]
    assert "kmag" in table["typo"]["error"]

    # Again (a redelivery): the same rows, rewritten, no duplicates.
    process_chunk(_requests(apstar_files, tmp_path), predictor=predictor, engine=engine,
                  task_id="t-1", attempts=3, host="other@there")
    again = _table(engine)
    assert len(again) == 5 and again["kepler"]["dist"] == table["kepler"]["dist"]
    assert again["kepler"]["attempts"] == 3 and again["typo"]["attempts"] == 2


def test_process_chunk_writes_all_rows_or_none(
    predictor, engine, apstar_files: list[Path], tmp_path: Path
) -> None:
    import sqlalchemy as sa

    from astronn_dist.worker.service.chunks import process_chunk

    # A database that refuses one of the rows (as a constraint would): nothing is written.
    if engine.dialect.name == "sqlite":
        ddl = ["CREATE TRIGGER refuse BEFORE INSERT ON astro_nn_dist WHEN NEW.spectrum_id = 'kepler' "
               "BEGIN SELECT RAISE(ABORT, 'refused'); END"]
    else:
        ddl = ["CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN IF NEW.spectrum_id = 'kepler' "
               "THEN RAISE EXCEPTION 'refused'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
               "CREATE TRIGGER refuse BEFORE INSERT ON astro_nn_dist FOR EACH ROW "
               "EXECUTE FUNCTION refuse()"]
    with engine.begin() as conn:
        for statement in ddl:
            conn.execute(sa.text(statement))
    with pytest.raises(sa.exc.DBAPIError, match="refused"):
        process_chunk(_requests(apstar_files, tmp_path), predictor=predictor, engine=engine,
                      task_id="t-2", attempts=1, host="h")
    assert _table(engine) == {}


def test_out_of_memory_splits_the_batch(predictor, sqlite_url: str, apstar_files: list[Path], tmp_path: Path) -> None:
    """A predictor that runs out of memory above two spectra per batch (memory exhaustion cannot
    be caused safely in a test, so this real Predictor is given a budget): the chunk is split in
    halves until it fits, and every spectrum gets the numbers it gets in one batch."""
    from astronn_dist.worker.science.inference import Predictor
    from astronn_dist.worker.service.results import make_engine, migrate
    from astronn_dist.worker.service.chunks import process_chunk

    class SmallMemoryPredictor(Predictor):
        def predict(self, norm_flux, spectrum_ids):
            if len(spectrum_ids) > 2:
                raise MemoryError(f"cannot allocate a batch of {len(spectrum_ids)} spectra")
            return super().predict(norm_flux, spectrum_ids)

    small = SmallMemoryPredictor(predictor.model, mc_passes=10, seed=0)
    requests = [SpectrumRequest(f"s{i}", str(apstar_files[i % 2])) for i in range(7)]
    engine = make_engine(sqlite_url)
    migrate(engine)
    outcome = process_chunk(requests, predictor=small, engine=engine, task_id="t", attempts=1, host="h")
    assert outcome.batches == 4 and outcome.results == 7  # 7 -> 3 + 4 -> (1 + 2) + (2 + 2)
    table = _table(engine)
    reference = process_chunk(requests, predictor=predictor, engine=engine, task_id="t", attempts=1, host="h")
    assert reference.batches == 1
    again = _table(engine)
    for sid in table:
        assert table[sid]["dist"] == pytest.approx(again[sid]["dist"], rel=1e-6)
    engine.dispose()


def test_a_single_spectrum_out_of_memory_is_raised_and_nothing_written(
    predictor, sqlite_url: str, apstar_files: list[Path]
) -> None:
    from astronn_dist.worker.science.inference import Predictor
    from astronn_dist.worker.service.results import make_engine, migrate
    from astronn_dist.worker.service.chunks import process_chunk

    class NoMemoryPredictor(Predictor):
        def predict(self, norm_flux, spectrum_ids):
            raise MemoryError("no memory at all")

    engine = make_engine(sqlite_url)
    migrate(engine)
    requests = [SpectrumRequest(f"s{i}", str(apstar_files[i % 2])) for i in range(3)]
    with pytest.raises(MemoryError):  # the task retries it later
        process_chunk(requests, predictor=NoMemoryPredictor(predictor.model, mc_passes=10),
                      engine=engine, task_id="t", attempts=1, host="h")
    assert _table(engine) == {}
    engine.dispose()


# ---------------------------------------------------------------------------------------------
# A real worker refuses a pickled message


@pytest.mark.service
@pytest.mark.timeout(180)
def test_a_pickled_message_is_refused_and_the_worker_lives_on(
    redis_url: str, sqlite_url: str, apstar_files: list[Path], tmp_path: Path
) -> None:
    from _service import (
        Worker, build_checkpoint, publish, queue_length, rows, spectra_farm, wait_for, worker_env,
    )

    checkpoint = build_checkpoint(tmp_path / "model.pt")
    entries = spectra_farm(apstar_files, tmp_path / "spectra", 3)
    worker = Worker(worker_env(redis_url=redis_url, database_url=sqlite_url, model=checkpoint),
                    tmp_path / "worker.log", name="pickle")
    try:
        worker.wait_ready()
        pickled_entries = [dict(e, spectrum_id="pickled-" + e["spectrum_id"]) for e in entries]
        pickled = publish(redis_url, {"spectra": pickled_entries}, serializer="pickle")
        good = publish(redis_url, {"spectra": entries})
        ids = [e["spectrum_id"] for e in entries]
        wait_for(lambda: {r["spectrum_id"] for r in rows(sqlite_url)} >= set(ids), 90,
                 "the JSON chunk's rows", worker)
        # The chunk's log line follows its commit: wait for it rather than race it.
        wait_for(lambda: f"chunk {good}: 3 spectra" in worker.log(), 60,
                 "the JSON chunk's log line", worker)
        log = worker.log()
        assert "ContentDisallowed" in log and "application/x-python-serialize" in log
        assert not any(r["spectrum_id"].startswith("pickled-") for r in rows(sqlite_url))
        assert f"chunk {good}: 3 spectra" in log and f"chunk {pickled}" not in log
        assert queue_length(redis_url) == 0  # refused means removed, not left to loop
        assert worker.proc.poll() is None
    finally:
        worker.stop()
