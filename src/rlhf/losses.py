"""Pure tensor losses for every training objective: PPO (policy, value), reward model, DPO family, ORPO.

PPO (`stages/ppo/loop.py`) and ORPO (`stages/orpo.py`) train with theirs. The reward and DPO stages train
with TRL's RewardTrainer and DPOTrainer; `pairwise_reward_loss` and `dpo_loss`/`ipo_loss`/`hinge_loss`
(the configured `dpo.loss_type`) compute those stages' held-out loss on the reloaded model
(`stages.reward.heldout_loss`, `stages.dpo.rewards_report`).

Each loss is a plain function over tensors (no modules, no config objects) that returns
`(loss, stats)`, where `stats` is a small `dict[str, Tensor]` of detached scalars under a namespace
(`policy/`, `value/`, `reward/`, `rewards/`, `orpo/`). A new variant is a new function.

Shapes: B = batch, R = response length, T = sequence length, V = vocabulary.
`mask` is a binary [B, R] tensor (bool or float): 1 for tokens that count (response tokens up to
and including the first EOS), 0 after EOS and for padding. Every reduction over tokens is masked,
and values under mask 0 never reach the result, even when they are inf.

This module imports only torch, so the unit tests run without transformers or DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Stats = dict[str, Tensor]
KLEstimator = Literal["k1", "k2", "k3"]


# --------------------------------------------------------------------------------------------------
# masked reductions
# --------------------------------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` where `mask` is 1, over all entries (`dim=None`) or along `dim`.

    `torch.where` rather than `x * mask`, so that inf or NaN under mask 0 (e.g. log-probs of padding)
    cannot turn the sum into NaN.
    """
    selected = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over the entries where `mask` is 1, over all entries or along `dim`.

    An all-zero mask (or an all-zero row along `dim`) gives 0, not NaN: the count is clamped to 1
    and the masked sum is 0. The mask must be binary for that clamp to be exact.
    """
    count = mask.sum() if dim is None else mask.sum(dim=dim)
    return masked_sum(x, mask, dim) / count.to(x.dtype).clamp_min(1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over the entries where `mask` is 1 (a scalar).

    With `unbiased`, Bessel's correction n / (n - 1) is applied when n >= 2; with n <= 1 the variance
    is 0 (not inf or NaN), so that whitening one token cannot divide by zero.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum().to(x.dtype)
        var = var * n / (n - 1.0).clamp_min(1.0)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Scale `x` to masked mean 0 and masked (unbiased) std 1; entries under mask 0 are set to 0.

    With `shift_mean=False` the masked mean is added back (only the scale changes), which is the
    usual choice for rewards, while advantages are fully whitened. `eps` keeps one element, or
    equal elements, finite: they whiten to 0. `reduce` (a sum over ranks, e.g.
    `rlhf.engine.all_reduce_sum`) makes mean and std those of every rank's masked entries together
    (two collectives, float64); without it they are this tensor's own.
    """
    if reduce is None:
        mean = masked_mean(x, mask)
        var = masked_var(x, mask, unbiased=True)
    else:
        m, xd = mask.to(torch.float64), x.to(torch.float64)
        total, n = reduce(torch.stack([(xd * m).sum(), m.sum()]))
        mean64 = total / n.clamp_min(1.0)
        squares = reduce((((xd - mean64) ** 2) * m).sum().reshape(1))[0]
        mean, var = mean64.to(x.dtype), (squares / (n - 1.0).clamp_min(1.0)).to(x.dtype)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=whitened.dtype, device=x.device))


# --------------------------------------------------------------------------------------------------
# log-probabilities, entropy, KL
# --------------------------------------------------------------------------------------------------


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each label under `logits`: [B, T, V], [B, T] -> [B, T] float32.

    log p(y) = logit_y - logsumexp(logits), one batch row at a time, so that the float32 temporary is
    [T, V] instead of a full [B, T, V] log_softmax copy (it is the vocabulary that makes this big).
    `labels` must be valid token ids: replace an ignore index such as -100 by any id and mask it.
    """
    rows = []
    for row_logits, row_labels in zip(logits, labels, strict=True):
        row_logits = row_logits.float()  # bf16 logsumexp over 100k+ entries loses too many digits
        picked = row_logits.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position: [B, T, V] -> [B, T] float32.

    H = logsumexp(l) - sum_v softmax(l)_v * l_v, row by row for the same memory reason as above.
    """
    rows = []
    for row_logits in logits:
        row_logits = row_logits.float()
        probs = torch.softmax(row_logits, dim=-1)
        rows.append(torch.logsumexp(row_logits, dim=-1) - (probs * row_logits).sum(dim=-1))
    return torch.stack(rows)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of KL(policy || ref) at tokens sampled from the policy: [B, R] -> [B, R].

    With log p = `logprobs`, log q = `ref_logprobs` and r = q / p (http://joschu.net/blog/kl-approx.html):
    k1 = log p - log q (unbiased, can be negative per token); k2 = 0.5 * (log p - log q)^2 (biased, >= 0);
    k3 = (r - 1) - log r (unbiased, >= 0 always, lower variance). Nothing is masked here.
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs
        return torch.expm1(log_ratio) - log_ratio  # expm1: exact near r = 1, where most tokens sit
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


# --------------------------------------------------------------------------------------------------
# PPO (Schulman et al. 2017, https://arxiv.org/abs/1707.06347)
# --------------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    num_tokens: Tensor | float | None = None,
) -> tuple[Tensor, Stats]:
    """Clipped surrogate loss: token mean of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

    logprobs, old_logprobs, advantages, mask: [B, R]. Only `logprobs` carries gradient;
    `old_logprobs` and `advantages` are detached here. Tokens under mask 0 get exactly zero gradient.

    `num_tokens` is the divisor of the masked sum (default: this micro-batch's token count). For the
    token mean over the whole global batch, which is what PPO optimises, pass the global count (divided
    by the world size when DDP/DeepSpeed averages gradients over ranks): averaging per-rank token means
    weights a token on a short-response rank more than one on a long-response rank.

    Stats: policy/clipfrac (fraction of tokens where the clipped term is the larger, so the gradient
    is 0), policy/approx_kl (k3 estimate of KL(old || new) at tokens sampled from old: (r - 1) - log r
    with r = new / old, http://joschu.net/blog/kl-approx.html, as cleanrl logs it), policy/ratio_mean,
    policy/ratio_max (0 when the mask is empty).
    """
    log_ratio = logprobs - old_logprobs.detach()
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    denom = mask.sum().to(per_token.dtype).clamp_min(1.0) if num_tokens is None else num_tokens
    loss = masked_sum(per_token, mask) / denom

    with torch.no_grad():
        stats = {
            "policy/clipfrac": masked_mean((clipped > unclipped).to(per_token.dtype), mask),
            "policy/approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "policy/ratio_mean": masked_mean(ratio, mask),
            "policy/ratio_max": torch.where(mask.bool(), ratio, torch.zeros_like(ratio)).max(),
        }
    return loss, stats


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range_value: float,
    num_tokens: Tensor | float | None = None,
) -> tuple[Tensor, Stats]:
    """Clipped value loss: 0.5 * token mean of max((v - R)^2, (clip(v, old - eps, old + eps) - R)^2).

    values, old_values, returns, mask: [B, R]; `old_values` and `returns` are detached here. Inside
    the clip range the clipped value is `values` itself, so the loss equals the plain squared error;
    beyond it the max keeps the more pessimistic of the two. `num_tokens` as in `ppo_policy_loss`.

    Stats: value/clipfrac (fraction of tokens where the clipped error is the larger),
    value/mean_error (masked mean of the unclipped squared error (v - R)^2).
    """
    old_values, returns = old_values.detach(), returns.detach()
    # clamp(v, lo, hi) returns v bit-for-bit inside the range; old + clamp(v - old) would round.
    values_clipped = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    error = (values - returns) ** 2
    error_clipped = (values_clipped - returns) ** 2
    per_token = 0.5 * torch.maximum(error, error_clipped)
    denom = mask.sum().to(per_token.dtype).clamp_min(1.0) if num_tokens is None else num_tokens
    loss = masked_sum(per_token, mask) / denom

    with torch.no_grad():
        stats = {
            "value/clipfrac": masked_mean((error_clipped > error).to(per_token.dtype), mask),
            "value/mean_error": masked_mean(error, mask),
        }
    return loss, stats


# --------------------------------------------------------------------------------------------------
# reward model (Bradley-Terry; Ouyang et al. 2022, Llama 2 margin)
# --------------------------------------------------------------------------------------------------


def pairwise_reward_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None
) -> tuple[Tensor, Stats]:
    """Bradley-Terry loss: mean of -log sigmoid(r_chosen - r_rejected - margin). Inputs are [B].

    `margin` ([B] or scalar) asks the chosen reward to lead by at least that much (Llama 2, Touvron et
    al. 2023). Stats: reward/accuracy (fraction with r_chosen > r_rejected, ties count as wrong),
    reward/margin (mean r_chosen - r_rejected, without the margin term).
    """
    diff = chosen_rewards - rejected_rewards
    logits = diff if margin is None else diff - margin
    loss = -F.logsigmoid(logits).mean()
    stats = {
        "reward/accuracy": (diff > 0).float().mean().detach(),
        "reward/margin": diff.mean().detach(),
    }
    return loss, stats


# --------------------------------------------------------------------------------------------------
# DPO family: sequence log-probs are summed token log-probs, [B] each
# --------------------------------------------------------------------------------------------------


def _preference_logits(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Stats]:
    """h = (log pi(yw) - log ref(yw)) - (log pi(yl) - log ref(yl)), [B], and the implicit-reward stats.

    The implicit reward of a response is beta * (log pi - log ref) (Rafailov et al. 2023, eq. 5).
    The reference log-probs are detached: no gradient may reach the frozen reference model.
    """
    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps.detach()
    with torch.no_grad():
        chosen_rewards = beta * chosen_log_ratio
        rejected_rewards = beta * rejected_log_ratio
        stats = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        }
    return chosen_log_ratio - rejected_log_ratio, stats


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Stats]:
    """DPO, sigmoid form (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290): mean -log sigmoid(beta * h)."""
    h, stats = _preference_logits(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return -F.logsigmoid(beta * h).mean(), stats


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Stats]:
    """IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036, eq. 17): mean (h - 1 / (2 * beta))^2.

    `beta` is the paper's tau. The paper's h uses whole-sequence log-probs, as here; some libraries
    average them over tokens instead, which changes the scale at which beta acts.
    """
    h, stats = _preference_logits(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return ((h - 1.0 / (2.0 * beta)) ** 2).mean(), stats


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Stats]:
    """Hinge loss on the implicit-reward margin (SLiC-HF, Zhao et al. 2023): mean max(0, 1 - beta * h)."""
    h, stats = _preference_logits(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return torch.relu(1.0 - beta * h).mean(), stats


# --------------------------------------------------------------------------------------------------
# ORPO (Hong et al. 2024, https://arxiv.org/abs/2403.07691)
# --------------------------------------------------------------------------------------------------

# Mean token log-probs are clamped below 0 before log(1 - p): at exactly 0 (p = 1, which bf16 reaches)
# log odds would be inf and a chosen/rejected pair at p = 1 would give inf - inf = NaN.
# -1e-6 caps |log odds| at about 13.8.
_ORPO_MAX_LOGP = -1e-6


def _log_odds(logp: Tensor) -> Tensor:
    """log(p / (1 - p)) from log p <= 0, without forming p (Maechler 2012, "Accurately computing log(1 - exp(-|a|))").

    log(1 - exp(x)) is log(-expm1(x)) for x > -log 2 and log1p(-exp(x)) below it; each branch is exact
    where the other loses digits.
    """
    logp = logp.clamp_max(_ORPO_MAX_LOGP)
    near_zero = logp > -0.6931471805599453
    log1m_p = torch.where(
        near_zero,
        torch.log(-torch.expm1(logp.clamp_min(-0.6931471805599453))),
        torch.log1p(-torch.exp(logp.clamp_max(-0.6931471805599453))),
    )  # each branch gets an input clamped to its own range, so the unused one cannot make a NaN gradient
    return logp - log1m_p


def orpo_loss(
    chosen_nll: Tensor, chosen_logps_mean: Tensor, rejected_logps_mean: Tensor, lam: float
) -> tuple[Tensor, Stats]:
    """ORPO: mean NLL(chosen) + lam * mean -log sigmoid(log odds(chosen) - log odds(rejected)).

    chosen_nll: [B] mean token NLL of the chosen response; chosen_logps_mean, rejected_logps_mean:
    [B] mean per-token log-probs, so that odds(y) = p / (1 - p) with log p the MEAN token log-prob
    (the paper's length-normalised likelihood, eq. 4). No reference model.
    Stats: orpo/log_odds_ratio, orpo/log_odds_chosen, orpo/nll (batch means).
    """
    log_odds_chosen = _log_odds(chosen_logps_mean)
    log_odds_ratio = log_odds_chosen - _log_odds(rejected_logps_mean)
    nll = chosen_nll.mean()
    loss = nll + lam * (-F.logsigmoid(log_odds_ratio)).mean()
    stats = {
        "orpo/log_odds_ratio": log_odds_ratio.mean().detach(),
        "orpo/log_odds_chosen": log_odds_chosen.mean().detach(),
        "orpo/nll": nll.detach(),
    }
    return loss, stats
