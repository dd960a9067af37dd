"""The engine's supervised loop (`Engine.fit`, what pretrain, SFT and the reward model run on), on a
real tiny model: what a skipped, non-finite step leaves in the metrics."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM

from rlhfkit.engine.metrics import read_metrics
from rlhfkit.engine.trainer import Engine, TrainConfig


class GoesBadTwice:
    """A language-modelling loss that goes non-finite on two calls: `nan_loss` through the loss
    itself (its stats are NaN too), `nan_grad` through its gradient only (loss and stats finite).

    Stats: the call's number, and the loss as the stage saw it.
    """

    def __init__(self, nan_loss: int, nan_grad: int):
        self.nan_loss, self.nan_grad, self.calls = nan_loss, nan_grad, 0

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        self.calls += 1
        loss = model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        if self.calls == self.nan_loss:
            loss = loss * float("nan")
        if self.calls == self.nan_grad:  # sqrt'(0) is infinite: 0 in the forward, NaN in the backward
            weight = next(model.parameters())
            loss = loss + 0.0 * torch.sqrt(weight - weight.detach()).sum()
        return loss, {"call": float(self.calls), "loss_seen": float(loss.detach())}


def test_a_skipped_step_leaves_nothing_in_the_next_logged_row_but_its_count(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt2"))
    blocks = [torch.randint(0, 200, (8,), generator=torch.Generator().manual_seed(i)) for i in range(32)]
    cfg = TrainConfig(batch_size=2, grad_accum=2, max_steps=9, log_every=3, lr=1e-3, scheduler="constant")
    engine = Engine(cfg, tmp_path)
    # two calls per attempt: 1-2 step 1; 3-4 skipped (NaN loss on call 3); 5-8 steps 2, 3 (logged);
    # 9-10 skipped (NaN gradient on call 10); 11-16 steps 4-6 (logged); 17-22 steps 7-9 (logged)
    loss_fn = GoesBadTwice(nan_loss=3, nan_grad=10)
    engine.fit(model, blocks, lambda rows: {"input_ids": torch.stack(rows)}, loss_fn)
    assert loss_fn.calls == 22
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 6, 9]
    for row in rows:
        assert all(isinstance(v, int | float) and math.isfinite(v) for v in row.values()), row
    assert [r["call"] for r in rows] == [(1 + 2 + 5 + 6 + 7 + 8) / 6, sum(range(11, 17)) / 6, sum(range(17, 23)) / 6]
    assert [r["skipped_steps"] for r in rows] == [1, 1, 0]
