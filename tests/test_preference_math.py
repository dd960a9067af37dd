"""DPO/IPO/hinge/KTO losses and RLOO/GRPO advantages against numbers worked out by hand."""

import math

import pytest
import torch

from rlhfkit.rl.group import grpo_advantages, rloo_advantages
from rlhfkit.rl.preference import dpo_loss, kto_loss, kto_reference_point


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64), t(expected), atol=tol, rtol=0)


# pair 1: policy prefers chosen by 2 nats, reference indifferent: u = 2; pair 2: u = -1 (wrong way round)
CHOSEN, REJECTED, REF_C, REF_R = t([-1.0, -2.0]), t([-3.0, -1.0]), t([-2.0, -2.0]), t([-2.0, -2.0])


def test_dpo_sigmoid_loss_and_implicit_rewards():
    losses, chosen_r, rejected_r = dpo_loss(CHOSEN, REJECTED, REF_C, REF_R, beta=0.5)
    # z = beta * u = 1 and -0.5: -log σ(1) = log(1 + e^-1) = 0.3132617, log(1 + e^0.5) = 0.9740770
    close(losses, [0.3132617, 0.9740770])
    close(chosen_r, [0.5 * (-1 + 2), 0.5 * (-2 + 2)])  # [0.5, 0]
    close(rejected_r, [0.5 * (-3 + 2), 0.5 * (-1 + 2)])  # [-0.5, 0.5]


def test_cdpo_label_smoothing_mixes_both_directions():
    losses, _, _ = dpo_loss(CHOSEN, REJECTED, REF_C, REF_R, beta=0.5, label_smoothing=0.1)
    # 0.9 * 0.3132617 + 0.1 * -log σ(-1) = 0.9 * 0.3132617 + 0.1 * 1.3132617 = 0.4132617
    # 0.9 * 0.9740770 + 0.1 * -log σ(0.5) = 0.8766693 + 0.1 * 0.4740770 = 0.9240770
    close(losses, [0.4132617, 0.9240770])


def test_ipo_and_hinge_losses():
    ipo, _, _ = dpo_loss(CHOSEN, REJECTED, REF_C, REF_R, beta=0.5, kind="ipo")
    close(ipo, [(1 - 0.5) ** 2 / 0.25, (-0.5 - 0.5) ** 2 / 0.25])  # (u - 1/(2 beta))^2 = (2-1)^2, (-1-1)^2
    hinge, _, _ = dpo_loss(CHOSEN, REJECTED, REF_C, REF_R, beta=0.5, kind="hinge")
    close(hinge, [0.0, 1.5])  # max(0, 1 - z)


def test_margin_shifts_the_scaled_gap_in_every_loss():
    margin = t([0.5, 0.0])
    sig, _, _ = dpo_loss(CHOSEN, REJECTED, REF_C, REF_R, beta=0.5, margin=margin)
    close(sig, [math.log1p(math.exp(-0.5)), 0.9740770])  # z = 1 - 0.5
    ipo, _, _ = dpo_loss(CHOSEN, REJECTED, REF_C, REF_R, beta=0.5, kind="ipo", margin=margin)
    close(ipo, [0.0, 4.0])
    hinge, _, _ = dpo_loss(CHOSEN, REJECTED, REF_C, REF_R, beta=0.5, kind="hinge", margin=margin)
    close(hinge, [0.5, 1.5])


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen, rejected = CHOSEN.clone().requires_grad_(), REJECTED.clone().requires_grad_()
    losses, _, _ = dpo_loss(chosen, rejected, REF_C, REF_R, beta=0.5)
    losses.sum().backward()
    # d/dc -log σ(beta (c - r)) = -beta σ(-z): -0.5 * σ(-1) = -0.1344707, -0.5 * σ(0.5) = -0.3112297
    close(chosen.grad, [-0.1344707, -0.3112297])
    close(rejected.grad, [0.1344707, 0.3112297])


def test_bad_dpo_settings_are_refused():
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(CHOSEN, REJECTED, REF_C, REF_R, beta=0.5, kind="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(CHOSEN, REJECTED, REF_C, REF_R, beta=0.5, kind="robust")  # type: ignore[arg-type]


def test_kto_reference_point_is_a_clamped_detached_mean():
    close(kto_reference_point(t([-1.0, -2.0]), t([-2.0, -2.0])), 0.5)  # mean(1, 0)
    close(kto_reference_point(t([-3.0, -3.0]), t([-2.0, -2.0])), 0.0)  # mean -1, clamped at 0
    logp = t([-1.0, -2.0]).requires_grad_()
    assert not kto_reference_point(logp, t([-2.0, -2.0])).requires_grad


def test_kto_loss_with_weights():
    losses, rewards = kto_loss(
        t([-1.0, -3.0]), t([-2.0, -2.0]), torch.tensor([True, False]), t(0.5), beta=1.0,
        desirable_weight=2.0, undesirable_weight=1.0,
    )  # fmt: skip
    # desirable, r = 1: 2 * (1 - σ(1 - 0.5)) = 2 * 0.3775407; undesirable, r = -1: 1 - σ(0.5 + 1) = 0.1824255
    close(losses, [0.7550813, 0.1824255])
    close(rewards, [1.0, -1.0])


# ---------------------------------------------------------------------- RLOO / GRPO advantages

# two prompts, their responses interleaved and with arbitrary ids: prompt 5 -> 1, 2, 3; prompt 2 -> 10, 20
SCORES, GROUPS = t([1.0, 10.0, 2.0, 20.0, 3.0]), torch.tensor([5, 2, 5, 2, 5])


def test_rloo_leave_one_out_baseline():
    # 1 - (2+3)/2, 10 - 20, 2 - (1+3)/2, 20 - 10, 3 - (1+2)/2
    close(rloo_advantages(SCORES, GROUPS), [-1.5, -10.0, 0.0, 10.0, 1.5])


def test_grpo_group_normalised_advantages():
    # prompt 5: mean 2, unbiased std 1; prompt 2: mean 15, unbiased std sqrt(50) = 7.0710678
    a = 1 / (1 + 1e-4)
    b = 5 / (math.sqrt(50) + 1e-4)
    close(grpo_advantages(SCORES, GROUPS), [-a, -b, 0.0, b, a])
    close(grpo_advantages(SCORES, GROUPS, scale=False), [-1.0, -5.0, 0.0, 5.0, 1.0])
    close(grpo_advantages(t([4.0, 4.0]), torch.tensor([0, 0])), [0.0, 0.0])  # equal scores: 0, not NaN


def test_a_group_of_one_is_an_error():
    with pytest.raises(ValueError, match="at least 2 responses"):
        rloo_advantages(t([1.0, 2.0, 3.0]), torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="at least 2 responses"):
        grpo_advantages(t([1.0]), torch.tensor([0]))
    with pytest.raises(ValueError, match="same 1-D shape"):
        rloo_advantages(t([1.0, 2.0]), torch.tensor([0, 0, 0]))
