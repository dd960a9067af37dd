"""Batches: `items.batch`, the name an import tagged the item with (NULL: imported without one),
indexed with the project so one batch's progress and exports read only that batch's items.

Plain ADD COLUMN + CREATE INDEX on both backends, never a batch-mode table rebuild: on SQLite that
drops and recreates `items`, which would cascade-delete every candidate, assignment and judgment
hanging off it. Existing items get NULL: they belong to no batch.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("items", sa.Column("batch", sa.String(64), nullable=True))
    op.create_index("ix_items_project_batch", "items", ["project_id", "batch"])


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35): the index that names the column has to go first.
    op.drop_index("ix_items_project_batch", table_name="items")
    op.drop_column("items", "batch")
