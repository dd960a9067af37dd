"""The whole loop, shrunken: every stage of `rlhfkit demo` runs for real and a re-run reuses them."""

from __future__ import annotations

import json

import pytest

from rlhfkit.config import load_config
from rlhfkit.stages import demo

SMALL = [
    "pretrain.vocab_size=1024",
    "pretrain.model.n_layer=2",
    "pretrain.model.d_model=64",
    "pretrain.train.max_steps=15",
    "pretrain.data.block_size=64",
    "sft.train.max_steps=5",
    "generate.sampling.max_new_tokens=16",
    "feedback.label_prompts=10",
    "feedback.overlap=2",
    "rm.train.max_steps=5",
    "rm.normalize.max_prompts=4",
    "rm.normalize.sampling.max_new_tokens=16",
    "ppo.stop.max_steps=2",
    "ppo.ppo.batch_size=8",
    "ppo.ppo.mini_batch_size=8",
    "ppo.sampling.max_new_tokens=16",
    "ppo.log_samples_every=1",
    "eval.limit=8",
    "eval.samples_per_prompt=2",
    "eval.bootstrap=50",
    "eval.sampling.max_new_tokens=16",
]


@pytest.mark.slow
def test_demo_runs_every_stage_and_resumes(tmp_path, capsys):
    cfg = load_config(demo.Config, None, [f"output_dir={tmp_path}", *SMALL])
    report = demo.run(cfg)
    for path in [
        "pretrain/model/config.json",
        "sft/model/config.json",
        "generate/completions.jsonl",
        "feedback/feedback.db",
        "aggregate/pairs.jsonl",
        "rm/model/config.json",
        "ppo/model/config.json",
        "eval/results.json",
    ]:
        assert (tmp_path / path).exists(), path
    # the reward model was normalised on samples drawn the way PPO then sampled (PPO warns otherwise)
    normalization = json.loads((tmp_path / "rm/model/rlhfkit_reward.json").read_text())["normalization"]
    assert normalization["sampling"] == cfg.ppo.sampling.distribution()
    assert "normalised on samples drawn with other settings" not in capsys.readouterr().out
    feedback = json.loads((tmp_path / "feedback/summary.json").read_text())
    assert sum(feedback["judgments"].values()) == 10 * 2  # every item got exactly `overlap` judgments
    results = json.loads((tmp_path / "eval/results.json").read_text())
    assert set(results["models"]) == {"sft", "ppo"} and "ppo_vs_sft" in results["comparisons"]
    rows = [json.loads(line) for line in (tmp_path / "eval/samples.jsonl").read_text().splitlines()]
    assert [(r["prompt_id"], r["sample"]) for r in rows[:3]] == [(rows[0]["prompt_id"], 0), (rows[0]["prompt_id"], 1),
                                                                 (rows[2]["prompt_id"], 0)]  # fmt: skip
    assert len(rows) == 8 * 2 and all("gold" in r["ppo"] for r in rows)
    page = report.read_text()
    assert "reward-hacking monitor" in page and "Labeler agreement" in page and "data:image/png" in page

    capsys.readouterr()
    demo.run(cfg)  # everything is cached: only the report is rebuilt
    out = capsys.readouterr().out
    for stage in ("pretrain", "sft", "generate", "feedback", "aggregate", "rm", "ppo", "eval"):
        assert f"[demo] {stage}: reusing" in out
