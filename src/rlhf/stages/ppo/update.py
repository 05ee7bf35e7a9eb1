"""PPO, phase 2: the update. `ppo_epochs` passes over shuffled minibatches of one `Experience`; each
minibatch is one optimizer step of the actor and one of the critic, made of micro-batches.

    for epoch: for minibatch: for micro-batch:
        actor log-probs -> clipped policy loss -> backward      (`ppo_math.ppo_policy_loss`)
        critic values   -> clipped value loss  -> backward      (`ppo_math.ppo_value_loss`)
    step both engines at the minibatch's end (`optimizer_step`: the guard against non-finite losses)

Micro-batch losses are divided by the token count of the whole minibatch over all ranks (not by
grad_accum), so a step optimizes the minibatch's token mean however it is split.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rlhf import engine
from rlhf.guards import is_finite
from rlhf.losses import logprobs_from_logits
from rlhf.ppo_math import ppo_policy_loss, ppo_value_loss
from rlhf.stages.ppo.experience import Experience, LiveForward, policy_logits, values_of

if TYPE_CHECKING:
    from rlhf.engine import Engine
    from rlhf.stages.ppo.loop import PPOContext


def ppo_update(ctx: PPOContext, exp: Experience) -> dict[str, float]:
    """All optimizer steps of one PPO iteration; returns the token-weighted mean stats of the applied ones.

    With a `LiveForward` on `exp` (`experience.rollout_forwards`), the rows are already in the first
    epoch's shuffled order and the first micro-batch reuses those forwards. Also returns policy/ratio_first
    (token-mean ratio of the first minibatch of the first epoch) and policy/log_ratio_first_absmax (its
    largest |log ratio|): 1 and 0 when rollout and update agree. With `run.on_nonfinite: skip`, a minibatch
    with a non-finite loss applies no update (guard/skipped_updates counts them) and its stats are left out.
    """
    ppo = ctx.cfg.ppo
    ctx.actor.train()
    ctx.critic.train()
    totals: dict[str, Tensor] = {}  # on the device, float64: read on the host once, at the end
    weight_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    first_ratio, n_minibatches, skipped = None, 0, 0
    live, exp.live = exp.live, None  # used once, then its graphs are freed
    n_rows = exp.input_ids.shape[0]
    for _epoch in range(ppo.ppo_epochs):
        order = (torch.arange(n_rows, device=ctx.device) if live is not None  # already in this epoch's order
                 else torch.randperm(n_rows, device=ctx.device))
        for start in range(0, len(order), ppo.mini_batch_size):
            result = _minibatch(ctx, exp, order[start:start + ppo.mini_batch_size], live)
            live = None
            if result is None:
                skipped += 1
                continue
            mb_totals, mb_weight, mb_first = result
            n_minibatches += 1
            weight_sum += mb_weight
            for key, value in mb_totals.items():
                totals[key] = totals.get(key, 0.0) + value
            first_ratio = first_ratio or mb_first
    means = {k: (v / max(n_minibatches, 1) if k.endswith("/loss") else v / weight_sum.clamp_min(1.0))
             for k, v in totals.items()}
    if first_ratio is not None:
        means["policy/ratio_first"], means["policy/log_ratio_first_absmax"] = first_ratio
    keys = list(means)
    values = torch.cat([means[k].double().reshape(1) for k in keys]).tolist() if keys else []
    out = dict(zip(keys, values, strict=True))
    if ctx.guard.skipping:
        out["guard/skipped_updates"] = float(skipped)
    norm = engine.grad_norm(ctx.actor)
    if norm is not None and math.isfinite(norm):
        out["policy/grad_norm"] = norm
    return out


def _minibatch(ctx: PPOContext, exp: Experience, mb_idx: Tensor, live: LiveForward | None):
    """One optimizer step over the rows `mb_idx`: (weighted stat sums, token weight, (ratio mean, max |log
    ratio|)), or None when its update was skipped (`run.on_nonfinite: skip`). `live` serves the first
    micro-batch, whose rows must then be exactly the first `live.rows` rows of the rollout."""
    tokens = engine.all_reduce_sum(exp.mask[mb_idx].sum().reshape(1).clone())
    num_tokens = tokens.clamp_min(1.0) / engine.world_size()  # DeepSpeed averages grads over ranks
    mb_ratio, mb_weight, mb_dev = 0.0, 0.0, 0.0  # become device tensors: no host sync per micro-batch
    mb_totals: dict[str, Tensor] = {}
    bad: dict[str, bool] = {}
    for micro_idx in mb_idx.split(ctx.cfg.ppo.micro_batch_size):
        mb = exp.select(micro_idx)
        weight = mb.mask.sum().double()
        if live is not None and not torch.equal(micro_idx, torch.arange(live.rows, device=ctx.device)):
            raise AssertionError("the reused rollout forward does not match the first micro-batch's rows")
        stats, flags = _train_micro(ctx, mb, num_tokens, live)
        live = None
        bad = {k: bad.get(k, False) or v for k, v in flags.items()}
        mb_dev = torch.maximum(torch.as_tensor(mb_dev, device=weight.device), stats.pop("policy/log_ratio_absmax"))
        for key, value in stats.items():
            # losses are already shares of the minibatch mean: sum them; stats are token means
            mb_totals[key] = mb_totals.get(key, 0.0) + (value if key.endswith("/loss") else value * weight)
        mb_ratio += stats["policy/ratio_mean"] * weight
        mb_weight += weight
    for loss, skip_flag in (("policy loss", "actor skipped"), ("value loss", "critic skipped")):
        if bad[loss] and not bad[skip_flag]:  # a non-finite loss whose update was applied anyway
            raise ctx.guard.stop_error(f"the {loss} (and its update was not skipped)", float("nan"), ctx.step)
    if ctx.guard.skipping and (bad["actor skipped"] or bad["critic skipped"]
                               or not is_finite(torch.cat([v.reshape(1) for v in mb_totals.values()]))):
        return None
    return mb_totals, mb_weight, (mb_ratio / mb_weight.clamp_min(1.0), mb_dev)


def _train_micro(ctx: PPOContext, mb: Experience, num_tokens: Tensor,
                 live: LiveForward | None) -> tuple[dict[str, Tensor], dict[str, bool]]:
    """Forward, loss and backward of one micro-batch for actor then critic; each engine applies the update
    at the minibatch's end (it counts accumulation boundaries). With `live` (the rollout's forwards of these
    very rows, graphs attached) the two forwards are not run again.

    Returns (stats, flags): stats as float64 device tensors (no host sync); flags say which loss was
    non-finite and which engine skipped its update."""
    ppo = ctx.cfg.ppo
    with ctx.watch("actor"):
        if live is not None:
            logprobs = live.logprobs
        else:
            logits = policy_logits(ctx.actor, mb.input_ids, mb.attention_mask, mb.position_ids, mb.prompt_len,
                                   ppo.temperature)
            logprobs = logprobs_from_logits(logits, mb.response_ids)
            del logits
        pg_loss, pg_stats = ppo_policy_loss(logprobs, mb.logprobs, mb.advantages, mb.mask, ppo.clip_range,
                                            num_tokens=num_tokens)
        bad_pg, actor_skipped = optimizer_step(ctx, ctx.actor, pg_loss, "the policy loss")
    with ctx.watch("critic"):
        if live is not None:
            values = live.values
        else:
            values = values_of(ctx.critic, mb.input_ids, mb.attention_mask, mb.position_ids, mb.prompt_len)
        vf_loss, vf_stats = ppo_value_loss(values, mb.values, mb.returns, mb.mask, ppo.clip_range_value,
                                           num_tokens=num_tokens)
        bad_vf, critic_skipped = optimizer_step(ctx, ctx.critic, vf_loss, "the value loss")
    out = {k: v.detach().double() for k, v in {**pg_stats, **vf_stats}.items()}
    out.update({"policy/loss": pg_loss.detach().double(), "value/loss": vf_loss.detach().double()})
    log_ratio = torch.where(mb.mask.bool(), logprobs.detach() - mb.logprobs, 0.0)
    out["policy/log_ratio_absmax"] = log_ratio.abs().max().double()
    return out, {"policy loss": bad_pg, "actor skipped": actor_skipped,
                 "value loss": bad_vf, "critic skipped": critic_skipped}


def optimizer_step(ctx: PPOContext, eng: Engine, loss: Tensor, what: str) -> tuple[bool, bool]:
    """Backward of `loss`, then the engine's step (an optimizer update at an accumulation boundary), with
    the non-finite guard around it: a non-finite loss stops the run (`run.on_nonfinite: stop`), or the
    engine drops the step's gradients (`skip`). Returns (the loss was non-finite, the engine skipped)."""
    skip = ctx.guard.skipping
    bad = not is_finite(loss)
    if bad and not skip:
        raise ctx.guard.stop_error(what, loss, ctx.step)
    eng.backward(loss, scale_wrt_gas=False)
    return bad, engine.step_or_skip(eng, skip)
