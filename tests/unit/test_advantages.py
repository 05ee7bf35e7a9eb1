"""Hand-worked checks of rlhf.advantages: masks, shaped rewards, GAE, KL controllers. No models."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from rlhf.advantages import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    last_token_index,
    per_token_rewards,
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
    # log r = ref - logp = 1 -> k3 = e - 2; k2 = 0.5
    logp, ref, mask = t([[-2.0]]), t([[-1.0]]), t([[1]])
    rewards, kl = per_token_rewards(t([0.0]), logp, ref, mask, kl_coef=1.0, estimator="k3")
    assert_close(kl, t([[torch.e - 2.0]]))
    assert_close(rewards, t([[2.0 - torch.e]]))
    _, kl = per_token_rewards(t([0.0]), logp, ref, mask, kl_coef=1.0, estimator="k2")
    assert_close(kl, t([[0.5]]))


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
