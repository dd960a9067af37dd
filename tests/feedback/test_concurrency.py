"""Many labelers at once, over real HTTP against a real uvicorn, on SQLite and PostgreSQL:
every accepted submission is stored exactly once and no item takes more than N."""

from __future__ import annotations

import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from feedback_helpers import completions_jsonl
from sqlalchemy import func, select

from rlhfkit.feedback import service
from rlhfkit.feedback.client import FeedbackClient, FeedbackError
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.live import LiveServer
from rlhfkit.feedback.models import Assignment, Item, Judgment
from rlhfkit.feedback.schemas import MemberIn, ProjectIn, UserIn
from rlhfkit.feedback.settings import ServeConfig

LABELERS, ITEMS, OVERLAP = 20, 15, 3


def _setup(db: Database, labelers: int, items: int, overlap: int) -> tuple[int, list[str]]:
    """A project and `labelers` script users (API keys, so no password hashing slows the test)."""
    with db.session(write=True) as s:
        project = service.create_project(s, ProjectIn(name="load", overlap=overlap))
        service.import_items(s, project, service.parse_upload("c.jsonl", completions_jsonl(items).encode(), "ranking"))
        keys = []
        for i in range(labelers):
            user = service.create_user(s, UserIn(username=f"lab{i}"))
            service.set_member(s, project, MemberIn(username=f"lab{i}"))
            keys.append(service.create_api_key(s, user, "load"))
        return project.id, keys


def test_many_labelers_submitting_at_once(config: ServeConfig) -> None:
    db = Database(config.db_url)
    db.migrate()
    pid, keys = _setup(db, LABELERS, ITEMS, OVERLAP)
    accepted: list[tuple[int, int]] = []  # (judgment id, item id) of every 201
    lock = threading.Lock()
    errors: list[str] = []

    def labeler(n: int, key: str) -> None:
        rng = random.Random(n)
        with FeedbackClient(server.url, api_key=key) as client:
            while (item := client.next_item(pid)) is not None:
                ranking = {c["id"]: rng.randint(1, 2) for c in item["candidates"]}
                if set(ranking.values()) == {2}:
                    ranking = dict.fromkeys(ranking, 1)
                token = f"labeler{n}-item{item['item_id']}"
                if n % 2:  # a double click: the same submit twice at the same moment
                    send = partial(client.submit, pid, item["item_id"], ranking, client_token=token)
                    with ThreadPoolExecutor(2) as pair:
                        first, second = (f.result() for f in [pair.submit(send), pair.submit(send)])
                else:
                    first = client.submit(pid, item["item_id"], ranking, client_token=token)
                    second = client.submit(pid, item["item_id"], ranking, client_token=token)  # a retry
                if first["id"] != second["id"] or first["created"] == second["created"]:
                    errors.append(f"lab{n}: {first} vs {second}")
                with lock:
                    accepted.append((first["id"] if first["created"] else second["id"], item["item_id"]))

    with LiveServer(config, db) as server, ThreadPoolExecutor(LABELERS) as pool:
        list(pool.map(labeler, range(LABELERS), keys))
    assert not errors, errors
    with db.session() as s:
        stored = s.execute(select(Judgment.id, Judgment.item_id, Judgment.user_id)).all()
        counts = dict(s.execute(select(Item.id, Item.n_judgments)).all())
        open_assignments = s.scalar(select(func.count()).select_from(Assignment).where(Assignment.done.is_(False)))
    assert sorted(accepted) == sorted((j, i) for j, i, _ in stored)  # every 201 is stored, once
    assert len({(i, u) for _, i, u in stored}) == len(stored)
    per_item = Counter(i for _, i, _ in stored)
    assert per_item == Counter(counts) and set(per_item.values()) == {OVERLAP}  # all complete, none over
    assert len(per_item) == ITEMS and open_assignments == 0
    db.dispose()


def test_an_item_never_takes_more_than_n(config: ServeConfig) -> None:
    """Eight labelers hold the same item (as after expired leases were handed on) and submit at
    the same instant: exactly N=2 are accepted, the others are told the item is complete."""
    db = Database(config.db_url)
    db.migrate()
    pid, keys = _setup(db, 8, 1, 2)
    with db.session(write=True) as s:
        item = s.scalar(select(Item))
        for user_id in range(1, 9):
            s.add(
                Assignment(
                    item_id=item.id,
                    user_id=user_id,
                    display_order=[c.id for c in item.candidates],
                    leased_until=service.utcnow(),
                )
            )
        item_id, candidates = item.id, [c.id for c in item.candidates]
    barrier = threading.Barrier(len(keys))

    def submit(key: str) -> int:
        with FeedbackClient(server.url, api_key=key) as client:
            client.me()  # connect first, so the submits really do arrive together
            barrier.wait()
            try:
                return 201 if client.submit(pid, item_id, dict.fromkeys(candidates, 1))["created"] else 200
            except FeedbackError as e:
                assert "already has its 2 judgments" in e.message
                return e.status

    with LiveServer(config, db) as server, ThreadPoolExecutor(len(keys)) as pool:
        statuses = Counter(pool.map(submit, keys))
    assert statuses == {201: 2, 409: 6}
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Judgment)) == 2
        assert s.scalar(select(Item.n_judgments)) == 2
    db.dispose()
