"""The annotator's day: skips, edits with a history, strength of preference, admin review.

assignments.skipped, judgments.strength/excluded/edited_at, items.sent_back_at, projects.locked,
and the judgment_history table (earlier versions of edited or sent-back judgments).

Plain ADD COLUMN on both backends, never a batch-mode table rebuild: on SQLite that drops and
recreates the table, which would cascade-delete the rows hanging off it (an item's candidates,
assignments and judgments). Existing rows get the defaults: nothing skipped, excluded or locked.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

FALSE = sa.false()


def upgrade() -> None:
    op.add_column("projects", sa.Column("locked", sa.Boolean(), nullable=False, server_default=FALSE))
    op.add_column("items", sa.Column("sent_back_at", sa.DateTime(), nullable=True))
    op.add_column("assignments", sa.Column("skipped", sa.Boolean(), nullable=False, server_default=FALSE))
    op.add_column("judgments", sa.Column("strength", sa.Integer(), nullable=True))
    op.add_column("judgments", sa.Column("excluded", sa.Boolean(), nullable=False, server_default=FALSE))
    op.add_column("judgments", sa.Column("edited_at", sa.DateTime(), nullable=True))
    op.create_table(
        "judgment_history",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("item_id", sa.Integer(), sa.ForeignKey("items.id", ondelete="CASCADE"), nullable=False),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("ranking", sa.JSON(), nullable=True),
        sa.Column("unusable", sa.Boolean(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("response", sa.JSON(), nullable=True),
        sa.Column("strength", sa.Integer(), nullable=True),
        sa.Column("excluded", sa.Boolean(), nullable=False),
        sa.Column("client_token", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("superseded_at", sa.DateTime(), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
    )
    op.create_index("ix_judgment_history_item_id", "judgment_history", ["item_id"])
    op.create_index("ix_judgment_history_user_id", "judgment_history", ["user_id"])


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite >= 3.35), for the same reason.
    op.drop_table("judgment_history")
    for table, column in (
        ("judgments", "edited_at"),
        ("judgments", "excluded"),
        ("judgments", "strength"),
        ("assignments", "skipped"),
        ("items", "sent_back_at"),
        ("projects", "locked"),
    ):
        op.drop_column(table, column)
