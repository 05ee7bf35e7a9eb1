"""PPO, the step and the run: one step is rollout -> experience -> update -> statistics (`train_step`,
read top to bottom); the run repeats it with logging, samples, checkpoints and a graceful stop on SIGTERM
or SIGUSR1 (`train`).

The phases live in `experience` (prompts to Experience) and `update` (the optimizer steps); the
models' forwards are `rlhf.forwards`, called on the engines (`rlhf.engine.wrap`); the maths is pure
(`rlhf.ppo_math`, `rlhf.losses`). The rollout samples from the actor's bare module
(`engine.gathered_for_generation`: under ZeRO-3, its parameters gathered once for the whole rollout).
Shapes as in `experience`: B = rows per rank, R = response length.
"""

from __future__ import annotations

import json
import logging
import time

import torch

from rlhf import engine
from rlhf.errors import StopRequested, TrainingError
from rlhf.guards import is_finite
from rlhf.stages.common import StageRun, agreed_stop_signal, stop_message, stop_signals
from rlhf.stages.ppo.checkpoint import save_checkpoint
from rlhf.stages.ppo.context import PPOContext
from rlhf.stages.ppo.experience import (
    Experience,
    Forwards,
    Rollout,
    blame_scores,
    experience_stats,
    forward_all,
    generate,
    make_experience,
)
from rlhf.stages.ppo.update import ppo_update

log = logging.getLogger("rlhf")
N_SAMPLES = 3


# ------------------------------------------------------------------------------------------ one step


def train_step(ctx: PPOContext) -> tuple[dict[str, float], tuple[Rollout, Experience] | None]:
    """One PPO iteration. Returns its stats (averaged over ranks) and the (rollout, experience) it learnt
    from, or None when `run.on_nonfinite: skip` dropped the rollout (a non-finite reward or KL on a rank)."""
    cfg, ppo = ctx.cfg, ctx.cfg.ppo
    start = time.perf_counter()

    # 1. Rollout: every rank draws the same global prompt batch and the actor answers this rank's share,
    # each prompt ppo.samples_per_prompt times (a group, on this rank).
    b = ppo.rollout_batch_size
    picked = ctx.sampler.take(b * engine.world_size())[engine.rank() * b:(engine.rank() + 1) * b]
    ctx.actor.eval()
    generating = time.perf_counter()
    with ctx.watch("actor"), engine.gathered_for_generation(ctx.actor) as module:
        rollout = generate(module, ctx.tokenizer, [ctx.rows[i] for i in picked], ppo,
                           cfg.data.max_prompt_length, device=ctx.device, decoder=ctx.decoder,
                           synced_gpus=engine.world_size() > 1 and engine.is_zero3(ctx.actor))
    generated = time.perf_counter()
    if ctx.decoder is not None and engine.is_zero3(ctx.actor):
        # the gathered weights move every rollout, so the graph is captured anew anyway: free the cache and
        # the graph's memory pool for the experience and update phases
        ctx.decoder.release()

    # 2. Experience: log-probs, reference log-probs, values and scores; shaped rewards, advantages (GAE, or
    # within each prompt's group without a critic).
    # ppo.reuse_rollout_forward: the update's first micro-batch backpropagates through the first chunk's actor
    # and critic forwards (`fwd.kept`), so the rows go in the update's first-epoch order (its shuffle drawn
    # here: the random stream is the one without the reuse) and the two models in its (train) mode.
    if ppo.reuse_rollout_forward:
        rollout = rollout.select(torch.randperm(len(rollout.prompts), device=ctx.device))
        ctx.actor.train()
        if ctx.critic is not None:
            ctx.critic.train()
    fwd = forward_all(rollout, ctx.actor, ctx.ref, ctx.critic, ctx.scorer, micro_batch=ppo.micro_batch_size,
                      temperature=ppo.temperature, sources=ppo.reward_sources, keep_first=ppo.reuse_rollout_forward,
                      watch=ctx.watch)
    exp = make_experience(rollout, fwd, ppo, kl_coef=ctx.kl_ctl.value, reward_stats=ctx.reward_stats,
                          reduce=engine.all_reduce_sum)
    if _skip_rollout(ctx, rollout, fwd, exp):  # no update; the KL controller keeps its value, the prompts stay used
        return {"guard/skipped_rollouts": 1.0, "perf/step_time": time.perf_counter() - start}, None
    stats = experience_stats(exp, fwd.entropy, rollout.has_eos, ctx.kl_ctl.value)
    stats["perf/generate_time"] = generated - generating  # the texts are decoded on the host: the GPU is done

    # 3. Update: clipped policy (and value) losses, ppo_epochs passes over minibatches.
    update_start = time.perf_counter()
    stats.update(ppo_update(ctx.actor, ctx.critic, exp, ppo, ctx.guard, ctx.step, watch=ctx.watch, kept=fwd.kept,
                            kl_coef=ctx.kl_ctl.value))
    stats["perf/update_time"] = time.perf_counter() - update_start  # reading its stats waits for the GPU

    # 4. Statistics over ranks, the guard's count, the KL ceiling and the KL controller's next coefficient.
    stats = _mean_over_ranks(stats, ctx.device)
    if stats.get("guard/skipped_updates", 0) > 0:
        ctx.guard.skipped("the policy or value loss", float("nan"), ctx.step)
    elif ctx.guard.skipping:
        ctx.guard.ok()
    if ppo.kl_ceiling is not None and stats["objective/kl"] > ppo.kl_ceiling:
        raise TrainingError(f"ppo: mean KL {stats['objective/kl']:.3f} exceeds ppo.kl_ceiling={ppo.kl_ceiling} at "
                            f"step {ctx.step}; the last good checkpoint in {ctx.stage.ckpt_dir} is kept; raise "
                            "kl_coef or lower the learning rate")
    n_samples = len(rollout.prompts) * engine.world_size()  # responses: b prompts x samples_per_prompt
    ctx.kl_ctl.update(stats["objective/kl"], n_samples)
    elapsed = time.perf_counter() - start
    tokens = float(exp.mask.sum()) * engine.world_size()
    stats.update({"perf/step_time": elapsed, "perf/samples_per_s": n_samples / elapsed,
                  "perf/tokens_per_s": tokens / elapsed})
    return stats, (rollout, exp)


def _skip_rollout(ctx: PPOContext, rollout: Rollout, fwd: Forwards, exp: Experience) -> bool:
    """Whether a reward score or the KL is non-finite on any rank (one collective: every rank agrees).
    With `run.on_nonfinite: stop` that ends the run; with `skip` the rollout is dropped and counted. A
    score is blamed on its source and prompt row."""
    bad = [(what, value) for what, value in (("the reward score", fwd.raw_scores), ("the KL", exp.kl))
           if not is_finite(value)]
    if bad and bad[0][0] == "the reward score":  # only then: which source, which row (a host sync per source)
        bad[0] = (blame_scores(fwd.source_scores, rollout.rows) or "the reward score", bad[0][1])
    if not engine.any_rank(bool(bad)):
        return False
    what, value = bad[0] if bad else ("the reward score or the KL (on another rank)", float("nan"))
    if not ctx.guard.skipping:
        raise ctx.guard.stop_error(what, value, ctx.step)
    ctx.guard.skipped(what, value, ctx.step)
    return True


def _mean_over_ranks(stats: dict[str, float], device) -> dict[str, float]:
    keys = sorted(stats)
    values = engine.all_reduce_sum(torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device))
    return {k: float(v) / engine.world_size() for k, v in zip(keys, values, strict=True)}


# ------------------------------------------------------------------------------------------ the run


def _log_samples(ctx: PPOContext, rollout: Rollout, exp: Experience) -> None:
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


def train(ctx: PPOContext, on_step=None) -> None:
    """Steps from the resume point to `ppo.steps`, with checkpoints, a progress bar and a graceful stop: on
    SIGTERM or SIGUSR1 every rank finishes the current step, saves a checkpoint there and raises
    `StopRequested` (exit 128 + the signal's number).

    `on_step(ctx, stats)` is called after each step (tests use it to watch or interrupt the run).
    """
    from tqdm.auto import tqdm

    ppo = ctx.cfg.ppo
    received: list[int] = []  # the stop signals this rank got, in order of arrival

    def on_stop(signum: int) -> None:  # a signal handler: only record it
        received.append(signum)

    bar = tqdm(total=ppo.steps, initial=ctx.step, desc="ppo", dynamic_ncols=True,
               disable=not (engine.is_main() and ctx.cfg.logging.progress))
    try:
        with stop_signals(on_stop):
            stop = None
            while ctx.step < ppo.steps and not stop:
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
                stop = agreed_stop_signal(received[0] if received else None)
                if stop or ctx.step % ppo.save_steps == 0 or ctx.step == ppo.steps:
                    save_checkpoint(ctx)
            # a signal after the last step's check stops every rank too (that step's checkpoint is saved)
            stop = stop or agreed_stop_signal(received[0] if received else None)
        if stop:
            raise StopRequested(stop_message("ppo", stop, ctx.step, ctx.stage.ckpt_dir), stop)
    finally:
        bar.close()
