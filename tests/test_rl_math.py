"""PPO math against numbers worked out by hand (the arithmetic is in the comments).

Padded positions are always filled with garbage (huge numbers, inf, NaN) to prove they are ignored.
"""

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from rlhfkit.rl.core import (
    AdaptiveKLController,
    FixedKLController,
    batch_mean,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_loss,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    nonfinite,
    per_token_rewards,
    policy_loss,
    score_scale,
    value_loss,
)

BIG = 1e30  # squares to inf in float32: any leak of padding shows up as inf/NaN
NAN = float("nan")


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64), t(expected), atol=tol, rtol=0)


# ----------------------------------------------------------------------------- masking


def test_masked_mean_and_var_ignore_padding():
    x = torch.tensor([[1.0, 2.0, BIG], [4.0, NAN, -BIG]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    close(masked_mean(x, mask), 7 / 3)  # (1 + 2 + 4) / 3
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    # values 1, 2, 4; mean 7/3; squared deviations 16/9 + 1/9 + 25/9 = 42/9
    close(masked_var(x, mask, unbiased=True), 42 / 9 / 2)
    close(masked_var(x, mask, unbiased=False), 42 / 9 / 3)


def test_masked_mean_of_nothing_is_zero_and_mask_shape_is_checked():
    close(masked_mean(torch.tensor([[NAN, BIG]]), torch.zeros(1, 2)), 0.0)
    with pytest.raises(ValueError, match="mask shape"):
        masked_mean(torch.ones(2, 3), torch.ones(2, 2))


def test_masked_whiten_with_and_without_mean_shift():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, BIG, NAN]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    # values 1..4: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, std 1.2909944
    # (x - 2.5) / 1.2909944 = -1.1618950, -0.3872983, 0.3872983, 1.1618950
    shifted = masked_whiten(x, mask)
    close(shifted, [[-1.1618950, -0.3872983, 0.3872983], [1.1618950, 0.0, 0.0]])
    # without mean shift the mean 2.5 is kept and only the spread is rescaled
    kept = masked_whiten(x, mask, shift_mean=False)
    close(kept, [[1.3381050, 2.1127017, 2.8872983], [3.6618950, 0.0, 0.0]])
    close(masked_mean(kept, mask), 2.5)
    close(masked_var(kept, mask), 1.0)


def test_whitening_a_single_value_gives_zero_not_nan():
    close(masked_whiten(torch.tensor([[3.0, BIG]]), torch.tensor([[1, 0]])), [[0.0, 0.0]])


# ------------------------------------------------------------------ log-probs and entropy


def test_logprobs_use_the_sampling_temperature():
    logits = torch.tensor([[[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]]])
    labels = torch.tensor([[0, 2]])
    # T = 0.5: z = (4, 2, 0); logsumexp = 4 + log(1 + e^-2 + e^-4) = 4 + log(1.1536510) = 4.1429316
    close(logprobs_from_logits(logits, labels, temperature=0.5), [[4 - 4.1429316, 0 - 4.1429316]])
    # T = 1: logsumexp(2, 1, 0) = 2 + log(1 + e^-1 + e^-2) = 2.4076060; label 1 -> 1 - 2.4076060
    close(logprobs_from_logits(logits, torch.tensor([[1, 1]])), [[-1.4076060, -1.4076060]])


def test_logprobs_from_bf16_logits_are_float32_and_carry_gradients():
    logits = torch.randn(2, 3, 5, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3))
    logp = logprobs_from_logits(logits, labels, temperature=0.7)
    assert logp.dtype == torch.float32 and logp.shape == (2, 3)
    expected = torch.log_softmax(logits.float() / 0.7, -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(logp, expected)
    logp.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_entropy_of_uniform_is_log_vocab_and_tempered_entropy_by_hand():
    close(entropy_from_logits(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7)).tolist())
    # T = 0.5, z = (4, 2, 0): p = e^(z - 4.1429316) = (0.8668134, 0.1173104, 0.0158762)
    # H = logsumexp(z) - sum(p * z) = 4.1429316 - (3.4672534 + 0.2346209) = 0.4410573
    close(entropy_from_logits(torch.tensor([[[2.0, 1.0, 0.0]]]), temperature=0.5), [[0.4410573]])


# ----------------------------------------------------------------------------- KL and rewards


def test_kl_estimators_on_specific_numbers():
    logp, ref_logp = t([-1.0, -2.0]), t([-1.5, -1.0])
    # log pi - log pi_ref = 0.5 and -1
    close(kl_penalty(logp, ref_logp, "k1"), [0.5, -1.0])
    close(kl_penalty(logp, ref_logp, "k2"), [0.125, 0.5])
    close(kl_penalty(logp, ref_logp, "abs"), [0.5, 1.0])
    # k3: log rho = -0.5 -> (e^-0.5 - 1) + 0.5 = 0.1065307; log rho = 1 -> (e - 1) - 1 = 0.7182818
    close(kl_penalty(logp, ref_logp, "k3"), [0.1065307, 0.7182818])
    with pytest.raises(ValueError, match="k1, k2, k3, abs"):
        kl_penalty(logp, ref_logp, "k4")


def test_k3_is_never_negative_and_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    logp, ref_logp = 5 * torch.randn(1000, generator=g), 5 * torch.randn(1000, generator=g)
    assert (kl_penalty(logp, ref_logp, "k3") >= 0).all()
    assert (kl_penalty(logp, logp, "k3") == 0).all()
    assert torch.isfinite(kl_penalty(t([-200.0]), t([0.0]), "k3")).all()  # rho = e^200 is clamped


def test_per_token_rewards_put_the_score_on_the_last_real_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, BIG, NAN]])
    ref_logp = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -BIG, float("inf")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])  # second response has a single token
    rewards, kl = per_token_rewards(torch.tensor([2.0, -1.0]), logp, ref_logp, mask, beta=0.1)
    # k1 row 0: 0.5, -1, 0 ; row 1: -0.3 - (-0.1) = -0.2
    close(kl, [[0.5, -1.0, 0.0], [-0.2, 0.0, 0.0]])
    # -0.1 * kl, and score 2 at t=2 (row 0), score -1 at t=0 (row 1): 0.02 - 1 = -0.98
    close(rewards, [[-0.05, 0.1, 2.0], [-0.98, 0.0, 0.0]])
    # with k3 the KL part is never negative: row 0 t=0 -> 0.1065307, t=1 -> 0.7182818
    rewards, kl = per_token_rewards(torch.tensor([2.0, -1.0]), logp, ref_logp, mask, 0.1, kind="k3")
    close(kl[0], [0.1065307, 0.7182818, 0.0])
    close(rewards[0], [-0.01065307, -0.07182818, 2.0])


def test_per_token_rewards_find_the_last_real_token_whatever_the_padding():
    # left-padded row: real tokens at t=1, 2, so the score belongs at t=2 (not at mask.sum() - 1 = 1)
    logp, ref_logp = torch.tensor([[NAN, -1.0, -2.0]]), torch.tensor([[BIG, -1.5, -1.0]])
    rewards, _ = per_token_rewards(torch.tensor([3.0]), logp, ref_logp, torch.tensor([[0, 1, 1]]), beta=0.1)
    close(rewards, [[0.0, -0.05, 0.1 + 3.0]])


def test_per_token_rewards_reject_an_empty_response():
    with pytest.raises(ValueError, match="at least one real token"):
        per_token_rewards(torch.zeros(1), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), 0.1)


# ------------------------------------------------------------------------------------ GAE


def test_gae_gamma_1_lambda_095():
    rewards, values = t([[0.1, -0.2, 1.0]]), t([[0.5, 0.3, 0.6]])
    # deltas: d2 = 1.0 + 0 - 0.6 = 0.4; d1 = -0.2 + 0.6 - 0.3 = 0.1; d0 = 0.1 + 0.3 - 0.5 = -0.1
    # A2 = 0.4; A1 = 0.1 + 0.95 * 0.4 = 0.48; A0 = -0.1 + 0.95 * 0.48 = 0.356
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.95)
    close(advantages, [[0.356, 0.48, 0.4]])
    close(returns, [[0.856, 0.78, 1.0]])


def test_gae_gamma_09_lambda_05():
    rewards, values = t([[0.1, -0.2, 1.0]]), t([[0.5, 0.3, 0.6]])
    # d2 = 1.0 - 0.6 = 0.4; d1 = -0.2 + 0.9 * 0.6 - 0.3 = 0.04; d0 = 0.1 + 0.9 * 0.3 - 0.5 = -0.13
    # gamma * lam = 0.45: A2 = 0.4; A1 = 0.04 + 0.45 * 0.4 = 0.22; A0 = -0.13 + 0.45 * 0.22 = -0.031
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.5)
    close(advantages, [[-0.031, 0.22, 0.4]])
    close(returns, [[0.469, 0.52, 1.0]])


def test_gae_ragged_batch_bootstraps_zero_after_the_last_real_token():
    rewards = t([[0.1, -0.2, 1.0], [2.0, BIG, NAN], [0.0, 1.0, -BIG]])
    values = t([[0.5, 0.3, 0.6], [0.5, NAN, BIG], [0.2, 0.4, BIG]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 1 (length 1): A0 = 2.0 - 0.5 = 1.5, return 2.0
    # row 2 (length 2): d1 = 1.0 - 0.4 = 0.6; d0 = 0.0 + 0.4 - 0.2 = 0.2; A0 = 0.2 + 0.95 * 0.6 = 0.77
    close(advantages, [[0.356, 0.48, 0.4], [1.5, 0.0, 0.0], [0.77, 0.6, 0.0]])
    close(returns, [[0.856, 0.78, 1.0], [2.0, 0.0, 0.0], [0.97, 1.0, 0.0]])


def test_gae_skips_masked_positions_anywhere_in_the_row():
    # the T=3 example above with a masked garbage token inserted at t=1 (and left padding at t=0):
    # the real tokens must get exactly the same advantages, the masked ones 0
    rewards, values = t([[BIG, 0.1, NAN, -0.2, 1.0]]), t([[NAN, 0.5, BIG, 0.3, 0.6]])
    mask = torch.tensor([[0, 1, 0, 1, 1]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    close(advantages, [[0.0, -0.031, 0.0, 0.22, 0.4]])
    close(returns, [[0.0, 0.469, 0.0, 0.52, 1.0]])


# --------------------------------------------------------------------------------- losses


def _policy_batch():
    """Six tokens (two rows of three, plus a garbage pad each), eps = 0.2, A = +-1, old log-prob -1."""
    ratios = [[1.1, 1.5, 0.5], [0.5, 1.5, 0.9]]
    old_logp = t([[-1.0] * 4] * 2)
    logp = t([[math.log(r) - 1.0 for r in row] + [BIG] for row in ratios]).requires_grad_()
    advantages = t([[1.0, 1.0, 1.0, NAN], [-1.0, -1.0, -1.0, BIG]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    return logp, old_logp, advantages, mask


def test_policy_loss_clipping_by_hand():
    logp, old_logp, advantages, mask = _policy_batch()
    loss, stats = policy_loss(logp, old_logp, advantages, mask, clip_eps=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   A=+1 r=1.1: max(-1.1, -1.1) = -1.1  inside the range
    #   A=+1 r=1.5: max(-1.5, -1.2) = -1.2  clipped (already pushed up enough)
    #   A=+1 r=0.5: max(-0.5, -0.8) = -0.5  unclipped (pessimistic side: keep the gradient)
    #   A=-1 r=0.5: max( 0.5,  0.8) =  0.8  clipped (already pushed down enough)
    #   A=-1 r=1.5: max( 1.5,  1.2) =  1.5  unclipped
    #   A=-1 r=0.9: max( 0.9,  0.9) =  0.9  inside the range
    # mean = (-1.1 - 1.2 - 0.5 + 0.8 + 1.5 + 0.9) / 6 = 0.4 / 6
    close(loss, 0.4 / 6)
    close(stats["clipfrac"], 2 / 6)
    # approx_kl = mean of (r - 1) - log r: 0.0046898 + 0.0945349 + 0.1931472 + 0.1931472 + 0.0945349
    #             + 0.0053605 = 0.5854145; / 6 = 0.0975691
    close(stats["approx_kl"], 0.0975691)
    assert not stats["clipfrac"].requires_grad and not stats["approx_kl"].requires_grad


def test_policy_loss_gradient_is_zero_for_clipped_tokens_and_padding():
    logp, old_logp, advantages, mask = _policy_batch()
    loss, _ = policy_loss(logp, old_logp, advantages, mask)
    loss.backward()
    # d(-A r)/d logp = -A r on unclipped tokens (r = e^(logp - old)), divided by the 6 tokens
    close(logp.grad, [[-1.1 / 6, 0.0, -0.5 / 6, 0.0], [0.0, 1.5 / 6, 0.9 / 6, 0.0]])


def test_value_loss_clipped_and_unclipped_branches():
    values = t([[1.0, 1.5, 1.5, BIG]]).requires_grad_()
    old_values = t([[0.9, 1.0, 1.0, NAN]])
    returns = t([[1.5, 2.0, 1.0, -BIG]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = value_loss(values, old_values, returns, mask, clip_eps=0.2)
    # token 0: V moved 0.1 (inside): (1.0 - 1.5)^2 = 0.25 on both branches
    # token 1: V_clip = 1.0 + 0.2 = 1.2: max((1.5 - 2)^2, (1.2 - 2)^2) = max(0.25, 0.64) = 0.64 clipped
    # token 2: V_clip = 1.2:           max((1.5 - 1)^2, (1.2 - 1)^2) = max(0.25, 0.04) = 0.25 unclipped
    # loss = 0.5 * (0.25 + 0.64 + 0.25) / 3 = 0.19
    close(loss, 0.19)
    close(clipfrac, 1 / 3)
    loss.backward()
    # d/dV of 0.5 * (V - R)^2 / 3 = (V - R) / 3 on unclipped tokens, 0 on the clipped one
    close(values.grad, [[-0.5 / 3, 0.0, 0.5 / 3, 0.0]])


def test_kl_loss_is_the_masked_mean_of_k3():
    logp = torch.tensor([[-1.0, -2.0, BIG]], requires_grad=True)
    ref_logp = torch.tensor([[-1.5, -1.0, NAN]])
    loss = kl_loss(logp, ref_logp, torch.tensor([[1, 1, 0]]))
    close(loss, (0.1065307 + 0.7182818) / 2)
    loss.backward()
    # d k3 / d logp = 1 - rho: (1 - e^-0.5) / 2 = 0.1967347, (1 - e) / 2 = -0.8591409; padding 0
    close(logp.grad, [[0.1967347, -0.8591409, 0.0]])


def test_kl_loss_expected_gradients_on_the_policys_own_samples():
    """What each estimator does as a loss: its gradient averaged over the tokens the policy samples
    (the exact expectation over a 3-token vocabulary: each token weighted by pi, no gradient through
    the sampling)."""
    theta = torch.tensor([0.5, -0.3, 0.1], dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.0, 0.4, -0.2], dtype=torch.float64), 0)

    def expected_grad(kind):
        logp = torch.log_softmax(theta, 0)
        (grad,) = torch.autograd.grad((logp.exp().detach() * kl_penalty(logp, ref, kind)).sum(), theta)
        return grad

    def true_grad(forward: bool):
        logp = torch.log_softmax(theta, 0)
        kl = (ref.exp() * (ref - logp)).sum() if forward else (logp.exp() * (logp - ref)).sum()
        (grad,) = torch.autograd.grad(kl, theta)
        return grad

    torch.testing.assert_close(expected_grad("k2"), true_grad(forward=False))  # grad KL(pi || pi_ref)
    torch.testing.assert_close(expected_grad("k3"), true_grad(forward=True))  # grad KL(pi_ref || pi)
    assert true_grad(forward=False).abs().max() > 0.05
    assert expected_grad("k1").abs().max() < 1e-12  # E_pi[grad log pi] = grad sum pi = 0: refused as a loss
    with pytest.raises(ValueError, match="k1"):
        kl_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), "k1")


def test_score_scale_floors_the_std():
    assert score_scale(torch.tensor([1.0, 2.0, 3.0]), min_std=0.01) == pytest.approx((2.0, 1.0, 1.0))  # unbiased std
    mean, std, measured = score_scale(torch.tensor([5.0, 5.0 + 2e-7]), min_std=0.01)
    assert (mean, std) == pytest.approx((5.0, 0.01)) and measured < 1e-6  # not 1 / 1.4e-7 = 7e6 times larger
    assert score_scale(torch.tensor([3.0]), min_std=0.5) == (3.0, 0.5, 0.0)  # one score has no spread


# ---------------------------------------------------------------------------- diagnostics


def test_explained_variance():
    returns = t([[1.0, 2.0, 3.0, BIG]])
    values = t([[1.0, 2.0, 2.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # R - V = (0, 0, 1): var 1/3 (unbiased); var R = 1 -> 1 - 1/3
    close(explained_variance(values, returns, mask), 2 / 3)
    close(explained_variance(returns, returns, mask), 1.0)
    assert torch.isnan(explained_variance(values, torch.ones(1, 4), mask))


def test_nonfinite_names_the_bad_entries():
    assert nonfinite({"loss": torch.tensor(1.0), "kl": 0.5}) == []
    stats = {"loss": torch.tensor(float("inf")), "kl": torch.tensor([0.1, NAN]), "ok": 2.0}
    assert nonfinite(stats) == ["loss", "kl"]


# ------------------------------------------------------------------------ KL coefficient


def test_adaptive_kl_controller_two_updates_by_hand():
    ctl = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)
    # e = 9/6 - 1 = 0.5 -> clipped to 0.2; beta = 0.1 * (1 + 0.2 * 256 / 10000) = 0.1 * 1.00512
    assert ctl.value == pytest.approx(0.100512, abs=1e-12)
    ctl.update(current_kl=5.4, n_steps=1000)
    # e = 5.4/6 - 1 = -0.1; beta = 0.100512 * (1 - 0.1 * 0.1) = 0.100512 * 0.99
    assert ctl.value == pytest.approx(0.09950688, abs=1e-12)


def test_kl_controllers_resume_exactly_from_state_dict():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, 256)
    resumed = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    resumed.load_state_dict(ctl.state_dict())
    ctl.update(3.0, 512)
    resumed.update(3.0, 512)
    assert resumed.value == ctl.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 10_000)
    assert fixed.value == 0.05 and fixed.state_dict() == {"value": 0.05}
    with pytest.raises(ValueError, match="must be positive"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


# ------------------------------------------------------- statistics over processes (`reduce`)


def near(actual, expected):
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.as_tensor(expected).double(), atol=1e-6, rtol=0)


def across_shards(fn, shards):
    """`fn(shard, reduce)` run on every shard at once, one thread per shard, where `reduce` sums a
    tensor over the shards as an all-reduce sums it over processes (every caller waits for the others).
    Returns each shard's result."""
    barrier = threading.Barrier(len(shards))
    slots: list = [None] * len(shards)

    def run(i):
        def reduce(x):
            slots[i] = x
            barrier.wait()
            total = sum(slots[1:], slots[0].clone())
            barrier.wait()  # everyone has read the slots before they are reused
            return total

        return fn(shards[i], reduce)

    with ThreadPoolExecutor(len(shards)) as pool:
        return list(pool.map(run, range(len(shards))))


def test_statistics_with_reduce_are_the_global_batch_ones():
    """Rows split over 3 "processes" (uneven, with padding garbage): each one whitens, averages and
    scales with the statistics of all the rows together, i.e. what one process holding them computes."""
    x = torch.tensor(
        [[1.0, 2.0, BIG], [4.0, NAN, NAN], [-3.0, 0.5, 7.0], [2.0, 2.0, NAN], [9.0, -1.0, 0.0]], dtype=torch.float64
    )
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]]).bool()
    shards = [(x[:1], mask[:1]), (x[1:3], mask[1:3]), (x[3:], mask[3:])]
    whole = masked_whiten(x, mask)
    for shift in (True, False):
        parts = across_shards(lambda s, r, shift=shift: masked_whiten(*s, shift_mean=shift, reduce=r), shards)
        near(torch.cat(parts), masked_whiten(x, mask, shift_mean=shift))
    assert not torch.allclose(masked_whiten(*shards[1]), whole[1:3])  # (the shards alone differ)
    for fn, expected in [
        (lambda s, r: masked_mean(*s, reduce=r), masked_mean(x, mask)),
        (lambda s, r: masked_var(*s, reduce=r), masked_var(x, mask)),
        (
            lambda s, r: explained_variance(s[0].nan_to_num(), s[0].nan_to_num() * 0.5, s[1], r),
            explained_variance(x.nan_to_num(), x.nan_to_num() * 0.5, mask),
        ),
    ]:
        for part in across_shards(fn, shards):
            near(part, expected)
    scores = t([0.5, 2.0, -1.0, 4.0, 3.0])
    for part in across_shards(lambda s, r: score_scale(s, 0.01, r), [scores[:2], scores[2:]]):
        assert part == pytest.approx(score_scale(scores, 0.01))
    for part in across_shards(lambda s, r: batch_mean(s, r), [scores[:1], scores[1:]]):
        near(part, scores.mean())
    with pytest.raises(ValueError, match="no `dim`"):
        masked_mean(x, mask, dim=1, reduce=lambda v: v)


def test_reduce_none_is_the_single_process_arithmetic_bit_for_bit():
    """One process runs exactly the arithmetic it ran before processes existed (no ulp drift): the
    expectations are the pre-`reduce` formulas."""
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(7, 5, generator=g), torch.rand(7, 5, generator=g) > 0.3
    mean = torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)
    var = torch.where(mask, x - mean, 0.0).square().sum() / (mask.sum() - 1).clamp(min=1)
    assert torch.equal(masked_whiten(x, mask), torch.where(mask, (x - mean) * torch.rsqrt(var + 1e-8), 0.0))
    scores = torch.randn(9, generator=g)
    assert score_scale(scores, 0.01)[:2] == (float(scores.mean()), float(scores.std()))
    assert torch.equal(batch_mean(scores), scores.mean())
