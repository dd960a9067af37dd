"""More kinds of feedback: rating projects (with criteria) and thumbs, and the chat playground.

projects.criteria, judgments.scores and judgment_history.scores (ratings and thumbs), and the
chat tables: conversations, their messages, and the feedback on the model's answers.

Plain ADD COLUMN / CREATE TABLE on both backends, never a batch-mode table rebuild (on SQLite that
drops and recreates the table, which would cascade-delete the rows hanging off it). Existing rows
get NULL: no criteria, no scores; every existing project keeps its task.

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("projects", sa.Column("criteria", sa.JSON(), nullable=True))
    op.add_column("judgments", sa.Column("scores", sa.JSON(), nullable=True))
    op.add_column("judgment_history", sa.Column("scores", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("judgment_history", "scores")
    op.drop_column("judgments", "scores")
    op.drop_column("projects", "criteria")
