"""The service end to end: ``produce`` -> Redis -> real ``astronn-dist worker`` processes ->
committed rows, on SQLite and PostgreSQL; the producer's enqueue rate; the workers' peak RSS.

    python -m bench.bench_service [--spectra 2000] [--databases sqlite postgres]

Needs Redis and PostgreSQL (``scripts/services.sh`` starts them). Uses Redis database 15 of
``--redis`` (flushed) and a fresh PostgreSQL database that it drops afterwards. The spectra are
symlinks to the real DR17 files in samples/apstar under distinct spectrum ids, so each is read
from page cache, normalized and run through 100 MC passes as any other.

A run's clock starts when the first message is published and stops when the last row is
committed (the row count polled every 50 ms): it includes the producer, the queue, reading,
normalization, inference and the database. Workers are started (model loaded, database
migrated) before the clock starts; "pinned" workers run under ``taskset`` on one core each, so
1 and 2 pinned workers show how the service scales out with cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.table import Row, print_rows
from astronn_dist.producer.enqueue import enqueue
from astronn_dist.worker.config import Settings
from astronn_dist.worker.contract import SpectrumRequest

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "apstar"
REDIS_DB = 15


def farm(folder: Path, n: int) -> list[SpectrumRequest]:
    """``n`` symlinks to the sample files, as requests with the headers' photometry."""
    targets = sorted(SAMPLES.glob("apStar-*.fits"))
    folder.mkdir(parents=True, exist_ok=True)
    requests = []
    for i in range(n):
        target = targets[i % len(targets)]
        link = folder / f"{i:06d}-{target.name}"
        if not link.exists():
            link.symlink_to(target)
        requests.append(SpectrumRequest(spectrum_id=f"bench-{i:06d}", path=str(link)))
    return requests


def row_count(database_url: str, *, clear: bool = False) -> int:
    """Rows in the results table (``clear``: delete them all first, for a fresh run)."""
    import sqlalchemy as sa

    from astronn_dist.worker.service.results import make_engine

    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            if clear:
                conn.execute(sa.text("DELETE FROM astro_nn_dist"))
            return int(conn.execute(sa.text("SELECT count(*) FROM astro_nn_dist")).scalar_one())
    finally:
        engine.dispose()


class WorkerProcess:
    """``astronn-dist worker --device cpu`` with its default plan (a pool process per usable
    core), optionally under ``taskset -c core`` (then one process, one thread)."""

    def __init__(self, settings: Settings, log: Path, core: int | None) -> None:
        argv = [sys.executable, "-m", "astronn_dist.producer.cli", "worker", "--device", "cpu",
                "--metrics-port", "0", "--model", str(settings.model_path),
                "--mc-passes", str(settings.mc_passes),
                "--broker", settings.broker_url, "--db", settings.database_url]
        if core is not None:
            argv = ["taskset", "-c", str(core), *argv]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ASTRONN_DIST_")}
        env["PYTHONPATH"] = str(REPO)
        self.log = log
        self._fh = log.open("wb")
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=self._fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def pool_pids(self) -> list[int]:
        """The worker's pool processes (its children)."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                pids.append(int(stat.parent.name))
        return pids

    def wait_warm(self, timeout: float = 180.0) -> None:
        """Until every pool process has loaded the model and migrated the database."""
        deadline = time.monotonic() + timeout
        while True:
            pool = self.pool_pids()
            if pool and self.log.read_text(errors="replace").count(" warm in ") >= len(pool):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not get warm:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def peak_rss_mb(self) -> float:
        """Largest VmHWM (peak resident set) of one pool process [MiB]."""
        peak = 0
        for pid in self.pool_pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
            except OSError:
                continue
        return peak / 1024

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self._fh.close()


def end_to_end(settings: Settings, requests: Sequence[SpectrumRequest], workers: int,
               pinned: bool, chunk: int, logs: Path, label: str) -> Row:
    import redis

    from astronn_dist.worker.service.results import migrate

    redis.Redis.from_url(settings.broker_url).flushdb()
    migrate(settings.database_url)
    procs = [WorkerProcess(settings, logs / f"{label}-{i}.log", i if pinned else None)
             for i in range(workers)]
    try:
        for p in procs:
            p.wait_warm()
        row_count(settings.database_url, clear=True)  # each run writes every row anew
        t0 = time.perf_counter()
        enqueue(requests, settings, chunk_size=chunk, force=True)
        target = len(requests)
        deadline = time.monotonic() + 1800
        while row_count(settings.database_url) < target:
            if time.monotonic() > deadline or any(p.proc.poll() is not None for p in procs):
                raise RuntimeError(f"{label}: rows missing; see {logs}")
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        rss = max(p.peak_rss_mb() for p in procs)
    finally:
        for p in procs:
            p.stop()
    where = ("pinned to 1 core each (1 process, 1 thread)" if pinned else
             f"unpinned: default plan on {os.cpu_count()} cores (a process per core, 1 thread each)")
    db = settings.database_url.split(":", 1)[0].split("+", 1)[0]
    return Row("end to end", f"{workers} worker{'s' if workers > 1 else ''}, {db}",
               f"{where}, cpu, {settings.mc_passes} passes, chunks of {chunk}",
               len(requests), seconds, f"peak RSS of a pool process {rss:,.0f} MiB")


def producer_rate(settings: Settings, n: int, chunk: int, folder: Path) -> Row:
    import redis

    redis.Redis.from_url(settings.broker_url).flushdb()
    requests = [SpectrumRequest(spectrum_id=f"p-{i:07d}", path=str(folder / f"apStar-{i}.fits"),
                                k_mag=10.0, ebv=0.1) for i in range(n)]
    report = enqueue(requests, settings, chunk_size=chunk)
    redis.Redis.from_url(settings.broker_url).flushdb()
    return Row("producer", "enqueue into Redis", f"chunks of {chunk}, skip check on an empty table",
               report.enqueued, report.seconds, f"{report.messages} messages")


def _postgres_database(admin_url: str) -> tuple[str, Callable[[], None]]:
    import sqlalchemy as sa

    name = f"astronn_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return admin_url.rsplit("/", 1)[0] + f"/{name}", drop


def run(n: int = 2000, databases: Sequence[str] = ("sqlite", "postgres"), chunk: int = 128,
        redis_url: str = "redis://127.0.0.1:6379", model: Path | None = None,
        postgres_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        producer_spectra: int = 50_000, configs: Sequence[tuple[int, bool]] = ((1, False), (1, True), (2, True))) -> list[Row]:
    base = Settings.from_env()
    settings = Settings(broker_url=f"{redis_url.rstrip('/')}/{REDIS_DB}",
                        model_path=model or base.model_path, mc_passes=base.mc_passes)
    work = Path(tempfile.mkdtemp(prefix="astronn-bench-"))
    rows: list[Row] = []
    try:
        requests = farm(work / "spectra", n)
        sqlite_settings = dataclasses.replace(
            settings, database_url=f"sqlite:///{work / 'bench.sqlite'}")
        rows.append(producer_rate(sqlite_settings, producer_spectra, chunk, work))
        for db in databases:
            drop = None
            if db == "postgres":
                url, drop = _postgres_database(postgres_url)
                db_settings = dataclasses.replace(settings, database_url=url)
            else:
                db_settings = sqlite_settings
            try:
                for workers, pinned in configs:
                    label = f"{db}-{workers}{'p' if pinned else ''}"
                    rows.append(end_to_end(db_settings, requests, workers, pinned, chunk, work, label))
                    print_rows(rows[-1:])
            finally:
                if drop is not None:
                    drop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spectra", type=int, default=2000)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--model", type=Path, default=None, help="default: the bundled model")
    args = parser.parse_args(argv)
    print_rows(run(args.spectra, args.databases, args.chunk, model=args.model))


if __name__ == "__main__":
    main()
