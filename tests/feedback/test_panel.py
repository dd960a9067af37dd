"""The simulated panel (demo and tests only) ranks through the real server, deterministically."""

from __future__ import annotations

from pathlib import Path

from feedback_helpers import PASSWORD, completions_jsonl

from rlhfkit.feedback import service
from rlhfkit.feedback.client import FeedbackClient
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.live import LiveServer
from rlhfkit.feedback.schemas import UserIn
from rlhfkit.feedback.settings import ServeConfig
from rlhfkit.sim.panel import SimulatedLabeler, label_over_http

PANEL = [
    SimulatedLabeler("careful", noise=0.05, tie_margin=0.0),
    SimulatedLabeler("noisy", noise=1.0),
    SimulatedLabeler("careless", noise=0.0, careless=True),
]
ITEMS, K = 6, 3


def label(folder: Path, seed: int) -> list[tuple[str, str, list[int]]]:
    """A fresh SQLite server, the panel ranks every item twice over; (prompt, labeler, ranking) rows."""
    folder.mkdir()
    db_url = f"sqlite:///{folder / 'feedback.db'}"
    db = Database(db_url)
    db.migrate()
    with db.session(write=True) as s:
        service.create_user(s, UserIn(username="owner", password=PASSWORD, is_owner=True))
    # the candidate j of every prompt is worth j: the careful labeler must rank the last one first
    data = completions_jsonl(ITEMS, k=K)
    utility = {(f"p{i}", f"answer {i}.{j}" + (" <script>alert('xss')</script>" if j == 0 else "")): float(j)
               for i in range(ITEMS) for j in range(K)}  # fmt: skip
    config = ServeConfig(db_url=db_url, secret_key_file=str(folder / "secret"))
    with LiveServer(config, db) as server, FeedbackClient.login(server.url, "owner", PASSWORD) as owner:
        project = owner.create_project("panel", overlap=2)
        for labeler in PANEL:
            owner.create_user(labeler.name, PASSWORD)
            owner.set_member(project["id"], labeler.name)
        owner.import_jsonl(project["id"], data, filename="c.jsonl")
        counts = label_over_http(server.url, project["id"], PANEL, PASSWORD, utility, seed)
        rows = owner.export(project["id"], "judgments")
    db.dispose()
    assert sum(counts.values()) == ITEMS * 2
    return sorted((r["prompt_id"], r["labeler"], r["ranking"]) for r in rows)


def test_panel_is_deterministic_and_careful_labelers_follow_the_utility(tmp_path: Path) -> None:
    first, again, other = label(tmp_path / "a", 0), label(tmp_path / "b", 0), label(tmp_path / "c", 1)
    assert first == again  # same seed, same labels, whatever the server's timing
    assert first != other
    careful = [ranking for _, labeler, ranking in first if labeler == "careful"]
    assert careful and all(r == [3, 2, 1] for r in careful)
