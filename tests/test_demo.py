"""The whole loop, shrunken: every stage of `rlhfkit demo` runs for real and a re-run reuses them."""

from __future__ import annotations

import json
import math
import re
import shutil
import sqlite3

import pytest

from rlhfkit.config import load_config
from rlhfkit.data.corpus import build_default_data
from rlhfkit.errors import UserError
from rlhfkit.models.loading import ModelConfig, load_causal_lm
from rlhfkit.stages import demo, pretrain
from rlhfkit.stages import ppo as ppo_stage

SMALL = [
    "base_model=pretrain",  # a smaller base model than the shipped one, trained in the run
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
    "dpo.train.max_steps=3",
    "eval.limit=8",
    "eval.samples_per_prompt=2",
    "eval.bootstrap=50",
    "eval.sampling.max_new_tokens=16",
]


@pytest.mark.slow
def test_demo_runs_every_stage_and_resumes(tmp_path, capsys):
    cfg = load_config(demo.Config, None, [f"output_dir={tmp_path}", *SMALL, "algorithms=[ppo,rloo,dpo]", "rounds=1"])
    report = demo.run(cfg)
    for path in [
        "pretrain/model/config.json",
        "sft/model/config.json",
        "generate/completions.jsonl",
        "feedback/feedback.db",
        "aggregate/pairs.jsonl",
        "rm/model/config.json",
        "ppo/model/config.json",
        "rloo/model/config.json",
        "dpo/model/config.json",
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
    assert list(results["models"]) == ["sft", "ppo", "rloo", "dpo"] and "dpo_vs_sft" in results["comparisons"]
    # the comparison: every algorithm from the same SFT model, with CIs and its training time
    summary = json.loads((tmp_path / "results.json").read_text())["algorithms"]
    assert list(summary) == ["ppo", "rloo", "dpo"]
    for a in summary.values():
        assert a["kl"]["ci_low"] <= a["kl"]["mean"] <= a["kl"]["ci_high"]
        assert a["gold_vs_sft"]["ci_low"] <= a["gold_vs_sft"]["mean_diff"] <= a["gold_vs_sft"]["ci_high"]
        assert a["train_cpu_seconds"] > 0
    rows = [json.loads(line) for line in (tmp_path / "eval/samples.jsonl").read_text().splitlines()]
    assert [(r["prompt_id"], r["sample"]) for r in rows[:3]] == [(rows[0]["prompt_id"], 0), (rows[0]["prompt_id"], 1),
                                                                 (rows[2]["prompt_id"], 0)]  # fmt: skip
    assert len(rows) == 8 * 2 and all("gold" in r["ppo"] for r in rows)
    page = report.read_text()
    assert "reward-hacking monitor" in page and "Labeler agreement" in page and "data:image/png" in page
    assert "Algorithms compared" in page

    capsys.readouterr()
    demo.run(cfg)  # everything is cached: only the report is rebuilt
    out = capsys.readouterr().out
    for stage in ("pretrain", "sft", "generate", "feedback", "aggregate", "rm", "ppo", "rloo", "dpo", "eval"):
        assert f"[demo] {stage}: reusing" in out
    # the timings of the first run survive the resumed one
    assert json.loads((tmp_path / "results.json").read_text())["algorithms"]["dpo"]["train_cpu_seconds"] > 0

    capsys.readouterr()
    demo.run(cfg.model_copy(update={"algorithms": ["ppo", "dpo"]}))  # another set of models: only eval is redone
    out = capsys.readouterr().out
    assert "[demo] dpo: reusing" in out and "[demo] ===== eval =====" in out
    assert list(json.loads((tmp_path / "eval/results.json").read_text())["models"]) == ["sft", "ppo", "dpo"]


def _batches(db: object) -> dict[str | None, tuple[int, int]]:
    """(items, judgments) per batch in the demo's feedback database."""
    with sqlite3.connect(str(db)) as con:
        rows = con.execute(
            "SELECT i.batch, COUNT(DISTINCT i.id), COUNT(j.id) FROM items i "
            "LEFT JOIN judgments j ON j.item_id = i.id GROUP BY i.batch"
        ).fetchall()
    return {batch: (items, judgments) for batch, items, judgments in rows}


@pytest.mark.slow
def test_demo_rounds_label_the_current_policy_and_resume(tmp_path, capsys):
    overrides = [f"output_dir={tmp_path}", *SMALL, "prompts_per_round=6"]
    demo.run(load_config(demo.Config, None, [*overrides, "rounds=1"]))  # a run that stopped after round 1
    assert not (tmp_path / "round-2").exists()
    assert json.loads((tmp_path / "results.json").read_text())["rounds"] == []

    capsys.readouterr()
    cfg = load_config(demo.Config, None, overrides)
    assert cfg.rounds == 2  # the default
    report = demo.run(cfg)  # continues: round 1's stages are reused, round 2 runs
    out = capsys.readouterr().out
    for stage in ("pretrain", "sft", "generate", "feedback", "aggregate", "rm", "ppo", "eval"):
        assert f"[demo] {stage}: reusing" in out
    assert "[demo] ===== round-2 =====" in out
    results = json.loads((tmp_path / "results.json").read_text())
    one, two = results["rounds"]
    assert [(r["round"], r["items"], r["prompts"]) for r in (one, two)] == [(1, 10, 10), (2, 6, 6)]
    # round 2 labeled fresh prompts, on round 1's server, as a batch of its own (overlap 2)
    first = {json.loads(line)["id"] for line in (tmp_path / "round-1/prompts.jsonl").read_text().splitlines()}
    second = {json.loads(line)["id"] for line in (tmp_path / "round-2/prompts.jsonl").read_text().splitlines()}
    assert len(second) == 6 and not first & second
    db = tmp_path / "feedback/feedback.db"
    assert _batches(db) == {None: (10, 20), "round-2": (6, 12)}
    assert two["judgments"] == 12 and two["pairs"] > 0
    # round 2's candidates: the current policy (2), the previous = SFT (1), SFT (1)
    labeled = (tmp_path / "round-2/labels/completions.jsonl").read_text().splitlines()
    assert all(len(json.loads(line)["completions"]) == 4 for line in labeled)
    # round 1's reward model on its own held-out pairs and on round 2's; round 2 evaluated against round 1 (ppo)
    assert one["rm_accuracy_heldout"] is not None and 0 <= two["previous_rm_accuracy"] <= 1
    assert two["vs_previous"]["gold"]["ci_low"] <= two["vs_previous"]["gold"]["mean_diff"]
    # PPO continued from round 1's policy, with KL to SFT
    ppo2 = load_config(ppo_stage.Config, tmp_path / "round-2/ppo/config.yaml")
    assert ppo2.model.path == str(tmp_path / "ppo/model") and ppo2.ref_model == str(tmp_path / "sft/model")

    # the rude/off-topic shares, counted again here from the evaluations' per-answer judges
    answers = results["answers"]
    for name, folder in (("sft", "eval"), ("ppo", "eval"), ("round-2", "round-2/eval")):
        rows = [json.loads(line)[name] for line in (tmp_path / folder / "samples.jsonl").read_text().splitlines()]
        assert answers[name] == {
            "answers": 8 * 2,
            "rude": sum(r["toxicity"] > 0.5 for r in rows) / len(rows),
            "off_topic": sum(r["relevance"] < 0.25 for r in rows) / len(rows),
        }
    page = report.read_text()
    for section in ("Rounds: 2 rounds", "Rude and off-topic answers", "Round 2: proxy reward vs gold",
                    "Before / after by round", "on the next round's pairs"):  # fmt: skip
        assert section in page, section
    assert "round-2" in json.loads((tmp_path / "timings.json").read_text())

    # killed during round 2's evaluation: the re-run redoes only that, and labels nothing twice
    shutil.rmtree(tmp_path / "round-2/eval")
    (tmp_path / "round-2/round.json").unlink()
    capsys.readouterr()
    demo.run(cfg)
    out = capsys.readouterr().out
    assert "[loop] round 2 labels: done" in out and "[loop] round 2 ppo: done" in out
    assert "[loop] ===== round 2: eval =====" in out
    assert _batches(db) == {None: (10, 20), "round-2": (6, 12)}
    assert json.loads((tmp_path / "results.json").read_text())["rounds"][1]["gold"] == pytest.approx(two["gold"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pretrain.model.n_layer=2"], "differ from the shipped base model's recipe"),
        (["pretrain.data.corpus_seed=1"], "add base_model=pretrain"),
        (["algorithms=[ppo,ppo]"], "at most once"),
        (["algorithms=[]"], "at most once"),
        (["algorithms=[sac]"], "algorithms"),
        (["algorithms=[dpo]"], "later rounds continue PPO's policy"),
    ],
)
def test_demo_config_errors(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(demo.Config, None, overrides)


def test_pretrain_settings_apply_with_base_model_pretrain():
    cfg = load_config(demo.Config, None, ["base_model=pretrain", "pretrain.model.n_layer=2"])
    assert cfg.pretrain.model.n_layer == 2 and demo.base_model_recipe().model.n_layer == 4


# `rlhfkit pretrain --config .../pretrain.yaml` shortened to a test's budget, and the held-out
# perplexity it gave (2026-12-04); a change to the corpus, the tokenizer, the model or the training
# loop moves it far more than floating-point differences between CPUs do.
SHORT_RECIPE = ["train.max_steps=30", "train.batch_size=8", "train.warmup_steps=3", "train.save_every=0"]
SHORT_RECIPE_PPL = 400.25


def test_shipped_base_model_is_what_its_recipe_makes(tmp_path):
    recipe = demo.base_model_recipe()
    shipped = demo.BASE_MODEL / "model"
    config = json.loads((shipped / "config.json").read_text())
    m = recipe.model
    assert config["model_type"] == m.arch
    assert (config["n_layer"], config["n_embd"], config["n_head"], config["n_positions"]) == (
        m.n_layer, m.d_model, m.n_head, m.max_positions,
    )  # fmt: skip
    recorded = json.loads((shipped / pretrain.PRETRAIN_RESULTS).read_text())
    assert (recorded["steps"], recorded["corpus_seed"], recorded["block_size"]) == (
        recipe.train.max_steps, recipe.data.corpus_seed, recipe.data.block_size,
    )  # fmt: skip

    # the shipped weights give the recorded held-out perplexity on the corpus they were made from
    paths = build_default_data(tmp_path / "data", seed=recipe.data.corpus_seed)
    model, tokenizer = load_causal_lm(ModelConfig(path=str(shipped)))
    model.eval()
    blocks = pretrain.to_blocks(pretrain.read_documents([str(paths["pretrain_valid"])]), tokenizer, 128)
    assert math.exp(pretrain.held_out_loss(model, blocks, 32)) == pytest.approx(recorded["valid_ppl"], rel=1e-3)

    # and the recipe still trains the same way: a shortened run lands on its reference perplexity
    short = load_config(
        pretrain.Config,
        demo.BASE_MODEL / "pretrain.yaml",
        [f"output_dir={tmp_path / 'short'}", f"model_dir={tmp_path / 'short-model'}", *SHORT_RECIPE],
    )
    pretrain.run(short)
    ppl = json.loads((tmp_path / "short-model" / pretrain.PRETRAIN_RESULTS).read_text())["valid_ppl"]
    assert ppl == pytest.approx(SHORT_RECIPE_PPL, rel=0.02)
