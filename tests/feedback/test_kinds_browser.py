"""Rating (two criteria) and thumbs projects in a real headless Chromium: scored by keyboard alone,
the draft kept across a reload, a half-scored submit refused beside the button, thumbs by mouse,
and on a phone. Screenshots go to test-artifacts/feedback/kinds-*.png."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from feedback_helpers import DESKTOP, PASSWORD, PHONE, XSS, launch, require_chromium, shot, watch
from sqlalchemy import select

from rlhfkit.feedback import service
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.live import LiveServer
from rlhfkit.feedback.models import Judgment
from rlhfkit.feedback.schemas import Criterion, MemberIn, ProjectIn, UserIn
from rlhfkit.feedback.settings import ServeConfig

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ITEMS = [
    {
        "prompt_id": f"q{i}",
        "prompt": f"How do I keep **basil** alive? #{i}",
        "completions": [f"Water it daily. {XSS}", "Give it sun and drain the pot.", "Basil cannot be kept alive."],
    }
    for i in range(2)
]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Database, int, int]]:
    require_chromium()
    config = ServeConfig(db_url=f"sqlite:///{tmp_path}/feedback.db", secret_key_file=str(tmp_path / "secret"))
    db = Database(config.db_url)
    db.migrate()
    data = "".join(json.dumps(r) + "\n" for r in ITEMS).encode()
    criteria = [
        Criterion(name="helpful", min=1, max=7, guideline=f"Does it **answer** the question? {XSS}"),
        Criterion(name="harmless", min=1, max=5, guideline="Could following it hurt the plant?"),
    ]
    with db.session(write=True) as s:
        service.create_user(s, UserIn(username="ann", password=PASSWORD))
        ids = []
        for name, task in (("Basil ratings", "rating"), ("Basil thumbs", "thumbs")):
            project = service.create_project(
                s, ProjectIn(name=name, task=task, overlap=1, criteria=criteria if task == "rating" else None)
            )
            service.set_member(s, project, MemberIn(username="ann"))
            service.import_items(s, project, service.parse_upload("basil.jsonl", data, task))
            ids.append(project.id)
    with LiveServer(config, db) as server:
        yield server.url, db, ids[0], ids[1]
    db.dispose()


def log_in(page: Any, url: str, path: str) -> None:
    page.goto(f"{url}/login?next={path}")
    page.fill("input[name=username]", "ann")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_load_state()


def judgments(db: Database) -> list[dict[str, list[int]]]:
    with db.session() as s:
        return [j.scores for j in s.scalars(select(Judgment).order_by(Judgment.id))]


def test_rating_by_keyboard_with_draft_and_refusal(served: tuple[str, Database, int, int]) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, db, rating, _ = served
    problems: list[str] = []
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_context(viewport=DESKTOP).new_page()
        watch(page, problems)
        log_in(page, url, f"/p/{rating}/next")
        expect(page.locator("#criteria")).to_contain_text(XSS)  # shown as text, never run
        expect(page.locator("#criteria strong")).to_have_text("answer")  # the guideline's Markdown
        shot(page, "kinds-01-rating")

        # j takes the first score row (response A, helpful); a digit scores it and moves on.
        page.keyboard.press("j")
        for key in ("6", "3", "5"):
            page.keyboard.press(key)
        expect(page.locator("#draft-status")).to_have_text("Draft saved")
        page.reload()  # the autosaved draft comes back
        expect(page.locator("input[data-criterion]:checked")).to_have_count(3)

        page.keyboard.press("Enter")  # three rows still open: refused in the page, nothing sent
        expect(page.locator("#form-error")).to_contain_text("Score every response on every criterion")
        expect(page.locator(".candidate.needs-rank")).to_have_count(2)
        shot(page, "kinds-02-rating-refused", full=False)
        assert judgments(db) == []

        focused = page.evaluate("document.activeElement.closest('.score-row').dataset.criterion")
        assert focused == "harmless"  # the first open row: response B, harmless
        for key in ("2", "1", "1"):
            page.keyboard.press(key)
        page.keyboard.press("Enter")
        expect(page.locator("#saved-toast")).to_be_visible()
        [scores] = judgments(db)
        assert sorted(scores["helpful"]) == [1, 5, 6] and sorted(scores["harmless"]) == [1, 2, 3]

        # On a phone: the score rows wrap, none is cut off.
        phone = browser.new_context(viewport=PHONE).new_page()
        watch(phone, problems)
        log_in(phone, url, f"/p/{rating}/next")
        shot(phone, "kinds-03-rating-phone")
        wide = phone.evaluate(
            """Array.from(document.querySelectorAll('.score-row, .score-row *, .criteria *'))
               .filter((e) => e.getBoundingClientRect().right > document.documentElement.clientWidth + 1)
               .map((e) => e.tagName + '.' + e.className)"""
        )
        assert wide == [], wide
        browser.close()
    assert problems == []


def test_thumbs_by_mouse_and_keys(served: tuple[str, Database, int, int]) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, db, _, thumbs = served
    problems: list[str] = []
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_context(viewport=DESKTOP).new_page()
        watch(page, problems)
        log_in(page, url, f"/p/{thumbs}/next")
        cards = page.locator(".candidate")
        cards.nth(0).get_by_label("Thumbs up").click()
        cards.nth(1).get_by_label("Thumbs down").click()
        page.keyboard.press("0")  # the focused row is B's (just clicked); 0 gives B 👎, then C is next
        page.keyboard.press("0")
        expect(page.locator(".candidate.ranked")).to_have_count(3)
        shot(page, "kinds-04-thumbs")
        page.get_by_role("button", name="Submit").click()
        expect(page.locator("#saved-toast")).to_be_visible()
        [scores] = judgments(db)
        assert sorted(scores["thumbs"]) == [0, 0, 1]
        browser.close()
    assert problems == []


def test_chat_thumbs_and_a_pick(tmp_path: Path) -> None:
    """A conversation in the browser: Ctrl+Enter sends, 👍 on the answer, two answers side by side,
    the pick, and the reply box locked until the pick. Screenshots kinds-05/06-chat*.png."""
    from playwright.sync_api import expect, sync_playwright

    from testutil import make_test_model

    require_chromium()
    model = make_test_model("gpt2", tmp_path / "policy", texts=["User: Hi\nAssistant: Hello there!"] * 8)
    config = ServeConfig(
        db_url=f"sqlite:///{tmp_path}/feedback.db",
        secret_key_file=str(tmp_path / "secret"),
        chat_model=str(model),
        chat_max_new_tokens=8,
    )
    db = Database(config.db_url)
    db.migrate()
    with db.session(write=True) as s:
        service.create_user(s, UserIn(username="ann", password=PASSWORD))
    problems: list[str] = []
    with LiveServer(config, db) as server, sync_playwright() as p:
        browser = launch(p)
        page = browser.new_context(viewport=DESKTOP).new_page()
        watch(page, problems)
        log_in(page, server.url, "/chat")
        page.fill("textarea[name=content]", f"How do I keep basil alive? {XSS}")
        page.keyboard.press("Control+Enter")
        expect(page.locator(".msg-assistant")).to_have_count(1)
        expect(page.locator(".msg-user")).to_contain_text(XSS)  # shown as text, never run
        page.get_by_role("button", name="👍 Good").click()
        expect(page.get_by_role("button", name="👍 Good")).to_have_attribute("aria-pressed", "true")

        page.fill("textarea[name=content]", "And in winter?")
        page.get_by_label("Two answers, I pick the better").check()
        page.get_by_role("button", name="Send").click()
        expect(page.locator(".pick .candidate")).to_have_count(2)
        expect(page.locator("textarea[name=content]")).to_be_disabled()
        shot(page, "kinds-05-chat-pick")
        page.get_by_role("button", name="B is better").click()
        expect(page.locator(".msg-assistant")).to_have_count(2)
        expect(page.locator(".msg-assistant").nth(1)).to_contain_text("you picked B of two")
        expect(page.locator("textarea[name=content]")).to_be_enabled()
        shot(page, "kinds-06-chat")
        browser.close()
    db.dispose()
    assert problems == []
