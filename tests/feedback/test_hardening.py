"""The server against hostile or broken input and password guessing (issue 12, an outside test):
text no page can show, too many candidates, link-filter bypasses, odd names and numbers, login
throttling, secrets in the output, file modes, cookies and sessions; on SQLite and PostgreSQL."""

from __future__ import annotations

import html
import json
import logging
import os
import re
import socket
import stat
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from feedback_helpers import (
    BROKEN,
    BYPASSES,
    PASSWORD,
    SAFE_LINKS,
    World,
    completions_jsonl,
    seed,
    store_damaged_item,
)
from sqlalchemy import func, select

from rlhfkit.feedback import service
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.live import LiveServer
from rlhfkit.feedback.markdown_safe import render_markdown
from rlhfkit.feedback.models import Item, LoginSession, User
from rlhfkit.feedback.schemas import MAX_CANDIDATES
from rlhfkit.feedback.security import SECRET_ENV
from rlhfkit.feedback.settings import ServeConfig

ROOT = Path(__file__).resolve().parents[2]
MakeApp = Callable[..., tuple[Any, World]]


@pytest.fixture
def make_app(config: ServeConfig) -> Iterator[MakeApp]:
    """`make_app(**settings)`: the app with these ServeConfig settings over a seeded database."""
    databases: list[Database] = []

    def make(**settings: Any) -> tuple[Any, World]:
        cfg = ServeConfig(**(config.model_dump() | settings))
        db = Database(cfg.db_url)
        databases.append(db)
        app = create_app(cfg, db)
        return app, seed(db, items=4, overlap=2)

    yield make
    for db in databases:
        db.dispose()


def key_client(app: Any, world: World, name: str) -> TestClient:
    return TestClient(app, headers={"Authorization": f"Bearer {world.keys[name]}"}, raise_server_exceptions=False)


def browser(app: Any, name: str, base_url: str = "http://testserver") -> tuple[TestClient, str]:
    """A logged-in cookie client and its CSRF token."""
    client = TestClient(app, base_url=base_url, follow_redirects=False, raise_server_exceptions=False)
    r = client.post("/api/login", json={"username": name, "password": PASSWORD})
    assert r.status_code == 200, r.text
    return client, r.json()["csrf_token"]


def form_login(client: TestClient, username: str, password: str) -> httpx.Response:
    page = client.get("/login")
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    return client.post("/login", data={"username": username, "password": password, "csrf_token": token})


# ---------------------------------------------------------------- 1. text no page can show


def test_import_refuses_text_no_page_can_show(make_app: MakeApp) -> None:
    app, world = make_app()
    owner, A = key_client(app, world, "owner"), world.project_a
    good = json.loads(completions_jsonl(1, prefix="new").splitlines()[0])
    cases = [  # json.dumps writes a lone surrogate as the escape JavaScript tools write: \ud800
        (good | {"prompt": "x\ud800"}, "prompt: contains a lone UTF-16 surrogate (\\ud800"),
        (good | {"completions": ["fine", "half an emoji \udfff"]}, "completions[1]: contains a lone UTF-16"),
        (good | {"prompt": [{"role": "user", "content": "hi \ud83d"}]}, "prompt[0].content: contains a lone"),
        (good | {"prompt_id": "id\x00"}, "prompt_id: contains a NUL character"),
    ]
    for record, message in cases:
        body = completions_jsonl(2, prefix="ok") + json.dumps(record) + "\n"
        r = owner.post(f"/api/projects/{A}/import?filename=batch.jsonl", content=body.encode())
        assert r.status_code == 422, (record, r.text)
        error = r.json()["error"]
        assert error.startswith(f"batch.jsonl:3: {message}"), error
        assert "fix the broken character" in error or "remove it" in error  # what to do
    with app.state.feedback.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Item).where(Item.project_id == A)) == 4  # only the seed
    # A NUL inside a prompt or a completion is stored (as the JSON escape \u0000) on both databases,
    # and model output can hold one (the demo's does): only the id, a text column, cannot.
    nul = good | {"prompt_id": "with-nul", "completions": ["fine", "a NUL \x00 from the tokenizer"]}
    r = owner.post(f"/api/projects/{A}/import", content=(json.dumps(nul) + "\n").encode())
    assert r.status_code == 200 and r.json()["added"] == 1, r.text
    exported = owner.get(f"/api/projects/{A}/export/completions").text.splitlines()
    assert json.loads(exported[-1])["completions"][1] == "a NUL \x00 from the tokenizer"


def test_a_damaged_stored_item_is_skipped_not_a_dead_end(make_app: MakeApp, caplog: pytest.LogCaptureFixture) -> None:
    """An item stored before imports were checked used to fail every request of each labeler it was
    handed to (their unfinished item comes first), and cut the completions export short."""
    app, world = make_app()
    A = world.project_a
    damaged = store_damaged_item(app.state.feedback.db, A)
    ann = key_client(app, world, "ann")
    with caplog.at_level(logging.ERROR, logger="rlhfkit.feedback"):
        r = ann.get(f"/api/projects/{A}/next")
    assert r.status_code == 200, r.text
    item = r.json()["item"]
    assert item["prompt_id"] == "p0"
    assert "'damaged' cannot be shown" in caplog.text and "labeler ann" in caplog.text
    again = ann.get(f"/api/projects/{A}/next")
    assert again.status_code == 200 and again.json()["item"]["item_id"] == item["item_id"]
    r = ann.get(f"/api/projects/{A}/items/{damaged}")
    assert r.status_code == 409 and "cannot be shown" in r.json()["error"] and "next item" in r.json()["error"]
    progress = ann.get(f"/api/projects/{A}").json()["progress"]
    assert progress["to_go"] == 4  # the four good items; the skipped one is not waiting for ann

    bob, _ = browser(app, "bob")  # the task page: straight to the first good item
    page = bob.get(f"/p/{A}/next", follow_redirects=True)
    assert page.status_code == 200 and "Rank the 3 responses" in page.text and "item p0" in page.text

    owner = key_client(app, world, "owner")
    r = owner.get(f"/api/projects/{A}/export/completions")
    rows = [json.loads(line) for line in r.text.splitlines()]
    assert [row["prompt_id"] for row in rows] == ["damaged", "p0", "p1", "p2", "p3"]
    assert rows[0]["completions"] == ["fine", BROKEN]  # kept exactly (escaped in the JSON)


# ---------------------------------------------------------------- 2. candidates per item


def test_one_candidate_limit_for_import_and_judgment(make_app: MakeApp) -> None:
    app, world = make_app()
    owner = key_client(app, world, "owner")
    project = owner.post("/api/projects", json={"name": "wide", "overlap": 1}).json()["id"]
    assert owner.put(f"/api/projects/{project}/members", json={"username": "ann"}).status_code == 200
    wide = {"prompt_id": "w", "prompt": "Rank them all", "completions": [f"c{i}" for i in range(MAX_CANDIDATES + 1)]}
    r = owner.post(f"/api/projects/{project}/import?filename=wide.jsonl", content=(json.dumps(wide) + "\n").encode())
    assert r.status_code == 422
    assert r.json()["error"].startswith(f"wide.jsonl:1: completions: {MAX_CANDIDATES + 1} candidates")
    assert f"at most {MAX_CANDIDATES}" in r.json()["error"]
    widest = wide | {"completions": wide["completions"][:MAX_CANDIDATES]}
    r = owner.post(f"/api/projects/{project}/import", content=(json.dumps(widest) + "\n").encode())
    assert r.status_code == 200 and r.json()["added"] == 1
    ann = key_client(app, world, "ann")  # what could be imported can be judged
    item = ann.get(f"/api/projects/{project}/next").json()["item"]
    ranking = {c["id"]: i % 7 + 1 for i, c in enumerate(item["candidates"])}
    r = ann.post(
        f"/api/projects/{project}/items/{item['item_id']}/judgments",
        json={"ranking": ranking, "client_token": "widest-item-1"},
    )
    assert r.status_code == 201, r.text


# ---------------------------------------------------------------- 3. link filter


def _targets(rendered: str) -> list[str]:
    """Every href/src as the browser reads it: entities decoded, tabs and newlines dropped."""
    return [re.sub(r"[\t\n\r]", "", html.unescape(v)) for v in re.findall(r'(?:href|src)="([^"]*)"', rendered)]


@pytest.mark.parametrize("source", BYPASSES)
def test_markdown_links_cannot_run_script(source: str) -> None:
    for target in _targets(str(render_markdown(source))):
        scheme = re.match(r"^\s*([a-zA-Z][a-zA-Z0-9+.-]*):", target)
        assert scheme is None or scheme.group(1).lower() in ("http", "https", "mailto"), (source, target)


def test_markdown_keeps_safe_links() -> None:
    for source, target in SAFE_LINKS.items():
        assert _targets(str(render_markdown(source))) == [target]


# ---------------------------------------------------------------- 4. clean 4xx for odd input


def test_odd_names_deep_json_and_huge_numbers_get_a_clean_4xx(make_app: MakeApp) -> None:
    app, world = make_app()
    A = world.project_a
    owner = key_client(app, world, "owner")
    lines = completions_jsonl(1, prefix="odd").encode()
    for name in ("..", ".", "/", "a\x00b", "x" * 300):
        r = owner.post(f"/api/projects/{A}/import", params={"filename": name}, content=lines)
        assert r.status_code == 422 and r.json()["error"].startswith("filename: "), (name, r.text)
    alice, alice_csrf = browser(app, "alice")  # project A's admin, through the upload form
    r = alice.post(f"/p/{A}/admin/import", data={"csrf_token": alice_csrf}, files={"file": ("..", lines)})
    assert r.status_code == 422 and "filename" in r.text

    deep = '{"prompt_id": "d", "prompt": ' + "[" * 100_000 + "]" * 100_000 + ', "completions": ["a", "b"]}\n'
    r = owner.post(f"/api/projects/{A}/import?filename=deep.jsonl", content=deep.encode())
    assert r.status_code == 422 and r.json()["error"].startswith("deep.jsonl:1: JSON nested too deeply")
    demo = owner.post("/api/projects", json={"name": "demo", "task": "demonstration"}).json()["id"]
    r = owner.post(f"/api/projects/{demo}/import?filename=deep.jsonl", content=deep.encode())
    assert r.status_code == 422 and "nested too deeply" in r.json()["error"]

    huge = "9" * 5_000  # int() refuses strings of 4,300 digits and more
    r = alice.post(f"/p/{A}/admin/settings", data={"csrf_token": alice_csrf, "overlap": huge, "guidelines": ""})
    assert r.status_code == 422 and "overlap" in r.text
    owner_page, owner_csrf = browser(app, "owner")
    r = owner_page.post("/projects", data={"csrf_token": owner_csrf, "name": "N", "task": "ranking", "overlap": huge})
    assert r.status_code == 422 and "overlap" in r.text
    ann, ann_csrf = browser(app, "ann")
    page = ann.get(f"/p/{A}/next", follow_redirects=True)
    item_id = int(str(page.url).split("/items/")[1])
    cids = [int(x.split('"')[0]) for x in page.text.split('name="rank_')[1:]]
    form = {"csrf_token": ann_csrf, "client_token": "huge-rank-1"} | {f"rank_{c}": "1" for c in cids}
    r = ann.post(f"/p/{A}/items/{item_id}", data=form | {f"rank_{cids[0]}": huge})
    assert r.status_code == 422 and "rank" in r.text

    # NUL bytes (PostgreSQL text cannot hold one) and lone surrogates (not UTF-8) in what is sent.
    r = form_login(TestClient(app, raise_server_exceptions=False), "ann\x00", PASSWORD)
    assert r.status_code == 422 and "username" in r.text
    r = ann.post("/account/keys", data={"csrf_token": ann_csrf, "name": "key\x00name"})
    assert r.status_code == 422 and "name" in r.text and "NUL" in r.text
    as_json = {"Content-Type": "application/json"}  # json.dumps escapes the surrogate, as a JS tool would
    anon = TestClient(app, raise_server_exceptions=False)
    r = anon.post("/api/login", content=json.dumps({"username": "ann", "password": "guess\ud800"}), headers=as_json)
    assert r.status_code == 422 and "password" in r.json()["error"]
    r = ann.post("/api/keys", content=json.dumps({"name": "half \udc00"}), headers=as_json | {"X-CSRF-Token": ann_csrf})
    assert r.status_code == 422 and "name" in r.json()["error"]


def test_ids_beyond_64_bits_in_any_url_get_a_clean_422(make_app: MakeApp) -> None:
    """Every route with an id in its path, called with an id no database column holds (25 digits):
    a 422 naming the parameter, never the driver's overflow as a 500 (SQLite and PostgreSQL)."""
    app, world = make_app()
    owner, csrf = browser(app, "owner")
    api = key_client(app, world, "owner")
    big = "9" * 25
    called = 0
    def routes(found: list[Any]) -> Iterator[Any]:  # FastAPI keeps included routers unflattened
        for route in found:
            yield from routes(route.original_router.routes) if hasattr(route, "original_router") else [route]

    for route in routes(app.routes):
        names = re.findall(r"\{(\w+)\}", getattr(route, "path", ""))
        ids = [name for name in names if name in ("pid", "cid", "mid") or name.endswith("_id")]
        for method, too_big in ((m, i) for m in sorted(getattr(route, "methods", set()) - {"HEAD"}) for i in ids):
            url = route.path  # one id too big at a time, the others plausible
            for name in names:
                url = url.replace("{" + name + "}", big if name == too_big else "pairs" if name == "kind" else "1")
            client = api if url.startswith("/api/") else owner
            r = client.request(method, url, data={"csrf_token": csrf} if method == "POST" and client is owner else None)
            assert r.status_code == 422 and f"path.{too_big}: Input should be less than or equal to" in r.text, (
                method,
                route.path,
                r.status_code,
                r.text[:200],
            )
            called += 1
    assert called > 40  # the routes were found


# ---------------------------------------------------------------- 5. login throttling


def test_password_guessing_is_throttled_with_exponential_backoff(make_app: MakeApp) -> None:
    app, world = make_app(login_max_failures=3, login_backoff_seconds=1.0)
    client = TestClient(app, raise_server_exceptions=False)

    def attempt(password: str, username: str = "ann") -> httpx.Response:
        return client.post("/api/login", json={"username": username, "password": password})

    for _ in range(3):
        assert attempt("wrong-guess-1").status_code == 401
    locked = attempt("wrong-guess-2")
    assert locked.status_code == 429 and locked.headers["retry-after"] == "1"
    assert "too many failed logins; try again in" in locked.json()["error"]
    right = attempt(PASSWORD)
    assert right.status_code == 429 and "retry-after" in right.headers  # even the right password
    assert attempt(PASSWORD, "bob").status_code == 200  # another username, from the same address
    time.sleep(1.1)
    assert attempt("wrong-guess-3").status_code == 401  # checked again, and the next wait doubles
    locked = attempt(PASSWORD)
    assert locked.status_code == 429 and locked.headers["retry-after"] == "2"
    time.sleep(2.1)
    assert attempt(PASSWORD).status_code == 200
    assert attempt("wrong-guess-4").status_code == 401  # a success starts the count afresh

    page = TestClient(app, follow_redirects=False, raise_server_exceptions=False)  # the login form too
    for _ in range(3):
        assert form_login(page, "alice", "wrong-guess-5").status_code == 401
    r = form_login(page, "alice", PASSWORD)
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and "too many failed logins" in r.text
    assert "rlhfkit_session" not in r.cookies


def test_one_address_guessing_many_usernames_is_throttled(make_app: MakeApp) -> None:
    app, world = make_app(login_max_failures=3, login_max_failures_per_ip=4, login_backoff_seconds=30)
    client = TestClient(app, raise_server_exceptions=False)
    for name in ("ann", "bob", "nobody", "alice"):
        assert client.post("/api/login", json={"username": name, "password": "wrong-guess-1"}).status_code == 401
    r = client.post("/api/login", json={"username": "owner", "password": PASSWORD})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 29


def test_unknown_usernames_fail_as_slowly_as_known_ones(make_app: MakeApp) -> None:
    """Before, a wrong password took 31 ms for a real user and 3 ms for an unknown name."""
    app, world = make_app(login_max_failures=1000, login_max_failures_per_ip=1000)
    client = TestClient(app)
    with app.state.feedback.db.session(write=True) as s:  # a deactivated user gives nothing away either
        s.get(User, world.users["bob"]).active = False
    names = {"known": "ann", "unknown": "nobody-here", "api-only": "extra", "deactivated": "bob"}
    times: dict[str, list[float]] = {kind: [] for kind in names}
    client.post("/api/login", json={"username": "ann", "password": "warm-up-guess"})
    for i in range(7):  # interleaved, so a busy moment of the machine hits every kind alike
        for kind, name in names.items():
            t = time.perf_counter()
            r = client.post("/api/login", json={"username": name, "password": f"wrong-guess-{i}"})
            times[kind].append(time.perf_counter() - t)
            assert r.status_code == 401 and r.json()["error"] == "wrong username or password"
    medians = {kind: statistics.median(ts) for kind, ts in times.items()}
    assert max(medians.values()) < 3 * min(medians.values()), medians


def test_password_checks_are_bounded_so_labelers_keep_working(config: ServeConfig) -> None:
    """Unbounded, 40 parallel logins hashed at once: labelers waited seconds, memory stayed grown."""
    cfg = ServeConfig(**(config.model_dump() | {"password_hash_concurrency": 1, "password_hash_wait_seconds": 0.05}))
    db = Database(cfg.db_url)
    db.migrate()
    world = seed(db, items=4, overlap=2)
    with LiveServer(cfg, db) as server, ThreadPoolExecutor(16) as pool:

        def log_in(_: int) -> httpx.Response:
            return httpx.post(f"{server.url}/api/login", json={"username": "ann", "password": PASSWORD}, timeout=60)

        def label(_: int) -> int:
            headers = {"Authorization": f"Bearer {world.keys['bob']}"}
            return httpx.get(
                f"{server.url}/api/projects/{world.project_a}/next", headers=headers, timeout=60
            ).status_code

        logins = [pool.submit(log_in, i) for i in range(12)]
        labeling = [pool.submit(label, i) for i in range(4)]
        answers = [f.result() for f in logins]
        assert [f.result() for f in labeling] == [200] * 4
    db.dispose()
    statuses = Counter(r.status_code for r in answers)
    assert set(statuses) == {200, 503}, statuses
    for r in answers:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and "busy with other logins" in r.json()["error"]


# ---------------------------------------------------------------- 6. no secrets in the output


@pytest.mark.parametrize("db_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_serve_never_prints_the_database_password(db_url: str, tmp_path: Path) -> None:
    url = db_url.replace("postgres@", "postgres:s3cret@")  # trust auth: the password is not checked
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    cli = [sys.executable, "-m", "rlhfkit.cli", "serve"]
    init = subprocess.run([*cli, "init", f"db_url={url}"], capture_output=True, text=True, env=env, check=True)
    refused = subprocess.run([*cli, "init", "db_url=mysql://root:s3cret@db/x"], capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "only SQLite and PostgreSQL" in refused.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [*cli, f"db_url={url}", f"port={port}", "log_level=debug", f"secret_key_file={tmp_path / 'secret'}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/login", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "rlhfkit serve did not start"
            time.sleep(0.1)
        httpx.post(f"http://127.0.0.1:{port}/api/login", json={"username": "x", "password": "wrong-guess-1"})
        httpx.get(f"http://127.0.0.1:{port}/nowhere")
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    everything = init.stdout + init.stderr + refused.stdout + refused.stderr + output
    assert "s3cret" not in everything, everything
    assert "postgres:***@127.0.0.1" in init.stdout and "postgres:***@127.0.0.1" in output


# ---------------------------------------------------------------- 7. files, cookies, sessions, passwords


def test_database_and_secret_files_are_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    folder = tmp_path / "server"
    config = ServeConfig(db_url=f"sqlite:///{folder}/feedback.db", secret_key_file=str(folder / "feedback.secret"))
    umask = os.umask(0o022)  # the usual umask, which made them 0644
    try:
        db = Database(config.db_url)
        create_app(config, db)
        seed(db)
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in folder.iterdir()}
        db.dispose()
    finally:
        os.umask(umask)
    assert {"feedback.db", "feedback.db-wal", "feedback.db-shm", "feedback.secret"} <= set(modes), modes
    assert set(modes.values()) == {"0o600"}, modes


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_secure_cookies_follow_the_request_scheme(config: ServeConfig) -> None:
    db = Database(config.db_url)
    db.migrate()
    seed(db)
    cases = [  # (settings, scheme, X-Forwarded-Proto, Secure expected)
        ({}, "http", None, False),  # plain-http localhost keeps working
        ({}, "https", None, True),
        ({}, "http", "https", False),  # anyone may send the header: only a trusted proxy counts
        ({"trusted_proxies": "testclient"}, "http", "https", True),
        ({"trusted_proxies": "10.0.0.1"}, "http", "https", False),
        ({"secure_cookies": True}, "http", None, True),
        ({"secure_cookies": False}, "https", None, False),
    ]
    for settings, scheme, forwarded, secure in cases:
        app = create_app(ServeConfig(**(config.model_dump() | settings)), db)
        headers = {"X-Forwarded-Proto": forwarded} if forwarded else {}
        client = TestClient(app, base_url=f"{scheme}://testserver", headers=headers, follow_redirects=False)
        cookies = [
            client.post("/api/login", json={"username": "ann", "password": PASSWORD}).headers["set-cookie"],
            client.get("/login").headers["set-cookie"],
        ]
        for cookie in cookies:
            assert ("; secure" in cookie.lower()) == secure, (settings, scheme, forwarded, cookie)
    db.dispose()


def test_sessions_end_when_idle_and_after_their_lifetime(make_app: MakeApp) -> None:
    app, world = make_app(session_idle_hours=12, session_days=14)
    db: Database = app.state.feedback.db
    ann, _ = browser(app, "ann")

    def session_times() -> tuple[Any, Any]:
        with db.session() as s:
            row = s.scalar(select(LoginSession).where(LoginSession.user_id == world.users["ann"]))
            return row.created_at, row.expires_at

    def age(last_use: bool = True, **delta: float) -> None:
        """As if the logins (and their last use, unless not `last_use`) lay `delta` further back."""
        with db.session(write=True) as s:
            for row in s.scalars(select(LoginSession)):
                row.created_at -= timedelta(**delta)
                if last_use:
                    row.expires_at -= timedelta(**delta)

    created, expires = session_times()
    assert timedelta(hours=11, minutes=59) < expires - created <= timedelta(hours=12)
    age(hours=11)
    assert ann.get("/api/me").status_code == 200  # used within 12 hours: the deadline moves on
    created, expires = session_times()
    assert expires - service.utcnow() > timedelta(hours=11, minutes=59)
    assert ann.get("/api/me").status_code == 200
    assert session_times()[1] == expires  # not a write per request
    age(hours=12, minutes=1)
    assert ann.get("/api/me").status_code == 401  # 12 hours without a request
    assert ann.get("/", follow_redirects=False).status_code == 303

    bob, _ = browser(app, "bob")
    age(last_use=False, days=14, minutes=-1)  # logged in 14 days ago, in use all along
    assert bob.get("/api/me").status_code == 200
    age(last_use=False, minutes=2)
    assert bob.get("/api/me").status_code == 401


def test_weak_passwords_are_refused(make_app: MakeApp) -> None:
    app, world = make_app()
    owner = key_client(app, world, "owner")
    weak = [
        ("newbie", "password", "at least 10 characters"),
        ("newbie", "short-pw1", "at least 10 characters"),
        ("newbie", "newbie-2024-xyz", "must not contain the username"),
        ("charlotte", "Charlotte1!", "must not contain the username"),
        ("newbie", "Password123!", "most commonly used"),
        ("newbie", "qwertyuiop", "most commonly used"),
        ("newbie", "1234567890", "most commonly used"),
        ("newbie", "p@ssw0rd2024", "most commonly used"),
        ("newbie", "aaaaaaaaaaaa", "most commonly used"),
    ]
    for username, password, fragment in weak:
        r = owner.post("/api/users", json={"username": username, "password": password})
        assert r.status_code == 422 and fragment in r.json()["error"] and "passphrase" in r.json()["error"], (
            password,
            r.text,
        )
    assert owner.post("/api/users", json={"username": "newbie", "password": "violet kettle 87"}).status_code == 201
    page, csrf = browser(app, "owner")
    r = page.post(f"/admin/users/{world.users['ann']}/password", data={"csrf_token": csrf, "password": "letmein123"})
    assert r.status_code == 422 and "most commonly used" in r.text
