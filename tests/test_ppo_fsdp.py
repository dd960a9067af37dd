"""PPO under FSDP2 (`configs/accelerate/fsdp.yaml`) on two CPU processes over gloo does what DDP
does: the same responses and the same metrics to float tolerance, and a run killed with SIGKILL
resumes from its sharded checkpoint to the uninterrupted run's numbers and DDP's saved policy.

Why these hold: the processes step the sharded decoder in lock step while sampling (a process
whose responses have all ended forwards dummy tokens until every process's have, `sample`'s
`all_done`), cut as many micro-batches each (`Rollout.lockstep`), and the reference and reward
models are whole replicas in each process, as under DDP. The runs are `test_ppo_ddp.py`'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rlhfkit.engine.metrics import read_metrics
from test_multiprocess_stages import max_difference, weights
from test_ppo_ddp import assert_same_rows, files, responses, write_config  # noqa: F401  (files: the fixture)
from testutil import accelerate_launch, finish, kill_at_first_checkpoint, make_test_model


@pytest.mark.slow
def test_fsdp_ppo_matches_ddp_killed_and_resumed(files):  # noqa: F811
    root, model, prompts = files
    sections = {"sampling": {"max_new_tokens": 8, "temperature": 1.0, "batch_size": 8}}
    ddp = write_config(root, "ddp", model, prompts, **sections)
    finish(accelerate_launch(["ppo", "--config", str(ddp)], path=root))

    cfg = write_config(root, "fsdp", model, prompts, **sections)
    child = accelerate_launch(["ppo", "--config", str(cfg)], config="fsdp.yaml", path=root, PPO_TEST_SLOW="0.5")
    kill_at_first_checkpoint(child, root / "fsdp" / "checkpoints")
    assert not (root / "fsdp" / "results.json").exists()
    printed = finish(accelerate_launch(["ppo", "--config", str(cfg), "--resume"], config="fsdp.yaml", path=root))
    assert "resumed from" in printed

    one, two = (read_metrics(root / run / "metrics.jsonl") for run in ("ddp", "fsdp"))
    assert [r["step"] for r in two] == [1, 2, 3]
    assert_same_rows(one, two)
    assert responses(root / "fsdp") == responses(root / "ddp")
    assert json.loads((root / "fsdp" / "results.json").read_text())["steps"] == 3
    # the saved policy is whole (gathered), loads in plain transformers, and is DDP's
    start, fsdp, ddp = (weights(path) for path in (model, root / "fsdp" / "model", root / "ddp" / "model"))
    moved = max_difference(fsdp, start)
    assert moved > 1e-3 and max_difference(fsdp, ddp) < 1e-3 * moved, (moved, max_difference(fsdp, ddp))


FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_RESHARD_AFTER_FORWARD": "true",
}


def _update_worker(rank: int, model_dir: str, out: str, port: int) -> None:
    """One process of `test_processes_that_cut_different_numbers_of_micro_batches_run_as_many`."""
    import math

    import torch

    from rlhfkit.engine.trainer import Engine
    from rlhfkit.models.loading import ModelConfig, load_causal_lm
    from rlhfkit.models.value import PolicyAndValue
    from rlhfkit.rl.rollout import Rollout
    from rlhfkit.stages.ppo import PPOConfig, PPOTrainConfig, _update, most_everywhere

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), **FSDP_ENV)
    os.environ["LOCAL_RANK"] = str(rank)
    torch.manual_seed(rank)  # different rollouts in the two processes
    engine = Engine(PPOTrainConfig(lr=1e-2, report_to=[]), Path(out) / str(rank))
    assert engine.accelerator.is_fsdp2
    model = engine.setup(PolicyAndValue(load_causal_lm(ModelConfig(path=model_dir))[0]), total_steps=1)
    before = [p.full_tensor().clone() for p in model.parameters()]
    n, width = 4, 6
    ids = torch.randint(5, 50, (n, 4 + width))
    mask = torch.ones(n, width, dtype=torch.bool)
    tokens = {k: torch.randn(n, width) for k in ("logp", "ref_logp", "values", "advantages", "returns")}
    # process 0: one micro-batch (no pass is free); process 1: one per row (passes are free)
    ro = Rollout(
        ids,
        torch.ones_like(ids),
        4,
        {"response_ids": ids[:, 4:], "mask": mask, **tokens},
        pass_cost=None if rank == 0 else 0.0,
        lockstep=most_everywhere(engine.device),
    )
    assert len(ro.micro_batches(torch.arange(n), 4)) == 4
    stats = _update(engine, model, ro, torch.arange(n), 0.1, 1.0, PPOConfig(batch_size=8, mini_batch_size=8))
    assert stats is not None and math.isfinite(stats["grad_norm"])
    after = [p.full_tensor() for p in model.parameters()]  # the whole weights (a gather)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    flat = torch.cat([a.flatten() for a in after])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    torch.distributed.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1])
    torch.distributed.destroy_process_group()


def test_processes_that_cut_different_numbers_of_micro_batches_run_as_many(files, tmp_path):  # noqa: F811
    """Under FSDP every forward and backward is a collective: process 0 would run 1 micro-batch
    and process 1 four; with `Rollout.lockstep` process 0 cuts four too, and the update completes."""
    import torch.multiprocessing as mp

    _, model, _ = files
    port = 29500 + os.getpid() % 1000 + 7
    mp.start_processes(_update_worker, args=(str(model), str(tmp_path), port), nprocs=2, start_method="spawn")


def parrot(root: Path) -> Path:
    """A tiny GPT-2 overfit to answer "Say hi" in three tokens and EOS, and "Say more" past any
    length limit: with one prompt per process, one process's responses end long before the other's."""
    import torch

    from rlhfkit.data.chat import PROMPT_TEMPLATE
    from rlhfkit.models.loading import ModelConfig, load_causal_lm

    path = make_test_model("gpt2", root / "parrot")
    model, tok = load_causal_lm(ModelConfig(path=str(path)))
    texts = [
        PROMPT_TEMPLATE.format(prompt="Say hi") + " hi there" + tok.eos_token,
        PROMPT_TEMPLATE.format(prompt="Say more") + " more words and more words and more words and more",
    ]
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)
    return path


@pytest.mark.slow
def test_fsdp_ppo_samples_in_lock_step_when_one_process_finishes_first(files):  # noqa: F811
    """Process 0 samples "Say hi" (ends after a few tokens), process 1 "Say more" (runs to the
    limit): process 0 must keep forwarding dummy tokens, else the sharded decoder's all-gathers
    would pair with other collectives and the run would hang or fail. Same responses and metrics as DDP."""
    root, _, _ = files
    model = parrot(root)
    prompts = root / "two_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Say hi", "Say more")))
    sections = {
        "sampling": {"max_new_tokens": 12, "temperature": 0.3, "batch_size": 8},
        "ppo": {"batch_size": 2, "mini_batch_size": 2, "epochs": 1, "missing_eos_penalty": None},
        "stop": {"max_steps": 2},
        "train": {"lr": 1e-6, "save_every": 0},
        "log_samples": 2,
    }
    for run, config in (("parrot-ddp", "ddp.yaml"), ("parrot-fsdp", "fsdp.yaml")):
        cfg = write_config(root, run, model, prompts, **sections)
        finish(accelerate_launch(["ppo", "--config", str(cfg)], config=config, path=root))
    for run in ("parrot-ddp", "parrot-fsdp"):
        rows = [json.loads(line) for line in (root / run / "samples.jsonl").read_text().splitlines()]
        assert sorted((r["response"], r["ended"]) for r in rows if r["prompt"] == "Say hi") == [("hi there", True)] * 2
        assert not any(r["ended"] for r in rows if r["prompt"] == "Say more")
    ddp, fsdp = (read_metrics(root / run / "metrics.jsonl") for run in ("parrot-ddp", "parrot-fsdp"))
    assert_same_rows(ddp, fsdp)
    assert responses(root / "parrot-fsdp") == responses(root / "parrot-ddp")


@pytest.mark.slow
def test_fsdp_grpo_matches_ddp(files):  # noqa: F811
    """GRPO (4 responses per prompt from one prefill, shared-prompt micro-batches of 2 rows) under
    FSDP: the same responses and metrics as DDP over 2 steps."""
    root, model, prompts = files
    group = {"algorithm": "grpo", "num_generations": 4, "batch_size": 8, "mini_batch_size": 8, "micro_batch_size": 2}
    sections = {"ppo": group, "stop": {"max_steps": 2}, "train": {"lr": 2e-3, "save_every": 0}}
    for run, config in (("grpo-ddp", "ddp.yaml"), ("grpo-fsdp", "fsdp.yaml")):
        cfg = write_config(root, run, model, prompts, **sections)
        finish(accelerate_launch(["ppo", "--config", str(cfg)], config=config, path=root))
    ddp, fsdp = (read_metrics(root / run / "metrics.jsonl") for run in ("grpo-ddp", "grpo-fsdp"))
    assert [r["step"] for r in fsdp] == [1, 2]
    assert_same_rows(ddp, fsdp)
    assert responses(root / "grpo-fsdp") == responses(root / "grpo-ddp")
