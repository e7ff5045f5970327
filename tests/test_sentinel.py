"""Redis Sentinel: the broker's primary dies mid-stream and every client follows the new one.

A primary (append-only), one replica and three Sentinels on free loopback ports
(tests/_sentinel.py); a real worker process and the producer both given only the Sentinels'
``sentinel://`` URL. The primary is SIGKILLed while the producer publishes; the Sentinels promote
the replica; the producer's publishes and the worker's consumer reconnect to it by themselves;
``astronn-dist reconcile`` re-sends what the asynchronous replication lost. Every spectrum ends
with exactly one row.

Replication to the replica is asynchronous: a write the primary acknowledged but had not yet
sent is lost in a failover. On loopback that window is a fraction of a millisecond, so the test
widens it the way a lagging replica would: it drops the primary's replication link (``CLIENT KILL
TYPE replica``) after refusing the replica's resynchronization (``ACL SETUSER default -psync
-sync``), then publishes a few more messages before the kill, so some acknowledged messages exist
only on the primary that dies.

The test prints one line with its figures (spectra, faults, lost, duplicated, failover seconds,
what reconcile re-sent).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from _catalogs import write_catalog
from _sentinel import SentinelCluster, TlsRedisServer, TlsSentinel, self_signed_certificate
from _service import Worker, build_checkpoint, rows, run_cli, spectra_farm, wait_for, worker_env
from astronn_dist.worker.config import Settings
from astronn_dist.worker.contract import QUEUE, SpectrumRequest
from test_faults import _all_written, _count_rows, _quiet, _reconcile  # the fault tests' checks

pytestmark = [pytest.mark.service, pytest.mark.slow, pytest.mark.timeout(900)]

VISIBILITY_S = 10  # a delivered message whose acknowledgement was lost comes back after this
UNREPLICATED_MESSAGES = 5  # published after the replication link was cut, before the kill


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("model") / "random-dr17.pt")


@pytest.fixture()
def cluster(tmp_path: Path):
    # A primary is declared down after 2 s without an answer: short enough for a failover in
    # seconds, long enough that a loaded machine does not fail over before the kill.
    servers = SentinelCluster(tmp_path / "redis", replicas=1, sentinels=3, down_after_ms=2000)
    try:
        yield servers.start()
    finally:
        servers.close()


def test_primary_killed_mid_stream_fails_over_and_reconcile_loses_nothing(
    cluster: SentinelCluster, sqlite_url: str, checkpoint: Path, apstar_files: list[Path],
    tmp_path: Path, workers: list[Worker], capsys: pytest.CaptureFixture,
) -> None:
    import redis

    from astronn_dist.producer.enqueue import enqueue

    n, chunk = 2000, 20
    url = cluster.url()
    entries = spectra_farm(apstar_files, tmp_path / "spectra", n)
    ids = [e["spectrum_id"] for e in entries]
    catalog = write_catalog("csv", tmp_path / "catalog",
                            {"spectrum_id": ids, "path": [e["path"] for e in entries]})
    requests = [SpectrumRequest(spectrum_id=e["spectrum_id"], path=e["path"]) for e in entries]
    settings = Settings(broker_url=url, database_url=sqlite_url, model_path=checkpoint)

    env = worker_env(redis_url=url, database_url=sqlite_url, model=checkpoint,
                     ASTRONN_DIST_VISIBILITY_TIMEOUT=VISIBILITY_S, ASTRONN_DIST_MC_PASSES=2)
    worker = Worker(env, tmp_path / "w.log", name="w", serve=True)  # what `astronn-dist worker` runs
    workers.append(worker)
    worker.wait_ready()

    # The first half, then the second half with the primary dying while it goes out.
    t0 = time.monotonic()
    half = n // 2
    messages = enqueue(requests[:half], settings, chunk_size=chunk, force=True).messages
    wait_for(lambda: _count_rows(sqlite_url) >= half // 4, 300, "the stream under way", worker)

    old_port = cluster.primary.port
    assert cluster.primary_port() == old_port, "the Sentinels failed over before the kill"
    sent = 0
    killed = threading.Event()
    t_kill: list[float] = []
    errors: list[BaseException] = []

    def on_progress(_spectra: int) -> None:  # in the producer's thread, after each message
        nonlocal sent
        sent += 1
        if sent == 10:  # the replica stops receiving: what follows is only on the primary
            with redis.Redis(host="127.0.0.1", port=old_port, socket_timeout=5) as primary:
                # Refused a resynchronization, the replica stays behind until the kill.
                primary.execute_command("ACL", "SETUSER", "default", "-psync", "-sync")
                assert primary.client_kill_filter(_type="replica") == 1
        elif sent == 10 + UNREPLICATED_MESSAGES:
            t_kill.append(time.monotonic())
            cluster.primary.kill()  # SIGKILL: the broker's machine dies
            killed.set()

    def produce() -> None:
        nonlocal messages
        try:
            messages += enqueue(requests[half:], settings, chunk_size=chunk, force=True,
                                on_progress=on_progress).messages
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    producer = threading.Thread(target=produce)
    producer.start()
    assert killed.wait(120), f"the primary was not killed: {errors}"
    new_port, _ = cluster.wait_failover(old_port, timeout=120)
    failover_s = time.monotonic() - t_kill[0]
    producer.join(300)
    assert not producer.is_alive(), "the producer hangs after the failover"
    assert not errors, f"the producer did not carry on after the failover: {errors[0]!r}"
    assert messages == n // chunk

    # The worker carries on against the new primary; wait until everything it can see is done.
    wait_for(lambda: _quiet(settings, [worker]), 600, "the queue drained on the new primary", worker)
    written = {r["spectrum_id"] for r in rows(sqlite_url)}
    missing = set(ids) - set(written)
    resent = _reconcile(capsys, catalog, chunk, url, sqlite_url, checkpoint, missing)

    lost, duplicated, elapsed = _all_written(sqlite_url, ids, t0, worker)
    assert worker.proc.poll() is None
    assert new_port == cluster.replicas[0].port
    print(f"\n[sentinel] {n} spectra in {messages} messages, 1 worker, primary + 1 replica + 3 "
          f"Sentinels; primary SIGKILLed mid-publish ({UNREPLICATED_MESSAGES} messages "
          f"unreplicated): failover {failover_s:.1f} s (kill -> new primary answering), producer "
          f"and worker carried on; reconcile re-sent {resent} spectra; {lost} lost, "
          f"{duplicated} duplicated; {elapsed:.1f} s")


def test_produce_status_and_reconcile_through_password_protected_sentinels(
    tmp_path: Path, checkpoint: Path, apstar_files: list[Path], sqlite_url: str,
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`produce` with a ``sentinel://`` URL (once refused: "'master_name' transport option must
    be specified") publishes to the primary the Sentinels name; ``status``, ``reconcile`` and the
    metrics' queue gauge read it; the Sentinels' own password comes from
    ASTRONN_DIST_SENTINEL_PASSWORD, the primary's from the URL; a wrong Sentinel password is a
    clear error."""
    import redis

    servers = SentinelCluster(tmp_path / "redis", password="primary-pw",
                              sentinel_password="sentinel-pw")
    try:
        servers.start()
        for name in [k for k in os.environ if k.startswith("ASTRONN_DIST_")]:
            monkeypatch.delenv(name)
        monkeypatch.setenv("ASTRONN_DIST_SENTINEL_PASSWORD", "sentinel-pw")
        entries = spectra_farm(apstar_files, tmp_path / "spectra", 50)
        catalog = write_catalog("csv", tmp_path / "catalog", {
            "spectrum_id": [e["spectrum_id"] for e in entries], "path": [e["path"] for e in entries]})
        common = ["--broker", servers.url(), "--db", sqlite_url, "--model", str(checkpoint)]

        code, out, err = run_cli(capsys, "produce", "--catalog", str(catalog), "--chunk-size", "10",
                                 *common)
        assert code == 0, out + err
        with redis.Redis(port=servers.primary.port, password="primary-pw") as primary:
            assert primary.llen(QUEUE) == 5
        assert "primary-pw" not in out + err

        code, out, err = run_cli(capsys, "status", *common[:4])
        assert code == 0, out + err
        assert "5 messages waiting" in " ".join(out.split()), out

        from astronn_dist.worker.service.metrics import QueueCollector

        gauges = {(m.name, tuple(s.labels.items())): s.value
                  for m in QueueCollector(Settings(broker_url=servers.url(),
                                                   sentinel_password="sentinel-pw")).collect()
                  for s in m.samples}
        assert gauges[("astronn_dist_broker_up", ())] == 1
        assert gauges[("astronn_dist_queue_messages", (("state", "waiting"),))] == 5

        code, out, err = run_cli(capsys, "reconcile", "--catalog", str(catalog), *common)
        assert code == 0, out + err
        assert "enqueued 0" in out, out  # every spectrum is on the queue already

        monkeypatch.setenv("ASTRONN_DIST_SENTINEL_PASSWORD", "wrong")
        code, out, err = run_cli(capsys, "status", *common[:4])
        assert code == 2, out + err
        assert "cannot reach the broker" in " ".join((out + err).split()), out + err
    finally:
        servers.close()


def test_produce_and_status_through_a_tls_sentinel(
    tmp_path: Path, checkpoint: Path, apstar_files: list[Path], sqlite_url: str,
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A primary and a Sentinel that speak TLS only: the URL's ``ssl_cert_reqs`` and
    ``ssl_ca_certs`` reach kombu (the producer's publishes) and redis-py (``status``), for the
    Sentinel and the primary alike; the same URL without them cannot connect."""
    import redis

    cert, key = self_signed_certificate(tmp_path / "tls")
    primary = TlsRedisServer(tmp_path / "primary", cert, key)
    sentinel = None
    try:
        primary.start()
        sentinel = TlsSentinel(tmp_path / "sentinel", primary.tls_port, cert, key).start(primary.binary)
        for name in [k for k in os.environ if k.startswith("ASTRONN_DIST_")]:
            monkeypatch.delenv(name)
        plain = f"sentinel://127.0.0.1:{sentinel.port}/0"
        url = f"{plain}?ssl_cert_reqs=required&ssl_ca_certs={cert}"
        entries = spectra_farm(apstar_files, tmp_path / "spectra", 30)
        catalog = write_catalog("csv", tmp_path / "catalog", {
            "spectrum_id": [e["spectrum_id"] for e in entries], "path": [e["path"] for e in entries]})

        code, out, err = run_cli(capsys, "produce", "--catalog", str(catalog), "--chunk-size", "10",
                                 "--broker", url, "--db", sqlite_url, "--model", str(checkpoint))
        assert code == 0, out + err
        with redis.Redis(host="127.0.0.1", port=primary.tls_port, ssl=True, ssl_ca_certs=str(cert)) as client:
            assert client.llen(QUEUE) == 3
        code, out, err = run_cli(capsys, "status", "--broker", url, "--db", sqlite_url)
        assert code == 0, out + err
        assert "3 messages waiting" in " ".join(out.split()), out

        code, out, err = run_cli(capsys, "status", "--broker", plain, "--db", sqlite_url)
        assert code == 2, out + err
        assert "cannot reach the broker" in " ".join((out + err).split()), out + err
    finally:
        if sentinel is not None:
            sentinel.close()
        primary.close()
