"""PPO learns: on a tiny random model and a function reward, the reward rises clearly within a few
dozen steps while the KL stays under the ceiling; without the KL penalty the policy drifts much
further from the reference (so the penalty is what holds it back)."""

from __future__ import annotations

import pytest

from rlhfkit.engine.metrics import read_metrics
from rlhfkit.rewards.base import FunctionReward
from rlhfkit.stages.ppo import train_ppo
from testutil import e_frequency, make_test_model, ppo_config, write_prompts

STEPS = 30


def run(tmp_path, model, prompts, beta: float, kl_ceiling: float | None) -> list[dict]:
    out = tmp_path / f"beta-{beta}"
    cfg = ppo_config(
        out,
        model,
        prompts,
        sampling={"max_new_tokens": 16, "batch_size": 16},
        ppo={"batch_size": 16, "mini_batch_size": 8, "kl": {"beta": beta}},
        stop={"max_steps": STEPS, "kl_ceiling": kl_ceiling},
        train={"lr": 2e-3},
        log_samples_every=0,
    )
    results = train_ppo(cfg, reward=FunctionReward(e_frequency))
    assert "max_steps" in results["stop_reason"]  # in particular: the KL ceiling was never hit
    return read_metrics(out / "metrics.jsonl")


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


@pytest.mark.slow
def test_reward_rises_under_the_kl_ceiling_and_the_penalty_holds_the_policy_back(tmp_path):
    model = make_test_model("gpt2", tmp_path / "model")
    prompts = write_prompts(tmp_path / "prompts.jsonl", 32)
    ceiling = 40.0
    with_penalty = run(tmp_path, model, prompts, beta=0.1, kl_ceiling=ceiling)
    assert len(with_penalty) == STEPS
    # a random model writes ~3% 'e' (reward ~0.35); PPO must at least triple that
    assert mean(with_penalty[-5:], "reward") > 3 * mean(with_penalty[:5], "reward")
    assert max(r["kl"] for r in with_penalty) < ceiling

    without_penalty = run(tmp_path, model, prompts, beta=0.0, kl_ceiling=None)
    assert mean(without_penalty[-5:], "kl") > 2 * mean(with_penalty[-5:], "kl")
    assert mean(without_penalty[-5:], "reward") > mean(with_penalty[-5:], "reward")
