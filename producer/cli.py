"""``astronn-dist``: the command line.

    astronn-dist run samples/apstar                 the whole job here, no server (SQLite file)
    astronn-dist produce --catalog stars.csv        enqueue for the workers (skips what is done)
    astronn-dist worker --device auto               serve the queue
    astronn-dist watch /data/apogee                 enqueue new files as they land
    astronn-dist requeue --failed | status | export OUT | report OUT.html | migrate
    astronn-dist synth OUT --n N | train CATALOG --out M.pt | import-model FOLDER --out M.pt

Flags override the ``ASTRONN_DIST_*`` environment variables (:class:`astronn_dist.worker.config.Settings`).
Importing this module never imports torch: the commands that run the network (``run``,
``worker``, ``train``, ``import-model``) import it inside their function.

A user error (a missing file, a bad URL, a service that cannot be reached) prints one line and
exits with status 2; a traceback means a bug. ``run`` exits with 1 when none of the spectra it
processed got a result (see its ``--help``).

Help texts are rendered with rich markup: a ``[word]`` in a help text is a style tag and
disappears, so they put environment variables in parentheses; the lines of a docstring after
its first paragraph are printed as written (the examples), the first paragraph is the summary
in the command list and stays on one line.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
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

from astronn_dist.producer.catalog import CatalogError, RequestBlocks, gather_blocks
from astronn_dist.producer.enqueue import (
    DEFAULT_CHUNK_SIZE,
    BrokerError,
    enqueue,
    mask_url,
    model_id_of,
    redis_client,
    split_done,
)
from astronn_dist.worker.config import (
    DEFAULT_BROKER_URL,
    DEFAULT_SENTINEL_MASTER,
    DEFAULT_DATABASE_URL,
    DEFAULT_MC_PASSES,
    DEFAULT_METRICS_ADDR,
    DEFAULT_METRICS_PORT,
    DEFAULT_SEED,
    QUEUE,
    Settings,
)
from astronn_dist.worker.contract import UNACKED_KEY
from astronn_dist.worker.devices import MAX_CPU_PROCESSES, MAX_PROCESSES_PER_GPU

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from astronn_dist.worker.contract import SpectrumRequest

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

app = typer.Typer(
    name="astronn-dist",
    help="""Spectrophotometric distances from APOGEE apStar spectra (astroNN BCNN), as a service.

    Start here, with no server: astronn-dist run samples/apstar
    Every command has an example: astronn-dist COMMAND --help""",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals hold URLs with passwords
)


def _flags_take_no_value() -> None:
    """Show flags as flags in the help: ``--force``, not ``--force <bool>``.

    typer 0.29's rich help prints every option's value type, flags and ``--help`` included,
    because its options panel (``typer.rich_utils._print_options_panel``) asks each option for
    ``display_type_rich`` without looking at ``is_flag``; its plain help, like click's, leaves
    flags out. A flag takes no value, so it has no type to show. (test_cli reads the help.)
    """
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "flags_take_no_value", False):  # another typer; or done
        return

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag or self.count else shown(self, ctx)

    display_type_rich.flags_take_no_value = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_take_no_value()

FLAG_CODES = {  # result_flags bit -> (letter in the table, meaning)
    1: ("U", "fakemag unreliable"),
    2: ("K", "no Ks"),
    4: ("E", "no E(B-V)"),
    2048: ("X", "no result"),
}
TABLE_ROWS = 50  # rows shown by `run`; the database has them all
EXIT_NO_RESULT = 1  # `run`: spectra were processed, none got a result (2 is for user errors)


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
    try:
        return dataclasses.replace(settings, **given)  # Settings checks the flags' values too
    except ValueError as exc:
        raise UserError(str(exc)) from exc


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
    from astronn_dist.worker.service.results import make_engine, migrate

    engine = make_engine(url)
    if create:
        migrate(engine)
    return engine


def _has_table(engine: Engine) -> bool:
    from astronn_dist.worker.service.results import has_table

    return has_table(engine)


def _gather(paths: Sequence[str] | None, catalog: Path | None) -> list[SpectrumRequest]:
    """What ``run`` processes, as one list (it is the small-job command)."""
    return [request for block in _gather_blocks(paths, catalog) for request in block]


def _gather_blocks(paths: Sequence[str] | None, catalog: Path | None) -> RequestBlocks:
    """What ``produce`` and ``reconcile`` send, block by block: the catalog is checked in full
    here (one pass, bounded memory), read again block by block as it is sent."""
    requests = gather_blocks(paths or (), catalog)
    if not requests.total:
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
    from astronn_dist.worker.service.results import rows_for

    return rows_for(engine, model_id, spectrum_ids)


def _results_table(rows: Sequence[dict[str, Any]], limit: int = TABLE_ROWS) -> Table:
    shown = rows[:limit]
    title = f"results: {len(rows)} spectra" + (f" (first {limit} shown)" if len(rows) > limit else "")
    legend = (
        "dist, err [pc]; Ks, E(B-V) [mag] as used; flags: "
        + ", ".join(f"{c} {meaning}" for c, meaning in FLAG_CODES.values())
    )
    table = Table(title=title, caption=escape(legend))  # rich markup would eat "[pc]"
    table.add_column("spectrum_id", overflow="fold")  # the one column that may wrap
    for header in ("dist", "err", "Ks", "E(B-V)", "flags"):
        table.add_column(header, justify="right" if header != "flags" else "left", no_wrap=True)
    errors = any(row.get("error") for row in shown)
    if errors:
        table.add_column("error", overflow="fold")
    for row in shown:
        cells = [
            escape(row["spectrum_id"]),  # ids and errors are data: no markup in them
            _fmt(row["dist"], ".0f"),
            _fmt(row["dist_err"], ".0f"),
            _fmt(row["k_mag"], ".3f"),
            _fmt(row["ebv"], ".3f"),
            _flag_text(row["result_flags"]),
        ]
        table.add_row(*cells, *([escape(row.get("error") or "")] if errors else []))
    return table


def _outcome(row: dict[str, Any]) -> str:
    if (row["result_flags"] or 0) & 2048:
        return "no result"
    return "bad" if row["flag_bad"] else "warn" if row["flag_warn"] else "good"


def _outcomes(rows: Sequence[dict[str, Any]]) -> str:
    """Counts by outcome, e.g. ``2 good, 1 no result``."""
    count = Counter(_outcome(r) for r in rows)
    return ", ".join(f"{count[k]} {k}" for k in ("good", "warn", "bad", "no result") if count[k])


# ------------------------------------------------------------------------------------ commands

# The options that set a Settings field get a panel of their own in --help: a table of their
# own columns, so that the long names (ASTRONN_DIST_DATABASE_URL) are not cut short by the
# width a command's other options take.
SETTINGS_PANEL = "Settings (a flag overrides its ASTRONN_DIST_* variable)"

PathsArg = Annotated[
    Optional[list[str]],
    typer.Argument(help="apStar files, folders (searched recursively) or glob patterns (quoted)."),
]
CatalogOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--catalog", "-c",
        help="CSV, FITS or Parquet catalog: a path column; optional spectrum_id, k_mag, ebv.",
    ),
]
DbOpt = Annotated[
    Optional[str],
    typer.Option(
        "--db", rich_help_panel=SETTINGS_PANEL,
        help=f"Results database URL (env ASTRONN_DIST_DATABASE_URL; default: the SQLite file "
        f"{DEFAULT_DATABASE_URL.removeprefix('sqlite:///')}).",
    ),
]
BrokerOpt = Annotated[
    Optional[str],
    typer.Option(
        "--broker", rich_help_panel=SETTINGS_PANEL,
        help=f"Redis broker URL (env ASTRONN_DIST_BROKER_URL; default {DEFAULT_BROKER_URL}); "
        "Redis Sentinel: sentinel://HOST:PORT;sentinel://HOST:PORT;...",
    ),
]
SentinelMasterOpt = Annotated[
    Optional[str],
    typer.Option(
        "--sentinel-master", rich_help_panel=SETTINGS_PANEL,
        help="With a sentinel:// broker: the name of the monitored primary (env "
        f"ASTRONN_DIST_SENTINEL_MASTER; default {DEFAULT_SENTINEL_MASTER}). The Sentinels' own "
        "password: env ASTRONN_DIST_SENTINEL_PASSWORD (or _FILE).",
    ),
]
ModelOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--model", rich_help_panel=SETTINGS_PANEL,
        help="Model checkpoint .pt (env ASTRONN_DIST_MODEL; default: the bundled model).",
    ),
]
DeviceOpt = Annotated[
    Optional[str],
    typer.Option(
        "--device", rich_help_panel=SETTINGS_PANEL,
        help="auto (CUDA when visible), cpu, cuda, cuda:N (env ASTRONN_DIST_DEVICE; default auto).",
    ),
]
McPassesOpt = Annotated[
    Optional[int],
    typer.Option(
        "--mc-passes", min=2, rich_help_panel=SETTINGS_PANEL,
        help=f"MC-dropout passes per spectrum (env ASTRONN_DIST_MC_PASSES; default {DEFAULT_MC_PASSES}).",
    ),
]
SeedOpt = Annotated[
    Optional[int],
    typer.Option(
        "--seed", min=0, rich_help_panel=SETTINGS_PANEL,
        help=f"Dropout seed: the same seed, the same results (env ASTRONN_DIST_SEED; default {DEFAULT_SEED}).",
    ),
]
ChunkOpt = Annotated[
    int, typer.Option("--chunk-size", min=1, max=1000, help="Spectra per message (workers) or batch (run).")
]


@app.command()
def run(
    paths: PathsArg = None,
    catalog: CatalogOpt = None,
    db: DbOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    mc_passes: McPassesOpt = None,
    seed: SeedOpt = None,
    chunk_size: Annotated[
        Optional[int],
        typer.Option("--chunk-size", min=1, max=1000,
                     help="Spectra per batch (default: about 4 batches per process, 128 to 512 each)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Process again the spectra that already have a row.")
    ] = False,
    processes: Annotated[
        Optional[int],
        typer.Option(min=1, help="Processes, as a worker's pool (default: one per core, at most "
                     f"{MAX_CPU_PROCESSES} on the CPU or {MAX_PROCESSES_PER_GPU} per GPU, fewer on a GPU of little memory; "
                     "a job of one chunk runs in this process)."),
    ] = None,
) -> None:
    """Process spectra here and now, with no server (results in a SQLite file by default).

    The rows go to the results database, one per spectrum and model, and a table
    of them is printed. Spectra that already have a row for the model are
    skipped; --force processes them again.

    Example:
      astronn-dist run samples/apstar
      astronn-dist run --catalog stars.csv --db sqlite:///mine.sqlite

    Exit status:
      0  every spectrum processed in this run got a row, and at least one of
         them a result (rows flagged bad, or without a result because the file
         could not be read, are normal); or there was nothing left to do, as
         every spectrum found was already done
      1  spectra were processed but none got a result (e.g. none of the files
         could be read as an apStar spectrum: the error column says why)
      2  a usage or configuration error (no spectra found, a missing file or
         model, a bad URL...), in one line on stderr
    """
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
    working_s = _process_here(todo, settings, chunk_size, processes, engine) if todo else 0.0
    seconds = time.perf_counter() - t0
    rows = _rows_for(engine, model_id, [r.spectrum_id for r in requests])
    engine.dispose()
    console.print(_results_table(rows))
    todo_ids = {r.spectrum_id for r in todo}
    this_run = [r for r in rows if r["spectrum_id"] in todo_ids]
    before = [r for r in rows if r["spectrum_id"] not in todo_ids]
    console.print(_run_summary(len(todo_ids), this_run, before, seconds, working_s), soft_wrap=True)
    console.print(
        f"results in {mask_url(settings.database_url)} (table astro_nn_dist, model {model_id})",
        soft_wrap=True,
    )
    problem = _run_problem(len(todo_ids), this_run)
    if problem:
        err_console.print(f"[bold red]error:[/] {escape(problem)}", soft_wrap=True)
        raise typer.Exit(EXIT_NO_RESULT)


def _run_summary(
    n_todo: int, this_run: Sequence[dict[str, Any]], before: Sequence[dict[str, Any]],
    seconds: float, working_s: float = 0.0,
) -> str:
    """What this run did, then what was done before it: a second run over the same spectra
    processes nothing, and must not read as if it had. ``working_s``: the time after the
    model was loaded, for the rate."""
    if n_todo:
        rate = f", {n_todo / working_s:,.0f} spectra/s once loaded" if working_s > 0 else ""
        text = (f"{n_todo} spectra processed in this run in {seconds:.1f} s{rate} "
                f"({_outcomes(this_run) or 'no row'})")
    else:
        text = "0 spectra processed in this run: nothing to do"
    if before:
        text += f"; {len(before)} already done, skipped ({_outcomes(before)}; --force to redo them)"
    return text


def _run_problem(n_todo: int, this_run: Sequence[dict[str, Any]]) -> str | None:
    """Why ``run`` fails (exit 1), or None. Flagged rows are normal outcomes; nothing to do is
    not an error; spectra processed without a single result are (see ``run --help``)."""
    if not n_todo:
        return None
    if len(this_run) < n_todo:  # the task body writes a row for every spectrum: a bug
        return f"{n_todo - len(this_run)} of the {n_todo} spectra processed got no row (please report this)"
    if all(_outcome(r) == "no result" for r in this_run):
        return (
            f"none of the {n_todo} spectra processed got a result: the error column says why "
            "(e.g. files that are not apStar spectra)"
        )
    return None


def _process_here(
    todo: Sequence[SpectrumRequest], settings: Settings, chunk_size: int | None, processes: int | None,
    engine: Engine,
) -> float:
    """Run the chunks through the task body in processes planned as a worker's pool
    (astronn_dist.worker.service.local), with a progress bar. Returns the seconds from the model being loaded to
    the last row committed."""
    from astronn_dist.worker.service.local import plan_local, run_local

    try:
        plan = plan_local(settings, processes)
    except ValueError as exc:  # e.g. --device cuda on a machine without CUDA
        raise UserError(str(exc)) from exc
    with _progress() as progress:
        task = progress.add_task("spectra", total=len(todo))

        loaded_at = [time.perf_counter()]

        def started(run: Any) -> None:
            loaded_at[0] = time.perf_counter()
            n, threads = run.processes, run.threads
            progress.console.print(
                f"model {run.model_id} on {', '.join(run.devices)}, {settings.mc_passes} MC passes, "
                f"seed {settings.seed}; {n} process{'es' if n > 1 else ''} x "
                f"{threads} thread{'s' if threads > 1 else ''}",
                soft_wrap=True,
            )

        committed_at = [0.0]

        def chunk_done(outcome: Any) -> None:
            progress.advance(task, outcome.spectra)
            committed_at[0] = time.perf_counter()

        run_local(todo, settings, chunk_size=chunk_size, plan=plan, on_start=started,
                  on_chunk=chunk_done, engine=engine)
    # Not until run_local returns: stopping the pool's processes (~0.6 s here) is not work.
    return max(0.0, committed_at[0] - loaded_at[0])


@app.command()
def produce(
    paths: PathsArg = None,
    catalog: CatalogOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Enqueue also the spectra that already have a row.")
    ] = False,
    chunk_size: ChunkOpt = DEFAULT_CHUNK_SIZE,
    broker: BrokerOpt = None,
    sentinel_master: SentinelMasterOpt = None,
    db: DbOpt = None,
    model: ModelOpt = None,
) -> None:
    """Enqueue spectra for the workers, skipping those already done for the model.

    What is done is known from the model id: give --model the checkpoint that
    the workers load (both default to the bundled model).

    Example:
      astronn-dist produce --catalog stars.csv --broker redis://host:6379/0
      astronn-dist produce /data/apogee/apstar --chunk-size 256
    """
    settings = _settings(broker_url=broker, sentinel_master=sentinel_master, database_url=db,
                         model_path=model)
    t0 = time.perf_counter()
    requests = _gather_blocks(paths, catalog)
    t_read = time.perf_counter() - t0
    _model_id(settings)
    with _progress() as progress:
        task = progress.add_task("enqueue", total=requests.total)
        report = enqueue(
            requests,
            settings,
            chunk_size=chunk_size,
            force=force,
            source=str(catalog) if catalog else " ".join(paths or []),
            on_progress=lambda n: progress.advance(task, n),
        )
        # The skipped ones too; and a file both in the catalog and among the paths was one.
        progress.update(task, total=report.found, completed=report.found)
    rate = f" ({report.rate:,.0f} spectra/s)" if report.enqueued else ""
    skipped = (
        f"; skipped {report.skipped} already done for model {report.model_id} (--force to send them too)"
        if report.skipped else ""
    )
    console.print(
        f"found {report.found} spectra ({t_read:.2f} s to read); enqueued {report.enqueued} spectra "
        f"in {report.messages} messages to queue {QUEUE} on {mask_url(settings.broker_url)} "
        f"in {report.seconds:.2f} s{rate}{skipped}",
        soft_wrap=True,
    )


@app.command()
def reconcile(
    paths: PathsArg = None,
    catalog: CatalogOpt = None,
    chunk_size: ChunkOpt = DEFAULT_CHUNK_SIZE,
    broker: BrokerOpt = None,
    sentinel_master: SentinelMasterOpt = None,
    db: DbOpt = None,
    model: ModelOpt = None,
) -> None:
    """Enqueue what has neither a row nor a message on the queue, e.g. after Redis lost it.

    The database is the source of truth: a spectrum with a row for the model
    is done, one with a message waiting on the queue is pending, any other is
    sent again.

    Example:
      astronn-dist reconcile --catalog stars.csv --broker redis://host:6379/0
    """
    settings = _settings(broker_url=broker, sentinel_master=sentinel_master, database_url=db,
                         model_path=model)
    requests = _gather_blocks(paths, catalog)
    _model_id(settings)
    report = enqueue(
        requests, settings, chunk_size=chunk_size, source="reconcile", skip_queued=True
    )
    lost = f"enqueued {report.enqueued} in {report.messages} messages" if report.enqueued else (
        "enqueued 0: nothing was lost"
    )
    console.print(
        f"found {report.found} spectra: {report.skipped} have a row for model {report.model_id}, "
        f"{report.queued} are on the queue; {lost}",
        soft_wrap=True,
    )


@app.command()
def worker(
    device: DeviceOpt = None,
    concurrency: Annotated[
        Optional[int],
        typer.Option(
            min=1,
            help=f"Pool processes (default: one per core, at most {MAX_CPU_PROCESSES} on the CPU "
            f"or {MAX_PROCESSES_PER_GPU} per GPU, fewer on a GPU of little memory).",
        ),
    ] = None,
    model: ModelOpt = None,
    mc_passes: McPassesOpt = None,
    seed: SeedOpt = None,
    broker: BrokerOpt = None,
    sentinel_master: SentinelMasterOpt = None,
    db: DbOpt = None,
    metrics_port: Annotated[
        Optional[int],
        typer.Option(
            min=0, rich_help_panel=SETTINGS_PANEL,
            help=f"Prometheus /metrics port, 0: off (env ASTRONN_DIST_METRICS_PORT; default {DEFAULT_METRICS_PORT}).",
        ),
    ] = None,
    metrics_addr: Annotated[
        Optional[str],
        typer.Option(
            rich_help_panel=SETTINGS_PANEL,
            help="IP address of the /metrics server: 0.0.0.0 lets a Prometheus on another host "
            "scrape, 127.0.0.1 keeps it on this host "
            f"(env ASTRONN_DIST_METRICS_ADDR; default {DEFAULT_METRICS_ADDR}).",
        ),
    ] = None,
    hostname: Annotated[
        Optional[str],
        typer.Option(help="Celery node name, %h: this host's name (default astronn-dist-<pid>@%h)."),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log at DEBUG, Alembic's migration steps included.")
    ] = False,
) -> None:
    """Serve the queue: load the model once per process, write results to the database.

    SIGTERM: finish the running chunks, then stop (a second SIGTERM: stop at
    once; their messages go back to the queue).

    Example:
      astronn-dist worker --device auto --db postgresql+psycopg://user@host/db
      astronn-dist worker --device cpu --concurrency 2 --metrics-addr 127.0.0.1
    """
    settings = _settings(
        broker_url=broker, sentinel_master=sentinel_master, database_url=db, model_path=model,
        device=device, mc_passes=mc_passes, seed=seed, metrics_port=metrics_port, metrics_addr=metrics_addr,
    )
    _model_id(settings)  # fail early, before any process starts
    from astronn_dist.worker.service.serve import run_worker

    try:
        run_worker(settings, device=settings.device, concurrency=concurrency,
                   model=settings.model_path, hostname=hostname,
                   loglevel="DEBUG" if verbose else "INFO")
    except ValueError as exc:  # the device/concurrency plan: e.g. --device cuda without a GPU
        raise UserError(str(exc)) from exc


@app.command()
def watch(
    dirs: Annotated[Optional[list[Path]], typer.Argument(help="Folders to watch (recursively).")] = None,
    catalog: CatalogOpt = None,
    chunk_size: ChunkOpt = DEFAULT_CHUNK_SIZE,
    poll_interval: Annotated[
        float, typer.Option(min=0.05, help="Seconds between two listings of the folders.")
    ] = 1.0,
    min_age: Annotated[
        float, typer.Option(min=0.0, help="Seconds a file must stay unchanged (not being copied).")
    ] = 2.0,
    flush_delay: Annotated[
        float, typer.Option(min=0.0, help="Longest wait in seconds before a partial chunk is sent.")
    ] = 2.0,
    force: Annotated[
        bool, typer.Option("--force", help="Send files that have a row too (ignore the results table).")
    ] = False,
    reconcile_interval: Annotated[
        float, typer.Option(min=0.0, help="Seconds between checks for lost messages (0: never).")
    ] = 600.0,
    broker: BrokerOpt = None,
    sentinel_master: SentinelMasterOpt = None,
    db: DbOpt = None,
    model: ModelOpt = None,
) -> None:
    """Enqueue each new (or rewritten) apStar file once, as it appears in the folders.

    Every --reconcile-interval seconds it also enqueues again what has neither
    a row nor a message. SIGTERM or Ctrl-C: stop cleanly after sending what is
    pending.

    Example:
      astronn-dist watch /data/apogee --min-age 5 --broker redis://host:6379/0
    """
    from astronn_dist.producer.enqueue import Publisher
    from astronn_dist.producer.watch import Watcher, WatchOptions, WatchState

    settings = _settings(broker_url=broker, sentinel_master=sentinel_master, database_url=db,
                         model_path=model)
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
    failed: Annotated[
        bool, typer.Option("--failed", help="Spectra without a result (their row has an error).")
    ] = False,
    bad: Annotated[bool, typer.Option("--bad", help="Spectra flagged bad.")] = False,
    spectrum: Annotated[
        Optional[list[str]], typer.Option("--spectrum", help="This spectrum_id (repeatable).")
    ] = None,
    chunk_size: ChunkOpt = DEFAULT_CHUNK_SIZE,
    broker: BrokerOpt = None,
    sentinel_master: SentinelMasterOpt = None,
    db: DbOpt = None,
    model: ModelOpt = None,
) -> None:
    """Enqueue again spectra from the results table, e.g. after repairing their files.

    The rows of the model (--model) that match any of --failed, --bad and
    --spectrum are sent to the workers, which rewrite them.

    Example:
      astronn-dist requeue --failed
      astronn-dist requeue --bad --spectrum apStar-dr17-2M17335483-2753043.fits
    """
    if not (failed or bad or spectrum):
        raise UserError("choose what to requeue: --failed, --bad and/or --spectrum ID")
    settings = _settings(broker_url=broker, sentinel_master=sentinel_master, database_url=db,
                         model_path=model)
    model_id = _model_id(settings)
    from astronn_dist.worker.service.results import select_for_requeue

    engine = _engine(settings.database_url)
    if not _has_table(engine):
        raise UserError(
            f"no results table in {mask_url(settings.database_url)} (nothing to requeue; "
            "is --db the database the workers write to?)"
        )
    requests = select_for_requeue(
        engine, model_id, failed=failed, bad=bad, spectrum_ids=list(spectrum or [])
    )
    engine.dispose()
    if spectrum:
        missing = set(spectrum) - {r.spectrum_id for r in requests}
        if missing:
            console.print(f"note: no row for model {model_id}: {escape(', '.join(sorted(missing)))}")
    report = enqueue(requests, settings, chunk_size=chunk_size, force=True, source="requeue")
    console.print(
        f"requeued {report.enqueued} spectra in {report.messages} messages "
        f"(model {model_id}, queue {QUEUE})"
        + ("" if report.enqueued else ": no row of this model matches"),
        soft_wrap=True,
    )


@app.command()
def status(
    model_id: Annotated[
        Optional[str], typer.Option("--model-id", help="Only this model's rows (default: every model).")
    ] = None,
    broker: BrokerOpt = None,
    sentinel_master: SentinelMasterOpt = None,
    db: DbOpt = None,
) -> None:
    """Queue length (Redis) and results by outcome (database).

    Exit status 2 if the broker or the database cannot be reached.

    Example:
      astronn-dist status --broker redis://host:6379/0 --db sqlite:///mine.db
    """
    import redis

    from astronn_dist.worker.service.results import computed_by, summary

    settings = _settings(broker_url=broker, sentinel_master=sentinel_master, database_url=db)
    console.print(f"broker   {mask_url(settings.broker_url)}")
    console.print(f"database {mask_url(settings.database_url)}")
    client = redis_client(settings)
    try:
        waiting = client.llen(QUEUE)
        in_flight = client.hlen(UNACKED_KEY)  # kombu's ack emulation: delivered, not yet acked
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
    for line in computed_by(engine, model_id=model_id):  # CPU and GPU rows draw other masks
        how = f"{line['device']}, masks from {line['mask_rng']}" if line["device"] else "not recorded (before 0002)"
        console.print(f"computed on {how}: {line['rows']} rows of {line['model_id']}", soft_wrap=True)
    engine.dispose()


def _summary_table(lines: Sequence[dict[str, Any]]) -> Table:
    """:func:`astronn_dist.worker.service.results.summary` (one dict per model) as a table with a column per model."""
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

ModelIdOpt = Annotated[
    Optional[str], typer.Option("--model-id", help="This model's rows, by id (instead of --model's).")
]

SINCE_FORMATS = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S.%f%z"]
"""--since: a date, a time (naive: UTC) or an ISO-8601 time with its offset."""


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="Output file: .fits, .parquet or .csv.")],
    model: ModelOpt = None,
    model_id: ModelIdOpt = None,
    all_models: Annotated[bool, typer.Option("--all-models", help="Every model's rows.")] = False,
    good: Annotated[bool, typer.Option("--good", help="Only rows not flagged bad.")] = False,
    bad: Annotated[bool, typer.Option("--bad", help="Only rows flagged bad (failed ones included).")] = False,
    failed: Annotated[bool, typer.Option("--failed", help="Only rows without a result.")] = False,
    since: Annotated[
        Optional[datetime], typer.Option("--since", metavar="TIME", formats=SINCE_FORMATS,
                                         help="Only rows written at or after TIME (UTC, ISO-8601).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    db: DbOpt = None,
) -> None:
    """Write results to a FITS, Parquet or CSV file, streamed (any table size).

    The format follows the file's suffix; by default the rows of the current
    model (--model, as the workers load it). Units, flag bits and provenance
    are in the file (FITS header, Parquet metadata).

    Example:
      astronn-dist export results.fits
      astronn-dist export bad.parquet --bad --since 2026-12-01
      astronn-dist export all.csv --all-models --force
    """
    from astronn_dist.producer.export import ExportError, file_format
    from astronn_dist.producer.export import export as write_export

    try:
        file_format(out)  # before the model's hash and the database: a typo fails at once
    except ExportError as exc:
        raise UserError(str(exc)) from None
    if sum((good, bad, failed)) > 1:
        raise UserError("choose at most one of --good, --bad and --failed")
    if all_models and model_id:
        raise UserError("--all-models and --model-id exclude each other")
    outcome = "good" if good else "bad" if bad else "failed" if failed else None
    settings = _settings(database_url=db, model_path=model)
    model_ids = None if all_models else [model_id or _model_id(settings)]
    engine = _engine(settings.database_url)
    if not _has_table(engine):
        raise UserError(f"no results table in {mask_url(settings.database_url)} (nothing to export)")
    try:
        with _progress() as progress:
            task = progress.add_task("export", total=None)
            report = write_export(
                engine, out, model_ids=model_ids, outcome=outcome, since=since, force=force,
                on_progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
    except ExportError as exc:
        raise UserError(str(exc)) from None
    finally:
        engine.dispose()
    which = "every model" if model_ids is None else f"model {model_ids[0]}"
    console.print(f"wrote {report.rows} rows of {which} to {out} in {report.seconds:.1f} s", soft_wrap=True)


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="Output page (.html): self-contained, opens offline.")],
    model: ModelOpt = None,
    model_id: ModelIdOpt = None,
    catalog: Annotated[
        Optional[Path],
        typer.Option("--catalog", help="Catalog with truth (fakemag, dist), Gaia parallax and parallax_error "
                     "(mas), snr, teff, logg; matched by spectrum_id (or path)."),
    ] = None,
    compare: Annotated[
        Optional[str], typer.Option("--compare", metavar="MODEL_ID", help="Another model's id: the two on the spectra both have.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    db: DbOpt = None,
) -> None:
    """Write an HTML page of a model's results: counts, distributions, residuals.

    Streams the table and the catalog (any size). With --catalog: residuals,
    z-scores and 1-sigma coverage against truth or Gaia parallaxes, by S/N
    and Ks, and a Kiel diagram; with --compare: model against model.

    Example:
      astronn-dist report report.html
      astronn-dist report report.html --catalog survey/catalog.csv --force
      astronn-dist report diff.html --model-id new-1a2b3c --compare old-4d5e6f
    """
    from astronn_dist.producer.report import ReportError, write_report

    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"{out}: the report is an HTML page; name it .html")
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to replace it")
    settings = _settings(database_url=db, model_path=model)
    which = model_id or _model_id(settings)
    engine = _engine(settings.database_url)
    if not _has_table(engine):
        raise UserError(f"no results table in {mask_url(settings.database_url)} (nothing to report)")
    try:
        t0 = time.perf_counter()
        data = write_report(engine, out, which, catalog=catalog, compare=compare, force=force)
    except ReportError as exc:
        raise UserError(str(exc)) from None
    finally:
        engine.dispose()
    console.print(f"wrote {out}: {data.rows} rows of model {which} in {time.perf_counter() - t0:.1f} s", soft_wrap=True)
    for comparison in data.comparisons:
        overall = comparison.by_snr.overall()
        if not overall.n:
            console.print(f"{comparison.name}: no row of the catalog has both a result and a reference", soft_wrap=True)
            continue
        console.print(f"{comparison.name}: {overall.n} rows, 1-sigma coverage {overall.coverage:.4f}, "
                      f"median offset {overall.median_offset:+.4f}", soft_wrap=True)
    if data.compare is not None:
        console.print(f"against {compare}: {data.compare.common} spectra in common, "
                      f"std of the difference {data.compare.std:.4f}", soft_wrap=True)


@app.command()
def migrate(db: DbOpt = None) -> None:
    """Create or upgrade the results table (Alembic migrations), and say which it did.

    Workers and run do it on their own; this creates the table ahead of them,
    or checks its revision.

    Example:
      astronn-dist migrate --db postgresql+psycopg://user@host/db
    """
    settings = _settings(database_url=db)
    from astronn_dist.worker.service.results import migrate as do_migrate

    engine = _engine(settings.database_url)
    try:
        before, after = do_migrate(engine)
    finally:
        engine.dispose()
    where = mask_url(settings.database_url)
    if before == after:
        done = f"results table already at revision {after} (the newest) in {where}: nothing to do"
    elif before is None:
        done = f"created the results table astro_nn_dist at revision {after} in {where}"
    else:
        done = f"upgraded the results table from revision {before or 'none'} to {after} in {where}"
    console.print(done, soft_wrap=True)


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder for apstar/ and catalog.csv (created).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of stars.")] = 100,
    seed: Annotated[int, typer.Option(min=0, help="Survey seed: the same seed, the same stars.")] = 0,
) -> None:
    """Write a synthetic survey: apStar files with known truth, and their catalog.

    The catalog holds the truth (fakemag, dist...) that train and tests check
    against; star i is the same whatever --n.

    Example:
      astronn-dist synth survey --n 1000 --seed 1
      astronn-dist run survey/apstar
    """
    from astronn_dist.worker.modeling.synth import write_survey

    catalog = write_survey(out_dir, n, seed)
    console.print(f"wrote {n} synthetic apStar files and {catalog}")


@app.command()
def train(
    catalog: Annotated[
        Path,
        typer.Argument(
            help="CSV, FITS or Parquet catalog: path (relative to its folder), fakemag, "
            "optional fakemag_err."
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Checkpoint to write (.pt); its history CSV goes beside it.")
    ],
    epochs: Annotated[
        int, typer.Option(min=1, help="Most epochs to train (early stopping may end sooner).")
    ] = 30,
    batch_size: Annotated[int, typer.Option(min=1, help="Spectra per minibatch.")] = 64,
    lr: Annotated[float, typer.Option(min=0.0, help="Adam's initial learning rate.")] = 1e-3,
    val_fraction: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Share of the stars held out for validation (0 < x < 1)."),
    ] = 0.1,
    patience: Annotated[
        int,
        typer.Option(min=1, help="Epochs without a better validation loss before stopping (the best is kept)."),
    ] = 5,
    seed: Annotated[
        int, typer.Option(min=0, help="Seeds split, shuffling, weights, dropout: same seed, same model.")
    ] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when visible), cpu, cuda, cuda:N.")] = "auto",
) -> None:
    """Train an ApogeeDistBCNN on a catalog of spectra with known fakemag.

    Writes the checkpoint and, beside it, its history per epoch
    (OUT-stem.history.csv).

    Example:
      astronn-dist synth survey --n 2000
      astronn-dist train survey/catalog.csv --out mine.pt --epochs 50
      astronn-dist run survey/apstar --model mine.pt
    """
    if not catalog.is_file():
        raise UserError(f"{catalog}: catalog not found")
    if not 0.0 < val_fraction < 1.0:  # the range check of the option includes 0 and 1
        raise UserError(f"--val-fraction {val_fraction}: must be between 0 and 1, both excluded")
    from astronn_dist.worker.modeling.training import train as do_train

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
    folder: Annotated[
        Path,
        typer.Argument(help="astroNN model folder, with astroNN_model_parameter.json and model_weights.h5."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint to write (.pt).")],
) -> None:
    """Convert astroNN's published Keras model folder into a PyTorch checkpoint.

    The model id of the results is the checkpoint's name and hash, as for any
    checkpoint given to --model.

    Example:
      astronn-dist import-model astroNN_0617_run001 --out astronn-0617.pt
      astronn-dist run samples/apstar --model astronn-0617.pt
    """
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (give the astroNN model folder)")
    from astronn_dist.worker.modeling.import_astronn import import_model as do_import

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
        ("astronn_dist.worker.science.model", "CheckpointError"),
        ("astronn_dist.worker.science.spectra", "SpectrumError"),
        ("astronn_dist.worker.modeling.import_astronn", "AstroNNImportError"),
        ("astronn_dist.worker.service.messages", "MessageError"),
        ("astronn_dist.worker.service.results", "SchemaError"),
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
        err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)  # no markup: data
        sys.exit(2)


if __name__ == "__main__":
    main()
