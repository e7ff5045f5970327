"""Rows say how they were computed: the device type and the random generator of the masks.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

A spectrum redelivered to another kind of device draws other (equally valid) dropout masks, so
its numbers change within Monte-Carlo noise; these columns make that visible. Rows written
before this revision keep NULL (they were computed on the CPU with numpy's SFC64 unless a GPU
was used: the older rows cannot say).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("astro_nn_dist") as batch:  # SQLite: ADD COLUMN works in place
        batch.add_column(sa.Column("device", sa.String(16), nullable=True))
        batch.add_column(sa.Column("mask_rng", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("astro_nn_dist") as batch:
        batch.drop_column("mask_rng")
        batch.drop_column("device")
