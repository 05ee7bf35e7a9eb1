"""Pure tensor maths shared by the stages: masked statistics, token log-probs and entropy, and the losses
of the reward model, the DPO family and ORPO. PPO's own maths (KL, whitening, GAE, its losses) is in
`rlhf.ppo_math`, built on the masked statistics here.

ORPO (`stages/orpo.py`) trains with its loss. The reward and DPO stages train
with TRL's RewardTrainer and DPOTrainer; `pairwise_reward_loss` and `dpo_loss`/`ipo_loss`/`hinge_loss`
(the configured `dpo.loss_type`) compute those stages' held-out loss on the reloaded model
(`stages.reward.heldout_loss`, `stages.dpo.rewards_report`).

Each loss is a plain function over tensors (no modules, no config objects) that returns
`(loss, stats)`, where `stats` is a small `dict[str, Tensor]` of detached scalars under a namespace
(`reward/`, `rewards/`, `orpo/`). A new variant is a new function.

Shapes: B = batch, R = response length, T = sequence length, V = vocabulary.
`mask` is a binary [B, R] tensor (bool or float): 1 for tokens that count (response tokens up to
and including the first EOS), 0 after EOS and for padding. Every reduction over tokens is masked,
and values under mask 0 never reach the result, even when they are inf.

This module imports only torch, so the unit tests run without transformers or DeepSpeed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

Stats = dict[str, Tensor]


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


# --------------------------------------------------------------------------------------------------
# log-probabilities and entropy
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
