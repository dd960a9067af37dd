"""A cheap reward ensemble for choosing what to label (labels/select.py): M linear reward heads on
the same frozen features, each fitted with the Bradley-Terry loss (rewards/losses.py) on its own
bootstrap sample of the pairs and its own initialisation.

Why linear heads on frozen features: retraining M full reward models per labeling round costs M
times the RM; heads on shared features cost almost nothing, and their spread still shows where the
labels so far leave the reward undetermined (the members agree where many pairs pin it down).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rlhfkit.rewards.losses import pairwise_loss


@dataclass
class HeadEnsemble:
    members: int = 5
    steps: int = 200
    lr: float = 0.05
    weight_decay: float = 1e-3  # L2 on the weights: a few dozen pairs in hundreds of dimensions
    bootstrap: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.weights: torch.Tensor | None = None  # (members, dim)

    def fit(self, chosen: np.ndarray, rejected: np.ndarray) -> HeadEnsemble:
        """Fit every member on (n, dim) features of the preferred and the other completion of n pairs."""
        c = torch.as_tensor(np.asarray(chosen), dtype=torch.float32)
        r = torch.as_tensor(np.asarray(rejected), dtype=torch.float32)
        if c.shape != r.shape or c.ndim != 2 or len(c) == 0:
            raise ValueError(f"chosen and rejected must be the same (n >= 1, dim) shape, got {c.shape}, {r.shape}")
        g = torch.Generator().manual_seed(self.seed)
        n, dim = c.shape
        rows = torch.stack(
            [torch.randint(n, (n,), generator=g) if self.bootstrap else torch.arange(n) for _ in range(self.members)]
        )  # (members, n): each member's sample of the pairs
        w = (torch.randn(self.members, dim, generator=g) * 0.01).requires_grad_()
        opt = torch.optim.Adam([w], lr=self.lr, weight_decay=self.weight_decay)
        diff = c - r  # a linear head's margin is w · (f_c − f_r)
        for _ in range(self.steps):
            opt.zero_grad()
            margins = (w[:, None, :] * diff[rows]).sum(-1)  # (members, n)
            loss = pairwise_loss(margins, torch.zeros_like(margins)) * self.members
            loss.backward()
            opt.step()
        self.weights = w.detach()
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(members, n) predicted rewards of n completions' (n, dim) features."""
        if self.weights is None:
            raise RuntimeError("fit the ensemble first")
        f = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        return (self.weights @ f.T).numpy()
