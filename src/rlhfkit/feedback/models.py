"""The feedback database: who may label what, what there is to label, and every judgment.

Invariants the schema itself enforces (so no code path can break them, even under concurrency):
- one judgment per (item, labeler): a retried or double-clicked submit can never make two;
- one assignment per (item, labeler): a labeler's shuffled display order is fixed once shown;
- `items.n_judgments` is only ever raised by a conditional UPDATE (`... WHERE n_judgments < N`),
  so an item never takes more than its project's N judgments.

Two columns exist only so that the dispatcher's cost does not grow as a project fills (see
service.next_assignment): `items.complete` (n_judgments >= the project's overlap, kept by the same
UPDATE that counts a judgment, and recomputed when the overlap changes), indexed with the position
so complete items are never read again; and `members.scan_from`, a per-labeler cursor: every item
before that position is complete or already handed to this labeler. Whatever reopens an item (a
raised overlap, a removed judgment) must clear `complete` and reset the project's cursors to 0, or
the dispatcher would never offer that item again.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, String, Text, UniqueConstraint, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NullableJSON = JSON(none_as_null=True)  # Python None is SQL NULL (not JSON 'null'), so IS NULL works


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[int]: JSON, Any: JSON}


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    # None: no browser login (a script user that only has API keys).
    password_hash: Mapped[str | None] = mapped_column(String(256))
    is_owner: Mapped[bool] = mapped_column(default=False)
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A script's credential. Only a SHA-256 of the key is stored; `prefix` finds the row."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked: Mapped[bool] = mapped_column(default=False)
    user: Mapped[User] = relationship()


class LoginSession(Base):
    """A browser login. The cookie holds a random token; the table holds its SHA-256, so a
    leaked database does not leak live sessions, and logout really ends the session."""

    __tablename__ = "sessions"
    id: Mapped[int] = mapped_column(primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    user: Mapped[User] = relationship()


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    task: Mapped[str] = mapped_column(String(16))  # one of choices.TASKS
    guidelines: Mapped[str] = mapped_column(Text, default="")
    overlap: Mapped[int]  # N: each item goes to N distinct labelers
    # Locked: the data is final (e.g. exported for training): no submits, skips, edits or send-backs.
    locked: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Member(Base):
    __tablename__ = "members"
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))  # one of choices.ROLES
    # The dispatcher's cursor (see the module docstring): the position its next scan for this labeler starts at.
    scan_from: Mapped[int] = mapped_column(default=0, server_default="0")
    user: Mapped[User] = relationship()


class Item(Base):
    """One prompt to judge; `key` is the prompt_id from the imported file."""

    __tablename__ = "items"
    # (project, complete, position): the dispatcher walks the incomplete items in order and stops at
    # the first free ones; the complete ones, most of a project that is filling up, are not even
    # read. The only index on the position: beside one on (project, position), PostgreSQL's planner
    # (its statistics lagging the counts) took that one and skipped the complete items row by row,
    # the very rescan this avoids. Exports, which want every item in order, sort instead.
    __table_args__ = (
        UniqueConstraint("project_id", "key"),
        Index("ix_items_project_open", "project_id", "complete", "position"),
        Index("ix_items_project_batch", "project_id", "batch"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(200))
    prompt: Mapped[Any]  # text, or a list of {role, content} messages
    position: Mapped[int]  # import order: the dispatcher hands items out in this order
    # The batch the import tagged it with (e.g. a `rlhfkit loop` round), None: imported without one.
    # Progress and exports can be limited to batches; the dispatcher ignores them (import order).
    batch: Mapped[str | None] = mapped_column(String(64))
    n_judgments: Mapped[int] = mapped_column(default=0)  # current judgments that count (not excluded)
    complete: Mapped[bool] = mapped_column(default=False, server_default=false())  # n_judgments >= overlap
    # When an admin last sent it back for relabeling (its judgments then went to the history).
    sent_back_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    candidates: Mapped[list[Candidate]] = relationship(order_by="Candidate.idx")


class Candidate(Base):
    """A completion to rank. `idx` is its place in the imported list (exports use it); `id` is
    the stable id the API speaks, independent of any labeler's shuffled display order."""

    __tablename__ = "candidates"
    __table_args__ = (UniqueConstraint("item_id", "idx"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    idx: Mapped[int]
    text: Mapped[Any]


class Assignment(Base):
    """An item handed to a labeler: their shuffled order, their autosaved draft, their lease.

    An open assignment with a live lease holds one of the item's N places, so N labelers are
    not all handed the same last slot; an expired lease frees the place for someone else.
    """

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("item_id", "user_id"),
        Index("ix_assignments_user_done", "user_id", "done"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    display_order: Mapped[list[int]]  # candidate ids, as this labeler sees them
    draft: Mapped[dict[str, Any] | None] = mapped_column(NullableJSON)
    leased_until: Mapped[datetime]
    done: Mapped[bool] = mapped_column(default=False)
    # Done without a judgment because the labeler skipped it (its place is free for others).
    skipped: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    item: Mapped[Item] = relationship()


class Judgment(Base):
    """A labeler's current judgment. `ranking[i]` is the rank of the candidate with idx i (1 = best,
    equal = tie, dense): exactly the `rankings` file format, so exports round-trip.

    `strength`: how much better each rank is than the next (formats.STRENGTHS), None where not given.
    `excluded`: an admin deactivated this labeler's judgments in the project; kept, reversible,
    but left out of exports, agreement and progress. An edited or sent-back judgment's earlier
    version is copied to JudgmentHistory first, so nothing a labeler submitted is ever lost.
    """

    __tablename__ = "judgments"
    __table_args__ = (UniqueConstraint("item_id", "user_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    ranking: Mapped[list[int] | None] = mapped_column(NullableJSON)  # None for demonstrations
    unusable: Mapped[bool] = mapped_column(default=False)
    comment: Mapped[str | None] = mapped_column(Text)
    response: Mapped[Any | None] = mapped_column(NullableJSON)  # the written demonstration
    client_token: Mapped[str] = mapped_column(String(64))
    seconds: Mapped[float | None]  # from first display to submit: labelers' pace on the admin page
    strength: Mapped[int | None]
    excluded: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    edited_at: Mapped[datetime | None]
    item: Mapped[Item] = relationship()
    user: Mapped[User] = relationship()


class JudgmentHistory(Base):
    """An earlier version of a judgment: replaced by its labeler's edit (`reason` "edited") or
    moved here when an admin sent the item back for relabeling ("sent_back")."""

    __tablename__ = "judgment_history"
    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    ranking: Mapped[list[int] | None] = mapped_column(NullableJSON)
    unusable: Mapped[bool]
    comment: Mapped[str | None] = mapped_column(Text)
    response: Mapped[Any | None] = mapped_column(NullableJSON)
    strength: Mapped[int | None]
    excluded: Mapped[bool]
    client_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]  # when that version was submitted
    superseded_at: Mapped[datetime] = mapped_column(default=utcnow)
    reason: Mapped[str] = mapped_column(String(16))  # one of choices.HISTORY_REASONS
