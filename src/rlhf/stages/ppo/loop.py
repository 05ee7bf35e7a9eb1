"""The PPO loop: one step = rollout -> experience -> update; checkpoints, resume, guards, logging.

Shapes as in `experience`: B = rows per rank, R = response length.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlhf import artifacts, engine
from rlhf.advantages import KLController
from rlhf.config import PipelineConfig
from rlhf.engine import Engine
from rlhf.errors import StopRequested, TrainingError
from rlhf.guards import NonFiniteGuard, is_finite
from rlhf.losses import logprobs_from_logits, ppo_policy_loss, ppo_value_loss
from rlhf.replicate import replicate
from rlhf.stages.common import StageRun, save_failed
from rlhf.stages.ppo.experience import (
    Experience,
    LiveForward,
    Scorer,
    experience_stats,
    forward_all,
    make_experience,
    policy_logits,
    values_of,
)
from rlhf.stages.ppo.rollout import PromptSampler, generate, make_decoder

log = logging.getLogger("rlhf")
KEEP_CHECKPOINTS = 2
N_SAMPLES = 3


@dataclass
class PPOContext:
    """The live objects of one PPO run."""

    cfg: PipelineConfig
    stage: StageRun
    tokenizer: Any
    actor: Engine  # with optimizer
    critic: Engine  # with optimizer
    ref: Engine | None  # inference engine, or None: LoRA actor with adapters disabled
    scorer: Scorer
    kl_ctl: KLController
    rows: list[dict]
    sampler: PromptSampler
    reward_stats: dict | None
    device: Any = None  # torch.device: the run's device (engine.device); every tensor the loop builds lives there
    step: int = 0
    stop_requested: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    guard: Any = None  # rlhf.guards.NonFiniteGuard
    decoder: Any = None  # rlhf.generation.StaticDecoder for ppo.generation static|graph, else None (HF generate)

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = torch.device("cpu")
        if self.decoder is None:
            self.decoder = make_decoder(self.cfg.ppo, self.cfg.data.max_prompt_length, self.device)
        if self.guard is None:
            self.guard = make_guard(self.cfg, self.stage)


def watch(ctx: PPOContext, role: str):
    """Around one model's work: a CUDA out-of-memory error becomes one line naming the role (exit 3)."""
    from rlhf.guards import catch_oom

    return catch_oom("ppo", role, ctx.stage.ckpt_dir, ctx.cfg.source)


# ------------------------------------------------------------------------------------------ update


def _train_micro(ctx: PPOContext, mb: Experience, num_tokens: Tensor,
                 live: LiveForward | None = None) -> tuple[dict[str, float], dict[str, bool]]:
    """Forward, loss and backward of one micro-batch for actor then critic; `step()` applies the update
    at the end of the minibatch (the engines count accumulation boundaries). Losses are not scaled by
    1/grad_accum: they are already divided by the token count of the whole minibatch. With `live` (the
    rollout's forwards of these very rows, graphs attached) the two forwards are not run again.

    Returns (stats, flags): flags say which loss was non-finite and which engine skipped its update."""
    ppo = ctx.cfg.ppo
    skip = ctx.guard.skipping
    with watch(ctx, "actor"):
        if live is not None:
            logprobs = live.logprobs
        else:
            logits = policy_logits(ctx.actor, mb.input_ids, mb.attention_mask, mb.position_ids, mb.prompt_len,
                                   ppo.temperature)
            logprobs = logprobs_from_logits(logits, mb.response_ids)
            del logits
        pg_loss, pg_stats = ppo_policy_loss(logprobs, mb.logprobs, mb.advantages, mb.mask, ppo.clip_range,
                                            num_tokens=num_tokens)
        flags = {"policy loss": not is_finite(pg_loss)}
        if flags["policy loss"] and not skip:
            raise ctx.guard.stop_error("the policy loss", pg_loss, ctx.step)
        ctx.actor.backward(pg_loss, scale_wrt_gas=False)
        flags["actor skipped"] = engine.step_or_skip(ctx.actor, skip)
    with watch(ctx, "critic"):
        if live is not None:
            values = live.values
        else:
            values = values_of(ctx.critic.module, mb.input_ids, mb.attention_mask, mb.position_ids, mb.prompt_len)
        vf_loss, vf_stats = ppo_value_loss(values, mb.values, mb.returns, mb.mask, ppo.clip_range_value,
                                           num_tokens=num_tokens)
        flags["value loss"] = not is_finite(vf_loss)
        if flags["value loss"] and not skip:
            raise ctx.guard.stop_error("the value loss", vf_loss, ctx.step)
        ctx.critic.backward(vf_loss, scale_wrt_gas=False)
        flags["critic skipped"] = engine.step_or_skip(ctx.critic, skip)
    out = {k: v.item() for k, v in {**pg_stats, **vf_stats}.items()}
    out.update({"policy/loss": pg_loss.item(), "value/loss": vf_loss.item()})
    log_ratio = torch.where(mb.mask.bool(), logprobs.detach() - mb.logprobs, 0.0)
    out["policy/log_ratio_absmax"] = log_ratio.abs().max().item()
    return out, flags


def _minibatch(ctx: PPOContext, exp: Experience, mb_idx: Tensor, live: LiveForward | None = None):
    """One optimizer step over the rows `mb_idx`: (weighted stat sums, token weight, (ratio mean, max |log
    ratio|)), or None when its update was skipped (`run.on_nonfinite: skip`). `live` serves the first
    micro-batch, whose rows must then be exactly the first `live.rows` rows of the rollout."""
    tokens = engine.all_reduce_sum(exp.mask[mb_idx].sum().reshape(1).clone())
    num_tokens = tokens.clamp_min(1.0) / engine.world_size()  # DeepSpeed averages grads over ranks
    mb_ratio, mb_weight, mb_dev = 0.0, 0.0, 0.0
    mb_totals: dict[str, float] = {}
    bad: dict[str, bool] = {}
    for micro_idx in mb_idx.split(ctx.cfg.ppo.micro_batch_size):
        mb = exp.select(micro_idx)
        weight = float(mb.mask.sum())
        if live is not None and not torch.equal(micro_idx, torch.arange(live.rows, device=ctx.device)):
            raise AssertionError("the reused rollout forward does not match the first micro-batch's rows")
        stats, flags = _train_micro(ctx, mb, num_tokens, live)
        live = None
        bad = {k: bad.get(k, False) or v for k, v in flags.items()}
        mb_dev = max(mb_dev, stats.pop("policy/log_ratio_absmax"))
        for key, value in stats.items():
            # losses are already shares of the minibatch mean: sum them; stats are token means
            mb_totals[key] = mb_totals.get(key, 0.0) + (value if key.endswith("/loss") else value * weight)
        mb_ratio += stats["policy/ratio_mean"] * weight
        mb_weight += weight
    for loss, skip_flag in (("policy loss", "actor skipped"), ("value loss", "critic skipped")):
        if bad[loss] and not bad[skip_flag]:  # a non-finite loss whose update was applied anyway
            raise ctx.guard.stop_error(f"the {loss} (and its update was not skipped)", float("nan"), ctx.step)
    if ctx.guard.skipping and (bad["actor skipped"] or bad["critic skipped"]
                               or not all(map(math.isfinite, mb_totals.values()))):
        return None
    return mb_totals, mb_weight, (mb_ratio / max(mb_weight, 1.0), mb_dev)


def ppo_update(ctx: PPOContext, exp: Experience) -> dict[str, float]:
    """`ppo_epochs` passes over shuffled minibatches; each minibatch is one optimizer step made of
    micro-batches whose losses are divided by the token count of the whole minibatch (over all ranks),
    so the step optimizes the minibatch's token mean however it is split.

    With a `LiveForward` on `exp`, the rows are already in the first epoch's shuffled order (drawn by
    `rollout_step`, so the random stream is the same as without it), and the first micro-batch reuses
    its forwards. Also returns policy/ratio_first (token-mean ratio of the first minibatch of the first epoch) and
    policy/log_ratio_first_absmax (its largest |log ratio|): 1 and 0 when rollout and update agree.
    With `run.on_nonfinite: skip`, a minibatch with a non-finite loss applies no update (guard/skipped_updates
    counts them) and its stats are left out of the means.
    """
    ppo = ctx.cfg.ppo
    ctx.actor.train()
    ctx.critic.train()
    totals: dict[str, float] = {}
    weight_sum = 0.0
    first_ratio = None
    n_minibatches, skipped = 0, 0
    live, exp.live = exp.live, None  # used once, then its graphs are freed
    n_rows = exp.input_ids.shape[0]
    for _epoch in range(ppo.ppo_epochs):
        # with `live`, rollout_step already drew this epoch's shuffle and put the rows in its order
        order = (torch.arange(n_rows, device=ctx.device) if live is not None
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
    out = {k: (v / max(n_minibatches, 1) if k.endswith("/loss") else v / max(weight_sum, 1.0))
           for k, v in totals.items()}
    if first_ratio is not None:
        out["policy/ratio_first"], out["policy/log_ratio_first_absmax"] = first_ratio
    if ctx.guard.skipping:
        out["guard/skipped_updates"] = float(skipped)
    norm = engine.grad_norm(ctx.actor)
    if norm is not None and math.isfinite(norm):
        out["policy/grad_norm"] = norm
    return out


# ------------------------------------------------------------------------------------------ one step


def rollout_step(ctx: PPOContext):
    """Sample prompts, generate, score: (Rollout, Experience, stats), or None when a reward score or the KL
    is non-finite on any rank and `run.on_nonfinite` is `skip` (all ranks agree; with `stop` it raises)."""
    cfg, ppo = ctx.cfg, ctx.cfg.ppo
    b = ppo.rollout_batch_size
    picked = ctx.sampler.take(b * engine.world_size())[engine.rank() * b:(engine.rank() + 1) * b]
    prompts = [ctx.rows[i]["prompt"] for i in picked]
    ctx.actor.eval()
    synced = engine.world_size() > 1 and engine.is_zero3(ctx.actor)
    started = time.perf_counter()
    with watch(ctx, "actor"), engine.gathered_for_generation(ctx.actor) as module:
        rollout = generate(module, ctx.tokenizer, prompts, ppo, cfg.data.max_prompt_length, synced_gpus=synced,
                           device=ctx.device, decoder=ctx.decoder)
    generated = time.perf_counter()
    if ppo.reuse_rollout_forward:
        # the first epoch's shuffle, drawn now: its first micro-batch is then the first forward chunk
        rollout = rollout.select(torch.randperm(len(prompts), device=ctx.device))
        ctx.actor.train()  # the update's mode for the forward it hands over (dropout is off in both)
        ctx.critic.train()
    fwd = forward_all(rollout, ctx.actor, ctx.ref, ctx.critic, ctx.scorer, micro_batch=ppo.micro_batch_size,
                      temperature=ppo.temperature, keep_first=ppo.reuse_rollout_forward,
                      watch=lambda role: watch(ctx, role))
    exp = make_experience(rollout, fwd, ppo, kl_coef=ctx.kl_ctl.value, reward_stats=ctx.reward_stats,
                          reduce=engine.all_reduce_sum)
    bad = [(what, value) for what, value in (("the reward score", fwd.raw_scores), ("the KL", exp.kl))
           if not is_finite(value)]
    if engine.any_rank(bool(bad)):  # one collective; every rank takes the same branch
        what, value = bad[0] if bad else ("the reward score or the KL (on another rank)", float("nan"))
        if not ctx.guard.skipping:
            raise ctx.guard.stop_error(what, value, ctx.step)
        ctx.guard.skipped(what, value, ctx.step)
        return None
    stats = experience_stats(exp, fwd.entropy, rollout.has_eos, ctx.kl_ctl.value)
    stats["perf/generate_time"] = generated - started  # the texts are decoded on the host: the GPU is done
    return rollout, exp, stats


def _mean_over_ranks(stats: dict[str, float], device) -> dict[str, float]:
    keys = sorted(stats)
    values = engine.all_reduce_sum(torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device))
    return {k: float(v) / engine.world_size() for k, v in zip(keys, values, strict=True)}


def train_step(ctx: PPOContext) -> tuple[dict[str, float], Any]:
    """One PPO iteration; returns (stats averaged over ranks, (rollout, experience) or None if skipped)."""
    start = time.perf_counter()
    result = rollout_step(ctx)
    if result is None:  # skipped: no update, the KL controller keeps its value, the prompts stay consumed
        stats = {"guard/skipped_rollouts": 1.0, "perf/step_time": time.perf_counter() - start}
        return stats, None
    rollout, exp, stats = result
    update_start = time.perf_counter()
    stats.update(ppo_update(ctx, exp))
    stats["perf/update_time"] = time.perf_counter() - update_start  # its stats' .item() calls wait for the GPU
    stats = _mean_over_ranks(stats, ctx.device)
    if stats.get("guard/skipped_updates", 0) > 0:
        ctx.guard.skipped("the policy or value loss", float("nan"), ctx.step)
    elif ctx.guard.skipping:
        ctx.guard.ok()
    kl_ceiling = ctx.cfg.ppo.kl_ceiling
    if kl_ceiling is not None and stats["objective/kl"] > kl_ceiling:
        raise TrainingError(f"ppo: mean KL {stats['objective/kl']:.3f} exceeds ppo.kl_ceiling={kl_ceiling} at step "
                            f"{ctx.step}; the last good checkpoint in {ctx.stage.ckpt_dir} is kept; raise kl_coef "
                            "or lower the learning rate")
    n_samples = ctx.cfg.ppo.rollout_batch_size * engine.world_size()
    ctx.kl_ctl.update(stats["objective/kl"], n_samples)
    elapsed = time.perf_counter() - start
    tokens = float(exp.mask.sum()) * engine.world_size()
    stats.update({"perf/step_time": elapsed, "perf/samples_per_s": n_samples / elapsed,
                  "perf/tokens_per_s": tokens / elapsed})
    return stats, (rollout, exp)


# ------------------------------------------------------------------------------------------ checkpoints


def rng_state(device) -> tuple[dict, dict[str, Tensor]]:
    """This rank's random state: Python and NumPy (JSON-able) and torch's CPU generator, plus the CUDA
    generator of `device` when it is a GPU (sampling and shuffles on the GPU draw from it)."""
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    plain = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, Tensor], device) -> None:
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["cuda"], device)
    elif "cuda" in tensors or device.type == "cuda":
        log.warning("ppo: resuming on %s from a checkpoint saved %s a GPU: the GPU's random stream starts "
                    "from the seed", device, "on" if "cuda" in tensors else "without")


def save_checkpoint(ctx: PPOContext) -> Path:
    """checkpoint-<step>/: actor/ and critic/ (weights, optimizer, scheduler), trainer_state.json
    (step, KL controller, reward stats, sampler position) and per-rank RNG states; then the
    completion marker, and only the last KEEP_CHECKPOINTS are kept. Collective."""
    from safetensors.torch import save_file

    path = ctx.stage.ckpt_dir / f"checkpoint-{ctx.step}"
    if engine.is_main() and path.exists():
        shutil.rmtree(path)
    engine.barrier()
    try:
        engine.save_engine(ctx.actor, path / "actor")
        engine.save_engine(ctx.critic, path / "critic")
        plain, tensors = rng_state(ctx.device)
        rank = engine.rank()
        artifacts.write_json_atomic(path / f"rng-{rank}.json", plain)
        save_file(tensors, str(path / f"rng-{rank}.safetensors"))
        if engine.is_main():
            artifacts.write_json_atomic(path / "trainer_state.json", {
                "step": ctx.step, "kl_controller": ctx.kl_ctl.state_dict(), "reward_stats": ctx.reward_stats,
                "sampler": ctx.sampler.state_dict(), "world_size": engine.world_size()})
        engine.barrier()
        if engine.is_main():
            artifacts.mark_checkpoint_complete(path, ctx.step)
    except Exception as err:  # disk full, file-size limit, unwritable dir: one line, previous checkpoint kept
        failure = save_failed(path, "the checkpoint", err, artifacts.latest_checkpoint(ctx.stage.ckpt_dir))
        if failure is None:
            raise
        raise failure from err
    if engine.is_main():
        for old in artifacts.list_checkpoints(ctx.stage.ckpt_dir)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    engine.barrier()
    replicate(ctx.cfg.run.dir, [path], prune=ctx.stage.ckpt_dir)
    return path


def load_checkpoint(ctx: PPOContext, path: Path) -> None:
    from safetensors.torch import load_file

    engine.load_engine(ctx.actor, path / "actor")
    engine.load_engine(ctx.critic, path / "critic")
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    ctx.step = int(state["step"])
    ctx.kl_ctl.load_state_dict(state["kl_controller"])
    ctx.sampler.load_state_dict(state["sampler"])
    if state.get("reward_stats") is not None:
        ctx.reward_stats = state["reward_stats"]
    rng = path / f"rng-{engine.rank()}.json"
    if rng.is_file():  # absent when resuming with more ranks than saved: those start from the seed
        set_rng_state(json.loads(rng.read_text(encoding="utf-8")), load_file(str(rng.with_suffix(".safetensors"))),
                      ctx.device)


# ------------------------------------------------------------------------------------------ run loop


def _log_samples(ctx: PPOContext, rollout, exp: Experience) -> None:
    if not engine.is_main():
        return
    rows = []
    for i in range(min(N_SAMPLES, len(rollout.responses))):
        prompt = rollout.prompts[i]
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        rows.append({"step": ctx.step, "prompt": text, "response": rollout.responses[i],
                     "score": float(exp.scores[i])})
    with open(ctx.stage.dir / "samples.jsonl", "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    md = "\n\n".join(f"**prompt:** {r['prompt']}  \n**response:** {r['response']}  \n**score:** {r['score']:.3f}"
                     for r in rows)
    ctx.stage.metrics.text(ctx.step, "samples", md)


def reset_samples(stage: StageRun) -> None:
    """Drop sample lines written after the checkpoint a run resumes from (all of them on a fresh start)."""
    path = stage.dir / "samples.jsonl"
    if not engine.is_main() or not path.exists():
        return
    keep = stage.resume_step or 0
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if json.loads(line)["step"] <= keep]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def make_guard(cfg: PipelineConfig, stage: StageRun) -> NonFiniteGuard:
    return NonFiniteGuard("ppo", cfg.run.on_nonfinite, cfg.run.max_consecutive_skips, stage.ckpt_dir,
                          "Lower ppo.learning_rate or raise ppo.kl_coef, or check the reward")


def _on_sigterm(ctx: PPOContext):
    def handler(signum, frame):  # Slurm and Kubernetes send SIGTERM before preemption
        ctx.stop_requested = True

    return handler


def train(ctx: PPOContext, on_step=None) -> None:
    """Steps from the resume point to `ppo.steps`, with checkpoints, SIGTERM stop and a progress bar.

    `on_step(ctx, stats)` is called after each step (tests use it to watch or interrupt the run).
    """
    from tqdm.auto import tqdm

    ppo = ctx.cfg.ppo
    previous = signal.signal(signal.SIGTERM, _on_sigterm(ctx))
    bar = tqdm(total=ppo.steps, initial=ctx.step, desc="ppo", dynamic_ncols=True,
               disable=not (engine.is_main() and ctx.cfg.logging.progress))
    try:
        while ctx.step < ppo.steps:
            ctx.step += 1
            stats, done = train_step(ctx)
            if ctx.guard.skipping:
                stats["guard/skipped_steps"] = float(ctx.guard.total)
            ctx.stage.metrics.log(ctx.step, stats)
            ctx.history.append(stats)
            if done is not None and (ctx.step % ppo.sample_every == 0 or ctx.step == 1):
                _log_samples(ctx, *done)
            bar.update(1)
            if done is not None:
                bar.set_postfix(score=f"{stats['objective/score_mean']:.3f}", kl=f"{stats['objective/kl']:.3f}")
            if on_step is not None:
                on_step(ctx, stats)
            stop = engine.any_rank(ctx.stop_requested)
            if stop or ctx.step % ppo.save_steps == 0 or ctx.step == ppo.steps:
                save_checkpoint(ctx)
            if stop:
                raise StopRequested(f"ppo: stopped on SIGTERM at step {ctx.step} after saving a checkpoint in "
                                    f"{ctx.stage.ckpt_dir}; resume with the same command")
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous)
