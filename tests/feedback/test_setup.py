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

from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.models import Item
from rlhfkit.feedback.settings import ServeConfig

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


def test_a_pairwise_project_takes_four_candidates_as_their_six_pairs(app_world: tuple[Any, World]) -> None:
    """`rlhfkit generate` makes 4 completions by default; a pairwise project gets every pair of them."""
    app, _ = app_world
    db: Database = app.state.feedback.db
    owner, csrf = login(app, "owner")
    pid = owner.post(
        "/api/projects", json={"name": "Pairs", "task": "pairwise", "overlap": 1}, headers={"X-CSRF-Token": csrf}
    ).json()["id"]
    data = jsonl(
        [
            {"prompt_id": "q1", "prompt": "Greet me.", "completions": ["c0", "c1", "c2", "c3"]},
            {"prompt_id": "q2", "prompt": "Thank me.", "completions": ["d0", "d1"]},
        ]
    )
    url = f"/api/projects/{pid}/import?filename=c.jsonl"
    r = owner.post(url, content=data, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json() == {"added": 7, "skipped": 0}, r.text
    assert keys(db, pid) == ["q1#0-1", "q1#0-2", "q1#0-3", "q1#1-2", "q1#1-3", "q1#2-3", "q2"]
    assert owner.post(url, content=data, headers={"X-CSRF-Token": csrf}).json() == {"added": 0, "skipped": 7}
    # Each pair is an ordinary two-candidate item: judged, then exported with the pair's texts.
    item = owner.get(f"/api/projects/{pid}/next").json()["item"]
    assert item["prompt_id"] == "q1#0-1" and sorted(c["text"] for c in item["candidates"]) == ["c0", "c1"]
    better = next(c["id"] for c in item["candidates"] if c["text"] == "c1")
    ranking = {c["id"]: 1 if c["id"] == better else 2 for c in item["candidates"]}
    r = owner.post(
        f"/api/projects/{pid}/items/{item['item_id']}/judgments",
        json={"ranking": ranking, "client_token": "pair-token-1"},
        headers={"X-CSRF-Token": csrf},
    )
    assert r.status_code == 201, r.text
    pairs = [json.loads(line) for line in owner.get(f"/api/projects/{pid}/export/pairs").text.splitlines()]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("c1", "c0")]
    completions = [json.loads(line) for line in owner.get(f"/api/projects/{pid}/export/completions").text.splitlines()]
    assert completions[2] == {"prompt_id": "q1#0-3", "prompt": "Greet me.", "completions": ["c0", "c3"]}


def test_a_labeler_changes_their_password(app_world: tuple[Any, World]) -> None:
    app, _ = app_world
    browser, csrf = login(app, "ann")
    laptop, _ = login(app, "ann")  # another session of hers, e.g. on another computer
    page = browser.get("/account")
    assert page.status_code == 200 and 'action="/account/password"' in page.text
    new = "a-much-better-pass-7"

    def change(current: str, again: str = new, token: str = csrf) -> Any:
        form = {"current_password": current, "new_password": new, "new_password_again": again}
        return browser.post("/account/password", data=form | {"csrf_token": token})

    assert change(PASSWORD, token="forged").status_code == 403
    r = change("not-my-password")
    assert r.status_code == 422 and "that is not your current password" in r.text and 'id="password-error"' in r.text
    r = change(PASSWORD, again="a-much-better-pass-8")
    assert r.status_code == 422 and "the two new passwords differ" in r.text
    r = browser.post(
        "/account/password",
        data={"current_password": PASSWORD, "new_password": "short", "new_password_again": "short", "csrf_token": csrf},
    )
    assert r.status_code == 422 and "at least 10 characters" in r.text  # the shared password rules
    assert laptop.get("/api/me").status_code == 200  # nothing changed so far

    r = change(PASSWORD)
    assert r.status_code == 303 and r.headers["location"] == "/account?password=changed"
    assert laptop.get("/api/me").status_code == 401  # other sessions end
    page = browser.get(r.headers["location"])  # this browser stays logged in, with a fresh session
    assert page.status_code == 200 and "Password changed." in page.text
    assert TestClient(app).post("/api/login", json={"username": "ann", "password": PASSWORD}).status_code == 401
    login(app, "ann", new)
