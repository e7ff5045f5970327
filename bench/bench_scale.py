"""Survey-scale operations in bounded memory: the real ``astronn-dist`` commands on a catalog and a
results table of N rows (default 1,000,000), on SQLite and PostgreSQL.

    python -m bench --sections scale [--rows 1000000]
    python -m bench.bench_scale [--rows N] [--backends sqlite postgres]

Needs Redis and PostgreSQL (``scripts/services.sh`` starts them). Uses Redis database 13 of
``--redis`` (flushed before and after), a SQLite file in a temporary folder and a fresh
PostgreSQL database ``bench_scale_<pid>`` that it drops afterwards.

Per backend: a catalog of N rows (CSV and Parquet: path, spectrum_id ``2M%08d``, k_mag, ebv, a
few photometry cells NaN or empty; the paths do not exist, ``produce`` never opens them), then

* ``produce --catalog cat.csv`` against the empty table (everything enqueued),
* the table filled with a row per catalog id under the bundled model's id, through
  ``astronn_dist.worker.service.results.upsert_results`` in blocks of 20,000 (in this process: the bulk write path;
  mostly results, some flag bits, some no-result rows, some NaN),
* ``produce`` of cat.csv and cat.parquet and ``reconcile`` of cat.csv (everything skipped),
  ``status``, ``export`` to Parquet, FITS and CSV, ``report`` with a catalog of N Gaia
  parallaxes, S/N, Teff and logg (every row looked up by id).

Each command is its own process (the console script), timed by wall clock from start to exit.
Peak RSS: ``/usr/bin/time -f %M`` (or, without it, a small Python wrapper reading
``getrusage(RUSAGE_CHILDREN)``) reports the ``ru_maxrss`` of the command: the peak resident set
of the command or of the largest of its waited-for descendants. Not ``os.wait4`` from here: a
child's ``ru_maxrss`` starts at its parent's resident set at the fork (Linux carries the old
address space's high-water mark over ``exec``), and this process holds the catalog. A command
that fails gets a row saying so (exit status, last line of stderr) and no figures; the bench
goes on. The notes carry the targets of issue 12.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench.bench_service import _postgres_database
from bench.table import Row, format_rows, print_rows
from astronn_dist.producer.enqueue import model_id_of
from astronn_dist.worker import PIPELINE_VERSION
from astronn_dist.worker.config import BUNDLED_MODEL, QUEUE

REPO = Path(__file__).resolve().parents[1]
REDIS_DB = 13
FILL_BLOCK = 20_000
CLI = Path(sys.executable).parent / "astronn-dist"  # [project.scripts] -> astronn_dist.producer.cli:main
ARGV0 = [str(CLI)] if CLI.exists() else [sys.executable, "-m", "astronn_dist.producer.cli"]
WRAPPER = (  # argv: RSS_FILE CMD...; writes the children's peak RSS [KiB] (Linux), exits as CMD
    "import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
    "sys.exit(rc if rc >= 0 else 128 - rc)"
)


def measured(argv: Sequence[str], rss_file: Path) -> list[str]:
    """``argv`` under something that writes its peak RSS [KiB] into ``rss_file``."""
    if os.access("/usr/bin/time", os.X_OK):
        return ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *argv]
    return [sys.executable, "-c", WRAPPER, str(rss_file), *argv]

TARGETS = {  # issue 12: peak RSS bound [MB, 10^6 bytes] up to 1 M rows, above; text for the note
    "produce": (600, 1000, "target RSS <= 600 MB at 1 M (<= 1 GB at 10 M), >= 50,000 spectra/s at 1 M"),
    "reconcile": (600, 1000, "target RSS <= 600 MB at 1 M (<= 1 GB at 10 M)"),
    "status": (250, 250, "target RSS <= 250 MB (PostgreSQL: <= 2 s at 10 M)"),
    "export": (400, 400, "target RSS <= 400 MB"),
    "report": (400, 400, "issue 13: bounded memory (fixed-bin histograms, samples of 20,000), target RSS <= 400 MB"),
}


def make_catalog(folder: Path, n: int) -> tuple[Path, Path]:
    """cat.csv and cat.parquet with ``n`` rows; returns their paths."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    ids = [f"2M{i:08d}" for i in range(n)]
    k_mag = rng.uniform(7.0, 13.0, n)
    ebv = rng.uniform(0.0, 0.5, n)
    k_mag[::37] = np.nan                      # NaN photometry (written "nan" in the CSV)
    ebv[::23] = np.nan
    table = pa.table({
        "path": [f"apo25m/{i % 997:03d}+00/apStar-dr17-{s}.fits" for i, s in enumerate(ids)],
        "spectrum_id": ids,
        "k_mag": pa.array(k_mag, mask=np.arange(n) % 101 == 5),  # and empty cells (nulls)
        "ebv": pa.array(ebv, mask=np.arange(n) % 89 == 7),
    })
    csv, parquet = folder / "cat.csv", folder / "cat.parquet"
    pacsv.write_csv(table, csv)
    pq.write_table(table, parquet)
    return csv, parquet


def make_reference(folder: Path, n: int) -> Path:
    """ref.parquet: what ``report --catalog`` reads for each of the ``n`` ids: Gaia parallax and
    its error [mas] (some negative, some missing), snr, teff, logg."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    parallax = rng.normal(0.5, 0.3, n)
    parallax[::53] = np.nan
    path = folder / "ref.parquet"
    pq.write_table(pa.table({
        "spectrum_id": [f"2M{i:08d}" for i in range(n)], "parallax": parallax,
        "parallax_error": np.abs(rng.normal(0.03, 0.01, n)), "snr": rng.uniform(30, 500, n),
        "teff": rng.uniform(3800, 6500, n), "logg": rng.uniform(0.5, 4.8, n),
    }), path)
    return path


def reported(expected: int) -> Callable[[str], str]:
    """A check of report's first line: ``wrote OUT: <expected> rows of model ...``."""
    def check(out: str) -> str:
        found = re.search(r"(\d+) rows of model", out)
        if found is None or int(found.group(1)) != expected:
            return f"UNEXPECTED: {found.group(0) if found else 'no rows line'}, expected {expected}"
        return ""
    return check


def fill(url: str, n: int, model_id: str, backend: str) -> Row:
    """A results row for each of the catalog's ids, ``FILL_BLOCK`` per upsert_results call."""
    from astronn_dist.worker.service.results import make_engine, migrate, upsert_results

    engine = make_engine(url)
    migrate(engine)
    t0 = time.perf_counter()
    for start in range(0, n, FILL_BLOCK):
        rows = []
        for i in range(start, min(n, start + FILL_BLOCK)):
            failed = i % 50 == 3
            flags = 2048 if failed else (1 if i % 17 == 0 else 0) | (4 if i % 23 == 0 else 0)
            result = None if failed else 1.0 + (i % 1000) / 100
            rows.append({
                "spectrum_id": f"2M{i:08d}", "model_id": model_id,
                "path": f"apo25m/{i % 997:03d}+00/apStar-dr17-2M{i:08d}.fits",
                "pipeline_version": PIPELINE_VERSION, "t_elapsed": 0.01,
                "k_mag": None if failed else 10.0, "ebv": None if failed else 0.1,
                "a_k_mag": None if failed else 0.035, "L_fakemag": result,
                "L_fakemag_err": float("nan") if i % 97 == 1 else None if failed else 0.1,
                "dist": None if failed else 1000.0 + i % 5000, "dist_err": None if failed else 80.0,
                "result_flags": flags, "flag_warn": bool(flags & 4), "flag_bad": bool(flags & 2049),
                "error": "bench: no result" if failed else None, "mc_passes": 100, "seed": 0,
                "device": "cpu", "mask_rng": "bench", "host": "bench", "task_id": f"t{start}",
            })
        upsert_results(engine, rows)
    seconds = time.perf_counter() - t0
    engine.dispose()
    return Row("scale", "fill the table (upsert_results)", backend, n, seconds,
               f"in this process, {FILL_BLOCK:,} rows per call; the bulk write path")


def command(what: str, argv: Sequence[str], backend: str, n: int, cwd: Path, *,
            check: Callable[[str], str] = lambda out: "", rated: bool = True) -> Row:
    """Run one CLI command as a child process: wall seconds and peak RSS, or the failure."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASTRONN_DIST_")}
    env["PYTHONPATH"] = str(REPO)
    out_path, err_path, rss_path = cwd / "stdout.txt", cwd / "stderr.txt", cwd / "rss.txt"
    rss_path.unlink(missing_ok=True)
    with out_path.open("wb") as out, err_path.open("wb") as err:
        t0 = time.perf_counter()
        rc = subprocess.call(measured([*ARGV0, *argv], rss_path), cwd=cwd, env=env, stdout=out,
                             stderr=err, stdin=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
    stdout = out_path.read_text(errors="replace")
    name = argv[0]  # the subcommand
    at_1m, above, target = TARGETS[name]
    bound = at_1m if n <= 1_000_000 else above
    if rc != 0:
        lines = [ln.strip(" │╭╮╰╯─") for ln in err_path.read_text(errors="replace").splitlines()]
        lines = [ln for ln in lines if ln]  # without rich's box lines
        last = lines[-1] if lines else "(no stderr)"
        return Row("scale", what, backend, n, math.nan,
                   f"FAILED: exit {rc} after {seconds:.1f} s: {last[:200]}; {target}")
    rss = int(rss_path.read_text().split()[-1]) / 1024  # KiB -> MiB
    verdict = [f"RSS {'ok' if rss * 2**20 <= bound * 10**6 else 'OVER'}"]  # the table shows MiB
    if name == "produce" and n == 1_000_000:
        verdict.append(f"rate {'ok' if n / seconds >= 50_000 else 'BELOW'}")
    problem = check(stdout)
    note = f"{problem + '; ' if problem else ''}{target}: {', '.join(verdict)}"
    return Row("scale", what, backend, n, seconds, note, rss_mb=rss, rated=rated)


def enqueued_is(expected: int) -> Callable[[str], str]:
    """A check of produce/reconcile's summary line: it says ``enqueued <expected>``."""
    def check(out: str) -> str:
        found = re.search(r"enqueued (\d+)", out)
        own = re.search(r"\(([\d,]+) spectra/s\)", out)
        read = re.search(r"\(([\d.]+) s to read\)", out)
        says = ", ".join(([f"catalog read in {read.group(1)} s"] if read else [])
                         + ([f"its own enqueue rate {own.group(1)}/s"] if own else []))
        if found is None:
            return f"UNEXPECTED OUTPUT: {out.strip().splitlines()[-1:] or '(none)'}"
        if int(found.group(1)) != expected:
            return f"UNEXPECTED: enqueued {found.group(1)}, expected {expected}"
        return says
    return check


def wrote(expected: int, path: Path) -> Callable[[str], str]:
    def check(out: str) -> str:
        found = re.search(r"wrote (\d+) rows", out)
        size = f"{path.stat().st_size / 2**20:,.1f} MiB file" if path.exists() else "NO FILE"
        if found is None or int(found.group(1)) != expected:
            return f"UNEXPECTED: {found.group(0) if found else 'no wrote line'}, expected {expected}; {size}"
        return size
    return check


def backend_rows(backend: str, url: str, n: int, broker: str, work: Path, cat: tuple[Path, Path]) -> list[Row]:
    import redis

    flush = redis.Redis.from_url(broker).flushdb
    settings = ["--broker", broker, "--db", url]
    csv, parquet = cat
    sizes = {p: f"{p.name} {p.stat().st_size / 2**20:,.0f} MiB" for p in cat}
    rows = []

    def add(row: Row) -> None:  # and print it as it comes (the table's header comes at the end)
        rows.append(row)
        print(format_rows([row]).splitlines()[-1], flush=True)

    from astronn_dist.worker.service.results import migrate

    migrate(url)  # an empty table
    flush()
    row = command("produce, empty table", ["produce", "--catalog", str(csv), *settings], backend, n, work,
                  check=enqueued_is(n))
    messages = redis.Redis.from_url(broker).llen(QUEUE)
    row.extra = f"{sizes[csv]}, {messages:,} messages; {row.extra}"
    add(row)
    flush()
    try:
        add(fill(url, n, model_id_of(BUNDLED_MODEL), backend))
    except Exception as exc:  # noqa: BLE001  (a row says so; the rows below show the rest)
        add(Row("scale", "fill the table (upsert_results)", backend, n, math.nan,
                f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
    for what, path in (("produce, all done", csv), ("produce, all done", parquet)):
        row = command(f"{what} ({path.suffix[1:]})", ["produce", "--catalog", str(path), *settings],
                      backend, n, work, check=enqueued_is(0))
        row.extra = f"{sizes[path]}; {row.extra}"
        add(row)
    add(command("reconcile, all done", ["reconcile", "--catalog", str(csv), *settings], backend, n, work,
                check=enqueued_is(0)))
    add(command("status", ["status", *settings], backend, n, work, rated=False))
    for fmt in ("parquet", "fits", "csv"):
        out = work / f"out-{backend}.{fmt}"
        force = ["--force"] if out.exists() else []  # fresh names: only if one is left over
        add(command(f"export {fmt}", ["export", str(out), "--db", url, *force], backend, n, work,
                    check=wrote(n, out)))
        out.unlink(missing_ok=True)
    page = work / f"report-{backend}.html"
    add(command("report, with a catalog of parallaxes", ["report", str(page), "--db", url, "--force", "--catalog",
                str(make_reference(work, n))], backend, n, work, check=reported(n)))
    page.unlink(missing_ok=True)
    flush()
    return rows


def run(n: int = 1_000_000, backends: Sequence[str] = ("sqlite", "postgres"),
        redis_url: str = "redis://127.0.0.1:6379",
        postgres_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres") -> list[Row]:
    broker = f"{redis_url.rstrip('/')}/{REDIS_DB}"
    work = Path(tempfile.mkdtemp(prefix="astronn-bench-scale-"))
    rows: list[Row] = []
    try:
        t0 = time.perf_counter()
        cat = make_catalog(work, n)
        print(f"scale: catalog of {n:,} rows made in {time.perf_counter() - t0:.1f} s in {work}", flush=True)
        for backend in backends:
            drop = None
            try:
                if backend == "postgres":
                    url, drop = _postgres_database(postgres_url)
                else:
                    url = f"sqlite:///{work / 'results.sqlite'}"
                rows += backend_rows(backend, url, n, broker, work, cat)
            except Exception as exc:  # noqa: BLE001  (a backend that cannot be set up: a row, go on)
                rows.append(Row("scale", "setup", backend, n, math.nan,
                                f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))
                print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
            finally:
                if drop is not None:
                    drop()
    finally:
        import redis

        redis.Redis.from_url(broker).flushdb()
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--backends", nargs="+", choices=("sqlite", "postgres"), default=["sqlite", "postgres"])
    args = parser.parse_args(argv)
    print()
    print_rows(run(args.rows, args.backends))


if __name__ == "__main__":
    main()
