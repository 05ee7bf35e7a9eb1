"""PPO's maths, each piece with a hand-worked test (tests/unit/test_ppo_math.py; the critic-free pieces
in tests/unit/test_advantage_estimators.py). Every piece is a pure tensor function except the KL
controllers: objects that hold the current kl_coef as `value`, which the adaptive one's `update` changes
after each step (the fixed one's leaves it), saved and restored through `state_dict` / `load_state_dict`.

    response_mask       which sampled tokens count (up to and including the first EOS)
    kl_penalty          per-token KL estimate of the policy against the reference (k1, k3)
    per_token_rewards   the score at the last counted token, -kl_coef * KL on every token
    gae                 generalized advantage estimates and returns
    grpo_advantages, dr_grpo_advantages, rloo_advantages, reinforce_pp_baseline_advantages
                        critic-free advantages from outcome scores, k samples per prompt
    broadcast_advantages  a per-response advantage on each of its counted tokens, as (advantages, returns)
    masked_whiten       advantages whitened over the counted tokens (of all ranks, given a reduce)
    aggregate_loss      a per-token loss reduced to a scalar: token mean or per-sequence means
    ppo_policy_loss     the clipped surrogate objective (a token mean by default)
    kl_loss             kl_coef * KL(policy || ref) as a loss term (GRPO)
    ppo_value_loss      the clipped value loss, as a token mean
    KL controllers      the fixed or adaptive kl_coef (stateful)

Shapes: B = batch, R = response length, k = samples per prompt (B = n_prompts * k). `mask` is a binary
[B, R] tensor (bool or float), 1 for response tokens up to and including the first EOS, 0 after it and
for padding. The experience maths runs without gradient and returns float32; the losses carry the
gradient of their log-probs and values.

This module imports only torch (and the masked statistics of `rlhf.losses`, which imports only torch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import torch
from torch import Tensor

from rlhf.losses import Stats, masked_mean, masked_sum, masked_var

KLEstimator = Literal["k1", "k3"]  # `ppo.kl_estimator`
LossAggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]  # see aggregate_loss


# --------------------------------------------------------------------------------------------------
# experience: masks, shaped rewards, GAE (no gradient)
# --------------------------------------------------------------------------------------------------


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last 1 in each row of `mask` [B, R] -> [B] long; -1 for a row with no 1.

    -1 (never a valid position) lets callers compare against `arange(R)` without a special case.
    """
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).max(dim=1).values


def response_mask(
    response_ids: Tensor, eos_token_id: int | list[int], pad_token_id: int | None
) -> tuple[Tensor, Tensor]:
    """Mask of the tokens that count in generated responses: [B, R] ids -> ([B, R] float, [B] bool has_eos).

    A row with an EOS (any id of `eos_token_id`) counts up to and including its first EOS; a row without
    one counts up to and including its last non-pad token (all of it when `pad_token_id` is None).
    Generation pads after EOS, so when pad == EOS the first occurrence is the EOS and the rule holds.
    The mask is always a prefix: a pad id sampled mid-response is a real action and stays counted.
    """
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    is_eos = torch.isin(response_ids, torch.tensor(eos_ids, device=response_ids.device))
    has_eos = is_eos.any(dim=1)
    length = response_ids.shape[1]
    positions = torch.arange(length, device=response_ids.device).expand_as(response_ids)
    first_eos = torch.where(is_eos, positions, length).min(dim=1).values
    if pad_token_id is None:
        last_non_pad = torch.full_like(first_eos, length - 1)
    else:
        last_non_pad = last_token_index(response_ids != pad_token_id)
    end = torch.where(has_eos, first_eos, last_non_pad)
    return (positions <= end.unsqueeze(1)).float(), has_eos


@torch.no_grad()
def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, penalty: float) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, https://arxiv.org/abs/2503.14476, eq. 13), subtracted
    from a score: 0 for a response of at most `max_len - buffer` tokens, then growing linearly with each
    token to `penalty` at `max_len` (and beyond). lengths: [B] counted response tokens -> [B], >= 0."""
    if buffer <= 0:
        raise ValueError(f"buffer must be > 0, got {buffer}")
    over = (lengths.float() - (max_len - buffer)) / buffer
    return penalty * over.clamp(0.0, 1.0)


@torch.no_grad()
def per_token_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[Tensor, Tensor]:
    """Shaped PPO rewards (Ziegler et al. 2019): -kl_coef * KL on every counted token, score at the last.

    scores: [B] sequence scores (already normalised / penalised for a missing EOS by the caller);
    logprobs, ref_logprobs, mask: [B, R]. The score goes to the last counted token of each row, which
    is the EOS, or the last response token when there is none, never the padding after it.
    Returns (rewards [B, R], kl [B, R]), both 0 outside the mask; a row with an empty mask gets nothing.
    """
    valid = mask.bool()
    kl = torch.where(valid, kl_penalty(logprobs.float(), ref_logprobs.float(), estimator), 0.0)
    positions = torch.arange(mask.shape[1], device=mask.device)
    at_last = positions.unsqueeze(0) == last_token_index(mask).unsqueeze(1)  # no True in empty rows
    rewards = -kl_coef * kl + torch.where(at_last, scores.float().unsqueeze(1), 0.0)
    return rewards, kl


@torch.no_grad()
def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, https://arxiv.org/abs/1506.02438).

    rewards, values, mask: [B, R] -> (advantages [B, R], returns [B, R]), returns = advantages + values.
    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}, computed backwards
    over R and vectorised over B. Positions under mask 0 are skipped (they pass the next value and
    advantage through unchanged), so with a response mask the value after the last counted token is 0:
    the episode ends at EOS. Advantages and returns are 0 outside the mask.
    """
    rewards, values, valid = rewards.float(), values.float(), mask.bool()
    zero = rewards.new_zeros(rewards.shape[0])
    next_value, next_advantage = zero, zero
    columns = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        counted = valid[:, t]
        columns.append(torch.where(counted, advantage, zero))
        next_value = torch.where(counted, values[:, t], next_value)
        next_advantage = torch.where(counted, advantage, next_advantage)
    advantages = torch.stack(columns[::-1], dim=1)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


# --------------------------------------------------------------------------------------------------
# critic-free advantages from outcome scores, k samples per prompt (no gradient)
# --------------------------------------------------------------------------------------------------


def _centered_groups(scores: Tensor, k: int) -> Tensor:
    """[n * k] scores, each prompt's k samples contiguous -> [n, k] float32 score - its group's mean.

    A group whose scores are all equal gives exactly 0 (their float mean can miss them by an ulp).
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [n_prompts * k], got shape {tuple(scores.shape)}")
    if k < 2:
        raise ValueError(f"k (samples per prompt) must be >= 2 for a group baseline, got {k}")
    if scores.shape[0] % k != 0:
        raise ValueError(f"k = {k} samples per prompt does not divide the batch of {scores.shape[0]} scores")
    groups = scores.float().reshape(-1, k)
    flat = (groups == groups[:, :1]).all(dim=1, keepdim=True)
    return torch.where(flat, 0.0, groups - groups.mean(dim=1, keepdim=True))


@torch.no_grad()
def grpo_advantages(scores: Tensor, k: int, eps: float = 1e-6) -> Tensor:
    """GRPO (Shao et al. 2024, https://arxiv.org/abs/2402.03300): (r - group mean) / (group std + eps).

    scores: [n * k], a prompt's k samples contiguous -> [n * k] float32. The std is the unbiased one
    (divides by k - 1), as torch.std and GRPO's reference implementations use. A group with equal
    scores gets exactly 0 (given eps > 0).
    """
    centered = _centered_groups(scores, k)
    return (centered / (centered.std(dim=1, keepdim=True) + eps)).reshape(-1)


@torch.no_grad()
def dr_grpo_advantages(scores: Tensor, k: int) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, https://arxiv.org/abs/2503.20783): r - group mean, no std division.

    scores: [n * k], a prompt's k samples contiguous -> [n * k] float32.
    """
    return _centered_groups(scores, k).reshape(-1)


@torch.no_grad()
def rloo_advantages(scores: Tensor, k: int) -> Tensor:
    """RLOO (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740): r_i - mean of the other k - 1 scores.

    scores: [n * k], a prompt's k samples contiguous -> [n * k] float32. The leave-one-out baseline is
    (k * mean - r_i) / (k - 1), so the advantage is k / (k - 1) * (r_i - group mean).
    """
    return (_centered_groups(scores, k) * (k / (k - 1))).reshape(-1)


@torch.no_grad()
def broadcast_advantages(advantages: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """A per-response advantage on each of its counted tokens: [B], [B, R] -> (advantages, returns), [B, R].

    Outcome estimators give every response token the same advantage; 0 outside the mask. There is no
    critic, so the returns are the advantages themselves (GAE's advantages + values with values 0),
    the same tensor: the pair has `gae`'s shapes, and the caller may ignore the returns.
    """
    advantages = torch.where(mask.bool(), advantages.float().unsqueeze(1), 0.0)
    return advantages, advantages


@torch.no_grad()
def reinforce_pp_baseline_advantages(
    scores: Tensor, k: int, mask: Tensor, reduce: Callable[[Tensor], Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline (Hu et al. 2025, https://arxiv.org/abs/2501.03262): r - group mean on every
    counted token, then whitened over the counted tokens of the batch.

    scores: [n * k], a prompt's k samples contiguous; mask: [n * k, R]. Returns (advantages, returns),
    both [n * k, R]: the whitened advantages, and the returns before whitening, as `gae` followed by
    `masked_whiten` gives them. `reduce` (a sum over ranks) takes the whitening statistics over every
    rank's tokens, as in `masked_whiten`; the group means never cross ranks (a group is on one rank).
    """
    advantages, returns = broadcast_advantages(dr_grpo_advantages(scores, k), mask)
    return masked_whiten(advantages, mask, reduce=reduce), returns


# --------------------------------------------------------------------------------------------------
# KL-coefficient controllers
# --------------------------------------------------------------------------------------------------


class KLController(Protocol):
    """What the PPO loop needs from a KL controller: the current coefficient and a per-step update."""

    value: float

    def update(self, current_kl: float | Tensor, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, float]: ...

    def load_state_dict(self, state: dict[str, float]) -> None: ...


class FixedKLController:
    """A constant KL coefficient; `update` does nothing."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """Keep the coefficient."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (https://arxiv.org/abs/1909.08593, section 2.2).

    error = clip(KL / target - 1, -0.2, 0.2); coef *= 1 + error * n_steps / horizon. So a KL above
    target raises the coefficient and one below lowers it, by at most 20% per `horizon` samples.
    `n_steps` is the number of samples (episodes) in the step that measured `current_kl`.
    Only the coefficient is checkpointed: `target_kl` and `horizon` come from the config on resume.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: float) -> None:
        if target_kl <= 0 or horizon <= 0:
            raise ValueError(f"target_kl ({target_kl}) and horizon ({horizon}) must be > 0")
        self.value = float(init_kl_coef)
        self.target_kl = float(target_kl)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


# --------------------------------------------------------------------------------------------------
# KL estimate and whitening
# --------------------------------------------------------------------------------------------------


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token estimate of KL(policy || ref) at tokens sampled from the policy: [B, R] -> [B, R].

    With log p = `logprobs`, log q = `ref_logprobs` and r = q / p (http://joschu.net/blog/kl-approx.html):
    k1 = log p - log q (unbiased, can be negative per token); k3 = (r - 1) - log r (unbiased, >= 0 always,
    lower variance). Nothing is masked here.
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs
        return torch.expm1(log_ratio) - log_ratio  # expm1: exact near r = 1, where most tokens sit
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


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
# losses (Schulman et al. 2017, https://arxiv.org/abs/1707.06347)
# --------------------------------------------------------------------------------------------------


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: LossAggregation = "token_mean",
    norm_len: float | None = None,
    divisor: Tensor | float | None = None,
) -> Tensor:
    """Reduce a per-token loss [B, R] over the counted tokens of `mask` [B, R] to a scalar.

    token_mean: sum over all counted tokens / their number (a long response weighs more).
    seq_mean_token_mean: each row's token mean, then the mean over rows (GRPO: each response weighs
    the same, so a token of a short one weighs more). seq_mean_token_sum_norm: each row's token sum /
    `norm_len`, a constant such as the largest response length, then the mean over rows (Dr. GRPO,
    https://arxiv.org/abs/2503.20783: no length-dependent weight).

    The rows are those with a counted token: a row with an empty mask adds 0 and is not counted, and
    an empty batch gives 0, not NaN. `divisor` replaces that last count (tokens for token_mean, rows
    otherwise), e.g. with the global count divided by the world size, as in `ppo_policy_loss`.
    """
    if mode == "token_mean":
        total, count = masked_sum(per_token, mask), mask.sum()
    elif mode == "seq_mean_token_mean":
        total, count = masked_mean(per_token, mask, dim=1).sum(), mask.bool().any(dim=1).sum()
    elif mode == "seq_mean_token_sum_norm":
        if norm_len is None or norm_len <= 0:
            raise ValueError(f"{mode} needs norm_len > 0 (e.g. the largest response length), got {norm_len}")
        # the rows' sums / norm_len, summed over rows, is the sum over all their tokens / norm_len
        total, count = masked_sum(per_token, mask) / norm_len, mask.bool().any(dim=1).sum()
    else:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LossAggregation.__args__}")
    denom = count.to(per_token.dtype).clamp_min(1.0) if divisor is None else divisor
    return total / denom


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    num_tokens: Tensor | float | None = None,
    loss_agg: LossAggregation = "token_mean",
    norm_len: float | None = None,
    num_seqs: Tensor | float | None = None,
) -> tuple[Tensor, Stats]:
    """Clipped surrogate loss: max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)), a token mean by default.

    logprobs, old_logprobs, advantages, mask: [B, R]. Only `logprobs` carries gradient;
    `old_logprobs` and `advantages` are detached here. Tokens under mask 0 get exactly zero gradient.

    `num_tokens` is the divisor of the masked sum (default: this micro-batch's token count). For the
    token mean over the whole global batch, which is what PPO optimises, pass the global count (divided
    by the world size when DDP/DeepSpeed averages gradients over ranks): averaging per-rank token means
    weights a token on a short-response rank more than one on a long-response rank.

    `loss_agg` and `norm_len` choose another reduction over the tokens (see `aggregate_loss`); under
    the seq_ modes `num_seqs` is the divisor in place of `num_tokens`: the count of rows with a counted
    token (global / world size as above; default: this micro-batch's).

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
    loss = aggregate_loss(per_token, mask, loss_agg, norm_len, num_tokens if loss_agg == "token_mean" else num_seqs)

    with torch.no_grad():
        stats = {
            "policy/clipfrac": masked_mean((clipped > unclipped).to(per_token.dtype), mask),
            "policy/approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "policy/ratio_mean": masked_mean(ratio, mask),
            "policy/ratio_max": torch.where(mask.bool(), ratio, torch.zeros_like(ratio)).max(),
        }
    return loss, stats


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: KLEstimator = "k3",
    num_tokens: Tensor | float | None = None,
    loss_agg: LossAggregation = "token_mean",
    norm_len: float | None = None,
    num_seqs: Tensor | float | None = None,
) -> tuple[Tensor, Stats]:
    """The KL penalty as a loss term (GRPO, https://arxiv.org/abs/2402.03300 eq. 3-4): kl_coef * KL per token.

    logprobs, ref_logprobs, mask: [B, R]. The per-token estimate is `kl_penalty` (GRPO's k3 by
    default: exp(ref - logp) - (ref - logp) - 1), reduced as in `ppo_policy_loss` with the same
    `num_tokens`, `loss_agg`, `norm_len` and `num_seqs`, so the two losses add up token by token.
    Only `logprobs` carries gradient (k3's is kl_coef * (1 - q / p) per token, q and p the reference's
    and the policy's probabilities); `ref_logprobs` is detached. Use it instead of the KL in the rewards (`per_token_rewards` with kl_coef 0), not with it.

    Stats: policy/ref_kl (token mean of the estimate, without kl_coef; 0 when the mask is empty).
    """
    kl = kl_penalty(logprobs, ref_logprobs.detach(), estimator)
    divisor = num_tokens if loss_agg == "token_mean" else num_seqs
    loss = kl_coef * aggregate_loss(kl, mask, loss_agg, norm_len, divisor)
    return loss, {"policy/ref_kl": masked_mean(kl.detach(), mask)}


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
