"""A PPO run killed with SIGKILL after its first checkpoint and resumed with --resume ends exactly
where an uninterrupted run ends: same metrics at every step, same sampled responses, same weights.

Everything that moves between steps must come back: weights, value head, optimizer, LR schedule,
adaptive KL coefficient, reward baseline, RNG (sampling) and the position in the prompt file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlhfkit.cli import main
from rlhfkit.engine.metrics import read_metrics
from testutil import make_test_model, ppo_config, write_prompts

REWARD_MODULE = """
import os, time

def e_frequency(prompt, completion):
    time.sleep(float(os.environ.get("PPO_TEST_SLOW", "0")))  # lets the test kill the run mid-way
    return 10 * completion.count("e") / max(1, len(completion))
"""


def write_config(tmp_path: Path, name: str, model: Path, prompts: Path) -> Path:
    cfg = ppo_config(
        tmp_path / name,
        model,
        prompts,
        reward={"sources": [{"function": "ppo_resume_reward:e_frequency"}]},
        ppo={"kl": {"beta": 0.1, "adaptive": {"target": 0.5, "horizon": 64}}, "normalize_rewards": True},
        stop={"max_steps": 6},
        # a decaying LR: a schedule that is not restored shows in `lr` and everything after it
        train={"lr": 2e-3, "save_every": 2, "scheduler": "linear", "min_lr_ratio": 0.0},
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    return path


@pytest.mark.slow
def test_killed_and_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path, monkeypatch, capsys):
    (tmp_path / "ppo_resume_reward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = make_test_model("llama", tmp_path / "model")
    prompts = write_prompts(tmp_path / "prompts.jsonl", 12)

    assert main(["ppo", "--config", str(write_config(tmp_path, "straight", model, prompts))]) == 0

    # the same run in a child process, killed (no chance to clean up) once a checkpoint exists
    killed_cfg = write_config(tmp_path, "killed", model, prompts)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path("src").resolve())]),
        "PPO_TEST_SLOW": "0.3",
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    child = subprocess.Popen(
        [sys.executable, "-m", "rlhfkit.cli", "ppo", "--config", str(killed_cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 120
    # a `step-*` folder exists only once completely written (it is renamed from a temp folder)
    while not list(ckpts.glob("step-*")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    _, stderr = child.communicate()
    assert child.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    assert max(p.name for p in ckpts.glob("step-*")) != "step-0000048"  # killed before the end (6 steps x 8 updates)
    assert not (tmp_path / "killed" / "results.json").exists()

    saved_step = int(max(p.name for p in ckpts.glob("step-*")).removeprefix("step-"))  # optimizer steps
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
