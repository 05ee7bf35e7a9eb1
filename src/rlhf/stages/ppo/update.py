"""PPO, phase 2: the update. `ppo_epochs` passes over shuffled minibatches of one `Experience`; each
minibatch is one optimizer step of the actor and one of the critic, made of micro-batches:

    for epoch: shuffle; for minibatch: for micro-batch:
        actor log-probs (forwards.response_logprobs) -> ppo_math.ppo_policy_loss (+ kl_loss) -> backward, step
        critic values   (forwards.values_of)         -> ppo_math.ppo_value_loss              -> backward, step
    each engine applies its update at the minibatch's last micro-batch (it counts accumulation boundaries)

A critic-free run (`ppo.advantage` other than gae) has no critic and no value loss; with `ppo.kl_in:
loss` the KL to the reference is a term of the policy loss (`ppo_math.kl_loss`). Micro-batch losses are
divided by the token count (or, under `ppo.loss_agg`'s per-response modes, the response count) of the
whole minibatch over all ranks (not by grad_accum), so a step optimizes the minibatch's mean however it
is split over micro-batches and ranks. The statistics stay on the device and are read once, after the loops; only the non-finite guard
looks at each loss as it comes (`backward_step`). With `ppo.reuse_rollout_forward` the first micro-batch
takes its log-probs and values from the rollout's own forwards (`experience.KeptForward`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rlhf import engine
from rlhf.forwards import response_logprobs, values_of
from rlhf.guards import NonFiniteGuard, is_finite
from rlhf.ppo_math import kl_loss, ppo_policy_loss, ppo_value_loss

if TYPE_CHECKING:
    from rlhf.config import PPOCfg
    from rlhf.engine import Engine
    from rlhf.stages.ppo.experience import Experience, KeptForward, Watch


@dataclass
class Faults:
    """The non-finite events of one minibatch on this rank (`run.on_nonfinite`): a loss that was NaN or inf
    in any of its micro-batches, and an engine that dropped its update at the minibatch's end."""

    policy_loss: bool = False
    value_loss: bool = False
    actor_skipped: bool = False
    critic_skipped: bool = False

    def applied_anyway(self) -> str | None:
        """The loss that was non-finite while its engine still applied the update, if any."""
        if self.policy_loss and not self.actor_skipped:
            return "policy loss"
        if self.value_loss and not self.critic_skipped:
            return "value loss"
        return None


def ppo_update(actor: Engine, critic: Engine | None, exp: Experience, ppo: PPOCfg, guard: NonFiniteGuard,
               step: int, *, watch: Watch, kept: KeptForward | None = None, kl_coef: float = 0.0) -> dict[str, float]:
    """All optimizer steps of one PPO iteration over `exp` (this rank's rows); `critic` None for a
    critic-free run; `kl_coef` the KL loss term's coefficient (`ppo.kl_in: loss`); `step` names the PPO step in
    messages, `watch(role)` a context manager around each model's work (the stage turns an
    out-of-memory error there into one line). With `kept` (`ppo.reuse_rollout_forward`: the rollout's own
    actor and critic forwards of `exp`'s first micro-batch of rows, graphs attached), `exp`'s rows are
    already in the first epoch's order, and its first micro-batch backpropagates through those forwards
    instead of running them again.

    Returns this rank's statistics of the minibatches whose update was applied:
    - policy/loss, value/loss (with a critic) and policy/kl_loss (`kl_in: loss`; policy/loss includes it):
      the mean over those minibatches of the minibatch's loss (its mean over every rank's tokens or
      responses, as this rank's share: `train_step` averages it over ranks);
    - every other policy/ and value/ stat of `ppo_math` (clipfrac, approx_kl, ratio_mean, ratio_max,
      mean_error, ref_kl): the token-weighted mean over all their micro-batches of each micro-batch's value
      (for ratio_max: of each micro-batch's largest ratio);
    - policy/ratio_first and policy/log_ratio_first_absmax: the token-mean ratio and the largest
      |log ratio| of the first applied minibatch (1 and 0 when rollout and update agree);
    - guard/skipped_updates (with `run.on_nonfinite: skip`): minibatches whose update was dropped (a
      non-finite loss or gradient on this rank; left out of the stats above);
    - policy/grad_norm: the actor's gradient norm at its last step, when the engine knows it.
    A non-finite loss stops the run (`stop`) before its backward; under `skip` one whose update an engine
    applied anyway stops it too.
    """
    actor.train()
    if critic is not None:
        critic.train()
    device, n_rows = exp.mask.device, exp.mask.shape[0]
    sums: dict[str, Tensor] = {}  # float64 on the device: summed over the applied minibatches
    weight = torch.zeros((), dtype=torch.float64, device=device)  # their tokens
    first, applied, skipped = None, 0, 0
    for epoch in range(ppo.ppo_epochs):
        reordered = kept is not None and epoch == 0  # the rows are in this epoch's order (`train_step` drew it)
        order = torch.arange(n_rows, device=device) if reordered else torch.randperm(n_rows, device=device)
        for mb_idx in order.split(ppo.mini_batch_size):
            mask = exp.mask[mb_idx]  # tokens and responses that count, on every rank:
            counts = engine.all_reduce_sum(torch.stack([mask.sum(), mask.bool().any(dim=1).sum().to(mask.dtype)]))
            num_tokens, num_seqs = counts.clamp_min(1.0) / engine.world_size()  # DeepSpeed averages over ranks
            mb_sums, mb_weight, mb_absmax, faults = {}, 0.0, 0.0, Faults()  # this minibatch's, as above
            for micro_idx in mb_idx.split(ppo.micro_batch_size):
                mb = exp.select(micro_idx)
                with watch("actor"):
                    logprobs = kept.logprobs if kept is not None else response_logprobs(
                        actor, mb.input_ids, mb.attention_mask, mb.position_ids, mb.response_ids, ppo.temperature)
                    pg_loss, stats = policy_objective(logprobs, mb, ppo, kl_coef, num_tokens, num_seqs)
                    bad, dropped = backward_step(actor, pg_loss, guard, step, "the policy loss")
                    faults.policy_loss |= bad
                    faults.actor_skipped |= dropped
                if critic is not None:
                    with watch("critic"):
                        values = kept.values if kept is not None else values_of(
                            critic, mb.input_ids, mb.attention_mask, mb.position_ids, mb.prompt_len)
                        vf_loss, vf_stats = ppo_value_loss(values, mb.values, mb.returns, mb.mask,
                                                           ppo.clip_range_value, num_tokens=num_tokens)
                        bad, dropped = backward_step(critic, vf_loss, guard, step, "the value loss")
                        faults.value_loss |= bad
                        faults.critic_skipped |= dropped
                    stats.update(vf_stats, **{"value/loss": vf_loss.detach()})
                kept, w = None, mb.mask.sum().double()  # the kept graphs served once, then they are freed
                for key, value in stats.items():  # a loss is already its share of the minibatch's token mean
                    mb_sums[key] = mb_sums.get(key, 0.0) + (value.double() if key.endswith("loss")
                                                            else value.double() * w)
                log_ratio = torch.where(mb.mask.bool(), logprobs.detach() - mb.logprobs, 0.0)
                mb_absmax = torch.maximum(torch.as_tensor(mb_absmax, device=device), log_ratio.abs().max().double())
                mb_weight = mb_weight + w
            landed = faults.applied_anyway()
            if landed is not None:
                raise guard.stop_error(f"the {landed} (and its update was not skipped)", float("nan"), step)
            if guard.skipping and (faults.actor_skipped or faults.critic_skipped
                                   or not is_finite(torch.cat([v.reshape(1) for v in mb_sums.values()]))):
                skipped += 1
                continue
            applied, weight = applied + 1, weight + mb_weight
            sums = {key: sums.get(key, 0.0) + value for key, value in mb_sums.items()}
            if first is None:
                first = (mb_sums["policy/ratio_mean"] / mb_weight.clamp_min(1.0), mb_absmax)
    means = {k: v / max(applied, 1) if k.endswith("loss") else v / weight.clamp_min(1.0) for k, v in sums.items()}
    if first is not None:
        means["policy/ratio_first"], means["policy/log_ratio_first_absmax"] = first
    out = dict(zip(means, torch.cat([v.reshape(1) for v in means.values()]).tolist() if means else [], strict=True))
    return {**out, **_engine_stats(actor, guard, skipped)}


def _engine_stats(actor: Engine, guard: NonFiniteGuard, skipped: int) -> dict[str, float]:
    """guard/skipped_updates (when skipping) and the actor's last gradient norm (when its engine knows it)."""
    out = {"guard/skipped_updates": float(skipped)} if guard.skipping else {}
    norm = engine.grad_norm(actor)
    if norm is not None and math.isfinite(norm):
        out["policy/grad_norm"] = norm
    return out


def policy_objective(logprobs: Tensor, mb: Experience, ppo: PPOCfg, kl_coef: float, num_tokens: Tensor,
                     num_seqs: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The actor's loss on micro-batch `mb` and its stats: the clipped surrogate, plus kl_coef x the k3 KL to
    the reference with `ppo.kl_in: loss`, each reduced by `ppo.loss_agg` over the minibatch's counts."""
    agg = {"loss_agg": ppo.loss_agg, "norm_len": float(ppo.max_new_tokens), "num_tokens": num_tokens,
           "num_seqs": num_seqs}
    loss, stats = ppo_policy_loss(logprobs, mb.logprobs, mb.advantages, mb.mask, ppo.clip_range, **agg)
    stats = {**stats, "policy/loss": loss.detach()}
    if ppo.kl_in == "loss":
        term, kl_stats = kl_loss(logprobs, mb.ref_logprobs, mb.mask, kl_coef, **agg)
        loss = loss + term
        stats.update(kl_stats, **{"policy/loss": loss.detach(), "policy/kl_loss": term.detach()})
    return loss, stats


def backward_step(eng: Engine, loss: Tensor, guard: NonFiniteGuard, step: int, what: str) -> tuple[bool, bool]:
    """Backward of `loss`, then the engine's step (an optimizer update at an accumulation boundary), with
    the non-finite guard around it: a non-finite loss stops the run (`run.on_nonfinite: stop`) before its
    backward, or the engine drops the step's gradients (`skip`). Returns (the loss was non-finite, the engine
    dropped its update)."""
    bad = not is_finite(loss)
    if bad and not guard.skipping:
        raise guard.stop_error(what, loss, step)
    eng.backward(loss, scale_wrt_gas=False)
    return bad, engine.step_or_skip(eng, guard.skipping)
