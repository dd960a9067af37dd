"""The annotator's day in a real headless Chromium, at 1360x900 and on a phone (390x844): skip
by key, submit with a strength of preference, Undo from the "saved" flash into edit mode, the
history page; and an admin reviewing items, reading comments, sending one back and excluding a
labeler. Screenshots go to test-artifacts/feedback/day-*.png."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from feedback_helpers import DESKTOP, PASSWORD, PHONE, XSS, World, launch, require_chromium, seed, shot, watch
from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhfkit.feedback import service
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.live import LiveServer
from rlhfkit.feedback.models import Candidate, Item, Judgment, JudgmentHistory, Project
from rlhfkit.feedback.schemas import JudgmentIn, MemberIn, ProjectIn
from rlhfkit.feedback.settings import ServeConfig

pytestmark = [pytest.mark.browser, pytest.mark.slow]
LEASE = timedelta(hours=1)
PAIRS = [
    {"prompt_id": f"pair{i}", "prompt": f"Greet me politely, #{i}.", "completions": ["Hello there!", "Go away."]}
    for i in range(3)
]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Database, World, int]]:
    """A seeded app (ranking project A, overlap 2) plus a pairwise project for ann and alice."""
    require_chromium()
    config = ServeConfig(db_url=f"sqlite:///{tmp_path}/feedback.db", secret_key_file=str(tmp_path / "secret"))
    db = Database(config.db_url)
    db.migrate()
    world = seed(db, items=6, overlap=2)
    with db.session(write=True) as s:
        pairwise = service.create_project(s, ProjectIn(name="Greetings", task="pairwise", overlap=1))
        for name, role in (("ann", "labeler"), ("alice", "admin")):
            service.set_member(s, pairwise, MemberIn(username=name, role=role))
        data = "".join(json.dumps(p) + "\n" for p in PAIRS).encode()
        service.import_items(s, pairwise, service.parse_upload("pairs.jsonl", data, "pairwise"))
        pairwise_id = pairwise.id
    with LiveServer(config, db) as server:
        yield server.url, db, world, pairwise_id
    db.dispose()


def candidates(s: Session, item_id: int) -> list[tuple[int, int]]:
    """(id, idx) of an item's candidates."""
    rows = s.execute(select(Candidate.id, Candidate.idx).where(Candidate.item_id == item_id))
    return [(cid, idx) for cid, idx in rows]


def log_in(page: Any, url: str, username: str, path: str) -> None:
    page.goto(f"{url}/login?next={path}")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_load_state()


def item_id(page: Any) -> int:
    return int(page.url.split("/items/")[1].split("?")[0])


def test_a_labelers_day_skip_strength_undo_and_history(served: tuple[str, Database, World, int]) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, db, world, pairwise = served
    A = world.project_a
    problems: list[str] = []
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_context(viewport=DESKTOP).new_page()
        watch(page, problems)
        log_in(page, url, "ann", f"/p/{A}/next")

        # The s key skips: the next item comes, and the skipped one is not offered again.
        skipped = item_id(page)
        expect(page.locator("#skip")).to_be_in_viewport()
        shot(page, "day-01-task-with-skip", full=False)
        page.keyboard.press("s")
        expect(page).not_to_have_url(f"{url}/p/{A}/items/{skipped}")
        judged = item_id(page)

        # Rank by keys, say how much better each rank is, submit; the error is in view first.
        page.keyboard.press("Enter")
        expect(page.locator("#form-error")).to_be_in_viewport()
        expect(page.locator("#form-error")).to_have_attribute("role", "alert")  # announced (aria-live)
        expect(page.locator("#submit")).to_be_in_viewport()
        page.locator(".candidate").first.focus()
        for digit in "123":
            page.keyboard.press(digit)
        page.get_by_label("much better").check()
        shot(page, "day-02-ranked-with-strength", full=False)
        page.click("#submit")
        toast = page.locator("#saved-toast")
        expect(toast).to_be_visible()
        shot(page, "day-03-saved-with-undo", full=False)

        # Undo: back to the item just judged, filled in; change it and save.
        toast.get_by_role("link", name="Undo").click()
        expect(page).to_have_url(f"{url}/p/{A}/items/{judged}")
        expect(page.locator("#edit-note")).to_contain_text("You are changing your judgment")
        expect(page.locator('.rank-buttons button[aria-pressed="true"]')).to_have_count(3)
        expect(page.get_by_label("much better")).to_be_checked()
        expect(page.locator("#skip")).to_have_count(0)
        shot(page, "day-04-edit-mode", full=False)
        page.locator(".candidate").first.focus()
        page.keyboard.press("3")  # the first shown is now the worst
        page.locator('.candidate[data-label="C"]').focus()
        page.keyboard.press("1")
        page.get_by_label("slightly better").check()
        page.click("#submit")
        expect(page.locator("#saved-toast")).to_be_visible()

        # The history: newest first, the changed one marked; the skipped one can be put back.
        page.goto(f"{url}/p/{A}/history")
        expect(page.locator("#judgments tbody tr")).to_have_count(1)
        expect(page.locator("#judgments")).to_contain_text("changed")
        expect(page.locator("#judgments")).to_contain_text("(slightly better)")
        shot(page, "day-05-history")
        page.locator("#skipped").get_by_role("button", name="Put back").click()
        expect(page.locator(".toast")).to_contain_text("Put back")
        expect(page.locator("#skipped")).to_contain_text("No skipped items.")

        # Pairwise: 7 = much better, then 1 = A; on a phone the strength row and buttons are in view.
        phone = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True).new_page()
        watch(phone, problems)
        log_in(phone, url, "ann", f"/p/{pairwise}/next")
        expect(phone.locator("#strength")).to_be_in_viewport()
        expect(phone.locator('button[name="choice"][value="a"]')).to_be_in_viewport()
        expect(phone.locator("#skip")).to_be_in_viewport()
        shot(phone, "day-06-pairwise-phone", full=False)
        page.goto(f"{url}/p/{pairwise}/next")
        first_pair = item_id(page)
        page.keyboard.press("7")
        expect(page.get_by_label("much better")).to_be_checked()
        shot(page, "day-07-pairwise-strength", full=False)
        page.keyboard.press("1")
        expect(page.locator("#saved-toast")).to_be_visible()
        phone.goto(f"{url}/p/{pairwise}/next")  # the item it showed was judged on the laptop meanwhile
        assert item_id(phone) != first_pair
        phone.get_by_label("slightly better").check()
        phone.locator('button[name="choice"][value="b"]').click()
        expect(phone.locator("#saved-toast")).to_be_visible()
        shot(phone, "day-08-phone-saved", full=False)
        browser.close()

    assert not problems, problems
    with db.session() as s:
        ann = world.users["ann"]
        j = s.scalar(select(Judgment).where(Judgment.item_id == judged, Judgment.user_id == ann))
        assert j.strength == 1 and j.edited_at is not None
        old = s.scalars(select(JudgmentHistory).where(JudgmentHistory.item_id == judged)).all()
        assert [(h.strength, h.reason) for h in old] == [(3, "edited")]
        pair = s.scalar(select(Judgment).where(Judgment.item_id == first_pair, Judgment.user_id == ann))
        a_idx = {c.id: c.idx for c in s.get(Item, first_pair).candidates}
        assert pair.strength == 3 and pair.ranking.index(1) in a_idx.values()
        strengths = sorted(s.scalars(select(Judgment.strength).join(Item).where(Item.project_id == pairwise)))
        assert strengths == [1, 3]


def test_an_admin_reviews_sends_back_and_excludes(served: tuple[str, Database, World, int]) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, db, world, _ = served
    A = world.project_a
    with db.session(write=True) as s:  # ann and bob judge p0 in opposite orders; ann comments (with a <script>)
        project = s.get(Project, A)
        for name, reverse in (("ann", False), ("bob", True)):
            user = service.get_user(s, name)
            a = service.next_assignment(s, project, user, LEASE)
            ranks = [3, 2, 1] if reverse else [1, 2, 3]
            ranking = {cid: ranks[idx] for cid, idx in candidates(s, a.item_id)}
            comment = f"B is off-topic {XSS}" if name == "ann" else None
            data = JudgmentIn(ranking=ranking, comment=comment, client_token=f"seed-{name}-0001")
            service.submit(s, project, user, a.item_id, data)
        p0 = a.item_id
    problems: list[str] = []
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_context(viewport=DESKTOP).new_page()
        watch(page, problems)
        log_in(page, url, "alice", f"/p/{A}/admin")
        expect(page.locator("#labelers")).to_contain_text("Remaining")
        page.click("#review-link")
        expect(page.locator("#review-items tbody tr")).to_have_count(6)
        page.fill("input[name=min_disagreement]", "0.5")
        page.click("#filters button[type=submit]")
        expect(page.locator("#review-items tbody tr")).to_have_count(1)
        expect(page.locator("#review-items")).to_contain_text("100%")
        shot(page, "day-10-review-list")
        page.locator("#review-items a").first.click()
        expect(page).to_have_url(f"{url}/p/{A}/review/{p0}")
        expect(page.locator("#side-by-side")).to_contain_text(f"B is off-topic {XSS}")  # as text, escaped
        expect(page.locator("#side-by-side tbody tr")).to_have_count(2)
        expect(page.locator("#disagreement")).to_have_text("100%")
        shot(page, "day-11-review-item")

        phone = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True).new_page()
        watch(phone, problems)
        log_in(phone, url, "alice", f"/p/{A}/review/{p0}")
        expect(phone.locator("#side-by-side")).to_be_visible()
        shot(phone, "day-12-review-item-phone")

        page.click("#send-back-button")
        expect(page.locator(".toast")).to_contain_text("2 judgments moved to its history")
        expect(page.locator("#history tbody tr")).to_have_count(2)
        shot(page, "day-13-sent-back")

        # Exclude bob's judgments, then take them back in, from the admin page.
        with db.session(write=True) as s:
            project, bob = s.get(Project, A), service.get_user(s, "bob")
            a = service.next_assignment(s, project, bob, LEASE)
            ranking = {cid: 1 + idx for cid, idx in candidates(s, a.item_id)}
            service.submit(s, project, bob, a.item_id, JudgmentIn(ranking=ranking, client_token="bob-0002"))
        page.goto(f"{url}/p/{A}/admin")
        row = page.locator("#labelers tr", has_text="bob")
        row.get_by_role("button", name="exclude judgments").click()
        expect(page.locator("#labelers tr", has_text="bob")).to_contain_text("take back in")
        shot(page, "day-14-admin-excluded")
        phone.goto(f"{url}/p/{A}/admin")
        shot(phone, "day-15-admin-phone")
        page.locator("#labelers tr", has_text="bob").get_by_role("button", name="take back in").click()
        expect(page.locator("#labelers tr", has_text="bob")).to_contain_text("exclude judgments")
        browser.close()
    assert not problems, problems
