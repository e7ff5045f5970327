"""Create the results table astro_nn_dist.

Revision ID: 0001
Revises:
Create Date: 2025-11-25

One row per (model_id, spectrum_id). Columns as DESIGN.md ("Results table"); units as
astronn_dist.worker.science.pipeline.ResultRecord. The time column is timezone-aware on PostgreSQL (timestamptz);
SQLite stores naive UTC text.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "astro_nn_dist",
        # BIGINT on PostgreSQL (upserts consume sequence values); INTEGER, the rowid, on SQLite.
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("spectrum_id", sa.String(256), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("model_id", sa.String(255), nullable=False),
        sa.Column("pipeline_version", sa.String(64), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("t_elapsed", sa.Double(), nullable=True),
        sa.Column("k_mag", sa.Double(), nullable=True),
        sa.Column("ebv", sa.Double(), nullable=True),
        sa.Column("a_k_mag", sa.Double(), nullable=True),
        sa.Column("L_fakemag", sa.Double(), nullable=True),
        sa.Column("L_fakemag_err", sa.Double(), nullable=True),
        sa.Column("dist", sa.Double(), nullable=True),
        sa.Column("dist_err", sa.Double(), nullable=True),
        sa.Column("result_flags", sa.Integer(), nullable=False),
        sa.Column("flag_warn", sa.Boolean(), nullable=False),
        sa.Column("flag_bad", sa.Boolean(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("mc_passes", sa.Integer(), nullable=True),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("task_id", sa.String(255), nullable=True),
        sa.UniqueConstraint("model_id", "spectrum_id", name="uq_astro_nn_dist_model_spectrum"),
    )
    op.create_index("ix_astro_nn_dist_model_bad", "astro_nn_dist", ["model_id", "flag_bad"])


def downgrade() -> None:
    op.drop_index("ix_astro_nn_dist_model_bad", table_name="astro_nn_dist")
    op.drop_table("astro_nn_dist")
