"""The labeling page as HTML: its size grows linearly with the number of candidates, model text
is rendered as safe Markdown, and every control works without JavaScript."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from feedback_helpers import PASSWORD

from rlhfkit.feedback import service
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.schemas import MemberIn, ProjectIn, UserIn
from rlhfkit.feedback.settings import ServeConfig


@pytest.fixture
def app(config: ServeConfig) -> Iterator[Any]:
    db = Database(config.db_url)
    yield create_app(config, db)
    db.dispose()


def project_with(app: Any, candidates: list[str], prompt: str = "Say something.", task: str = "ranking") -> int:
    """A project with one item of these candidates, and `ann` to label it."""
    db: Database = app.state.feedback.db
    with db.session(write=True) as s:
        if s.scalar(service.select(service.User.id).where(service.User.username == "ann")) is None:
            service.create_user(s, UserIn(username="ann", password=PASSWORD))
        project = service.create_project(s, ProjectIn(name=f"P{len(candidates)}-{task}", task=task, overlap=1))
        service.set_member(s, project, MemberIn(username="ann"))
        data = json.dumps({"prompt_id": "q", "prompt": prompt, "completions": candidates}).encode()
        service.import_items(s, project, service.parse_upload("c.jsonl", data, task))
        return project.id


def task_page(app: Any, pid: int) -> tuple[TestClient, Any]:
    """ann's logged-in client and the task page she is sent to."""
    client = TestClient(app)
    assert client.post("/api/login", json={"username": "ann", "password": PASSWORD}).status_code == 200
    r = client.get(f"/p/{pid}/next")
    assert r.status_code == 200 and "/items/" in str(r.url), r.text[:300]
    return client, r


def test_the_page_grows_linearly_with_the_candidates(app: Any) -> None:
    """One rank field per candidate, not K choices per candidate: 1,000 candidates made 32 MB."""
    sizes = {}
    for k in (2, 100):
        pid = project_with(app, [f"Candidate answer number {j}: tea is best brewed hot." for j in range(k)])
        start = time.perf_counter()
        sizes[k] = len(task_page(app, pid)[1].content)
        print(f"K={k}: {sizes[k]:,} bytes in {time.perf_counter() - start:.2f} s")
    per_candidate = (sizes[100] - sizes[2]) / 98
    assert per_candidate < 2_000, f"{per_candidate:.0f} bytes per candidate"
    assert sizes[100] < 100 * 2_000 + 20_000


def test_model_text_is_rendered_as_markdown_with_raw_html_escaped(app: Any) -> None:
    answer = (
        "Use **hot** water.\n\n"
        "```python\nprint('<script>alert(1)</script>')\n```\n\n"
        "<script>alert(2)</script> <img src=x onerror=alert(3)> [click](javascript:alert(4))"
    )
    chat = [{"role": "user", "content": "Make *tea*."}]
    pid = project_with(app, [answer, "Plain answer."], prompt=chat)  # type: ignore[arg-type]
    html = task_page(app, pid)[1].text
    assert "Use <strong>hot</strong> water." in html
    assert """<pre><code class="language-python">print('&lt;script&gt;alert(1)&lt;/script&gt;')""" in html
    assert "&lt;script&gt;alert(2)&lt;/script&gt; &lt;img src=x onerror=alert(3)&gt;" in html
    assert "<script>alert" not in html and "<img" not in html and 'href="javascript' not in html
    assert '<a rel="noopener noreferrer">click</a>' in html
    assert '<div class="role">user</div><div class="rendered md"><p>Make <em>tea</em>.</p>' in html
    # The text as written is there too, escaped, for the "Plain text" view.
    assert '<div class="raw text">Use **hot** water.' in html


def test_a_refused_submit_shows_its_error_in_the_decision_bar(app: Any) -> None:
    """Without JavaScript (or when the server refuses) the error is shown beside the submit button,
    which stays at the bottom of the window, not above responses the labeler has scrolled past."""
    client, page = task_page(app, project_with(app, ["first", "second", "third"]))
    html = page.text
    form = {name: html.split(f'name="{name}" value="')[1].split('"')[0] for name in ("csrf_token", "client_token")}
    first, *_ = [part.split('"')[0] for part in html.split('name="rank_')[1:]]
    r = client.post(str(page.url), data=form | {f"rank_{first}": "1"})
    assert r.status_code == 422
    bar = r.text.split('<div class="actionbar" id="actionbar">')[1]
    assert '<div class="alert error" role="alert" id="form-error" tabindex="-1">ranking: no rank for candidate' in bar
    assert bar.index('id="form-error"') < bar.index('id="submit"')
