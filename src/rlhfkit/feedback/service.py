"""Every rule of the feedback app, in plain functions over a SQLAlchemy session.

The HTML pages, the JSON API and the admin CLI all call these, so a rule (who may see what, when
an item is complete, what a valid ranking is) is written once. Functions raise ServiceError
subclasses whose `status` is the HTTP status the web layer answers with; the caller owns the
transaction (see Database.transact), so a failure anywhere leaves nothing half-stored.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import secrets
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import combinations
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from sqlalchemy import ColumnElement, and_, exists, func, select, text, true, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, contains_eager, selectinload

from rlhfkit.data.formats import (
    STRENGTHS,
    Completions,
    Demonstration,
    PromptRecord,
    Ranking,
    check_ranks,
    detect_kind,
    read_records,
    text_to_json,
)
from rlhfkit.errors import UserError
from rlhfkit.feedback.choices import DEFAULT_ROLE
from rlhfkit.feedback.models import (
    ApiKey,
    Assignment,
    Candidate,
    Item,
    Judgment,
    JudgmentHistory,
    LoginSession,
    Member,
    Project,
    User,
    utcnow,
)
from rlhfkit.feedback.schemas import (
    MAX_CANDIDATES,
    DraftIn,
    JudgmentIn,
    MemberIn,
    ProjectIn,
    ProjectSettingsIn,
    ReviewFilterIn,
    UserIn,
    problems_text,
    text_problem,
)
from rlhfkit.feedback.security import (
    api_key_prefix,
    hash_password,
    new_api_key,
    new_token,
    password_problem,
    sha256,
    verify_password,
)
from rlhfkit.labels import consensus
from rlhfkit.labels.pairs import rankings_to_pairs

log = logging.getLogger("rlhfkit.feedback")
M = TypeVar("M", bound=BaseModel)


class ServiceError(Exception):
    """`headers` go out with the error response (e.g. Retry-After)."""

    status = 400

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class Unauthorized(ServiceError):
    status = 401


class Forbidden(ServiceError):
    status = 403


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class Invalid(ServiceError):
    status = 422


class TooManyAttempts(ServiceError):
    status = 429


class Busy(ServiceError):
    status = 503


class Unshowable(Conflict):
    """A stored item holds text no page can show (imported before imports were checked)."""


# ---------------------------------------------------------------- users, sessions, API keys


def create_user(s: Session, data: UserIn) -> User:
    if s.scalar(select(User.id).where(User.username == data.username)) is not None:
        raise Conflict(f"a user named {data.username!r} already exists")
    user = User(
        username=data.username,
        password_hash=hash_password(data.password) if data.password else None,
        is_owner=data.is_owner,
    )
    s.add(user)
    s.flush()
    return user


def get_user(s: Session, username: str) -> User:
    user = s.scalar(select(User).where(User.username == username))
    if user is None:
        raise NotFound(f"no user named {username!r}")
    return user


def checked(model: type[M], **fields: Any) -> M:
    """A request schema built from a form's or a command line's values: its errors become a 422
    (a CLI error, via the admin commands) that names each field, as the JSON API's do."""
    try:
        return model(**fields)
    except ValidationError as e:
        raise Invalid(problems_text(e)) from None


def user_by_id(s: Session, user_id: int) -> User:
    user = s.get(User, user_id)
    if user is None:
        raise NotFound("no such user")
    return user


def set_password(s: Session, user: User, password: str) -> None:
    problem = password_problem(password, user.username)
    if problem:
        raise Invalid(f"password: {problem}")
    user.password_hash = hash_password(password)
    s.execute(LoginSession.__table__.delete().where(LoginSession.user_id == user.id))  # log out everywhere


def check_password(s: Session, username: str, password: str) -> User:
    """The user, if the password is right. Run in a read transaction: argon2 is slow on purpose,
    and on SQLite a write transaction would hold up every other writer meanwhile. The hash is
    checked whoever asks (unknown and deactivated users included), so the time taken does not
    tell which usernames exist."""
    user = s.scalar(select(User).where(User.username == username))
    right = verify_password(user.password_hash if user else None, password)
    if user is None or not right or not user.active:
        raise Unauthorized("wrong username or password")
    return user


@dataclass(frozen=True)
class SessionTimes:
    """A browser session ends after `idle` without requests, and `lifetime` after login at the latest.

    `LoginSession.expires_at` is the idle deadline, pushed forward as the session is used (at
    most once per `step`, so a busy labeler does not cost a database write per request).
    """

    idle: timedelta
    lifetime: timedelta

    @property
    def step(self) -> timedelta:
        return min(self.idle / 10, timedelta(minutes=5))

    def deadline(self, created_at: datetime, now: datetime) -> datetime:
        return min(now + self.idle, created_at + self.lifetime)


def open_session(s: Session, user_id: int, times: SessionTimes) -> str:
    """Start a browser session; returns the token for the cookie."""
    token, now = new_token(), utcnow()
    s.add(LoginSession(token_hash=sha256(token), user_id=user_id, created_at=now, expires_at=times.deadline(now, now)))
    return token


def session_user(s: Session, token: str, times: SessionTimes) -> tuple[User, bool] | None:
    """(the session's user, whether its idle deadline is due to be pushed forward with
    `touch_session`), or None if there is no such session or it has ended."""
    row = s.execute(
        select(LoginSession.created_at, LoginSession.expires_at, User)
        .join(User)
        .where(LoginSession.token_hash == sha256(token))
    ).first()
    now = utcnow()
    if row is None or row.expires_at <= now or row.created_at + times.lifetime <= now or not row.User.active:
        return None
    # Due when a step has passed since it was last pushed, or when it lies further out than the
    # idle time allows (a session from before the idle timeout existed, or a shortened setting);
    # not when it already is the end of the session's lifetime.
    left = row.expires_at - now
    due = (left < times.idle - times.step or left > times.idle) and row.expires_at != times.deadline(
        row.created_at, now
    )
    return row.User, due


def touch_session(s: Session, token: str, times: SessionTimes) -> None:
    session = s.scalar(select(LoginSession).where(LoginSession.token_hash == sha256(token)))
    if session is not None:
        session.expires_at = times.deadline(session.created_at, utcnow())


def logout(s: Session, token: str) -> None:
    s.execute(LoginSession.__table__.delete().where(LoginSession.token_hash == sha256(token)))


def create_api_key(s: Session, user: User, name: str) -> str:
    """Returns the key itself: shown once, only its hash is kept."""
    prefix, key = new_api_key()
    s.add(ApiKey(user_id=user.id, name=name, prefix=prefix, key_hash=sha256(key)))
    return key


def api_key_user(s: Session, key: str) -> User | None:
    prefix = api_key_prefix(key)
    if prefix is None:
        return None
    row = s.execute(select(ApiKey.key_hash, ApiKey.revoked, User).join(User).where(ApiKey.prefix == prefix)).first()
    if row is None or row.revoked or not secrets.compare_digest(row.key_hash, sha256(key)) or not row.User.active:
        return None
    return row.User


def api_keys(s: Session, user: User) -> list[ApiKey]:
    return list(s.scalars(select(ApiKey).where(ApiKey.user_id == user.id).order_by(ApiKey.id)))


def revoke_api_key(s: Session, user: User, key_id: int) -> None:
    row = s.get(ApiKey, key_id)
    if row is None or row.user_id != user.id:
        raise NotFound("no such API key")
    row.revoked = True


def all_users(s: Session) -> list[User]:
    return list(s.scalars(select(User).order_by(User.username)))


def set_active(s: Session, user: User, active: bool) -> None:
    user.active = active
    if not active:
        s.execute(LoginSession.__table__.delete().where(LoginSession.user_id == user.id))


# ---------------------------------------------------------------- projects and membership


def create_project(s: Session, data: ProjectIn) -> Project:
    if s.scalar(select(Project.id).where(Project.name == data.name)) is not None:
        raise Conflict(f"a project named {data.name!r} already exists")
    project = Project(name=data.name, task=data.task, guidelines=data.guidelines, overlap=data.overlap)
    s.add(project)
    s.flush()
    return project


def find_project(s: Session, name: str) -> Project:
    project = s.scalar(select(Project).where(Project.name == name))
    if project is None:
        raise NotFound(f"no project named {name!r}")
    return project


def project_for(s: Session, user: User, project_id: int, admin: bool = False) -> tuple[Project, str]:
    """(project, role) if `user` may see it, as an admin if asked; role is 'owner' for the site
    owner (who sees every project), else 'admin' or 'labeler'. A non-member gets 404, not 403:
    whether a project exists is itself something another project's labelers must not learn."""
    row = s.execute(
        select(Project, Member.role)
        .outerjoin(Member, and_(Member.project_id == Project.id, Member.user_id == user.id))
        .where(Project.id == project_id)
    ).first()
    project, role = (row.Project, "owner" if user.is_owner else row.role) if row else (None, None)
    if project is None or role is None:
        raise NotFound("no such project")
    if admin and role == "labeler":
        raise Forbidden("only this project's admins may do that")
    return project, role


def projects_of(s: Session, user: User) -> list[tuple[Project, str]]:
    if user.is_owner:
        return [(p, "owner") for p in s.scalars(select(Project).order_by(Project.id))]
    rows = s.execute(select(Project, Member.role).join(Member).where(Member.user_id == user.id).order_by(Project.id))
    return [(p, role) for p, role in rows]


def update_project(s: Session, project: Project, data: ProjectSettingsIn) -> None:
    if data.guidelines is not None:
        project.guidelines = data.guidelines
    if data.overlap is not None and data.overlap != project.overlap:
        project.overlap = data.overlap
        # The dispatcher's shortcuts depend on N (see models.py): items' complete flags follow it,
        # and a raised N reopens items that the labelers' cursors have passed: they start over.
        s.execute(
            update(Item.__table__)
            .where(Item.project_id == project.id)
            .values(complete=Item.n_judgments >= data.overlap)
        )
        s.execute(update(Member.__table__).where(Member.project_id == project.id).values(scan_from=0))
    if data.locked is not None:
        project.locked = data.locked


def require_unlocked(project: Project, action: str) -> None:
    """A locked project's judgments are final: refuse `action` with a message that says why."""
    if project.locked:
        raise Conflict(f"project {project.name!r} is locked: {action} is no longer possible (ask its admin)")


def set_member(s: Session, project: Project, data: MemberIn) -> Member:
    user = get_user(s, data.username)
    member = s.get(Member, (project.id, user.id))
    if member is None:
        member = Member(project_id=project.id, user_id=user.id, role=data.role)
        s.add(member)
    member.role = data.role
    s.flush()
    return member


def members(s: Session, project: Project) -> list[Member]:
    return list(s.scalars(select(Member).join(User).where(Member.project_id == project.id).order_by(User.username)))


def remove_member(s: Session, project: Project, user_id: int) -> None:
    member = s.get(Member, (project.id, user_id))
    if member is None:
        raise NotFound("no such member")
    s.delete(member)


# ---------------------------------------------------------------- importing items


def parse_upload(filename: str, data: bytes, task: str) -> list[Completions] | list[PromptRecord]:
    """Validate an uploaded JSONL file with the project's reader, and what the reader accepts but
    an item cannot hold (see `_record_problem`); errors name the file and line. The file is
    parsed under a fixed name: the uploaded name only ever appears in messages."""
    name = upload_name(filename)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "upload.jsonl"
        path.write_bytes(data)
        try:
            kind = "completions"
            if task == "demonstration":
                kind = _first_record_kind(path)
            records = read_records(path, kind)
        except UserError as e:
            raise Invalid(str(e).replace(str(path), name)) from None
        for rec in records:
            problem = _record_problem(rec, task)
            if problem:
                raise Invalid(f"{(rec._where or '').replace(str(path), name)}: {problem}")
    return split_into_pairs(records) if task == "pairwise" else records


def upload_name(filename: str) -> str:
    """An upload's file name as shown in messages: its last path component, which must be a plain
    printable name (".." or a NUL byte is a broken client, not a file to import)."""
    name = re.split(r"[/\\]", filename)[-1] if filename else "upload.jsonl"
    if name in ("", ".", "..") or len(name) > 200 or not name.isprintable() or text_problem(name):
        raise Invalid(
            f"filename: {filename[:40]!r} is not usable; send a plain file name such as batch.jsonl "
            "(at most 200 printable characters, no folders)"
        )
    return name


def _record_problem(rec: Completions | PromptRecord, task: str) -> str | None:
    """`field: what is wrong` for a record the file reader accepts but an item cannot hold, or None:
    more candidates than a judgment may rank, or text a database cannot store or a page cannot
    show (one such item would fail every labeler it is handed to)."""
    fields = rec.model_dump()
    if isinstance(rec, Completions):
        if task == "demonstration":
            del fields["completions"]  # only the prompt is imported
        elif len(rec.completions) > MAX_CANDIDATES:
            return (
                f"completions: {len(rec.completions)} candidates, but one item can have at most {MAX_CANDIDATES} "
                "(a judgment ranks them all); keep fewer or split them over several prompt_ids"
            )
    key = "prompt_id" if isinstance(rec, Completions) else "id"
    for where, value in _strings(fields, ""):
        problem = text_problem(value, allow_nul=where != key)  # only the id goes into a text column
        if problem:
            return f"{where}: {problem}"
    return None


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """Every string in a JSON-like value, with where it is (`prompt`, `completions[2][0].content`)."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{where}.{k}" if where else k)


def split_into_pairs(records: list[Completions]) -> list[Completions]:
    """A pairwise project shows two responses at a time, while `rlhfkit generate` makes 4 per prompt
    by default: a record with K > 2 completions becomes its C(K, 2) pairs, item `{prompt_id}#{i}-{j}`
    comparing completions i and j (0-based, in the file's order), so every pair is judged and the
    item's key says which two it holds. Records of exactly 2 keep their prompt_id."""
    out: list[Completions] = []
    for rec in records:
        if len(rec.completions) == 2:
            out.append(rec)
            continue
        for i, j in combinations(range(len(rec.completions)), 2):
            pair = [rec.completions[i], rec.completions[j]]
            out.append(Completions(prompt_id=f"{rec.prompt_id}#{i}-{j}", prompt=rec.prompt, completions=pair))
    return out


def _first_record_kind(path: Path) -> str:
    """Demonstration projects take prompts or completions files (only the prompt is used)."""
    for line in path.read_text(encoding="utf-8-sig", errors="replace").splitlines():
        if line.strip():
            try:
                kind = detect_kind(json.loads(line))
            except (ValueError, TypeError, RecursionError):
                return "prompts"  # let read_records report the precise problem
            return kind if kind in ("prompts", "completions") else "prompts"
    return "prompts"


IMPORT_CHUNK = 1000  # items per multi-row INSERT


def import_items(
    s: Session, project: Project, records: Sequence[Completions | PromptRecord], batch: str | None = None
) -> dict[str, int]:
    """Add items, tagged with `batch` (a checked `batch_name`, or None); all or nothing. Re-importing
    an identical record into the same batch is skipped, so importing the same file twice is
    harmless; a known prompt_id with different content, or in another batch, is an error (an item
    belongs to one batch: skipping it would leave it out of the new batch's progress and exports).

    On SQLite the caller's write transaction stops every labeler's submits while it lasts, so
    callers parse and validate the file (parse_upload) before they open it, and here the rows go
    in as multi-row Core INSERTs, a chunk at a time: a 20,000-item file holds the lock for about
    half a second, not for the seconds that parsing and ORM objects took.
    """
    new: dict[str, tuple[Any, list[Any]]] = {}  # key -> (prompt, candidate texts), in file order
    skipped = 0
    for rec in records:
        key = _key(rec)
        texts = rec.completions if isinstance(rec, Completions) and project.task != "demonstration" else []
        if project.task == "pairwise" and len(texts) != 2:
            raise Invalid(f"prompt_id {key!r}: a pairwise project needs exactly 2 completions, got {len(texts)}")
        content = (text_to_json(rec.prompt), [text_to_json(t) for t in texts])
        if key in new:
            if new[key] != content:
                raise Invalid(f"prompt_id {key!r} appears twice in the file with different content")
            skipped += 1
            continue
        new[key] = content
    # All of the project's keys, not `key IN (...)`: a big file would pass SQLite's variable limit.
    existing = dict(s.execute(select(Item.key, Item.batch).where(Item.project_id == project.id)).all())
    known = existing.keys() & new.keys()
    for key in sorted(known):
        if existing[key] != batch:
            raise Invalid(
                f"prompt_id {key!r} was already imported {_batch_phrase(existing[key])}, not {_batch_phrase(batch)}: "
                "an item belongs to one batch; give it a new id (e.g. prefix the round's name)"
            )
    if known:
        for key, content in _contents(s, project, known).items():
            if content != new.pop(key):
                raise Invalid(f"prompt_id {key!r} was already imported with different content; give it a new id")
    position = s.scalar(select(func.coalesce(func.max(Item.position), 0)).where(Item.project_id == project.id))
    rows = list(new.items())
    for start in range(0, len(rows), IMPORT_CHUNK):
        s.execute(
            Item.__table__.insert(),
            [
                {
                    "project_id": project.id,
                    "key": key,
                    "prompt": prompt,
                    "position": position + start + i + 1,
                    "batch": batch,
                }
                for i, (key, (prompt, _)) in enumerate(rows[start : start + IMPORT_CHUNK])
            ],
        )
    if any(texts for _, (_, texts) in rows):
        # The new ids by key, read back in one query: INSERT ... RETURNING in the rows' order would
        # make SQLite insert them one statement each.
        new_items = select(Item.key, Item.id).where(Item.project_id == project.id, Item.position > position)
        ids = {key: item_id for key, item_id in s.execute(new_items)}
        candidates = [
            {"item_id": ids[key], "idx": idx, "text": text}
            for key, (_, texts) in rows
            for idx, text in enumerate(texts)
        ]
        for start in range(0, len(candidates), IMPORT_CHUNK):
            s.execute(Candidate.__table__.insert(), candidates[start : start + IMPORT_CHUNK])
    if rows and s.get_bind().dialect.name == "postgresql":
        # Fresh statistics now, not whenever autovacuum gets round to it: with a stale row count
        # the planner scans every item for each "next" instead of walking them in order (100x).
        s.execute(text("ANALYZE items"))
    return {"added": len(rows), "skipped": skipped + len(known)}


def _batch_phrase(batch: str | None) -> str:
    return f"in batch {batch!r}" if batch is not None else "without a batch"


def _contents(s: Session, project: Project, keys: set[str]) -> dict[str, tuple[Any, list[Any]]]:
    """(prompt, candidate texts) of the project's items with these keys."""
    contents: dict[str, tuple[Any, list[Any]]] = {}
    rows = s.execute(
        select(Item.key, Item.prompt, Candidate.text)
        .select_from(Item)
        .outerjoin(Candidate, Candidate.item_id == Item.id)
        .where(Item.project_id == project.id)
        .order_by(Item.id, Candidate.idx)
    )
    for key, prompt, text_ in rows:
        if key in keys:
            texts = contents.setdefault(key, (prompt, []))[1]
            if text_ is not None:
                texts.append(text_)
    return contents


BATCH_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def batch_name(name: str, where: str = "batch") -> str:
    """A batch name as given to an import, checked: it goes into URLs and file names unescaped."""
    if not BATCH_NAME.fullmatch(name):
        raise Invalid(
            f"{where}: {name[:70]!r} is not a batch name; use 1-64 letters, digits, '.', '_' or '-' (e.g. round-2)"
        )
    return name


def batch_names(values: Sequence[str] | None, where: str = "batch") -> list[str] | None:
    """The batches a progress or export query is limited to: repeated and/or comma-separated
    names (names cannot hold a comma), checked; None or nothing given: no limit."""
    names = [batch_name(n.strip(), where) for v in values or () for n in v.split(",") if n.strip()]
    return list(dict.fromkeys(names)) or None


def _in_batches(batches: Sequence[str] | None) -> ColumnElement[bool]:
    """The items of these batches; all items where None."""
    return Item.batch.in_(batches) if batches else true()


def check_batches(s: Session, project: Project, batches: Sequence[str] | None) -> None:
    """404 for a batch the project has no item in: a mistyped name would otherwise export nothing,
    or report an empty batch as complete."""
    if not batches:
        return
    known = set(s.scalars(select(Item.batch).where(Item.project_id == project.id).distinct()))
    missing = [b for b in batches if b not in known]
    if missing:
        names = ", ".join(sorted(b for b in known if b is not None)) or "none yet"
        raise NotFound(
            f"batch {missing[0]!r}: no item of project {project.name!r} is in it (its batches: {names}); "
            "import with batch=NAME first"
        )


def _key(rec: Completions | PromptRecord) -> str:
    key = rec.prompt_id if isinstance(rec, Completions) else rec.id
    if len(key) > 200:
        raise Invalid(f"prompt id {key[:40]!r}...: longer than 200 characters")
    return key


# ---------------------------------------------------------------- the dispatcher
#
# The hot path: every labeler asks for the next item and submits, over and over. It is written as
# a few Core statements on plain rows (the ORM's unit of work cost more CPU per request than the
# SQL itself), and its cost does not grow as a project fills: complete items are never read
# (`items.complete`, indexed with the position) and each labeler's scan starts at their cursor
# (`members.scan_from`), so the items they already judged are not read again either.

PAGE = 50  # items read per dispatcher query


@dataclass
class AssignedItem:
    """An item as handed to one labeler: their assignment, and what the item shows."""

    assignment_id: int
    item_id: int
    key: str
    prompt: Any
    candidates: list[tuple[int, int, Any]]  # (id, idx, text), in idx order
    display_order: list[int]  # candidate ids, as this labeler sees them
    draft: dict[str, Any] | None
    done: bool
    skipped: bool  # done without a judgment: set aside by the labeler
    created_at: datetime  # first handed out: a judgment's `seconds` count from here


_ASSIGNED = select(
    Assignment.id,
    Assignment.item_id,
    Assignment.display_order,
    Assignment.draft,
    Assignment.done,
    Assignment.skipped,
    Assignment.created_at,
).join(Item, Item.id == Assignment.item_id)


def _held(now: datetime) -> Any:
    """Open assignments with a live lease, per item: places promised but not yet judged."""
    return (
        select(func.count())
        .where(Assignment.item_id == Item.id, Assignment.done.is_(False), Assignment.leased_until > now)
        .scalar_subquery()
    )


def _content(s: Session, item_id: int) -> tuple[str, Any, list[tuple[int, int, Any]]]:
    """(key, prompt, candidates) of an item, in one query."""
    rows = s.execute(
        select(Item.key, Item.prompt, Candidate.id, Candidate.idx, Candidate.text)
        .select_from(Item)
        .outerjoin(Candidate, Candidate.item_id == Item.id)  # demonstration items have none
        .where(Item.id == item_id)
        .order_by(Candidate.idx)
    ).all()
    return rows[0].key, rows[0].prompt, [(c.id, c.idx, c.text) for c in rows if c.id is not None]


def _assigned_item(s: Session, row: Any) -> AssignedItem:
    """The AssignedItem of an `_ASSIGNED` row."""
    key, prompt, candidates = _content(s, row.item_id)
    return AssignedItem(
        row.id,
        row.item_id,
        key,
        prompt,
        candidates,
        row.display_order,
        row.draft,
        row.done,
        row.skipped,
        row.created_at,
    )


def next_assignment(s: Session, project: Project, user: User, lease: timedelta) -> AssignedItem | None:
    """The item this labeler should judge next, or None when nothing is left for them.

    Their own unfinished item comes first (a reload never skips work). Otherwise the first item,
    in import order, that still has a free place (judgments + live leases < N) and that they
    have not seen (see `_dispatch`).
    """
    now = utcnow()
    # The oldest, picked here rather than by ORDER BY id LIMIT 1: with that, PostgreSQL walks the
    # whole assignments table in id order hoping to meet one of this labeler's soon.
    mine = min(
        s.execute(
            _ASSIGNED.where(
                Item.project_id == project.id,
                Assignment.user_id == user.id,
                Assignment.done.is_(False),
                Item.complete.is_(False),
            )
        ).all(),
        key=lambda row: row.id,
        default=None,
    )
    if mine is not None:
        s.execute(update(Assignment.__table__).where(Assignment.id == mine.id).values(leased_until=now + lease))
        return _assigned_item(s, mine)
    task, cursor, moved = _dispatch(s, project, user, now, lease)
    if moved > cursor:
        s.execute(
            update(Member.__table__)
            .where(Member.project_id == project.id, Member.user_id == user.id, Member.scan_from < moved)
            .values(scan_from=moved)
        )
    return task


def _dispatch(
    s: Session, project: Project, user: User, now: datetime, lease: timedelta
) -> tuple[AssignedItem | None, int, int]:
    """(the new assignment or None, the labeler's cursor, how far it may move).

    Reads the incomplete items after the cursor, in order, a page at a time, and claims the first
    one with a free place that this labeler has not seen. The cursor may move over the items seen
    before the first one left behind (an item whose places are all held by others' leases: an
    expired lease may free it, so it must be read again next time). The claimed item counts as
    seen. A site owner who is not a member has no cursor and scans from the start.

    PostgreSQL: the item row is locked while its places are recounted, so two labelers are not
    both handed its last place; rows other dispatchers or submits hold are skipped at first (SKIP
    LOCKED, so labelers do not all queue on the same first row) and waited for only at the end of
    the page. SQLite needs neither: the caller's write transaction (BEGIN IMMEDIATE) already
    excludes every other writer, so the page's counts are current.
    """
    locking = s.get_bind().dialect.name == "postgresql"
    stored = func.coalesce(
        select(Member.scan_from).where(Member.project_id == project.id, Member.user_id == user.id).scalar_subquery(),
        0,
    )
    seen = exists().where(Assignment.item_id == Item.id, Assignment.user_id == user.id)
    page: Any = Item.position >= stored  # the first page starts at the cursor, the next ones after the last row
    cursor = moved = -1  # read with the first page
    behind = False  # an unseen item was left behind: the cursor stops before it
    while True:
        rows = s.execute(
            select(Item.id, Item.position, seen.label("seen"), (Item.n_judgments + _held(now)).label("taken"))
            .add_columns(stored.label("cursor"))
            .where(Item.project_id == project.id, Item.complete.is_(False), page)
            .order_by(Item.position)
            .limit(PAGE)
        ).all()
        if rows and cursor < 0:
            cursor = moved = rows[0].cursor
        busy = []
        for row in rows:
            if row.seen:
                moved = moved if behind else row.position + 1
                continue
            if row.taken < project.overlap:
                free = _recount(s, project, row.id, now, wait=False) if locking else True
                if free:
                    moved = moved if behind else row.position + 1
                    return _assign(s, user, row.id, now, lease), cursor, moved
                if free is None:
                    busy.append(row.id)
            behind = True
        for item_id in busy:
            if _recount(s, project, item_id, now, wait=True):
                return _assign(s, user, item_id, now, lease), cursor, moved
        if len(rows) < PAGE:
            return None, cursor, moved
        page = Item.position > rows[-1].position


def _recount(s: Session, project: Project, item_id: int, now: datetime, wait: bool) -> bool | None:
    """PostgreSQL: lock the item and recount its places; whether one is free, or None when
    another transaction holds the row and `wait` is false."""
    locked = s.execute(select(Item.id).where(Item.id == item_id).with_for_update(skip_locked=not wait)).first()
    if locked is None:
        return None
    # A statement of its own, after the lock: it sees what the previous holder committed.
    return s.scalar(select(Item.n_judgments + _held(now)).where(Item.id == item_id)) < project.overlap


def _assign(s: Session, user: User, item_id: int, now: datetime, lease: timedelta) -> AssignedItem:
    """Hand the item to the labeler, its candidates in an order of their own (against position bias)."""
    key, prompt, candidates = _content(s, item_id)
    order = [c[0] for c in candidates]
    secrets.SystemRandom().shuffle(order)
    assignment_id = s.execute(
        Assignment.__table__.insert()
        .values(
            item_id=item_id,
            user_id=user.id,
            display_order=order,
            leased_until=now + lease,
            created_at=now,
            updated_at=now,
        )
        .returning(Assignment.__table__.c.id)
    ).scalar_one()
    return AssignedItem(assignment_id, item_id, key, prompt, candidates, order, None, False, False, now)


def _assigned_row(s: Session, project: Project, user: User, item_id: int) -> Any:
    """This labeler's assignment of the item, with their judgment of it if any (blind assignment:
    a labeler can only open items the dispatcher handed to them)."""
    row = s.execute(
        _ASSIGNED.add_columns(Judgment.id.label("judgment_id"), Judgment.client_token)
        .outerjoin(Judgment, and_(Judgment.item_id == Assignment.item_id, Judgment.user_id == Assignment.user_id))
        .where(Assignment.item_id == item_id, Assignment.user_id == user.id, Item.project_id == project.id)
    ).first()
    if row is None:
        raise NotFound("no such item among those assigned to you (ask for the next item)")
    return row


def assignment_for(s: Session, project: Project, user: User, item_id: int) -> AssignedItem:
    """A labeler can only open items the dispatcher handed to them (blind assignment)."""
    return _assigned_item(s, _assigned_row(s, project, user, item_id))


def item_view(a: AssignedItem, project: Project) -> dict[str, Any]:
    """What a labeler sees: candidates in *their* order, with stable ids and display letters.

    Raises Unshowable if some text in it cannot be encoded as UTF-8 (a lone surrogate stored
    before imports refused them): better a clear error than a page that fails half-way.
    """
    by_id = {cid: text for cid, _, text in a.candidates}
    view = {
        "project_id": project.id,
        "item_id": a.item_id,
        "prompt_id": a.key,
        "task": project.task,
        "prompt": a.prompt,
        "candidates": [
            {"id": cid, "label": chr(ord("A") + i) if i < 26 else str(i + 1), "text": by_id[cid]}
            for i, cid in enumerate(a.display_order)
        ],
        "draft": a.draft,
        "submitted": a.done and not a.skipped,
        "skipped": a.skipped,
    }
    for where, value in _strings(view, ""):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise Unshowable(
                    f"item {a.key!r} cannot be shown: its {where} is not valid Unicode text; it is "
                    "skipped (an admin can import it again, fixed, under a new prompt_id): take the next item"
                ) from None
    return view


def next_view(s: Session, project: Project, user: User, lease: timedelta) -> dict[str, Any] | None:
    """The view of the item this labeler should judge next (see next_assignment), or None.

    An Unshowable item is logged and marked done for this labeler without a judgment (skipped),
    and the next one is taken: their unfinished item always comes first, so otherwise it would
    fail every request of theirs, for good. A locked project hands out nothing.
    """
    if project.locked:
        return None
    while (a := next_assignment(s, project, user, lease)) is not None:
        try:
            return item_view(a, project)
        except Unshowable as e:
            log.error("project %s, labeler %s: %s", project.id, user.username, e.message)
            s.execute(
                update(Assignment.__table__)
                .where(Assignment.id == a.assignment_id)
                .values(done=True, draft=None, leased_until=utcnow())
            )
    return None


def save_draft(s: Session, project: Project, user: User, item_id: int, draft: DraftIn, lease: timedelta) -> None:
    a = _assigned_row(s, project, user, item_id)
    require_unlocked(project, "labeling")
    if a.done:
        raise Conflict("this item is already submitted")
    now = utcnow()
    s.execute(
        update(Assignment.__table__)
        .where(Assignment.id == a.id)
        .values(draft=draft.model_dump(), updated_at=now, leased_until=now + lease)
    )


# ---------------------------------------------------------------- submitting judgments


def pairwise_choice(a: AssignedItem, choice: str) -> dict[int, int]:
    """Quick pairwise mode: A / B / tie / both bad is a ranking of the two shown candidates."""
    first, second = a.display_order
    ranks = {"a": (1, 2), "b": (2, 1), "tie": (1, 1), "both_bad": (1, 1)}.get(choice)
    if ranks is None:
        raise Invalid(f"choice: {choice!r} is not one of a, b, tie, both_bad")
    return {first: ranks[0], second: ranks[1]}


def _candidate_indexes(s: Session, item_id: int) -> dict[int, int]:
    """candidate id -> idx (its place in the imported list) of one item."""
    return dict(s.execute(select(Candidate.id, Candidate.idx).where(Candidate.item_id == item_id)).all())


def _check_ranking(idx_of: dict[int, int], data: JudgmentIn) -> list[int]:
    """candidate id -> rank  =>  rank per candidate idx (the stored and exported form)."""
    if data.response is not None:
        raise Invalid("response: only demonstration tasks take a written response")
    if data.ranking is None:
        if data.unusable:
            return [1] * len(idx_of)  # flagged without an order: all tied
        raise Invalid("ranking: missing; rank every candidate, or flag the item as not rankable")
    unknown = sorted(set(data.ranking) - set(idx_of))
    if unknown:
        raise Invalid(f"ranking: unknown candidate id(s) {unknown}; this item's candidates are {sorted(idx_of)}")
    missing = sorted(set(idx_of) - set(data.ranking))
    if missing:
        raise Invalid(f"ranking: no rank for candidate(s) {missing}; every candidate needs a rank")
    ranks = [0] * len(idx_of)
    for cid, rank in data.ranking.items():
        ranks[idx_of[cid]] = rank
    try:
        check_ranks(ranks)
    except ValueError as e:
        raise Invalid(f"ranking: {e}") from None
    return ranks


def _judgment_fields(project: Project, idx_of: dict[int, int], data: JudgmentIn) -> dict[str, Any]:
    """The checked fields of a judgment as stored (submitted anew or edited); `idx_of`: the
    item's candidate id -> idx."""
    ranking, response = None, None
    if project.task == "demonstration":
        if data.ranking is not None:
            raise Invalid("ranking: a demonstration task takes a written response, not a ranking")
        if data.strength is not None:
            raise Invalid("strength: a demonstration task has no strength of preference")
        if not (data.response or "").strip() and not data.unusable:
            raise Invalid("response: write the ideal response (or flag the prompt as unusable)")
        response = data.response if (data.response or "").strip() else None
    else:
        ranking = _check_ranking(idx_of, data)
        if data.strength is not None and (data.unusable or len(set(ranking)) == 1):
            raise Invalid("strength: a tie or a flagged item prefers nothing, so it has no strength; leave it out")
    return {
        "ranking": ranking,
        "unusable": data.unusable,
        "comment": (data.comment or "").strip() or None,
        "response": response,
        "strength": data.strength,
    }


def _existing(s: Session, item_id: int, user: User, data: JudgmentIn) -> Judgment:
    """This labeler's stored judgment of the item, which `data` must repeat (a retry); another
    one is a conflict."""
    existing = s.scalars(select(Judgment).where(Judgment.item_id == item_id, Judgment.user_id == user.id)).one()
    if existing.client_token != data.client_token:
        raise Conflict("you have already submitted a judgment for this item")
    return existing


def _judgment_insert(s: Session) -> Any:
    """INSERT INTO judgments that does nothing when this labeler's judgment of the item exists.

    A retried or double-clicked submit running at the same moment as the first one waits for it
    here (PostgreSQL) and then inserts nothing, instead of failing on the unique constraint; the
    caller then returns the stored judgment. (SQLite: writers run one at a time anyway.)
    """
    dialect_insert = pg_insert if s.get_bind().dialect.name == "postgresql" else sqlite_insert
    return dialect_insert(Judgment.__table__).on_conflict_do_nothing(index_elements=["item_id", "user_id"])


def submit(s: Session, project: Project, user: User, item_id: int, data: JudgmentIn) -> tuple[Judgment, bool]:
    """Store a judgment; returns (judgment, created).

    Idempotent: a second submit with the same client_token returns the stored judgment
    (created=False), also when both arrive at once (see `_judgment_insert`). The judgment row goes
    in first, then the item's count goes up by a conditional UPDATE, so an item never exceeds N
    even when many labelers submit at once: when it is full, the whole transaction (the judgment
    row with it) is rolled back and the labeler told to take the next item.
    """
    a = _assigned_row(s, project, user, item_id)
    if a.judgment_id is not None:
        return _existing(s, item_id, user, data), False
    require_unlocked(project, "submitting")
    content = _judgment_fields(project, _candidate_indexes(s, item_id), data)
    now = utcnow()
    judgment = Judgment(
        item_id=item_id,
        user_id=user.id,
        **content,
        excluded=False,  # the INSERT below takes every column's value from this object
        client_token=data.client_token,
        seconds=round((now - a.created_at).total_seconds(), 3),
        created_at=now,
    )
    columns = {c.key: getattr(judgment, c.key) for c in Judgment.__table__.columns if c.key != "id"}
    judgment.id = s.execute(_judgment_insert(s).values(columns).returning(Judgment.__table__.c.id)).scalar()
    if judgment.id is None:  # a concurrent submit of this labeler's judgment got there first
        return _existing(s, item_id, user, data), False
    claimed = s.execute(
        update(Item.__table__)
        .where(and_(Item.id == item_id, Item.n_judgments < project.overlap))
        .values(n_judgments=Item.n_judgments + 1, complete=Item.n_judgments + 1 >= project.overlap)
    )
    if claimed.rowcount == 0:
        raise Conflict(f"this item already has its {project.overlap} judgments; please take the next one")
    # skipped=False: skipped, then judged after all (its page stays open)
    done = {"done": True, "skipped": False, "draft": None, "updated_at": now}
    s.execute(update(Assignment.__table__).where(Assignment.id == a.id).values(**done))
    return judgment, True


def judgment_view(j: Judgment) -> dict[str, Any]:
    return {
        "id": j.id,
        "item_id": j.item_id,
        "ranking": j.ranking,
        "unusable": j.unusable,
        "comment": j.comment,
        "response": j.response,
        "strength": j.strength,
        "excluded": j.excluded,
        "client_token": j.client_token,
        "created_at": iso(j.created_at),
        "edited_at": iso(j.edited_at),
    }


def iso(at: datetime | None) -> str | None:
    """A stored (naive UTC) time as the API writes it."""
    return at.isoformat() + "Z" if at else None


# ---------------------------------------------------------------- skip, edit, history (a labeler's own)


def skip(s: Session, project: Project, user: User, item_id: int) -> None:
    """Set an item aside: it is not offered to this labeler again (until they put it back with
    `unskip`), and its place is freed at once for someone else. Skipping twice is harmless."""
    a = _assignment_state(s, project, user, item_id)
    require_unlocked(project, "skipping")
    if a.skipped:
        return
    if a.done:
        raise Conflict("this item is already submitted; open it from your history to change your judgment")
    now = utcnow()
    s.execute(
        update(Assignment.__table__)
        .where(Assignment.id == a.id)
        .values(done=True, skipped=True, draft=None, leased_until=now, updated_at=now)
    )


def unskip(s: Session, project: Project, user: User, item_id: int) -> None:
    """Put a skipped item back: the dispatcher may hand it to this labeler again, in import order
    (if it still has a free place by then), as if they had never seen it."""
    a = _assignment_state(s, project, user, item_id)
    require_unlocked(project, "labeling")
    if not a.skipped:
        raise Conflict("this item is not among the ones you skipped")
    s.execute(Assignment.__table__.delete().where(Assignment.id == a.id))
    # The item is unseen again, maybe behind this labeler's cursor (see models.py): start it over.
    s.execute(
        update(Member.__table__).where(Member.project_id == project.id, Member.user_id == user.id).values(scan_from=0)
    )


def _assignment_state(s: Session, project: Project, user: User, item_id: int) -> Any:
    """(id, done, skipped) of this labeler's assignment of the item; NotFound as assignment_for."""
    row = s.execute(
        select(Assignment.id, Assignment.done, Assignment.skipped)
        .join(Item)
        .where(Assignment.item_id == item_id, Assignment.user_id == user.id, Item.project_id == project.id)
    ).first()
    if row is None:
        raise NotFound("no such item among those assigned to you (ask for the next item)")
    return row


def _archive(s: Session, j: Judgment, reason: str) -> None:
    """Keep the judgment as it is now in the history, before it is changed or removed."""
    s.add(
        JudgmentHistory(
            item_id=j.item_id,
            user_id=j.user_id,
            ranking=j.ranking,
            unusable=j.unusable,
            comment=j.comment,
            response=j.response,
            strength=j.strength,
            excluded=j.excluded,
            client_token=j.client_token,
            created_at=j.edited_at or j.created_at,
            reason=reason,
        )
    )


def own_judgment(s: Session, project: Project, user: User, item_id: int) -> Judgment:
    """This labeler's current judgment of the item, if they may still change it."""
    j = s.scalar(
        select(Judgment)
        .join(Item)
        .where(Judgment.item_id == item_id, Judgment.user_id == user.id, Item.project_id == project.id)
    )
    if j is None:
        sent_back = s.scalar(
            select(JudgmentHistory.id)
            .join(Item)
            .where(
                JudgmentHistory.item_id == item_id,
                JudgmentHistory.user_id == user.id,
                JudgmentHistory.reason == "sent_back",
                Item.project_id == project.id,
            )
            .limit(1)
        )
        if sent_back is not None:
            raise Conflict(
                "this item was sent back for relabeling: your judgment is kept in its history but can no "
                "longer be changed"
            )
        raise NotFound("you have no judgment of this item to change")
    require_unlocked(project, "changing a judgment")
    return j


def edit_judgment(s: Session, project: Project, user: User, item_id: int, data: JudgmentIn) -> tuple[Judgment, bool]:
    """Replace this labeler's judgment of the item; returns (judgment, changed). The version it
    replaces goes to the history (nothing submitted is lost); exports see only the current one.
    Idempotent like submit: the same client_token again returns the stored judgment unchanged."""
    j = own_judgment(s, project, user, item_id)
    if j.client_token == data.client_token:
        return j, False
    content = _judgment_fields(project, _candidate_indexes(s, item_id), data)
    _archive(s, j, "edited")
    for name, value in content.items():
        setattr(j, name, value)
    j.client_token, j.edited_at = data.client_token, utcnow()
    s.flush()
    return j, True


def editing_view(
    s: Session, project: Project, user: User, item_id: int, display_order: list[int]
) -> dict[str, Any] | None:
    """For the task page of an item this labeler already judged: their current judgment as the
    form's draft (ranks by candidate id), when and what they decided; None if there is none."""
    j = s.scalar(select(Judgment).where(Judgment.item_id == item_id, Judgment.user_id == user.id))
    if j is None:
        return None
    idx_of = _candidate_indexes(s, item_id)
    id_of = {idx: cid for cid, idx in idx_of.items()}
    ranks = {id_of[idx]: rank for idx, rank in enumerate(j.ranking)} if j.ranking and not j.unusable else {}
    decision = decision_text(project.task, j.ranking, _display_indexes(display_order, idx_of), j.strength)
    return {
        "draft": {
            "ranks": ranks,
            "unusable": j.unusable,
            "comment": j.comment or "",
            "response": j.response or "",
            "strength": j.strength,
        },
        "created_at": iso(j.created_at),
        "decision": "both bad / not rankable" if j.unusable else decision,
    }


def last_judgment(s: Session, project: Project, user: User) -> int | None:
    """The item this labeler judged (or re-judged) last: where "Undo" takes them."""
    return s.scalar(
        select(Judgment.item_id)
        .join(Item)
        .where(Item.project_id == project.id, Judgment.user_id == user.id)
        .order_by(func.coalesce(Judgment.edited_at, Judgment.created_at).desc(), Judgment.id.desc())
        .limit(1)
    )


def plain_snippet(value: Any, length: int = 140) -> str:
    """A one-line preview of a prompt or response (a conversation: its last message)."""
    if isinstance(value, list):
        value = value[-1].get("content", "") if value else ""
    line = " ".join(str(value or "").split())
    return line if len(line) <= length else line[: length - 1] + "…"


def decision_text(task: str, ranking: list[int] | None, order: Sequence[int], strength: int | None) -> str:
    """A judgment in the letters its labeler saw: "B › A = C (much better)". `order`: the
    candidates' import indexes in display order (A first)."""
    if ranking is None:
        return "written response"
    labels = {idx: chr(ord("A") + n) if n < 26 else str(n + 1) for n, idx in enumerate(order)}
    groups: dict[int, list[str]] = {}
    for idx in order:
        groups.setdefault(ranking[idx], []).append(labels[idx])
    text = "  ›  ".join(" = ".join(groups[r]) for r in sorted(groups))
    if len(groups) == 1:
        return "tie" if task == "pairwise" else text
    return f"{text} ({STRENGTHS[strength]})" if strength else text


def _display_indexes(display_order: list[int] | None, idx_of: dict[int, int]) -> list[int]:
    """The item's candidate indexes in the order a labeler saw them (import order if unknown);
    `idx_of`: candidate id -> idx."""
    if display_order is None or set(display_order) != set(idx_of):
        return sorted(idx_of.values())
    return [idx_of[cid] for cid in display_order]


HISTORY_PAGE = 20


def history(s: Session, project: Project, user: User, page: int = 1) -> dict[str, Any]:
    """A labeler's judgments in the project, newest first and paginated, and every item they set
    aside (skipped), to open, change or put back."""
    total = s.scalar(
        select(func.count())
        .select_from(Judgment)
        .join(Item)
        .where(Item.project_id == project.id, Judgment.user_id == user.id)
    )
    rows = s.execute(
        select(Judgment, Assignment)
        .join(Item, Item.id == Judgment.item_id)
        .outerjoin(Assignment, and_(Assignment.item_id == Judgment.item_id, Assignment.user_id == Judgment.user_id))
        .options(contains_eager(Judgment.item).selectinload(Item.candidates))
        .where(Item.project_id == project.id, Judgment.user_id == user.id)
        .order_by(Judgment.created_at.desc(), Judgment.id.desc())
        .offset((page - 1) * HISTORY_PAGE)
        .limit(HISTORY_PAGE)
    ).all()
    skipped = s.scalars(
        select(Assignment)
        .join(Item)
        .options(contains_eager(Assignment.item))
        .where(Item.project_id == project.id, Assignment.user_id == user.id, Assignment.skipped.is_(True))
        .order_by(Assignment.updated_at.desc(), Assignment.id.desc())
    ).all()
    return {
        "page": page,
        "pages": max(1, -(-(total or 0) // HISTORY_PAGE)),
        "total": total or 0,
        "judgments": [
            judgment_view(j)
            | {
                "prompt_id": j.item.key,
                "prompt": plain_snippet(j.item.prompt),
                "decision": decision_text(
                    project.task,
                    j.ranking,
                    _display_indexes(a.display_order if a else None, {c.id: c.idx for c in j.item.candidates}),
                    j.strength,
                )
                if not j.unusable
                else "flagged: not rankable / unusable",
            }
            for j, a in rows
        ],
        "skipped": [
            {
                "item_id": a.item_id,
                "prompt_id": a.item.key,
                "prompt": plain_snippet(a.item.prompt),
                "skipped_at": iso(a.updated_at),
            }
            for a in skipped
        ],
    }


# ---------------------------------------------------------------- admin review


def _count_judgments(s: Session, project: Project, item_ids: Any) -> None:
    """Set n_judgments of the items `item_ids` (a list or a subquery) to their current judgments
    that count (not excluded), and their complete flags with it: the dispatcher then offers any
    free places again. Reopened items may lie behind the labelers' cursors: those start over."""
    counted = (
        select(func.count())
        .where(Judgment.item_id == Item.id, Judgment.excluded.is_(False))
        .correlate(Item)
        .scalar_subquery()
    )
    s.execute(
        update(Item)
        .where(Item.project_id == project.id, Item.id.in_(item_ids))
        .values(n_judgments=counted, complete=counted >= project.overlap)
        .execution_options(synchronize_session=False)
    )
    s.execute(update(Member.__table__).where(Member.project_id == project.id).values(scan_from=0))
    s.expire_all()


def item_status(item: Item, overlap: int) -> str:
    """One of REVIEW_STATUSES: sent back (and not complete again), else by its judgments."""
    if item.n_judgments >= overlap:
        return "complete"
    if item.sent_back_at is not None:
        return "sent_back"
    return "partial" if item.n_judgments else "unlabeled"


def _status_filter(status: str, overlap: int) -> Any:
    return {
        "complete": Item.n_judgments >= overlap,
        "sent_back": and_(Item.n_judgments < overlap, Item.sent_back_at.is_not(None)),
        "partial": and_(Item.n_judgments > 0, Item.n_judgments < overlap, Item.sent_back_at.is_(None)),
        "unlabeled": and_(Item.n_judgments == 0, Item.sent_back_at.is_(None)),
    }[status]


def disagreements(s: Session, project: Project, item_ids: Sequence[int] | None = None) -> dict[int, float]:
    """Per item with two or more usable rankings that count: the share of (labeler pair x
    candidate pair) comparisons where the two labelers differ (better / tie / worse), i.e. one
    minus `labels.agreement`'s pairwise agreement. All the project's items, or `item_ids`'."""
    # Imported here: the agreement module pulls in scipy, which the server needs only for this.
    from rlhfkit.labels.agreement import pairwise_agreement

    query = (
        select(Judgment.item_id, Judgment.ranking)
        .join(Item)
        .where(
            Item.project_id == project.id,
            Judgment.excluded.is_(False),
            Judgment.unusable.is_(False),
            Judgment.ranking.is_not(None),
        )
    )
    if item_ids is not None:
        query = query.where(Judgment.item_id.in_(item_ids))
    groups: dict[int, list[list[int]]] = {}
    for item_id, ranking in s.execute(query):
        groups.setdefault(item_id, []).append(ranking)
    out = {}
    for item_id, rankings in groups.items():
        agree = pairwise_agreement([rankings])["with_ties"]
        if len(rankings) >= 2 and agree is not None:
            out[item_id] = round(1 - agree, 4)
    return out


REVIEW_PAGE = 25


def review_items(s: Session, project: Project, f: ReviewFilterIn) -> dict[str, Any]:
    """The project's items for an admin, in import order, filtered and paginated."""
    query = select(Item).where(Item.project_id == project.id)
    if f.status is not None:
        query = query.where(_status_filter(f.status, project.overlap))
    if f.has_comment is not None:
        commented = exists().where(Judgment.item_id == Item.id, Judgment.comment.is_not(None))
        query = query.where(commented if f.has_comment else ~commented)
    if f.labeler is not None:
        query = query.where(
            exists().where(Judgment.item_id == Item.id, Judgment.user_id == User.id, User.username == f.labeler)
        )
    query = query.order_by(Item.position)
    if f.min_disagreement is not None:  # a figure computed per item: filtered here, not in SQL
        figures = disagreements(s, project)
        ids = [i for i in s.scalars(query.with_only_columns(Item.id)) if figures.get(i, -1.0) >= f.min_disagreement]
        total, page_ids = len(ids), ids[(f.page - 1) * REVIEW_PAGE : f.page * REVIEW_PAGE]
        items = sorted(s.scalars(select(Item).where(Item.id.in_(page_ids))), key=lambda i: i.position)
    else:
        total = s.scalar(query.with_only_columns(func.count()).order_by(None)) or 0
        items = list(s.scalars(query.offset((f.page - 1) * REVIEW_PAGE).limit(REVIEW_PAGE)))
        figures = disagreements(s, project, [i.id for i in items])
    comments = dict(
        s.execute(
            select(Judgment.item_id, func.count())
            .where(Judgment.item_id.in_([i.id for i in items]), Judgment.comment.is_not(None))
            .group_by(Judgment.item_id)
        ).all()
    )
    return {
        "page": f.page,
        "pages": max(1, -(-total // REVIEW_PAGE)),
        "total": total,
        "items": [
            {
                "item_id": i.id,
                "prompt_id": i.key,
                "prompt": plain_snippet(i.prompt),
                "status": item_status(i, project.overlap),
                "n_judgments": i.n_judgments,
                "comments": comments.get(i.id, 0),
                "disagreement": figures.get(i.id),
            }
            for i in items
        ],
    }


def _project_item(s: Session, project: Project, item_id: int, lock: bool = False) -> Item:
    query = select(Item).options(selectinload(Item.candidates)).where(Item.id == item_id, Item.project_id == project.id)
    item = s.scalar(query.with_for_update() if lock else query)
    if item is None:
        raise NotFound(f"no item {item_id} in this project")
    return item


def review_item(s: Session, project: Project, item_id: int) -> dict[str, Any]:
    """One item for an admin: every labeler's current judgment side by side (candidates in
    import order, A first), the earlier versions, and the item's disagreement."""
    item = _project_item(s, project, item_id)
    current = s.execute(
        select(Judgment, User.username)
        .join(User, User.id == Judgment.user_id)
        .where(Judgment.item_id == item.id)
        .order_by(Judgment.created_at, Judgment.id)
    ).all()
    earlier = s.execute(
        select(JudgmentHistory, User.username)
        .join(User, User.id == JudgmentHistory.user_id)
        .where(JudgmentHistory.item_id == item.id)
        .order_by(JudgmentHistory.superseded_at.desc(), JudgmentHistory.id.desc())
    ).all()
    order = [c.idx for c in item.candidates]

    def row(j: Judgment | JudgmentHistory, username: str) -> dict[str, Any]:
        return {
            "username": username,
            "user_id": j.user_id,
            "ranking": j.ranking,
            "decision": decision_text(project.task, j.ranking, order, j.strength)
            if not j.unusable
            else "flagged: not rankable / unusable",
            "strength": j.strength,
            "unusable": j.unusable,
            "comment": j.comment,
            "response": j.response,
            "excluded": j.excluded,
        }

    return {
        "item_id": item.id,
        "prompt_id": item.key,
        "prompt": item.prompt,
        "status": item_status(item, project.overlap),
        "n_judgments": item.n_judgments,
        "overlap": project.overlap,
        "sent_back_at": iso(item.sent_back_at),
        "candidates": [
            {"idx": c.idx, "label": chr(ord("A") + n) if n < 26 else str(n + 1), "text": c.text}
            for n, c in enumerate(item.candidates)
        ],
        "disagreement": disagreements(s, project, [item.id]).get(item.id),
        "judgments": [
            row(j, name) | {"created_at": iso(j.created_at), "edited_at": iso(j.edited_at)} for j, name in current
        ],
        "history": [
            row(h, name) | {"created_at": iso(h.created_at), "superseded_at": iso(h.superseded_at), "reason": h.reason}
            for h, name in earlier
        ],
    }


def send_back(s: Session, project: Project, item_id: int) -> int:
    """Send an item back for relabeling; returns how many judgments were set aside. They move to
    the history (kept, out of exports), the labelers who finished or skipped it may be handed it
    again, and it counts from zero; anyone labeling it right now keeps their place."""
    require_unlocked(project, "sending items back")
    item = _project_item(s, project, item_id, lock=True)
    judgments = s.scalars(select(Judgment).where(Judgment.item_id == item.id)).all()
    for j in judgments:
        _archive(s, j, "sent_back")
        s.delete(j)
    s.execute(Assignment.__table__.delete().where(Assignment.item_id == item.id, Assignment.done.is_(True)))
    item.sent_back_at = utcnow()
    s.flush()
    _count_judgments(s, project, [item.id])
    return len(judgments)


def set_excluded(s: Session, project: Project, user_id: int, excluded: bool) -> int:
    """Leave a labeler's judgments in the project out of exports, agreement and progress (or
    take them back in); returns how many changed. Their items count their judgments anew, so
    the places freed are offered to others; taking them back in may leave an item with more
    than N judgments (all of them count). Judgments they submit later are not excluded: remove
    them from the project to stop new work."""
    if s.get(User, user_id) is None:
        raise NotFound(f"no user {user_id}")
    theirs = select(Judgment.item_id).join(Item).where(Item.project_id == project.id, Judgment.user_id == user_id)
    changed = s.execute(
        update(Judgment)
        .where(Judgment.item_id.in_(theirs), Judgment.user_id == user_id, Judgment.excluded.is_not(excluded))
        .values(excluded=excluded)
        .execution_options(synchronize_session=False)
    ).rowcount
    _count_judgments(s, project, theirs)
    return changed


# ---------------------------------------------------------------- progress


def remaining(s: Session, project: Project, user: User, batches: Sequence[str] | None = None) -> int:
    """How many items /next would still hand this labeler, one after the other, if nobody else
    labeled meanwhile: their unfinished items, then each item they have not seen (nor skipped)
    with a place free now (judgments + others' live leases < N). Exactly next_assignment's rule.
    With `batches`, only those batches' items count."""
    if project.locked:
        return 0
    now = utcnow()
    seen = exists().where(Assignment.item_id == Item.id, Assignment.user_id == user.id)
    unfinished = exists().where(
        Assignment.item_id == Item.id, Assignment.user_id == user.id, Assignment.done.is_(False)
    )
    return (
        s.scalar(
            select(func.count())
            .select_from(Item)
            .where(
                Item.project_id == project.id,
                _in_batches(batches),
                Item.n_judgments < project.overlap,
                unfinished | (~seen & (Item.n_judgments + _held(now) < project.overlap)),
            )
        )
        or 0
    )


def my_progress(s: Session, project: Project, user: User) -> dict[str, int]:
    """done: judged; skipped: set aside; to_go: what /next would still hand them (`remaining`);
    plus the project's totals."""
    done = s.scalar(
        select(func.count())
        .select_from(Judgment)
        .join(Item)
        .where(Item.project_id == project.id, Judgment.user_id == user.id)
    )
    return {
        "done": done or 0,
        "skipped": _skipped_counts(s, project).get(user.id, 0),
        "to_go": remaining(s, project, user),
        **project_totals(s, project),
    }


def _skipped_counts(s: Session, project: Project, batches: Sequence[str] | None = None) -> dict[int, int]:
    return dict(
        s.execute(
            select(Assignment.user_id, func.count())
            .join(Item)
            .where(Item.project_id == project.id, _in_batches(batches), Assignment.skipped.is_(True))
            .group_by(Assignment.user_id)
        ).all()
    )


def _totals(project: Project) -> tuple[Any, ...]:
    """Items, judgments that count, complete items: the columns of a progress count."""
    return (
        func.count(),
        func.coalesce(func.sum(Item.n_judgments), 0),
        func.coalesce(func.sum((Item.n_judgments >= project.overlap).cast(Item.n_judgments.type)), 0),
    )


def project_totals(s: Session, project: Project, batches: Sequence[str] | None = None) -> dict[str, int]:
    items, judgments, complete = s.execute(
        select(*_totals(project)).where(Item.project_id == project.id, _in_batches(batches))
    ).one()
    return {
        "items_total": items,
        "items_complete": complete,
        "judgments": judgments,
        "judgments_needed": items * project.overlap,
    }


def batch_progress(s: Session, project: Project, batches: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per batch, in import order (items imported without a batch: `"batch": None`):
    items, complete, judgments (that count) and judgments_needed (items x N)."""
    rows = s.execute(
        select(Item.batch, *_totals(project))
        .where(Item.project_id == project.id, _in_batches(batches))
        .group_by(Item.batch)
        .order_by(func.min(Item.position))
    )
    return [
        {
            "batch": batch,
            "items": items,
            "complete": complete,
            "judgments": judgments,
            "judgments_needed": items * project.overlap,
        }
        for batch, items, judgments, complete in rows
    ]


def progress(s: Session, project: Project, batches: Sequence[str] | None = None) -> dict[str, Any]:
    """Project totals and one row per labeler (members and anyone who ever judged here): submitted
    (judgments that count), excluded, skipped, open (leased now), and remaining (what /next would
    still hand them, see `remaining`); and one row per batch (`batch_progress`). With `batches`,
    every figure counts only those batches' items (404 for a batch with none: `check_batches`)."""
    check_batches(s, project, batches)
    now = utcnow()
    people: dict[int, dict[str, Any]] = {
        m.user_id: {
            "username": m.user.username,
            "user_id": m.user_id,
            "role": m.role,
            "submitted": 0,
            "unusable": 0,
            "excluded": 0,
            "open": 0,
            "skipped": 0,
            "remaining": remaining(s, project, m.user, batches),
            "seconds": [],
            "last": None,
        }
        for m in members(s, project)
    }
    rows = s.execute(
        select(User.id, User.username, Judgment.unusable, Judgment.seconds, Judgment.created_at, Judgment.excluded)
        .join(Judgment, Judgment.user_id == User.id)
        .join(Item, Item.id == Judgment.item_id)
        .where(Item.project_id == project.id, _in_batches(batches))
    )
    for uid, name, unusable, seconds, at, excluded in rows:
        p = people.setdefault(
            uid,
            {
                "username": name,
                "user_id": uid,
                "role": "former member",
                "submitted": 0,
                "unusable": 0,
                "excluded": 0,
                "open": 0,
                "skipped": 0,
                "remaining": 0,
                "seconds": [],
                "last": None,
            },
        )
        if excluded:  # kept, but out of the figures until taken back in
            p["excluded"] += 1
            continue
        p["submitted"] += 1
        p["unusable"] += unusable
        if seconds is not None:
            p["seconds"].append(seconds)
        p["last"] = max(p["last"] or at, at)
    open_rows = s.execute(
        select(Assignment.user_id, func.count())
        .join(Item)
        .where(
            Item.project_id == project.id,
            _in_batches(batches),
            Assignment.done.is_(False),
            Assignment.leased_until > now,
        )
        .group_by(Assignment.user_id)
    )
    for uid, n in open_rows:
        if uid in people:
            people[uid]["open"] = n
    for uid, n in _skipped_counts(s, project, batches).items():
        if uid in people:
            people[uid]["skipped"] = n
    labelers = []
    for p in sorted(people.values(), key=lambda p: p["username"]):
        secs = p.pop("seconds")
        p["median_seconds"] = round(statistics.median(secs), 1) if secs else None
        p["last"] = p["last"].isoformat() + "Z" if p["last"] else None
        labelers.append(p)
    return {
        **project_totals(s, project, batches),
        "overlap": project.overlap,
        "labelers": labelers,
        "batches": batch_progress(s, project, batches),
    }


# ---------------------------------------------------------------- exports


def completions_of(s: Session, project: Project, batches: Sequence[str] | None = None) -> list[Completions]:
    items = s.scalars(
        select(Item).where(Item.project_id == project.id, _in_batches(batches)).order_by(Item.position)
    ).all()
    return [
        Completions(prompt_id=i.key, prompt=i.prompt, completions=[c.text for c in i.candidates])
        for i in items
        if len(i.candidates) >= 2
    ]


def rankings_of(s: Session, project: Project, batches: Sequence[str] | None = None) -> list[Ranking]:
    """Every judgment that counts (current, not excluded) of a ranking/pairwise project, of these
    batches' items where given, as a `rankings` record (the raw export)."""
    rows = s.execute(
        select(Judgment, Item.key, User.username)
        .join(Item, Item.id == Judgment.item_id)
        .join(User, User.id == Judgment.user_id)
        .where(
            Item.project_id == project.id,
            _in_batches(batches),
            Judgment.ranking.is_not(None),
            Judgment.excluded.is_(False),
        )
        .order_by(Item.position, Judgment.id)
    )
    return [
        Ranking(
            prompt_id=key,
            labeler=name,
            ranking=j.ranking,
            unusable=j.unusable,
            comment=j.comment,
            strength=j.strength,  # type: ignore[arg-type]  # 1-3, checked on the way in
        )
        for j, key, name in rows
    ]


def demonstrations_of(s: Session, project: Project, batches: Sequence[str] | None = None) -> list[Demonstration]:
    rows = s.execute(
        select(Item.prompt, Judgment.response)
        .join(Judgment, Judgment.item_id == Item.id)
        .where(
            Item.project_id == project.id,
            _in_batches(batches),
            Judgment.response.is_not(None),
            Judgment.excluded.is_(False),
        )
        .order_by(Item.position, Judgment.id)
    )
    return [Demonstration(prompt=prompt, response=response) for prompt, response in rows]


EXPORTS = {
    "judgments": "raw rankings, one per labeler and item: ranks, ties, flags and comments exactly",
    "pairs": "TRL preference pairs from the per-item consensus, preferred first (?margin=true adds margins)",
    "labeler_pairs": "TRL preference pairs from each labeler's own ranking (?margin=true: their stated strength)",
    "consensus": "the per-item consensus ranking (Bradley-Terry over all labelers)",
    "kto": "KTO-style {prompt, completion, label} from the consensus",
    "demonstrations": "written demonstrations {prompt, response} for SFT",
    "completions": "the items themselves (completions format), to pair with the raw judgments",
}


def jsonl_line(row: dict[str, Any]) -> str:
    """One line of a JSONL export, non-ASCII text as is; but escaped (\\ud800) where the row holds
    text that is not valid Unicode (stored before imports refused it), which keeps it exactly and
    the export going instead of breaking off at that row."""
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(row)
    return line + "\n"


def export(
    s: Session, project: Project, kind: str, margin: bool = False, batches: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """JSON-ready records of one export kind (see EXPORTS), of these batches' items where given.
    The records do not name their batch: every format is strict about its fields (TRL's too)."""
    if kind not in EXPORTS:
        raise NotFound(f"no export {kind!r}; one of: {', '.join(EXPORTS)}")
    check_batches(s, project, batches)
    if kind == "demonstrations":
        return [d.to_json() for d in demonstrations_of(s, project, batches)]
    if kind == "completions":
        return [c.to_json() for c in completions_of(s, project, batches)]
    rankings = rankings_of(s, project, batches)
    if kind == "judgments":
        return [r.to_json() for r in rankings]
    completions = completions_of(s, project, batches)
    if kind == "labeler_pairs":
        return [p.to_json() for p in rankings_to_pairs(rankings, completions, margin=margin)]
    cons = consensus.consensus(rankings)
    if kind == "consensus":
        return consensus.consensus_rows(cons)
    if kind == "pairs":
        return [p.to_json() for p in consensus.consensus_pairs(cons, completions, margin=margin)]
    return consensus.kto_records(cons, completions)


# ---------------------------------------------------------------- many users at once, own password


@dataclass
class UserLine:
    """One line of a users file: `username,role,project[,password]`."""

    line: int
    username: str
    role: str
    project: str
    password: str | None


@dataclass
class UsersAdded:
    users: int
    memberships: int
    passwords: dict[str, str]  # generated ones only: username -> password, to be shown once


def parse_users_csv(text: str) -> tuple[list[UserLine], list[tuple[int, str]]]:
    """(good lines, (line number, problem) for the bad ones) of `username,role,project[,password]`
    lines. A header line, blank lines and #comments are skipped; role defaults to labeler; an
    empty project adds the user to none."""
    lines, errors = [], []
    reader = csv.reader(io.StringIO(text))
    for row in reader:
        cells, n = [c.strip() for c in row], reader.line_num
        if not any(cells) or cells[0].startswith("#") or (n == 1 and cells[0].lower() == "username"):
            continue
        if not 3 <= len(cells) <= 4:
            errors.append((n, f"expected username,role,project[,password]; got {len(cells)} fields"))
            continue
        username, role, project = cells[0], cells[1] or DEFAULT_ROLE, cells[2]
        try:
            MemberIn(username=username, role=role)  # type: ignore[arg-type]
        except ValidationError as e:
            errors.append((n, problems_text(e)))
            continue
        lines.append(UserLine(n, username, role, project, cells[3] if len(cells) == 4 and cells[3] else None))
    return lines, errors


def add_users(s: Session, text: str, source: str) -> UsersAdded:
    """Create the users of a users file and their memberships, all or nothing. Every bad line is
    reported, at once and in order (a file is fixed in one go, not one error per run). A user may
    appear on several lines, one per project; those without a password get a generated one.
    Passwords go through set_password, the one place that decides what a good password is."""
    lines, errors = parse_users_csv(text)
    users: dict[str, User] = {}
    generated: dict[str, str] = {}
    for line in lines:
        try:
            user = users.get(line.username)
            if user is None:
                user = users[line.username] = create_user(s, UserIn(username=line.username))
                password = line.password
                if password is None:
                    password = generated[line.username] = secrets.token_urlsafe(12)
                set_password(s, user, password)
            elif line.password is not None:
                raise Invalid(f"a password for {line.username!r} was given on an earlier line")
            if line.project:
                set_member(s, find_project(s, line.project), MemberIn(username=line.username, role=line.role))
        except Conflict as e:  # the user exists already
            errors.append((line.line, f"{e.message} (`add-member` adds an existing user to a project)"))
        except ServiceError as e:
            errors.append((line.line, e.message))
    if errors:
        raise Invalid("\n".join(f"{source}:{n}: {message}" for n, message in sorted(errors)))
    if not lines:
        raise Invalid(f"{source}: no users (expected lines of username,role,project[,password])")
    return UsersAdded(len(users), sum(bool(line.project) for line in lines), generated)
