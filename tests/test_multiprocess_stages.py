"""The supervised stages over two processes with the shipped `configs/accelerate/ddp.yaml` (DDP on the
CPU's gloo backend): SFT and the reward model train with finite losses, process 0 writes the outputs
once, and the saved models load in plain transformers. The sharded configs (FSDP, DeepSpeed) need
GPUs: on a CPU-only machine they are refused with an error naming ddp.yaml (accelerate would
otherwise fall back to plain data parallelism without a word).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhfkit.engine.metrics import read_metrics
from rlhfkit.engine.trainer import cpu_process_group
from rlhfkit.errors import UserError
from test_rm import preference_pairs, write_jsonl
from testutil import ACCELERATE_CONFIGS, accelerate_launch, finish, make_test_model


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    pairs = preference_pairs(64)
    write_jsonl(root / "pairs.jsonl", pairs)
    write_jsonl(root / "demos.jsonl", [{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs])
    texts = [f"User: {p['prompt']}\nAssistant: {p['chosen']} {p['rejected']}" for p in pairs]
    make_test_model("gpt2", root / "tiny", texts=texts, vocab_size=400, n_layer=2, d_model=64)
    return root


def finite_losses(out) -> list[float]:
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert losses and all(math.isfinite(x) for x in losses), losses
    return losses


@pytest.mark.slow
def test_sft_and_rm_on_two_processes_save_plain_transformers_models(root):
    common = ["train.batch_size=8", "train.lr=3e-3", "train.max_steps=4", "train.log_every=1"]
    sft, rm = root / "sft", root / "rm"
    sft_run = accelerate_launch(
        ["sft", f"model.path={root / 'tiny'}", f"data.train={root / 'demos.jsonl'}", f"output_dir={sft}", *common]
        + ["data.max_length=48"]
    )
    finish(sft_run)
    rm_args = [f"model.path={root / 'tiny'}", f"data.pairs={root / 'pairs.jsonl'}", f"output_dir={rm}", *common]
    finish(accelerate_launch(["rm", *rm_args, "normalize.max_prompts=8", "normalize.sampling.max_new_tokens=8"]))

    assert [r["step"] for r in read_metrics(sft / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]  # once, not twice
    finite_losses(sft), finite_losses(rm)
    policy = AutoModelForCausalLM.from_pretrained(sft / "model")
    start = AutoModelForCausalLM.from_pretrained(root / "tiny")
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), start.parameters(), strict=True))  # trained
    reward = AutoModelForSequenceClassification.from_pretrained(rm / "model")
    assert reward.config.num_labels == 1
    assert json.loads((rm / "results.json").read_text())["steps"] == 4
    state = json.loads(max((sft / "checkpoints").glob("step-*")).joinpath("trainer_state.json").read_text())
    assert state["num_processes"] == 2  # what a resume checks


@pytest.mark.parametrize(("config", "name"), [("fsdp.yaml", "FSDP"), ("deepspeed_zero3.yaml", "DeepSpeed")])
def test_sharded_configs_are_refused_without_a_gpu(monkeypatch, config, name):
    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator")
    settings = yaml.safe_load((ACCELERATE_CONFIGS / config).read_text())
    assert settings["distributed_type"] == name.upper()
    monkeypatch.setenv("WORLD_SIZE", "2")  # what `accelerate launch` sets in each process, with the flag
    assert cpu_process_group()
    monkeypatch.setenv(f"ACCELERATE_USE_{name.upper()}", "true")
    with pytest.raises(UserError, match=rf"{name} was asked for.*no GPU.*ddp.yaml"):
        cpu_process_group()
