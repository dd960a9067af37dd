"""End to end in a real headless Chromium against `rlhfkit serve` started from the CLI: log in,
read the guidelines, rank with ties by mouse and by keyboard, flag an item, autosave a draft,
quick pairwise and demonstration modes, then the admin sees progress and exports.
Screenshots go to test-artifacts/feedback/."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from feedback_helpers import XSS

from rlhfkit.cli import main
from rlhfkit.data.formats import Completions, PromptRecord, write_records
from rlhfkit.feedback import service
from rlhfkit.feedback.client import FeedbackClient
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.models import Item

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS, SRC = ROOT / "test-artifacts" / "feedback", ROOT / "src"
PASSWORD = "browser-pass-1"


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
    for command in (
        ["create-owner", "root"],
        ["create-project", "Tea tasting", "--overlap", "2", "--guidelines", str(guidelines)],
        ["create-project", "Quick pairs", "--task", "pairwise", "--overlap", "1"],
        ["create-project", "Demonstrations", "--task", "demonstration", "--overlap", "1"],
        ["add-user", "ann", "--project", "Tea tasting"],
        ["import", "Tea tasting", str(write_records(tmp_path / "ranking.jsonl", ranking))],
        ["import", "Quick pairs", str(write_records(tmp_path / "pairs.jsonl", pairs))],
        ["import", "Demonstrations", str(write_records(tmp_path / "prompts.jsonl", prompts))],
        ["add-member", "ann", "Quick pairs"],
        ["add-member", "ann", "Demonstrations"],
        ["add-user", "bob", "--project", "Tea tasting", "--no-password"],
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
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    done: dict[int, tuple[dict[str, int], dict]] = {}  # item id -> (label -> candidate id, expectation)

    def shot(page, name: str) -> None:  # type: ignore[no-untyped-def]
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def labels(page) -> tuple[int, dict[str, int]]:  # type: ignore[no-untyped-def]
        item_id = int(page.url.split("/items/")[1].split("?")[0])
        cards = page.locator(".candidate")
        return item_id, {
            cards.nth(i).get_attribute("data-label"): int(cards.nth(i).get_attribute("data-cid"))
            for i in range(cards.count())
        }

    with sync_playwright() as p:
        browser = p.chromium.launch(
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
        context = browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True)
        page = context.new_page()
        page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status == 404 else None)

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
        expect(page.locator("#board")).to_be_visible()
        shot(page, "02-task")

        # Item 1, by mouse: A and B tie for best, C is worse.
        item_id, lab = labels(page)
        for label, rank in (("A", 1), ("B", 1), ("C", 2)):
            page.locator(f'.candidate[data-label="{label}"]').drag_to(page.locator(f'.lane[data-rank="{rank}"]'))
        expect(page.locator("#summary")).to_have_text("Your ranking: A = B  ›  C")
        expect(page.locator('.lane[data-rank="1"] .candidate')).to_have_count(2)
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
        expect(page.locator("#summary")).to_contain_text("Give every response a rank first")
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

        # Item 4: rank with the dropdowns, leaving a gap (1 and 3); the draft survives a reload.
        item_id, lab = labels(page)
        page.select_option(f'select[name="rank_{lab["C"]}"]', "1")
        expect(page.locator("#draft-status")).to_have_text("Draft saved")
        page.reload()
        expect(page.locator(f'select[name="rank_{lab["C"]}"]')).to_have_value("1")
        expect(page.locator('.lane[data-rank="1"] .candidate')).to_have_attribute("data-label", "C")
        page.select_option(f'select[name="rank_{lab["A"]}"]', "3")
        page.select_option(f'select[name="rank_{lab["B"]}"]', "3")
        page.click("#submit")  # ranks 1, 3, 3 are closed up to 1, 2, 2 on the way out
        done[item_id] = (lab, {"ranks": {"C": 1, "A": 2, "B": 2}})
        expect(page.get_by_role("heading", name="All done for now")).to_be_visible()
        shot(page, "05-all-done")

        # Quick pairwise mode: key 2 = "B is better".
        page.goto(url + "/")
        page.locator("section.project", has_text="Quick pairs").get_by_role("link", name="Start labeling").click()
        expect(page.locator(".choices button")).to_have_count(4)
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
        admin = context.browser.new_context(viewport={"width": 1360, "height": 900}, accept_downloads=True).new_page()
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
