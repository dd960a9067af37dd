"""More kinds of feedback: rating projects (with criteria) and thumbs, and the chat playground.

projects.criteria, judgments.scores and judgment_history.scores (ratings and thumbs), and the
chat tables: conversations, their messages, and the feedback on the model's answers.

Plain ADD COLUMN / CREATE TABLE on both backends, never a batch-mode table rebuild (on SQLite that
drops and recreates the table, which would cascade-delete the rows hanging off it). Existing rows
get NULL: no criteria, no scores; every existing project keeps its task.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("projects", sa.Column("criteria", sa.JSON(), nullable=True))
    op.add_column("judgments", sa.Column("scores", sa.JSON(), nullable=True))
    op.add_column("judgment_history", sa.Column("scores", sa.JSON(), nullable=True))
    op.create_table(
        "conversations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_conversations_user_id", "conversations", ["user_id"])
    op.create_table(
        "chat_messages",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "conversation_id", sa.Integer(), sa.ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text(), nullable=True),
        sa.Column("candidates", sa.JSON(), nullable=True),
        sa.Column("picked", sa.Integer(), nullable=True),
        sa.Column("thumbs", sa.Boolean(), nullable=True),
        sa.Column("model", sa.String(1000), nullable=True),
        sa.Column("fingerprint", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("rated_at", sa.DateTime(), nullable=True),
        sa.UniqueConstraint("conversation_id", "position"),
    )


def downgrade() -> None:
    op.drop_table("chat_messages")
    op.drop_index("ix_conversations_user_id", "conversations")
    op.drop_table("conversations")
    op.drop_column("judgment_history", "scores")
    op.drop_column("judgments", "scores")
    op.drop_column("projects", "criteria")
