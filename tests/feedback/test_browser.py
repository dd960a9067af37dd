"""End to end in a real headless Chromium against `rlhfkit serve` started from the CLI: log in,
read the guidelines, rank with ties by mouse and by keyboard, flag an item, autosave a draft,
quick pairwise and demonstration modes, then the admin sees progress and exports.
Screenshots go to test-artifacts/feedback/."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from feedback_helpers import XSS
from sqlalchemy import select

from rlhfkit.cli import main
from rlhfkit.data.formats import Completions, PromptRecord, write_records
from rlhfkit.feedback import service
from rlhfkit.feedback.client import FeedbackClient
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.models import Item, Judgment

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS, SRC = ROOT / "test-artifacts" / "feedback", ROOT / "src"
PASSWORD = "browser-pass-1"
DESKTOP, PHONE = {"width": 1360, "height": 900}, {"width": 390, "height": 844}
# Four long Markdown answers, as a chat model writes them: a heading, a long paragraph, a list, code,
# and raw HTML that must stay text.
LONG = [
    f"## Option {j}\n\n"
    + f"Warm the pot, then steep the leaves for {j + 2} minutes and taste. " * 25
    + "\n\n1. Boil the water.\n2. Pour it over the leaves.\n\n"
    + f"```python\ndef brew(minutes={j + 2}):\n    return '<b>tea</b>' * minutes\n```\n\n"
    + f"That is all {XSS} <b>really</b>."
    for j in range(4)
]


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """A seeded database and `rlhfkit serve` running in a subprocess on a free loopback port."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{CHROMIUM} is missing (make chromium installs Debian's package)")
        pytest.skip(f"{CHROMIUM} is missing; `apt-get install -y chromium`")
    db_url = f"sqlite:///{tmp_path}/feedback.db"
    db = f"db_url={db_url}"
    monkeypatch.setenv("RLHFKIT_PASSWORD", PASSWORD)
    guidelines = tmp_path / "guidelines.md"
    guidelines.write_text("# Rank by helpfulness\n\nPrefer **correct** answers. Ties are fine.\n")
    ranking = [
        Completions(
            prompt_id=f"tea{i}",
            prompt=f"How should I brew tea #{i}? {XSS}",
            completions=[f"Boil water, steep {i + 2} minutes. {XSS}", "Use cold water.", "Tea is a drink."],
        )
        for i in range(4)
    ]
    pairs = [Completions(prompt_id="pair0", prompt="Greet me.", completions=["Hello there!", "Go away."])]
    prompts = [PromptRecord(id="demo0", prompt="Write a haiku about rain.")]
    long = [
        Completions(prompt_id=f"long{i}", prompt=f"Explain how to brew tea, with code. #{i}", completions=LONG)
        for i in range(3)
    ]
    many = [Completions(prompt_id="many0", prompt="Which tea?", completions=[f"Tea number {j}" for j in range(12)])]
    for command in (
        ["create-owner", "root"],
        ["create-project", "Tea tasting", "overlap=2", f"guidelines={guidelines}"],
        ["create-project", "Quick pairs", "task=pairwise", "overlap=1"],
        ["create-project", "Demonstrations", "task=demonstration", "overlap=1"],
        ["add-user", "ann", "project=Tea tasting"],
        ["import", "Tea tasting", str(write_records(tmp_path / "ranking.jsonl", ranking))],
        ["import", "Quick pairs", str(write_records(tmp_path / "pairs.jsonl", pairs))],
        ["import", "Demonstrations", str(write_records(tmp_path / "prompts.jsonl", prompts))],
        ["add-member", "ann", "Quick pairs"],
        ["add-member", "ann", "Demonstrations"],
        ["add-user", "bob", "project=Tea tasting", "no_password=true"],
        ["create-project", "Long answers", "overlap=1"],
        ["create-project", "Many answers", "overlap=1"],
        ["import", "Long answers", str(write_records(tmp_path / "long.jsonl", long))],
        ["import", "Many answers", str(write_records(tmp_path / "many.jsonl", many))],
        ["add-member", "ann", "Long answers"],
        ["add-member", "ann", "Many answers"],
    ):
        assert main(["serve", *command, db]) == 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = os.environ | {"PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rlhfkit.cli",
            "serve",
            db,
            f"port={port}",
            f"secret_key_file={tmp_path}/secret",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/login", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"rlhfkit serve did not start:\n{proc.communicate()[0]}")
            time.sleep(0.1)
        yield url, db_url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def shot(page, name: str, full: bool = True) -> None:  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full)


def labels(page) -> tuple[int, dict[str, int]]:  # type: ignore[no-untyped-def]
    """(item id, display label -> candidate id) of the task page shown."""
    item_id = int(page.url.split("/items/")[1].split("?")[0])
    cards = page.locator(".candidate")
    return item_id, {
        cards.nth(i).get_attribute("data-label"): int(cards.nth(i).get_attribute("data-cid"))
        for i in range(cards.count())
    }


def launch(p):  # type: ignore[no-untyped-def]
    return p.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ],
    )


def watch(page, problems: list[str]) -> None:  # type: ignore[no-untyped-def]
    """Record what must never happen: dialogs (an injected alert), console errors, 404s."""
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status == 404 else None)


def rank_button(page, label: str, rank: int):  # type: ignore[no-untyped-def]
    """The rank button `rank` on the card of response `label`: the page's primary way to rank."""
    return page.locator(f'.candidate[data-label="{label}"] .rank-buttons button[data-rank="{rank}"]')


def test_label_and_administer_in_a_real_browser(server: tuple[str, str]) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, db_url = server
    bob_key = subprocess.run(
        [sys.executable, "-m", "rlhfkit.cli", "serve", "api-key", "bob", f"db_url={db_url}"],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | {"PYTHONPATH": str(SRC)},
    ).stdout.strip()
    problems: list[str] = []
    done: dict[int, tuple[dict[str, int], dict]] = {}  # item id -> (label -> candidate id, expectation)

    with sync_playwright() as p:
        browser = launch(p)
        context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
        page = context.new_page()
        watch(page, problems)

        # Log in and open the first project.
        page.goto(url + "/")
        expect(page).to_have_url(f"{url}/login?next=/")
        shot(page, "00-login")
        page.fill("input[name=username]", "ann")
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit]")
        expect(page.get_by_role("heading", name="Your projects")).to_be_visible()
        shot(page, "01-home")
        page.locator("section.project", has_text="Tea tasting").get_by_role("link", name="Start labeling").click()
        expect(page.locator(".guidelines")).to_contain_text("Prefer correct answers. Ties are fine.")
        expect(page.locator(".prompt")).to_contain_text(f"How should I brew tea #0? {XSS}")  # shown as text
        expect(page.locator(".candidate .rank-buttons")).to_have_count(3)
        shot(page, "02-task")

        # Item 1, by mouse: A and B tie for best, C is worse.
        item_id, lab = labels(page)
        for label, rank in (("A", 1), ("B", 1), ("C", 2)):
            rank_button(page, label, rank).click()
        expect(page.locator("#summary")).to_have_text("Your ranking: A = B  ›  C")
        expect(page.locator('.rank-buttons button[data-rank="1"][aria-pressed="true"]')).to_have_count(2)
        expect(page.locator("#draft-status")).to_have_text("Draft saved")
        shot(page, "03-ranked-by-mouse")
        page.click("#submit")
        expect(page.locator("#saved-toast")).to_be_visible()
        done[item_id] = (lab, {"ranks": {"A": 1, "B": 1, "C": 2}})

        # Item 2, by keyboard: B best, A and C tie second; Enter submits.
        item_id, lab = labels(page)
        page.locator('.candidate[data-label="B"]').focus()
        page.keyboard.press("1")  # B -> 1; focus moves on to the first response still unranked (A)
        page.keyboard.press("2")  # A -> 2; then C
        page.keyboard.press("2")  # C -> 2: a tie
        expect(page.locator("#summary")).to_have_text("Your ranking: B  ›  A = C")
        shot(page, "04-ranked-by-keyboard")
        page.keyboard.press("Enter")
        expect(page.locator("#saved-toast")).to_be_visible()
        done[item_id] = (lab, {"ranks": {"B": 1, "A": 2, "C": 2}})

        # Item 3: not rankable, with a comment.
        item_id, lab = labels(page)
        page.keyboard.press("Enter")  # nothing ranked and not flagged: refused in the page
        expect(page.locator("#form-error")).to_contain_text("Give every response a rank first")
        expect(page.locator("#form-error")).to_be_in_viewport()
        page.check("input[name=unusable]")
        page.fill("textarea[name=comment]", "All three miss the point <b>really</b>")
        page.click("#submit")
        expect(page.locator("#saved-toast")).to_be_visible()
        done[item_id] = (
            lab,
            {
                "ranks": {"A": 1, "B": 1, "C": 1},
                "unusable": True,
                "comment": "All three miss the point <b>really</b>",
            },
        )

        # Item 4: leave a gap (ranks 1 and 3); the draft survives a reload.
        item_id, lab = labels(page)
        rank_button(page, "C", 1).click()
        expect(page.locator("#draft-status")).to_have_text("Draft saved")
        page.reload()
        expect(page.locator(f'input[name="rank_{lab["C"]}"]')).to_have_value("1")
        expect(rank_button(page, "C", 1)).to_have_attribute("aria-pressed", "true")
        rank_button(page, "A", 3).click()
        rank_button(page, "B", 3).click()
        page.click("#submit")  # ranks 1, 3, 3 are closed up to 1, 2, 2 on the way out
        done[item_id] = (lab, {"ranks": {"C": 1, "A": 2, "B": 2}})
        expect(page.get_by_role("heading", name="All done for now")).to_be_visible()
        shot(page, "05-all-done")

        # Quick pairwise mode: key 2 = "B is better".
        page.goto(url + "/")
        page.locator("section.project", has_text="Quick pairs").get_by_role("link", name="Start labeling").click()
        expect(page.locator('#actionbar button[name="choice"]')).to_have_count(4)
        shot(page, "06-pairwise")
        pair_item, pair_lab = labels(page)
        page.keyboard.press("2")
        expect(page.get_by_role("heading", name="All done for now")).to_be_visible()

        # Demonstration: write, Ctrl+Enter.
        page.goto(url + "/")
        page.locator("section.project", has_text="Demonstrations").get_by_role("link", name="Start labeling").click()
        page.fill(
            "textarea[name=response]",
            "Soft rain on the roof\nthe kettle sings its answer\ntea leaves slowly bloom",
        )
        shot(page, "07-demonstration")
        page.keyboard.press("Control+Enter")
        expect(page.get_by_role("heading", name="All done for now")).to_be_visible()

        # A second labeler (a script with an API key) ranks every item: steeping first, the rest tied.
        with FeedbackClient(url, api_key=bob_key) as bob:
            while (item := bob.next_item(1)) is not None:
                ranks = {c["id"]: 1 if "steep" in c["text"] else 2 for c in item["candidates"]}
                bob.submit(1, item["item_id"], ranks)

        # The admin sees progress and agreement, and exports what ann did.
        admin = context.browser.new_context(viewport=DESKTOP, accept_downloads=True).new_page()
        admin.on("console", lambda m: problems.append(f"admin console: {m.text}") if m.type == "error" else None)
        admin.goto(url + "/login")
        admin.fill("input[name=username]", "root")
        admin.fill("input[name=password]", PASSWORD)
        admin.click("button[type=submit]")
        admin.locator("section.project", has_text="Tea tasting").get_by_role("link", name="Admin").click()
        row = admin.locator("#progress tbody tr", has_text="ann")
        expect(row.locator("td").nth(2)).to_have_text("4")  # submitted
        expect(row.locator("td").nth(3)).to_have_text("1")  # flagged
        expect(admin.locator("#progress")).to_contain_text("4 of 4 items complete")
        expect(admin.locator("#agreement")).to_contain_text("Over 3 items with two or more usable rankings")
        shot(admin, "08-admin")
        with admin.expect_download() as download:
            admin.locator('a[href$="/export/judgments"]').click()
        exported = [
            r
            for line in Path(download.value.path()).read_text().splitlines()
            if (r := json.loads(line))["labeler"] == "ann"
        ]
        browser.close()

    assert not problems, problems
    database = Database(db_url)
    with database.session() as s:
        expected = []
        for item_id, (lab, want) in done.items():
            item = s.get(Item, item_id)
            idx = {c.id: c.idx for c in item.candidates}
            ranking = [0] * len(idx)
            for label, rank in want["ranks"].items():
                ranking[idx[lab[label]]] = rank
            expected.append(
                {
                    "prompt_id": item.key,
                    "labeler": "ann",
                    "ranking": ranking,
                    "unusable": want.get("unusable", False),
                }
                | ({"comment": want["comment"]} if "comment" in want else {})
            )
        pair_idx = {c.id: c.idx for c in s.get(Item, pair_item).candidates}
        (pair_judgment,) = service.rankings_of(s, service.find_project(s, "Quick pairs"))
        (demo,) = service.demonstrations_of(s, service.find_project(s, "Demonstrations"))
    database.dispose()
    assert sorted(exported, key=lambda r: r["prompt_id"]) == sorted(expected, key=lambda r: r["prompt_id"])
    # "B is better" means the candidate shown second, whatever its place in the imported file.
    assert pair_judgment.ranking[pair_idx[pair_lab["B"]]] == 1 and pair_judgment.ranking[pair_idx[pair_lab["A"]]] == 2
    assert demo.response.startswith("Soft rain on the roof\nthe kettle")


def log_in(page, url: str, project: str) -> None:  # type: ignore[no-untyped-def]
    """Log in as ann and start labeling `project`."""
    page.goto(url + "/login")
    page.fill("input[name=username]", "ann")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.locator("section.project", has_text=project).get_by_role("link", name="Start labeling").click()


def test_long_responses_are_ranked_in_view_on_a_laptop_and_a_phone(server: tuple[str, str]) -> None:
    """Four long Markdown answers: rendered safely, folded with "Show all", ranked on each card with
    the controls, errors and the submit button in view, at 1360x900 and at 390x844; and 12
    candidates, ranked by typing."""
    from playwright.sync_api import expect, sync_playwright

    url, db_url = server
    problems: list[str] = []
    done: dict[int, tuple[dict[str, int], dict[str, int]]] = {}  # item -> (label -> candidate id, ranks)
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_context(viewport=DESKTOP).new_page()
        watch(page, problems)
        log_in(page, url, "Long answers")
        cards = page.locator(".candidate")
        expect(cards).to_have_count(4)

        # Markdown is rendered, raw HTML in it stays text.
        expect(page.locator(".candidate .rendered h2")).to_have_count(4)
        expect(page.locator(".candidate .rendered ol li")).to_have_count(8)
        expect(cards.first.locator(".rendered pre code")).to_contain_text("return '<b>tea</b>' * minutes")
        expect(cards.first.locator(".rendered")).to_contain_text(f"{XSS} <b>really</b>")
        expect(page.locator(".candidate b, .candidate script")).to_have_count(0)

        # Everything needed to decide is in view at once: every rank control and the submit button.
        for i in range(4):
            expect(cards.nth(i).locator(".rank-buttons")).to_be_in_viewport()
        expect(page.locator("#submit")).to_be_in_viewport()
        shot(page, "10-long-desktop", full=False)

        # A long answer unfolds and folds again; the plain-text view shows the Markdown as written.
        first = cards.first
        folded = first.locator(".card-body").bounding_box()["height"]
        first.get_by_role("button", name="Show all").click()
        expect(first.locator(".expand")).to_have_attribute("aria-expanded", "true")
        assert first.locator(".card-body").bounding_box()["height"] > 2 * folded
        first.locator("pre").scroll_into_view_if_needed()
        shot(page, "11-long-expanded", full=False)
        first.get_by_role("button", name="Show less").click()
        expect(first.locator(".expand")).to_have_attribute("aria-expanded", "false")
        page.click("#plain-toggle")
        expect(first.locator(".raw")).to_be_visible()
        expect(first.locator(".raw")).to_contain_text("## Option")
        expect(first.locator(".rendered")).to_be_hidden()
        shot(page, "12-long-plain-text", full=False)
        page.click("#plain-toggle")
        expect(first.locator(".rendered")).to_be_visible()

        # Item 1, by mouse. Submitting too early says so beside the button and shows what is missing.
        item_id, lab = labels(page)
        rank_button(page, "A", 2).click()
        page.click("#submit")
        expect(page.locator("#form-error")).to_contain_text("(B, C, D still without one)")
        expect(page.locator("#form-error")).to_be_in_viewport()
        expect(page.locator('.candidate[data-label="B"]')).to_be_focused()
        shot(page, "13-long-error", full=False)
        for label, rank in (("B", 1), ("C", 3), ("D", 4)):
            rank_button(page, label, rank).click()
        expect(page.locator("#form-error")).to_be_hidden()
        expect(page.locator("#summary")).to_have_text("Your ranking: B  ›  A  ›  C  ›  D")
        page.click("#submit")
        expect(page.locator("#saved-toast")).to_be_visible()
        done[item_id] = (lab, {"B": 1, "A": 2, "C": 3, "D": 4})

        # Item 2, by keyboard: each digit ranks the focused answer and moves on to the next one.
        item_id, lab = labels(page)
        cards.first.focus()
        for label, digit in zip("ABCD", "4321", strict=True):
            expect(page.locator(f'.candidate[data-label="{label}"]')).to_be_focused()
            page.keyboard.press(digit)
            expect(page.locator(".candidate:focus")).to_be_in_viewport()
        page.keyboard.press("e")  # unfold the focused answer (D) and fold it again
        expect(page.locator('.candidate[data-label="D"]')).to_have_class(re.compile(r"\bexpanded\b"))
        page.keyboard.press("e")
        expect(page.locator('.candidate[data-label="D"]')).not_to_have_class(re.compile(r"\bexpanded\b"))
        page.keyboard.press("Enter")
        expect(page.locator("#saved-toast")).to_be_visible()
        done[item_id] = (lab, {"A": 4, "B": 3, "C": 2, "D": 1})

        # On a phone: one column, the decision bar at the bottom of the screen.
        phone = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True).new_page()
        watch(phone, problems)
        log_in(phone, url, "Long answers")
        expect(phone.locator("#submit")).to_be_in_viewport()
        shot(phone, "14-long-phone", full=False)
        item_id, lab = labels(phone)
        for label, rank in (("A", 1), ("B", 1), ("C", 2)):
            rank_button(phone, label, rank).click()
        phone.click("#submit")
        expect(phone.locator("#form-error")).to_contain_text("(D still without one)")
        expect(phone.locator("#form-error")).to_be_in_viewport()
        expect(phone.locator('.candidate[data-label="D"]')).to_be_focused()
        expect(phone.locator('.candidate[data-label="D"] .rank-buttons')).to_be_in_viewport()
        shot(phone, "15-long-phone-error", full=False)
        rank_button(phone, "D", 3).click()
        expect(phone.locator("#summary")).to_have_text("Your ranking: A = B  ›  C  ›  D")
        phone.click("#submit")
        expect(phone.get_by_role("heading", name="All done for now")).to_be_visible()
        done[item_id] = (lab, {"A": 1, "B": 1, "C": 2, "D": 3})

        # Twelve candidates: a rank box each (no row of twelve buttons); a digit on a card types into it.
        page.goto(url + "/")
        page.locator("section.project", has_text="Many answers").get_by_role("link", name="Start labeling").click()
        expect(page.locator(".rank-buttons")).to_have_count(0)
        item_id, lab = labels(page)
        page.locator('.candidate[data-label="A"]').focus()
        page.keyboard.type("12")
        expect(page.locator(f'input[name="rank_{lab["A"]}"]')).to_have_value("12")
        for j, label in enumerate("BCDEFGHIJKL"):
            page.fill(f'input[name="rank_{lab[label]}"]', str(11 - j))
        expect(page.locator("#summary")).to_contain_text("Your ranking: L  ›  K  ›  J")
        shot(page, "16-many-candidates", full=False)
        page.keyboard.press("Enter")  # in a rank box, Enter submits the form
        expect(page.get_by_role("heading", name="All done for now")).to_be_visible()
        done[item_id] = (lab, {label: 12 - j for j, label in enumerate("ABCDEFGHIJKL")})
        browser.close()

    assert not problems, problems
    database = Database(db_url)
    with database.session() as s:
        for item_id, (lab, ranks) in done.items():
            idx = {c.id: c.idx for c in s.get(Item, item_id).candidates}
            want = [0] * len(idx)
            for label, rank in ranks.items():
                want[idx[lab[label]]] = rank
            assert s.scalar(select(Judgment.ranking).where(Judgment.item_id == item_id)) == want
    database.dispose()
