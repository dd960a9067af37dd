"""Initial schema: users, API keys, sessions, projects, members, items, candidates,
assignments, judgments.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer(), primary_key=True)


def _fk(name: str, target: str) -> sa.Column:
    return sa.Column(name, sa.Integer(), sa.ForeignKey(target, ondelete="CASCADE"), nullable=False)


def _created() -> sa.Column:
    return sa.Column("created_at", sa.DateTime(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "projects",
        _id(),
        sa.Column("name", sa.String(100), nullable=False, unique=True),
        sa.Column("task", sa.String(16), nullable=False),
        sa.Column("guidelines", sa.Text(), nullable=False),
        sa.Column("overlap", sa.Integer(), nullable=False),
        _created(),
    )
    op.create_table(
        "users",
        _id(),
        sa.Column("username", sa.String(64), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(256), nullable=True),
        sa.Column("is_owner", sa.Boolean(), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        _created(),
    )
    op.create_table(
        "api_keys",
        _id(),
        _fk("user_id", "users.id"),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False, unique=True),
        sa.Column("key_hash", sa.String(64), nullable=False),
        _created(),
        sa.Column("revoked", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_api_keys_user_id", "api_keys", ["user_id"])
    op.create_table(
        "sessions",
        _id(),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        _fk("user_id", "users.id"),
        _created(),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_sessions_user_id", "sessions", ["user_id"])
    op.create_table(
        "members",
        sa.Column("project_id", sa.Integer(), sa.ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
    )
    op.create_table(
        "items",
        _id(),
        _fk("project_id", "projects.id"),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("prompt", sa.JSON(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("n_judgments", sa.Integer(), nullable=False),
        _created(),
        sa.UniqueConstraint("project_id", "key"),
    )
    op.create_index("ix_items_project_position", "items", ["project_id", "position"])
    op.create_table(
        "candidates",
        _id(),
        _fk("item_id", "items.id"),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("text", sa.JSON(), nullable=False),
        sa.UniqueConstraint("item_id", "idx"),
    )
    op.create_index("ix_candidates_item_id", "candidates", ["item_id"])
    op.create_table(
        "assignments",
        _id(),
        _fk("item_id", "items.id"),
        _fk("user_id", "users.id"),
        sa.Column("display_order", sa.JSON(), nullable=False),
        sa.Column("draft", sa.JSON(), nullable=True),
        sa.Column("leased_until", sa.DateTime(), nullable=False),
        sa.Column("done", sa.Boolean(), nullable=False),
        _created(),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("item_id", "user_id"),
    )
    op.create_index("ix_assignments_user_done", "assignments", ["user_id", "done"])
    op.create_table(
        "judgments",
        _id(),
        _fk("item_id", "items.id"),
        _fk("user_id", "users.id"),
        sa.Column("ranking", sa.JSON(), nullable=True),
        sa.Column("unusable", sa.Boolean(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("response", sa.JSON(), nullable=True),
        sa.Column("client_token", sa.String(64), nullable=False),
        sa.Column("seconds", sa.Double(), nullable=True),
        _created(),
        sa.UniqueConstraint("item_id", "user_id"),
    )
    op.create_index("ix_judgments_item_id", "judgments", ["item_id"])
    op.create_index("ix_judgments_user_id", "judgments", ["user_id"])


def downgrade() -> None:
    for table in (
        "judgments",
        "assignments",
        "candidates",
        "items",
        "members",
        "sessions",
        "api_keys",
        "users",
        "projects",
    ):
        op.drop_table(table)
