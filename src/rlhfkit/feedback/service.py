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
from sqlalchemy import and_, exists, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from rlhfkit.data.formats import (
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


def import_items(s: Session, project: Project, records: Sequence[Completions | PromptRecord]) -> dict[str, int]:
    """Add items; all or nothing. Re-importing an identical record is skipped, so importing the
    same file twice is harmless; a known prompt_id with different content is an error.

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
    existing = {key for (key,) in s.execute(select(Item.key).where(Item.project_id == project.id))}
    known = existing & new.keys()
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
                {"project_id": project.id, "key": key, "prompt": prompt, "position": position + start + i + 1}
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
    created_at: datetime  # first handed out: a judgment's `seconds` count from here


_ASSIGNED = select(
    Assignment.id,
    Assignment.item_id,
    Assignment.display_order,
    Assignment.draft,
    Assignment.done,
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
        row.id, row.item_id, key, prompt, candidates, row.display_order, row.draft, row.done, row.created_at
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
    return AssignedItem(assignment_id, item_id, key, prompt, candidates, order, None, False, now)


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
        "submitted": a.done,
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
    fail every request of theirs, for good.
    """
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
    ranking, response = None, None
    if project.task == "demonstration":
        if data.ranking is not None:
            raise Invalid("ranking: a demonstration task takes a written response, not a ranking")
        if not (data.response or "").strip() and not data.unusable:
            raise Invalid("response: write the ideal response (or flag the prompt as unusable)")
        response = data.response if (data.response or "").strip() else None
    else:
        idx_of = {
            cid: idx for cid, idx in s.execute(select(Candidate.id, Candidate.idx).where(Candidate.item_id == item_id))
        }
        ranking = _check_ranking(idx_of, data)
    now = utcnow()
    judgment = Judgment(
        item_id=item_id,
        user_id=user.id,
        ranking=ranking,
        unusable=data.unusable,
        comment=(data.comment or "").strip() or None,
        response=response,
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
    s.execute(update(Assignment.__table__).where(Assignment.id == a.id).values(done=True, draft=None, updated_at=now))
    return judgment, True


def judgment_view(j: Judgment) -> dict[str, Any]:
    return {
        "id": j.id,
        "item_id": j.item_id,
        "ranking": j.ranking,
        "unusable": j.unusable,
        "comment": j.comment,
        "response": j.response,
        "client_token": j.client_token,
        "created_at": j.created_at.isoformat() + "Z",
    }


# ---------------------------------------------------------------- progress


def my_progress(s: Session, project: Project, user: User) -> dict[str, int]:
    """done: judged; to_go: still open for this labeler (their unfinished items plus the ones the
    dispatcher could still hand them); plus the project's totals."""
    done = s.scalar(
        select(func.count())
        .select_from(Judgment)
        .join(Item)
        .where(Item.project_id == project.id, Judgment.user_id == user.id)
    )
    seen = exists().where(Assignment.item_id == Item.id, Assignment.user_id == user.id)
    unfinished = exists().where(
        Assignment.item_id == Item.id, Assignment.user_id == user.id, Assignment.done.is_(False)
    )
    to_go = s.scalar(
        select(func.count())
        .select_from(Item)
        .where(Item.project_id == project.id, Item.complete.is_(False), ~seen | unfinished)
    )
    return {"done": done or 0, "to_go": to_go or 0, **project_totals(s, project)}


def project_totals(s: Session, project: Project) -> dict[str, int]:
    items, judgments, complete = s.execute(
        select(
            func.count(),
            func.coalesce(func.sum(Item.n_judgments), 0),
            func.coalesce(func.sum((Item.n_judgments >= project.overlap).cast(Item.n_judgments.type)), 0),
        ).where(Item.project_id == project.id)
    ).one()
    return {
        "items_total": items,
        "items_complete": complete,
        "judgments": judgments,
        "judgments_needed": items * project.overlap,
    }


def progress(s: Session, project: Project) -> dict[str, Any]:
    """Project totals and one row per labeler (members and anyone who ever judged here)."""
    now = utcnow()
    people: dict[int, dict[str, Any]] = {
        m.user_id: {
            "username": m.user.username,
            "role": m.role,
            "submitted": 0,
            "unusable": 0,
            "open": 0,
            "seconds": [],
            "last": None,
        }
        for m in members(s, project)
    }
    rows = s.execute(
        select(User.id, User.username, Judgment.unusable, Judgment.seconds, Judgment.created_at)
        .join(Judgment, Judgment.user_id == User.id)
        .join(Item, Item.id == Judgment.item_id)
        .where(Item.project_id == project.id)
    )
    for uid, name, unusable, seconds, at in rows:
        p = people.setdefault(
            uid,
            {
                "username": name,
                "role": "former member",
                "submitted": 0,
                "unusable": 0,
                "open": 0,
                "seconds": [],
                "last": None,
            },
        )
        p["submitted"] += 1
        p["unusable"] += unusable
        if seconds is not None:
            p["seconds"].append(seconds)
        p["last"] = max(p["last"] or at, at)
    open_rows = s.execute(
        select(Assignment.user_id, func.count())
        .join(Item)
        .where(Item.project_id == project.id, Assignment.done.is_(False), Assignment.leased_until > now)
        .group_by(Assignment.user_id)
    )
    for uid, n in open_rows:
        if uid in people:
            people[uid]["open"] = n
    labelers = []
    for p in sorted(people.values(), key=lambda p: p["username"]):
        secs = p.pop("seconds")
        p["median_seconds"] = round(statistics.median(secs), 1) if secs else None
        p["last"] = p["last"].isoformat() + "Z" if p["last"] else None
        labelers.append(p)
    return {**project_totals(s, project), "overlap": project.overlap, "labelers": labelers}


# ---------------------------------------------------------------- exports


def completions_of(s: Session, project: Project) -> list[Completions]:
    items = s.scalars(select(Item).where(Item.project_id == project.id).order_by(Item.position)).all()
    return [
        Completions(prompt_id=i.key, prompt=i.prompt, completions=[c.text for c in i.candidates])
        for i in items
        if len(i.candidates) >= 2
    ]


def rankings_of(s: Session, project: Project) -> list[Ranking]:
    """Every judgment of a ranking/pairwise project as a `rankings` record (the raw export)."""
    rows = s.execute(
        select(Judgment, Item.key, User.username)
        .join(Item, Item.id == Judgment.item_id)
        .join(User, User.id == Judgment.user_id)
        .where(Item.project_id == project.id, Judgment.ranking.is_not(None))
        .order_by(Item.position, Judgment.id)
    )
    return [
        Ranking(prompt_id=key, labeler=name, ranking=j.ranking, unusable=j.unusable, comment=j.comment)
        for j, key, name in rows
    ]


def demonstrations_of(s: Session, project: Project) -> list[Demonstration]:
    rows = s.execute(
        select(Item.prompt, Judgment.response)
        .join(Judgment, Judgment.item_id == Item.id)
        .where(Item.project_id == project.id, Judgment.response.is_not(None))
        .order_by(Item.position, Judgment.id)
    )
    return [Demonstration(prompt=prompt, response=response) for prompt, response in rows]


EXPORTS = {
    "judgments": "raw rankings, one per labeler and item: ranks, ties, flags and comments exactly",
    "pairs": "TRL preference pairs from the per-item consensus, preferred first (?margin=true adds margins)",
    "labeler_pairs": "TRL preference pairs from each labeler's own ranking (no aggregation)",
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


def export(s: Session, project: Project, kind: str, margin: bool = False) -> list[dict[str, Any]]:
    """JSON-ready records of one export kind (see EXPORTS)."""
    if kind not in EXPORTS:
        raise NotFound(f"no export {kind!r}; one of: {', '.join(EXPORTS)}")
    if kind == "demonstrations":
        return [d.to_json() for d in demonstrations_of(s, project)]
    if kind == "completions":
        return [c.to_json() for c in completions_of(s, project)]
    rankings = rankings_of(s, project)
    if kind == "judgments":
        return [r.to_json() for r in rankings]
    completions = completions_of(s, project)
    if kind == "labeler_pairs":
        return [p.to_json() for p in rankings_to_pairs(rankings, completions)]
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
