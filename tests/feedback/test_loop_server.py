"""`rlhfkit loop` against a separately started labeling server on PostgreSQL: the loop talks to it
with the project owner's API key, each round a batch; the simulated panel labels over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit.config import load_config
from rlhfkit.feedback import service
from rlhfkit.feedback.client import FeedbackClient
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.live import LiveServer
from rlhfkit.feedback.schemas import UserIn
from rlhfkit.feedback.settings import ServeConfig
from rlhfkit.sim.embedded import panel_project
from rlhfkit.sim.panel import default_panel
from rlhfkit.stages import loop
from testutil import loop_inputs, loop_overrides


@pytest.mark.slow
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_rounds_against_a_postgres_server(db: Database, db_url: str, tmp_path: Path) -> None:
    with db.session(write=True) as s:
        service.create_user(s, UserIn(username="admin", password="tulip-orbit-canvas-9", is_owner=True))
    config = ServeConfig(db_url=db_url, secret_key_file=str(tmp_path / "secret.key"))
    password = "maple-river-stone-4"
    with LiveServer(config, db) as server, FeedbackClient.login(server.url, "admin", "tulip-orbit-canvas-9") as admin:
        project = panel_project(admin, "rounds", 5, default_panel(), password)["id"]
        key = admin.create_api_key("loop")
        out = tmp_path / "run"
        server_cfg = [f"server.url={server.url}", f"server.api_key={key}", f"server.project={project}"]
        cfg = load_config(
            loop.Config,
            None,
            loop_overrides(out, loop_inputs(tmp_path), *server_cfg, f"server.panel_password={password}"),
        )
        results = loop.run(cfg)
        batches = {b["batch"]: b for b in admin.progress(project)["batches"]}
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert {n: (b["items"], b["complete"], b["judgments"]) for n, b in batches.items()} == {
        "round-1": (4, 4, 20),
        "round-2": (4, 4, 20),
    }
    assert not (out / "server").exists()  # no embedded server was started
    assert json.loads((out / "results.json").read_text())["rounds"][1]["judgments"] == 20
