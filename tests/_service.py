"""Helpers for tests that run real Celery workers: a small checkpoint, worker processes started
with subprocess, publishing, and reading the results table."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from _data import astronn_parameters  # tests/ is on sys.path

REPO = Path(__file__).resolve().parents[1]


def build_checkpoint(path: Path, seed: int = 1234) -> Path:
    """Random weights (fixed seed) with the real astroNN DR17 input_mean and labels_std."""
    import torch

    from astronn_dist.worker.science.model import ApogeeDistBCNN, save_checkpoint

    params = astronn_parameters()
    torch.manual_seed(seed)
    net = ApogeeDistBCNN()
    state = net.state_dict()
    state["input_mean"] = torch.tensor(params["input_mean"]["input"], dtype=torch.float64)
    state["labels_std"] = torch.tensor(params["labels_std"]["output"], dtype=torch.float64)
    net.load_state_dict(state)
    return save_checkpoint(net, path)


def spectra_farm(apstar_files: list[Path], folder: Path, n: int, *, broken: int = 0) -> list[dict[str, Any]]:
    """``n`` symlinks to the real apStar files (distinct names and spectrum_ids), plus ``broken``
    files that are not FITS. Returns the message entries (no catalog photometry: the headers')."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        target = apstar_files[i % len(apstar_files)]
        link = folder / f"{i:04d}-{target.name}"
        if not link.exists():
            link.symlink_to(target)
        entries.append({"spectrum_id": f"star-{i:04d}", "path": str(link), "k_mag": None, "ebv": None})
    for j in range(broken):
        bad = folder / f"broken-{j}.fits"
        bad.write_bytes(b"this is not a FITS file\n" * 10)
        entries.append({"spectrum_id": f"broken-{j}", "path": str(bad), "k_mag": 10.0, "ebv": 0.1})
    return entries


def bad_spectrum_files(tmp: Path, real_file: str) -> dict[str, str]:
    """name -> path of a file that must give a no-result record: zero-byte, text named .fits,
    truncated, primary-only, 8000-pixel, all-NaN flux, missing error HDU, missing file."""
    files: dict[str, Path] = {}
    files["zero-byte"] = tmp / "apStar-zero.fits"
    files["zero-byte"].write_bytes(b"")
    files["text"] = tmp / "apStar-text.fits"
    files["text"].write_text("SIMPLE  = this is not a FITS file, only text named .fits\n" * 40)
    raw = Path(real_file).read_bytes()
    files["truncated"] = tmp / "apStar-truncated.fits"
    files["truncated"].write_bytes(raw[: len(raw) // 3])

    header = fits.getheader(real_file, 0)
    files["primary-only"] = tmp / "apStar-primary-only.fits"
    fits.PrimaryHDU(header=header).writeto(files["primary-only"])

    n = 8000
    files["8000-pixel"] = tmp / "apStar-8000.fits"
    fits.HDUList([
        fits.PrimaryHDU(header=header),
        fits.ImageHDU(np.ones((1, n), np.float32)),
        fits.ImageHDU(np.full((1, n), 0.01, np.float32)),
        fits.ImageHDU(np.zeros((1, n), np.int32)),
    ]).writeto(files["8000-pixel"])

    with fits.open(real_file) as hdul:
        all_nan = fits.HDUList([h.copy() for h in hdul])
        all_nan[1].data = np.full_like(hdul[1].data, np.nan)
        files["all-nan"] = tmp / "apStar-all-nan.fits"
        all_nan.writeto(files["all-nan"])
        no_err = fits.HDUList([hdul[0].copy(), hdul[1].copy()])
        files["missing-error-hdu"] = tmp / "apStar-no-err.fits"
        no_err.writeto(files["missing-error-hdu"])

    out = {name: str(path) for name, path in files.items()}
    out["missing-file"] = str(tmp / "apStar-does-not-exist.fits")
    return out


def worker_env(
    *, redis_url: str, database_url: str, model: Path, **extra: str | int
) -> dict[str, str]:
    """Environment of a test worker: its own Redis db, database and checkpoint; CPU, 1 thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASTRONN_DIST_")}
    env.update(
        ASTRONN_DIST_BROKER_URL=redis_url,
        ASTRONN_DIST_DATABASE_URL=database_url,
        ASTRONN_DIST_MODEL=str(model),
        ASTRONN_DIST_DEVICE="cpu",
        ASTRONN_DIST_MC_PASSES="10",
        ASTRONN_DIST_METRICS_PORT="0",  # several test workers share the host
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        PYTHONUNBUFFERED="1",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def celery_worker_args(name: str) -> list[str]:
    """The arguments after ``celery`` that start a test worker: one prefork pool process on the
    service's queue, named ``name@host``."""
    return ["-A", "astronn_dist.worker.service.app", "worker", "-Q", "astronn_dist", "-P", "prefork",
            "-c", "1", "-l", "INFO", "-n", f"{name}@%h", "--without-gossip", "--without-mingle"]


class Worker:
    """A real worker process (``python -m celery -A astronn_dist.worker.service.app worker`` or ``astronn_dist.worker.service.serve``,
    or ``argv`` as given, e.g. ``astronn-dist worker`` on another host), in its own session so that
    the test can kill it and its pool as a whole."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *, name: str, serve: bool = False,
                 argv: list[str] | None = None) -> None:
        self.log_path = log_path
        self.name = name
        if argv is not None:
            pass
        elif serve:
            code = (
                "from astronn_dist.worker.config import Settings; from astronn_dist.worker.service.serve import run_worker; "
                f"s = Settings.from_env(); run_worker(s, device='cpu', concurrency=1, model=None, "
                f"hostname={name + '@%h'!r})"
            )
            argv = [sys.executable, "-c", code]
        else:
            argv = [sys.executable, "-m", "celery", *celery_worker_args(name)]
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            argv, env=dict(env), cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        wait_for(lambda: " ready." in self.log(), timeout, f"worker {self.name} ready", self)

    def children(self) -> list[int]:
        """Pool process ids (children of the worker's main process)."""
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid and fields[0] != "Z":
                out.append(int(stat.parent.name))
        return out

    def kill_pool_process(self) -> int:
        """SIGKILL the pool process (as the OOM killer would); returns its pid."""
        pids = self.children()
        assert len(pids) == 1, f"expected one pool process, found {pids}"
        os.kill(pids[0], signal.SIGKILL)
        return pids[0]

    def kill(self) -> None:
        """SIGKILL the worker and its pool at once (a machine that dies)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Warm shutdown, then kill whatever is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self._log.close()


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, worker: Worker | None = None,
    interval: float = 0.2,
) -> Any:
    """Poll ``predicate`` until it is truthy; fail with the worker's log tail otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if worker is not None and worker.proc.poll() is not None:
            raise AssertionError(f"worker exited ({worker.proc.returncode}) waiting for {what}:\n{worker.log()[-4000:]}")
        if time.monotonic() > deadline:
            tail = worker.log()[-4000:] if worker is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tail}")
        time.sleep(interval)


def publisher(redis_url: str):
    """A Celery app for publishing to the test broker (the service's own, as the producer uses)."""
    from astronn_dist.worker.service.app import make_app
    from astronn_dist.worker.config import Settings

    return make_app(Settings(broker_url=redis_url))


def publish(redis_url: str, message: Mapping[str, Any], task_id: str | None = None, **options: Any) -> str:
    from astronn_dist.worker.config import QUEUE, TASK_NAME

    app = publisher(redis_url)
    try:
        result = app.send_task(TASK_NAME, kwargs=dict(message), queue=QUEUE, task_id=task_id, **options)
        return result.id
    finally:
        app.close()


def rows(database_url: str) -> list[dict[str, Any]]:
    """All rows of astro_nn_dist (empty if the table does not exist yet)."""
    import sqlalchemy as sa

    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("astro_nn_dist"):
                return []
            return [dict(r._mapping) for r in conn.execute(sa.text("SELECT * FROM astro_nn_dist"))]
    except sa.exc.OperationalError:
        return []
    finally:
        engine.dispose()


def queue_length(redis_url: str, queue: str = "astronn_dist") -> int:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.llen(queue))
    finally:
        client.close()


def redis_client(redis_url: str):
    import redis

    return redis.Redis.from_url(redis_url)


def run_cli(capsys: Any, *args: str) -> tuple[int, str, str]:
    """Run ``astronn-dist ARGS`` in this process: (exit status, stdout, stderr)."""
    from astronn_dist.producer.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err
