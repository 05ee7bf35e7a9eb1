"""One timed run of TRL 1.12.0's PPOTrainer, driven by bench/ppo_throughput.py in bench/.venv-trl112.

Inputs from the work dir: policy/ (policy, and a second copy as the explicit reference), reward/ (the
reward model, and a second copy as the value model), prompt_ids.json (token ids rendered by rlhf, all of
one length, so left-padded batches have the same shape as ours). fp32 (bf16=False), no eval generations
(num_sample_generations=0), no saving. `stop_token=None`: no EOS stop, every response has exactly
`response_length` tokens (checked on every rollout).

Batch mapping: per_device_train_batch_size = micro-batch, gradient_accumulation_steps = batch / micro,
so local_batch_size = batch; num_mini_batches and num_ppo_epochs as given; the rollout forwards run in
one chunk of `batch` (local_rollout_forward_batch_size defaults to 64 >= batch).

Timing: a TrainerCallback stamps `on_train_begin` and every `on_step_end`; the caller drops the first
interval (warm-up).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def parse_args():
    p = argparse.ArgumentParser()
    for name in ("--work", "--out"):
        p.add_argument(name, required=True)
    for name in ("--steps", "--batch", "--response-length", "--ppo-epochs", "--mini-batches", "--micro-batch",
                 "--seed"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    return p.parse_args()


def load_models(work: Path, tok, dtype):
    """policy, ref (a second copy), reward, value (a second copy of the reward model), in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    def load(kind, path):
        if kind == "lm":
            m = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        else:
            m = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=dtype)
        m.config.pad_token_id = tok.pad_token_id
        return m

    return load("lm", work / "policy"), load("lm", work / "policy"), load("seq", work / "reward"), \
        load("seq", work / "reward")


def record_generation(on_gpu: bool) -> tuple[list[int], list[float]]:
    """Wrap TRL's batch generation to record each rollout's response width and time (GPU synced)."""
    import torch
    from trl.experimental.ppo import ppo_trainer as ppo_mod

    lengths: list[int] = []
    gen_times: list[float] = []
    base_generation = ppo_mod.batch_generation

    def recording_generation(model, queries, *a, **kw):
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        query_responses, logits = base_generation(model, queries, *a, **kw)
        if on_gpu:
            torch.cuda.synchronize()
        gen_times.append(time.perf_counter() - start)
        lengths.append(int(query_responses.shape[1] - queries.shape[1]))
        return query_responses, logits

    ppo_mod.batch_generation = recording_generation
    return lengths, gen_times


def main() -> None:
    args = parse_args()

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    work = Path(args.work)
    tok = AutoTokenizer.from_pretrained(str(work / "policy"), padding_side="left")
    assert tok.pad_token_id != tok.eos_token_id
    ids = json.loads((work / "prompt_ids.json").read_text())
    dataset = Dataset.from_dict({"input_ids": ids})
    bf16 = args.dtype == "bfloat16"
    on_gpu = args.device == "cuda"
    policy, ref, reward, value = load_models(work, tok, getattr(torch, args.dtype))
    lengths, gen_times = record_generation(on_gpu)

    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            stamps.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out_dir:
        config = PPOConfig(
            output_dir=out_dir, bf16=bf16, use_cpu=not on_gpu, report_to="none", save_strategy="no", logging_steps=1,
            disable_tqdm=True, gradient_checkpointing=False, seed=args.seed,
            per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=args.batch // args.micro_batch,
            num_mini_batches=args.mini_batches, num_ppo_epochs=args.ppo_epochs,
            total_episodes=args.steps * args.batch, response_length=args.response_length,
            stop_token=None, temperature=1.0, learning_rate=1e-6, kl_coef=0.05, kl_estimator="k1",
            gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, missing_eos_penalty=1.0,
            num_sample_generations=0,
        )
        trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                             train_dataset=dataset, value_model=value, callbacks=[Stamp()])
        inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under accelerate's wrapper
        opt_steps = [0]
        base_step = inner.step

        def counting_step(*a, **kw):
            opt_steps[0] += 1
            return base_step(*a, **kw)

        inner.step = counting_step
        trainer.train()
    times = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    if len(times) != args.steps or any(n != args.response_length for n in lengths):
        raise SystemExit(f"steps {len(times)}, response lengths {lengths} (expected {args.steps} x "
                         f"{args.response_length})")
    Path(args.out).write_text(json.dumps({
        "impl": f"trl {trl.__version__} PPOTrainer",
        "step_times": times, "response_lengths": lengths,
        "response_tokens": [args.batch * n for n in lengths],
        "threads": torch.get_num_threads(), "optimizer_steps_per_rollout": opt_steps[0] / args.steps,
        "generate_times": gen_times, "peak_bytes": torch.cuda.max_memory_allocated() if on_gpu else 0,
    }))


if __name__ == "__main__":
    main()
