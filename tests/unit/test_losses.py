"""Hand-worked checks of rlhf.losses: small tensors, the arithmetic in comments, no models."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf.losses import (
    dpo_loss,
    entropy_from_logits,
    hinge_loss,
    ipo_loss,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    orpo_loss,
    pairwise_reward_loss,
    ppo_policy_loss,
    ppo_value_loss,
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


def test_masked_whiten_mean_zero_std_one_and_padding_ignored():
    torch.manual_seed(0)
    x = torch.randn(4, 7) * 3 + 5
    mask = (torch.rand(4, 7) > 0.3).float()
    mask[0, 0] = 1
    white = masked_whiten(x, mask)
    counted = white[mask.bool()]
    assert_close(counted.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(counted.std(), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert torch.all(white[~mask.bool()] == 0)
    # changing the padded values changes nothing at counted positions
    x_other = torch.where(mask.bool(), x, torch.full_like(x, 1e6))
    assert_close(masked_whiten(x_other, mask), white)
    # shift_mean=False: same spread, masked mean kept
    kept = masked_whiten(x, mask, shift_mean=False)
    assert_close(kept[mask.bool()].mean(), x[mask.bool()].mean(), atol=1e-5, rtol=0)


def test_masked_whiten_with_a_rank_reduce_uses_global_statistics():
    # two simulated ranks holding rows 0-1 and 2-3: with `reduce` summing over them, each rank's
    # whitened rows equal those rows of the whole batch whitened at once
    torch.manual_seed(1)
    x = torch.randn(4, 6) * 2 + torch.tensor([[3.0], [3.0], [-4.0], [-4.0]])  # ranks differ in mean
    mask = (torch.rand(4, 6) > 0.25).float()

    def reduce_with(other_x, other_mask):
        partial = []  # the other rank's local sums, in the order the function asks for them

        def reduce(local):
            m, xd = other_mask.double(), other_x.double()
            if not partial:
                partial.append(local + torch.stack([(xd * m).sum(), m.sum()]))
                return partial[0]
            mean = partial[0][0] / partial[0][1]
            return local + (((xd - mean) ** 2) * m).sum().reshape(1)

        return reduce

    whole = masked_whiten(x, mask)
    rank0 = masked_whiten(x[:2], mask[:2], reduce=reduce_with(x[2:], mask[2:]))
    rank1 = masked_whiten(x[2:], mask[2:], reduce=reduce_with(x[:2], mask[:2]))
    assert_close(torch.cat([rank0, rank1]), whole, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(masked_whiten(x[:2], mask[:2]), whole[:2], atol=1e-2)  # per rank differs
    assert_close(masked_whiten(x, mask, reduce=lambda v: v), whole, atol=1e-6, rtol=1e-6)  # one rank


def test_masked_whiten_degenerate_masks_stay_finite():
    x = t([3.0, 8.0, 1.0])
    # one counted element: (3 - 3) / sqrt(0 + eps) = 0
    assert_close(masked_whiten(x, t([1, 0, 0])), t([0.0, 0.0, 0.0]))
    assert_close(masked_whiten(x, t([0, 0, 0])), t([0.0, 0.0, 0.0]))
    # equal values: 0, not NaN
    assert_close(masked_whiten(t([2.0, 2.0, 2.0]), t([1, 1, 1])), t([0.0, 0.0, 0.0]))


# ------------------------------------------------------------------------- log-probs, entropy, KL


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


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_is_zero_when_policy_equals_ref(estimator):
    logp = t([-1.0, -2.5, -0.1])
    assert_close(kl_penalty(logp, logp.clone(), estimator), torch.zeros(3))


def test_kl_hand_values():
    logp = t([-1.0, -2.0, -0.5])
    ref = t([-1.5, -1.0, -0.5])
    # k1 = logp - ref = [0.5, -1, 0]; k2 = 0.5 * k1^2 = [0.125, 0.5, 0]
    assert_close(kl_penalty(logp, ref, "k1"), t([0.5, -1.0, 0.0]))
    assert_close(kl_penalty(logp, ref, "k2"), t([0.125, 0.5, 0.0]))
    # log r = ref - logp = [-0.5, 1, 0]; k3 = e^{log r} - 1 - log r = [e^-0.5 - 0.5, e - 2, 0]
    assert_close(kl_penalty(logp, ref, "k3"), t([math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]))
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]


def test_k3_is_never_negative():
    torch.manual_seed(0)
    logp = torch.randn(64, 32) * 4
    ref = torch.randn(64, 32) * 4
    assert torch.all(kl_penalty(logp, ref, "k3") >= 0)


# --------------------------------------------------------------------------------------- PPO policy


def test_policy_loss_ratio_one_is_minus_mean_advantage():
    logp = t([-1.0, -2.0, -3.0])
    adv = t([1.0, -2.0, 3.0])
    mask = t([1, 1, 1])
    loss, stats = ppo_policy_loss(logp, logp.clone(), adv, mask, clip_range=0.2)
    # ratio = 1 everywhere, nothing clipped: loss = -(1 - 2 + 3) / 3 = -2/3
    assert_close(loss, torch.tensor(-2.0 / 3.0))
    assert_close(stats["policy/clipfrac"], torch.tensor(0.0))
    assert_close(stats["policy/approx_kl"], torch.tensor(0.0))
    assert_close(stats["policy/ratio_mean"], torch.tensor(1.0))
    assert_close(stats["policy/ratio_max"], torch.tensor(1.0))


def test_policy_loss_clips_positive_advantages():
    old = t([-2.0, -2.0, -2.0])
    logp = old + 1.0
    # ratio will be [e, e, e]; clipped ratio becomes [1.2, 1.2, 1.2]
    # A = 1: max(-e, -1.2) = -1.2 per token
    loss, stats = ppo_policy_loss(logp, old, t([1.0, 1.0, 1.0]), t([1, 1, 1]), clip_range=0.2)
    assert_close(loss, torch.tensor(-1.2))
    assert_close(stats["policy/clipfrac"], torch.tensor(1.0))
    assert_close(stats["policy/ratio_max"], torch.tensor(math.e))
    # approx_kl (k3 of KL(old || new)): (e - 1) - 1 = e - 2
    assert_close(stats["policy/approx_kl"], torch.tensor(math.e - 2.0))


def test_policy_loss_is_pessimistic_for_negative_advantages():
    old = t([-2.0, -2.0, -2.0])
    logp = old + 1.0
    # ratio e, A = [1, -1, 2]: per token max(-A e, -A 1.2) = [-1.2, e, -2.4]
    # loss = (e - 3.6) / 3; clipped on tokens 0 and 2 -> clipfrac 2/3
    loss, stats = ppo_policy_loss(logp, old, t([1.0, -1.0, 2.0]), t([1, 1, 1]), clip_range=0.2)
    assert_close(loss, torch.tensor((math.e - 3.6) / 3.0))
    assert_close(stats["policy/clipfrac"], torch.tensor(2.0 / 3.0))


def test_policy_loss_padding_has_no_loss_and_no_gradient():
    old = t([-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0])
    adv = t([1.0, 2.0, 5.0], [-1.0, 3.0, 7.0])
    mask = t([1, 1, 0], [1, 0, 0])
    logp = (old + 0.1).requires_grad_(True)
    loss, _ = ppo_policy_loss(logp, old, adv, mask, clip_range=0.2)
    loss.backward()
    assert torch.all(logp.grad[mask == 0] == 0)
    assert torch.all(logp.grad[mask == 1] != 0)
    # arbitrary values at padded positions do not move the loss
    logp_garbage = torch.where(mask.bool(), logp.detach(), torch.full_like(old, 50.0))
    adv_garbage = torch.where(mask.bool(), adv, torch.full_like(adv, -1e9))
    loss_garbage, _ = ppo_policy_loss(logp_garbage, old, adv_garbage, mask, clip_range=0.2)
    assert_close(loss_garbage, loss.detach())


def test_policy_loss_sends_no_gradient_to_old_logprobs_or_advantages():
    logp = t([-1.0, -2.0, -0.5]).requires_grad_(True)
    old = t([-1.2, -1.9, -0.5]).requires_grad_(True)
    adv = t([0.5, -1.0, 2.0]).requires_grad_(True)
    loss, stats = ppo_policy_loss(logp, old, adv, t([1, 1, 1]), clip_range=0.2)
    loss.backward()
    assert logp.grad is not None
    assert old.grad is None and adv.grad is None
    assert not any(v.requires_grad for v in stats.values())


def test_ppo_losses_with_an_empty_mask_are_zero_and_finite():
    # a micro-batch whose responses are all empty: loss 0 (masked sum 0 over a count clamped to 1),
    # zero gradient, finite stats; bool masks work the same as float ones
    logp = t([[-1.0, -2.0]]).requires_grad_(True)
    values = t([[0.3, 0.4]]).requires_grad_(True)
    empty = torch.zeros(1, 2, dtype=torch.bool)
    pol, pol_stats = ppo_policy_loss(logp, t([[-3.0, -9.0]]), t([[1.0, 1.0]]), empty, 0.2)
    val, val_stats = ppo_value_loss(values, t([[0.0, 0.0]]), t([[5.0, 5.0]]), empty, 0.2)
    (pol + val).backward()
    assert pol.item() == 0.0 and val.item() == 0.0
    assert torch.all(logp.grad == 0) and torch.all(values.grad == 0)
    assert all(torch.isfinite(v) for v in {**pol_stats, **val_stats}.values())


# ---------------------------------------------------------------------------------------- PPO value


def test_value_loss_inside_clip_range_equals_plain_mse():
    old = t([0.0, 1.0, -1.0])
    values = (old + t([0.1, -0.15, 0.0])).requires_grad_(True)
    returns = t([1.0, 0.0, 2.0])
    mask = t([1, 1, 1])
    loss, stats = ppo_value_loss(values, old, returns, mask, clip_range_value=0.2)
    assert_close(loss, 0.5 * ((values - returns) ** 2).mean())
    assert_close(stats["value/clipfrac"], torch.tensor(0.0))
    # the gradient is that of the plain loss: (v - R) / 3
    loss.backward()
    assert_close(values.grad, (values.detach() - returns) / 3.0)


def test_value_loss_hand_example_beyond_clip_range():
    old = t([0.0, 0.0, 0.0])
    values = t([1.0, 1.0, 0.1]).requires_grad_(True)
    returns = t([2.0, 0.5, 1.0])
    # token 0: (1 - 2)^2 = 1, clipped v = 0.2 -> (0.2 - 2)^2 = 3.24 -> max 3.24 (clip binds)
    # token 1: (1 - 0.5)^2 = 0.25, clipped v = 0.2 -> (0.2 - 0.5)^2 = 0.09 -> max 0.25
    # token 2: inside the range -> (0.1 - 1)^2 = 0.81 both ways
    # loss = 0.5 * (3.24 + 0.25 + 0.81) / 3 = 0.5 * 4.3 / 3
    loss, stats = ppo_value_loss(values, old, returns, t([1, 1, 1]), clip_range_value=0.2)
    assert_close(loss, torch.tensor(0.5 * 4.3 / 3.0))
    assert_close(stats["value/clipfrac"], torch.tensor(1.0 / 3.0))
    assert_close(stats["value/mean_error"], torch.tensor((1.0 + 0.25 + 0.81) / 3.0))
    loss.backward()
    # token 0: the clipped branch wins and is flat in v -> zero gradient
    assert_close(values.grad, t([0.0, 0.5 / 3.0, -0.9 / 3.0]))


def test_value_loss_padding_and_detached_targets():
    values = t([0.5, 0.5, 0.5]).requires_grad_(True)
    old = t([0.4, 0.4, 0.4]).requires_grad_(True)
    returns = t([1.0, 1.0, 1e6]).requires_grad_(True)
    loss, _ = ppo_value_loss(values, old, returns, t([1, 1, 0]), clip_range_value=0.2)
    # two counted tokens, (0.5 - 1)^2 = 0.25 each -> 0.5 * 0.25 = 0.125
    assert_close(loss, torch.tensor(0.125))
    loss.backward()
    assert values.grad[2] == 0
    assert old.grad is None and returns.grad is None


# ------------------------------------------------------------------------- two simulated ranks (G14)


def test_global_token_mean_over_two_ranks_equals_full_batch():
    """Each rank divides its masked sum by the GLOBAL token count; the sum over ranks is the full mean.

    The PPO loop must aggregate this way: averaging per-rank means (below) weights the tokens of the
    rank with shorter responses more, and does not match.
    """
    torch.manual_seed(0)
    logp = torch.randn(4, 6).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(4, 6)
    adv = torch.randn(4, 6)
    values, old_values, returns = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    lengths = torch.tensor([6, 1, 2, 3])  # rank 0 (rows 0-1) holds 7 tokens, rank 1 (rows 2-3) 5
    mask = (torch.arange(6) < lengths.unsqueeze(1)).float()

    full_pol, _ = ppo_policy_loss(logp, old, adv, mask, 0.2)
    full_val, _ = ppo_value_loss(values, old_values, returns, mask, 0.2)
    (full_grad,) = torch.autograd.grad(full_pol, logp)

    total = mask.sum()
    ranks = [slice(0, 2), slice(2, 4)]
    pol = sum(ppo_policy_loss(logp[r], old[r], adv[r], mask[r], 0.2, num_tokens=total)[0] for r in ranks)
    val = sum(
        ppo_value_loss(values[r], old_values[r], returns[r], mask[r], 0.2, num_tokens=total)[0] for r in ranks
    )
    (rank_grad,) = torch.autograd.grad(pol, logp)
    assert_close(pol, full_pol)
    assert_close(val, full_val)
    assert_close(rank_grad, full_grad)

    per_rank_means = sum(ppo_policy_loss(logp[r], old[r], adv[r], mask[r], 0.2)[0] for r in ranks) / 2
    assert not torch.allclose(per_rank_means, full_pol)


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


def test_hinge_loss_hand_example():
    # relu(1 - beta h) = relu(1 - 0.5) = 0.5, relu(1 + 0.25) = 1.25 -> mean 0.875
    loss, _ = hinge_loss(*PREF, beta=0.5)
    assert_close(loss, torch.tensor(0.875))


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
