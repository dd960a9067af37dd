"""`rlhfkit demo-personal`, shrunken: users with opposite tastes label over HTTP, a personalised
reward model, pooled and personalised PPO, and the per-group report; a re-run reuses every stage."""

from __future__ import annotations

import json

import pytest

from rlhfkit.config import load_config
from rlhfkit.stages import demo_personal
from rlhfkit.stages.ppo import Config as PPOConfig
from test_demo import SMALL


@pytest.mark.slow
def test_demo_personal_runs_every_stage_and_reports_per_group(tmp_path, capsys):
    cfg = load_config(demo_personal.Config, None, [f"output_dir={tmp_path}", *SMALL, "feedback.overlap=4"])
    report = demo_personal.run(cfg)
    pairs = [json.loads(line) for line in (tmp_path / "feedback/labeler_pairs.jsonl").read_text().splitlines()]
    assert {p["user"] for p in pairs} == {"cara", "cole", "dana", "drew"}  # the server's export names the labeler
    meta = json.loads((tmp_path / "rm/model/rlhfkit_reward.json").read_text())
    assert meta["users"] == ["cara", "cole", "dana", "drew"]
    asked = [json.loads(line) for line in (tmp_path / "data/prompts_ppo_users.jsonl").read_text().splitlines()]
    assert [a["user"] for a in asked[:5]] == ["cara", "cole", "dana", "drew", "cara"]

    def logged_prompts(stage: str) -> list:
        return [json.loads(line)["prompt"] for line in (tmp_path / stage / "samples.jsonl").read_text().splitlines()]

    # the personalised policy was asked as a user, the pooled one plainly
    personal = logged_prompts("ppo-personal")
    assert all(p[0]["role"] == "system" and p[0]["content"].startswith("User: ") for p in personal)
    assert all(isinstance(p, str) for p in logged_prompts("ppo-pooled"))
    # it adapts the pooled policy (its start and KL reference), its scores normalised on its first rollout
    personal_cfg, pooled_cfg = (
        load_config(PPOConfig, tmp_path / stage / "config.yaml") for stage in ("ppo-personal", "ppo-pooled")
    )
    assert personal_cfg.model.path == str(tmp_path / "ppo-pooled/model") and personal_cfg.ref_model == ""
    assert pooled_cfg.model.path == str(tmp_path / "sft/model")
    assert personal_cfg.ppo.normalize_rewards and not pooled_cfg.ppo.normalize_rewards

    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["groups"]) == {"concise", "detailed"}
    for group in results["groups"].values():
        c = group["personalised_vs_pooled"]
        assert c["ci_low"] <= c["mean_diff"] <= c["ci_high"] and 0 <= c["win_rate"] <= 1
        assert 0 <= group["reward_model"]["personalised_accuracy"] <= 1 and group["reward_model"]["pairs"] > 0
    page = report.read_text()
    assert "concise" in page and "personalised policy" in page and "Reward model" in page

    capsys.readouterr()
    demo_personal.run(cfg)
    out = capsys.readouterr().out
    for stage in ("pretrain", "sft", "generate", "feedback", "rm", "ppo-pooled", "ppo-personal", "eval"):
        assert f"[demo] {stage}: reusing" in out
