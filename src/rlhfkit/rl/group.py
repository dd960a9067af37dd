"""Critic-free advantages for K samples per prompt (RLOO, GRPO), as pure functions on tensors.

Instead of a learned value function, the other samples of the same prompt are the baseline.
`groups` gives each response's prompt (any integer id, shape (batch,)); groups may differ in
size, but each needs at least two responses, since one sample has nothing to be compared with.
Scores are one number per response (the sequence reward, KL penalty included if it is in the
reward); the returned advantage is per response, to be spread over its tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _group_stats(scores: Tensor, groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(index of each response's group, size of each group, sum of scores of each group)."""
    if scores.shape != groups.shape or scores.dim() != 1:
        raise ValueError(f"scores {tuple(scores.shape)} and groups {tuple(groups.shape)} must be the same 1-D shape")
    _, index, sizes = torch.unique(groups, return_inverse=True, return_counts=True)
    if (sizes < 2).any():
        raise ValueError("every prompt needs at least 2 responses for a group baseline (num_generations >= 2)")
    sums = torch.zeros(len(sizes), dtype=scores.dtype, device=scores.device).index_add_(0, index, scores)
    return index, sizes.to(scores.dtype), sums


def rloo_advantages(scores: Tensor, groups: Tensor) -> Tensor:
    """RLOO (Ahmadian et al. 2024): score minus the mean of the *other* responses to its prompt.

    A_i = s_i - (sum_g - s_i) / (K_g - 1). Leaving the response out keeps the baseline independent
    of the sample it judges, so the policy-gradient estimate stays unbiased.
    """
    index, sizes, sums = _group_stats(scores, groups)
    return scores - (sums[index] - scores) / (sizes[index] - 1)


def grpo_advantages(scores: Tensor, groups: Tensor, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO (Shao et al. 2024): score minus its group's mean, divided by the group's std + eps.

    The std is the unbiased (K - 1) one, as in the paper and TRL. `scale=False` keeps only the mean
    subtraction (Dr. GRPO, Liu et al. 2025: dividing by the std over-weights prompts whose answers
    all score nearly alike, i.e. too easy or too hard ones).
    """
    index, sizes, sums = _group_stats(scores, groups)
    centred = scores - (sums / sizes)[index]
    if not scale:
        return centred
    squares = torch.zeros_like(sums).index_add_(0, index, centred.square())
    std = (squares / (sizes - 1)).sqrt()
    return centred / (std[index] + eps)
