"""RLOO and GRPO as `ppo.algorithm`: PPO's loop without a critic. The reward rises while the KL stays
under a ceiling, no value head exists, a resumed run ends like an uninterrupted one, and K = 1 is a
config error naming the setting."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.engine.metrics import read_metrics
from rlhfkit.errors import UserError
from rlhfkit.rewards.base import FunctionReward
from rlhfkit.stages.ppo import train_ppo
from testutil import config_file, e_frequency, kill_after_first_checkpoint, make_test_model, ppo_config, write_prompts

STEPS = 30


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("group")
    return make_test_model("gpt2", root / "model"), write_prompts(root / "prompts.jsonl", 32)


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("algorithm", "kl"),
    [("rloo", {"beta": 0.1}), ("grpo", {"beta": 0.1, "mode": "loss"})],  # KL in the reward / as a k3 loss term
)
def test_reward_rises_under_the_kl_ceiling_without_a_critic(files, tmp_path, algorithm, kl):
    model, prompts = files
    out = tmp_path / algorithm
    cfg = ppo_config(
        out, model, prompts,
        sampling={"max_new_tokens": 16, "batch_size": 16},
        ppo={"batch_size": 16, "mini_batch_size": 8, "algorithm": algorithm, "num_generations": 4, "kl": kl},
        stop={"max_steps": STEPS, "kl_ceiling": 40.0},
        train={"lr": 2e-3},
        log_samples_every=0,
    )  # fmt: skip
    results = train_ppo(cfg, reward=FunctionReward(e_frequency))
    assert "max_steps" in results["stop_reason"]  # the KL ceiling was never hit
    rows = read_metrics(out / "metrics.jsonl")
    assert mean(rows[-5:], "reward") > 3 * mean(rows[:5], "reward"), [r["reward"] for r in rows]
    assert max(r["kl"] for r in rows) < 40.0
    assert "value_loss" not in rows[-1] and "explained_variance" not in rows[-1]
    state = load_file(next((out / "checkpoints").glob("step-*")) / "model.safetensors")
    assert not any("value_head" in name for name in state)  # no critic trained or saved


def test_group_rollouts_sample_k_responses_per_prompt(files, tmp_path):
    model, prompts = files
    out = tmp_path / "k"
    cfg = ppo_config(
        out, model, prompts, ppo={"algorithm": "rloo", "num_generations": 4}, stop={"max_steps": 1},
        log_samples=8,
    )  # fmt: skip
    train_ppo(cfg, reward=FunctionReward(e_frequency))
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    prompts_seen = [r["prompt"] for r in rows]
    assert prompts_seen == [prompts_seen[0]] * 4 + [prompts_seen[4]] * 4 and prompts_seen[0] != prompts_seen[4]


@pytest.mark.parametrize("lora", [None, {"r": 4}])  # the reference: a frozen copy / the adapter switched off
def test_runs_with_and_without_the_shared_prompt_log_the_same_numbers(files, tmp_path, lora):
    """`ppo.share_prompt` changes how the reference pass and the update lay out a prompt's K
    responses, not what they compute: two steps (micro-batches of 2 rows: a prompt's 4 responses in
    two shared rows) log the same samples, KL, losses and ratios either way, to float rounding."""
    model, prompts = files
    rows = {}
    for share in (True, False):
        cfg = ppo_config(
            tmp_path / str(share), model, prompts, model={"path": str(model), "lora": lora},
            ppo={"algorithm": "grpo", "num_generations": 4, "batch_size": 8, "mini_batch_size": 4,
                 "micro_batch_size": 2, "kl": {"mode": "loss"}, "share_prompt": share},
            stop={"max_steps": 2}, train={"lr": 1e-3},
        )  # fmt: skip
        train_ppo(cfg, reward=FunctionReward(e_frequency))
        rows[share] = read_metrics(tmp_path / str(share) / "metrics.jsonl")
    for shared, plain in zip(rows[True], rows[False], strict=True):
        assert shared["reward"] == plain["reward"] and shared["response_length"] == plain["response_length"]
        for key in ("kl", "kl_k3", "entropy", "policy_loss", "approx_kl", "grad_norm"):
            assert shared[key] == pytest.approx(plain[key], rel=1e-3, abs=1e-5), key
    assert rows[True][1]["kl"] != 0  # the second step's policy had moved: a real comparison


@pytest.mark.slow
@pytest.mark.parametrize(
    ("algorithm", "ppo"),
    [
        ("grpo", {"algorithm": "grpo", "num_generations": 2, "scale_advantages": False, "kl": {"mode": "loss"}}),
        ("rloo", {"algorithm": "rloo", "num_generations": 4}),
    ],
)
def test_killed_group_run_resumes_to_where_an_uninterrupted_run_ends(files, tmp_path, capsys, algorithm, ppo):
    from rlhfkit.cli import main

    model, prompts = files

    def config(name):
        cfg = ppo_config(
            tmp_path / name, model, prompts, ppo=ppo, reward={"sources": [{"function": "testutil:e_frequency"}]},
            stop={"max_steps": 4}, train={"save_every": 2},
        )  # fmt: skip
        return str(config_file(cfg, tmp_path / f"{name}.yaml"))

    assert main(["ppo", "--config", config("straight")]) == 0
    saved = kill_after_first_checkpoint(["ppo", "--config", config("cut")], tmp_path / "cut" / "checkpoints")
    final = max(p.name for p in (tmp_path / "straight" / "checkpoints").glob("step-*"))
    assert f"step-{saved:07d}" < final  # killed before the end
    assert not (tmp_path / "cut" / "results.json").exists()
    capsys.readouterr()
    assert main(["ppo", "--config", config("cut"), "--resume"]) == 0
    assert f"(step {saved})" in capsys.readouterr().out.replace("\n", "")
    a, b = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("straight", "cut"))
    skip = ("time", "time_rollout", "time_step", "tokens_per_s")
    assert [{k: v for k, v in r.items() if k not in skip} for r in a] == [
        {k: v for k, v in r.items() if k not in skip} for r in b
    ]
    w_a, w_b = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("straight", "cut"))
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


@pytest.mark.parametrize(
    ("ppo", "message"),
    [
        ({"algorithm": "rloo"}, "num_generations to 2 or more"),
        ({"algorithm": "grpo", "num_generations": 1}, "num_generations to 2 or more"),
        ({"num_generations": 4}, "for algorithm=rloo or grpo"),
        ({"algorithm": "rloo", "num_generations": 3}, "multiple of num_generations"),
        ({"algorithm": "grpo", "num_generations": 2, "value_init": "reward_model"}, "has no critic"),
    ],
)
def test_bad_group_settings_are_config_errors(files, tmp_path, capsys, ppo, message):
    from rlhfkit.cli import main

    model, prompts = files
    args = [f"ppo.{k}={v}" for k, v in ppo.items()]
    assert main(["ppo", f"output_dir={tmp_path}", f"model.path={model}", f"prompts={prompts}", *args]) == 2
    err = capsys.readouterr().err
    assert "ppo" in err and message in err, err
    with pytest.raises(Exception, match=message):
        ppo_config(tmp_path, model, prompts, ppo=ppo)


def test_a_reference_with_another_tokenizer_is_refused(files, tmp_path):
    model, prompts = files
    other = make_test_model("gpt2", tmp_path / "other", texts=["something else entirely"] * 8, vocab_size=280)
    cfg = ppo_config(tmp_path / "run", model, prompts, ppo={"algorithm": "rloo", "num_generations": 2})
    with pytest.raises(UserError, match="ref_model: .* different tokenizer"):
        train_ppo(cfg.model_copy(update={"ref_model": str(other)}), reward=FunctionReward(e_frequency))
