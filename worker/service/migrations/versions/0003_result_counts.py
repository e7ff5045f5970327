"""Counts of the results kept by the database itself, so that ``status`` reads no result row.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

``status`` used to aggregate the whole results table: ~2 s a million rows, 20 s at ten million.
Now triggers on ``astro_nn_dist`` keep ``astro_nn_dist_counts``: how many rows have each
combination of the columns ``status`` reports on (the count key below), whoever writes them
(worker upserts, ``requeue``, a hand-made DELETE). ``status`` sums that small table and takes
each model's latest ``created`` from the new (model_id, created) index, which ``export --since``
uses too.

How each backend keeps the counts:

* PostgreSQL: statement-level triggers with transition tables append one delta row per count
  key and statement (+n for rows that arrive under a key, -n for rows that leave it). Appending
  takes no row lock, so concurrent workers never wait on, or deadlock over, a shared counter.
  Readers sum the deltas per key; ``status`` folds them into one row per key once they pile up
  (``astronn_dist.worker.service.results.compact_counts``).
* SQLite: row-level triggers (SQLite has no other kind) keep one row per key up to date; its
  writers take turns, so a shared counter costs nothing more there.

TRUNCATE (PostgreSQL) empties the counts too. The existing rows are counted once here, under the
trigger's table lock, so no write falls between the count and the first trigger.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "astro_nn_dist"
COUNTS = "astro_nn_dist_counts"

# Count key column -> its value from a results row (``{r}`` is the row: NEW, OLD or an alias).
KEY = {
    "model_id": "{r}.model_id",
    "result_flags": "{r}.result_flags",
    "flag_warn": "{r}.flag_warn",
    "flag_bad": "{r}.flag_bad",
    "has_dist": "({r}.dist IS NOT NULL)",
    "attempts": "{r}.attempts",
    "device": "{r}.device",
    "mask_rng": "{r}.mask_rng",
}
# A row's key changes only when one of these does (an identical rewrite leaves the counts be).
SOURCE_COLUMNS = ("model_id", "result_flags", "flag_warn", "flag_bad", "dist", "attempts", "device", "mask_rng")


def _key(row: str) -> str:
    return ", ".join(value.format(r=row) for value in KEY.values())


def _named_key(row: str) -> str:
    return ", ".join(f"{value.format(r=row)} AS {column}" for column, value in KEY.items())


def _columns() -> str:
    return ", ".join(KEY)


def upgrade() -> None:
    op.create_table(
        COUNTS,
        sa.Column("model_id", sa.String(255), nullable=False),
        sa.Column("result_flags", sa.Integer(), nullable=False),
        sa.Column("flag_warn", sa.Boolean(), nullable=False),
        sa.Column("flag_bad", sa.Boolean(), nullable=False),
        sa.Column("has_dist", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(16), nullable=True),
        sa.Column("mask_rng", sa.String(64), nullable=True),
        sa.Column("row_count", sa.BigInteger(), nullable=False),
    )
    op.create_index(f"ix_{COUNTS}_key", COUNTS, list(KEY))
    op.create_index(f"ix_{TABLE}_model_created", TABLE, ["model_id", "created"])
    if op.get_bind().dialect.name == "postgresql":
        _postgresql_triggers()
    else:
        _sqlite_triggers()
    op.execute(
        f"INSERT INTO {COUNTS} ({_columns()}, row_count) "
        f"SELECT {_key('r')}, count(*) FROM {TABLE} r GROUP BY {_key('r')}"
    )


def _postgresql_triggers() -> None:
    def delta(rows: str, sign: str) -> str:
        return f"SELECT {_key('r')}, {sign}count(*) FROM {rows} r GROUP BY {_key('r')}"

    bodies = {
        "insert": f"INSERT INTO {COUNTS} ({_columns()}, row_count) {delta('new_rows', '')};",
        "delete": f"INSERT INTO {COUNTS} ({_columns()}, row_count) {delta('old_rows', '-')};",
        # Only the keys whose count changes: an upsert that rewrites a row as it was adds nothing.
        "update": (
            f"INSERT INTO {COUNTS} ({_columns()}, row_count) "
            f"SELECT {_columns()}, sum(n) FROM ("
            f"SELECT {_named_key('o')}, -1 AS n FROM old_rows o UNION ALL "
            f"SELECT {_named_key('w')}, 1 AS n FROM new_rows w) AS d "
            f"GROUP BY {_columns()} HAVING sum(n) <> 0;"
        ),
        "truncate": f"TRUNCATE {COUNTS};",
    }
    transitions = {
        "insert": "REFERENCING NEW TABLE AS new_rows",
        "delete": "REFERENCING OLD TABLE AS old_rows",
        "update": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
        "truncate": "",
    }
    for event, body in bodies.items():
        name = f"{COUNTS}_{event}"
        op.execute(
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN {body} RETURN NULL; END $$"
        )
        op.execute(
            f"CREATE TRIGGER {name} AFTER {event.upper()} ON {TABLE} {transitions[event]} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {name}()"
        )


def _sqlite_triggers() -> None:
    def match(row: str) -> str:
        # IS: NULL-safe equality (device and mask_rng are NULL on rows older than 0002).
        return " AND ".join(f"{column} IS {value.format(r=row)}" for column, value in KEY.items())

    def add(row: str, n: str) -> str:
        return (
            f"INSERT INTO {COUNTS} ({_columns()}, row_count) SELECT {_key(row)}, 0 "
            f"WHERE NOT EXISTS (SELECT 1 FROM {COUNTS} WHERE {match(row)}); "
            f"UPDATE {COUNTS} SET row_count = row_count {n} WHERE {match(row)};"
        )

    changed = " OR ".join(f"OLD.{c} IS NOT NEW.{c}" for c in SOURCE_COLUMNS)
    op.execute(f"CREATE TRIGGER {COUNTS}_insert AFTER INSERT ON {TABLE} BEGIN {add('NEW', '+ 1')} END")
    op.execute(f"CREATE TRIGGER {COUNTS}_delete AFTER DELETE ON {TABLE} BEGIN {add('OLD', '- 1')} END")
    op.execute(
        f"CREATE TRIGGER {COUNTS}_update AFTER UPDATE ON {TABLE} WHEN {changed} "
        f"BEGIN {add('OLD', '- 1')} {add('NEW', '+ 1')} END"
    )


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == "postgresql"
    for event in ("insert", "update", "delete", "truncate"):
        if postgresql:
            op.execute(f"DROP TRIGGER {COUNTS}_{event} ON {TABLE}")
            op.execute(f"DROP FUNCTION {COUNTS}_{event}()")
        elif event != "truncate":
            op.execute(f"DROP TRIGGER {COUNTS}_{event}")
    op.drop_index(f"ix_{TABLE}_model_created", table_name=TABLE)
    op.drop_index(f"ix_{COUNTS}_key", table_name=COUNTS)
    op.drop_table(COUNTS)
