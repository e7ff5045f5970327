"""astronn_dist.producer.watch: new files enqueued once, only when complete, across restarts; clean stop."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import redis

from astronn_dist.producer.enqueue import Publisher, model_id_of
from astronn_dist.producer.watch import FITS_BLOCK, Watcher, WatchOptions, WatchState
from astronn_dist.worker.config import QUEUE, Settings

from test_producer import queued_messages  # noqa: E402  (tests/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]


class Clock:
    """The watcher's time [s since the epoch], moved by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture()
def settings(tmp_path: Path, redis_url: str, sqlite_url: str) -> Settings:
    model = tmp_path / "watch-model.pt"
    model.write_bytes(b"weights")
    return Settings(broker_url=redis_url, database_url=sqlite_url, model_path=model)


@pytest.fixture()
def watch_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "incoming"
    folder.mkdir()
    return folder


def _copy(src: Path, dst: Path, age: float) -> Path:
    """Copy a real apStar file and make its mtime ``age`` seconds old."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    t = time.time() - age
    os.utime(dst, (t, t))
    return dst


def _spectra_sent(redis_url: str) -> list[dict]:
    return [s for m in queued_messages(redis_url) for s in m["kwargs"]["spectra"]]


class Harness:
    """A Watcher on real Redis (queue and state) with a hand-moved clock."""

    def __init__(self, settings: Settings, dirs, **kwargs) -> None:
        self.settings = settings
        self.clock = Clock()
        self.client = redis.Redis.from_url(settings.broker_url)
        self.model_id = model_id_of(settings.model_path)
        self.publisher = Publisher(settings).__enter__()
        self.lines: list[str] = []
        options = kwargs.pop("options", WatchOptions(min_age=1.0, flush_delay=0.0))
        self.watcher = Watcher(
            dirs,
            publisher=self.publisher,
            state=WatchState(self.client, self.model_id),
            model_id=self.model_id,
            options=options,
            log=self.lines.append,
            clock=self.clock,
            **kwargs,
        )

    def polls(self, n: int = 2, step: float = 1.0):
        reports = []
        for _ in range(n):
            reports.append(self.watcher.poll_once())
            self.clock.tick(step)
        return reports

    def close(self) -> None:
        self.publisher.__exit__(None, None, None)
        self.client.close()


def test_new_file_enqueued_once_and_restart_does_not_repeat(
    settings: Settings, watch_dir: Path, apstar_files: list[Path], redis_url: str
):
    a, b = apstar_files
    _copy(a, watch_dir / "f1" / a.name, age=60)
    h = Harness(settings, [watch_dir])
    first, second = h.polls(2)
    assert first.files == 1 and first.enqueued == 0  # first sight: wait for a second look
    assert second.enqueued == 1 and second.messages == 1
    assert h.polls(3)[-1].enqueued == 0
    sent = _spectra_sent(redis_url)
    assert sent == [
        {"spectrum_id": f"f1/{a.name}", "path": str(watch_dir / "f1" / a.name), "k_mag": None, "ebv": None}
    ]
    h.close()

    # A restart (new process: new Watcher, same Redis state) sends nothing already sent,
    # but does send a file that arrived meanwhile.
    _copy(b, watch_dir / b.name, age=60)
    h2 = Harness(settings, [watch_dir])
    reports = h2.polls(3)
    assert sum(r.enqueued for r in reports) == 1
    assert sum(r.skipped_done for r in reports) == 1
    assert [s["spectrum_id"] for s in _spectra_sent(redis_url)] == [f"f1/{a.name}", b.name]
    h2.close()


def test_growing_file_waits_until_complete_and_settled(
    settings: Settings, watch_dir: Path, apstar_files: list[Path], redis_url: str
):
    a = apstar_files[0]
    data = a.read_bytes()
    target = watch_dir / a.name
    h = Harness(settings, [watch_dir], options=WatchOptions(min_age=2.0, flush_delay=0.0))

    # Being copied: a new size at every poll.
    for part in (1000, 2880 * 3, 2880 * 3 + 17):
        target.write_bytes(data[:part])
        assert h.polls(1)[0].enqueued == 0
    # Stopped at a size that is not a whole number of FITS blocks: a half copy. It is not
    # taken while it is younger than incomplete_age, even though it no longer changes.
    t = h.clock.now - 10
    os.utime(target, (t, t))
    assert sum(r.enqueued for r in h.polls(3)) == 0
    # The copy completes: fresh mtime, so it must first settle for min_age.
    target.write_bytes(data)
    assert len(data) % FITS_BLOCK == 0
    h.clock.now = time.time()
    assert [r.enqueued for r in h.polls(2, step=0.5)] == [0, 0]  # unchanged, but too young
    assert sum(r.enqueued for r in h.polls(4, step=1.0)) == 1
    assert [s["spectrum_id"] for s in _spectra_sent(redis_url)] == [a.name]
    h.close()


def test_broken_file_is_sent_after_incomplete_age(settings: Settings, watch_dir: Path, redis_url: str):
    broken = watch_dir / "apStar-dr17-broken.fits"
    broken.write_bytes(b"SIMPLE  =" + b" " * 100)  # never becomes a whole FITS block
    t = time.time() - 400
    os.utime(broken, (t, t))
    h = Harness(settings, [watch_dir], options=WatchOptions(min_age=1.0, flush_delay=0.0, incomplete_age=300.0))
    assert sum(r.enqueued for r in h.polls(2)) == 1  # the worker will record why it is unreadable
    h.close()


def test_rewritten_file_is_enqueued_again(
    settings: Settings, watch_dir: Path, apstar_files: list[Path], redis_url: str
):
    a, b = apstar_files
    target = _copy(a, watch_dir / a.name, age=120)
    h = Harness(settings, [watch_dir])
    assert sum(r.enqueued for r in h.polls(3)) == 1
    # A newer reduction replaces the file (new content, new mtime).
    _copy(b, target, age=30)
    reports = h.polls(3)
    assert sum(r.enqueued for r in reports) == 1
    assert [s["spectrum_id"] for s in _spectra_sent(redis_url)] == [a.name, a.name]
    h.close()


def test_results_table_decides_what_is_done(
    settings: Settings, watch_dir: Path, apstar_files: list[Path], redis_url: str
):
    """A row newer than the file: done. A row older than the file: a newer reduction, redo.
    --force: the table is ignored."""
    from astronn_dist.worker.service import results
    a, b = apstar_files
    _copy(a, watch_dir / a.name, age=3600)  # processed after it was written
    _copy(b, watch_dir / b.name, age=60)  # rewritten after its row
    results.migrate(settings.database_url)
    engine = results.make_engine(settings.database_url)
    model_id = model_id_of(settings.model_path)
    from test_producer import _write_rows

    _write_rows(settings.database_url, model_id, [a.name, b.name])
    ten_minutes_ago = datetime.now(timezone.utc) - timedelta(minutes=10)
    with engine.begin() as conn:
        conn.execute(
            results.astro_nn_dist.update()
            .where(results.astro_nn_dist.c.spectrum_id == b.name)
            .values(created=ten_minutes_ago)
        )
    h = Harness(settings, [watch_dir], engine=engine)
    reports = h.polls(3)
    assert sum(r.enqueued for r in reports) == 1 and sum(r.skipped_done for r in reports) == 1
    assert [s["spectrum_id"] for s in _spectra_sent(redis_url)] == [b.name]
    h.close()

    h.client.delete(h.watcher.state.key)
    h = Harness(settings, [watch_dir], engine=engine, options=WatchOptions(min_age=1.0, flush_delay=0.0, force=True))
    assert sum(r.enqueued for r in h.polls(3)) == 2
    h.close()
    engine.dispose()


def test_catalog_rows_and_flush_delay(
    settings: Settings, tmp_path: Path, watch_dir: Path, apstar_files: list[Path], redis_url: str
):
    a, b = apstar_files
    _copy(a, watch_dir / a.name, age=60)
    elsewhere = _copy(b, tmp_path / "elsewhere" / b.name, age=60)
    catalog = tmp_path / "stars.csv"
    catalog.write_text(f"path,spectrum_id,K,E_BV\nincoming/{a.name},star-a,9.811,0.25\n")
    t = time.time() - 60
    os.utime(catalog, (t, t))
    h = Harness(
        settings, [watch_dir], catalog=catalog,
        options=WatchOptions(min_age=1.0, flush_delay=5.0, chunk_size=10),
    )
    reports = h.polls(2)
    assert reports[-1].pending == 1 and reports[-1].enqueued == 0  # a partial chunk waits...
    reports = h.polls(5)
    assert sum(r.enqueued for r in reports) == 1  # ...at most flush_delay
    assert _spectra_sent(redis_url) == [
        {"spectrum_id": "star-a", "path": str(watch_dir / a.name), "k_mag": 9.811, "ebv": 0.25}
    ]

    # A row added to the catalog, for a file outside the watched folder.
    with catalog.open("a") as fh:
        fh.write(f"{elsewhere},star-b,10.522,\n")
    t = time.time() - 30
    os.utime(catalog, (t, t))
    reports = h.polls(10)
    assert sum(r.enqueued for r in reports) == 1
    assert any("2 rows (1 new)" in line for line in h.lines)
    assert _spectra_sent(redis_url)[-1] == {
        "spectrum_id": "star-b", "path": str(elsewhere), "k_mag": 10.522, "ebv": None
    }
    h.close()


def test_sigterm_flushes_pending_and_exits_cleanly(
    settings: Settings, watch_dir: Path, apstar_files: list[Path], redis_url: str
):
    """The CLI in a subprocess: a ready file waits in a partial chunk (long flush delay);
    SIGTERM sends it and exits 0."""
    a = apstar_files[0]
    _copy(a, watch_dir / a.name, age=60)
    cmd = [
        sys.executable, "-m", "astronn_dist.producer.cli", "watch", str(watch_dir),
        "--broker", redis_url, "--db", settings.database_url, "--model", str(settings.model_path),
        "--poll-interval", "0.2", "--min-age", "0.5", "--flush-delay", "600",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.time() + 60
    while not any("1 spectra ready" in line for line in lines):
        assert proc.poll() is None, "".join(lines)
        assert time.time() < deadline, "".join(lines)
        time.sleep(0.1)
    assert redis.Redis.from_url(redis_url).llen(QUEUE) == 0  # still pending
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, "".join(lines)
    reader.join(timeout=5)
    assert [s["spectrum_id"] for s in _spectra_sent(redis_url)] == [a.name]
    assert any("stopped: 1 spectra enqueued in 1 messages" in line for line in lines), "".join(lines)


def test_table_created_after_the_watcher_started(
    settings: Settings, watch_dir: Path, apstar_files: list[Path], redis_url: str
):
    """Started before `migrate`: nothing counts as done; once the table exists, its rows do."""
    from astronn_dist.worker.service import results
    from test_producer import _write_rows

    a, b = apstar_files
    _copy(a, watch_dir / a.name, age=60)
    engine = results.make_engine(settings.database_url)
    h = Harness(settings, [watch_dir], engine=engine)
    assert sum(r.enqueued for r in h.polls(3)) == 1
    _write_rows(settings.database_url, h.model_id, [b.name])  # migrates, then a row newer than b
    _copy(b, watch_dir / b.name, age=60)
    reports = h.polls(3)
    assert sum(r.enqueued for r in reports) == 0 and sum(r.skipped_done for r in reports) == 1
    h.close()
    engine.dispose()


def test_reconcile_sends_again_what_the_broker_lost(
    settings: Settings, watch_dir: Path, apstar_files: list[Path], redis_url: str
):
    """Two files sent; one gets its row, then Redis loses the queue: the next reconcile
    resends only the one with neither a row nor a message, and a message still waiting
    keeps its file from being sent twice."""
    from test_producer import _write_rows
    from astronn_dist.worker.service import results
    a, b = apstar_files
    _copy(a, watch_dir / a.name, age=60)
    _copy(b, watch_dir / b.name, age=60)
    results.migrate(settings.database_url)
    engine = results.make_engine(settings.database_url)
    options = WatchOptions(min_age=1.0, flush_delay=0.0, reconcile_interval=30.0)
    h = Harness(settings, [watch_dir], engine=engine, options=options)
    assert sum(r.enqueued for r in h.polls(3)) == 2
    assert sum(r.reconciled for r in h.polls(40)) == 0  # both still on the queue

    _write_rows(settings.database_url, h.model_id, [a.name])  # a is done ...
    h.client.delete(QUEUE)  # ... and the broker lost b's message
    reports = h.polls(40)
    assert sum(r.reconciled for r in reports) == 1 and sum(r.enqueued for r in reports) == 1
    assert [s["spectrum_id"] for s in _spectra_sent(redis_url)] == [b.name]
    assert any("reconcile: 1 spectra" in line for line in h.lines)
    assert sum(r.reconciled for r in h.polls(40)) == 0  # b is queued again: nothing more
    h.close()
    engine.dispose()


def test_a_catalog_read_block_by_block(
    settings: Settings, tmp_path: Path, apstar_files: list[Path], redis_url: str, monkeypatch
):
    """--catalog without folders, read one row at a time: every row's file, id and photometry,
    an exact repeat once, and a bad catalog refused at the start with its row."""
    import astronn_dist.producer.catalog as catalog_module

    monkeypatch.setattr(catalog_module, "BLOCK_ROWS", 1)
    a, b = apstar_files
    elsewhere = tmp_path / "elsewhere"
    _copy(a, elsewhere / a.name, age=60)
    _copy(b, elsewhere / b.name, age=60)
    catalog = tmp_path / "stars.csv"
    catalog.write_text(
        f"path,spectrum_id,K,E_BV\nelsewhere/{a.name},star-a,9.811,0.25\n"
        f"elsewhere/{b.name},star-b,,0.1\nelsewhere/{a.name},star-a,9.811,0.25\n"
    )
    h = Harness(settings, [], catalog=catalog)
    assert any("2 rows (2 new)" in line for line in h.lines)
    assert sum(r.enqueued for r in h.polls(3)) == 2
    assert sorted(_spectra_sent(redis_url), key=lambda s: s["spectrum_id"]) == [
        {"spectrum_id": "star-a", "path": str(elsewhere / a.name), "k_mag": 9.811, "ebv": 0.25},
        {"spectrum_id": "star-b", "path": str(elsewhere / b.name), "k_mag": None, "ebv": 0.1},
    ]
    h.close()

    catalog.write_text(f"path,K\nelsewhere/{a.name},9.8\nelsewhere/{b.name},faint\n")
    from astronn_dist.producer.catalog import CatalogError

    with pytest.raises(CatalogError, match="row 2, column 'K' is not numeric"):
        Watcher([], publisher=None, state=None, model_id="m", catalog=catalog)  # type: ignore[arg-type]
