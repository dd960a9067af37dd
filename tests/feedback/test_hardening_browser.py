"""Issue 12 in a real headless Chromium: what the browser makes of the guidelines' links, and a
labeler whose first item was stored damaged (before imports were checked)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from feedback_helpers import BYPASSES, PASSWORD, SAFE_LINKS, World, seed, store_damaged_item

from rlhfkit.feedback.db import Database
from rlhfkit.feedback.live import LiveServer
from rlhfkit.feedback.models import Project
from rlhfkit.feedback.settings import ServeConfig

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Database, World]]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{CHROMIUM} is missing (make chromium installs Debian's package)")
        pytest.skip(f"{CHROMIUM} is missing; `apt-get install -y chromium`")
    config = ServeConfig(db_url=f"sqlite:///{tmp_path}/feedback.db", secret_key_file=str(tmp_path / "secret"))
    db = Database(config.db_url)
    db.migrate()
    world = seed(db, items=3, overlap=1)
    with LiveServer(config, db) as server:
        yield server.url, db, world
    db.dispose()


@contextmanager
def labeler_page(url: str, project_id: int) -> Iterator[tuple[Any, list[str]]]:
    """Chromium logged in as ann, on the project's next item; and every 5xx and page error seen."""
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 500 else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.goto(f"{url}/login?next=/p/{project_id}/next")
        page.fill("input[name=username]", "ann")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_load_state()
        yield page, problems
        browser.close()


def test_guideline_links_never_point_at_script(served: tuple[str, Database, World]) -> None:
    url, db, world = served
    with db.session(write=True) as s:
        s.get(Project, world.project_a).guidelines = "\n\n".join([*BYPASSES, *SAFE_LINKS])
    with labeler_page(url, world.project_a) as (page, problems):
        # What the browser itself resolved each link and image to, after decoding the attribute.
        targets = page.eval_on_selector_all(
            ".guidelines a[href], .guidelines img[src]", "els => els.map(e => e.href || e.src)"
        )
        assert not problems, problems
    assert targets, "the guidelines' safe links are missing"
    assert {urlsplit(t).scheme for t in targets} <= {"http", "https", "mailto"}, targets
    assert "https://example.com/guide?x=1&y=2" in targets and f"{url}/p/1/next" in targets


def test_a_damaged_item_does_not_stop_a_labeler(served: tuple[str, Database, World]) -> None:
    url, db, world = served
    store_damaged_item(db, world.project_a)
    with labeler_page(url, world.project_a) as (page, problems):
        from playwright.sync_api import expect

        for _ in range(2):  # and on a reload: their unfinished item is the good one now
            expect(page.locator(".prompt")).to_contain_text("Question 0: how do I make tea?")
            expect(page.locator(".candidate")).to_have_count(3)
            page.reload()
        assert not problems, problems
