"""LoRA mode keeps one copy of the model: the reference is the base with the adapter disabled.

Measured, not assumed: each mode runs PPO in its own process and reports its peak resident memory
above what the imports take. Full fine-tuning holds the policy, a reference copy, gradients and two
Adam moments (about 5x the weights); LoRA about 1x plus small adapters, so it must come in at well
under half."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testutil import make_test_model, ppo_config, write_prompts

CHILD = """
import json, sys
import peft, torch
from rlhfkit.rewards.base import FunctionReward
from rlhfkit.stages.ppo import Config, train_ppo

def high_water_kib():
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over an exec, so a child of a big pytest worker
    # would report the worker's peak; VmHWM belongs to this process's own memory map.
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])

torch.set_num_threads(1)
base = high_water_kib()
train_ppo(Config.model_validate_json(sys.argv[1]), reward=FunctionReward(lambda prompt, text: float(len(text))))
print(json.dumps({"base_kib": base, "peak_kib": high_water_kib()}))
"""


def peak_mib(tmp_path: Path, model: Path, prompts: Path, lora: bool) -> float:
    cfg = ppo_config(
        tmp_path / ("lora" if lora else "full"),
        model,
        prompts,
        model={"lora": {"r": 8} if lora else None},
        sampling={"max_new_tokens": 4, "batch_size": 4},
        ppo={"batch_size": 4, "mini_batch_size": 4},
        stop={"max_steps": 1},
        log_samples_every=0,
    )
    env = {**os.environ, "PYTHONPATH": str(Path("src").resolve())}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, cfg.model_dump_json()], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    usage = json.loads(proc.stdout.strip().splitlines()[-1])
    return (usage["peak_kib"] - usage["base_kib"]) / 1024


@pytest.mark.slow
def test_lora_peak_memory_is_under_half_of_full_fine_tuning_with_a_reference_copy(tmp_path):
    model = make_test_model("llama", tmp_path / "model", n_layer=6, d_model=384, n_head=6)
    weights_mib = (model / "model.safetensors").stat().st_size / 2**20
    prompts = write_prompts(tmp_path / "prompts.jsonl", 4)
    full = peak_mib(tmp_path, model, prompts, lora=False)
    lora = peak_mib(tmp_path, model, prompts, lora=True)
    print(f"weights {weights_mib:.0f} MiB; peak above imports: full + reference {full:.0f} MiB, LoRA {lora:.0f} MiB")
    assert full > 4 * weights_mib  # policy + reference + gradients + Adam moments
    # "about half" (issue 4): activations are a larger share at this test size than in the bench,
    # where a 40M-parameter model gives 0.41x
    assert lora < 0.55 * full
