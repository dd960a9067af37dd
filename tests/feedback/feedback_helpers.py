"""Helpers shared by the feedback tests: seeded worlds and a live uvicorn server."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rlhfkit.feedback import service
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.models import Candidate, Item
from rlhfkit.feedback.schemas import MemberIn, ProjectIn, UserIn

PASSWORD = "correct-horse-9"
XSS = "<script>alert('xss')</script>"
ALPHA, BRAVO = "ALPHA-ONLY-TEXT", "BRAVO-ONLY-TEXT"
BROKEN = "half an emoji \ud83d"  # a lone UTF-16 surrogate, as JavaScript tools write it ("\\ud83d" in JSON)
# Markdown links that must not keep a script target (known filter bypasses), and links that must stay.
BYPASSES = [
    "[x](javascript&#58;alert(1))",
    "[x](javascript&#x3a;alert(1))",
    "[x](javascript&#X3A;alert(1))",
    "[x](javascript&colon;alert(1))",
    "[x](javascript&#0000058;alert(1))",
    "[x](&#106;avascript:alert(1))",
    "[x](java\tscript:alert(1))",
    "[x](<java\nscript:alert(1)>)",
    "[x](\x01javascript:alert(1))",
    "[x](JAVASCRIPT:alert(1))",
    "[x](JaVaScRiPt:alert(1))",
    "[x](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[x](vbscript:msgbox(1))",
    "[x][ref]\n\n[ref]: javascript&#58;alert(1)",
    "![x](javascript&#58;alert(1))",
    "![x](data:image/svg+xml,<svg onload=alert(1)>)",
]
SAFE_LINKS = {
    "[a](https://example.com/guide?x=1&y=2)": "https://example.com/guide?x=1&y=2",
    "[b](http://example.com)": "http://example.com",
    "[c](mailto:lead@example.com)": "mailto:lead@example.com",
    "[d](/p/1/next)": "/p/1/next",
    "[e](#ties)": "#ties",
    "[f](notes.html)": "notes.html",
}


def completions_jsonl(n: int, k: int = 3, prefix: str = "p", marker: str = "") -> str:
    """n prompts with k candidates each; every text carries a <script> to prove escaping, and
    `marker` lets a test check that one project's text never shows up in another's answers."""
    rows = [
        {
            "prompt_id": f"{prefix}{i}",
            "prompt": f"Question {i}: how do I make tea? {marker} {XSS}",
            "completions": [f"answer {i}.{j} {XSS if j == 0 else ''}".strip() for j in range(k)],
        }
        for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows)


@dataclass
class World:
    """Users and projects for authorization tests. Project A is the one under test; `eve` only
    labels project B, so she must never learn anything about A."""

    db: Database
    project_a: int = 0
    project_b: int = 0
    users: dict[str, int] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)


def seed(db: Database, items: int = 4, overlap: int = 2, task: str = "ranking") -> World:
    world = World(db)
    with db.session(write=True) as s:
        for name, owner in [
            ("owner", True),
            ("alice", False),
            ("ann", False),
            ("bob", False),
            ("eve", False),
        ]:
            user = service.create_user(s, UserIn(username=name, password=PASSWORD, is_owner=owner))
            world.users[name] = user.id
            world.keys[name] = service.create_api_key(s, user, "tests")
        world.users["extra"] = service.create_user(s, UserIn(username="extra")).id
        a = service.create_project(
            s, ProjectIn(name="Secret Project Alpha", task=task, overlap=overlap, guidelines="# Be **kind**")
        )
        b = service.create_project(s, ProjectIn(name="Project Bravo", overlap=1))
        for name, role in [("alice", "admin"), ("ann", "labeler"), ("bob", "labeler")]:
            service.set_member(s, a, MemberIn(username=name, role=role))
        service.set_member(s, b, MemberIn(username="eve", role="labeler"))
        world.project_a, world.project_b = a.id, b.id
        service.import_items(
            s, a, service.parse_upload("a.jsonl", completions_jsonl(items, marker=ALPHA).encode(), task)
        )
        service.import_items(
            s,
            b,
            service.parse_upload("b.jsonl", completions_jsonl(2, prefix="b", marker=BRAVO).encode(), "ranking"),
        )
    return world


def store_damaged_item(db: Database, project_id: int, key: str = "damaged") -> int:
    """An item as an older version stored it from an unchecked import: a lone surrogate in its
    text, first in the queue. No page or JSON answer can contain it (it is not valid UTF-8)."""
    with db.session(write=True) as s:
        item = Item(project_id=project_id, key=key, prompt=f"prompt with {BROKEN}", position=0)
        item.candidates = [Candidate(idx=0, text="fine"), Candidate(idx=1, text=BROKEN)]
        s.add(item)
        s.flush()
        return item.id


# ---------------------------------------------------------------- a real browser

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "feedback"
DESKTOP, PHONE = {"width": 1360, "height": 900}, {"width": 390, "height": 844}


def require_chromium() -> None:
    """Browser tests need Debian's chromium: skipped without it, but a failure on CI."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{CHROMIUM} is missing (make chromium installs Debian's package)")
        pytest.skip(f"{CHROMIUM} is missing; `apt-get install -y chromium`")


def launch(p):  # type: ignore[no-untyped-def]
    """Debian's headless Chromium, without its background traffic (nothing outside is reachable)."""
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


def shot(page, name: str, full: bool = True) -> None:  # type: ignore[no-untyped-def]
    """A screenshot for people to look at, test-artifacts/feedback/NAME.png (the whole page unless `full`)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=full)
