"""The supervised stages over two processes with the shipped `configs/accelerate/ddp.yaml` (DDP) and
`configs/accelerate/fsdp.yaml` (FSDP2, FULL_SHARD), on the CPU's gloo backend: SFT and the reward
model train with finite losses, process 0 writes the outputs once, and the saved models load in
plain transformers. Under FSDP each process holds half of every weight: the saved model is the
gathered whole one (`Engine.whole_model`), equal to DDP's and to one process's, and a run killed
mid-way resumes from its sharded checkpoint to the same weights. DeepSpeed and FSDP1 do not run on
CPU: they are refused with an error naming what does (accelerate would otherwise fall back to plain
data parallelism without a word).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhfkit.cli import main
from rlhfkit.engine.metrics import read_metrics
from rlhfkit.engine.trainer import cpu_process_group
from rlhfkit.errors import UserError
from test_rm import preference_pairs, write_jsonl
from testutil import (
    ACCELERATE_CONFIGS,
    PAUSED_CLI,
    accelerate_launch,
    finish,
    kill_at_first_checkpoint,
    make_test_model,
)


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
@pytest.mark.parametrize("config", ["ddp.yaml", "fsdp.yaml"])
def test_sft_and_rm_on_two_processes_save_plain_transformers_models(root, config):
    common = ["train.batch_size=8", "train.lr=3e-3", "train.max_steps=4", "train.log_every=1"]
    sft, rm = root / f"sft-{config}", root / f"rm-{config}"
    finish(accelerate_launch([*sft_args(root, sft), *common], config=config))
    rm_args = [f"model.path={root / 'tiny'}", f"data.pairs={root / 'pairs.jsonl'}", f"output_dir={rm}", *common]
    rm_args += ["normalize.max_prompts=8", "normalize.sampling.max_new_tokens=8"]
    finish(accelerate_launch(["rm", *rm_args], config=config))

    assert [r["step"] for r in read_metrics(sft / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]  # once, not twice
    finite_losses(sft), finite_losses(rm)
    policy = AutoModelForCausalLM.from_pretrained(sft / "model")
    start = AutoModelForCausalLM.from_pretrained(root / "tiny")
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), start.parameters(), strict=True))  # trained
    reward, info = AutoModelForSequenceClassification.from_pretrained(rm / "model", output_loading_info=True)
    assert reward.config.num_labels == 1 and not any(info.values())  # every weight saved (not a shard)
    assert json.loads((rm / "results.json").read_text())["normalization"]["n"] > 0  # run on the whole model
    assert json.loads((rm / "results.json").read_text())["steps"] == 4
    state = json.loads(max((sft / "checkpoints").glob("step-*")).joinpath("trainer_state.json").read_text())
    assert state["num_processes"] == 2  # what a resume checks


def sft_args(root, out) -> list[str]:
    return ["sft", f"model.path={root / 'tiny'}", f"data.train={root / 'demos.jsonl'}", f"output_dir={out}"] + [
        "data.max_length=48"
    ]


def weights(path) -> dict[str, torch.Tensor]:
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # no weight missing: the whole model was saved, not process 0's shard
    return model.state_dict()


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_fsdp_sft_matches_ddp_and_one_process_and_resumes(root, tmp_path):
    """The same global batch (2 x 8 rows, or 16 in one process) gives the same training: FSDP's
    reduce-scattered gradients are DDP's all-reduced ones (to float rounding), one process differs
    only by its token normalisation (one mean over 16 rows instead of two over 8). A
    run killed after its step-2 checkpoint resumes from the shards to the uninterrupted weights."""
    common = ["train.lr=3e-3", "train.max_steps=6", "train.save_every=2", "train.log_every=1"]
    two = ["train.batch_size=8", *common]
    finish(accelerate_launch([*sft_args(root, tmp_path / "fsdp"), *two], config="fsdp.yaml"))
    finish(accelerate_launch([*sft_args(root, tmp_path / "ddp"), *two], config="ddp.yaml"))
    assert main([*sft_args(root, tmp_path / "one"), "train.batch_size=16", *common]) == 0
    start = weights(root / "tiny")
    fsdp, ddp, one = (weights(tmp_path / run / "model") for run in ("fsdp", "ddp", "one"))
    moved = max_difference(fsdp, start)
    assert moved > 1e-3
    # measured: 4e-7 (float rounding, grown by Adam where gradients are tiny) and 1.1e-6, for 3.2e-3 moved
    assert max_difference(fsdp, ddp) < 1e-3 * moved
    assert max_difference(fsdp, one) < 1e-2 * moved
    assert (ckpt := tmp_path / "fsdp" / "checkpoints").exists() and any(ckpt.glob("step-*/pytorch_model_fsdp_0"))

    script = tmp_path / "paused_cli.py"
    script.write_text(PAUSED_CLI)
    cut = tmp_path / "cut"
    child = accelerate_launch(
        [*sft_args(root, cut), *two], config="fsdp.yaml", script=script, RLHFKIT_TEST_STEP_PAUSE="1"
    )
    kill_at_first_checkpoint(child, cut / "checkpoints")
    assert [p.name for p in (cut / "checkpoints").glob("step-*")] == ["step-0000002"] and not (cut / "model").exists()
    assert "resumed from" in finish(accelerate_launch([*sft_args(root, cut), *two, "--resume"], config="fsdp.yaml"))
    assert max_difference(weights(cut / "model"), fsdp) < 1e-6
    rows = [r for r in read_metrics(cut / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    uninterrupted = [r["loss"] for r in read_metrics(tmp_path / "fsdp" / "metrics.jsonl") if "loss" in r]
    assert [r["loss"] for r in rows] == pytest.approx(uninterrupted, rel=1e-6)


@pytest.mark.slow
def test_fsdp_dpo_matches_ddp(root, tmp_path):
    """DPO's frozen reference and its policy under FSDP2: the saved (gathered) policy is DDP's."""
    dpo = ["dpo", f"model.path={root / 'tiny'}", f"data.pairs={root / 'pairs.jsonl'}", "data.valid_fraction=0.1"]
    dpo += ["train.lr=3e-3", "train.batch_size=8", "train.max_steps=4", "train.log_every=1"]
    for config in ("fsdp", "ddp"):
        finish(accelerate_launch([*dpo, f"output_dir={tmp_path / config}"], config=f"{config}.yaml"))
    fsdp, ddp = weights(tmp_path / "fsdp" / "model"), weights(tmp_path / "ddp" / "model")
    moved = max_difference(fsdp, weights(root / "tiny"))
    assert moved > 1e-3 and max_difference(fsdp, ddp) < 1e-3 * moved  # measured: 0.0, for 3e-3 moved


@pytest.mark.slow
def test_lora_under_fsdp_is_refused_before_training(root, tmp_path):
    child = accelerate_launch([*sft_args(root, tmp_path / "lora"), "model.lora.r=4"], config="fsdp.yaml")
    out = child.communicate(timeout=300)[0].decode()
    assert child.returncode != 0 and "model.lora: not supported with sharded weights" in out
    assert not (tmp_path / "lora" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, r"DeepSpeed was asked for.*no GPU.*fsdp.yaml.*ddp.yaml"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, r"fsdp_version 1.*does not run on CPU.*fsdp_version: 2"),
    ],
)
def test_deepspeed_and_fsdp1_are_refused_without_a_gpu(monkeypatch, env, message):
    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator")
    monkeypatch.setenv("WORLD_SIZE", "2")  # what `accelerate launch` sets in each process, with the flags
    assert cpu_process_group()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=message):
        cpu_process_group()


def test_the_shipped_fsdp_config_is_fsdp2():
    """FSDP2 is what runs on CPU (and what accelerate recommends on GPUs): the file the README names."""
    settings = yaml.safe_load((ACCELERATE_CONFIGS / "fsdp.yaml").read_text())
    assert settings["distributed_type"] == "FSDP" and settings["fsdp_config"]["fsdp_version"] == 2
