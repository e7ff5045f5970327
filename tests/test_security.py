"""Credentials: a password-protected Redis (requirepass) works for the producer, the worker
and ``status``, and the password is in no output and no log line; without it, the producer
fails with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from _servers import RedisServer
from _service import Worker, build_checkpoint, rows, run_cli, spectra_farm, wait_for, worker_env

pytestmark = [pytest.mark.service, pytest.mark.timeout(300)]

PASSWORD = "s3cret-hunter2"


def _cli(capsys, *args: str) -> tuple[int, str]:
    code, out, err = run_cli(capsys, *args)
    return code, out + err


def test_password_protected_redis_end_to_end_and_never_echoed(
    capsys, sqlite_url: str, apstar_files: list[Path], tmp_path: Path,
    workers: list[Worker],
) -> None:
    server = RedisServer(tmp_path / "redis", password=PASSWORD).start()
    try:
        url = server.url()
        checkpoint = build_checkpoint(tmp_path / "random-dr17.pt")
        entries = spectra_farm(apstar_files, tmp_path / "spectra", 6)
        catalog = tmp_path / "catalog.csv"
        catalog.write_text("spectrum_id,path\n" + "".join(f"{e['spectrum_id']},{e['path']}\n" for e in entries))

        no_auth = url.replace(f":{PASSWORD}@", "")
        code, out = _cli(capsys, "produce", "--catalog", str(catalog), "--broker", no_auth,
                         "--db", sqlite_url, "--model", str(checkpoint))
        assert code == 2 and "error:" in out and "Traceback" not in out, out

        # The URL reaches the worker from a file, as from a Kubernetes or Docker secret.
        secret = tmp_path / "broker_url"
        secret.write_text(url + "\n")
        env = worker_env(redis_url="unused", database_url=sqlite_url, model=checkpoint)
        env.pop("ASTRONN_DIST_BROKER_URL")
        env["ASTRONN_DIST_BROKER_URL_FILE"] = str(secret)
        worker = Worker(env, tmp_path / "worker.log", name="auth", serve=True)  # astronn-dist worker
        workers.append(worker)
        worker.wait_ready()
        # The settings reach the pool in the app it forks with: the URL read from the file is
        # in no process's environment.
        processes = [worker.proc.pid, *worker.children()]
        assert len(processes) == 2
        for pid in processes:
            assert PASSWORD.encode() not in Path(f"/proc/{pid}/environ").read_bytes(), pid
        code, out = _cli(capsys, "produce", "--catalog", str(catalog), "--broker", url,
                         "--db", sqlite_url, "--model", str(checkpoint))
        assert code == 0 and "enqueued 6 spectra" in out, out
        printed = out
        ids = {e["spectrum_id"] for e in entries}
        wait_for(lambda: ids <= {r["spectrum_id"] for r in rows(sqlite_url)}, 120, "rows", worker)
        code, out = _cli(capsys, "status", "--broker", url, "--db", sqlite_url)
        assert code == 0 and ":***@" in out, out
        printed += out
    finally:
        server.close()
    assert PASSWORD not in printed
    assert PASSWORD not in worker.log()
