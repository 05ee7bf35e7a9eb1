"""Hand-worked checks of rlhf.losses: small tensors, the arithmetic in comments, no models."""

from __future__ import annotations

import math

import pytest
import torch
from deviceless import DevicelessFactories
from torch.testing import assert_close

from rlhf import losses
from rlhf.losses import (
    dpo_loss,
    entropy_from_logits,
    hinge_loss,
    ipo_loss,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    orpo_loss,
    pairwise_reward_loss,
)


def t(*rows) -> torch.Tensor:
    """t([1, 2]) -> shape [2]; t([1, 2], [3, 4]) -> shape [2, 2]; t(1.0, 2.0) -> shape [2]."""
    return torch.tensor(rows[0] if len(rows) == 1 else rows, dtype=torch.float32)


def softplus_neg(x: float) -> float:
    """-log sigmoid(x) = log(1 + e^-x), in plain floats for expected values."""
    return math.log1p(math.exp(-x))


# ---------------------------------------------------------------------------------- masked reductions


def test_masked_sum_and_mean_hand_values():
    x = t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    mask = t([1, 1, 0], [1, 0, 0])
    # counted: 1, 2, 4 -> sum 7, mean 7/3; per row: (1+2)/2 = 1.5 and 4/1 = 4
    assert_close(masked_sum(x, mask), torch.tensor(7.0))
    assert_close(masked_mean(x, mask), torch.tensor(7.0 / 3.0))
    assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.0]))
    assert_close(masked_sum(x, mask.bool(), dim=1), torch.tensor([3.0, 4.0]))


def test_masked_mean_empty_mask_is_zero_not_nan():
    x = t([1.0, 2.0], [float("inf"), float("nan")])
    mask = t([1, 0], [0, 0])
    # the second row is empty and holds inf/NaN: its mean is 0, the global mean ignores it
    assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.0, 0.0]))
    assert_close(masked_mean(x, mask), torch.tensor(1.0))
    assert_close(masked_mean(x, torch.zeros_like(mask)), torch.tensor(0.0))


def test_masked_var_hand_values():
    x = t([1.0, 2.0, 99.0], [4.0, -7.0, 0.0])
    mask = t([1, 1, 0], [1, 0, 0])
    # counted 1, 2, 4: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9
    # biased 42/9 / 3 = 14/9; unbiased 42/9 / 2 = 7/3
    assert_close(masked_var(x, mask, unbiased=False), torch.tensor(14.0 / 9.0))
    assert_close(masked_var(x, mask), torch.tensor(7.0 / 3.0))
    # one element: variance 0, not a division by zero
    assert_close(masked_var(x, t([1, 0, 0], [0, 0, 0])), torch.tensor(0.0))


def test_masked_var_two_and_zero_elements():
    # n = 2, the smallest n with Bessel's correction: counted [1, 3], mean 2, squared deviations 1 + 1
    # biased 2 / 2 = 1; unbiased 2 / (2 - 1) = 2
    x, mask = t([1.0, 3.0, 50.0]), t([1, 1, 0])
    assert_close(masked_var(x, mask, unbiased=False), torch.tensor(1.0))
    assert_close(masked_var(x, mask), torch.tensor(2.0))
    # n = 0: 0, not NaN
    assert_close(masked_var(x, t([0, 0, 0])), torch.tensor(0.0))


def test_masked_statistics_keep_the_dtype_of_x():
    # a bf16 x with a float32 mask stays bf16 (the count is cast to x's dtype); an integer x sums to an
    # integer. Values: rows [1, 2 | 4, 8] counted -> means [1.5, 6], all mean 15 / 4 = 3.75,
    # var: squared deviations 7.5625 + 3.0625 + 0.0625 + 18.0625 = 28.75, unbiased / 3 = 9.583 (bf16 9.5625)
    bf16 = torch.bfloat16
    x, mask = t([1.0, 2.0, 7.0], [4.0, 8.0, 7.0]).to(bf16), t([1, 1, 0], [1, 1, 0])
    assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 6.0], dtype=bf16))
    assert_close(masked_mean(x, mask), torch.tensor(3.75, dtype=bf16))
    assert_close(masked_var(x, mask), torch.tensor(28.75 / 3.0, dtype=bf16))
    assert_close(masked_sum(torch.tensor([1, 2, 3]), t([1, 0, 1])), torch.tensor(4))


# ---------------------------------------------------------------------------- log-probs, entropy


def test_logprobs_from_logits_hand_value_and_matches_log_softmax():
    # logits [0, 0, ln 2] -> softmax [1/4, 1/4, 1/2]; label 2 -> log 1/2, label 0 -> log 1/4
    logits = torch.tensor([[[0.0, 0.0, math.log(2.0)], [0.0, 0.0, math.log(2.0)]]])
    labels = torch.tensor([[2, 0]])
    assert_close(logprobs_from_logits(logits, labels), torch.tensor([[math.log(0.5), math.log(0.25)]]))

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    got = logprobs_from_logits(logits, labels)
    assert_close(got, expected)
    (grad,) = torch.autograd.grad(got.sum(), logits)
    (grad_expected,) = torch.autograd.grad(expected.sum(), logits)
    assert_close(grad, grad_expected)
    assert logprobs_from_logits(logits.detach().bfloat16(), labels).dtype == torch.float32


def test_entropy_from_logits_hand_values():
    # uniform over 4 -> ln 4; [0, 0, ln 2] -> probs [1/4, 1/4, 1/2] -> H = 1.5 ln 2
    uniform = torch.zeros(1, 1, 4)
    assert_close(entropy_from_logits(uniform), torch.tensor([[math.log(4.0)]]))
    skewed = torch.tensor([[[0.0, 0.0, math.log(2.0)]]])
    assert_close(entropy_from_logits(skewed), torch.tensor([[1.5 * math.log(2.0)]]))


def test_entropy_from_logits_is_per_position():
    # [B=2, T=2, V=3]: each position's entropy from its own logits only
    # uniform over 3 -> ln 3; [0, 0, ln 2] and [0, ln 2, 0] -> 1.5 ln 2; [0, 0, -30] -> uniform over the
    # first two (the third has p = e^-30 / 2) -> ln 2. A sum over every position would mix them.
    logits = torch.tensor(
        [
            [[0.0, 0.0, 0.0], [0.0, 0.0, math.log(2.0)]],
            [[0.0, math.log(2.0), 0.0], [0.0, 0.0, -30.0]],
        ]
    )
    expected = torch.tensor([[math.log(3.0), 1.5 * math.log(2.0)], [1.5 * math.log(2.0), math.log(2.0)]])
    assert_close(entropy_from_logits(logits), expected)


def test_logprobs_from_logits_refuses_mismatched_batches():
    # 2 rows of logits, 3 of labels: an error, not a silent drop of the third row
    with pytest.raises(ValueError):
        logprobs_from_logits(torch.zeros(2, 4, 5), torch.zeros(3, 4, dtype=torch.long))


# -------------------------------------------------------------------------------------- reward model


def test_pairwise_reward_loss_hand_values():
    chosen = t([1.0, 0.0, 2.0])
    rejected = t([0.0, 1.0, 2.0])
    # diff [1, -1, 0] -> losses log(1 + e^-1), log(1 + e), log 2
    loss, stats = pairwise_reward_loss(chosen, rejected)
    expected = (softplus_neg(1.0) + softplus_neg(-1.0) + math.log(2.0)) / 3.0  # 0.773224
    assert_close(loss, torch.tensor(expected))
    assert_close(stats["reward/accuracy"], torch.tensor(1.0 / 3.0))  # the tie counts as wrong
    assert_close(stats["reward/margin"], torch.tensor(0.0))


def test_pairwise_reward_loss_margin_shifts_the_logit():
    chosen = t([1.0, 0.0, 2.0])
    rejected = t([0.0, 1.0, 2.0])
    # margin 1: logits [0, -2, -1] -> log 2, log(1 + e^2), log(1 + e)
    loss, stats = pairwise_reward_loss(chosen, rejected, margin=t([1.0, 1.0, 1.0]))
    expected = (math.log(2.0) + softplus_neg(-2.0) + softplus_neg(-1.0)) / 3.0  # 1.377779
    assert_close(loss, torch.tensor(expected))
    assert_close(stats["reward/margin"], torch.tensor(0.0))  # reported without the margin


# ------------------------------------------------------------------------------------------ DPO family

# pol chosen [-1, -3], pol rejected [-2, -2], ref chosen [-1.5, -2], ref rejected [-1.5, -1.5]
# chosen log-ratio [0.5, -1], rejected log-ratio [-0.5, -0.5] -> h = [1, -0.5]; beta = 0.5
PREF = (t([-1.0, -3.0]), t([-2.0, -2.0]), t([-1.5, -2.0]), t([-1.5, -1.5]))


def test_dpo_loss_hand_example():
    loss, stats = dpo_loss(*PREF, beta=0.5)
    # beta * h = [0.5, -0.25] -> mean(log(1 + e^-0.5), log(1 + e^0.25)) = mean(0.474077, 0.825939)
    assert_close(loss, torch.tensor((softplus_neg(0.5) + softplus_neg(-0.25)) / 2.0))
    # implicit rewards: chosen 0.5 * [0.5, -1] = [0.25, -0.5], rejected [-0.25, -0.25]
    assert_close(stats["rewards/chosen"], torch.tensor(-0.125))
    assert_close(stats["rewards/rejected"], torch.tensor(-0.25))
    assert_close(stats["rewards/accuracy"], torch.tensor(0.5))
    assert_close(stats["rewards/margin"], torch.tensor(0.125))  # mean([0.5, -0.25])


def test_ipo_loss_hand_example():
    # target 1 / (2 beta) = 1: (1 - 1)^2 = 0, (-0.5 - 1)^2 = 2.25 -> mean 1.125
    loss, stats = ipo_loss(*PREF, beta=0.5)
    assert_close(loss, torch.tensor(1.125))
    assert_close(stats["rewards/accuracy"], torch.tensor(0.5))

    # at beta 0.5 the target 1 / (2 beta) equals 2 beta; at beta 0.25 it is 2 (2 beta would be 0.5):
    # h = [1, -0.5] -> (1 - 2)^2 = 1, (-0.5 - 2)^2 = 6.25 -> mean 3.625
    loss, _ = ipo_loss(*PREF, beta=0.25)
    assert_close(loss, torch.tensor(3.625))


def test_hinge_loss_hand_example():
    # relu(1 - beta h) = relu(1 - 0.5) = 0.5, relu(1 + 0.25) = 1.25 -> mean 0.875
    loss, _ = hinge_loss(*PREF, beta=0.5)
    assert_close(loss, torch.tensor(0.875))


def test_preference_tie_counts_as_wrong():
    # policy = reference on both sides: implicit rewards 0 and 0, h = 0 -> loss log 2, accuracy 0
    loss, stats = dpo_loss(t([-1.0]), t([-2.0]), t([-1.0]), t([-2.0]), beta=0.1)
    assert_close(loss, torch.tensor(math.log(2.0)))
    assert_close(stats["rewards/accuracy"], torch.tensor(0.0))
    assert_close(stats["rewards/margin"], torch.tensor(0.0))


@pytest.mark.parametrize("loss_fn", [dpo_loss, ipo_loss, hinge_loss])
def test_preference_losses_send_no_gradient_to_the_reference(loss_fn):
    pol_c, pol_r, ref_c, ref_r = (x.clone().requires_grad_(True) for x in PREF)
    loss, stats = loss_fn(pol_c, pol_r, ref_c, ref_r, beta=0.5)
    loss.backward()
    assert pol_c.grad is not None and pol_r.grad is not None
    assert ref_c.grad is None and ref_r.grad is None
    assert not any(v.requires_grad for v in stats.values())


# ------------------------------------------------------------------------------------------------ ORPO


def test_orpo_loss_hand_example():
    # mean logps: chosen -0.5, rejected -1.5; chosen NLL 0.5; lam 0.1
    # log odds(-0.5) = -0.5 - log(1 - e^-0.5) = -0.5 - log(0.393469) = 0.432752
    # log odds(-1.5) = -1.5 - log(1 - e^-1.5) = -1.5 - log(0.776870) = -1.247518
    # ratio 1.680270 -> -log sigmoid = log(1 + e^-1.680270) = 0.170859
    # loss = 0.5 + 0.1 * 0.170859 = 0.517086
    chosen_logps = t([-0.5]).requires_grad_(True)
    loss, stats = orpo_loss(t([0.5]), chosen_logps, t([-1.5]), lam=0.1)
    log_odds_c = -0.5 - math.log1p(-math.exp(-0.5))
    log_odds_r = -1.5 - math.log1p(-math.exp(-1.5))
    assert_close(loss, torch.tensor(0.5 + 0.1 * softplus_neg(log_odds_c - log_odds_r)))
    assert_close(loss, torch.tensor(0.517086), atol=1e-6, rtol=0)
    assert_close(stats["orpo/log_odds_ratio"], torch.tensor(log_odds_c - log_odds_r))
    assert_close(stats["orpo/log_odds_chosen"], torch.tensor(log_odds_c))
    assert_close(stats["orpo/nll"], torch.tensor(0.5))
    loss.backward()
    assert chosen_logps.grad is not None and chosen_logps.grad.item() < 0  # raising chosen lowers the loss


def test_orpo_loss_is_finite_when_probabilities_reach_one():
    # mean log-prob exactly 0 (p = 1) on both sides would be inf - inf without the clamp
    chosen = t([0.0, -1e-12, -30.0]).requires_grad_(True)
    rejected = t([0.0, -1e-3, -40.0]).requires_grad_(True)
    loss, stats = orpo_loss(t([0.0, 0.0, 30.0]), chosen, rejected, lam=0.1)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in stats.values())
    assert torch.all(torch.isfinite(chosen.grad)) and torch.all(torch.isfinite(rejected.grad))


def test_orpo_loss_gradients_are_finite_in_half_precision():
    # in bf16, exp(-1e-3) rounds to 1, so log(1 - p) by the far branch log1p(-exp(.)) is -inf there:
    # each branch's input is clamped to its own side of -log 2, so the unused branch stays finite
    bf16 = torch.bfloat16
    chosen = torch.tensor([0.0, -1e-3, -0.5], dtype=bf16, requires_grad=True)
    rejected = torch.tensor([0.0, -0.3, -2.0], dtype=bf16, requires_grad=True)
    loss, _ = orpo_loss(torch.tensor([0.0, 0.0, 0.5], dtype=bf16), chosen, rejected, lam=0.1)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(torch.isfinite(chosen.grad)) and torch.all(torch.isfinite(rejected.grad))


# --------------------------------------------------------------------------------------------- devices




def test_every_tensor_losses_makes_names_its_device():
    x, mask = t([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]), t([1, 1, 0], [1, 0, 0])
    watch = DevicelessFactories(losses)
    with watch:
        masked_sum(x, mask)
        masked_mean(x, mask, dim=1)
        masked_var(x, mask)
        logprobs_from_logits(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long))
        entropy_from_logits(torch.zeros(1, 2, 3))
        for loss_fn in (dpo_loss, ipo_loss, hinge_loss):
            loss_fn(*PREF, beta=0.5)
        pairwise_reward_loss(t([1.0]), t([0.0]), margin=t([0.5]))
        orpo_loss(t([0.5]), t([-0.5]), t([-1.5]), lam=0.1)
    assert not watch.calls, "tensors made without the input's device:\n" + "\n".join(watch.calls)
    # the watch itself: a deviceless factory run from the module's file is reported
    with watch:
        exec(compile("torch.zeros(())", losses.__file__, "exec"), {"torch": torch})
    assert watch.calls == ["losses.py:1 torch.zeros"]
