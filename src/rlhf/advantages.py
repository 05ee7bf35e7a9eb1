"""PPO experience maths: response masks, per-token rewards, GAE, KL-coefficient controllers.

Shapes: B = batch, R = response length. `mask` is a binary [B, R] tensor (bool or float), 1 for
response tokens up to and including the first EOS, 0 after it and for padding. Everything here is
computed without gradient (it builds the targets of the PPO update) and returns float32.

This module imports only torch (and `rlhf.losses`, which imports only torch).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from rlhf.losses import KLEstimator, kl_penalty


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
