"""Hand-worked checks of rlhf.ppo_math's critic-free pieces: the group advantage estimators (GRPO,
Dr. GRPO, RLOO, REINFORCE++-baseline), their broadcast to tokens, the loss aggregation modes and the KL
loss term. No models."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from deviceless import DevicelessFactories
from torch.testing import assert_close

from rlhf import ppo_math
from rlhf.ppo_math import (
    aggregate_loss,
    broadcast_advantages,
    dr_grpo_advantages,
    grpo_advantages,
    kl_loss,
    ppo_policy_loss,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)

LN2 = math.log(2.0)


def t(*rows) -> torch.Tensor:
    """t([1, 2]) -> shape [2]; t([1, 2], [3, 4]) -> shape [2, 2]; t(1.0, 2.0) -> shape [2]."""
    return torch.tensor(rows[0] if len(rows) == 1 else rows, dtype=torch.float32)


def reinforce_pp(scores, k, mask, reduce=None):
    return reinforce_pp_baseline_advantages(scores, k, mask, reduce=reduce)[0]


# the four estimators with one signature (scores, k): REINFORCE++-baseline on one token per response
ESTIMATORS = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": lambda scores, k: reinforce_pp(scores, k, torch.ones(scores.shape[0], 1)),
}


# ------------------------------------------------------------------------------------------- GRPO


def test_grpo_hand_values_use_the_unbiased_std():
    # group 0 [1, 2, 6]: mean 3, r - mean [-2, -1, 3], squares 4 + 1 + 9 = 14, unbiased var 14 / 2 = 7
    #   -> [-2, -1, 3] / sqrt 7   (the biased var 14 / 3 would give [-2, -1, 3] / 2.160)
    # group 1 [0, 0, 3]: mean 1, [-1, -1, 2], squares 6, var 6 / 2 = 3 -> [-1, -1, 2] / sqrt 3
    adv = grpo_advantages(t(1.0, 2.0, 6.0, 0.0, 0.0, 3.0), k=3)
    s7, s3 = math.sqrt(7.0), math.sqrt(3.0)
    assert_close(adv, t(-2 / s7, -1 / s7, 3 / s7, -1 / s3, -1 / s3, 2 / s3))


def test_grpo_binary_rewards_and_k_two():
    # long 0/1 correctness rewards, k = 4, [1, 0, 0, 0]: mean 1/4, [3/4, -1/4, -1/4, -1/4],
    # squares 9/16 + 3/16 = 12/16, unbiased var (3/4) / 3 = 1/4, std 1/2 -> [1.5, -0.5, -0.5, -0.5]
    # (biased: var 3/16, std 0.433 -> [1.732, -0.577, ...])
    adv = grpo_advantages(torch.tensor([1, 0, 0, 0]), k=4)
    assert adv.dtype == torch.float32
    assert_close(adv, t(1.5, -0.5, -0.5, -0.5))
    # k = 2, [0, 1]: mean 1/2, [-1/2, 1/2], unbiased var 1/4 + 1/4 = 1/2 -> +-0.5 / sqrt(1/2) = +-sqrt(1/2)
    # (biased var 1/4, std 1/2 -> +-1)
    s = math.sqrt(0.5)
    assert_close(grpo_advantages(t(0.0, 1.0), k=2), t(-s, s))


def test_grpo_eps_is_added_to_the_std():
    # [0, 2]: [-1, 1], unbiased std sqrt 2; with eps = 1: +-1 / (sqrt 2 + 1) = +-(sqrt 2 - 1)
    # (eps inside the root, 1 / sqrt(2 + 1), would give +-0.577)
    s = math.sqrt(2.0) - 1.0
    assert_close(grpo_advantages(t(0.0, 2.0), k=2, eps=1.0), t(-s, s))


def test_zero_variance_group_gives_exactly_zero():
    # float32 mean of [0.9, 0.9, 0.9] is 0.9 + 6e-8: r - mean would be -6e-8 with a std of 7e-8, so
    # GRPO would give about -0.055 instead of 0; the flat group must give exactly 0 with every estimator
    scores = t(0.9, 0.9, 0.9, 1.0, 2.0, 6.0)
    s7 = math.sqrt(7.0)
    assert_close(grpo_advantages(scores, k=3), t(0.0, 0.0, 0.0, -2 / s7, -1 / s7, 3 / s7))
    for name, estimator in ESTIMATORS.items():
        adv = estimator(scores, 3).reshape(-1)
        assert torch.equal(adv[:3], torch.zeros(3)), name
        assert torch.all(adv[3:] != 0), name
    # all groups flat: zeros, not NaN (REINFORCE++ whitens zeros to zeros)
    for name, estimator in ESTIMATORS.items():
        assert torch.equal(estimator(t(5.0, 5.0, -1.0, -1.0), 2).reshape(-1), torch.zeros(4)), name


# -------------------------------------------------------------------------------------- Dr. GRPO


def test_dr_grpo_hand_values():
    # group means 3 and 1 (as above): r - mean, no division
    adv = dr_grpo_advantages(t(1.0, 2.0, 6.0, 0.0, 0.0, 3.0), k=3)
    assert_close(adv, t(-2.0, -1.0, 3.0, -1.0, -1.0, 2.0))


def test_dr_grpo_and_grpo_differ_only_by_the_std_division():
    torch.manual_seed(0)
    scores, k, eps = torch.randn(12), 4, 1e-6
    # the unbiased group std from python's statistics module, not torch
    stds = [statistics.stdev(scores[i : i + k].tolist()) for i in range(0, 12, k)]
    scale = torch.tensor(stds).repeat_interleave(k) + eps
    assert_close(grpo_advantages(scores, k, eps) * scale, dr_grpo_advantages(scores, k))
    means = torch.tensor([statistics.fmean(scores[i : i + k].tolist()) for i in range(0, 12, k)])
    assert_close(dr_grpo_advantages(scores, k), scores - means.repeat_interleave(k))


# ------------------------------------------------------------------------------------------- RLOO


def test_rloo_hand_values():
    # [1, 2, 6]: the others' means are (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5 -> [-3, -1.5, 4.5]
    # [0, 0, 3]: (0+3)/2 = 1.5, 1.5, (0+0)/2 = 0 -> [-1.5, -1.5, 3]
    adv = rloo_advantages(t(1.0, 2.0, 6.0, 0.0, 0.0, 3.0), k=3)
    assert_close(adv, t(-3.0, -1.5, 4.5, -1.5, -1.5, 3.0))
    # k = 2, [0, 1]: each sample's baseline is the other one -> [-1, 1] (r - mean would be +-0.5)
    assert_close(rloo_advantages(t(0.0, 1.0), k=2), t(-1.0, 1.0))
    # 0/1 rewards [1, 0, 0, 0]: 1 - 0 = 1; 0 - 1/3 for the others
    assert_close(rloo_advantages(torch.tensor([1, 0, 0, 0]), k=4), t(1.0, -1 / 3, -1 / 3, -1 / 3))


def test_rloo_is_k_over_k_minus_one_times_r_minus_mean():
    torch.manual_seed(1)
    scores, k = torch.randn(15), 5
    rows = scores.reshape(-1, k).tolist()
    leave_one_out = [r - (sum(row) - r) / (k - 1) for row in rows for r in row]
    scaled = [k / (k - 1) * (r - sum(row) / k) for row in rows for r in row]
    assert_close(rloo_advantages(scores, k), torch.tensor(leave_one_out))
    assert_close(rloo_advantages(scores, k), torch.tensor(scaled))


# --------------------------------------------------------------------------- REINFORCE++-baseline


def test_reinforce_pp_baseline_hand_values():
    # groups [1, 3] and [4, 6]: r - mean = [-1, 1, -1, 1]; row 3 has an empty mask but still counts
    # in its group's mean. Counted tokens: row 0: -1; row 1: 1, 1; row 2: -1, -1 -> [-1, 1, 1, -1, -1]
    # mean -1/5; deviations -4/5 (x3), 6/5 (x2); squares 3 * 16/25 + 2 * 36/25 = 120/25 = 24/5;
    # unbiased var (24/5) / 4 = 6/5 -> a token of -1 whitens to -0.8 / sqrt 1.2, one of 1 to 1.2 / sqrt 1.2
    scores, mask = t(1.0, 3.0, 4.0, 6.0), t([1, 0], [1, 1], [1, 1], [0, 0])
    advantages, returns = reinforce_pp_baseline_advantages(scores, 2, mask)
    lo, hi = -0.8 / math.sqrt(1.2), math.sqrt(1.2)
    assert_close(advantages, t([lo, 0.0], [hi, hi], [lo, lo], [0.0, 0.0]))
    # the returns are r - mean on each counted token, before whitening (as gae's returns)
    assert_close(returns, t([-1.0, 0.0], [1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]))
    # a one-rank reduce (the sum over ranks is the input) gives the same
    assert_close(reinforce_pp_baseline_advantages(scores, 2, mask, reduce=lambda v: v)[0], advantages)


def test_reinforce_pp_baseline_with_a_rank_reduce_whitens_over_both_ranks():
    # two simulated ranks, each holding whole groups: rank 0 rows 0-3, rank 1 rows 4-7 (k = 2)
    torch.manual_seed(2)
    scores = torch.randn(8) * torch.tensor([1.0, 1, 1, 1, 5, 5, 5, 5])  # the ranks' spreads differ
    mask = (torch.arange(5) < torch.tensor([5, 1, 3, 2, 4, 5, 1, 2]).unsqueeze(1)).float()
    centered = torch.cat([dr_grpo_advantages(scores[:4], 2), dr_grpo_advantages(scores[4:], 2)])
    tokens = centered.unsqueeze(1).expand(8, 5)[mask.bool()]
    # whitened with the mean and unbiased std of all 23 tokens of both ranks (python's statistics)
    mean, std = statistics.fmean(tokens.tolist()), statistics.stdev(tokens.tolist())
    expected = torch.where(mask.bool(), (centered.unsqueeze(1) - mean) / std, 0.0)

    def reduce_with(other_rows: slice):
        sent = []  # this rank's sums, in the order masked_whiten asks: (sum, count), then squares

        def reduce(local):
            _, other_returns = reinforce_pp_baseline_advantages(scores[other_rows], 2, mask[other_rows])
            x, m = other_returns.double(), mask[other_rows].double()
            if not sent:
                sent.append(local + torch.stack([(x * m).sum(), m.sum()]))
                return sent[0]
            return local + (((x - sent[0][0] / sent[0][1]) ** 2) * m).sum().reshape(1)

        return reduce

    rank0, _ = reinforce_pp_baseline_advantages(scores[:4], 2, mask[:4], reduce=reduce_with(slice(4, 8)))
    rank1, _ = reinforce_pp_baseline_advantages(scores[4:], 2, mask[4:], reduce=reduce_with(slice(0, 4)))
    assert_close(torch.cat([rank0, rank1]), expected, atol=1e-5, rtol=1e-5)
    assert_close(reinforce_pp(scores, 2, mask), expected, atol=1e-5, rtol=1e-5)  # one rank, whole batch
    assert not torch.allclose(reinforce_pp(scores[:4], 2, mask[:4]), expected[:4], atol=1e-2)


# ------------------------------------------------------------------------------ groups: bad input


@pytest.mark.parametrize("name", ESTIMATORS)
def test_k_must_divide_the_batch_and_be_at_least_two(name):
    estimator = ESTIMATORS[name]
    with pytest.raises(ValueError, match="k = 4 samples per prompt does not divide the batch of 6"):
        estimator(torch.zeros(6), 4)
    for k in (1, 0):
        with pytest.raises(ValueError, match=f"must be >= 2 for a group baseline, got {k}"):
            estimator(torch.zeros(6), k)
    # k = 2 and k = the whole batch are fine
    assert estimator(t(0.0, 1.0, 2.0, 3.0, 4.0, 5.0), 2).shape[0] == 6
    assert estimator(t(0.0, 1.0, 2.0, 3.0, 4.0, 5.0), 6).shape[0] == 6


def test_scores_must_be_one_dimensional():
    with pytest.raises(ValueError, match=r"scores must be 1-D \[n_prompts \* k\], got shape \(2, 2\)"):
        grpo_advantages(torch.zeros(2, 2), 2)


def test_estimators_send_no_gradient():
    scores = t(1.0, 2.0, 6.0, 0.0).requires_grad_(True)
    for name, estimator in ESTIMATORS.items():
        assert not estimator(scores, 2).requires_grad, name


# ------------------------------------------------------------------------------ broadcast to tokens


def test_broadcast_advantages_puts_each_response_value_on_its_counted_tokens():
    # [2, -1, 0.5] over lengths 2, 1, 0: row 2 has no counted token and gets nothing
    advantages, returns = broadcast_advantages(
        torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64), t([1, 1, 0], [1, 0, 0], [0, 0, 0])
    )
    assert advantages.dtype == torch.float32
    assert_close(advantages, t([2.0, 2.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]))
    assert_close(returns, advantages)  # no critic: returns = advantages + 0
    # a bool mask works the same
    bool_mask = torch.tensor([[True, False], [True, True]])
    assert_close(broadcast_advantages(t(3.0, 4.0), bool_mask)[0], t([3.0, 0.0], [4.0, 4.0]))


# ----------------------------------------------------------------------------- loss aggregation

# per-token losses: row 0 counts [1, 2, 3], row 1 counts [4], row 2 counts nothing; 100 and 7 are
# under mask 0
PER_TOKEN = t([1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [7.0, 7.0, 7.0, 7.0])
MASK = t([1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0])


def test_token_mean_is_the_sum_over_counted_tokens_by_their_number():
    # (1 + 2 + 3 + 4) / 4 = 2.5; with a divisor 8 (e.g. a global count): 10 / 8
    assert_close(aggregate_loss(PER_TOKEN, MASK), torch.tensor(2.5))
    assert_close(aggregate_loss(PER_TOKEN, MASK, "token_mean"), torch.tensor(2.5))
    assert_close(aggregate_loss(PER_TOKEN, MASK, "token_mean", divisor=8.0), torch.tensor(1.25))


def test_seq_mean_token_mean_averages_the_row_means_of_non_empty_rows():
    # row means 6/3 = 2 and 4/1 = 4; the empty row is not counted: (2 + 4) / 2 = 3
    # (counting it would give 6 / 3 = 2; the token mean is 2.5)
    per_token = PER_TOKEN.clone().requires_grad_(True)
    loss = aggregate_loss(per_token, MASK, "seq_mean_token_mean")
    assert_close(loss, torch.tensor(3.0))
    # gradient: 1 / (3 tokens * 2 rows) on row 0's tokens, 1 / (1 * 2) on row 1's, 0 elsewhere
    loss.backward()
    assert_close(per_token.grad, t([1 / 6, 1 / 6, 1 / 6, 0.0], [0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]))
    # with a divisor 4 (rows): (2 + 4) / 4
    assert_close(aggregate_loss(PER_TOKEN, MASK, "seq_mean_token_mean", divisor=4.0), torch.tensor(1.5))


def test_seq_mean_token_sum_norm_divides_row_sums_by_a_constant():
    # norm_len 5 (not the padded length 4): row sums 6 / 5 = 1.2 and 4 / 5 = 0.8, mean over 2 rows = 1.0
    per_token = PER_TOKEN.clone().requires_grad_(True)
    loss = aggregate_loss(per_token, MASK, "seq_mean_token_sum_norm", norm_len=5)
    assert_close(loss, torch.tensor(1.0))
    # every counted token weighs the same, 1 / (5 * 2), whatever its row's length
    loss.backward()
    assert_close(per_token.grad, MASK * 0.1)
    # with a divisor 4 (rows): (1.2 + 0.8) / 4
    loss = aggregate_loss(PER_TOKEN, MASK, "seq_mean_token_sum_norm", norm_len=5, divisor=4.0)
    assert_close(loss, torch.tensor(0.5))
    # any norm_len > 0 will do, 1 and below too: (6 + 4) / 1 / 2 rows = 5; (6 + 4) / 0.5 / 2 = 10
    assert_close(aggregate_loss(PER_TOKEN, MASK, "seq_mean_token_sum_norm", norm_len=1), torch.tensor(5.0))
    assert_close(aggregate_loss(PER_TOKEN, MASK, "seq_mean_token_sum_norm", norm_len=0.5), torch.tensor(10.0))


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_aggregation_of_an_all_masked_batch_is_zero_without_nan(mode):
    per_token = t([1.0, float("inf")], [float("nan"), 2.0]).requires_grad_(True)
    empty = torch.zeros(2, 2, dtype=torch.bool)
    loss = aggregate_loss(per_token, empty, mode, norm_len=3)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(per_token.grad, torch.zeros(2, 2))


def test_aggregation_keeps_a_bf16_dtype():
    # counted [1, 2] and [4]: row means 1.5 and 4 -> 2.75
    per_token = t([1.0, 2.0], [4.0, 8.0]).to(torch.bfloat16)
    loss = aggregate_loss(per_token, t([1, 1], [1, 0]), "seq_mean_token_mean")
    assert_close(loss, torch.tensor(2.75, dtype=torch.bfloat16))


def test_aggregation_rejects_unknown_modes_and_missing_norm_len():
    with pytest.raises(ValueError, match="unknown loss aggregation 'seq_mean'"):
        aggregate_loss(PER_TOKEN, MASK, "seq_mean")
    for norm_len in (None, 0, -2.0):
        with pytest.raises(ValueError, match="seq_mean_token_sum_norm needs norm_len > 0"):
            aggregate_loss(PER_TOKEN, MASK, "seq_mean_token_sum_norm", norm_len=norm_len)


def test_policy_loss_takes_the_aggregation_mode():
    # ratio 1, so the per-token loss is -A. Counted A: row 0 [1, 2, 3], row 1 [-4]
    logp = t([-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0])
    adv, mask = t([1.0, 2.0, 3.0], [-4.0, 9.0, 9.0]), t([1, 1, 1], [1, 0, 0])

    def loss(**kwargs):
        return ppo_policy_loss(logp, logp.clone(), adv, mask, 0.2, **kwargs)[0]

    # token mean: -(1 + 2 + 3 - 4) / 4 = -0.5, the default
    assert_close(loss(), torch.tensor(-0.5))
    assert_close(loss(loss_agg="token_mean", num_tokens=2.0), torch.tensor(-1.0))
    # row means -2 and 4 -> 1; with num_seqs 4: 2 / 4; num_tokens is not its divisor
    assert_close(loss(loss_agg="seq_mean_token_mean"), torch.tensor(1.0))
    assert_close(loss(loss_agg="seq_mean_token_mean", num_seqs=4.0, num_tokens=100.0), torch.tensor(0.5))
    # row sums / 3: -6/3 = -2 and 4/3 -> mean -1/3
    assert_close(loss(loss_agg="seq_mean_token_sum_norm", norm_len=3), torch.tensor(-1.0 / 3.0))


# ---------------------------------------------------------------------------------------- KL loss


def test_kl_loss_k3_hand_values_and_gradient():
    # logp 0; ref [ln 2, -ln 2, 0] -> r = ref / p = [2, 1/2, 1]
    # k3 = (r - 1) - log r = [1 - ln 2, ln 2 - 1/2, 0], sum 1/2, token mean 1/6; kl_coef 0.1 -> 1/60
    logp = torch.zeros(3).requires_grad_(True)
    ref = t(LN2, -LN2, 0.0).requires_grad_(True)
    loss, stats = kl_loss(logp, ref, t(1, 1, 1), kl_coef=0.1)
    assert_close(loss, torch.tensor(0.1 / 6.0))
    assert_close(stats["policy/ref_kl"], torch.tensor(1.0 / 6.0))
    assert not stats["policy/ref_kl"].requires_grad
    # d k3 / d logp = 1 - r = [-1, 1/2, 0]; times kl_coef / 3 tokens; no gradient to the reference
    loss.backward()
    assert_close(logp.grad, t(-0.1 / 3.0, 0.05 / 3.0, 0.0))
    assert ref.grad is None


def test_kl_loss_k1_estimator():
    # k1 = logp - ref = [1, 3], token mean 2, kl_coef 0.5 -> 1
    loss, stats = kl_loss(t(0.0, 0.0), t(-1.0, -3.0), t(1, 1), kl_coef=0.5, estimator="k1")
    assert_close(loss, torch.tensor(1.0))
    assert_close(stats["policy/ref_kl"], torch.tensor(2.0))


def test_kl_loss_follows_the_aggregation_and_its_divisors():
    # row 0 counts [1 - ln 2, ln 2 - 1/2] (sum 1/2), row 1 counts [0]; the padded token holds junk
    logp = t([0.0, 0.0], [0.0, 0.0])
    ref, mask = t([LN2, -LN2], [0.0, 50.0]), t([1, 1], [1, 0])
    # token mean: (1/2 + 0) / 3 tokens; row means: (1/4 + 0) / 2 rows; row sums / 4: (1/8 + 0) / 2
    assert_close(kl_loss(logp, ref, mask, 1.0)[0], torch.tensor(1.0 / 6.0))
    assert_close(kl_loss(logp, ref, mask, 1.0, num_tokens=5.0)[0], torch.tensor(0.1))
    assert_close(kl_loss(logp, ref, mask, 1.0, loss_agg="seq_mean_token_mean")[0], torch.tensor(0.125))
    assert_close(kl_loss(logp, ref, mask, 1.0, loss_agg="seq_mean_token_mean", num_seqs=5.0)[0],
                 torch.tensor(0.05))
    loss, stats = kl_loss(logp, ref, mask, 2.0, loss_agg="seq_mean_token_sum_norm", norm_len=4)
    assert_close(loss, torch.tensor(2.0 * 0.125 / 2.0))
    assert_close(stats["policy/ref_kl"], torch.tensor(1.0 / 6.0))  # always the token mean


def test_policy_and_kl_losses_add_up_token_by_token():
    # GRPO's per-token objective -A * ratio + beta * k3, aggregated once, equals the two losses summed
    torch.manual_seed(3)
    logp, old, ref, adv = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    old = logp + 0.01 * old  # ratios near 1: nothing clipped at 0.2
    mask = (torch.arange(5) < torch.tensor([5, 2, 1, 3]).unsqueeze(1)).float()
    log_ratio = ref - logp
    per_token = -adv * torch.exp(logp - old) + 0.04 * (torch.exp(log_ratio) - log_ratio - 1.0)
    kwargs = {"loss_agg": "seq_mean_token_sum_norm", "norm_len": 5}
    pg, pg_stats = ppo_policy_loss(logp, old, adv, mask, 0.2, **kwargs)
    kl, _ = kl_loss(logp, ref, mask, 0.04, **kwargs)
    assert pg_stats["policy/clipfrac"].item() == 0.0
    # by hand: each row's counted sum / 5, mean over the 4 rows
    expected = sum((per_token[i] * mask[i]).sum() / 5.0 for i in range(4)) / 4.0
    assert_close(pg + kl, expected)


# ------------------------------------------------------------------------------------------ device


def test_every_tensor_the_new_pieces_make_names_its_device():
    mask = t([1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0])
    logp = torch.randn(4, 3)
    watch = DevicelessFactories(ppo_math)
    with watch:
        scores = t(1.0, 2.0, 3.0, 3.0)
        grpo_advantages(scores, 2)
        dr_grpo_advantages(scores, 2)
        adv = rloo_advantages(scores, 2)
        broadcast_advantages(adv, mask)
        reinforce_pp_baseline_advantages(scores, 2, mask)
        reinforce_pp_baseline_advantages(scores, 2, mask, reduce=lambda v: v)
        for mode in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
            aggregate_loss(logp, mask, mode, norm_len=3)
            ppo_policy_loss(logp, logp - 0.1, logp, mask, 0.2, loss_agg=mode, norm_len=3)
            kl_loss(logp, logp - 0.2, mask, 0.1, loss_agg=mode, norm_len=3)
    assert not watch.calls, "tensors made without the input's device:\n" + "\n".join(watch.calls)


def test_overlong_penalty_is_zero_then_linear_to_the_full_penalty():
    from rlhf.ppo_math import overlong_penalty

    # max_len 16, buffer 4: free up to 12 tokens, then 1/4 of the penalty per token, all of it at 16
    lengths = torch.tensor([0, 12, 13, 14, 16, 20])
    got = overlong_penalty(lengths, 16, 4, 2.0)
    assert torch.equal(got, torch.tensor([0.0, 0.0, 0.5, 1.0, 2.0, 2.0]))
    with pytest.raises(ValueError, match="buffer must be > 0"):
        overlong_penalty(lengths, 16, 0, 1.0)
    # the smallest buffer: only a response of max_len tokens (or more) pays, and all of the penalty
    assert torch.equal(overlong_penalty(torch.tensor([15, 16, 17]), 16, 1, 3.0), torch.tensor([0.0, 3.0, 3.0]))
