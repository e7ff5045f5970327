"""Prometheus metrics of a real worker: served by the parent, summed over its pool processes."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from _servers import free_port, listening_addresses  # tests/ is on sys.path
from _service import Worker, build_checkpoint, publish, rows, spectra_farm, wait_for, worker_env
from astronn_dist.worker.config import Settings

pytestmark = [pytest.mark.service, pytest.mark.timeout(300)]


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def test_worker_serves_counts_by_outcome_and_flag_latency_and_device(
    redis_url: str, sqlite_url: str, apstar_files: list[Path], tmp_path: Path
) -> None:
    checkpoint = build_checkpoint(tmp_path / "random-dr17.pt")
    port = free_port()
    env = worker_env(redis_url=redis_url, database_url=sqlite_url, model=checkpoint,
                     ASTRONN_DIST_METRICS_PORT=str(port),
                     ASTRONN_DIST_BROKER_URL=redis_url)
    worker = Worker(env, tmp_path / "worker.log", name="metrics", serve=True)
    try:
        worker.wait_ready()
        entries = spectra_farm(apstar_files, tmp_path / "spectra", 6, broken=2)
        publish(redis_url, {"spectra": entries[:4]})
        publish(redis_url, {"spectra": entries[4:]})
        publish(redis_url, {"spectra": "not a list"})  # rejected as a whole
        ids = {e["spectrum_id"] for e in entries}
        wait_for(lambda: {r["spectrum_id"] for r in rows(sqlite_url)} >= ids, 120, "rows", worker)
        wait_for(lambda: "rejected message" in worker.log(), 30, "the rejection", worker)
        m = wait_for(lambda: (s := _scrape(port)).get(("astronn_dist_chunk_spectra_count", ())) == 2
                     and s, 30, "two chunks in the metrics", worker)
    finally:
        worker.stop()

    assert m[("astronn_dist_spectra_total", (("outcome", "result"),))] == 6
    assert m[("astronn_dist_spectra_total", (("outcome", "no_result"),))] == 2
    assert m[("astronn_dist_flags_total", (("flag", "no_result"),))] == 2
    assert m[("astronn_dist_flags_total", (("flag", "flag_bad"),))] >= 2
    # The bulge star's header has no SFD_EBV: three of the six copies miss their extinction.
    assert m[("astronn_dist_flags_total", (("flag", "missing_extinction"),))] == 3
    assert m[("astronn_dist_chunk_spectra_sum", ())] == 8
    assert m[("astronn_dist_chunk_seconds_count", ())] == 2
    assert m[("astronn_dist_rejected_messages_total", ())] == 1
    assert m[("astronn_dist_model_load_seconds", ())] > 0
    # The queue, read from Redis at the scrape: every message taken, the broker reachable.
    assert m[("astronn_dist_queue_messages", (("state", "waiting"),))] == 0
    assert m[("astronn_dist_broker_up", ())] == 1
    info = [k for k in m if k[0] == "astronn_dist_worker_info"]
    assert len(info) == 1 and ("device", "cpu") in info[0][1]
    assert dict(info[0][1])["model_id"].startswith("random-dr17-")


def test_json_logs_have_one_line_per_chunk_with_counts_and_timings(
    redis_url: str, sqlite_url: str, apstar_files: list[Path], tmp_path: Path
) -> None:
    import json

    checkpoint = build_checkpoint(tmp_path / "random-dr17.pt")
    env = worker_env(redis_url=redis_url, database_url=sqlite_url, model=checkpoint,
                     ASTRONN_DIST_LOG_FORMAT="json")
    worker = Worker(env, tmp_path / "worker.log", name="json-logs")
    try:
        worker.wait_ready()
        entries = spectra_farm(apstar_files, tmp_path / "spectra", 5, broken=1)
        task_id = publish(redis_url, {"spectra": entries})
        wait_for(lambda: '"event": "chunk"' in worker.log(), 120, "the chunk's line", worker)
    finally:
        worker.stop()
    lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
    assert lines, worker.log()[-2000:]
    assert all({"time", "level", "logger", "process", "message"} <= set(x) for x in lines)
    (chunk,) = [x for x in lines if x.get("event") == "chunk"]
    assert chunk["task_id"] == task_id and chunk["level"] == "INFO"
    assert (chunk["spectra"], chunk["results"], chunk["no_result"]) == (6, 5, 1)
    assert chunk["seconds"] > 0 and chunk["attempt"] == 1
    assert chunk["model_id"].startswith("random-dr17-")
    loaded = [x for x in lines if x.get("event") == "model_loaded"]
    assert len(loaded) == 1 and loaded[0]["device"] == "cpu" and loaded[0]["seconds"] > 0
    assert str(sqlite_url) not in worker.log()  # no URL in any line


@pytest.mark.parametrize("address, expected", [("127.0.0.1", "127.0.0.1"), (None, "0.0.0.0")])
def test_the_metrics_server_listens_on_the_configured_address(address: str | None, expected: str, tmp_path: Path) -> None:
    """The real server (astronn_dist.worker.service.metrics.serve, in a process of its own: it sets the multiprocess
    folder for its process), on ASTRONN_DIST_METRICS_ADDR's address, the default being all."""
    import subprocess
    import sys

    if not Path("/proc/net/tcp").exists():
        pytest.skip("reads the listening address in /proc/net/tcp (Linux)")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ASTRONN_DIST_", "PROMETHEUS_"))}
    if address:
        env["ASTRONN_DIST_METRICS_ADDR"] = address
    code = (
        "import sys, time; from astronn_dist.worker.service import metrics; from astronn_dist.worker.config import Settings; "
        "s = Settings.from_env(); ok = metrics.serve(int(sys.argv[1]), s.metrics_addr); "
        "metrics.observe_parked(); print(ok, flush=True); time.sleep(60)"  # counted, then told
    )
    server = subprocess.Popen([sys.executable, "-c", code, str(port)], env=env, cwd=Path(__file__).parents[1],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert server.stdout.readline().strip() == "True"
        assert listening_addresses(port) == {expected}
        assert _scrape(port)[("astronn_dist_parked_chunks_total", ())] == 1
    finally:
        server.kill()
        server.wait()


def test_the_metrics_server_refuses_an_address_that_is_not_an_ip(monkeypatch) -> None:
    from astronn_dist.worker.service import metrics
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(ValueError, match="metrics address 'localhost' .* is not an IP address"):
        metrics.serve(free_port(), "localhost")
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # refused before doing anything


def test_the_queue_gauges_read_the_broker_at_each_scrape(redis_url: str) -> None:
    """QueueCollector on a real Redis: waiting (LLEN) and in flight (kombu's unacked hash) as
    they are now; an unreachable broker gives broker_up 0 and no queue samples, not an error."""
    import redis

    from astronn_dist.worker.contract import QUEUE, UNACKED_KEY
    from astronn_dist.worker.service.metrics import QueueCollector

    def samples(collector: QueueCollector) -> dict[tuple[str, tuple], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in collector.collect() for s in family.samples}

    client = redis.Redis.from_url(redis_url)
    client.rpush(QUEUE, "a", "b", "c")
    client.hset(UNACKED_KEY, "tag", "x")
    collector = QueueCollector(Settings(broker_url=redis_url))
    assert samples(collector) == {("astronn_dist_broker_up", ()): 1,
                                  ("astronn_dist_queue_messages", (("state", "waiting"),)): 3,
                                  ("astronn_dist_queue_messages", (("state", "in_flight"),)): 1}
    client.lpop(QUEUE)
    assert samples(collector)[("astronn_dist_queue_messages", (("state", "waiting"),))] == 2
    gone = QueueCollector(Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0"))
    assert samples(gone) == {("astronn_dist_broker_up", ()): 0}


DASHBOARD = Path(__file__).parents[1] / "deploy" / "grafana" / "dashboards" / "astronn-dist.json"


def _exported_series() -> dict[str, str]:
    """Every series name the worker can export, by the metric family it belongs to."""
    from prometheus_client import REGISTRY

    from astronn_dist.worker.service import metrics

    metrics._metrics()  # the worker's metric objects, in this process's default registry
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    families = [f for f in REGISTRY.collect() if f.name.startswith("astronn_dist_")]
    families += metrics.QueueCollector(Settings(broker_url="redis://127.0.0.1:1/0")).describe()  # reads no broker
    return {f.name + end: f.name for f in families for end in suffixes[f.type]}


def test_the_grafana_dashboard_queries_only_what_the_worker_exports() -> None:
    """Every series a panel of deploy/grafana's dashboard queries is one the worker exports,
    and every metric family the worker exports is on the dashboard."""
    import json
    import re

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs and all(panel["targets"] for panel in dashboard["panels"])
    queried = {name for e in exprs for name in re.findall(r"\bastronn_dist_\w+", e)}
    exported = _exported_series()
    assert queried <= set(exported), sorted(queried - set(exported))
    assert {exported[q] for q in queried} == set(exported.values())
    datasources = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    provisioned = (DASHBOARD.parents[1] / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    assert datasources == {"prometheus"} and "uid: prometheus" in provisioned
