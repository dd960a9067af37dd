"""What keeps the labeling server fast (issue 12), as behaviour on SQLite and PostgreSQL: `/next`
does not re-read the items a project has finished, the migration that made that possible keeps
every row of a populated database, a submit repeated at the same moment stores one judgment, and
`serve workers=N` killed mid-submit answers the retried submits with the stored judgment."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from feedback_helpers import seed
from sqlalchemy import func, inspect, select, text

from rlhfkit.feedback import service
from rlhfkit.feedback.app import ServeConfig
from rlhfkit.feedback.client import FeedbackClient
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.models import Base, Item, Judgment, Member, Project
from rlhfkit.feedback.schemas import JudgmentIn, ProjectSettingsIn

LEASE = timedelta(minutes=60)
TABLES = ("users", "api_keys", "projects", "members", "items", "candidates", "assignments", "judgments")
# PostgreSQL's own count of the rows this transaction read from `items` and its indexes so far.
PG_ITEM_ROWS = """
SELECT CAST(sum(pg_stat_get_xact_tuples_returned(oid) + pg_stat_get_xact_tuples_fetched(oid)) AS integer) FROM pg_class
WHERE oid = 'items'::regclass OR oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = 'items'::regclass)
"""


def _next(db: Database, pid: int, name: str) -> dict[str, Any] | None:
    return db.transact(lambda s: service.next_view(s, s.get(Project, pid), service.get_user(s, name), LEASE))


def _judge(db: Database, pid: int, name: str, item: dict[str, Any], token: str | None = None) -> tuple[dict, bool]:
    data = JudgmentIn(
        ranking={c["id"]: 1 for c in item["candidates"]}, client_token=token or f"token-{name}-{item['item_id']}"
    )

    def work(s):  # type: ignore[no-untyped-def]
        judgment, created = service.submit(s, s.get(Project, pid), service.get_user(s, name), item["item_id"], data)
        return service.judgment_view(judgment), created

    return db.transact(work)


def _work_of_next(db: Database, pid: int, name: str) -> tuple[dict[str, Any] | None, int]:
    """(the labeler's next item, the work the database did to find it): SQLite's count of virtual
    machine instructions, PostgreSQL's count of item rows read. Both grow with every row scanned."""

    def work(s):  # type: ignore[no-untyped-def]
        project, user = s.get(Project, pid), service.get_user(s, name)
        if db.is_sqlite:
            steps = [0]

            def count() -> int:
                steps[0] += 1
                return 0  # go on

            raw = s.connection().connection.dbapi_connection
            raw.set_progress_handler(count, 1)
            try:
                view = service.next_view(s, project, user, LEASE)
            finally:
                raw.set_progress_handler(None, 1)
            return view, steps[0]
        # As on tables too big to read whole: at 200 rows a sequential scan is cheaper than any
        # index, and would count every row. (A fresh connection: psycopg prepares statements
        # after a few runs, and a prepared plan would ignore this setting.)
        s.execute(text("SET LOCAL enable_seqscan = off"))
        before = s.scalar(text(PG_ITEM_ROWS))
        view = service.next_view(s, project, user, LEASE)
        return view, s.scalar(text(PG_ITEM_ROWS)) - before

    probe = Database(db.url)
    try:
        if not db.is_sqlite:
            with probe.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM ANALYZE"))  # what autovacuum does meanwhile on a live server
        return probe.transact(work)
    finally:
        probe.dispose()


def test_next_does_not_reread_what_is_done_as_the_project_fills(db: Database) -> None:
    """`/next` costs the same with 3 items behind as with 154: neither the complete items nor the
    ones a labeler judged and others have not yet are read again (ann), and a labeler who comes
    back later does not read the items completed meanwhile (alice)."""
    world = seed(db, items=200, overlap=2)
    pid = world.project_a

    def label(ann: int, bob: int) -> None:
        for name, n in (("ann", ann), ("bob", bob)):
            for _ in range(n):
                _judge(db, pid, name, _next(db, pid, name))

    label(ann=3, bob=2)  # p0, p1 complete; p2 judged by ann only
    early = {}
    for name, expected in (("ann", "p3"), ("alice", "p2")):
        item, early[name] = _work_of_next(db, pid, name)
        assert item is not None and item["prompt_id"] == expected
        _judge(db, pid, name, item)
    label(ann=150, bob=60)  # p0-p62 complete; p63-p153 judged by ann only: more than a dispatcher's page
    for name, expected in (("ann", "p154"), ("alice", "p63")):
        item, late = _work_of_next(db, pid, name)
        assert item is not None and item["prompt_id"] == expected
        assert late <= early[name] * 1.25, (name, early[name], late)


def _rows(db: Database) -> dict[str, int]:
    with db.engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}


def test_the_dispatch_migration_keeps_every_row_both_ways(db: Database) -> None:
    """0002 on a database with data in the 0001 schema: every row kept, the new columns filled from
    the data (an item with its N judgments is complete; cursors start at 0), the dispatcher right
    at once; and back to 0001 without losing a row."""
    world = seed(db, items=4, overlap=2)
    pid = world.project_a
    first = _next(db, pid, "ann")
    assert first is not None and _next(db, pid, "bob")["item_id"] == first["item_id"]
    _judge(db, pid, "ann", first)
    _judge(db, pid, "bob", first)  # p0 complete
    _judge(db, pid, "ann", _next(db, pid, "ann"))  # p1 judged by ann only
    held = _next(db, pid, "bob")  # bob holds p1 open
    rows = _rows(db)

    db.downgrade("0001")
    assert _rows(db) == rows
    with db.engine.connect() as conn:
        assert "complete" not in {c["name"] for c in inspect(conn).get_columns("items")}
        assert "scan_from" not in {c["name"] for c in inspect(conn).get_columns("members")}

    db.migrate()
    assert _rows(db) == rows
    with db.session() as s:
        assert dict(s.execute(select(Item.key, Item.complete).where(Item.project_id == pid)).all()) == {
            "p0": True,
            "p1": False,
            "p2": False,
            "p3": False,
        }
        assert set(s.scalars(select(Member.scan_from))) == {0}
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    assert _next(db, pid, "bob")["item_id"] == held["item_id"]  # his unfinished item first, as before
    assert _next(db, pid, "ann")["prompt_id"] == "p2"  # p0 and p1 done by her


def test_raising_the_overlap_reopens_items_the_cursors_had_passed(db: Database) -> None:
    world = seed(db, items=3, overlap=1)
    pid = world.project_a
    for name in ("ann", "ann", "bob"):  # ann: p0, p1; bob: p2 (his cursor passes p0 and p1)
        _judge(db, pid, name, _next(db, pid, name))
    assert _next(db, pid, "bob") is None
    with db.session(write=True) as s:
        service.update_project(s, s.get(Project, pid), ProjectSettingsIn(overlap=2))
    assert _next(db, pid, "bob")["prompt_id"] == "p0"
    assert _next(db, pid, "ann")["prompt_id"] == "p2"


def test_the_same_submit_many_times_at_once_stores_one_judgment(db: Database) -> None:
    """A double click or a client's retries, all at the same moment: one judgment is stored and
    every answer is that judgment (one 201, the others 200), never an error."""
    world = seed(db, items=1, overlap=2)
    pid = world.project_a
    item = _next(db, pid, "ann")
    start = threading.Barrier(8)

    def send(_: int) -> tuple[dict, bool]:
        start.wait()
        return _judge(db, pid, "ann", item, token="the-same-token")

    for _ in range(3):
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(send, range(8)))
        assert len({view["id"] for view, _ in answers}) == 1
        with db.session() as s:
            assert s.scalar(select(func.count()).select_from(Judgment)) == 1
            assert s.scalar(select(Item.n_judgments).where(Item.id == item["item_id"])) == 1
    assert sum(created for _, created in answers) == 0  # the later rounds find it stored


@contextmanager
def _serve(config: ServeConfig, port: int) -> Iterator[str]:
    """`rlhfkit serve workers=2` in a process group of its own, killed with SIGKILL at the end."""
    settings = [f"db_url={config.db_url}", f"port={port}", f"secret_key_file={config.secret_key_file}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhfkit.cli", "serve", *settings, "workers=2", "log_level=error"],
        env=os.environ | {"PYTHONPATH": str(Path(service.__file__).parents[2])},
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/login", timeout=1).status_code == 200:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: uvicorn's supervisor and its workers
        proc.wait()


def test_a_submit_cut_off_by_a_killed_server_is_answered_once_after_the_restart(config: ServeConfig) -> None:
    """kill -9 of `serve workers=2` while submits are in flight; after the restart the labelers
    send them again: each answer is the one stored judgment (201, or 200 if the first got in),
    never an error."""
    db = Database(config.db_url)
    db.migrate()
    world = seed(db, items=6, overlap=2)
    pid, names = world.project_a, ("ann", "bob", "alice")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def send(url: str, name: str, work: tuple[int, dict[int, int], str]) -> dict[str, Any]:
        with FeedbackClient(url, api_key=world.keys[name]) as client:
            return client.submit(pid, work[0], work[1], client_token=work[2])

    for round_, delay in enumerate((0.0, 0.02, 0.5)):  # from cut off on the way to answered
        work = {}
        with _serve(config, port) as url:
            for name in names:
                with FeedbackClient(url, api_key=world.keys[name]) as client:
                    item = client.next_item(pid)
                ranking = {c["id"]: 1 for c in item["candidates"]}
                work[name] = (item["item_id"], ranking, f"round{round_}-{name}-token")
            pool = ThreadPoolExecutor(len(names))
            cut_off = {name: pool.submit(send, url, name, work[name]) for name in names}
            time.sleep(delay)
        first = {}
        for name, future in cut_off.items():
            with contextlib.suppress(httpx.TransportError):  # no answer; an error answer would raise
                first[name] = future.result()["id"]
        pool.shutdown()
        with _serve(config, port) as url:
            for name in names:
                again = send(url, name, work[name])
                assert again["id"] == first.get(name, again["id"])
                assert not (name in first and again["created"])  # answered before: this is the retry
    with db.session() as s:
        pairs = s.execute(select(Judgment.item_id, Judgment.user_id)).all()
        assert len(pairs) == len(set(pairs)) == 3 * len(names)
        assert s.scalar(select(func.sum(Item.n_judgments))) == len(pairs)
    db.dispose()
