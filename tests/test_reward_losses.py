"""Reward-model losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.rewards.losses import mean_margin, mse_loss, pairwise_accuracy, pairwise_loss


def softplus(x: float) -> float:
    """−log σ(x) = log(1 + e^(−x)), written out."""
    return math.log(1 + math.exp(-x))


def test_pairwise_loss_hand_values():
    chosen, rejected = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    # differences 1, 0, -2: −log σ(1) = 0.313262, −log σ(0) = log 2 = 0.693147, −log σ(−2) = 2.126928
    expected = (0.313262 + 0.693147 + 2.126928) / 3
    assert float(pairwise_loss(chosen, rejected)) == pytest.approx(expected, abs=1e-5)
    assert expected == pytest.approx((softplus(1) + softplus(0) + softplus(-2)) / 3, abs=1e-5)


def test_pairwise_loss_with_margin_needs_the_pair_separated_by_the_margin():
    chosen, rejected = torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.0])
    margin = torch.tensor([0.5, 3.0])
    # r_c − r_r − m = 0.5 and 0: −log σ(0.5) = 0.474077, −log σ(0) = 0.693147
    assert float(pairwise_loss(chosen, rejected, margin)) == pytest.approx((0.474077 + 0.693147) / 2, abs=1e-5)
    assert float(pairwise_loss(chosen, rejected, torch.zeros(2))) == pytest.approx(
        float(pairwise_loss(chosen, rejected))
    )


def test_pairwise_loss_gradient_is_minus_one_minus_sigma():
    chosen = torch.tensor([0.0, 1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0], requires_grad=True)
    pairwise_loss(chosen, rejected).backward()
    # d/dr_c of −log σ(d) / N is −(1 − σ(d)) / N: d=0 → −0.25, d=1 → −(1 − 0.731059)/2 = −0.134471
    assert chosen.grad.tolist() == pytest.approx([-0.25, -0.134471], abs=1e-5)
    assert rejected.grad.tolist() == pytest.approx([0.25, 0.134471], abs=1e-5)


def test_pairwise_loss_is_stable_for_large_differences():
    loss = pairwise_loss(torch.tensor([-100.0, 100.0]), torch.tensor([0.0, 0.0]))
    assert float(loss) == pytest.approx(50.0, abs=1e-4)  # (100 + ~0) / 2, no inf from log(σ(−100))


def test_mse_hand_values():
    assert float(mse_loss(torch.tensor([1.0, 2.0, 0.0]), torch.tensor([0.0, 4.0, 0.0]))) == pytest.approx(5 / 3)
    assert float(mse_loss(torch.tensor([1.0]), torch.tensor([1], dtype=torch.long))) == 0.0


def test_accuracy_counts_ties_as_wrong_and_margin_is_the_mean_difference():
    chosen, rejected = torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 2.0, 1.0, 1.0])
    assert float(pairwise_accuracy(chosen, rejected)) == 0.5
    assert float(mean_margin(chosen, rejected)) == pytest.approx((1 + 0 + 2 - 1) / 4)
