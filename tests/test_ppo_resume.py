"""A PPO run killed with SIGKILL after its first checkpoint and resumed with --resume ends exactly
where an uninterrupted run ends: same metrics at every step, same sampled responses, same weights.

Everything that moves between steps must come back: weights, value head, optimizer, LR schedule,
adaptive KL coefficient, reward baseline, RNG (sampling) and the position in the prompt file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.cli import main
from rlhfkit.engine.metrics import read_metrics
from testutil import config_file, kill_after_first_checkpoint, make_test_model, ppo_config, write_prompts


def write_config(tmp_path: Path, name: str, model: Path, prompts: Path) -> Path:
    cfg = ppo_config(
        tmp_path / name,
        model,
        prompts,
        reward={"sources": [{"function": "testutil:e_frequency"}]},
        ppo={"kl": {"beta": 0.1, "adaptive": {"target": 0.5, "horizon": 64}}, "normalize_rewards": True},
        stop={"max_steps": 6},
        # a decaying LR: a schedule that is not restored shows in `lr` and everything after it
        train={"lr": 2e-3, "save_every": 2, "scheduler": "linear", "min_lr_ratio": 0.0},
    )
    return config_file(cfg, tmp_path / f"{name}.yaml")


@pytest.mark.slow
def test_killed_and_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path, capsys):
    model = make_test_model("llama", tmp_path / "model")
    prompts = write_prompts(tmp_path / "prompts.jsonl", 12)

    assert main(["ppo", "--config", str(write_config(tmp_path, "straight", model, prompts))]) == 0

    # the same run in a child process, killed (no chance to clean up) once a checkpoint exists
    killed_cfg = write_config(tmp_path, "killed", model, prompts)
    ckpts = tmp_path / "killed" / "checkpoints"
    saved_step = kill_after_first_checkpoint(["ppo", "--config", str(killed_cfg)], ckpts)  # optimizer steps
    assert saved_step < 48  # killed before the end (6 steps x 8 updates)
    assert not (tmp_path / "killed" / "results.json").exists()

    capsys.readouterr()
    assert main(["ppo", "--config", str(killed_cfg), "--resume"]) == 0
    # it picked the checkpoint up (a run that silently starts afresh would end the same way: deterministic)
    printed = capsys.readouterr().out.replace("\n", "")  # rich wraps long lines
    assert f"resumed from {ckpts / f'step-{saved_step:07d}'} (step {saved_step})" in printed
    assert saved_step > 0

    straight, resumed = (read_metrics(tmp_path / run / "metrics.jsonl") for run in ("straight", "killed"))
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, 7))
    # Exactly equal, not approximately: one thread on a CPU, the same operations in the same order on
    # bit-identical restored state (weights and optimizer in float32 safetensors, RNG states).
    for a, b in zip(straight, resumed, strict=True):
        for key, value in a.items():
            if key not in ("time", "time_rollout", "time_step", "tokens_per_s"):
                assert b[key] == value, (a["step"], key, value, b[key])
    assert straight[-1]["beta"] != straight[0]["beta"]  # the adaptive controller moved (and was restored)
    assert straight[-1]["lr"] < straight[0]["lr"]  # the schedule decayed (and was restored)

    def samples(run: str) -> list[str]:
        return [json.loads(line)["response"] for line in (tmp_path / run / "samples.jsonl").read_text().splitlines()]

    assert samples("killed") == samples("straight")
    w_straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    w_resumed = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert w_resumed.keys() == w_straight.keys()
    for name, tensor in w_straight.items():
        assert torch.equal(w_resumed[name], tensor), name
    summary = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert summary["steps"] == 6
