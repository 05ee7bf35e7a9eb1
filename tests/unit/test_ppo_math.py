"""Hand-worked checks of rlhf.ppo_math: masks, shaped rewards, GAE, KL controllers, KL estimators,
whitening, the PPO policy and value losses. No models."""

from __future__ import annotations

import math

import pytest
import torch
from deviceless import DevicelessFactories
from torch.testing import assert_close

from rlhf import ppo_math
from rlhf.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_penalty,
    last_token_index,
    masked_whiten,
    per_token_rewards,
    ppo_policy_loss,
    ppo_value_loss,
    response_mask,
)


def t(*rows) -> torch.Tensor:
    """t([1, 2]) -> shape [2]; t([1, 2], [3, 4]) -> shape [2, 2]; t(1.0, 2.0) -> shape [2]."""
    return torch.tensor(rows[0] if len(rows) == 1 else rows, dtype=torch.float32)


def gae_reference(rewards, values, mask, gamma, lam):
    """Plain python double loop: run textbook GAE over the counted tokens of each row, terminal value 0."""
    advantages = [[0.0] * len(row) for row in rewards.tolist()]
    rows = zip(rewards.tolist(), values.tolist(), mask.tolist(), strict=True)
    for b, (r_row, v_row, m_row) in enumerate(rows):
        steps = [i for i, m in enumerate(m_row) if m]
        next_value, next_adv = 0.0, 0.0
        for i in reversed(steps):
            delta = r_row[i] + gamma * next_value - v_row[i]
            next_adv = delta + gamma * lam * next_adv
            next_value = v_row[i]
            advantages[b][i] = next_adv
    advantages = torch.tensor(advantages)
    return advantages, torch.where(mask.bool(), advantages + values, 0.0)






# ------------------------------------------------------------------------------------------------ GAE


def test_gae_gamma_lam_one_is_reward_to_go_minus_value():
    # row 0: 3 counted tokens, padding holds junk. reward-to-go [1+2+3, 2+3, 3] = [6, 5, 3]
    #   advantages = [6 - 0.5, 5 - 1, 3 - 1.5] = [5.5, 4, 1.5]; returns = reward-to-go
    # row 1: 1 counted token: advantage 2 - 1 = 1, return 2
    rewards = t([1.0, 2.0, 3.0, 9.0], [2.0, 7.0, 7.0, 7.0])
    values = t([0.5, 1.0, 1.5, 100.0], [1.0, 3.0, 3.0, 3.0])
    mask = t([1, 1, 1, 0], [1, 0, 0, 0])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert_close(advantages, t([5.5, 4.0, 1.5, 0.0], [1.0, 0.0, 0.0, 0.0]))
    assert_close(returns, t([6.0, 5.0, 3.0, 0.0], [2.0, 0.0, 0.0, 0.0]))


def test_gae_hand_example_with_discount():
    # gamma 0.5, lam 1, rewards [0, 0, 4], values 0 -> advantages [4 * 0.25, 4 * 0.5, 4] = [1, 2, 4]
    rewards, mask = t([[0.0, 0.0, 4.0]]), t([[1, 1, 1]])
    advantages, returns = gae(rewards, t([[0.0, 0.0, 0.0]]), mask, gamma=0.5, lam=1.0)
    assert_close(advantages, t([[1.0, 2.0, 4.0]]))
    assert_close(returns, t([[1.0, 2.0, 4.0]]))
    # lam 0 is one-step TD: delta_t = r_t + gamma V_{t+1} - V_t; V = [1, 2, 3], V after EOS = 0
    # deltas = [0 + 0.5*2 - 1, 0 + 0.5*3 - 2, 4 + 0 - 3] = [0, -0.5, 1]
    advantages, _ = gae(rewards, t([[1.0, 2.0, 3.0]]), mask, gamma=0.5, lam=0.0)
    assert_close(advantages, t([[0.0, -0.5, 1.0]]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_vectorised_equals_python_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    b, r = 8, 13
    rewards = torch.randn(b, r, generator=gen)
    values = torch.randn(b, r, generator=gen)
    lengths = torch.randint(0, r + 1, (b,), generator=gen)
    lengths[0], lengths[1] = 0, r  # an empty row and a full row
    mask = (torch.arange(r) < lengths.unsqueeze(1)).float()
    advantages, returns = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    expected_adv, expected_ret = gae_reference(rewards, values, mask, 0.99, 0.95)
    assert_close(advantages, expected_adv)
    assert_close(returns, expected_ret)
    assert torch.all(advantages[mask == 0] == 0) and torch.all(returns[mask == 0] == 0)


def test_gae_skips_holes_in_the_mask():
    # masked positions pass the next value and advantage through, as if they were not there
    gen = torch.Generator().manual_seed(3)
    rewards, values = torch.randn(5, 9, generator=gen), torch.randn(5, 9, generator=gen)
    mask = (torch.rand(5, 9, generator=gen) > 0.4).float()
    advantages, returns = gae(rewards, values, mask, gamma=0.99, lam=0.95)
    expected_adv, expected_ret = gae_reference(rewards, values, mask, 0.99, 0.95)
    assert_close(advantages, expected_adv)
    assert_close(returns, expected_ret)


def test_gae_ignores_values_and_rewards_after_eos():
    rewards = t([[1.0, 2.0, 0.0, 0.0]])
    values = t([[0.5, 0.5, 0.0, 0.0]])
    mask = t([[1, 1, 0, 0]])
    junk_r = torch.where(mask.bool(), rewards, torch.full_like(rewards, 1e4))
    junk_v = torch.where(mask.bool(), values, torch.full_like(values, float("nan")))
    assert_close(gae(junk_r, junk_v, mask, 0.9, 0.8), gae(rewards, values, mask, 0.9, 0.8))


# ------------------------------------------------------------------------------------ masks, indices


def test_last_token_index():
    mask = t([1, 1, 0], [0, 0, 0], [1, 1, 1])
    assert last_token_index(mask).tolist() == [1, -1, 2]
    assert last_token_index(mask.bool()).dtype == torch.long


def test_response_mask_eos_in_middle_no_eos_and_eos_first():
    eos, pad = 2, 0
    ids = torch.tensor(
        [
            [5, 2, 0, 0],  # EOS in the middle: counted up to and including it
            [5, 6, 7, 8],  # no EOS, no padding: all counted
            [5, 6, 0, 0],  # no EOS (stopped otherwise), padded: the non-pad tokens
            [2, 0, 0, 0],  # EOS first
        ]
    )
    mask, has_eos = response_mask(ids, eos, pad)
    assert_close(mask, t([1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]))
    assert has_eos.tolist() == [True, False, False, True]


def test_response_mask_pad_equals_eos():
    # the first occurrence of the shared id is the EOS, the rest is padding
    ids = torch.tensor([[5, 0, 0, 0], [5, 6, 7, 8], [0, 0, 0, 0]])
    mask, has_eos = response_mask(ids, eos_token_id=0, pad_token_id=0)
    assert_close(mask, t([1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]))
    assert has_eos.tolist() == [True, False, True]


def test_response_mask_several_eos_ids_and_sampled_pad():
    ids = torch.tensor(
        [
            [5, 3, 2, 0],  # 3 is also an EOS id and comes first
            [5, 0, 2, 0],  # a pad id sampled before the EOS is a real token: the mask stays a prefix
            [5, 0, 6, 0],  # no EOS: up to the last non-pad token
        ]
    )
    mask, has_eos = response_mask(ids, eos_token_id=[2, 3], pad_token_id=0)
    assert_close(mask, t([1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]))
    assert has_eos.tolist() == [True, True, False]
    mask, _ = response_mask(torch.tensor([[5, 6, 7]]), eos_token_id=2, pad_token_id=None)
    assert_close(mask, t([[1, 1, 1]]))


def test_every_tensor_ppo_math_makes_names_its_device():
    ids = torch.tensor([[5, 2, 0], [5, 6, 0]])
    logp, mask = t([-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]), t([1, 1, 0], [1, 1, 1])
    watch = DevicelessFactories(ppo_math)
    with watch:
        response_mask(ids, eos_token_id=[2, 3], pad_token_id=0)
        response_mask(ids, eos_token_id=2, pad_token_id=None)
        last_token_index(mask)
        rewards, _ = per_token_rewards(t(1.0, 2.0), logp, logp - 0.5, mask, kl_coef=0.1)
        advantages, _ = gae(rewards, logp, mask, gamma=1.0, lam=0.95)
        masked_whiten(advantages, mask)
        masked_whiten(advantages, mask, reduce=lambda v: v)
        ppo_policy_loss(logp, logp - 0.1, advantages, mask, 0.2)
        ppo_value_loss(logp, logp - 0.3, advantages, mask, 0.2)
    assert not watch.calls, "tensors made without the input's device:\n" + "\n".join(watch.calls)
    # the watch itself: a deviceless factory run from the module's file is reported, with its line
    with watch:
        exec(compile("\n\ntorch.arange(3)", ppo_math.__file__, "exec"), {"torch": torch})
    assert watch.calls == ["ppo_math.py:3 torch.arange"]


# -------------------------------------------------------------------------------------------- rewards


def test_per_token_rewards_score_at_eos_and_kl_on_counted_tokens_only():
    scores = t(1.0, 2.0, 3.0)
    logprobs = t([-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0])
    ref = t([-1.5, -1.0, -9.0, -9.0], [-1.0, -1.0, -1.0, -2.0], [-5.0, -5.0, -5.0, -5.0])
    mask = t([1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0])
    rewards, kl = per_token_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # row 0: k1 = [0.5, -1] on counted tokens; rewards -0.1 k1 = [-0.05, 0.1], score 1 on token 1
    # row 1: no EOS, all counted: k1 = [0, 0, 0, 1]; score 2 on the last token: 2 - 0.1 = 1.9
    # row 2: empty mask: nothing at all
    assert_close(kl, t([0.5, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]))
    assert_close(rewards, t([-0.05, 1.1, 0.0, 0.0], [0.0, 0.0, 0.0, 1.9], [0.0, 0.0, 0.0, 0.0]))


def test_per_token_rewards_uses_the_estimator():
    # log r = ref - logp = 1 -> k3 = e - 2
    logp, ref, mask = t([[-2.0]]), t([[-1.0]]), t([[1]])
    rewards, kl = per_token_rewards(t([0.0]), logp, ref, mask, kl_coef=1.0, estimator="k3")
    assert_close(kl, t([[torch.e - 2.0]]))
    assert_close(rewards, t([[2.0 - torch.e]]))


# --------------------------------------------------------------------------------------- controllers


def test_adaptive_kl_controller_moves_by_the_clipped_proportional_rule():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target_kl=6.0, horizon=10000)
    # KL 12: error = clip(12/6 - 1 = 1, -0.2, 0.2) = 0.2 -> coef *= 1 + 0.2 * 1000/10000 = 1.02
    ctl.update(12.0, n_steps=1000)
    assert ctl.value == pytest.approx(0.102)
    # KL 3: error = clip(-0.5) = -0.2 -> *= 0.98
    ctl.update(torch.tensor(3.0), n_steps=1000)
    assert ctl.value == pytest.approx(0.102 * 0.98)
    # KL 6.6: error 0.1, inside the clip -> *= 1 + 0.1 * 0.1 = 1.01
    ctl.update(6.6, n_steps=1000)
    assert ctl.value == pytest.approx(0.102 * 0.98 * 1.01)
    # KL on target: unchanged
    before = ctl.value
    ctl.update(6.0, n_steps=1000)
    assert ctl.value == pytest.approx(before)


def test_adaptive_kl_controller_horizon_edge():
    # horizon 0 would divide by zero in update: refused, like a negative one
    for horizon in (0, -1.0):
        with pytest.raises(ValueError, match="horizon"):
            AdaptiveKLController(0.1, target_kl=1.0, horizon=horizon)
    # the smallest sensible horizon, 1 sample, is accepted: KL 2 on target 1 -> error clip(1) = 0.2,
    # coef *= 1 + 0.2 * 1 / 1 = 1.2 -> 0.5 * 1.2 = 0.6
    ctl = AdaptiveKLController(0.5, target_kl=1.0, horizon=1)
    ctl.update(2.0, n_steps=1)
    assert ctl.value == pytest.approx(0.6)


def test_kl_controllers_state_dict_round_trip():
    ctl = AdaptiveKLController(0.2, target_kl=1.0, horizon=100)
    ctl.update(5.0, n_steps=10)
    restored = AdaptiveKLController(0.2, target_kl=1.0, horizon=100)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value != 0.2

    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=64)
    assert fixed.value == 0.05
    other = FixedKLController(0.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


def test_adaptive_kl_controller_rejects_bad_settings():
    with pytest.raises(ValueError, match="target_kl"):
        AdaptiveKLController(0.1, target_kl=0.0, horizon=100)


# ------------------------------------------------------------------------------------ whitening


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


def test_masked_whiten_uses_the_unbiased_variance_hand_value():
    # counted [1, 3]: mean 2, squared deviations 1 + 1 = 2, unbiased var 2 / (2 - 1) = 2, std sqrt 2
    # -> [-1/sqrt2, 1/sqrt2] (the biased var 2 / 2 = 1 would give [-1, 1]); the padded 100 -> 0
    x, mask = t([1.0, 3.0, 100.0]), t([1, 1, 0])
    s = 1.0 / math.sqrt(2.0)
    for reduce in (None, lambda v: v):  # this tensor's statistics, and a one-rank reduce
        assert_close(masked_whiten(x, mask, reduce=reduce), t([-s, s, 0.0]))
        # shift_mean=False adds the mean 2 back: [2 - 1/sqrt2, 2 + 1/sqrt2]
        assert_close(masked_whiten(x, mask, shift_mean=False, reduce=reduce), t([2.0 - s, 2.0 + s, 0.0]))


def test_masked_whiten_with_a_reduce_degenerate_masks_and_float64_sums():
    def identity(v):  # one rank: the sum over ranks is the input
        return v

    x = t([3.0, 8.0, 1.0])
    # one counted element: mean 3 / 1 = 3, (3 - 3) / sqrt(0 + eps) = 0; no element: 0
    assert_close(masked_whiten(x, t([1, 0, 0]), reduce=identity), t([0.0, 0.0, 0.0]))
    assert_close(masked_whiten(x, t([0, 0, 0]), reduce=identity), t([0.0, 0.0, 0.0]))
    # 2^24 + [2, 4, 6]: float32 holds each value, but a float32 sum (spacing 2 above 2^24, 4 above 2^25)
    # can round to 3 * 2^24 + 16, a mean of 2^24 + 6; the reduce sums in float64: mean 2^24 + 4 exactly,
    # unbiased var (4 + 0 + 4) / 2 = 4, so [-2, 0, 2] / 2 = [-1, 0, 1]
    big = torch.tensor([2.0**24 + 2, 2.0**24 + 4, 2.0**24 + 6])
    assert_close(masked_whiten(big, t([1, 1, 1]), reduce=identity), t([-1.0, 0.0, 1.0]))


# ---------------------------------------------------------------------------------- KL estimators


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_is_zero_when_policy_equals_ref(estimator):
    logp = t([-1.0, -2.5, -0.1])
    assert_close(kl_penalty(logp, logp.clone(), estimator), torch.zeros(3))


def test_kl_hand_values():
    logp = t([-1.0, -2.0, -0.5])
    ref = t([-1.5, -1.0, -0.5])
    # k1 = logp - ref = [0.5, -1, 0]
    assert_close(kl_penalty(logp, ref, "k1"), t([0.5, -1.0, 0.0]))
    # log r = ref - logp = [-0.5, 1, 0]; k3 = e^{log r} - 1 - log r = [e^-0.5 - 0.5, e - 2, 0]
    assert_close(kl_penalty(logp, ref, "k3"), t([math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]))
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]
    # the default estimator is k1
    assert_close(kl_penalty(logp, ref), t([0.5, -1.0, 0.0]))


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


def test_policy_loss_clips_negative_advantages_below_the_lower_bound():
    old = t([-1.0, -1.0, -1.0])
    logp = (old - 1.0).requires_grad_(True)
    # ratio e^-1 = 0.368 < 1 - 0.2, so the clipped ratio is 0.8; A = [-1, -2, 1]
    # token 0: max(-A r, -A 0.8) = max(0.368, 0.8) = 0.8; token 1: max(0.736, 1.6) = 1.6 (clipped)
    # token 2 (A > 0): max(-0.368, -0.8) = -e^-1, the unclipped term
    # loss = (0.8 + 1.6 - e^-1) / 3, clipfrac 2/3
    loss, stats = ppo_policy_loss(logp, old, t([-1.0, -2.0, 1.0]), t([1, 1, 1]), clip_range=0.2)
    assert_close(loss, torch.tensor((2.4 - math.exp(-1.0)) / 3.0))
    assert_close(stats["policy/clipfrac"], torch.tensor(2.0 / 3.0))
    loss.backward()
    # the clipped tokens are flat in logp; token 2: d(-A e^(logp - old)) / dlogp / 3 = -e^-1 / 3
    assert_close(logp.grad, t([0.0, 0.0, -math.exp(-1.0) / 3.0]))


def test_ppo_losses_divide_one_counted_token_by_one():
    # one counted token, ratio 1, A = 3: policy loss -3 / 1; value 1 vs return 3: 0.5 * (1 - 3)^2 / 1 = 2
    mask = t([[1, 0, 0]])
    logp = t([[-1.0, -1.0, -1.0]])
    policy, _ = ppo_policy_loss(logp, logp.clone(), t([[3.0, 5.0, 7.0]]), mask, clip_range=0.2)
    assert_close(policy, torch.tensor(-3.0))
    value, _ = ppo_value_loss(t([[1.0, 0.0, 0.0]]), t([[1.0, 0.0, 0.0]]), t([[3.0, 9.0, 9.0]]), mask, 0.2)
    assert_close(value, torch.tensor(2.0))


def test_ppo_losses_keep_a_bf16_dtype():
    # bf16 log-probs or values (a bf16 critic) give a bf16 loss: the token count follows their dtype
    # policy: ratio 1, counted A = [1, 2] -> -(1 + 2) / 2 = -1.5; value: 0.5 * (1^2 + 2^2) / 2 = 1.25
    bf16, mask = torch.bfloat16, t([1, 1, 0])
    logp = t([-1.0, -2.0, -3.0]).to(bf16)
    policy, _ = ppo_policy_loss(logp, logp.clone(), t([1.0, 2.0, 9.0]).to(bf16), mask, clip_range=0.2)
    assert_close(policy, torch.tensor(-1.5, dtype=bf16))
    values = t([1.0, 2.0, 5.0]).to(bf16)
    value, _ = ppo_value_loss(values, values.clone(), torch.zeros(3, dtype=bf16), mask, 0.2)
    assert_close(value, torch.tensor(1.25, dtype=bf16))


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


def test_value_loss_hand_example_below_clip_range():
    # the mirror image of the example above: values below old - eps are clipped up to -0.2
    old = t([0.0, 0.0, 0.0])
    values = t([-1.0, -1.0, -0.1]).requires_grad_(True)
    returns = t([-2.0, -0.5, -1.0])
    # token 0: (-1 + 2)^2 = 1, clipped v = -0.2 -> (-0.2 + 2)^2 = 3.24 -> max 3.24 (clip binds)
    # token 1: (-1 + 0.5)^2 = 0.25, clipped -> (-0.2 + 0.5)^2 = 0.09 -> max 0.25
    # token 2: inside the range -> (-0.1 + 1)^2 = 0.81; loss = 0.5 * 4.3 / 3
    loss, stats = ppo_value_loss(values, old, returns, t([1, 1, 1]), clip_range_value=0.2)
    assert_close(loss, torch.tensor(0.5 * 4.3 / 3.0))
    assert_close(stats["value/clipfrac"], torch.tensor(1.0 / 3.0))
    loss.backward()
    assert_close(values.grad, t([0.0, -0.5 / 3.0, 0.9 / 3.0]))


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
