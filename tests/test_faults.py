"""Fault injection on real processes: workers killed over and over, a pool process whose GPU
failed, Redis restarted, PostgreSQL stopped, Redis flushed, and a 20,000-message load. Each
test runs its own Redis (append-only) and, where it stops it, its own PostgreSQL, on free
loopback ports (tests/_servers.py), and ends by checking that every spectrum has exactly one
row: none lost, none duplicated.

Every test prints one line with its figures (messages, faults, rows lost, duplicates, time).
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from _catalogs import write_catalog
from _servers import PostgresServer, RedisServer
from _service import (Worker, build_checkpoint, celery_worker_args, rows, run_cli, spectra_farm,
                      wait_for, worker_env)
from astronn_dist.worker.config import Settings
from astronn_dist.worker.science.distance import FLAG_NO_RESULT
from astronn_dist.worker.contract import QUEUE, UNACKED_KEY, SpectrumRequest
from astronn_dist.worker.service.tasks import EXIT_DEVICE_FAILED

pytestmark = [pytest.mark.service, pytest.mark.slow, pytest.mark.timeout(900)]

VISIBILITY_S = 10  # a whole-worker death gives its chunk back after this


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("model") / "random-dr17.pt")


@pytest.fixture()
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.close()


def _requests(entries: list[dict]) -> list[SpectrumRequest]:
    return [SpectrumRequest(spectrum_id=e["spectrum_id"], path=e["path"]) for e in entries]


def _enqueue(broker_url: str, database_url: str, model: Path, requests, chunk: int,
             on_progress=None) -> int:
    """Publish through the producer's own code; returns the number of messages."""
    from astronn_dist.producer.enqueue import enqueue

    settings = Settings(broker_url=broker_url, database_url=database_url, model_path=model)
    return enqueue(requests, settings, chunk_size=chunk, force=True, on_progress=on_progress).messages


def _count_rows(database_url: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("astro_nn_dist"):
                return 0
            return int(conn.execute(sa.text("SELECT count(*) FROM astro_nn_dist")).scalar_one())
    except sa.exc.OperationalError:
        return -1  # the database is down right now
    finally:
        engine.dispose()


def _check_one_row_each(database_url: str, ids: list[str]) -> tuple[int, int]:
    """(lost, duplicated) spectra; asserts that both are zero and that all rows have results."""
    found = rows(database_url)
    counts = Counter(r["spectrum_id"] for r in found)
    lost = len(set(ids) - set(counts))
    duplicated = sum(n - 1 for n in counts.values())
    assert lost == 0 and duplicated == 0, f"{lost} lost, {duplicated} duplicated"
    assert set(counts) == set(ids)
    no_result = [r for r in found if r["result_flags"] & FLAG_NO_RESULT]
    assert not no_result, f"{len(no_result)} rows without result, e.g. {no_result[0]['error']}"
    return lost, duplicated


def _all_written(database_url: str, ids: list[str], t0: float, worker: Worker) -> tuple[int, int, float]:
    """Wait for a row per spectrum; (lost, duplicated, seconds since t0), both checked zero."""
    wait_for(lambda: _count_rows(database_url) >= len(ids), 900, f"{len(ids)} rows", worker)
    elapsed = time.monotonic() - t0
    return (*_check_one_row_each(database_url, ids), elapsed)


def _idle(worker: Worker) -> bool:
    """Every chunk the worker received has ended: Celery's own log lines, one "received" and
    one "succeeded", "retry" or "reject" per delivery."""
    log = worker.log()
    received = set(re.findall(r"Task astronn_dist\.process\[([\w-]+)\] received", log))
    ended = set(re.findall(r"Task astronn_dist\.process\[([\w-]+)\] (?:succeeded|retry|reject)", log))
    return bool(received) and received <= ended


def _quiet(settings: Settings, workers: list[Worker]) -> bool:
    """Nothing waiting, nothing delivered and unacknowledged, and every chunk each worker
    received has ended."""
    from astronn_dist.worker.service.broker import redis_client

    client = redis_client(settings, timeout_s=5, connect_timeout_s=5)
    try:
        if client.llen(QUEUE) or client.hlen(UNACKED_KEY):
            return False
    except Exception:  # noqa: BLE001 - the broker is away (restarting, between primaries)
        return False
    finally:
        client.close()
    return all(_idle(w) for w in workers)


def _reconcile(capsys: pytest.CaptureFixture, catalog: Path, chunk: int, broker_url: str,
               database_url: str, model: Path, missing: set[str]) -> int:
    """``astronn-dist reconcile --catalog``, as an operator runs it; checks that it re-sent
    exactly the ``missing`` spectra and returns how many."""
    code, out, err = run_cli(capsys, "reconcile", "--catalog", str(catalog), "--chunk-size",
                             str(chunk), "--broker", broker_url, "--db", database_url,
                             "--model", str(model))
    assert code == 0, out + err
    resent = int(re.search(r"enqueued (\d+) in", out).group(1)) if missing else 0
    assert resent == len(missing), out
    return resent


def _env(redis_url: str, database_url: str, model: Path, **extra) -> dict[str, str]:
    extra.setdefault("ASTRONN_DIST_VISIBILITY_TIMEOUT", VISIBILITY_S)
    return worker_env(redis_url=redis_url, database_url=database_url, model=model, **extra)


# ---------------------------------------------------------------------------------------------


def test_workers_killed_again_and_again_lose_nothing(
    redis_server: RedisServer, sqlite_url: str, checkpoint: Path, apstar_files: list[Path],
    tmp_path: Path, workers: list[Worker],
) -> None:
    """5,000 spectra in 100 chunks; pool processes SIGKILLed mid-chunk (requeued at once) and
    a whole worker SIGKILLed (its chunk comes back after the visibility timeout) and restarted."""
    n, chunk = 5000, 50
    url = redis_server.url()
    entries = spectra_farm(apstar_files, tmp_path / "spectra", n)
    ids = [e["spectrum_id"] for e in entries]
    # A chunk may be hit more than once; it must not be parked as a poison chunk for that.
    env = _env(url, sqlite_url, checkpoint, ASTRONN_DIST_MAX_DELIVERIES=20)
    a = Worker(env, tmp_path / "a.log", name="a")
    b = Worker(env, tmp_path / "b.log", name="b")
    workers += [a, b]
    a.wait_ready()
    b.wait_ready()
    t0 = time.monotonic()
    messages = _enqueue(url, sqlite_url, checkpoint, _requests(entries), chunk)

    pool_kills = worker_kills = 0
    for pool_kills in range(1, 7):  # at each eighth of the rows, a pool process of a and b in turn
        victim, target = (a, b)[(pool_kills - 1) % 2], n * pool_kills / 8
        done = wait_for(lambda: (rows_now := _count_rows(sqlite_url)) >= target and victim.children() and rows_now,
                        600, f"{target:.0f} rows and a pool process of {victim.name}", victim)
        assert done < n, f"the stream ended after only {pool_kills - 1} kills: make it longer"
        victim.kill_pool_process()
    b.kill()  # the whole worker, mid-chunk: no one requeues its message but the timeout
    worker_kills += 1
    c = Worker(env, tmp_path / "c.log", name="c")
    workers.append(c)
    lost, duplicated, elapsed = _all_written(sqlite_url, ids, t0, a)
    retried = sum(1 for r in rows(sqlite_url) if r["attempts"] > 1)
    print(f"\n[kill] {n} spectra in {messages} messages, 2 workers; {pool_kills} pool processes "
          f"and {worker_kills} worker SIGKILLed mid-chunk, 1 worker restarted: {lost} lost, "
          f"{duplicated} duplicated, {retried} spectra processed again; {elapsed:.1f} s")


# Stands in for a GPU whose context a fatal error broke (an illegal memory access, an Xid
# fault), which a CPU cannot do: the first chunk of the first pool process raises as such a
# kernel would, and from then on everything in that process fails and its device reports
# failed, as torch's calls would. Then the worker itself, as `python -m celery` runs it, with
# the arguments that follow the code on the command line.
_FAILING_GPU = """
import os, sys
from pathlib import Path
import astronn_dist.worker.service.tasks as tasks
from astronn_dist.worker.service.state import WorkerState

marker = Path(os.environ["TEST_GPU_FAULT_MARKER"])
broken = []  # this process's GPU failed (a forked process starts with its own, empty)
real_process_chunk = tasks.process_chunk

def process_chunk(*args, **kwargs):
    if not broken and not marker.exists():
        marker.write_text(str(os.getpid()))
        broken.append(os.getpid())
    if broken:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return real_process_chunk(*args, **kwargs)

tasks.process_chunk = process_chunk
WorkerState.device_failed = lambda self: bool(broken)
from celery.__main__ import main
sys.argv = ["celery", *sys.argv[1:]]
main()
"""


def test_a_pool_process_whose_gpu_failed_leaves_and_its_chunk_gets_results(
    redis_server: RedisServer, sqlite_url: str, checkpoint: Path, apstar_files: list[Path],
    tmp_path: Path, workers: list[Worker],
) -> None:
    """A process whose GPU context broke fails every chunk it takes and, always the idle one,
    would take most of them: they were retried into no-result rows (all 200 here). It exits
    instead, its chunk is delivered again at once, and the new process gives every spectrum
    its result."""
    n, chunk = 200, 20
    url = redis_server.url()
    entries = spectra_farm(apstar_files, tmp_path / "spectra", n)
    ids = [e["spectrum_id"] for e in entries]
    marker = tmp_path / "gpu-failed-in"
    env = _env(url, sqlite_url, checkpoint, TEST_GPU_FAULT_MARKER=str(marker))
    worker = Worker(env, tmp_path / "gpu.log", name="gpu",
                    argv=[sys.executable, "-c", _FAILING_GPU, *celery_worker_args("gpu")])
    workers.append(worker)
    worker.wait_ready()
    first = worker.children()
    t0 = time.monotonic()
    messages = _enqueue(url, sqlite_url, checkpoint, _requests(entries), chunk)
    lost, duplicated, elapsed = _all_written(sqlite_url, ids, t0, worker)

    failed_pid = int(marker.read_text())
    assert failed_pid in first, (failed_pid, first)
    log = worker.log()
    assert log.count("the process exits so that a new one takes its place") == 1, log[-3000:]
    assert f"pid:{failed_pid} exited with 'exitcode {EXIT_DEVICE_FAILED}'" in log, log[-3000:]
    assert failed_pid not in worker.children() and worker.proc.poll() is None
    again = [r for r in rows(sqlite_url) if r["attempts"] > 1]
    assert len(again) == chunk, f"{len(again)} spectra processed a second time, expected one chunk"
    print(f"\n[gpu] {n} spectra in {messages} messages; the first pool process's GPU failed on "
          f"its first chunk: it exited ({EXIT_DEVICE_FAILED}), the chunk came back to its "
          f"replacement; {lost} lost, {duplicated} duplicated; {elapsed:.1f} s")


def test_redis_restarted_mid_stream_loses_nothing(
    redis_server: RedisServer, sqlite_url: str, checkpoint: Path, apstar_files: list[Path],
    tmp_path: Path, workers: list[Worker], capsys: pytest.CaptureFixture,
) -> None:
    """Append-only Redis stopped and started twice while workers consume and the producer
    publishes: both reconnect by themselves, and `reconcile` re-sends what the broker lost.

    kombu takes a message with BRPOP and only then records it in its unacknowledged hash; a
    restart that falls between the two drops that message (the worker that popped it loses
    it with the connection). CI saw it once in many runs: one message of 40 spectra. The
    results table is the source of truth, so `reconcile` (which `watch` runs on its own)
    re-sends the spectra with neither a row nor a message; at most one message a restart."""
    n, chunk = 2000, 40
    url = redis_server.url()
    entries = spectra_farm(apstar_files, tmp_path / "spectra", n)
    ids = [e["spectrum_id"] for e in entries]
    catalog = write_catalog("csv", tmp_path / "catalog",
                            {"spectrum_id": ids, "path": [e["path"] for e in entries]})
    env = _env(url, sqlite_url, checkpoint)
    workers += [Worker(env, tmp_path / f"w{i}.log", name=f"w{i}") for i in range(2)]
    for w in workers:
        w.wait_ready()
    t0 = time.monotonic()
    requests = _requests(entries)
    half = n // 2
    messages = _enqueue(url, sqlite_url, checkpoint, requests[:half], chunk)
    wait_for(lambda: _count_rows(sqlite_url) >= half // 4, 120, "the stream under way", workers[0])
    down = [redis_server.restart(down_s=2.0)]  # graceful: the append-only file is flushed

    # The producer publishes the second half while Redis goes down a second time (SIGKILL:
    # with appendfsync always, every acknowledged write is already in the file).
    errors: list[BaseException] = []
    publishing = threading.Event()  # set by the producer's first message of the second half

    def produce() -> None:
        try:
            nonlocal messages
            messages += _enqueue(url, sqlite_url, checkpoint, requests[half:], chunk,
                                 on_progress=lambda _: publishing.set())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    publisher = threading.Thread(target=produce)
    publisher.start()
    assert publishing.wait(60), "the producer sent nothing"
    down.append(redis_server.restart(down_s=2.0, hard=True))
    publisher.join(120)
    if errors:  # the producer may give up while Redis is away: then the operator reruns it
        messages += _enqueue(url, sqlite_url, checkpoint, requests[half:], chunk)
    settings = Settings(broker_url=url, database_url=sqlite_url, model_path=checkpoint)
    wait_for(lambda: _quiet(settings, workers), 600, "the queue drained after the restarts", workers[0])
    missing = set(ids) - {r["spectrum_id"] for r in rows(sqlite_url)}
    assert len(missing) <= 2 * chunk, f"{len(missing)} spectra missing: more than a message a restart"
    resent = _reconcile(capsys, catalog, chunk, url, sqlite_url, checkpoint, missing) if missing else 0
    lost, duplicated, elapsed = _all_written(sqlite_url, ids, t0, workers[0])
    assert all(w.proc.poll() is None for w in workers)
    print(f"\n[redis] {n} spectra in {messages} messages, 2 workers; Redis restarted twice "
          f"(down {down[0]:.1f} s graceful, {down[1]:.1f} s SIGKILL; producer "
          f"{'had to be rerun' if errors else 'reconnected'}); reconcile re-sent {resent}: "
          f"{lost} lost, {duplicated} duplicated; {elapsed:.1f} s")


def test_postgres_stopped_for_15_s_mid_stream_loses_nothing(
    redis_server: RedisServer, checkpoint: Path, apstar_files: list[Path], tmp_path: Path,
    workers: list[Worker],
) -> None:
    """The database goes away for 15 s: workers keep their messages (no ack), retry their
    writes with backoff, and everything is written once it is back."""
    pg = PostgresServer().start()
    try:
        n, chunk = 2000, 40
        database_url = pg.url()
        url = redis_server.url()
        entries = spectra_farm(apstar_files, tmp_path / "spectra", n)
        ids = [e["spectrum_id"] for e in entries]
        env = _env(url, database_url, checkpoint, ASTRONN_DIST_VISIBILITY_TIMEOUT=60)
        workers += [Worker(env, tmp_path / f"w{i}.log", name=f"w{i}", serve=i == 1)
                    for i in range(2)]
        for w in workers:
            w.wait_ready()
        t0 = time.monotonic()
        messages = _enqueue(url, database_url, checkpoint, _requests(entries), chunk)
        wait_for(lambda: _count_rows(database_url) >= n // 4, 120, "a quarter written", workers[0])
        pg.stop(mode="fast")
        t_down = time.monotonic()
        # Down until every worker has met the outage with a chunk in hand (and retried it).
        for w in workers:
            wait_for(lambda: "database unavailable" in w.log(), 120, f"{w.name} to meet the outage", w)
        pg.start()
        outage = time.monotonic() - t_down
        lost, duplicated, elapsed = _all_written(database_url, ids, t0, workers[0])
        logs = "".join(w.log() for w in workers)
        retries = logs.count("database unavailable")
        assert retries > 0, "the outage was not noticed: nothing was retried"
        print(f"\n[postgres] {n} spectra in {messages} messages, 2 workers; PostgreSQL down "
              f"{outage:.1f} s: {retries} chunk retries, {lost} lost, {duplicated} duplicated; "
              f"{elapsed:.1f} s")
    finally:
        pg.close()


def test_flushed_redis_then_reconcile_gives_every_spectrum_its_row(
    redis_server: RedisServer, sqlite_url: str, checkpoint: Path, apstar_files: list[Path],
    tmp_path: Path, workers: list[Worker], capsys: pytest.CaptureFixture,
) -> None:
    """Redis loses everything mid-stream (FLUSHALL, as a restart without persistence would);
    ``astronn-dist reconcile --catalog`` enqueues exactly what has no row and no message."""
    import csv

    from astronn_dist.producer.cli import main as cli_main

    n, chunk = 1500, 30
    url = redis_server.url()
    entries = spectra_farm(apstar_files, tmp_path / "spectra", n)
    ids = [e["spectrum_id"] for e in entries]
    catalog = tmp_path / "catalog.csv"
    with catalog.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["spectrum_id", "path"])
        writer.writerows([e["spectrum_id"], e["path"]] for e in entries)
    env = _env(url, sqlite_url, checkpoint)
    w = Worker(env, tmp_path / "w.log", name="w")
    workers.append(w)
    w.wait_ready()
    t0 = time.monotonic()
    messages = _enqueue(url, sqlite_url, checkpoint, _requests(entries), chunk)
    wait_for(lambda: _count_rows(sqlite_url) >= n // 5, 120, "a fifth written", w)
    import redis

    redis.Redis.from_url(url).flushall()
    wait_for(lambda: _idle(w), 120, "the chunk the worker held to be written", w)
    written = _count_rows(sqlite_url)
    assert written < n, "everything was done before the flush: nothing to recover"

    with pytest.raises(SystemExit) as code:
        cli_main(["reconcile", "--catalog", str(catalog), "--chunk-size", str(chunk),
                  "--broker", url, "--db", sqlite_url, "--model", str(checkpoint)])
    assert code.value.code in (0, None)
    out = capsys.readouterr().out
    assert f"enqueued {n - written} in" in out, out
    lost, duplicated, elapsed = _all_written(sqlite_url, ids, t0, w)
    print(f"\n[flush] {n} spectra in {messages} messages; Redis flushed with {n - written} "
          f"spectra not yet written; reconcile re-enqueued them: {lost} lost, {duplicated} "
          f"duplicated; {elapsed:.1f} s")


def test_20000_messages_through_2_workers_memory_flat(
    redis_server: RedisServer, sqlite_url: str, checkpoint: Path, apstar_files: list[Path],
    tmp_path: Path, workers: list[Worker],
) -> None:
    """20,000 one-spectrum messages: no loss, no duplicate, and the pool processes' resident
    memory at the end within 64 MiB of what it was a quarter of the way in."""
    n = 20_000
    url = redis_server.url()
    entries = spectra_farm(apstar_files, tmp_path / "spectra", n)
    ids = [e["spectrum_id"] for e in entries]
    env = _env(url, sqlite_url, checkpoint)
    workers += [Worker(env, tmp_path / f"w{i}.log", name=f"w{i}") for i in range(2)]
    for w in workers:
        w.wait_ready()
    t0 = time.monotonic()
    messages = _enqueue(url, sqlite_url, checkpoint, _requests(entries), 1)
    t_published = time.monotonic() - t0

    def rss_mib() -> list[float]:
        out = []
        for w in workers:
            for pid in w.children():
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out.append(int(line.split()[1]) / 1024)
        return out

    wait_for(lambda: _count_rows(sqlite_url) >= n // 4, 600, "a quarter written", workers[0])
    early = rss_mib()
    wait_for(lambda: _count_rows(sqlite_url) >= n, 900, f"{n} rows", workers[0])
    late = rss_mib()
    elapsed = time.monotonic() - t0
    lost, duplicated = _check_one_row_each(sqlite_url, ids)
    assert len(early) == len(late) == 2, (early, late)
    growth = max(b - a for a, b in zip(early, late))
    assert growth < 64, f"pool process memory grew by {growth:.0f} MiB: {early} -> {late}"
    print(f"\n[load] {messages} messages ({n} spectra) published in {t_published:.1f} s, "
          f"processed by 2 workers in {elapsed:.1f} s ({n / elapsed:.0f} messages/s): {lost} "
          f"lost, {duplicated} duplicated; pool RSS {[round(x) for x in early]} -> "
          f"{[round(x) for x in late]} MiB")
