"""The command line: `run` end to end on the real files, and the service commands around it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis
import sqlalchemy as sa

from astronn_dist.producer.cli import _flag_text
from astronn_dist.producer.enqueue import model_id_of
from astronn_dist.worker.config import QUEUE

from _service import run_cli, wait_for  # noqa: E402  (tests/ is on sys.path)
from test_producer import queued_messages  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


cli = run_cli  # (exit status, stdout, stderr) of astronn-dist ARGS in this process


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path: Path):
    """No ASTRONN_DIST_* from the caller's environment; a wide terminal; a scratch cwd."""
    for name in list(os.environ):
        if name.startswith("ASTRONN_DIST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory) -> Path:
    """A small checkpoint with random weights (the real network's shapes; seeded)."""
    import torch
    from astronn_dist.worker.science.model import ApogeeDistBCNN, save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(ApogeeDistBCNN(), tmp_path_factory.mktemp("model") / "random.pt")


def _rows(database_url: str) -> list[dict]:
    engine = sa.create_engine(database_url)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM astro_nn_dist ORDER BY spectrum_id"))]
    engine.dispose()
    return rows


def test_run_on_the_real_files(capsys, apstar_files: list[Path], random_model: Path, sqlite_url: str, tmp_path: Path):
    folder = tmp_path / "apstar"
    folder.mkdir()
    for f in apstar_files:
        shutil.copy(f, folder / f.name)
    (folder / "apStar-dr17-broken.fits").write_bytes(b"not a FITS file")
    args = ["run", str(folder), "--model", str(random_model), "--mc-passes", "10", "--db", sqlite_url]
    code, out, err = cli(capsys, *args)
    assert code == 0, out + err
    rows = _rows(sqlite_url)
    assert [r["spectrum_id"] for r in rows] == sorted(
        [f.name for f in apstar_files] + ["apStar-dr17-broken.fits"]
    )
    model_id = model_id_of(random_model)
    assert {r["model_id"] for r in rows} == {model_id} and {r["mc_passes"] for r in rows} == {10}
    broken = next(r for r in rows if r["spectrum_id"] == "apStar-dr17-broken.fits")
    good = [r for r in rows if r is not broken]
    assert broken["error"] and broken["result_flags"] & 2048 and broken["dist"] is None
    assert all(r["error"] is None and r["L_fakemag"] is not None for r in good)
    # The bulge giant has header K but no SFD_EBV: missing extinction, from the header.
    bulge = next(r for r in good if "2M17335483" in r["spectrum_id"])
    assert bulge["k_mag"] == pytest.approx(9.811, abs=1e-3) and bulge["result_flags"] & 4
    # The printed table: every spectrum, its flags, the error and the summary line.
    for r in rows:
        assert r["spectrum_id"] in out
    assert _flag_text(bulge["result_flags"]) in out and "2048 X" in out and "E no E(B-V)" in out
    assert "dist, err [pc]; Ks, E(B-V) [mag] as used" in out  # the units, not eaten as markup
    # One broken file among good ones: flagged rows are normal, the exit status is 0.
    assert "3 spectra processed in this run in " in out and "1 no result)" in out and model_id in out
    assert "already done, skipped" not in out

    # Again: everything is done for this model, nothing is recomputed, and the summary says so
    # (rather than "0 spectra processed; 2 good" as if this run had found them good); exit 0.
    code, out, err = cli(capsys, *args)
    assert code == 0, out + err
    assert "3 spectra found, 3 already done" in out
    assert "0 spectra processed in this run: nothing to do; 3 already done, skipped (" in out
    assert "1 no result; --force to redo them)" in out
    created = [r["created"] for r in _rows(sqlite_url)]
    code, out, _ = cli(capsys, *args, "--force")
    assert code == 0 and "3 spectra processed in this run" in out and "already done, skipped" not in out
    assert len(_rows(sqlite_url)) == 3 and [r["created"] for r in _rows(sqlite_url)] != created

    # export, in the three formats, reads back the same rows (the run's model: --model).
    from astropy.table import Table

    for name in ("out.csv", "out.fits", "out.parquet"):
        code, out, err = cli(capsys, "export", str(tmp_path / name), "--db", sqlite_url, "--model", str(random_model))
        assert code == 0 and f"wrote 3 rows of model {model_id}" in out, out + err
        table = Table.read(tmp_path / name)
        assert list(table["spectrum_id"]) == [r["spectrum_id"] for r in _rows(sqlite_url)]
        assert "dist" in table.colnames and "flag_no_result" in table.colnames
        broken_row = table[list(table["spectrum_id"]).index("apStar-dr17-broken.fits")]
        assert np.ma.is_masked(broken_row["dist"]) or np.isnan(broken_row["dist"])  # NaN (CSV: astropy masks it)
        assert broken_row["error"] == broken["error"]
    code, out, err = cli(capsys, "export", str(tmp_path / "out.fits"), "--db", sqlite_url)
    assert code == 2 and "exists" in out + err


def test_requeue_failed(capsys, redis_url: str, sqlite_url: str, random_model: Path, tmp_path: Path, apstar_files: list[Path]):
    folder = tmp_path / "spectra"
    folder.mkdir()
    shutil.copy(apstar_files[1], folder / apstar_files[1].name)
    (folder / "apStar-dr17-broken.fits").write_bytes(b"truncated")
    code, out, err = cli(capsys, "run", str(folder), "--model", str(random_model), "--mc-passes", "2", "--db", sqlite_url)
    assert code == 0, out + err
    code, out, err = cli(capsys, "requeue", "--failed", "--broker", redis_url, "--db", sqlite_url, "--model", str(random_model))
    assert code == 0 and "requeued 1 spectra in 1 messages" in out, out + err
    (message,) = queued_messages(redis_url)
    assert [s["spectrum_id"] for s in message["kwargs"]["spectra"]] == ["apStar-dr17-broken.fits"]
    code, out, err = cli(capsys, "requeue", "--broker", redis_url, "--db", sqlite_url, "--model", str(random_model))
    assert code == 2 and "--failed" in err


def test_produce_and_reconcile(capsys, redis_url: str, sqlite_url: str, tmp_path: Path):
    model = tmp_path / "m.pt"
    model.write_bytes(b"m")
    catalog = tmp_path / "stars.csv"
    catalog.write_text("path,K\n" + "".join(f"spectra/apStar-{i}.fits,{9 + i / 10}\n" for i in range(300)))
    common = ["--broker", redis_url, "--db", sqlite_url, "--model", str(model)]
    code, out, err = cli(capsys, "produce", "--catalog", str(catalog), "--chunk-size", "128", *common)
    assert code == 0, out + err
    assert "found 300 spectra" in out and "enqueued 300 spectra in 3 messages" in out and "spectra/s" in out
    assert [len(m["kwargs"]["spectra"]) for m in queued_messages(redis_url)] == [128, 128, 44]
    # reconcile: everything is on the queue already.
    code, out, err = cli(capsys, "reconcile", "--catalog", str(catalog), *common)
    assert code == 0 and "300 are on the queue; enqueued 0" in out, out + err
    # The queue is lost (e.g. Redis restarted without persistence): reconcile sends it all again.
    redis.Redis.from_url(redis_url).delete(QUEUE)
    code, out, err = cli(capsys, "reconcile", "--catalog", str(catalog), *common)
    assert code == 0 and "0 are on the queue; enqueued 300 in 3 messages" in out, out + err


def test_status_masks_passwords(capsys, redis_url: str, postgres_url: str, tmp_path: Path):
    # PostgreSQL here trusts local connections, so a URL with a password still connects.
    db = postgres_url.replace("postgres@", "postgres:hunter2@")
    code, out, err = cli(capsys, "migrate", "--db", db)
    assert code == 0, out + err
    code, out, err = cli(capsys, "status", "--broker", redis_url, "--db", db)
    assert code == 0, out + err
    assert "postgres:***@" in out and f"queue {QUEUE}: 0 messages waiting" in out
    assert "hunter2" not in out + err
    # A broker that cannot be reached: one line, exit 2, still no password.
    code, out, err = cli(capsys, "status", "--broker", "redis://:hunter2@127.0.0.1:1/0", "--db", db)
    assert code == 2 and "cannot reach the broker at redis://:***@127.0.0.1:1/0" in err
    assert "hunter2" not in out + err and "Traceback" not in out + err


@pytest.mark.parametrize(
    "args, message",
    [
        (["produce", "--catalog", "missing.csv"], "missing.csv: catalog not found"),
        (["run", "no/such/folder"], "no/such/folder: no such file or folder"),
        (["run", "."], "no apStar files found"),
        (["migrate", "--db", "nosuchdb://x"], "bad database URL"),
        (["export", "out.txt"], "unknown format '.txt'"),
        (["run", ".", "--model", "missing.pt"], "model checkpoint not found: missing.pt"),
        (["worker", "--metrics-addr", "nope"],
         "metrics address 'nope' (ASTRONN_DIST_METRICS_ADDR or --metrics-addr) is not an IP address"),
        (["worker", "--metrics-addr", "localhost"], "use 0.0.0.0 (every IPv4 interface), 127.0.0.1 (this host only)"),
        (["requeue", "--failed", "--db", "sqlite:///empty.sqlite"], "no results table in sqlite:///empty.sqlite"),
    ],
)
def test_user_errors_are_one_line(capsys, args: list[str], message: str, tmp_path: Path):
    (tmp_path / "apStar-x.fits").write_bytes(b"x") if "missing.pt" in args else None
    code, out, err = cli(capsys, *args)
    assert code == 2, out + err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_migrate_and_synth(capsys, sqlite_url: str, tmp_path: Path):
    from astronn_dist.worker.service.results import head_revision

    head = head_revision()
    code, out, err = cli(capsys, "migrate", "--db", sqlite_url)
    assert code == 0 and f"created the results table astro_nn_dist at revision {head} in {sqlite_url}" in out, out + err
    assert sa.inspect(sa.create_engine(sqlite_url)).has_table("astro_nn_dist")
    code, out, err = cli(capsys, "migrate", "--db", sqlite_url)
    assert code == 0 and f"results table already at revision {head} (the newest)" in out, out + err
    assert "nothing to do" in out and "created" not in out
    code, out, err = cli(capsys, "synth", str(tmp_path / "survey"), "--n", "2", "--seed", "3")
    assert code == 0, out + err
    assert len(list((tmp_path / "survey").rglob("apStar-*.fits"))) == 2
    assert (tmp_path / "survey" / "catalog.csv").is_file()


def test_migrate_says_it_upgraded(capsys, sqlite_url: str):
    """A table at the revision before the newest (as an older astronn-dist left it)."""
    from alembic import command
    from alembic.script import ScriptDirectory

    from astronn_dist.worker.service.results import alembic_config, head_revision, make_engine, migration_transaction

    config = alembic_config()
    previous = ScriptDirectory.from_config(config).get_revision(head_revision()).down_revision
    if not isinstance(previous, str):
        pytest.skip("no single revision before the newest to upgrade from")
    engine = make_engine(sqlite_url)
    with migration_transaction(engine) as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, previous)
    engine.dispose()
    code, out, err = cli(capsys, "migrate", "--db", sqlite_url)
    assert code == 0, out + err
    assert f"upgraded the results table from revision {previous} to {head_revision()} in {sqlite_url}" in out


def test_console_script_imports_no_torch():
    code = "import sys, astronn_dist.producer.cli; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "astronn_dist.producer.cli", "--help"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0 and "produce" in done.stdout


def test_produce_then_worker_end_to_end(capsys, redis_url: str, sqlite_url: str, random_model: Path, apstar_files: list[Path], sample_dir: Path):
    """The service path: `produce` the real files, a `worker` subprocess writes their rows and
    serves its metrics on 127.0.0.1 only (--metrics-addr), its start-up log is clean, SIGTERM
    stops it cleanly."""
    import signal
    import urllib.request

    from _servers import free_port, listening_addresses  # tests/ is on sys.path

    if not Path("/proc/net/tcp").exists():
        pytest.skip("reads the listening address in /proc/net/tcp (Linux)")
    metrics_port = free_port()
    common = ["--broker", redis_url, "--db", sqlite_url, "--model", str(random_model)]
    code, out, err = cli(capsys, "produce", str(sample_dir), *common)
    assert code == 0 and "enqueued 2 spectra in 1 messages" in out, out + err
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "astronn_dist.producer.cli", "worker", "--device", "cpu", "--concurrency", "1",
         "--mc-passes", "10", "--metrics-addr", "127.0.0.1", "--metrics-port", str(metrics_port), *common],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        def written() -> list[dict]:
            assert worker.poll() is None, "the worker exited"
            try:
                rows = _rows(sqlite_url)
            except sa.exc.OperationalError:  # the worker has not created the table yet
                return []
            return rows if len(rows) == 2 else []

        rows = wait_for(written, 240, "the worker's 2 rows")
        assert [r["spectrum_id"] for r in rows] == [f.name for f in apstar_files]
        assert all(r["mc_passes"] == 10 and r["model_id"] == model_id_of(random_model) for r in rows)
        assert redis.Redis.from_url(redis_url).llen(QUEUE) == 0
        counted = 'astronn_dist_spectra_total{outcome="result"} 2.0'

        def scraped() -> str:  # the rows are committed before they are counted
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            return text if counted in text else ""

        wait_for(scraped, 30, "the rows counted in the metrics")
        assert listening_addresses(metrics_port) == {"127.0.0.1"}  # not 0.0.0.0, the default
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            output = worker.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            worker.kill()
            output = worker.communicate()[0]
    assert worker.returncode == 0, output[-3000:]
    # The start-up log: the metrics address, and none of Alembic's INFO lines nor Celery's
    # task-name placeholders (a pool process logs its model load outside any task).
    assert f"Prometheus metrics on http://127.0.0.1:{metrics_port}/metrics" in output, output[-3000:]
    assert "loaded model" in output and "warm in" in output, output[-3000:]
    for noise in ("???", "alembic", "setup plugin", "Context impl", "Will assume"):
        assert noise not in output, (noise, output[-3000:])
    # Produce again: both are done for this model, nothing is sent.
    code, out, err = cli(capsys, "produce", str(sample_dir), *common)
    assert code == 0 and "skipped 2 already done" in out and "enqueued 0 spectra" in out


def test_run_refuses_bad_device_and_corrupt_checkpoint(capsys, sample_dir: Path, random_model: Path, sqlite_url: str, tmp_path: Path):
    spectra = str(sample_dir)
    code, out, err = cli(capsys, "run", spectra, "--model", str(random_model), "--device", "tpu", "--db", sqlite_url)
    assert code == 2 and "device 'tpu'" in err and "Traceback" not in err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(random_model.read_bytes()[:1000])
    code, out, err = cli(capsys, "run", spectra, "--model", str(corrupt), "--db", sqlite_url)
    assert code == 2 and str(corrupt) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_run_uses_the_bundled_model_on_the_shipped_samples_without_any_server(
    capsys, monkeypatch, tmp_path: Path
):
    """The README's main job: `astronn-dist run samples/apstar` with nothing configured and no
    broker reachable (the broker URL points at a closed port) writes astronn-dist.sqlite."""
    from astronn_dist.worker.config import BUNDLED_MODEL

    monkeypatch.setenv("ASTRONN_DIST_BROKER_URL", "redis://127.0.0.1:9/0")  # nothing listens
    code, out, err = cli(capsys, "run", str(REPO / "samples" / "apstar"), "--mc-passes", "20")
    assert code == 0, out + err
    rows = _rows(f"sqlite:///{tmp_path / 'astronn-dist.sqlite'}")
    assert len(rows) == 2 and {r["model_id"] for r in rows} == {model_id_of(BUNDLED_MODEL)}
    assert all(r["error"] is None and r["dist"] > 0 for r in rows)
    assert "2 spectra processed" in out and "astronn-dist-demo-" in out


def test_run_exits_1_when_no_spectrum_got_a_result_and_0_when_nothing_is_left(
    capsys, random_model: Path, sqlite_url: str, tmp_path: Path
):
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("apStar-a.fits", "apStar-b.fits"):
        (folder / name).write_bytes(b"not a FITS file")
    args = ["run", str(folder), "--model", str(random_model), "--mc-passes", "2", "--db", sqlite_url]
    code, out, err = cli(capsys, *args)
    assert code == 1, out + err
    assert "none of the 2 spectra processed got a result" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert "2 spectra processed in this run in " in out and "(2 no result)" in out
    assert [r["spectrum_id"] for r in _rows(sqlite_url)] == ["apStar-a.fits", "apStar-b.fits"]  # rows, all the same
    # Again: nothing is left to do, which is not an error.
    code, out, err = cli(capsys, *args)
    assert code == 0 and not err, out + err
    assert "0 spectra processed in this run: nothing to do; 2 already done, skipped (2 no result;" in out
    # --force tries them again, and fails again.
    code, out, err = cli(capsys, *args, "--force")
    assert code == 1 and "none of the 2 spectra processed got a result" in err


def test_a_bad_metrics_address_in_the_environment_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("ASTRONN_DIST_METRICS_ADDR", "0.0.0.0:9808")
    code, out, err = cli(capsys, "worker")
    assert code == 2 and "Traceback" not in err
    assert "bad ASTRONN_DIST_* environment variable: metrics address '0.0.0.0:9808'" in err
    assert len(err.strip().splitlines()) == 1, err


def _help(capsys, monkeypatch, *command: str) -> str:
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = cli(capsys, *command, "--help")
    assert code == 0 and not err, out + err
    return out


def _commands() -> dict:
    import typer.main

    from astronn_dist.producer.cli import app

    return typer.main.get_command(app).commands


EVERY_COMMAND = ["run", "produce", "reconcile", "worker", "watch", "requeue", "status", "export", "report",
                 "migrate", "synth", "train", "import-model"]


def test_every_command_is_covered_here():
    assert sorted(_commands()) == sorted(EVERY_COMMAND)


@pytest.mark.parametrize("name", EVERY_COMMAND)
def test_help_has_an_example_shown_verbatim_and_flags_as_flags(capsys, monkeypatch, name: str):
    import inspect

    from rich.text import Text

    command = _commands()[name]
    doc = inspect.cleandoc(command.help)
    _, after = doc.split("Example:\n", 1)
    examples = [line.strip() for line in after.split("\n\n")[0].splitlines()]
    assert examples and all(line.startswith("astronn-dist ") for line in examples), doc
    assert any(line.startswith(f"astronn-dist {name} ") for line in examples), doc
    out = _help(capsys, monkeypatch, name)
    lines = [line.strip() for line in out.splitlines()]
    for example in examples:  # on one line of its own at 80 columns, not wrapped nor joined
        assert example in lines, (example, out)
    assert "<bool>" not in out and "[default: False]" not in out, out
    # Every parameter has a help text, and nothing in it is taken for rich markup and dropped
    # (a "[default: ...]" in a help text vanished and left "Pool processes .").
    for param in command.params:
        assert param.help, f"{name} {param.name}: no help text"
        assert Text.from_markup(param.help).plain == param.help, (name, param.name, param.help)
    assert Text.from_markup(doc).plain == doc, doc
    import re

    stray = re.compile(r"\S [.,;:](\s|$)|\( | \)")  # "Pool processes .", "( x", "x )"
    assert not [line for line in out.splitlines() if stray.search(line.strip("│ "))], out


def test_flags_show_no_value_in_help(capsys, monkeypatch):
    out = _help(capsys, monkeypatch, "requeue")
    for flag in ("--failed", "--bad", "--help"):
        (line,) = [line for line in out.splitlines() if line.startswith(f"│ {flag} ")]
        assert line.split(flag, 1)[1].split()[0] != "<bool>", line
    assert "--spectrum          <list[str]>" in out  # options that take a value keep their type


def test_run_help_documents_its_exit_status(capsys, monkeypatch):
    out = " ".join(_help(capsys, monkeypatch, "run").split())
    assert "Exit status: 0 every spectrum processed in this run got a row, and at least one of them a result" in out
    assert "1 spectra were processed but none got a result" in out
    assert "2 a usage or configuration error" in out


def test_worker_help_documents_the_metrics_address(capsys, monkeypatch):
    out = " ".join(_help(capsys, monkeypatch, "worker").split()).replace("│ ", "")
    assert "--metrics-addr" in out and "ASTRONN_DIST_METRICS_ADDR" in out and "default 0.0.0.0" in out.replace("│", "")


def test_worker_logs_quiet_alembic_unless_verbose_and_print_no_task_placeholders():
    import logging

    from astronn_dist.worker.service import logs
    alembic = logging.getLogger("alembic")
    level = alembic.level
    try:
        logs._setup_worker_logger(logging.getLogger("test-root"), loglevel=logging.INFO)
        assert alembic.getEffectiveLevel() == logging.WARNING
        assert not logging.getLogger("alembic.runtime.plugins").isEnabledFor(logging.INFO)
        logs._setup_worker_logger(logging.getLogger("test-root"), loglevel=logging.DEBUG)  # --verbose
        assert logging.getLogger("alembic.runtime.migration").isEnabledFor(logging.INFO)
    finally:
        alembic.setLevel(level)
    formatter = logs.TaskTextFormatter(
        "[%(levelname)s/%(processName)s] %(task_name)s[%(task_id)s]: %(message)s", use_color=False
    )
    record = logging.LogRecord("astronn_dist.worker.service.tasks", logging.INFO, __file__, 1, "process %d loaded", (7,), None)
    assert formatter.format(record) == "[INFO/MainProcess] process 7 loaded"  # outside a task
