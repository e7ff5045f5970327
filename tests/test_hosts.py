"""Faults across hosts: Redis and PostgreSQL on a services host, a worker on each of two other
hosts (network namespaces on a bridge, tests/_hosts.py), and the network between them broken
while 2,000 spectra stream:

* a worker host's link cut mid-chunk: the chunk goes to the other worker after the visibility
  timeout; when the link returns, the cut worker's late write changes nothing;
* a worker host's link cut inside its write transaction: PostgreSQL ends the silent session
  (results.dead_client_s), so the other worker's write of the chunk does not wait on its locks;
* a worker frozen (SIGSTOP) past the visibility timeout, then resumed;
* the services host unreachable from the workers for 20 s;
* delay, stalls and dropped connections on a worker's link for the whole run (a fault-injecting
  proxy on that link, since this kernel has neither netem nor iptables).

Each ends with every spectrum having exactly one row, and the rows' science columns equal to a
run without faults (computed once for the module). The producer runs on the services host
(``ip netns exec``); the test process reads the database and Redis through their Unix sockets.
Every test prints one line with its figures.
"""

from __future__ import annotations

import csv
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from _hosts import Hosts, HostsUnavailable, proxy_command
from _servers import PostgresServer, RedisServer
from _service import Worker, build_checkpoint, rows, spectra_farm, wait_for, worker_env
from test_faults import _check_one_row_each, _count_rows

pytestmark = [pytest.mark.service, pytest.mark.slow, pytest.mark.timeout(900)]

N = 2000  # spectra per run
CHUNK = 100  # spectra per message: 20 messages
MC_PASSES = 50  # about a second of work per chunk and process: time to hit one mid-chunk
VISIBILITY_S = 10  # a silent worker's chunk goes back to the queue after this
REDIS_PORT, POSTGRES_PORT = 6379, 5432  # inside the services host: nothing else listens there
ASTRONN_DIST = str(Path(sys.executable).with_name("astronn-dist"))

SCIENCE = ("path", "model_id", "pipeline_version", "k_mag", "ebv", "a_k_mag", "L_fakemag",
           "L_fakemag_err", "dist", "dist_err", "result_flags", "flag_warn", "flag_bad", "error",
           "mc_passes", "seed", "device", "mask_rng")
"""The columns a fault must not change (not host, task_id, created, t_elapsed, attempts)."""

_TASK = r"Task astronn_dist\.process\[([\w-]+)\]"


# ---------------------------------------------------------------------------------------------
# The hosts, the services, the spectra


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    made = Hosts(["services", "w1", "w2"])
    try:
        made.create()
    except HostsUnavailable as exc:
        pytest.fail(f"these tests need network namespaces: {exc}")
    try:
        yield made
    finally:
        made.close()


@dataclass
class Services:
    hosts: Hosts
    redis: RedisServer
    postgres: PostgresServer


@pytest.fixture(scope="module")
def services(hosts: Hosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    on = {"bind": hosts.address("services"), "prefix": hosts.exec("services")}
    redis = RedisServer(tmp_path_factory.mktemp("services") / "redis", REDIS_PORT, **on)
    postgres = PostgresServer(POSTGRES_PORT, **on)
    try:
        redis.start()
        postgres.start()
        yield Services(hosts, redis, postgres)
    finally:
        redis.close()
        postgres.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("model") / "random-dr17.pt")


@pytest.fixture(scope="module")
def catalog(apstar_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """N spectra: the real apStar files listed many times under distinct ids."""
    folder = tmp_path_factory.mktemp("spectra")
    entries = spectra_farm(apstar_files, folder, N)
    path = folder / "catalog.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["spectrum_id", "path"])
        writer.writerows([e["spectrum_id"], Path(e["path"]).name] for e in entries)
    return path


_databases = itertools.count(1)


@dataclass
class Run:
    """One run's queue (a Redis database) and results (a PostgreSQL database), as the workers
    and the producer reach them (``broker``, ``db``) and as the test does (``*_local``)."""

    services: Services
    name: str
    redis_db: int

    @property
    def broker(self) -> str:
        return self.services.redis.url(self.redis_db)

    @property
    def db(self) -> str:
        return self.services.postgres.url(self.name)

    @property
    def db_local(self) -> str:
        return self.services.postgres.socket_url(self.name)

    def rows_written(self) -> int:
        return _count_rows(self.db_local)


def _new_run(services: Services, name: str) -> Run:
    import sqlalchemy as sa

    admin = sa.create_engine(services.postgres.socket_url(), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return Run(services, name, next(_databases) % 16)


def _start_worker(run: Run, host: str, checkpoint: Path, log_dir: Path, workers: list[Worker],
                  *, broker: str | None = None, db: str | None = None) -> Worker:
    """``astronn-dist worker`` (one pool process) on ``host``."""
    env = worker_env(
        redis_url=broker or run.broker, database_url=db or run.db, model=checkpoint,
        ASTRONN_DIST_VISIBILITY_TIMEOUT=VISIBILITY_S, ASTRONN_DIST_MC_PASSES=MC_PASSES,
        ASTRONN_DIST_MAX_DELIVERIES=20,  # a chunk hit by several faults is not poison
    )
    argv = [*run.services.hosts.exec(host), ASTRONN_DIST, "worker", "--device", "cpu",
            "--concurrency", "1", "--hostname", f"{host}@%h"]
    worker = Worker(env, log_dir / f"{run.name}-{host}.log", name=host, argv=argv)
    workers.append(worker)
    return worker


def _produce(run: Run, catalog: Path, checkpoint: Path) -> int:
    """``astronn-dist produce`` on the services host; returns the number of messages."""
    env = worker_env(redis_url=run.broker, database_url=run.db, model=checkpoint)
    result = subprocess.run(
        [*run.services.hosts.exec("services"), ASTRONN_DIST, "produce", "--catalog", str(catalog),
         "--chunk-size", str(CHUNK), "--broker", run.broker, "--db", run.db,
         "--model", str(checkpoint)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    out = result.stdout + result.stderr
    match = re.search(rf"enqueued {N} spectra in (\d+) messages", out)
    assert result.returncode == 0 and match, f"produce failed ({result.returncode}):\n{out[-3000:]}"
    return int(match.group(1))


def _science(run: Run) -> dict[str, tuple]:
    return {r["spectrum_id"]: tuple(r[c] for c in SCIENCE) for r in rows(run.db_local)}


def _task_rows(run: Run, task_id: str) -> dict[str, tuple]:
    return {r["spectrum_id"]: tuple(r[c] for c in SCIENCE)
            for r in rows(run.db_local) if r["task_id"] == task_id}


def _in_hand(worker: Worker) -> list[str]:
    """Chunks the worker received and has not finished (Celery's own log lines)."""
    log = worker.log()
    received = re.findall(rf"{_TASK} received", log)
    ended = set(re.findall(rf"{_TASK} (?:succeeded|retry|reject)", log))
    return [t for t in received if t not in ended]


class Sessions:
    """Who has a transaction open on the run's database (``pg_stat_activity``), asked on one
    connection of the test's own, so that it can be polled every few milliseconds."""

    def __init__(self, run: Run) -> None:
        import psycopg

        pg = run.services.postgres
        self.run = run
        self.conn = psycopg.connect(host=str(pg.folder), port=pg.port, user="postgres",
                                    dbname=run.name, autocommit=True)

    def in_transaction(self, host: str) -> bool:
        """Whether ``host`` has a transaction open (a worker's: its rows' write under way)."""
        return bool(self.conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
            "AND client_addr = CAST(%s AS inet) AND xact_start IS NOT NULL",
            (self.run.name, self.run.services.hosts.address(host)),
        ).fetchone()[0])

    def rows(self) -> int:
        import psycopg

        try:
            return int(self.conn.execute("SELECT count(*) FROM astro_nn_dist").fetchone()[0])
        except psycopg.errors.UndefinedTable:  # the workers have not migrated yet
            return 0

    def close(self) -> None:
        self.conn.close()


def _succeeded(worker: Worker, task_id: str) -> bool:
    return f"Task astronn_dist.process[{task_id}] succeeded" in worker.log()


def _ended(worker: Worker, task_id: str) -> bool:
    """The worker finished the chunk: rows written, or a retry (its write failed) sent."""
    return bool(re.search(rf"Task astronn_dist\.process\[{task_id}\] (?:succeeded|retry)", worker.log()))


def _finish(run: Run, baseline: dict[str, tuple], t0: float, worker: Worker) -> tuple[int, int, float]:
    """Wait for a row per spectrum; check none lost, none duplicated and the science columns
    equal to the run without faults; (lost, duplicated, seconds since t0)."""
    wait_for(lambda: run.rows_written() >= N, 600, f"{N} rows", worker)
    elapsed = time.monotonic() - t0
    ids = sorted(baseline)
    lost, duplicated = _check_one_row_each(run.db_local, ids)
    found = _science(run)
    differ = [i for i in ids if found[i] != baseline[i]]
    assert not differ, (f"{len(differ)} rows differ from the run without faults, e.g. {differ[0]}:"
                        f"\n{dict(zip(SCIENCE, found[differ[0]]))}\n{dict(zip(SCIENCE, baseline[differ[0]]))}")
    return lost, duplicated, elapsed


@pytest.fixture(scope="module")
def baseline(services: Services, checkpoint: Path, catalog: Path,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """The science columns of a run without faults (same hosts, workers and chunks)."""
    run = _new_run(services, "baseline")
    started: list[Worker] = []
    try:
        logs = tmp_path_factory.mktemp("baseline-logs")
        for host in ("w1", "w2"):
            _start_worker(run, host, checkpoint, logs, started)
        for w in started:
            w.wait_ready()
        t0 = time.monotonic()
        messages = _produce(run, catalog, checkpoint)
        wait_for(lambda: run.rows_written() >= N, 600, f"{N} rows", started[0])
        elapsed = time.monotonic() - t0
        ids = [f"star-{i:04d}" for i in range(N)]
        _check_one_row_each(run.db_local, ids)
        print(f"\n[hosts baseline] {N} spectra in {messages} messages, 2 worker hosts, no fault: "
              f"{elapsed:.1f} s")
        return _science(run)
    finally:
        for w in started:
            w.stop()


class Stream:
    """One test's run: its workers, the N spectra produced once, and the end checks."""

    def __init__(self, run: Run, baseline: dict[str, tuple], checkpoint: Path, catalog: Path,
                 log_dir: Path, workers: list[Worker]) -> None:
        self.run, self.baseline, self.checkpoint, self.catalog = run, baseline, checkpoint, catalog
        self.log_dir, self.workers = log_dir, workers
        self.t0 = 0.0
        self.messages = 0

    def worker(self, host: str, **where: str) -> Worker:
        return _start_worker(self.run, host, self.checkpoint, self.log_dir, self.workers, **where)

    def two_workers(self) -> tuple[Worker, Worker]:
        """``w1`` and ``w2``, both straight on the network, ready."""
        w1, w2 = self.worker("w1"), self.worker("w2")
        w1.wait_ready()
        w2.wait_ready()
        return w1, w2

    def produce(self) -> None:
        """Start the clock and publish the N spectra (from the services host)."""
        self.t0 = time.monotonic()
        self.messages = _produce(self.run, self.catalog, self.checkpoint)

    def finish(self, worker: Worker) -> tuple[int, int, float]:
        """(lost, duplicated, seconds since produce), checked as :func:`_finish` does."""
        return _finish(self.run, self.baseline, self.t0, worker)


@pytest.fixture()
def stream(services: Services, baseline: dict[str, tuple], checkpoint: Path, catalog: Path,
           tmp_path: Path, workers: list[Worker], request: pytest.FixtureRequest) -> Stream:
    run = _new_run(services, re.sub(r"\W", "_", request.node.name)[:50].lower())
    return Stream(run, baseline, checkpoint, catalog, tmp_path, workers)


def _chunk_in_hand(run: Run, worker: Worker) -> str:
    """Wait until the stream is under way and ``worker`` is in the middle of a chunk."""
    return wait_for(
        lambda: run.rows_written() >= N // 8 and (hand := _in_hand(worker)) and hand[0],
        300, f"{worker.name} in the middle of a chunk", worker, interval=0.05,
    )


def _chunk_in_write(run: Run, sessions: Sessions, worker: Worker) -> str:
    """Wait until ``worker`` has a chunk's write transaction open (a few milliseconds per chunk;
    the stream under way, so that it is not its start-up's migration)."""
    # The transaction is checked last, so the link is cut right after it is seen: the row count
    # and the log's chunk in hand (a few ms to read) come first (checked first, they let a short
    # write end before the cut, and CI once missed five writes in a row).
    return wait_for(
        lambda: sessions.rows() >= N // 8 and (hand := _in_hand(worker))
        and sessions.in_transaction(worker.name) and hand[0],
        300, f"{worker.name} inside its write transaction", worker, interval=0.001,
    )


# ---------------------------------------------------------------------------------------------


@dataclass
class Takeover:
    """A chunk redone by the other worker while its first worker was silenced.

    Seconds count from the moment the first worker was silenced."""

    task: str
    tries: int  # silencing that landed elsewhere than asked was undone and tried again
    taken_over_s: float  # the other worker had written the chunk
    silent_s: float  # the first worker was given back its voice
    late_s: float  # the first worker had finished the chunk too
    rows: dict[str, tuple]  # the chunk's science columns as the other worker wrote them


TRIES = 5  # silencings tried before _silenced_mid_chunk gives up (each undone at once)


def _silenced_mid_chunk(run: Run, quiet: Worker, other: Worker, silence, speak, *,
                        in_write: bool = False) -> Takeover:
    """Silence ``quiet`` (``silence()``: cut its link, freeze it) in the middle of a chunk, until
    ``other`` has redone that chunk (after the visibility timeout); then ``speak()`` and wait for
    ``quiet`` to finish the chunk as well (its write, or its retry when the server had ended its
    session meanwhile).

    ``in_write``: silenced inside its write transaction (its rows locked until the server ends
    the silent session: ``results.dead_client_s``; a frozen process, whose host still answers,
    keeps them until it resumes), else while it computes.
    Silencing that lands elsewhere (the chunk already written, or the write begun or not yet)
    is undone and tried on a later chunk, up to TRIES times (each try uses one of the quiet
    worker's ~8 chunks left once the stream is under way).
    """
    sessions = Sessions(run)
    try:
        for tries in range(1, TRIES + 1):
            task = _chunk_in_write(run, sessions, quiet) if in_write else _chunk_in_hand(run, quiet)
            silence()
            t_silent = time.monotonic()
            if not _task_rows(run, task) and sessions.in_transaction(quiet.name) == in_write:
                break
            speak()
            wait_for(lambda: task not in _in_hand(quiet), 120, f"{quiet.name} to finish {task}", quiet)
        else:
            pytest.fail(f"{TRIES} times {quiet.name} was not silenced where asked (in_write={in_write})")
    finally:
        sessions.close()
    try:
        wait_for(lambda: _succeeded(other, task), 120, f"{other.name} to take over {task}", other)
        taken_over = time.monotonic() - t_silent
        rows_before = _task_rows(run, task)
        assert len(rows_before) == CHUNK, f"{len(rows_before)} rows for the chunk taken over"
        assert not _succeeded(quiet, task), f"{quiet.name} finished its chunk while silenced"
    finally:
        speak()
    silent = time.monotonic() - t_silent
    wait_for(lambda: _ended(quiet, task), 180, f"{quiet.name} to finish {task}", quiet)
    return Takeover(task, tries, taken_over, silent, time.monotonic() - t_silent, rows_before)


def test_worker_link_cut_mid_chunk(stream: Stream) -> None:
    run, hosts = stream.run, stream.run.services.hosts
    w1, w2 = stream.two_workers()
    stream.produce()
    took = _silenced_mid_chunk(run, w1, w2, lambda: hosts.cut("w1"), lambda: hosts.mend("w1"))
    lost, duplicated, elapsed = stream.finish(w2)
    assert _task_rows(run, took.task) == took.rows, "the late write changed the rows"
    print(f"\n[hosts cut] {N} spectra in {stream.messages} messages, 2 worker hosts; w1's link "
          f"cut mid-chunk (try {took.tries}) for {took.silent_s:.1f} s: chunk redone by w2 "
          f"{took.taken_over_s:.1f} s after the cut, w1's late write {took.late_s:.1f} s after it "
          f"changed nothing; {lost} lost, {duplicated} duplicated, rows equal to the run without "
          f"faults; {elapsed:.1f} s")


def test_worker_frozen_past_the_visibility_timeout(stream: Stream) -> None:
    w1, w2 = stream.two_workers()
    stream.produce()
    took = _silenced_mid_chunk(  # the worker and its pool process
        stream.run, w1, w2, lambda: os.killpg(w1.proc.pid, signal.SIGSTOP),
        lambda: os.killpg(w1.proc.pid, signal.SIGCONT),
    )
    assert took.silent_s >= VISIBILITY_S, took
    lost, duplicated, elapsed = stream.finish(w2)
    assert _task_rows(stream.run, took.task) == took.rows, "the resumed worker's write changed the rows"
    print(f"\n[hosts freeze] {N} spectra in {stream.messages} messages, 2 worker hosts; w1 "
          f"frozen (SIGSTOP) mid-chunk (try {took.tries}) for {took.silent_s:.1f} s, its chunk "
          f"redone by w2, then resumed and finished it again {took.late_s:.1f} s after the "
          f"freeze: {lost} lost, {duplicated} duplicated, rows equal to the run without faults; "
          f"{elapsed:.1f} s")


def test_worker_link_cut_inside_its_write_transaction(stream: Stream) -> None:
    """Cut off with its rows locked: the server's keepalive probes find the silent host and end
    its session (results.dead_client_s), so the other worker's write of the redelivered chunk
    does not wait for the link to return."""
    hosts = stream.run.services.hosts
    w1, w2 = stream.two_workers()
    stream.produce()
    took = _silenced_mid_chunk(stream.run, w1, w2, lambda: hosts.cut("w1"),
                               lambda: hosts.mend("w1"), in_write=True)
    lost, duplicated, elapsed = stream.finish(w2)
    assert _task_rows(stream.run, took.task) == took.rows, "w1 changed the rows once back"
    outcome = "retried it" if not _succeeded(w1, took.task) else "wrote it again"
    print(f"\n[hosts cut-in-write] {N} spectra in {stream.messages} messages, 2 worker hosts; "
          f"w1's link cut inside its write transaction (try {took.tries}) for "
          f"{took.silent_s:.1f} s: the server ended its session, w2 redid the chunk "
          f"{took.taken_over_s:.1f} s after the cut; back, w1 {outcome}: {lost} lost, "
          f"{duplicated} duplicated, rows equal to the run without faults; {elapsed:.1f} s")


def test_services_unreachable_for_20_s(stream: Stream) -> None:
    run, hosts = stream.run, stream.run.services.hosts
    w1, _ = stream.two_workers()
    stream.produce()
    wait_for(lambda: run.rows_written() >= N // 4, 300, "a quarter written", w1)
    with hosts.link_cut("services"):
        t_cut = time.monotonic()
        # The outage's length is the point here: 20 s, twice the visibility timeout.
        time.sleep(1.0)
        at_cut = run.rows_written()
        time.sleep(19.0)
        at_end = run.rows_written()
    outage = time.monotonic() - t_cut
    assert at_end == at_cut < N, f"rows were written with the services unreachable: {at_cut} -> {at_end}"
    lost, duplicated, elapsed = stream.finish(w1)
    print(f"\n[hosts partition] {N} spectra in {stream.messages} messages, 2 worker hosts; "
          f"services host unreachable for {outage:.1f} s with {N - at_cut} spectra to go: {lost} "
          f"lost, {duplicated} duplicated, rows equal to the run without faults; {elapsed:.1f} s")


def test_lossy_slow_link_for_the_whole_run(stream: Stream) -> None:
    run, hosts = stream.run, stream.run.services.hosts
    svc = hosts.address("services")
    redis_port, postgres_port = 16379, 15432  # on w2's own loopback
    proxy_log = stream.log_dir / "proxy.log"
    with proxy_log.open("ab") as out:
        proxy = subprocess.Popen(
            [*hosts.exec("w2"), *proxy_command({("127.0.0.1", redis_port): (svc, REDIS_PORT),
                                                ("127.0.0.1", postgres_port): (svc, POSTGRES_PORT)},
                                               seed=14)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_for(lambda: "proxy ready" in proxy_log.read_text() or proxy.poll() is not None, 60,
                 "the proxy")
        assert proxy.poll() is None, proxy_log.read_text()
        w1 = stream.worker("w1")
        w2 = stream.worker(
            "w2", broker=f"redis://127.0.0.1:{redis_port}/{run.redis_db}",
            db=f"postgresql+psycopg://postgres@127.0.0.1:{postgres_port}/{run.name}",
        )
        w1.wait_ready()
        w2.wait_ready(timeout=180)
        stream.produce()
        lost, duplicated, elapsed = stream.finish(w1)
    finally:
        os.killpg(proxy.pid, signal.SIGKILL)
        proxy.wait(30)
    totals = re.findall(r"proxy totals (.*)", proxy_log.read_text())
    assert totals, proxy_log.read_text()[-2000:]
    faults = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", totals[-1])}
    through_proxy = len(re.findall(rf"{_TASK} succeeded", w2.log()))
    assert faults["dropped"] and faults["stalled"] and faults["delayed"], faults
    assert through_proxy, "w2 finished no chunk through the proxy"
    print(f"\n[hosts lossy] {N} spectra in {stream.messages} messages, 2 worker hosts, w2 through a "
          f"faulty proxy (seed 14) that dropped {faults['dropped']} connections, stalled "
          f"{faults['stalled']} reads for 0.5-3 s and delayed {faults['delayed']} of "
          f"{faults['pieces']} pieces by up to 50 ms: w2 finished {through_proxy} chunks; {lost} "
          f"lost, {duplicated} duplicated, rows equal to the run without faults; {elapsed:.1f} s")
