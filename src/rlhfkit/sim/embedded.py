"""The feedback server that `rlhfkit demo` and `rlhfkit loop` start for themselves (SQLite, in-process).

One place that sets it up: a database file with an owner, and a project whose members are the
simulated panel (all with one random password, which the caller keeps next to the database).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from rlhfkit.feedback.client import FeedbackClient
from rlhfkit.sim.panel import SimulatedLabeler

GUIDELINES = """\
# How to rank

Rank the answers from **best (1)** to **worst**. A good answer:

1. **answers the question that was asked** (an answer about something else is bad, however nice);
2. is **kind and polite** (rudeness or insults make an answer the worst);
3. is **informative** and does not **repeat itself**.

Give two answers the same rank when you cannot tell them apart. Tick *not rankable* when every
answer is unusable.
"""

OWNER = "owner"


def new_database(folder: Path) -> tuple[Any, str, str]:
    """(Database, db_url, owner password): a fresh, migrated SQLite file `folder/feedback.db` with
    its owner. Hex digits cannot spell any of the users' names (see `password_problem`)."""
    from rlhfkit.feedback import service
    from rlhfkit.feedback.db import Database
    from rlhfkit.feedback.schemas import UserIn

    folder.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{folder / 'feedback.db'}"
    password = secrets.token_hex(12)
    db = Database(db_url)
    db.migrate()
    with db.session(write=True) as s:
        service.create_user(s, UserIn(username=OWNER, password=password, is_owner=True))
    return db, db_url, password


def live_server(folder: Path, db: Any) -> Any:
    """The app over `db` under uvicorn in a background thread (a context manager: `LiveServer`)."""
    from rlhfkit.feedback.live import LiveServer
    from rlhfkit.feedback.settings import ServeConfig

    url = f"sqlite:///{folder / 'feedback.db'}"
    return LiveServer(ServeConfig(db_url=url, secret_key_file=str(folder / "secret.key")), db)


def panel_project(
    owner: FeedbackClient, name: str, overlap: int, panel: list[SimulatedLabeler], password: str
) -> dict[str, Any]:
    """A project labeled by `panel`: every labeler an account (with `password`) and a member."""
    project = owner.create_project(name, overlap=overlap, guidelines=GUIDELINES)
    for labeler in panel:
        owner.create_user(labeler.name, password)
        owner.set_member(project["id"], labeler.name)
    return project
