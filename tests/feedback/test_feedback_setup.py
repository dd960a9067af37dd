"""Setting a site up as a new user would: files saved by Windows tools, pairwise projects fed
`rlhfkit generate`'s 4 candidates, many labelers at once, labelers changing their password."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from feedback_helpers import PASSWORD, World, seed
from sqlalchemy import select

from rlhfkit.feedback.app import ServeConfig, create_app
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.models import Item

BOM = b"\xef\xbb\xbf"


@pytest.fixture
def app_world(config: ServeConfig) -> Iterator[tuple[Any, World]]:
    db = Database(config.db_url)
    app = create_app(config, db)
    yield app, seed(db, items=2, overlap=1)
    db.dispose()


def login(app: Any, username: str, password: str = PASSWORD) -> tuple[TestClient, str]:
    client = TestClient(app, follow_redirects=False)
    r = client.post("/api/login", json={"username": username, "password": password})
    assert r.status_code == 200, r.text
    return client, r.json()["csrf_token"]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def keys(db: Database, project_id: int) -> list[str]:
    with db.session() as s:
        return list(s.scalars(select(Item.key).where(Item.project_id == project_id).order_by(Item.position)))


def test_files_starting_with_a_byte_order_mark_import(app_world: tuple[Any, World]) -> None:
    app, world = app_world
    db: Database = app.state.feedback.db
    owner, csrf = login(app, "owner")
    demo = owner.post("/api/projects", json={"name": "Demos", "task": "demonstration"}, headers={"X-CSRF-Token": csrf})
    completions = BOM + jsonl([{"prompt_id": "bom1", "prompt": "Thé?", "completions": ["a", "b", "c"]}])
    # The page's upload form, and a demonstration project, which guesses the kind from the first line.
    for pid in (world.project_a, demo.json()["id"]):
        r = owner.post(f"/p/{pid}/admin/import", data={"csrf_token": csrf}, files={"file": ("c.jsonl", completions)})
        assert r.status_code == 303, r.text
        assert "bom1" in keys(db, pid)
    with db.session() as s:
        prompt = s.scalar(select(Item.prompt).where(Item.project_id == demo.json()["id"]))
    assert prompt == "Thé?"
    prompts = BOM + jsonl([{"id": "bom2", "prompt": "Write a poem."}])
    r = owner.post(
        f"/api/projects/{demo.json()['id']}/import?filename=p.jsonl", content=prompts, headers={"X-CSRF-Token": csrf}
    )
    assert r.status_code == 200 and r.json() == {"added": 1, "skipped": 0}
