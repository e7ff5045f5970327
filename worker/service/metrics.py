"""Prometheus metrics of a worker: what it wrote, how fast, how often it retried, on what device.

A Celery worker is a parent process that forks pool processes, and the work (hence the counting)
happens in the pool processes. prometheus_client's multiprocess mode is made for this: each
process writes its samples to memory-mapped files in ``PROMETHEUS_MULTIPROC_DIR`` and the parent
serves the sum over them. So :func:`serve` (called in the parent before it forks) sets that
folder first and only then imports prometheus_client, whose value class is chosen at import.
Without :func:`serve` (``astronn-dist run``, tests, a bare ``celery worker``), the metrics are
ordinary in-process ones that nobody scrapes: recording them costs microseconds per chunk.

Metrics (all prefixed ``astronn_dist_``):

============================================  =================================================
``spectra_total{outcome}``                    rows written: ``result`` or ``no_result``
``flags_total{flag}``                         rows with each flag set: fakemag_unreliable,
                                              missing_photometry, missing_extinction,
                                              no_result, flag_warn, flag_bad
``chunk_spectra``                             histogram of spectra per chunk
``chunk_seconds``                             histogram of chunk latency (process + commit)
``retries_total{reason}``                     chunks sent back for a retry, by reason
``parked_chunks_total``                       chunks parked after killing workers N times
``rejected_messages_total``                   messages refused as invalid (JSON, schema)
``model_load_seconds``                        time the last model load took (max over processes)
``worker_info{device,model_id}``              1 per live pool process, labelled
``queue_messages{state}``                     the broker's queue at scrape time: ``waiting``
                                              (LLEN) and ``in_flight`` (kombu's unacked hash)
``broker_up``                                 1 when the scrape could read the queue, else 0
============================================  =================================================

The queue gauges are read by the parent at each scrape (:class:`QueueCollector`), so every
worker reports the same shared queue: take ``max``, not ``sum``, over workers.
deploy/grafana/ holds a dashboard of these metrics (tests/test_metrics.py checks it queries
nothing else).

Nothing secret is ever a label: no URL, path or message content.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from astronn_dist.worker.config import DEFAULT_METRICS_ADDR, Settings, metrics_address
from astronn_dist.worker.contract import QUEUE, UNACKED_KEY
from astronn_dist.worker.service.results import FLAG_COUNTS

if TYPE_CHECKING:
    from astronn_dist.worker.science.pipeline import ResultRecord

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CHUNK_SIZE_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1000)
CHUNK_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


@lru_cache(maxsize=1)
def _metrics() -> SimpleNamespace:
    """The metric objects, created on first use (after :func:`serve` chose the mode)."""
    from prometheus_client import Counter, Gauge, Histogram

    return SimpleNamespace(
        spectra=Counter("astronn_dist_spectra", "Rows written, by outcome.", ["outcome"]),
        flags=Counter("astronn_dist_flags", "Rows written with each flag set.", ["flag"]),
        chunk_spectra=Histogram("astronn_dist_chunk_spectra", "Spectra per chunk.",
                                buckets=CHUNK_SIZE_BUCKETS),
        chunk_seconds=Histogram("astronn_dist_chunk_seconds",
                                "Seconds to process a chunk and commit its rows.",
                                buckets=CHUNK_SECONDS_BUCKETS),
        retries=Counter("astronn_dist_retries", "Chunks retried, by reason.", ["reason"]),
        parked=Counter("astronn_dist_parked_chunks", "Chunks parked after killing workers."),
        rejected=Counter("astronn_dist_rejected_messages", "Messages refused as invalid."),
        model_load=Gauge("astronn_dist_model_load_seconds", "Seconds the model load took.",
                         multiprocess_mode="max"),
        info=Gauge("astronn_dist_worker_info", "1 per live pool process.",
                   ["device", "model_id"], multiprocess_mode="liveall"),
    )


def observe_rows(records: Sequence[ResultRecord]) -> None:
    """Count committed rows by outcome and by flag."""
    m = _metrics()
    no_result = sum(1 for r in records if r.result_flags & FLAG_COUNTS["no_result"])
    m.spectra.labels("no_result").inc(no_result)
    m.spectra.labels("result").inc(len(records) - no_result)
    for name, bit in FLAG_COUNTS.items():  # the names `astronn-dist status` uses
        n = sum(1 for r in records if r.result_flags & bit)
        if n:
            m.flags.labels(name).inc(n)
    for name, n in (("flag_warn", sum(r.flag_warn for r in records)),
                    ("flag_bad", sum(r.flag_bad for r in records))):
        if n:
            m.flags.labels(name).inc(n)


def observe_chunk(spectra: int, seconds: float) -> None:
    """One chunk processed and committed: its size and latency."""
    m = _metrics()
    m.chunk_spectra.observe(spectra)
    m.chunk_seconds.observe(seconds)


def observe_retry(reason: str) -> None:
    _metrics().retries.labels(reason).inc()


def observe_parked() -> None:
    _metrics().parked.inc()


def observe_rejected() -> None:
    _metrics().rejected.inc()


def observe_model_loaded(seconds: float, device: str, model_id: str) -> None:
    m = _metrics()
    m.model_load.set(seconds)
    m.info.labels(device, model_id).set(1)


def process_exited(pid: int) -> None:
    """A pool process ended: drop its live gauges (multiprocess mode only)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


class QueueCollector:
    """The queue's length, read from the broker when Prometheus scrapes (a custom collector).

    A broker that cannot be reached gives ``broker_up 0`` and no queue samples: the scrape
    itself never fails, so the worker's other metrics still arrive.
    """

    def __init__(self, settings: Settings) -> None:
        from astronn_dist.worker.service.broker import redis_client

        # Short timeouts: a scrape must answer within Prometheus's scrape timeout (10 s).
        self._client = redis_client(settings, timeout_s=2, connect_timeout_s=2)

    @staticmethod
    def _families():  # noqa: ANN205
        from prometheus_client.core import GaugeMetricFamily

        return (GaugeMetricFamily("astronn_dist_broker_up", "1 when the broker's queue could be read."),
                GaugeMetricFamily("astronn_dist_queue_messages",
                                  "Messages on the broker's queue, by state.", labels=["state"]))

    def describe(self):  # noqa: ANN201 - the families, without reading the broker
        return self._families()

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        import redis

        up, queue = self._families()
        try:
            with self._client.pipeline(transaction=False) as pipe:
                waiting, in_flight = pipe.llen(QUEUE).hlen(UNACKED_KEY).execute()
        except redis.exceptions.RedisError as exc:
            log.debug("queue length not read: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        queue.add_metric(["waiting"], waiting)  # waiting for a worker
        queue.add_metric(["in_flight"], in_flight)  # delivered, not yet acknowledged
        yield queue


def serve(port: int, address: str = DEFAULT_METRICS_ADDR, broker: Settings | None = None) -> bool:
    """Serve ``/metrics`` on ``address:port`` from this (parent) process, summed over its pool.

    Call before the pool forks. ``address`` is an IP address (``ASTRONN_DIST_METRICS_ADDR``,
    ``--metrics-addr``): ``0.0.0.0`` for a Prometheus on another host, ``127.0.0.1`` to keep
    the metrics on this host. Uses ``PROMETHEUS_MULTIPROC_DIR`` when the environment sets it
    (its ``*.db`` sample files, a previous run's, are removed first), else a fresh temporary
    folder. With ``broker`` (the settings of the broker), the queue's length is read at each scrape (:class:`QueueCollector`).
    Returns False, with a warning, when the port cannot be bound (e.g. a second worker
    on the host, or an address this host does not have): the worker runs on without metrics
    rather than not at all. ``port`` 0 disables metrics.

    Raises:
        ValueError: ``address`` is not an IP address.
    """
    if port <= 0:
        return False
    address = metrics_address(address)  # before any side effect: a typo fails loudly
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        folder = tempfile.mkdtemp(prefix="astronn-dist-metrics-")
        os.environ[MULTIPROC_ENV] = folder
        atexit.register(shutil.rmtree, folder, True)  # ours: gone with the worker
    else:  # a previous run's sample files would be summed in: remove them (only them)
        os.makedirs(folder, exist_ok=True)
        for stale in Path(folder).glob("*.db"):
            stale.unlink(missing_ok=True)
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=folder)
    if broker is not None:
        registry.register(QueueCollector(broker))
    try:
        start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        log.warning("metrics not served: cannot listen on %s (%s)", _host_port(address, port), exc)
        return False
    log.info("Prometheus metrics on http://%s/metrics", _host_port(address, port))
    return True


def _host_port(address: str, port: int) -> str:
    """``host:port`` as in a URL: an IPv6 address in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
