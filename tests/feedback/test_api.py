"""The HTTP surface: who may call what, what bad input gets, CSRF, escaping; on both databases."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from feedback_helpers import ALPHA, BRAVO, PASSWORD, XSS, World, completions_jsonl, seed
from sqlalchemy import func, select

from rlhfkit.feedback import service
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.models import Assignment, Item, Judgment, Member, Project, User
from rlhfkit.feedback.settings import ServeConfig

ROLES = ("anon", "eve", "ann", "alice", "owner")  # eve: labeler of the *other* project only
LABELING = ("ann", "alice", "owner")


@dataclass
class Session:
    client: TestClient
    csrf: str = ""


def login(app: Any, username: str) -> Session:
    client = TestClient(app, follow_redirects=False)
    r = client.post("/api/login", json={"username": username, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return Session(client, r.json()["csrf_token"])


@pytest.fixture
def app_world(config: ServeConfig) -> tuple[Any, World]:
    db = Database(config.db_url)
    app = create_app(config, db)
    world = seed(db, items=8, overlap=2)
    yield app, world
    db.dispose()


def _assign(db: Database, world: World, name: str, key: str, project: str = "a") -> int:
    """Hand item `key` to `name` directly (the matrix needs known, distinct items per role)."""
    pid = world.project_a if project == "a" else world.project_b
    with db.session(write=True) as s:
        item = s.scalar(select(Item).where(Item.project_id == pid, Item.key == key))
        s.add(
            Assignment(
                item_id=item.id,
                user_id=world.users[name],
                display_order=[c.id for c in item.candidates],
                leased_until=service.utcnow() + service.timedelta(hours=1),
            )
        )
        return item.id


def _candidates(db: Database, item_id: int) -> list[int]:
    with db.session() as s:
        return [c.id for c in s.get(Item, item_id).candidates]


Row = tuple[str, str, Any, dict[str, int]]


def _expect(anon: int, eve: int, ann: int, alice: int, owner: int) -> dict[str, int]:
    return dict(zip(ROLES, (anon, eve, ann, alice, owner), strict=True))


def test_authorization_matrix(app_world: tuple[Any, World]) -> None:
    app, world = app_world
    db: Database = app.state.feedback.db
    A, B = world.project_a, world.project_b
    items = {name: _assign(db, world, name, f"p{i}") for i, name in enumerate(LABELING)}
    page_items = {name: _assign(db, world, name, f"p{i + 3}") for i, name in enumerate(LABELING)}
    bob_item = _assign(db, world, "bob", "p7")
    eve_item = _assign(db, world, "eve", "b0", project="b")
    extra = world.users["extra"]
    sessions: dict[str, Session] = {"anon": Session(TestClient(app, follow_redirects=False))}
    sessions |= {name: login(app, name) for name in ROLES[1:]}
    counter = iter(range(10_000))

    def own(mapping: dict[str, int], role: str) -> int:
        return mapping.get(role, mapping["ann"])

    def ranking_json(role: str) -> dict[str, Any]:
        return {
            "ranking": {c: 1 for c in _candidates(db, own(items, role))},
            "client_token": f"matrix-{role}",
        }

    def ranking_form(role: str) -> dict[str, Any]:
        return {f"rank_{c}": "1" for c in _candidates(db, own(page_items, role))} | {"client_token": f"page-{role}"}

    def ensure_extra_member() -> None:
        with db.session(write=True) as s:
            if s.get(Member, (A, extra)) is None:
                s.add(Member(project_id=A, user_id=extra, role="labeler"))

    jsonl = completions_jsonl(8, marker=ALPHA)
    # (method, path, body, expected per role). Paths and bodies may depend on the role.
    rows: list[tuple[str, Callable[[str], str] | str, Any, dict[str, int]]] = [
        ("GET", "/api/me", None, _expect(401, 200, 200, 200, 200)),
        ("GET", "/api/projects", None, _expect(401, 200, 200, 200, 200)),
        ("GET", "/api/keys", None, _expect(401, 200, 200, 200, 200)),
        ("POST", "/api/keys", {"name": "matrix"}, _expect(401, 201, 201, 201, 201)),
        ("POST", "/api/users", lambda r: {"username": f"u{next(counter)}"}, _expect(401, 403, 403, 403, 201)),
        ("POST", "/api/projects", lambda r: {"name": f"P{next(counter)}"}, _expect(401, 403, 403, 403, 201)),
        ("GET", f"/api/projects/{A}", None, _expect(401, 404, 200, 200, 200)),
        ("PATCH", f"/api/projects/{A}", {"overlap": 2}, _expect(401, 404, 403, 200, 200)),
        ("GET", f"/api/projects/{A}/members", None, _expect(401, 404, 403, 200, 200)),
        ("PUT", f"/api/projects/{A}/members", {"username": "extra"}, _expect(401, 404, 403, 200, 200)),
        ("DELETE", f"/api/projects/{A}/members/{extra}", "setup", _expect(401, 404, 403, 204, 204)),
        ("POST", f"/api/projects/{A}/import?filename=a.jsonl", jsonl, _expect(401, 404, 403, 200, 200)),
        ("GET", f"/api/projects/{A}/next", None, _expect(401, 404, 200, 200, 200)),
        ("GET", lambda r: f"/api/projects/{A}/items/{own(items, r)}", None, _expect(401, 404, 200, 200, 200)),
        ("GET", f"/api/projects/{A}/items/{bob_item}", None, _expect(401, 404, 404, 404, 404)),
        (
            "PUT",
            lambda r: f"/api/projects/{A}/items/{own(items, r)}/draft",
            {"ranks": {}},
            _expect(401, 404, 204, 204, 204),
        ),
        (
            "POST",
            lambda r: f"/api/projects/{A}/items/{own(items, r)}/judgments",
            ranking_json,
            _expect(401, 404, 201, 201, 201),
        ),
        (
            "POST",
            f"/api/projects/{A}/items/{bob_item}/judgments",
            ranking_json,
            _expect(401, 404, 404, 404, 404),
        ),
        ("GET", f"/api/projects/{A}/progress", None, _expect(401, 404, 403, 200, 200)),
        ("GET", f"/api/projects/{A}/agreement", None, _expect(401, 404, 403, 200, 200)),
        ("GET", f"/api/projects/{A}/export/judgments", None, _expect(401, 404, 403, 200, 200)),
        ("GET", f"/api/projects/{A}/export/nonsense", None, _expect(401, 404, 403, 404, 404)),
        ("GET", f"/api/projects/{B}", None, _expect(401, 200, 404, 404, 200)),
        ("GET", f"/api/projects/{B}/items/{eve_item}", None, _expect(401, 200, 404, 404, 404)),
        ("GET", f"/api/projects/{B}/progress", None, _expect(401, 403, 404, 404, 200)),
        ("GET", "/api/projects/999999", None, _expect(401, 404, 404, 404, 404)),
        # pages
        ("GET", "/", None, _expect(303, 200, 200, 200, 200)),
        ("GET", "/login", None, _expect(200, 200, 200, 200, 200)),
        ("GET", f"/p/{A}", None, _expect(303, 404, 200, 200, 200)),
        ("GET", f"/p/{A}/next", None, _expect(303, 404, 303, 303, 303)),
        ("GET", lambda r: f"/p/{A}/items/{own(page_items, r)}", None, _expect(303, 404, 200, 200, 200)),
        ("GET", f"/p/{A}/items/{bob_item}", None, _expect(303, 404, 404, 404, 404)),
        (
            "FORM",
            lambda r: f"/p/{A}/items/{own(page_items, r)}",
            ranking_form,
            _expect(303, 404, 303, 303, 303),
        ),
        ("GET", f"/p/{A}/admin", None, _expect(303, 404, 403, 200, 200)),
        (
            "FORM",
            f"/p/{A}/admin/settings",
            {"overlap": "2", "guidelines": "# Be **kind**"},
            _expect(303, 404, 403, 303, 303),
        ),
        ("UPLOAD", f"/p/{A}/admin/import", jsonl, _expect(303, 404, 403, 303, 303)),
        (
            "FORM",
            f"/p/{A}/admin/members",
            {"username": "extra", "role": "labeler"},
            _expect(303, 404, 403, 303, 303),
        ),
        ("FORM", f"/p/{A}/admin/members/{extra}/remove", "setup", _expect(303, 404, 403, 303, 303)),
        (
            "FORM",
            "/projects",
            lambda r: {"name": f"Q{next(counter)}", "task": "ranking", "overlap": "1"},
            _expect(303, 403, 403, 403, 303),
        ),
        ("GET", "/admin/users", None, _expect(303, 403, 403, 403, 200)),
        (
            "FORM",
            "/admin/users",
            lambda r: {"username": f"w{next(counter)}"},
            _expect(303, 403, 403, 403, 303),
        ),
        ("FORM", f"/admin/users/{extra}/active", {"active": "1"}, _expect(303, 403, 403, 403, 303)),
        (
            "FORM",
            f"/admin/users/{extra}/password",
            {"password": "another-pass-1"},
            _expect(303, 403, 403, 403, 303),
        ),
        ("GET", "/account", None, _expect(303, 200, 200, 200, 200)),
        ("FORM", "/account/keys", {"name": "page"}, _expect(303, 200, 200, 200, 200)),
        (  # reaches the checks (the two new passwords differ) for every logged-in user, changes nothing
            "FORM",
            "/account/password",
            {"current_password": PASSWORD, "new_password": "new-pass-12", "new_password_again": "new-pass-13"},
            _expect(303, 422, 422, 422, 422),
        ),
        ("GET", "/static/app.js", None, _expect(200, 200, 200, 200, 200)),
    ]
    mismatches = []
    for method, path, body, expected in rows:
        for role in ROLES:
            sess = sessions[role]
            url = path(role) if callable(path) else path
            data = body(role) if callable(body) else body
            if data == "setup":
                ensure_extra_member()
                data = {}
            headers = {"X-CSRF-Token": sess.csrf} if method not in ("GET", "FORM", "UPLOAD") else {}
            if method == "FORM":
                r = sess.client.post(url, data=data | {"csrf_token": sess.csrf})
            elif method == "UPLOAD":
                r = sess.client.post(url, data={"csrf_token": sess.csrf}, files={"file": ("a.jsonl", data.encode())})
            elif isinstance(data, str):
                r = sess.client.request(method, url, content=data.encode(), headers=headers)
            else:
                r = sess.client.request(method, url, json=data, headers=headers)
            if r.status_code != expected[role]:
                mismatches.append(
                    f"{method} {url} as {role}: {r.status_code} (expected {expected[role]}) {r.text[:120]}"
                )
            if r.status_code == 303 and role == "anon":
                assert r.headers["location"].startswith("/login")
            # No answer to someone outside project A mentions anything of it (and vice versa for B).
            if role == "eve":
                assert ALPHA not in r.text and "Secret Project Alpha" not in r.text, f"{method} {url} leaks A"
            if role in ("ann", "alice"):
                assert BRAVO not in r.text and "Project Bravo" not in r.text, f"{method} {url} leaks B"
    assert not mismatches, "\n".join(mismatches)


def test_bad_input_is_refused_and_nothing_is_stored(app_world: tuple[Any, World]) -> None:
    app, world = app_world
    db: Database = app.state.feedback.db
    A = world.project_a
    ann = TestClient(app, headers={"Authorization": f"Bearer {world.keys['ann']}"})
    item = ann.get(f"/api/projects/{A}/next").json()["item"]
    ids = [c["id"] for c in item["candidates"]]
    url = f"/api/projects/{A}/items/{item['item_id']}/judgments"
    ok = {"ranking": {str(i): 1 for i in ids}, "client_token": "token-ok-1"}
    cases: list[tuple[Any, int, str]] = [
        (ok | {"comment": "x" * 5001}, 422, "comment"),
        (
            ok | {"ranking": {str(ids[0]): 1, str(ids[1]): 2, "999999": 3}},
            422,
            "unknown candidate id(s) [999999]",
        ),
        (ok | {"ranking": {str(ids[0]): 1, str(ids[1]): 2}}, 422, "no rank for candidate"),
        (ok | {"ranking": {str(ids[0]): 1, str(ids[1]): 3, str(ids[2]): 3}}, 422, "dense"),
        (ok | {"ranking": {str(i): 0 for i in ids}}, 422, "start at 1"),
        (ok | {"ranking": {str(i): "1" for i in ids}}, 422, "valid integer"),
        (ok | {"ranking": {"abc": 1}}, 422, "valid integer"),
        (ok | {"ranking": {str(i): 1 for i in ids} | {str(ids[0]): 1.5}}, 422, "valid integer"),
        (ok | {"unusable": "yes"}, 422, "unusable"),
        (ok | {"client_token": "short"}, 422, "client_token"),
        ({k: v for k, v in ok.items() if k != "client_token"}, 422, "client_token"),
        (ok | {"labeler": "someone-else"}, 422, "labeler"),
        (ok | {"comment": "nul \x00 byte"}, 422, "NUL"),
        (ok | {"response": "a ranking task takes no text"}, 422, "only demonstration tasks"),
        ({"client_token": "token-ok-1"}, 422, "rank every candidate"),
        ('{"ranking": {', 422, "JSON"),
        ("[1, 2, 3]", 422, "invalid request"),
        (ok | {"comment": "y" * 600_000}, 413, "too large"),
    ]
    for body, status, fragment in cases:
        if isinstance(body, str):
            r = ann.post(url, content=body.encode(), headers={"Content-Type": "application/json"})
        else:
            r = ann.post(url, json=body)
        assert r.status_code == status, (body if len(str(body)) < 300 else "big", r.text)
        assert fragment in r.json()["error"], r.json()
    r = ann.post(url, content=b"ranking=1", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 422
    # Chunked upload with no Content-Length: still cut off at the limit.
    r = ann.post(
        url,
        content=iter([b'{"comment": "', b"z" * 600_000, b'"}']),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Judgment)) == 0
        assert s.scalar(select(Item.n_judgments).where(Item.id == item["item_id"])) == 0
    # Injection strings are data: stored and exported verbatim, nothing else happens.
    evil = "'); DROP TABLE judgments; -- <img src=x onerror=alert(1)> \" OR 1=1 --"
    r = ann.post(url, json=ok | {"comment": evil})
    assert r.status_code == 201 and r.json()["comment"] == evil
    owner = TestClient(app, headers={"Authorization": f"Bearer {world.keys['owner']}"})
    exported = [json.loads(line) for line in owner.get(f"/api/projects/{A}/export/judgments").text.splitlines()]
    assert [e["comment"] for e in exported] == [evil]
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(User)) == 6
    r = TestClient(app).post("/api/login", json={"username": "' OR 1=1 --", "password": "x' OR '1'='1"})
    assert r.status_code == 401 and r.json()["error"] == "wrong username or password"
    # A broken import names the file and line, and imports nothing.
    bad = completions_jsonl(3, prefix="new") + '{"prompt_id": "q", "prompt": "x", "completions": "oops"}\n'
    r = owner.post(f"/api/projects/{A}/import?filename=batch.jsonl", content=bad.encode())
    assert r.status_code == 422 and r.json()["error"].startswith("batch.jsonl:4: completions")
    r = owner.post(f"/api/projects/{A}/import", content=b"\xff\xfe not utf-8")
    assert r.status_code == 422 and "UTF-8" in r.json()["error"]
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Item).where(Item.project_id == A)) == 8
    r = owner.post("/api/projects", json={"name": "x", "overlap": 0})
    assert r.status_code == 422 and "overlap" in r.json()["error"]


def test_bad_fields_are_named_alike_by_the_api_and_the_pages(app_world: tuple[Any, World]) -> None:
    """One reading of pydantic's errors: the field, then our own validator's words (no "Value error,"),
    whether the request came as JSON or as a form."""
    app, world = app_world
    owner = login(app, "owner")
    short = "password: must have at least 10 characters"
    r = owner.client.post(
        "/api/users", json={"username": "carol", "password": "short"}, headers={"X-CSRF-Token": owner.csrf}
    )
    assert r.status_code == 422 and r.json()["error"].startswith(f"invalid request: {short}"), r.text
    r = owner.client.post("/admin/users", data={"username": "carol", "password": "short", "csrf_token": owner.csrf})
    assert r.status_code == 422 and short in r.text and "Value error" not in r.text
    url = f"/p/{world.project_a}/admin/members"
    r = owner.client.post(url, data={"username": "ann", "role": "boss", "csrf_token": owner.csrf})
    assert r.status_code == 422 and "role: Input should be &#39;admin&#39; or &#39;labeler&#39;" in r.text
    page = owner.client.get(f"/p/{world.project_a}/admin").text
    assert '<option value="admin">admin</option><option value="labeler" selected>labeler</option>' in page


def test_csrf_tokens_are_bound_to_one_session(app_world: tuple[Any, World]) -> None:
    app, world = app_world
    A = world.project_a
    ann, bob = login(app, "ann"), login(app, "bob")
    item = ann.client.get(f"/api/projects/{A}/next").json()["item"]
    url = f"/api/projects/{A}/items/{item['item_id']}/draft"
    assert ann.client.put(url, json={}).status_code == 403  # no token
    assert ann.client.put(url, json={}, headers={"X-CSRF-Token": bob.csrf}).status_code == 403  # someone else's
    assert ann.client.put(url, json={}, headers={"X-CSRF-Token": ann.csrf}).status_code == 204
    r = ann.client.post(f"/p/{A}/items/{item['item_id']}", data={"csrf_token": bob.csrf, "rank_1": "1"})
    assert r.status_code == 403 and "CSRF" in r.text
    old_cookie, old_token = ann.client.cookies.get("rlhfkit_session"), ann.csrf
    assert ann.client.post("/api/logout", headers={"X-CSRF-Token": ann.csrf}).status_code == 204
    replay = TestClient(app, cookies={"rlhfkit_session": old_cookie})
    assert replay.put(url, json={}, headers={"X-CSRF-Token": old_token}).status_code == 401  # session is over
    again = login(app, "ann")
    assert again.client.put(url, json={}, headers={"X-CSRF-Token": old_token}).status_code == 403
    assert again.client.put(url, json={}, headers={"X-CSRF-Token": again.csrf}).status_code == 204
    # The login form has its own token, tied to a cookie set with the form.
    browser = TestClient(app, follow_redirects=False)
    r = browser.post("/login", data={"username": "ann", "password": PASSWORD, "csrf_token": "forged"})
    assert r.status_code == 403 and "rlhfkit_session" not in r.cookies


def test_login_pages_and_api_keys(app_world: tuple[Any, World]) -> None:
    app, world = app_world
    browser = TestClient(app, follow_redirects=False)
    page = browser.get("/login?next=//evil.example/x")
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    assert 'name="next" value="/"' in page.text  # an off-site `next` is dropped
    r = browser.post("/login", data={"username": "ann", "password": "wrong", "csrf_token": token})
    assert r.status_code == 401 and "wrong username or password" in r.text
    page = browser.get(f"/login?next=/p/{world.project_a}")
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    r = browser.post(
        "/login",
        data={"username": "ann", "password": PASSWORD, "csrf_token": token, "next": f"/p/{world.project_a}"},
    )
    assert r.status_code == 303 and r.headers["location"] == f"/p/{world.project_a}"
    assert browser.get("/").status_code == 200
    assert "HttpOnly" in r.headers["set-cookie"] and "SameSite=lax" in r.headers["set-cookie"]

    key_client = TestClient(app, headers={"Authorization": f"Bearer {world.keys['bob']}"})
    assert key_client.get("/api/me").json()["username"] == "bob"
    assert key_client.post("/api/keys", json={"name": "no csrf needed"}).status_code == 201
    assert TestClient(app, headers={"Authorization": "Bearer rk_000000000000_nope"}).get("/api/me").status_code == 401
    assert TestClient(app, headers={"Authorization": "Bearer garbage"}).get("/api/me").status_code == 401
    keys = key_client.get("/api/keys").json()
    assert all("key_hash" not in k for k in keys)
    assert key_client.delete(f"/api/keys/{keys[0]['id']}").status_code == 204
    assert key_client.get("/api/me").status_code == 401  # revoked: the first key was the one in use
    alice = TestClient(app, headers={"Authorization": f"Bearer {world.keys['alice']}"})
    assert alice.delete(f"/api/keys/{keys[1]['id']}").status_code == 404  # not hers
    db: Database = app.state.feedback.db
    with db.session(write=True) as s:
        service.set_active(s, s.get(User, world.users["alice"]), False)
    assert alice.get("/api/me").status_code == 401  # deactivated users are out


def test_model_text_is_escaped_everywhere(app_world: tuple[Any, World]) -> None:
    app, world = app_world
    db: Database = app.state.feedback.db
    with db.session(write=True) as s:
        s.get(Project, world.project_a).guidelines = f"Read this. {XSS} [click](javascript:alert(1))"
    ann = login(app, "ann")
    r = ann.client.get(f"/p/{world.project_a}/next", follow_redirects=True)
    assert r.status_code == 200 and "Rank the 3 responses" in r.text
    assert "<script>alert(" not in r.text and "&lt;script&gt;alert(" in r.text
    assert "javascript:" not in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    alice = login(app, "alice")
    for path in (f"/p/{world.project_a}/admin", f"/p/{world.project_a}", "/"):
        page = alice.client.get(path)
        assert page.status_code == 200 and "<script>alert(" not in page.text
    # Error pages escape what they repeat, too.
    r = ann.client.get(f"/p/{world.project_a}/next", params={"saved": XSS})
    assert r.status_code == 422 and "<script>alert(" not in r.text


def test_form_errors_keep_what_was_entered(app_world: tuple[Any, World]) -> None:
    """Without JavaScript the form posts ranks as typed; a refused submit shows the page again with
    the error and everything the labeler entered, and stores nothing."""
    app, world = app_world
    ann = login(app, "ann")
    A = world.project_a
    page = ann.client.get(f"/p/{A}/next", follow_redirects=True)
    item_id = int(str(page.url).split("/items/")[1])
    cids = [int(x.split('"')[0]) for x in page.text.split('name="rank_')[1:]]
    token = page.text.split('name="client_token" value="')[1].split('"')[0]
    form = {
        "csrf_token": ann.csrf,
        "client_token": token,
        f"rank_{cids[0]}": "1",
        f"rank_{cids[1]}": "3",
        f"rank_{cids[2]}": "3",
        "comment": "first try",
    }
    r = ann.client.post(f"/p/{A}/items/{item_id}", data=form)
    assert r.status_code == 422 and "ranks must be dense" in r.text
    for cid, rank in zip(cids, ("1", "3", "3"), strict=True):  # each rank box keeps what was typed
        assert f'name="rank_{cid}" data-cid="{cid}" value="{rank}"' in r.text
    assert "first try</textarea>" in r.text
    r = ann.client.post(f"/p/{A}/items/{item_id}", data=form | {f"rank_{cids[1]}": "2", f"rank_{cids[2]}": "2"})
    assert r.status_code == 303 and r.headers["location"] == f"/p/{A}/next?saved=1"
    r = ann.client.post(f"/p/{A}/items/{item_id}", data=form | {"client_token": "a-new-token-123"})
    assert r.status_code == 409 and "already submitted" in r.text
    with app.state.feedback.db.session() as s:
        (judgment,) = s.scalars(select(Judgment)).all()
        assert judgment.comment == "first try" and sorted(judgment.ranking) == [1, 2, 2]
