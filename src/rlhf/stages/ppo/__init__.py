"""Stage 3: PPO in its classic form, with four models each on its own DeepSpeed settings.

actor   <- SFT output, trained (own AdamW)           ref    <- SFT output, frozen (or the LoRA actor
critic  <- reward model (default) or SFT, trained               with adapters disabled)
reward  <- reward stage output, frozen; and/or programs (`ppo.rewards`, `ppo.reward_fn`: Python functions)
           and/or reward servers (`ppo.rewards` with `url`: `rlhf serve` elsewhere; no weights here)

A critic-free `ppo.advantage` (grpo, dr_grpo, rloo, reinforce_baseline) builds no critic: three models.

This module builds the models (the actor and critic by `rlhf.ppo_models`, as `rlhf export` rebuilds them)
and the run's `context.PPOContext`, then hands over to `loop.train`. One step, top to bottom:
`loop.train_step` -> `experience` (prompts to Experience) -> `update` (the optimizer steps); `checkpoint`
saves and resumes. docs/ARCHITECTURE.md traces one step through them.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

from rlhf import artifacts, engine, models, ppo_models
from rlhf.config import REWARD_MODEL, PipelineConfig, save_resolved
from rlhf.encoding import same_tokenizer
from rlhf.errors import ConfigError
from rlhf.forwards import ScalarHead
from rlhf.programs import Program, load_program
from rlhf.remote_reward import RemoteScorer, render_text
from rlhf.stages.common import StageResult, StageRun
from rlhf.stages.ppo.checkpoint import load_checkpoint, save_checkpoint
from rlhf.stages.ppo.context import PPOContext, make_guard
from rlhf.stages.ppo.experience import PromptSampler, Scorer, make_decoder
from rlhf.stages.ppo.loop import reset_samples, train

__all__ = ["run", "save_checkpoint"]
log = logging.getLogger("rlhf")
PLOT_KEYS = ["objective/score_mean", "objective/score_raw_mean", "objective/kl", "objective/entropy",
             "policy/loss", "value/loss"]


def disable_dropout(model) -> None:
    """Dropout off everywhere: nn.Dropout modules, and float `*dropout*` attributes that modules and
    configs read at forward time (Llama attention copies `attention_dropout` from its config). With
    dropout off, the rollout and update forwards agree and the first PPO ratio is exactly 1."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        for name, value in (list(vars(config).items()) if hasattr(config, "to_dict") else ()):
            if "dropout" in name and isinstance(value, float):
                setattr(config, name, 0.0)


def _trained(model, ds, role: str, lr: float, ppo, dtype: str, device):
    """A trained engine: AdamW on the trainable parameters and a constant schedule (both checkpointed)."""
    return engine.wrap(model, ds, role, adamw=engine.AdamW(lr=lr, eps=1e-5), micro_batch=ppo.micro_batch_size,
                       grad_accum=ppo.grad_accum, max_grad_norm=ppo.max_grad_norm, dtype=dtype, device=device)


def build_models(cfg: PipelineConfig, sft_dir: str, reward_dir: str | None, tokenizer, device) -> dict:
    """actor, ref (None for a LoRA actor), critic (inside a `ScalarHead`; None for a critic-free
    `ppo.advantage`) and the scorer's reward model, each
    wrapped by `engine.wrap` on `device` (the plain engine moves it there; DeepSpeed places it on this rank's
    accelerator); the scorer (that reward engine and/or the programs and servers of `ppo.reward_sources`) and the
    reward stats. The actor and
    critic as `ppo_models.load_trained` builds them. A role at ZeRO-3 loads already partitioned over the
    ranks (`engine.partitioned_loading`)."""
    m, ppo, ds = cfg.model, cfg.ppo, cfg.deepspeed
    dtype = engine.run_dtype(cfg, device)
    common = {"trust_remote_code": m.trust_remote_code, "allow_pickle": m.allow_pickle, "dtype": dtype}

    def sharded(role: str, train: bool):
        return engine.partitioned_loading(ds, role, train=train, micro_batch=ppo.micro_batch_size,
                                          grad_accum=ppo.grad_accum if train else 1, dtype=dtype, device=device)

    trained_dtype = engine.trained_load_dtype(cfg, device)  # float32 where the engine keeps no masters
    with sharded("actor", True):
        actor, _ = ppo_models.load_trained("actor", cfg, sft_dir, reward_dir, tokenizer, dtype=trained_dtype)
    ref = None
    if not m.lora.enabled:
        with sharded("ref", False):
            ref = models.load_causal_lm(sft_dir, tokenizer=tokenizer, **common).requires_grad_(False)
    reward_tok, reward_model, stats = tokenizer, None, None
    if ppo.needs_reward_model:
        reward_tok = models.load_tokenizer(reward_dir, trust_remote_code=m.trust_remote_code)
        with sharded("reward", False):
            reward_model = models.load_scalar_model(reward_dir, tokenizer=reward_tok, require_head=True, **common)
        stats = models.load_reward_stats(reward_dir) if ppo.normalize_reward else None
        if ppo.normalize_reward and stats is None:
            log.warning("%s: no reward_stats.json; scores are used unnormalized", reward_dir)
    same = not ppo.needs_reward_model or same_tokenizer(tokenizer, reward_tok)
    if ppo.uses_critic and ppo.critic_init == "reward" and not same:
        raise ConfigError(f"{reward_dir}: the reward model's tokenizer differs from the policy's, so a critic "
                          "initialised from it cannot read policy tokens; set ppo.critic_init: sft")
    critic = None
    if ppo.uses_critic:
        with sharded("critic", True):
            critic, _ = ppo_models.load_trained("critic", cfg, sft_dir, reward_dir, tokenizer, dtype=trained_dtype)
    for model in (actor, ref, critic, reward_model):
        if model is not None:
            disable_dropout(model)
    frozen = {"micro_batch": ppo.micro_batch_size, "dtype": dtype, "device": device}
    out = {"actor": _trained(actor, ds, "actor", ppo.learning_rate, ppo, dtype, device),
           "critic": None if critic is None else _trained(ScalarHead(critic), ds, "critic", ppo.critic_learning_rate,
                                                          ppo, dtype, device),
           "ref": None if ref is None else engine.wrap(ref.eval(), ds, "ref", **frozen),
           "reward_stats": stats}
    key = "ppo.reward_fn" if ppo.reward_fn else "ppo.rewards"
    programs = [Program(r.source, load_program(r.source, key), key) for r in ppo.reward_sources if r.is_program]
    programs += [remote_scorer(r, tokenizer, ppo.normalize_reward) for r in ppo.reward_sources if r.url is not None]
    reward = None
    if reward_model is not None:
        reward = engine.wrap(ScalarHead(reward_model.requires_grad_(False)).eval(), ds, "reward", **frozen)
    out["scorer"] = Scorer(engine=reward, tokenizer=reward_tok, same_tokenizer=same, programs=programs,
                           batch_size=ppo.micro_batch_size, device=device)
    return out


def remote_scorer(src, tokenizer, normalize: bool) -> RemoteScorer:
    """The client of a `url` source; `protocol: openrlhf` renders pairs with the policy's chat template. With
    `normalize` (`ppo.normalize_reward`) its scores are standardised by the statistics the server reports
    (`rlhf serve` of a reward stage's output: its reward_stats.json), as a local reward model's are."""
    render = render_text(tokenizer) if src.protocol == "openrlhf" else None
    scorer = RemoteScorer(src.url, token_env=src.token_env, timeout_s=src.timeout_s, retries=src.retries,
                          protocol=src.protocol, render=render)
    stats = scorer.health().get("reward_stats") if normalize else None
    if normalize and not stats:
        log.warning("ppo.rewards: the reward server at %s reports no reward_stats; its scores are used unnormalized",
                    src.url)
    scorer.stats = stats or None
    log.info("ppo.rewards: scoring with the reward server at %s (protocol %s)%s", src.url, src.protocol,
             f"; scores standardised by its mean {stats['mean']:.4g} and std {stats['std']:.4g}" if stats else "")
    return scorer


def _roles(ctx: PPOContext) -> dict:
    roles = {"actor": ctx.actor, "critic": ctx.critic, "ref": ctx.ref, "reward": ctx.scorer.engine}
    return {name: eng for name, eng in roles.items() if eng is not None}


def devices(ctx: PPOContext) -> dict[str, str]:
    """Where each model's weights are (stage.json `devices`); a LoRA actor is its own reference."""
    return {name: engine.compute_device(eng) for name, eng in _roles(ctx).items()}


def write_memory_report(ctx: PPOContext) -> None:
    """<run>/ppo/memory.json: model-state elements this rank holds per role (ZeRO-3 shards vs full) and,
    on CUDA, the peak GPU memory allocated so far on this rank (`cuda_peak_allocated_bytes`)."""
    import torch

    report = {name: {**engine.local_numel(eng), "zero_stage": eng.zero_optimization_stage()}
              for name, eng in _roles(ctx).items()}
    total = sum(r["params"] + r["optimizer_state"] for r in report.values())
    out = {"world_size": engine.world_size(), "rank": engine.rank(), "device": str(ctx.device), "roles": report,
           "total_model_state_numel": total}
    if ctx.device.type == "cuda":
        out["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(ctx.device))
    if engine.is_main():
        artifacts.write_json_atomic(ctx.stage.dir / "memory.json", out)


def save_final(ctx: PPOContext, sft_dir: str) -> Path:
    """The actor as a plain HF causal LM (merged when LoRA) in final/, renamed into place. Collective:
    under ZeRO-3 every rank takes part in gathering the weights, the main rank writes."""
    cfg, stage = ctx.cfg, ctx.stage
    state = engine.full_state_dict(ctx.actor) if engine.is_zero3(ctx.actor) else None
    if engine.is_main():
        model = ctx.actor.module
        if state is not None:  # rebuild unsharded, then load the gathered weights
            model, _ = ppo_models.load_trained("actor", cfg, sft_dir, None, ctx.tokenizer, dtype=engine.run_dtype(cfg, ctx.device))
            model.load_state_dict(state)
        tmp = stage.dir / "final.tmp"
        with engine.full_precision(ctx.actor):  # the plain engine's fp32 masters, not their bf16 rounding
            models.save_pretrained_atomic(model, ctx.tokenizer, tmp)
        save_resolved(cfg, tmp / "config.resolved.yaml")
        if stage.final_dir.exists():
            shutil.rmtree(stage.final_dir)
        os.replace(tmp, stage.final_dir)
    engine.barrier()
    return stage.final_dir


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CPU and every CUDA device


def run(cfg: PipelineConfig, *, restart: bool = False, on_step=None) -> StageResult:
    """`rlhf ppo`: PPO from the SFT output (or the base model: `ppo.policy_init`) and the reward stage's
    (when a reward source or the critic reads it) to <run>/ppo/final.

    `on_step(ctx, stats)` is called after every step (tests use it to watch or interrupt a run).
    """
    from rlhf.data import load_rows
    from rlhf.ppo_math import AdaptiveKLController, FixedKLController

    sft_dir = ppo_models.policy_start(cfg, cfg.run.dir, needed_by="the ppo stage")
    reward_dir = None
    if cfg.ppo.needs_reward_stage:
        reward_dir = str(artifacts.stage_output(cfg.stage_dir("reward"), "reward", needed_by="the ppo stage",
                                                config_path=cfg.source))
    stage = StageRun(cfg, "ppo", restart=restart)
    _seed(cfg.run.seed + engine.rank())
    tokenizer = ppo_models.policy_tokenizer(cfg, sft_dir, padding_side="left")
    rows, _, data_path = load_rows(cfg, "ppo", "prompt")
    device = stage.device  # decided once, when the stage started
    built = build_models(cfg, sft_dir, reward_dir, tokenizer, device)
    ppo = cfg.ppo
    kl_ctl = (AdaptiveKLController(ppo.kl_coef, ppo.target_kl, ppo.kl_horizon) if ppo.adaptive_kl
              else FixedKLController(ppo.kl_coef))
    ctx = PPOContext(cfg=cfg, stage=stage, tokenizer=tokenizer, actor=built["actor"], critic=built["critic"],
                     ref=built["ref"], scorer=built["scorer"], kl_ctl=kl_ctl, rows=rows,
                     sampler=PromptSampler(len(rows), cfg.run.seed), reward_stats=built["reward_stats"], device=device,
                     guard=make_guard(cfg, stage), decoder=make_decoder(ppo, cfg.data.max_prompt_length))
    if stage.resume is not None:
        load_checkpoint(ctx, stage.resume)
    reset_samples(stage)

    def after_step(ctx_: PPOContext, stats: dict) -> None:
        if len(ctx_.history) == 1:
            write_memory_report(ctx_)
        if on_step is not None:
            on_step(ctx_, stats)

    train(ctx, on_step=after_step)
    write_memory_report(ctx)  # again at the end: the peak over the whole run
    save_final(ctx, sft_dir)
    if cfg.logging.plots and cfg.logging.jsonl and engine.is_main():
        from rlhf.plots import plot_curves

        plot_curves(stage.dir / "metrics.jsonl", stage.dir / "curves.png", PLOT_KEYS, "PPO")
    last = ctx.history[-1] if ctx.history else {}
    metrics = {"global_step": ctx.step, "prompts": len(rows), **{k: v for k, v in last.items()
                                                                  if k.startswith("objective/")}}
    programs = [f"fn:{r.source}" if r.is_program else f"url:{r.url}" for r in ppo.reward_sources
                if r.source != REWARD_MODEL]
    inputs = {"model": sft_dir, "data": str(data_path), "reward": ", ".join(([reward_dir] if reward_dir else []) + programs)}
    return stage.complete(metrics, inputs, ctx.step, devices=devices(ctx))
