"""Reward-model losses and metrics as small pure functions of reward tensors.

Pairwise (Bradley-Terry): the probability that `chosen` beats `rejected` is σ(r_c − r_r), so the
loss is −log σ(r_c − r_r). With a margin m (Llama 2: how much better the chosen one was rated),
the loss is −log σ(r_c − r_r − m): a pair only stops pulling once it is separated by at least m.
Regression (MSE) fits scalar ratings directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of −log σ(r_chosen − r_rejected − margin) over pairs (margin 0 where not given)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def mse_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between predicted rewards and the rated scores."""
    return F.mse_loss(predicted, target.to(predicted.dtype))


def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs the model orders like the labelers (a tie counts as wrong)."""
    return (chosen > rejected).float().mean()


def mean_margin(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean of r_chosen − r_rejected: how confidently the model separates the pairs."""
    return (chosen - rejected).float().mean()
