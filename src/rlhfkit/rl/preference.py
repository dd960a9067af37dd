"""Offline preference losses (DPO, IPO, hinge, KTO) as pure functions of sequence log-probs.

Inputs are *summed* response log-probs, one number per sequence (shape (batch,)): of the policy
being trained and of the frozen reference model. The implicit reward of a response is
beta * (log pi(y|x) - log pi_ref(y|x)) (Rafailov et al. 2023); every loss here pushes the implicit
reward of preferred responses above that of the others.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DPOLossKind = Literal["sigmoid", "ipo", "hinge"]


def dpo_loss(
    chosen_logp: Tensor,
    rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    beta: float,
    kind: DPOLossKind = "sigmoid",
    label_smoothing: float = 0.0,
    margin: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses and the implicit rewards (chosen, rejected, detached), all (batch,).

    With u = (log pi_c - log pi_r) - (log ref_c - log ref_r) and z = beta * u - margin:
    - sigmoid (DPO): -(1 - eps) log σ(z) - eps log σ(-z); eps = `label_smoothing` is conservative DPO
      (cDPO: each label is taken to be flipped with probability eps, so the loss no longer drives
      the margin to infinity on pairs it already separates);
    - ipo: (z - 1/2)^2 / beta^2 = (u - 1/(2 beta) - margin/beta)^2 (Azar et al. 2023: regress the gap
      to a finite target instead of pushing it forever);
    - hinge (SLiC): max(0, 1 - z).
    The margin (how much better the chosen answer was rated; 0 where not given) is subtracted from
    the beta-scaled gap in all three, like the reward model's loss, so a strongly preferred pair must
    be separated further before it stops pulling.
    """
    if kind != "sigmoid" and label_smoothing:
        raise ValueError(f"label_smoothing is conservative DPO, defined for the sigmoid loss, not {kind!r}")
    u = (chosen_logp - rejected_logp) - (ref_chosen_logp - ref_rejected_logp)
    z = beta * u - (margin if margin is not None else 0.0)
    if kind == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif kind == "ipo":
        losses = (z - 0.5).square() / beta**2
    elif kind == "hinge":
        losses = torch.relu(1 - z)
    else:
        raise ValueError(f"unknown DPO loss {kind!r}; expected sigmoid, ipo or hinge")
    chosen_reward = (beta * (chosen_logp - ref_chosen_logp)).detach()
    rejected_reward = (beta * (rejected_logp - ref_rejected_logp)).detach()
    return losses, chosen_reward, rejected_reward


def kto_reference_point(kl_logp: Tensor, ref_kl_logp: Tensor) -> Tensor:
    """KTO's reference point z0: the batch's estimate of KL(pi || pi_ref), at least 0, detached.

    The log-probs are of *mismatched* (prompt, completion) pairs, so the estimate measures how far
    the policy drifted in general rather than on the labelled answers. No gradient flows through
    it (Ethayarajh et al. 2024, as TRL does): it only shifts where the value function is centred.
    """
    return (kl_logp - ref_kl_logp).mean().clamp(min=0).detach()


def kto_loss(
    logp: Tensor,
    ref_logp: Tensor,
    desirable: Tensor,
    reference_point: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Per-example KTO losses and implicit rewards beta * (log pi - log pi_ref) (detached), (batch,).

    A desirable example costs w_D * (1 - σ(beta * (r - z0))), an undesirable one
    w_U * (1 - σ(beta * (z0 - r))) with r = log pi - log pi_ref: the policy gains by raising the
    likelihood of good answers above the reference point and lowering bad ones below it. The
    weights rebalance unequal numbers of good and bad examples (the paper keeps
    w_D * n_D / (w_U * n_U) in [1, 4/3]).
    """
    desirable = desirable.bool()
    log_ratio = logp - ref_logp
    good = desirable_weight * (1 - torch.sigmoid(beta * (log_ratio - reference_point)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (reference_point - log_ratio)))
    return torch.where(desirable, good, bad), (beta * log_ratio).detach()
