"""The math of PPO for language models, as pure functions on tensors.

Read top to bottom, this file is the whole algorithm, minus the models and the loop:

    log-probs of the sampled tokens  ->  per-token KL to the reference model
    -> per-token rewards (-beta * KL, plus the reward-model score at the last token)
    -> GAE advantages and returns  ->  clipped policy loss + clipped value loss
    and an adaptive KL coefficient beta between rollouts.

Conventions: a batch of responses is right-padded to shape (batch, T); `mask` (bool or 0/1 float,
same shape) marks the real response tokens. Every function ignores padded positions *exactly*:
their values are replaced by 0 before any arithmetic (not multiplied by the mask, since
`inf * 0 = nan`), so garbage, huge numbers or NaN in padding can neither leak into a result nor
poison a gradient. Log-probs are per token, shape (batch, T).

Batch statistics (means, variances, whitening, score scales) take an optional `reduce`: a function
that sums a tensor over every process of a multi-process run (an all-reduce), so that with the
rollout split over processes each one whitens and normalises with the statistics of the *global*
batch, as one process holding all of it would. `reduce=None` (one process) runs exactly the
single-process arithmetic, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

KLKind = Literal["k1", "k2", "k3", "abs"]
KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3", "abs")
# Sums a tensor over the processes of a run (an all-reduce with SUM); None = one process.
Reduce = Callable[[Tensor], Tensor]

# Largest |log ratio| that k3 exponentiates: exp(20) ~ 5e8 stays finite even in float16-ish ranges,
# so one wild token cannot turn the whole KL into inf.
_K3_MAX_LOG_RATIO = 20.0


# ----------------------------------------------------------------------------- masking helpers


def _bool_mask(mask: Tensor, like: Tensor) -> Tensor:
    """The mask as bool, after checking it lines up with the data (silent broadcasting hides bugs)."""
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match data shape {tuple(like.shape)}")
    return mask.bool()


def zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """x with padded positions set to 0 (not x * mask: inf * 0 = nan); gradients reach only the real
    positions. Public for the loop's own statistics (summed KL per response, finiteness checks)."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _summed(x: Tensor, reduce: Reduce | None) -> Tensor:
    """x summed over the processes (x itself in one process)."""
    return x if reduce is None else reduce(x)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None, reduce: Reduce | None = None) -> Tensor:
    """Mean of x over the real positions (all of them, or along `dim`).

    A selection with no real position averages to 0 rather than NaN (0/0), so an empty slice
    cannot make a loss non-finite. `reduce` (whole-tensor means only): the mean over every
    process's real positions (sums and counts all-reduced before dividing).
    """
    if reduce is not None and dim is not None:
        raise ValueError("masked_mean: `reduce` averages over every position of every process; it takes no `dim`")
    mask = _bool_mask(mask, x)
    total = _summed(zero_padding(x, mask).sum(dim=dim), reduce)
    count = _summed(mask.sum(dim=dim), reduce).clamp(min=1)
    return total / count


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, reduce: Reduce | None = None) -> Tensor:
    """Variance of x over all real positions (a scalar); with `reduce`, over every process's.

    `unbiased` applies Bessel's correction n/(n-1); with a single real value the variance is 0
    (instead of a division by zero), so whitening such a batch gives zeros, not NaN. Two passes
    (the mean first, then the squared deviations from it), also across processes: no
    sum-of-squares cancellation.
    """
    mask = _bool_mask(mask, x)
    centered = zero_padding(x - masked_mean(x, mask, reduce=reduce), mask)
    n = _summed(mask.sum(), reduce)
    denominator = (n - 1).clamp(min=1) if unbiased else n.clamp(min=1)
    return _summed(centered.square().sum(), reduce) / denominator


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8, reduce: Reduce | None = None
) -> Tensor:
    """Scale x to unit variance over the real positions; padded positions become 0.

    shift_mean=True (advantages): also subtract the mean, so about half the tokens are pushed up
    and half down in every batch. shift_mean=False (rewards): keep the original mean and only
    rescale the spread around it, so the sign of the average reward still means something.
    `reduce`: with the mean and variance of the global batch, spread over processes.
    """
    mask = _bool_mask(mask, x)
    mean = masked_mean(x, mask, reduce=reduce)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask, reduce=reduce) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return zero_padding(whitened, mask)


def batch_mean(x: Tensor, reduce: Reduce | None = None) -> Tensor:
    """The mean of every element of x, over every process's x with `reduce` (x.mean() in one process).

    For the per-response statistics of a rollout split over processes (reward, KL per response,
    length): each process holds its share of the rows, the mean is the global batch's.
    """
    if reduce is None:
        return x.mean()
    return reduce(x.sum()) / reduce(torch.tensor(x.numel(), dtype=x.dtype, device=x.device))


def score_scale(scores: Tensor, min_std: float, reduce: Reduce | None = None) -> tuple[float, float, float]:
    """(mean, std to divide by, measured std) of a batch of sequence scores, for normalising them.

    The std is floored at `min_std`: scores that are (nearly) constant on the reference policy say
    nothing about scale, and dividing by their std would blow every later difference up by orders
    of magnitude (a std of 5e-7 turns a 1.0 gain into 2e6 and a value loss into 1e12). Callers warn
    when the floor applies (measured std < min_std). One score has no spread: its std counts as 0.
    `reduce`: the scores of every process (the global batch), so every process divides by the same.
    """
    scores = scores.float()
    if reduce is None:
        mean = float(scores.mean())
        measured = float(scores.std()) if scores.numel() > 1 else 0.0
    else:
        every = torch.ones_like(scores, dtype=torch.bool)
        n = float(reduce(torch.tensor(scores.numel(), dtype=torch.float32, device=scores.device)))
        mean = float(masked_mean(scores, every, reduce=reduce))
        measured = float(masked_var(scores, every, reduce=reduce).sqrt()) if n > 1 else 0.0
    return mean, max(measured, min_std), measured


# ------------------------------------------------------------------ log-probs and entropy


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature), gathered at `labels`: (batch, T, V) -> (batch, T) float32.

    The temperature must be the one used for sampling: the tokens came from the tempered
    distribution, so the ratio and KL terms must be computed under it too (otherwise the KL grows
    much too fast, Huang et al. 2023). Rows are processed one at a time, so the only full-vocab
    float32 copy is one row's (T, V), not the whole batch's, whatever the logits' dtype.
    """
    rows = [
        torch.log_softmax(row.float() / temperature, dim=-1).gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        for row, row_labels in zip(logits, labels, strict=True)
    ]
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) per token: (batch, T, V) -> (batch, T) float32.

    Uses H = logsumexp(z) - sum(p * z), which needs no log of tiny probabilities. A diagnostic:
    collapsing entropy is the first sign the policy is over-optimising the reward model.
    """
    rows = []
    for row in logits:
        z = row.float() / temperature
        rows.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1))
    return torch.stack(rows)


# ----------------------------------------------------------------------------- KL and rewards


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: KLKind = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi.

    k1 = log pi - log pi_ref: unbiased, but noisy and negative for some tokens.
    k2 = 0.5 * (log pi - log pi_ref)^2: biased, low variance, never negative.
    k3 = (rho - 1) - log rho with rho = pi_ref / pi: unbiased, lower variance than k1 and never
         negative (log x <= x - 1). Its log ratio is clamped to +-20 so exp cannot overflow.
    abs = |log pi - log pi_ref|.
    (Schulman, "Approximating KL divergence", 2020.)
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp).square()
    if kind == "k3":
        log_rho = (ref_logp - logp).clamp(-_K3_MAX_LOG_RATIO, _K3_MAX_LOG_RATIO)
        return torch.expm1(log_rho) - log_rho
    if kind == "abs":
        return (logp - ref_logp).abs()
    raise ValueError(f"unknown KL estimator {kind!r}; expected one of {', '.join(KL_KINDS)}")


def per_token_rewards(
    scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, beta: float, kind: KLKind = "k1"
) -> tuple[Tensor, Tensor]:
    """PPO's reward signal: -beta * KL at every token, plus the sequence score at the last real token.

    The reward model judges whole responses, so its score (one per row, shape (batch,)) arrives
    when the response ends; the per-token KL keeps the policy near the reference model all the
    way. Rows may have different lengths (even 1). Returns (rewards, kl), both (batch, T) and 0 at
    padded positions.
    """
    mask = _bool_mask(mask, logp)
    if not mask.any(dim=1).all():
        raise ValueError("every response needs at least one real token to receive its score")
    kl = zero_padding(kl_penalty(zero_padding(logp, mask), zero_padding(ref_logp, mask), kind), mask)
    rewards = -beta * kl
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask).argmax(dim=1)  # index of the last real token in each row
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores.to(rewards.dtype)
    return rewards, kl


# ------------------------------------------------------------------------------------ GAE


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), run backwards in time.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, where "t+1"
    is the next *real* token; after the last real token the episode is over, so V and A bootstrap
    from 0. Returns (advantages, returns = advantages + values), both 0 at padded positions.
    gamma = 1 is standard for RLHF: the only big reward comes at the end and must reach the start.
    """
    mask = _bool_mask(mask, rewards)
    rewards, values = zero_padding(rewards, mask), zero_padding(values, mask)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(rewards.shape[1])):
        real = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(real, delta + gamma * lam * next_advantage, 0.0)
        advantages[:, t] = advantage
        next_value = torch.where(real, values[:, t], next_value)
        next_advantage = torch.where(real, advantage, next_advantage)
    returns = zero_padding(advantages + values, mask)
    return advantages, returns


# --------------------------------------------------------------------------------- losses


def policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate: mean over real tokens of max(-A * r, -A * clip(r, 1 - eps, 1 + eps)).

    r = pi / pi_old. Taking the max of the two losses (the pessimistic bound) means that once a
    token's ratio has moved past the clip range in the direction its advantage favours, its
    gradient is exactly 0: one rollout cannot push the policy arbitrarily far.

    Stats (detached): clipfrac = fraction of real tokens on the clipped branch (zero gradient);
    approx_kl = mean of k3 = (r - 1) - log r, a non-negative, unbiased estimate of
    KL(pi_old || pi) on tokens sampled from pi_old, i.e. how far this update has moved.
    """
    mask = _bool_mask(mask, logp)
    log_ratio = zero_padding(logp - zero_padding(old_logp, mask), mask)
    advantages = zero_padding(advantages, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Clipped value loss: 0.5 * mean over real tokens of max((V - R)^2, (V_clip - R)^2).

    V_clip = V_old + clip(V - V_old, -eps, eps) keeps the critic, like the policy, from moving far
    from where it was at rollout time. Returns (loss, clipfrac = fraction of real tokens where the
    clipped error is the larger one, i.e. where V gets no gradient).
    """
    mask = _bool_mask(mask, values)
    values = zero_padding(values, mask)
    old_values, returns = zero_padding(old_values, mask), zero_padding(returns, mask)
    values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped = (values - returns).square()
    clipped = (values_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def kl_loss(logp: Tensor, ref_logp: Tensor, mask: Tensor, kind: KLKind = "k3") -> Tensor:
    """KL to the reference model as a loss term (GRPO-style) instead of inside the reward.

    The tokens were sampled from pi itself and no gradient flows through the sampling, so what a
    loss contributes is E_pi[grad k(x)]. For k1 that is E_pi[grad log pi] = 0: its gradient is pure
    noise, so k1 is refused. k2's is exactly grad KL(pi || pi_ref); k3's is grad KL(pi_ref || pi),
    the forward KL (GRPO's choice: never negative, low variance). Both pull every token's
    log-prob towards the reference one.
    """
    if kind == "k1":
        raise ValueError("k1 as a KL loss has zero expected gradient on on-policy samples; use k2 or k3")
    mask = _bool_mask(mask, logp)
    kl = kl_penalty(zero_padding(logp, mask), zero_padding(ref_logp, mask), kind)
    return masked_mean(kl, mask)


# ---------------------------------------------------------------------------- diagnostics


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, reduce: Reduce | None = None) -> Tensor:
    """1 - Var[R - V] / Var[R] over real tokens: 1 = perfect critic, 0 = no better than a constant.

    Negative means the critic is worse than predicting the mean. NaN when the returns have no
    variance (the ratio is undefined); it is a diagnostic to log, never a loss. `reduce`: over the
    global batch.
    """
    mask = _bool_mask(mask, values)
    var_returns = masked_var(returns, mask, reduce=reduce)
    if var_returns == 0:
        return torch.tensor(float("nan"), dtype=var_returns.dtype, device=var_returns.device)
    return 1 - masked_var(returns - values, mask, reduce=reduce) / var_returns


def nonfinite(values: Mapping[str, Any]) -> list[str]:
    """Names of the entries (tensors or numbers) that contain NaN or inf.

    The trainer skips an update whose loss is not finite (one bad batch must not destroy the
    weights) and logs these names so the cause can be found.
    """
    return [name for name, value in values.items() if not torch.isfinite(torch.as_tensor(value)).all()]


# ------------------------------------------------------------------------ KL coefficient


class FixedKLController:
    """A constant beta. Same interface as the adaptive one so the trainer need not care which."""

    def __init__(self, beta: float) -> None:
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): steer beta so the measured KL tracks `target`.

    e = clip(KL / target - 1, -0.2, 0.2) and beta <- beta * (1 + e * n_steps / horizon): too much
    KL raises beta, too little lowers it, by at most 20% per `horizon` samples. beta is part of
    the training state: save it with state_dict() so a resumed run continues exactly.
    """

    def __init__(self, init_beta: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"KL target ({target}) and horizon ({horizon}) must be positive")
        super().__init__(init_beta)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
