"""One timed run of rlhf's own PPO (`rlhf.stages.ppo.run`), driven by bench/ppo_throughput.py.

The work dir holds policy/ (also the reference), reward/ (also the critic's init) and prompts.jsonl. They
are installed as completed sft and reward stage outputs of a throwaway run, then `ppo.run(cfg)` is called
with plain-torch engines. Timing: the interval between consecutive `on_step` callbacks (the first step
is timed from just before `run` and is excluded by the caller as warm-up, with loading).

Equal work: no row stops at EOS, so every response is exactly `--response-length` tokens (checked on every
rollout): HF generate gets `min_new_tokens = max_new_tokens`; the static decoder (`--generation static` or
`graph`) gets the EOS logit set to -inf before sampling, which is what `min_new_tokens` does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser()
    for name in ("--work", "--out"):
        p.add_argument(name, required=True)
    for name in ("--steps", "--batch", "--response-length", "--ppo-epochs", "--mini-batches", "--micro-batch",
                 "--seed"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--generation", default="auto", help="ppo.generation: auto, hf, static or graph")
    p.add_argument("--advantage", default="gae", help="ppo.advantage: gae, grpo, dr_grpo, rloo, reinforce_baseline")
    p.add_argument("--samples-per-prompt", type=int, default=1, help="ppo.samples_per_prompt; must divide --batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    return p.parse_args()


def make_config(args, work: Path, run_dir: Path):
    """The finished sft and reward stages of a throwaway run, and the PPO config over them."""
    from rlhf import artifacts
    from rlhf.config import config_from_dict

    shutil.rmtree(run_dir, ignore_errors=True)
    for stage, src in (("sft", work / "policy"), ("reward", work / "reward")):
        shutil.copytree(src, run_dir / "b" / stage / "final")
        artifacts.write_manifest(run_dir / "b" / stage, stage, inputs={}, config_hash="bench", metrics={})
    mini = args.batch // args.mini_batches
    settings = {"steps": args.steps, "rollout_batch_size": args.batch // args.samples_per_prompt,
                "samples_per_prompt": args.samples_per_prompt, "advantage": args.advantage, "mini_batch_size": mini,
                "grad_accum": mini // args.micro_batch, "ppo_epochs": args.ppo_epochs,
                "max_new_tokens": args.response_length, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                "learning_rate": 1e-6, "critic_learning_rate": 1e-6, "kl_coef": 0.05, "kl_estimator": "k1",
                "gamma": 1.0, "lam": 0.95, "clip_range": 0.2, "clip_range_value": 0.2,
                "missing_eos_penalty": 1.0, "critic_init": "reward",
                "max_grad_norm": 0.0,  # TRL's PPO loop does not clip gradients
                "save_steps": 10**6, "sample_every": 10**6, "generation": args.generation}
    return config_from_dict({
        "run": {"name": "b", "output_dir": str(run_dir), "seed": args.seed, "device": args.device},
        "model": {"name_or_path": str(work / "policy"), "dtype": args.dtype},
        "data": {"prompts": str(work / "prompts.jsonl"), "eval_fraction": 0.0, "max_length": 1024,
                 "max_prompt_length": 512},
        "final_stage": "ppo", "ppo": settings, "deepspeed": {"enabled": False},
        "logging": {"progress": False, "tensorboard": False, "plots": False},
    }, source="bench")


def fix_response_length(work: Path) -> list[int]:
    """No early stop at EOS on either sampling path, so every response has exactly max_new_tokens tokens.
    Returns the list each rollout's response width is appended to."""
    import torch

    from rlhf import generation
    from rlhf.stages.ppo import loop

    base_config = generation.hf_config

    def fixed_length_config(tokenizer, sampling, max_new_tokens):
        gen = base_config(tokenizer, sampling, max_new_tokens)
        gen.min_new_tokens = max_new_tokens
        return gen

    generation.hf_config = fixed_length_config
    base_warp = generation.warp_logits
    eos = json.loads((work / "policy" / "config.json").read_text())["eos_token_id"]
    eos_ids = eos if isinstance(eos, list) else [eos]

    def no_eos_warp(logits, sampling):
        return base_warp(logits.index_fill(-1, torch.tensor(eos_ids, device=logits.device), float("-inf")),
                         sampling)

    generation.warp_logits = no_eos_warp
    lengths: list[int] = []
    base_generate = loop.generate

    def recording_generate(*a, **kw):
        out = base_generate(*a, **kw)
        lengths.append(int(out.response_ids.shape[1]))
        return out

    loop.generate = recording_generate
    return lengths


def main() -> None:
    args = parse_args()

    import resource

    import torch

    from rlhf.stages import ppo

    work = Path(args.work)
    run_dir = work / "ours_run"
    cfg = make_config(args, work, run_dir)
    lengths = fix_response_length(work)
    stamps: list[float] = []
    stats_seen: list[dict] = []
    trained: list[int] = []

    def on_step(ctx, stats):
        stamps.append(time.perf_counter())
        stats_seen.append(stats)
        if not trained:
            trained.append(sum(p.numel() for eng in (ctx.actor, ctx.critic) if eng is not None
                               for p in eng.module.parameters() if p.requires_grad))

    prompt_len = json.loads((work / ".ready").read_text())["prompt_len"]
    start = time.perf_counter()
    ppo.run(cfg, on_step=on_step)
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    if any(n != args.response_length for n in lengths):
        raise SystemExit(f"response lengths {lengths} != {args.response_length}")
    Path(args.out).write_text(json.dumps({
        "impl": f"rlhf (own PPO loop, plain torch engines, advantage {args.advantage}, "
                f"{args.samples_per_prompt} samples per prompt)",
        "step_times": times, "response_lengths": lengths,
        "response_tokens": [args.batch * n for n in lengths],
        "counted_tokens": [s["rollout/response_length"] * args.batch for s in stats_seen],
        "threads": torch.get_num_threads(), "optimizer_steps_per_rollout": args.ppo_epochs * args.mini_batches,
        "ratio_first": [s.get("policy/ratio_first") for s in stats_seen],
        "generate_times": [s["perf/generate_time"] for s in stats_seen],
        "update_times": [s["perf/update_time"] for s in stats_seen],
        # 6 x trained parameters (actor, and the critic where there is one) x tokens through them in the
        # update: every row's whole sequence (prompt + response), once per PPO epoch
        "update_flops": [6 * trained[0] * args.batch * (prompt_len + n) * args.ppo_epochs for n in lengths],
        "peak_bytes": torch.cuda.max_memory_allocated() if args.device == "cuda" else 0,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
    }))
    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
