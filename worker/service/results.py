"""The results table ``astro_nn_dist``: schema, engines, migrations and idempotent writes.

One row per (spectrum_id, model_id). Writing a spectrum again (a redelivered chunk, a requeue,
``--force``) updates its row in place: never a duplicate, whichever worker wins a race.

Backends: SQLite (the default, a file several worker processes share) and PostgreSQL (through
psycopg 3). The producer imports this module, so it never imports torch (nor numpy).

Conventions of the stored values
--------------------------------
* Non-finite floats (NaN, +-inf) are stored as NULL and read back as ``None``.
* ``created`` is the UTC time of the row's *latest* write: reprocessing a spectrum refreshes it
  (``astronn_dist.producer.watch`` relies on that to tell a row newer than its file). It is read back as an
  aware ``datetime`` in UTC on both backends (SQLite stores it naive, in UTC).
* ``k_mag``, ``ebv``, ``a_k_mag`` are the values *used* (missing -> 0, flags say so). A row
  without a result (``flag_no_result``) keeps in ``k_mag`` and ``ebv`` the photometry its message
  carried, as given (NULL where it carried none), and ``a_k_mag`` NULL: ``requeue`` sends exactly
  the first inputs again.
* ``attempts``, ``host``, ``task_id`` are provenance given by the writer, stored as given.
* ``flag_warn``/``flag_bad`` are computed by :mod:`astronn_dist.worker.science.distance` and stored as given.

Schema changes go through Alembic (``worker/service/migrations``); :func:`migrate` applies them and is
safe to call from many worker processes at once.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from astronn_dist.worker.contract import (
    FLAG_FAKEMAG_UNRELIABLE,
    FLAG_MISSING_EXTINCTION,
    FLAG_MISSING_PHOTOMETRY,
    FLAG_NO_RESULT,
    MAX_ID_CHARS,
    TABLE_NAME,
    SpectrumRequest,
)

VERSION_TABLE = "astro_nn_dist_alembic_version"
"""Alembic's bookkeeping table. Not the default ``alembic_version``: a production PostgreSQL
database may be shared with other applications that run their own Alembic migrations."""

COUNTS_TABLE = f"{TABLE_NAME}_counts"
"""The per-key row counts that status reads (:data:`result_counts`, revision 0003)."""

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

MAX_SPECTRUM_ID_CHARS = MAX_ID_CHARS
"""Bound of the key column (the contract's longest spectrum_id)."""

SQLITE_BUSY_TIMEOUT_S = 60.0
"""How long a SQLite writer waits for another process's write lock. Write transactions here are
one chunk's upsert (milliseconds), so a minute only runs out when something is badly stuck."""

DEAD_CLIENT_MAX_S = 60
"""Longest PostgreSQL takes to end a worker's session whose host went silent (see
:func:`dead_client_s`)."""


def dead_client_s(visibility_timeout_s: float) -> int:
    """How soon PostgreSQL should end a worker's session whose host no longer answers [s]: half
    the visibility timeout, at most :data:`DEAD_CLIENT_MAX_S`, at least 3.

    Why: a worker whose host is cut off (or dies) inside its write transaction keeps that
    transaction's row locks, and the server, waiting for the client's next message, sees no dead
    peer for as long as TCP allows (its reply unacknowledged: about 15 minutes of retransmissions;
    acknowledged: two hours until the first keepalive probe). The chunk is delivered to another
    worker after the visibility timeout, and its write of the same rows would wait on those locks
    until the first host came back. With a user timeout and keepalive probes on the server's
    side, the session ends within this time, which releases the locks. (A
    worker process frozen while its host still answers keeps its session: the other worker's
    write waits until it resumes or dies.)
    """
    return max(3, min(DEAD_CLIENT_MAX_S, int(visibility_timeout_s // 2)))


def _keepalive_timing(dead_after_s: int) -> tuple[int, int, int]:
    """(idle, interval, count) of keepalive probes that find a silent peer within about
    ``dead_after_s`` seconds: the first probe after half the time."""
    idle = max(1, dead_after_s // 2)
    interval = max(1, dead_after_s // 10)
    return idle, interval, max(1, (dead_after_s - idle) // interval)


def _dead_client_options(dead_after_s: int) -> str:
    """Server-side TCP settings (libpq ``options``) that end a silent client's session within
    about ``dead_after_s`` seconds: ``tcp_user_timeout`` when the server's last reply is still
    unacknowledged, keepalive probes when it is not."""
    idle, interval, count = _keepalive_timing(dead_after_s)
    return (f"-c tcp_user_timeout={dead_after_s * 1000} -c tcp_keepalives_idle={idle} "
            f"-c tcp_keepalives_interval={interval} -c tcp_keepalives_count={count}")


def _dead_server_params(dead_after_s: int) -> dict[str, int]:
    """Keepalive probes on the client's side (libpq connection parameters), from ``dead_after_s``
    of silence on: a worker waiting for the reply of a server whose session ended while the link
    was down (its FIN lost, nothing of ours unacknowledged) would otherwise wait forever on a
    connection the server no longer has; a probe after the link returns meets a reset and the
    task retries. No client-side ``tcp_user_timeout``: a write sent into a cut link keeps
    retransmitting until the link returns, rather than failing while the broker is unreachable
    too."""
    _, interval, count = _keepalive_timing(dead_after_s)
    return {"keepalives": 1, "keepalives_idle": dead_after_s, "keepalives_interval": interval,
            "keepalives_count": count}


_SQLITE_BEGIN = "astronn_sqlite_begin"
"""Execution option naming the BEGIN flavour (DEFERRED/IMMEDIATE) of a SQLite transaction."""

_PG_MIGRATE_LOCK = 0x617374726F6E6E  # "astronn": the advisory-lock key of migrate()

FLAG_COUNTS = {
    "fakemag_unreliable": FLAG_FAKEMAG_UNRELIABLE,
    "missing_photometry": FLAG_MISSING_PHOTOMETRY,
    "missing_extinction": FLAG_MISSING_EXTINCTION,
    "no_result": FLAG_NO_RESULT,
}
"""summary() key -> result_flags bit."""


class SchemaError(RuntimeError):
    """The database's schema cannot be brought to this version's (e.g. it is newer)."""


# --------------------------------------------------------------------------------------- schema


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back aware (tzinfo=UTC) on every backend.

    A naive datetime given to it is taken to be UTC already.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc)
        # SQLite has no time zones: store naive UTC (ISO text), as everyone reading it expects.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value.replace(tzinfo=timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


# BIGINT on PostgreSQL: every ON CONFLICT upsert consumes a sequence value, even when it updates,
# so ids run ahead of the row count. SQLite needs plain INTEGER for a rowid primary key.
_ID_TYPE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class AstroNNDist(Base):
    """One spectrum's result under one model. Floats in the units of astronn_dist.worker.science.pipeline.ResultRecord:
    magnitudes [mag], fakemag [fakemag units], distances [pc], t_elapsed [s per spectrum]."""

    __tablename__ = TABLE_NAME
    __table_args__ = (
        # (model_id, spectrum_id): the producer's "is it done" lookups and every per-model scan
        # (export, status) use the leading model_id; ON CONFLICT infers this index.
        sa.UniqueConstraint("model_id", "spectrum_id", name="uq_astro_nn_dist_model_spectrum"),
        # requeue --bad/--failed (failed rows are bad rows too) and the status counts.
        sa.Index("ix_astro_nn_dist_model_bad", "model_id", "flag_bad"),
        # Each model's latest row for status (revision 0003), and export --since.
        sa.Index("ix_astro_nn_dist_model_created", "model_id", "created"),
    )

    id: Mapped[int] = mapped_column(_ID_TYPE, primary_key=True, autoincrement=True)
    spectrum_id: Mapped[str] = mapped_column(sa.String(MAX_SPECTRUM_ID_CHARS))
    path: Mapped[str] = mapped_column(sa.Text)
    model_id: Mapped[str] = mapped_column(sa.String(255))
    pipeline_version: Mapped[str] = mapped_column(sa.String(64))
    created: Mapped[datetime] = mapped_column(UTCDateTime)
    t_elapsed: Mapped[float | None] = mapped_column(sa.Double)
    k_mag: Mapped[float | None] = mapped_column(sa.Double)
    ebv: Mapped[float | None] = mapped_column(sa.Double)
    a_k_mag: Mapped[float | None] = mapped_column(sa.Double)
    L_fakemag: Mapped[float | None] = mapped_column(sa.Double)
    L_fakemag_err: Mapped[float | None] = mapped_column(sa.Double)
    dist: Mapped[float | None] = mapped_column(sa.Double)
    dist_err: Mapped[float | None] = mapped_column(sa.Double)
    result_flags: Mapped[int] = mapped_column(sa.Integer)
    flag_warn: Mapped[bool] = mapped_column(sa.Boolean)
    flag_bad: Mapped[bool] = mapped_column(sa.Boolean)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=1)
    error: Mapped[str | None] = mapped_column(sa.Text)
    mc_passes: Mapped[int | None] = mapped_column(sa.Integer)
    seed: Mapped[int | None] = mapped_column(sa.BigInteger)
    # How the masks were drawn (revision 0002): CPU and GPU draw different, equally valid masks.
    device: Mapped[str | None] = mapped_column(sa.String(16))
    mask_rng: Mapped[str | None] = mapped_column(sa.String(64))
    host: Mapped[str | None] = mapped_column(sa.String(255))
    task_id: Mapped[str | None] = mapped_column(sa.String(255))


astro_nn_dist: sa.Table = AstroNNDist.__table__  # type: ignore[assignment]
"""The Core table (for ``select``/``update``); the ORM class is :class:`AstroNNDist`."""

COUNT_KEY = ("model_id", "result_flags", "flag_warn", "flag_bad", "has_dist", "attempts", "device", "mask_rng")
"""What status reports on, as kept per combination in :data:`result_counts` (``has_dist``: the row
has a distance)."""

result_counts = sa.Table(
    COUNTS_TABLE,
    Base.metadata,
    sa.Column("model_id", sa.String(255), nullable=False),
    sa.Column("result_flags", sa.Integer, nullable=False),
    sa.Column("flag_warn", sa.Boolean, nullable=False),
    sa.Column("flag_bad", sa.Boolean, nullable=False),
    sa.Column("has_dist", sa.Boolean, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("device", sa.String(16)),
    sa.Column("mask_rng", sa.String(64)),
    sa.Column("row_count", sa.BigInteger, nullable=False),
    sa.Index(f"ix_{COUNTS_TABLE}_key", *COUNT_KEY),
)
"""Rows of the results table per :data:`COUNT_KEY`, kept by the database's triggers (revision
0003: on PostgreSQL appended deltas, summed per key; on SQLite one row per key); read by
:func:`summary` and :func:`computed_by`, never written by this code except :func:`compact_counts`."""

COMPACT_COUNTS_AT = 10_000
"""Delta rows (PostgreSQL) past which :func:`summary` folds them into one row per key (a write of
one chunk adds a row per key it touches, a few; summing 10,000 takes milliseconds)."""

KEY_COLUMNS = ("model_id", "spectrum_id")
_WRITABLE = tuple(c.name for c in astro_nn_dist.columns if c.name not in ("id", "created"))
_UPDATED = tuple(c.name for c in astro_nn_dist.columns if c.name not in ("id", *KEY_COLUMNS))
_REQUIRED = ("spectrum_id", "model_id", "path", "pipeline_version", "result_flags", "flag_warn", "flag_bad")
_DEFAULTS: dict[str, Any] = {"attempts": 1}


def _coercer(column: sa.Column[Any]) -> Any:
    """Value -> what the driver can bind: numpy scalars become Python ones, NaN/inf None."""
    python_type = column.type.python_type if not isinstance(column.type, UTCDateTime) else datetime
    if python_type is float:
        def to_float(v: Any) -> float | None:
            if v is None:
                return None
            v = float(v)
            return v if math.isfinite(v) else None
        return to_float
    if python_type is bool:
        return lambda v: None if v is None else bool(v)
    if python_type is int:
        return lambda v: None if v is None else int(v)
    if python_type is str:
        return lambda v: None if v is None else str(v)
    return lambda v: v


_COERCE = {c.name: _coercer(c) for c in astro_nn_dist.columns}


# -------------------------------------------------------------------------------------- engines


def normalize_url(url: str) -> sa.URL:
    """The URL with PostgreSQL mapped to the psycopg 3 driver (``postgresql://`` and
    ``postgres://`` would otherwise mean psycopg2, which is not installed).

    Raises:
        sqlalchemy.exc.ArgumentError: not a URL, or a backend other than SQLite/PostgreSQL.
    """
    parsed = sa.make_url(re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", url))
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise sa.exc.ArgumentError(
            f"unsupported database backend '{parsed.get_backend_name()}': use sqlite:///FILE or "
            "postgresql://USER@HOST/DB"
        )
    return parsed


def make_engine(url: str | sa.URL, *, dead_client_s: int | None = None) -> Engine:
    """An engine on the results database (nothing is created: see :func:`migrate`).

    SQLite (a file): WAL journal, so readers never block the writer and several processes can
    share the file; a writer waits up to :data:`SQLITE_BUSY_TIMEOUT_S` for another's lock;
    SQLAlchemy, not the sqlite3 module, emits BEGIN, so DDL is transactional and a transaction
    can take the write lock up front (``BEGIN IMMEDIATE``: :func:`migrate`, :func:`upsert_results`).
    PostgreSQL: psycopg 3, connections checked before use (``pool_pre_ping``), so a restarted
    server costs a reconnect, not a failed task; with ``dead_client_s`` (the workers', see
    :func:`dead_client_s`) the server probes a quiet connection and ends the session of a client
    whose host stopped answering within about that many seconds.
    """
    parsed = normalize_url(str(url) if isinstance(url, str) else url.render_as_string(hide_password=False))
    if parsed.get_backend_name() == "postgresql":
        connect_args: dict[str, Any] = {}
        if dead_client_s is not None:
            connect_args.update(_dead_server_params(dead_client_s))
            # Beside the user's own options (the URL's ?options=, else PGOPTIONS), never in
            # their place: connect_args wins over the URL, and libpq reads PGOPTIONS only when
            # no options are passed, so a plain assignment would drop a search_path or a
            # statement_timeout on the workers alone.
            own = parsed.query.get("options") or os.environ.get("PGOPTIONS")
            if isinstance(own, tuple):
                own = " ".join(own)
            connect_args["options"] = " ".join(
                filter(None, [own, _dead_client_options(dead_client_s)]))
        return sa.create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    memory = parsed.database in (None, "", ":memory:") or "mode=memory" in str(parsed)
    engine = sa.create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module (it would never BEGIN before
        # DDL, and only ever a DEFERRED BEGIN); _on_begin below emits it instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        if not memory:
            _set_wal(cursor)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_SQLITE_BEGIN, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _set_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode = WAL``, retried while another process holds the file: on a new
    file still in rollback mode the switch needs the lock and SQLite does not wait for it
    (no busy handler), so two workers starting at once on a new file would see "locked"."""
    import sqlite3

    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextmanager
def _write_transaction(target: Engine | Connection) -> Iterator[Connection]:
    """A connection in a transaction: the caller's own (``target`` a Connection: nothing is
    committed here), or a new one that commits on success. On SQLite a new one starts with
    BEGIN IMMEDIATE: it takes the write lock first (waiting out other writers), so it can never
    fail half-way upgrading a read snapshot to a write (SQLITE_BUSY_SNAPSHOT)."""
    if isinstance(target, Connection):
        if target.in_transaction():
            yield target
        else:
            with target.begin():
                yield target
        return
    with target.connect() as conn:
        if conn.dialect.name == "sqlite":
            conn = conn.execution_options(**{_SQLITE_BEGIN: "IMMEDIATE"})
        with conn.begin():
            yield conn


# ----------------------------------------------------------------------------------- migrations


def alembic_config() -> Any:
    """Alembic's configuration, built in code (no alembic.ini needed): the migrations shipped in
    this package, the version table :data:`VERSION_TABLE`."""
    from alembic.config import Config

    config = Config()
    # ConfigParser interpolation: a literal '%' in the install path must be doubled.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return config


def head_revision() -> str:
    """The newest migration revision this version of the code ships."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


@contextmanager
def migration_transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction holding the database-wide migration lock: PostgreSQL's advisory lock
    (transaction-scoped: released by the commit or rollback), SQLite's write lock (BEGIN
    IMMEDIATE). Both backends have transactional DDL, so a failed migration leaves nothing."""
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            conn = conn.execution_options(**{_SQLITE_BEGIN: "IMMEDIATE"})
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATE_LOCK})
            yield conn


def migrate(url_or_engine: str | Engine) -> tuple[str | None, str]:
    """Create or upgrade the results table to this version's schema (Alembic ``upgrade head``).

    Returns:
        (revision before, revision after), both read under the migration lock: before is None
        when there was no results table (this call created it).

    Safe to call from many processes at once (each worker calls it on start): they take turns
    (see :func:`migration_transaction`); the first creates the table, the others find the schema
    current and do nothing.

    Raises:
        SchemaError: the database carries a revision this code does not know (a newer version
            of astronn-dist migrated it): upgrade this installation.
        sqlalchemy.exc.OperationalError: the database cannot be reached.
    """
    from alembic import command
    from alembic.util import CommandError

    engine = make_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    try:
        config = alembic_config()
        with migration_transaction(engine) as conn:
            config.attributes["connection"] = conn
            before = _current_revision(conn)
            try:
                command.upgrade(config, "head")
            except CommandError as exc:
                raise SchemaError(
                    f"cannot migrate the results database to revision {head_revision()}: {exc} "
                    "(was it migrated by a newer astronn-dist? upgrade this installation)"
                ) from exc
            after = _current_revision(conn)
    finally:
        if isinstance(url_or_engine, str):
            engine.dispose()
    assert after is not None
    return before, after


def _current_revision(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


# --------------------------------------------------------------------------------------- writes


class _HasAsRow(Protocol):
    def as_row(self) -> dict[str, Any]: ...


def _prepare(
    rows: Iterable[Mapping[str, Any] | _HasAsRow], provenance: Mapping[str, Any], created: datetime
) -> list[dict[str, Any]]:
    """Complete, coerced rows; one per key (the last wins), in key order.

    Key order: two transactions writing overlapping keys then lock them in the same order, so
    they queue behind each other instead of deadlocking (PostgreSQL).
    """
    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    for item in rows:
        raw = item.as_row() if hasattr(item, "as_row") else dict(item)  # type: ignore[union-attr]
        unknown = set(raw) - set(_WRITABLE) - {"id", "created"}
        if unknown:
            raise ValueError(f"not columns of {TABLE_NAME}: {', '.join(sorted(unknown))}")
        missing = [k for k in _REQUIRED if raw.get(k) is None]
        if missing:
            raise ValueError(f"row {raw.get('spectrum_id')!r} lacks {', '.join(missing)}")
        row = {}
        for name in _WRITABLE:
            value = raw[name] if name in raw else provenance.get(name, _DEFAULTS.get(name))
            row[name] = _COERCE[name](value)
        row["created"] = created
        by_key[(row["model_id"], row["spectrum_id"])] = row
    return [by_key[k] for k in sorted(by_key)]


def upsert_results(
    target: Engine | Connection,
    rows: Iterable[Mapping[str, Any] | _HasAsRow],
    *,
    task_id: str | None = None,
    attempts: int | None = None,
    host: str | None = None,
) -> int:
    """Insert or update rows, keyed on (spectrum_id, model_id), in ONE transaction.

    Idempotent: writing the same rows again leaves one row per key with the latest values and a
    fresh ``created``. Every column except the key and ``id`` is overwritten.

    Args:
        target: an Engine (a transaction is opened and committed here) or a Connection: its
            open transaction is used and NOT committed (the caller commits, e.g. inside
            ``engine.begin()``, together with its other writes); with none open, one is
            opened and committed here.
        rows: dicts with the column names (as ``ResultRecord.as_row()``) or objects with an
            ``as_row()`` method (``astronn_dist.worker.science.pipeline.ResultRecord``). Required: spectrum_id,
            model_id, path, pipeline_version, result_flags, flag_warn, flag_bad. Non-finite
            floats and numpy scalars are accepted (stored as NULL / Python values).
        task_id, attempts, host: provenance for rows that do not carry their own value
            (``attempts`` defaults to 1).

    Returns:
        The number of distinct keys written.

    Raises:
        ValueError: a row with an unknown column or without a required value (nothing written).
        sqlalchemy.exc.SQLAlchemyError: database trouble (nothing written).
    """
    provenance = {"task_id": task_id, "attempts": attempts, "host": host}
    prepared = _prepare(rows, {k: v for k, v in provenance.items() if v is not None}, datetime.now(timezone.utc))
    if not prepared:
        return 0
    with _write_transaction(target) as conn:
        if conn.dialect.name == "postgresql" and len(prepared) >= COPY_AT:
            _upsert_by_copy(conn, prepared)
        else:
            conn.execute(_upsert_statement(conn.dialect.name), prepared)
    return len(prepared)


COPY_AT = 1000
"""Rows from which PostgreSQL writes go through COPY (a worker's chunks of ~100 stay plain
INSERTs, where COPY's extra statements cost more than they save)."""

_INCOMING = f"{TABLE_NAME}_incoming"
_COPIED = (*_WRITABLE, "created")


def _upsert_by_copy(conn: Connection, prepared: list[dict[str, Any]]) -> None:
    """PostgreSQL's bulk path: COPY the rows into a temporary table of this session, then one
    ``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` (the same upsert, so the same idempotence,
    key order and triggers). ~2x the rows per second of multi-row INSERTs at 20,000 rows."""
    columns = ", ".join(f'"{name}"' for name in _COPIED)
    # ON COMMIT DELETE ROWS: the table lives as long as the pooled connection, empty between
    # transactions; the DELETE below empties it for a second call in the same transaction.
    conn.exec_driver_sql(
        f"CREATE TEMP TABLE IF NOT EXISTS {_INCOMING} ON COMMIT DELETE ROWS AS "
        f"SELECT {columns} FROM {TABLE_NAME} WITH NO DATA"
    )
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    with cursor.copy(f"COPY {_INCOMING} ({columns}) FROM STDIN") as copy:
        for row in prepared:  # already coerced: NaN is None, created is aware UTC
            copy.write_row([row[name] for name in _COPIED])
    incoming = sa.table(_INCOMING, *(sa.column(name) for name in _COPIED))
    rows = sa.select(*(incoming.c[name] for name in _COPIED)).order_by(*(incoming.c[k] for k in KEY_COLUMNS))
    conn.execute(_upsert_statement("postgresql", rows))
    conn.exec_driver_sql(f"DELETE FROM {_INCOMING}")


def _upsert_statement(dialect: str, rows: sa.Select[Any] | None = None) -> Any:
    """The upsert of rows given as parameters, or of a SELECT's ``rows`` (columns :data:`_COPIED`)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # make_engine refuses other backends; a foreign engine gets a clear message
        raise NotImplementedError(f"{TABLE_NAME}: upsert is implemented for SQLite and PostgreSQL, not {dialect}")
    stmt = insert(astro_nn_dist)
    if rows is not None:
        stmt = stmt.from_select(list(_COPIED), rows)
    return stmt.on_conflict_do_update(
        index_elements=[astro_nn_dist.c[k] for k in KEY_COLUMNS],
        set_={name: stmt.excluded[name] for name in _UPDATED},
    )


# ---------------------------------------------------------------------------------------- reads


PG_IDS_PER_QUERY = 50_000
"""spectrum_ids per PostgreSQL lookup query: a whole catalog block (producer.catalog.BLOCK_ROWS)."""


def _rows_by_id(conn: Connection, model_id: str, spectrum_ids: Sequence[str],
                columns: Sequence[sa.ColumnElement[Any]]) -> Iterator[Any]:
    """The rows (``columns``) of ``spectrum_ids`` under ``model_id``, found by index lookups.

    PostgreSQL: per :data:`PG_IDS_PER_QUERY` ids, one query that probes the (model_id,
    spectrum_id) index once per id: the ids as ``unnest(array)``, each joined to a ``LATERAL
    (... LIMIT 1)`` subquery, which the planner can only run as a nested loop of index probes,
    whatever it knows of the table. A plain ``= ANY(array)`` became, on a table without
    statistics yet (just filled), a scan of all the model's rows per query: ~3 s per 50,000 ids
    at 10 M rows, against 0.22-0.32 s this way; one array parameter also keeps the statement
    text constant (an expanding IN of 900 ids took 50 s for 100k ids). SQLite: IN lists of 900
    (versions before 3.32 allow 999 bound parameters).
    """
    t = astro_nn_dist
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import ARRAY

        for start in range(0, len(spectrum_ids), PG_IDS_PER_QUERY):
            chunk = list(spectrum_ids[start : start + PG_IDS_PER_QUERY])
            wanted = (sa.func.unnest(sa.bindparam("spectrum_ids", chunk, type_=ARRAY(sa.String)))
                      .table_valued("spectrum_id").render_derived())
            hit = (sa.select(*columns).where(t.c.model_id == model_id, t.c.spectrum_id == wanted.c.spectrum_id)
                   .limit(1).lateral("hit"))
            yield from conn.execute(sa.select(*hit.c).select_from(wanted).join(hit, sa.true()))
    else:
        for start in range(0, len(spectrum_ids), 900):
            chunk = list(spectrum_ids[start : start + 900])
            yield from conn.execute(sa.select(*columns).where(t.c.model_id == model_id, t.c.spectrum_id.in_(chunk)))


def existing_spectrum_ids(engine: Engine | Connection, model_id: str, spectrum_ids: Iterable[str]) -> set[str]:
    """Those of ``spectrum_ids`` that have a row for ``model_id`` (whatever its outcome).

    Index lookups (see :func:`_rows_by_id`): under a second per 100k ids, at any table size.
    """
    wanted = sorted(set(spectrum_ids))
    found: set[str] = set()
    if not wanted:
        return found
    with _reading(engine) as conn:
        found.update(r.spectrum_id for r in _rows_by_id(conn, model_id, wanted, [astro_nn_dist.c.spectrum_id]))
    return found


def has_table(engine: Engine | Connection) -> bool:
    """Whether the results table exists (before ``migrate``, nothing is done)."""
    with _reading(engine) as conn:
        return sa.inspect(conn).has_table(TABLE_NAME)


def rows_for(engine: Engine | Connection, model_id: str, spectrum_ids: Sequence[str],
             columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The rows of ``spectrum_ids`` for ``model_id`` as dicts, in the order of the ids (ids
    without a row are left out); ``columns``: only these (and ``spectrum_id``), else all."""
    rows: dict[str, dict[str, Any]] = {}
    t = astro_nn_dist
    wanted = list(t.c) if columns is None else [t.c.spectrum_id, *(t.c[name] for name in columns if name != "spectrum_id")]
    with _reading(engine) as conn:
        found = _rows_by_id(conn, model_id, list(dict.fromkeys(spectrum_ids)), wanted)
        rows.update((r.spectrum_id, dict(r._mapping)) for r in found)
    return [rows[i] for i in spectrum_ids if i in rows]


def created_times(engine: Engine | Connection, model_id: str, spectrum_ids: Sequence[str]) -> dict[str, datetime]:
    """spectrum_id -> when its row for ``model_id`` was last written (aware, UTC)."""
    out: dict[str, datetime] = {}
    with _reading(engine) as conn:
        columns = [astro_nn_dist.c.spectrum_id, astro_nn_dist.c.created]
        found = _rows_by_id(conn, model_id, list(dict.fromkeys(spectrum_ids)), columns)
        out.update((sid, created) for sid, created in found if created is not None)
    return out


@contextmanager
def _reading(target: Engine | Connection) -> Iterator[Connection]:
    if isinstance(target, Connection):
        yield target
    else:
        with target.connect() as conn:
            yield conn


def _has_flag(bit: int, flags: sa.ColumnElement[int] = astro_nn_dist.c.result_flags) -> sa.ColumnElement[bool]:
    return flags.op("&")(bit) != 0


def _outcome_condition(outcome: str) -> sa.ColumnElement[bool]:
    """Rows of one of :data:`OUTCOMES`: not flagged bad, flagged bad, or without a result."""
    bad = astro_nn_dist.c.flag_bad.is_(True)
    if outcome == "good":
        return astro_nn_dist.c.flag_bad.is_(False)
    if outcome == "bad":
        return bad
    if outcome == "failed":  # flag_no_result implies flag_bad: the (model_id, flag_bad) index narrows it
        return sa.and_(bad, _has_flag(FLAG_NO_RESULT))
    raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")


def select_for_requeue(
    engine: Engine | Connection,
    model_id: str,
    *,
    failed: bool = False,
    bad: bool = False,
    spectrum_ids: Sequence[str] | None = None,
) -> list[SpectrumRequest]:
    """Requests to process again: the rows of ``model_id`` that match ANY of the criteria.

    Args:
        failed: rows without a result (``flag_no_result``).
        bad: rows flagged bad (no result, unreliable fakemag or missing Ks).
        spectrum_ids: these spectra (ids without a row are left out: the caller can report them).

    Returns:
        ``astronn_dist.worker.contract.SpectrumRequest`` (spectrum_id, path, k_mag, ebv): flagged rows in
        spectrum_id order, then the named ones in the order given. Photometry: a no-result row's
        is what its message carried (None where it carried none: the worker reads the header
        then); a computed row's is the value it used, or None where the flags say it was
        missing, so the worker tries the header again.

    Raises:
        ValueError: no criterion given.
    """
    ids = list(dict.fromkeys(spectrum_ids or ()))
    if not (failed or bad or ids):
        raise ValueError("choose what to requeue: failed, bad and/or spectrum_ids")
    t = astro_nn_dist
    columns = (t.c.spectrum_id, t.c.path, t.c.k_mag, t.c.ebv, t.c.result_flags)
    selected: dict[str, Any] = {}
    with _reading(engine) as conn:
        if failed or bad:
            condition = _outcome_condition("bad" if bad else "failed")
            query = sa.select(*columns).where(t.c.model_id == model_id, condition).order_by(t.c.spectrum_id)
            selected.update((r.spectrum_id, r) for r in conn.execute(query))
        named: dict[str, Any] = {}
        named.update((r.spectrum_id, r) for r in _rows_by_id(conn, model_id, ids, columns))
    for sid in ids:
        if sid in named and sid not in selected:
            selected[sid] = named[sid]

    def photometry(value: float | None, flags: int, missing_bit: int) -> float | None:
        return None if value is None or flags & missing_bit else value

    return [
        SpectrumRequest(
            spectrum_id=r.spectrum_id,
            path=r.path,
            k_mag=photometry(r.k_mag, r.result_flags, FLAG_MISSING_PHOTOMETRY),
            ebv=photometry(r.ebv, r.result_flags, FLAG_MISSING_EXTINCTION),
        )
        for r in selected.values()
    ]


def summary(engine: Engine | Connection, model_id: str | None = None) -> list[dict[str, Any]]:
    """Counts for ``astronn-dist status``: one flat dict per model (``model_id`` None: all
    models, and a last ``"(all models)"`` line when there are several).

    Keys: model_id, rows, results (rows with a distance), no_result, flag_bad, flag_warn, the
    other flag bits (fakemag_unreliable, missing_photometry, missing_extinction), max_attempts,
    last_created (aware UTC datetime or None). No rows at all: one line of zeros.

    Reads :data:`result_counts` and one index seek per model for ``last_created``, never the
    result rows, so it takes the same milliseconds at any table size.

    Raises:
        SchemaError: the table predates the counts (revision 0003): run ``astronn-dist migrate``.
    """
    if isinstance(engine, Engine):
        compact_counts(engine)
    counts = _counts()

    def count(condition: sa.ColumnElement[bool]) -> Any:
        return sa.func.coalesce(sa.func.sum(sa.case((condition, counts.c.row_count), else_=0)), 0)

    bits = {name: bit for name, bit in FLAG_COUNTS.items() if name != "no_result"}
    aggregates = [
        sa.func.coalesce(sa.func.sum(counts.c.row_count), 0).label("rows"),
        count(counts.c.has_dist.is_(True)).label("results"),
        count(_has_flag(FLAG_NO_RESULT, counts.c.result_flags)).label("no_result"),
        count(counts.c.flag_bad.is_(True)).label("flag_bad"),
        count(counts.c.flag_warn.is_(True)).label("flag_warn"),
        *(count(_has_flag(bit, counts.c.result_flags)).label(name) for name, bit in bits.items()),
        sa.func.max(counts.c.attempts).label("max_attempts"),
    ]
    query = sa.select(counts.c.model_id, *aggregates).group_by(counts.c.model_id).order_by(counts.c.model_id)
    if model_id is not None:
        query = query.where(counts.c.model_id == model_id)
    latest = sa.select(sa.func.max(astro_nn_dist.c.created)).where(
        astro_nn_dist.c.model_id == sa.bindparam("model_id")
    )
    with _reading(engine) as conn:
        _require_counts(conn)
        lines = []
        for row in conn.execute(query):
            line = dict(row._mapping)
            line["last_created"] = conn.scalar(latest, {"model_id": line["model_id"]})
            lines.append(_summary_line(line))
    if not lines:
        zero = {a.name: 0 for a in aggregates}
        return [{"model_id": model_id or "", **zero, "max_attempts": None, "last_created": None}]
    if len(lines) > 1:
        total: dict[str, Any] = {"model_id": "(all models)"}
        for key in lines[0]:
            if key == "model_id":
                continue
            values = [line[key] for line in lines if line[key] is not None]
            total[key] = max(values, default=None) if key in ("max_attempts", "last_created") else sum(values)
        lines.append(total)
    return lines


def computed_by(engine: Engine | Connection, model_id: str | None = None) -> list[dict[str, Any]]:
    """Rows by how they were computed: ``{"model_id", "device", "mask_rng", "rows"}`` per
    combination (None: a row written before revision 0002), for ``status``."""
    counts = _counts()
    how = (counts.c.model_id, counts.c.device, counts.c.mask_rng)
    # _counts() keeps only keys with rows, so every combination here has some.
    query = sa.select(*how, sa.func.sum(counts.c.row_count).label("rows")).group_by(*how).order_by(*how)
    if model_id is not None:
        query = query.where(counts.c.model_id == model_id)
    with _reading(engine) as conn:
        _require_counts(conn)
        return [{**r._mapping, "rows": int(r.rows)} for r in conn.execute(query)]


def _counts() -> sa.Subquery:
    """:data:`result_counts` with one row per key (PostgreSQL's deltas summed), zeros left out."""
    c = result_counts
    key = [c.c[name] for name in COUNT_KEY]
    total = sa.func.sum(c.c.row_count)
    return sa.select(*key, total.label("row_count")).group_by(*key).having(total != 0).subquery()


def _require_counts(conn: Connection) -> None:
    if not sa.inspect(conn).has_table(COUNTS_TABLE):
        raise SchemaError(
            f"the results database has no {COUNTS_TABLE} table (revision 0003): "
            "run astronn-dist migrate, or start a worker, to upgrade it"
        )


def compact_counts(engine: Engine, at_least: int = COMPACT_COUNTS_AT) -> int:
    """Fold PostgreSQL's count deltas into one row per key once there are ``at_least`` of them.

    Safe beside writers and other compactions: the DELETE takes only the delta rows its
    snapshot sees (a writer's new deltas stay), and a second compaction skips the rows the first
    deleted, so every delta is summed exactly once. A role that may not delete (a read-only
    user) leaves the deltas as they are: :func:`summary` sums them all the same.

    Returns:
        The delta rows folded (0 on SQLite, which keeps one row per key already).
    """
    if engine.dialect.name != "postgresql":
        return 0
    keys = ", ".join(COUNT_KEY)
    try:
        with engine.begin() as conn:
            if not sa.inspect(conn).has_table(COUNTS_TABLE):
                return 0
            if conn.scalar(sa.select(sa.func.count()).select_from(result_counts)) < at_least:
                return 0
            folded = conn.execute(sa.text(
                f"WITH gone AS (DELETE FROM {COUNTS_TABLE} RETURNING {keys}, row_count), "
                f"summed AS (INSERT INTO {COUNTS_TABLE} ({keys}, row_count) "
                f"SELECT {keys}, sum(row_count) FROM gone GROUP BY {keys} HAVING sum(row_count) <> 0) "
                "SELECT count(*) FROM gone"
            )).scalar_one()
    except sa.exc.ProgrammingError as exc:
        if getattr(exc.orig, "sqlstate", None) != "42501":  # insufficient_privilege
            raise
        return 0
    return int(folded)


def _summary_line(mapping: Mapping[str, Any]) -> dict[str, Any]:
    line = dict(mapping)
    # max() over the column bypasses the type decorator on some backends (SQLite: a string).
    line["last_created"] = _as_utc(line["last_created"])
    for key, value in line.items():
        if key not in ("model_id", "last_created") and value is not None:
            line[key] = int(value)
    return line


def _as_utc(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


EXPORT_COLUMNS = tuple(c.name for c in astro_nn_dist.columns if c.name != "id")
"""The exported columns, in table order (the surrogate ``id`` means nothing outside the table)."""

STRING_COLUMNS = tuple(c.name for c in astro_nn_dist.columns if isinstance(c.type, (sa.String, sa.Text)))
"""Text columns: an export sizes their fixed-width fields (FITS) from :func:`export_stats`."""

OUTCOMES = ("good", "bad", "failed")
"""export_where's choices: not flagged bad / flagged bad / no result (failed rows are bad too)."""


@dataclass(frozen=True)
class ExportStats:
    """What a file writer must know before the first row: counts, widths, provenance."""

    rows: int
    max_bytes: dict[str, int]
    """Text column -> the longest value in UTF-8 bytes (0 when all are NULL or empty)."""
    models: tuple[str, ...]
    pipeline_versions: tuple[str, ...]


def export_where(
    model_ids: Sequence[str] | None = None, outcome: str | None = None, since: datetime | None = None
) -> sa.ColumnElement[bool]:
    """The rows an export selects: of these models (None: all), of one outcome
    (:data:`OUTCOMES`), written at or after ``since`` (aware; naive means UTC)."""
    t = astro_nn_dist
    conditions: list[sa.ColumnElement[bool]] = []
    if model_ids is not None:
        conditions.append(t.c.model_id.in_(list(model_ids)))
    if outcome is not None:
        conditions.append(_outcome_condition(outcome))
    if since is not None:
        conditions.append(t.c.created >= since)
    return sa.and_(sa.true(), *conditions)


@contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """A connection whose reads all see one state of the table, however long they take.

    An export reads counts and widths first and then the rows: rows written meanwhile by the
    workers must not appear in the second read only. PostgreSQL: a REPEATABLE READ
    transaction; SQLite (WAL): a read transaction holds its snapshot from its first read.
    """
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            yield conn


def export_stats(conn: Connection, where: sa.ColumnElement[bool]) -> ExportStats:
    """Row count, text widths, models and pipeline versions of the selected rows (one scan
    plus one grouped scan)."""
    t = astro_nn_dist

    def byte_length(column: sa.Column[Any]) -> Any:
        if conn.dialect.name == "postgresql":
            return sa.func.octet_length(column)
        return sa.func.length(sa.cast(column, sa.LargeBinary))  # SQLite: bytes, not characters

    widths = [sa.func.coalesce(sa.func.max(byte_length(t.c[name])), 0).label(name) for name in STRING_COLUMNS]
    counted = conn.execute(sa.select(sa.func.count().label("rows"), *widths).where(where)).one()._mapping
    versions = conn.execute(
        sa.select(t.c.model_id, t.c.pipeline_version).where(where).group_by(t.c.model_id, t.c.pipeline_version)
    ).all()
    return ExportStats(
        rows=int(counted["rows"]),
        max_bytes={name: int(counted[name]) for name in STRING_COLUMNS},
        models=tuple(sorted({m for m, _ in versions})),
        pipeline_versions=tuple(sorted({v for _, v in versions})),
    )


def export_blocks(
    conn: Connection, where: sa.ColumnElement[bool], block_rows: int = 50_000
) -> Iterator[list[tuple[Any, ...]]]:
    """The selected rows, ordered by model_id then spectrum_id, as lists of at most
    ``block_rows`` tuples of :data:`EXPORT_COLUMNS` (NULL -> None, ``created`` aware UTC).

    A server-side cursor on PostgreSQL (``yield_per``): memory holds one block, whatever the
    table's size.
    """
    t = astro_nn_dist
    query = sa.select(*(t.c[name] for name in EXPORT_COLUMNS)).where(where).order_by(t.c.model_id, t.c.spectrum_id)
    result = conn.execution_options(yield_per=block_rows).execute(query)
    for block in result.partitions():
        yield [tuple(row) for row in block]


def export_rows(
    engine: Engine | Connection, model_id: str | None = None, *, batch_size: int = 10_000
) -> Iterator[dict[str, Any]]:
    """Every row (of ``model_id``, or all) as dicts of :data:`EXPORT_COLUMNS`, in
    :func:`export_blocks` order: a whole-table read for small tables and tests."""
    where = export_where(None if model_id is None else [model_id])
    with _reading(engine) as conn:
        for block in export_blocks(conn, where, batch_size):
            for row in block:
                yield dict(zip(EXPORT_COLUMNS, row))
