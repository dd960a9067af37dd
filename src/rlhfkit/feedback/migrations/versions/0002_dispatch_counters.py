"""Dispatch without rescanning: `items.complete`, indexed with the position in place of the
(project, position) index, and the per-labeler cursor `members.scan_from` (see models.py).

Plain ADD COLUMN + a backfill UPDATE + CREATE INDEX, on both backends: never a batch-mode table
rebuild, which on SQLite drops and recreates the table and so cascade-deletes the rows of its
children (candidates, assignments and judgments hang off items). Existing cursors start at 0 (a
first scan moves them), existing items are marked complete from their counts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("items", sa.Column("complete", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("members", sa.Column("scan_from", sa.Integer(), nullable=False, server_default="0"))
    op.execute(
        "UPDATE items SET complete = (n_judgments >= "
        "(SELECT projects.overlap FROM projects WHERE projects.id = items.project_id))"
    )
    op.create_index("ix_items_project_open", "items", ["project_id", "complete", "position"])
    op.drop_index("ix_items_project_position", table_name="items")  # see models.Item


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35): the index that names the column has to go first.
    op.create_index("ix_items_project_position", "items", ["project_id", "position"])
    op.drop_index("ix_items_project_open", table_name="items")
    op.drop_column("members", "scan_from")
    op.drop_column("items", "complete")
