"""``astronn-dist``: the command line.

    astronn-dist run ../shared/data/apstar          the whole job here, no server (SQLite file)
    astronn-dist produce --catalog stars.csv        enqueue for the workers (skips what is done)
    astronn-dist worker --device auto               serve the queue
    astronn-dist watch /data/apogee                 enqueue new files as they land
    astronn-dist requeue --failed | status | export OUT | migrate
    astronn-dist synth OUT --n N | train CATALOG --out M.pt | import-model FOLDER --out M.pt

Flags override the ``ASTRONN_DIST_*`` environment variables (:class:`worker.config.Settings`).
Importing this module never imports torch: the commands that run the network (``run``,
``worker``, ``train``, ``import-model``) import it inside their function.

A user error (a missing file, a bad URL, a service that cannot be reached) prints one line and
exits with status 2; a traceback means a bug.
"""

from __future__ import annotations

import dataclasses
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from producer.catalog import CatalogError, gather
from producer.enqueue import (
    DEFAULT_CHUNK_SIZE,
    BrokerError,
    chunks,
    enqueue,
    mask_url,
    model_id_of,
    redis_client,
    split_done,
)
from worker.config import QUEUE, Settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from worker.pipeline import SpectrumRequest

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

app = typer.Typer(
    name="astronn-dist",
    help="Spectrophotometric distances from APOGEE apStar spectra (astroNN BCNN), as a service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals hold URLs with passwords
)

FLAG_CODES = {  # result_flags bit -> (letter in the table, meaning)
    1: ("U", "fakemag unreliable"),
    2: ("K", "no Ks"),
    4: ("E", "no E(B-V)"),
    2048: ("X", "no result"),
}
TABLE_ROWS = 50  # rows shown by `run`; the database has them all


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------ helpers


def _settings(**overrides: Any) -> Settings:
    """Settings from the environment, with the flags that were given (not None) on top."""
    try:
        settings = Settings.from_env()
    except (ValueError, OSError) as exc:
        raise UserError(f"bad ASTRONN_DIST_* environment variable: {exc}") from exc
    given = {k: v for k, v in overrides.items() if v is not None}
    if "model_path" in given:
        given["model_path"] = Path(given["model_path"])
    return dataclasses.replace(settings, **given)


def _model_id(settings: Settings) -> str:
    try:
        return model_id_of(settings.model_path)
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(
            f"model checkpoint not found: {settings.model_path}; pass --model PATH or set "
            "ASTRONN_DIST_MODEL (astronn-dist train / import-model make one)"
        ) from None


def _engine(url: str, *, create: bool = False) -> Engine:
    """An engine on the results database; ``create``: also create/upgrade the table."""
    from worker.results import make_engine, migrate

    engine = make_engine(url)
    if create:
        migrate(engine)
    return engine


def _has_table(engine: Engine) -> bool:
    import sqlalchemy as sa

    return sa.inspect(engine).has_table("astro_nn_dist")


def _gather(paths: Sequence[str] | None, catalog: Path | None) -> list[SpectrumRequest]:
    requests = gather(paths or (), catalog)
    if not requests:
        raise UserError(
            f"no apStar files found in {' '.join(map(str, paths or [catalog]))} "
            "(looked for apStar-*.fits[.gz] and asStar-*.fits[.gz])"
        )
    return requests


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _flag_text(flags: int | None) -> str:
    """``result_flags`` as its value and letters, e.g. ``5 UE``."""
    if not flags:
        return "0"
    return f"{flags} " + "".join(code for bit, (code, _) in FLAG_CODES.items() if flags & bit)


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _rows_for(engine: Engine, model_id: str, spectrum_ids: Sequence[str]) -> list[dict[str, Any]]:
    """The results rows of ``spectrum_ids`` for ``model_id``, in the order of the ids."""
    import sqlalchemy as sa

    from worker.results import astro_nn_dist as table

    rows: dict[str, dict[str, Any]] = {}
    with engine.connect() as conn:
        for start in range(0, len(spectrum_ids), 500):
            query = sa.select(table).where(
                table.c.model_id == model_id,
                table.c.spectrum_id.in_(list(spectrum_ids[start : start + 500])),
            )
            rows.update({r.spectrum_id: dict(r._mapping) for r in conn.execute(query)})
    return [rows[i] for i in spectrum_ids if i in rows]


def _results_table(rows: Sequence[dict[str, Any]], limit: int = TABLE_ROWS) -> Table:
    shown = rows[:limit]
    title = f"results: {len(rows)} spectra" + (f" (first {limit} shown)" if len(rows) > limit else "")
    legend = (
        "dist, err [pc]; Ks, E(B-V) [mag] as used; flags: "
        + ", ".join(f"{c} {meaning}" for c, meaning in FLAG_CODES.values())
    )
    table = Table(title=title, caption=legend)
    table.add_column("spectrum_id", overflow="fold")  # the one column that may wrap
    for header in ("dist", "err", "Ks", "E(B-V)", "flags"):
        table.add_column(header, justify="right" if header != "flags" else "left", no_wrap=True)
    errors = any(row.get("error") for row in shown)
    if errors:
        table.add_column("error", overflow="fold")
    for row in shown:
        cells = [
            row["spectrum_id"],
            _fmt(row["dist"], ".0f"),
            _fmt(row["dist_err"], ".0f"),
            _fmt(row["k_mag"], ".3f"),
            _fmt(row["ebv"], ".3f"),
            _flag_text(row["result_flags"]),
        ]
        table.add_row(*cells, *([row.get("error") or ""] if errors else []))
    return table


def _outcomes(rows: Sequence[dict[str, Any]]) -> str:
    count = Counter(
        "no result" if (r["result_flags"] or 0) & 2048
        else "bad" if r["flag_bad"]
        else "warn" if r["flag_warn"]
        else "good"
        for r in rows
    )
    return ", ".join(f"{count[k]} {k}" for k in ("good", "warn", "bad", "no result") if count[k])


# ------------------------------------------------------------------------------------ commands

PathsArg = Annotated[
    Optional[list[str]],
    typer.Argument(help="apStar files, folders (searched recursively) or glob patterns."),
]
CatalogOpt = Annotated[
    Optional[Path],
    typer.Option("--catalog", "-c", help="CSV/FITS/Parquet catalog: path[, spectrum_id, k_mag, ebv]."),
]
DbOpt = Annotated[Optional[str], typer.Option("--db", help="Results database URL [ASTRONN_DIST_DATABASE_URL].")]
BrokerOpt = Annotated[Optional[str], typer.Option("--broker", help="Redis URL [ASTRONN_DIST_BROKER_URL].")]
ModelOpt = Annotated[Optional[Path], typer.Option("--model", help="Checkpoint .pt [ASTRONN_DIST_MODEL].")]
ChunkOpt = Annotated[
    int, typer.Option("--chunk-size", min=1, max=1000, help="Spectra per message / batch.")
]


@app.command()
def run(
    paths: PathsArg = None,
    catalog: CatalogOpt = None,
    db: DbOpt = None,
    model: ModelOpt = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N [ASTRONN_DIST_DEVICE].")] = None,
    mc_passes: Annotated[Optional[int], typer.Option(min=2, help="MC-dropout passes [ASTRONN_DIST_MC_PASSES].")] = None,
    seed: Annotated[Optional[int], typer.Option(min=0, help="Global dropout seed [ASTRONN_DIST_SEED].")] = None,
    chunk_size: ChunkOpt = DEFAULT_CHUNK_SIZE,
    force: Annotated[bool, typer.Option("--force", help="Process spectra that already have a row.")] = False,
) -> None:
    """Process spectra here and now, with no server: results go to the database (a SQLite file
    by default) and a table of them is printed."""
    settings = _settings(
        database_url=db, model_path=model, device=device, mc_passes=mc_passes, seed=seed
    )
    requests = _gather(paths, catalog)
    model_id = _model_id(settings)
    engine = _engine(settings.database_url, create=True)
    todo, skipped = (list(requests), []) if force else split_done(requests, engine, model_id)
    console.print(
        f"{len(requests)} spectra found, {len(skipped)} already done for model {model_id}, "
        f"{len(todo)} to process"
    )
    t0 = time.perf_counter()
    if todo:
        _process_here(todo, settings, engine, chunk_size)
    seconds = time.perf_counter() - t0
    rows = _rows_for(engine, model_id, [r.spectrum_id for r in requests])
    console.print(_results_table(rows))
    console.print(
        f"{len(todo)} spectra processed in {seconds:.1f} s; {_outcomes(rows)}; "
        f"results in {mask_url(settings.database_url)} (table astro_nn_dist, model {model_id})"
    )
    engine.dispose()


def _process_here(
    todo: Sequence[SpectrumRequest], settings: Settings, engine: Engine, chunk_size: int
) -> None:
    """Load the model once and run the chunks through the task body, in this process."""
    from worker.inference import Predictor, resolve_device
    from worker.model import load_model
    from worker.tasks import process_chunk

    try:
        device = resolve_device(settings.device)
    except ValueError as exc:  # e.g. --device cuda on a machine without CUDA
        raise UserError(str(exc)) from exc
    loaded = load_model(settings.model_path, device=device)
    predictor = Predictor(loaded, mc_passes=settings.mc_passes, seed=settings.seed)
    console.print(
        f"model {loaded.model_id} on {loaded.device}, {settings.mc_passes} MC passes, "
        f"seed {settings.seed}"
    )
    run_id = f"run-{uuid.uuid4()}"
    host = socket.gethostname()
    with _progress() as progress:
        task = progress.add_task("spectra", total=len(todo))
        for chunk in chunks(todo, chunk_size):
            process_chunk(
                list(chunk), predictor=predictor, engine=engine, task_id=run_id, attempts=1, host=host
            )
            progress.advance(task, len(chunk))


@app.command()
def produce(
    paths: PathsArg = None,
    catalog: CatalogOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Enqueue spectra that already have a row.")] = False,
    chunk_size: ChunkOpt = DEFAULT_CHUNK_SIZE,
    broker: BrokerOpt = None,
    db: DbOpt = None,
    model: ModelOpt = None,
) -> None:
    """Enqueue spectra for the workers, skipping those already done for the model."""
    settings = _settings(broker_url=broker, database_url=db, model_path=model)
    t0 = time.perf_counter()
    requests = _gather(paths, catalog)
    t_read = time.perf_counter() - t0
    _model_id(settings)
    with _progress() as progress:
        task = progress.add_task("enqueue", total=len(requests))
        report = enqueue(
            requests,
            settings,
            chunk_size=chunk_size,
            force=force,
            source=str(catalog) if catalog else " ".join(paths or []),
            on_progress=lambda n: progress.advance(task, n),
        )
        progress.update(task, completed=len(requests))
    console.print(
        f"found {report.found} spectra ({t_read:.2f} s to read), skipped {report.skipped} "
        f"already done for model {report.model_id}, enqueued {report.enqueued} spectra in "
        f"{report.messages} messages to queue {QUEUE} on {mask_url(settings.broker_url)} "
        f"in {report.seconds:.2f} s ({report.rate:,.0f} spectra/s)"
    )


@app.command()
def reconcile(
    paths: PathsArg = None,
    catalog: CatalogOpt = None,
    chunk_size: ChunkOpt = DEFAULT_CHUNK_SIZE,
    broker: BrokerOpt = None,
    db: DbOpt = None,
    model: ModelOpt = None,
) -> None:
    """Enqueue what has neither a row nor a message on the queue: the database is the source of
    truth, e.g. after Redis lost its queue."""
    settings = _settings(broker_url=broker, database_url=db, model_path=model)
    requests = _gather(paths, catalog)
    _model_id(settings)
    report = enqueue(
        requests, settings, chunk_size=chunk_size, source="reconcile", skip_queued=True
    )
    console.print(
        f"found {report.found} spectra: {report.skipped} have a row for model {report.model_id}, "
        f"{report.queued} are on the queue; enqueued {report.enqueued} in {report.messages} messages"
    )


@app.command()
def worker(
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N [ASTRONN_DIST_DEVICE].")] = None,
    concurrency: Annotated[
        Optional[int], typer.Option(min=1, help="Pool processes [default: one per GPU, else one per core, at most 8].")
    ] = None,
    model: ModelOpt = None,
    mc_passes: Annotated[Optional[int], typer.Option(min=2, help="MC-dropout passes [ASTRONN_DIST_MC_PASSES].")] = None,
    seed: Annotated[Optional[int], typer.Option(min=0, help="Global dropout seed [ASTRONN_DIST_SEED].")] = None,
    broker: BrokerOpt = None,
    db: DbOpt = None,
    metrics_port: Annotated[
        Optional[int], typer.Option(min=0, help="Prometheus /metrics port, 0 = off [ASTRONN_DIST_METRICS_PORT].")
    ] = None,
    hostname: Annotated[
        Optional[str], typer.Option(help="Celery node name, e.g. astronn-dist@%h [astronn-dist-<pid>@%h].")
    ] = None,
) -> None:
    """Serve the queue: load the model once per process and write results to the database.
    SIGTERM: finish the running chunks, then stop."""
    settings = _settings(
        broker_url=broker, database_url=db, model_path=model, device=device,
        mc_passes=mc_passes, seed=seed, metrics_port=metrics_port,
    )
    _model_id(settings)  # fail early, before any process starts
    from worker.serve import run_worker

    try:
        run_worker(settings, device=settings.device, concurrency=concurrency,
                   model=settings.model_path, hostname=hostname)
    except ValueError as exc:  # the device/concurrency plan: e.g. --device cuda without a GPU
        raise UserError(str(exc)) from exc


@app.command()
def watch(
    dirs: Annotated[Optional[list[Path]], typer.Argument(help="Folders to watch (recursively).")] = None,
    catalog: CatalogOpt = None,
    chunk_size: ChunkOpt = DEFAULT_CHUNK_SIZE,
    poll_interval: Annotated[float, typer.Option(min=0.05, help="Seconds between two listings.")] = 1.0,
    min_age: Annotated[float, typer.Option(min=0.0, help="Seconds a file must be unchanged.")] = 2.0,
    flush_delay: Annotated[float, typer.Option(min=0.0, help="Longest wait of a partial chunk [s].")] = 2.0,
    force: Annotated[bool, typer.Option("--force", help="Ignore the results table.")] = False,
    reconcile_interval: Annotated[
        float, typer.Option(min=0.0, help="Seconds between checks for lost messages (0: never).")
    ] = 600.0,
    broker: BrokerOpt = None,
    db: DbOpt = None,
    model: ModelOpt = None,
) -> None:
    """Enqueue each new (or rewritten) apStar file once, as it appears, and every
    --reconcile-interval again what has neither a row nor a message; SIGTERM/Ctrl-C stop
    cleanly after sending what is pending."""
    from producer.enqueue import Publisher
    from producer.watch import Watcher, WatchOptions, WatchState

    settings = _settings(broker_url=broker, database_url=db, model_path=model)
    model_id = _model_id(settings)
    engine = _engine(settings.database_url)
    if not _has_table(engine):
        console.print("note: no results table yet (astronn-dist migrate): nothing counts as done")
    options = WatchOptions(
        chunk_size=chunk_size,
        poll_interval=poll_interval,
        min_age=min_age,
        flush_delay=flush_delay,
        force=force,
        reconcile_interval=reconcile_interval,
    )
    client = redis_client(settings)
    with Publisher(settings) as publisher:
        watcher = Watcher(
            dirs or [],
            publisher=publisher,
            state=WatchState(client, model_id),
            model_id=model_id,
            engine=engine,
            catalog=catalog,
            options=options,
            log=console.log,
        )
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: watcher.stop())
        console.log(
            f"watching {', '.join(map(str, dirs or [])) or '(catalog only)'} for model {model_id}; "
            f"queue {QUEUE} on {mask_url(settings.broker_url)}"
        )
        totals = watcher.run()
    console.log(f"stopped: {totals.enqueued} spectra enqueued in {totals.messages} messages")
    client.close()
    engine.dispose()


@app.command()
def requeue(
    failed: Annotated[bool, typer.Option("--failed", help="Spectra without a result (error set).")] = False,
    bad: Annotated[bool, typer.Option("--bad", help="Spectra flagged bad.")] = False,
    spectrum: Annotated[Optional[list[str]], typer.Option("--spectrum", help="This spectrum_id (repeatable).")] = None,
    chunk_size: ChunkOpt = DEFAULT_CHUNK_SIZE,
    broker: BrokerOpt = None,
    db: DbOpt = None,
    model: ModelOpt = None,
) -> None:
    """Enqueue again spectra from the results table (e.g. after repairing files)."""
    if not (failed or bad or spectrum):
        raise UserError("choose what to requeue: --failed, --bad and/or --spectrum ID")
    settings = _settings(broker_url=broker, database_url=db, model_path=model)
    model_id = _model_id(settings)
    from worker.results import select_for_requeue

    engine = _engine(settings.database_url)
    requests = select_for_requeue(
        engine, model_id, failed=failed, bad=bad, spectrum_ids=list(spectrum or [])
    )
    engine.dispose()
    if spectrum:
        missing = set(spectrum) - {r.spectrum_id for r in requests}
        if missing:
            console.print(f"note: no row for model {model_id}: {', '.join(sorted(missing))}")
    report = enqueue(requests, settings, chunk_size=chunk_size, force=True, source="requeue")
    console.print(
        f"requeued {report.enqueued} spectra in {report.messages} messages "
        f"(model {model_id}, queue {QUEUE})"
    )


@app.command()
def status(
    model_id: Annotated[Optional[str], typer.Option("--model-id", help="Only this model's rows.")] = None,
    broker: BrokerOpt = None,
    db: DbOpt = None,
) -> None:
    """Queue length (Redis) and results by outcome (database). Exit 2 if either is unreachable."""
    import redis

    from worker.results import summary

    settings = _settings(broker_url=broker, database_url=db)
    console.print(f"broker   {mask_url(settings.broker_url)}")
    console.print(f"database {mask_url(settings.database_url)}")
    client = redis_client(settings)
    try:
        waiting = client.llen(QUEUE)
        in_flight = client.hlen("unacked")  # kombu's ack emulation: delivered, not yet acked
    except redis.exceptions.RedisError as exc:
        raise BrokerError(f"cannot reach the broker at {mask_url(settings.broker_url)}: {exc}") from exc
    finally:
        client.close()
    console.print(f"queue {QUEUE}: {waiting} messages waiting, {in_flight} being processed")
    engine = _engine(settings.database_url)
    if not _has_table(engine):
        console.print("results: no table yet (astronn-dist migrate)")
        return
    console.print(_summary_table(summary(engine, model_id=model_id)))
    engine.dispose()


def _summary_table(lines: Sequence[dict[str, Any]]) -> Table:
    """:func:`worker.results.summary` (one dict per model) as a table with a column per model."""
    from datetime import datetime

    table = Table(title="results by model")
    table.add_column("")
    for line in lines:
        table.add_column(str(line.get("model_id") or "(none)"), justify="right", overflow="fold")
    keys = [k for k in (lines[0] if lines else {}) if k != "model_id"]
    for key in keys:
        cells = []
        for line in lines:
            value = line.get(key)
            if isinstance(value, datetime):
                value = value.isoformat(sep=" ", timespec="seconds")
            cells.append("" if value is None else str(value))
        table.add_row(key, *cells)
    return table


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="Output file: .csv, .fits or .parquet.")],
    model_id: Annotated[Optional[str], typer.Option("--model-id", help="Only this model's rows.")] = None,
    db: DbOpt = None,
) -> None:
    """Write the results table to a file."""
    suffix = "".join(out.suffixes[-1:]).lower()
    if suffix not in (".csv", ".fits", ".parquet"):
        raise UserError(f"{out}: unknown format '{suffix}'; use .csv, .fits or .parquet")
    from worker.results import export_rows

    settings = _settings(database_url=db)
    engine = _engine(settings.database_url)
    if not _has_table(engine):
        raise UserError(f"no results table in {mask_url(settings.database_url)} (nothing to export)")
    rows = list(export_rows(engine, model_id=model_id))
    engine.dispose()
    _write_rows(rows, out)
    console.print(f"wrote {len(rows)} rows to {out}")


def _write_rows(rows: Sequence[dict[str, Any]], out: Path) -> None:
    import numpy as np
    import pyarrow as pa

    table = pa.Table.from_pylist([dict(r) for r in rows])
    suffix = out.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, out)
        return
    import pyarrow.csv as pacsv

    if suffix == ".csv":
        pacsv.write_csv(table, out)
        return
    from astropy.table import MaskedColumn, Table as AstropyTable

    columns = []
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.string())
        values = col.to_pylist()
        mask = [v is None for v in values]
        if pa.types.is_floating(col.type):
            data = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        elif pa.types.is_integer(col.type) or pa.types.is_boolean(col.type):
            data = np.array([0 if v is None else v for v in values], dtype=np.int64 if pa.types.is_integer(col.type) else bool)
        else:
            data = np.array(["" if v is None else str(v) for v in values], dtype=str)
        columns.append(MaskedColumn(data, name=name, mask=mask))
    AstropyTable(columns).write(out, overwrite=True)


@app.command()
def migrate(db: DbOpt = None) -> None:
    """Create or upgrade the results table (Alembic migrations)."""
    settings = _settings(database_url=db)
    from worker.results import migrate as do_migrate

    do_migrate(settings.database_url)
    console.print(f"results table up to date in {mask_url(settings.database_url)}")


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder for apstar/ and catalog.csv.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of stars.")] = 100,
    seed: Annotated[int, typer.Option(min=0, help="Survey seed.")] = 0,
) -> None:
    """Write a synthetic survey (apStar files with known truth, and its catalog)."""
    from worker.synth import write_survey

    catalog = write_survey(out_dir, n, seed)
    console.print(f"wrote {n} synthetic apStar files and {catalog}")


@app.command()
def train(
    catalog: Annotated[Path, typer.Argument(help="Catalog with path and fakemag[, fakemag_err].")],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint to write (.pt).")],
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.1,
    patience: Annotated[int, typer.Option(min=1)] = 5,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
) -> None:
    """Train an ApogeeDistBCNN on a catalog of spectra with known fakemag."""
    if not catalog.is_file():
        raise UserError(f"{catalog}: catalog not found")
    from worker.training import train as do_train

    report = do_train(
        catalog, out, epochs=epochs, batch_size=batch_size, lr=lr, val_fraction=val_fraction,
        patience=patience, seed=seed, device=device,
    )
    console.print(
        f"wrote {report.checkpoint} (model {model_id_of(report.checkpoint)}): best epoch "
        f"{report.best_epoch} of {report.epochs_run}, validation MAPE {report.best_val_mape:.1f} %"
    )


@app.command("import-model")
def import_model(
    folder: Annotated[Path, typer.Argument(help="astroNN model folder (astroNN_0617_run001...).")],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint to write (.pt).")],
) -> None:
    """Convert astroNN's published Keras model folder into a PyTorch checkpoint."""
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (give the astroNN model folder)")
    from worker.import_astronn import import_model as do_import

    path = do_import(folder, out)
    console.print(f"wrote {path} (model {model_id_of(path)})")


# ------------------------------------------------------------------------------------ errors


def _user_message(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug."""
    if isinstance(exc, (UserError, CatalogError, BrokerError)):
        return str(exc)
    try:
        import sqlalchemy.exc as sa_exc
    except ImportError:  # pragma: no cover - sqlalchemy is a dependency
        sa_exc = None
    if sa_exc is not None:
        if isinstance(exc, sa_exc.ArgumentError):
            return f"bad database URL: {exc} (e.g. sqlite:///results.sqlite, postgresql+psycopg://user@host/db)"
        if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            first = str(exc.orig if getattr(exc, "orig", None) else exc).splitlines()[0]
            return f"cannot use the results database: {first}"
        if isinstance(exc, sa_exc.NoSuchModuleError):
            return f"bad database URL: {exc}"
    import kombu.exceptions
    import redis.exceptions

    if isinstance(exc, (redis.exceptions.ConnectionError, kombu.exceptions.OperationalError)):
        return f"cannot reach the broker: {exc}"
    for module, name in (
        ("worker.model", "CheckpointError"),
        ("worker.spectra", "SpectrumError"),
        ("worker.import_astronn", "AstroNNImportError"),
        ("worker.messages", "MessageError"),
        ("worker.results", "SchemaError"),
    ):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return str(exc)
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return str(exc)
    return None


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: run the command line, turn user errors into one line, exit 2."""
    try:
        app(args=list(argv) if argv is not None else None, prog_name="astronn-dist")
    except SystemExit:
        raise
    except Exception as exc:
        message = _user_message(exc)
        if message is None:
            raise
        err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
