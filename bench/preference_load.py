"""Reading, validating and tokenizing a large preference file: the package's path vs plain `datasets`.

    python bench/preference_load.py                      # 200,000 pairs, data.max_length 128
    python bench/preference_load.py --rows 20000 --rounds 3
    python bench/preference_load.py --stage              # and `rlhf reward` up to its first training step

Writes, in a temporary dir, a seeded JSONL of prompt/chosen/rejected pairs of HH-RLHF-like size (200,000
pairs in 146 MB, about the size of HH-RLHF's train split; plain-text prompts of 275 characters on average,
replies of about 200) and the tiny test tokenizer (`rlhf.tiny.build_tiny`, byte-level BPE of 1000 tokens with the
ChatML template). Each path then runs in a fresh subprocess, timed from the start of reading to a tokenized
training `datasets.Dataset`:

- ours: what `rlhf reward` does before it builds its Trainer: `rlhf.data.load_rows` (read, validate and
  normalize every row, hold out `eval_fraction` 0.2), the training pairs through the reward stage's
  encoder into a Dataset (`encoding.encoded_dataset`), the held-out set (`heldout.select`, 2000 pairs);
- peer: `datasets.load_dataset("json")` (Arrow's JSON reader, no validation), `train_test_split(0.2)`,
  the training split through `Dataset.map(batched=True)` with the same tokenizer calls (the prompt through
  the chat template, each reply tokenized alone plus EOS), then `filter` at max_length.

Each prints seconds, rows/s (file rows over seconds), the training pairs kept (the two splits differ, so
the counts differ a little), and its peak resident memory (whole process, imports included, and above what
it held before reading). With several rounds the paths alternate and the medians count. `--stage` runs `rlhf reward` (reward.max_steps=2) on the same file
in a subprocess and prints when its first training step started, counted from the command's start, and
how long its held-out check took. The last line is `ratio ours/peer rows/s: X`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVAL_FRACTION, SEED = 0.2, 0


def write_pairs(path: Path, n_rows: int, seed: int) -> None:
    """`n_rows` prompt/chosen/rejected pairs of sentences drawn from the tiny corpus's words, with lognormal
    sentence counts (a long tail, as in HH-RLHF); the same seed writes the same file."""
    import numpy as np

    from rlhf import tiny

    rng = np.random.default_rng(seed)
    words = sorted({w.strip(".,;:?!()[]{}'\"").lower() for line in tiny.default_corpus() for w in line.split()})
    words = [w for w in words if w.isalnum()]
    sentences = []
    for _ in range(4000):
        s = " ".join(words[i] for i in rng.integers(0, len(words), int(rng.integers(5, 15))))
        sentences.append(s[0].upper() + s[1:] + ".")

    def text(n_sentences: int) -> str:
        return " ".join(sentences[i] for i in rng.integers(0, len(sentences), n_sentences))

    counts = [np.maximum(1, rng.lognormal(np.log(median), 0.8, n_rows).astype(int))
              for median in (3.3, 2.5, 2.3)]  # prompt, chosen, rejected
    with open(path, "w", encoding="utf-8") as f:
        for n_prompt, n_chosen, n_rejected in zip(*counts, strict=True):
            chosen, rejected = text(n_chosen), text(n_rejected)
            while rejected == chosen:  # a pair needs two different replies
                rejected = text(n_rejected)
            f.write(json.dumps({"prompt": text(n_prompt), "chosen": chosen, "rejected": rejected}) + "\n")


def _peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ours(data: Path, tokenizer_dir: Path, max_length: int, work: Path) -> tuple[float, int]:
    """The reward stage's data preparation; returns (its start time, the training pairs kept)."""
    from rlhf import encoding, heldout, models
    from rlhf.config import config_from_dict
    from rlhf.data import load_rows
    from rlhf.stages.reward import encode_pairs

    cfg = config_from_dict({"run": {"name": "bench", "output_dir": str(work), "seed": SEED},
                            "model": {"name_or_path": str(tokenizer_dir)},
                            "data": {"preference": str(data), "eval_fraction": EVAL_FRACTION,
                                     "max_length": max_length},
                            "logging": {"progress": False}}, source="bench")
    tokenizer = models.load_tokenizer(str(tokenizer_dir))
    start = time.perf_counter()
    train_rows, eval_rows, path = load_rows(cfg, "reward", "preference")

    def encode(rows):
        return encode_pairs(tokenizer, rows, max_length, path, use_margin=False)

    train_ds = encoding.encoded_dataset(encode(train_rows), len(train_rows), desc="ours", progress=False)
    heldout.select(eval_rows, encode, cfg, "reward")
    return start, len(train_ds)


def peer(data: Path, tokenizer_dir: Path, max_length: int, work: Path) -> tuple[float, int]:
    """Plain `datasets`: Arrow's JSON reader and batched map/filter, no validation; returns (its start time,
    the training pairs kept)."""
    import datasets

    from rlhf import models

    tokenizer = models.load_tokenizer(str(tokenizer_dir))
    eos = tokenizer.eos_token_id
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=str(work / "hf"))
    train = ds.train_test_split(test_size=EVAL_FRACTION, seed=SEED)["train"]

    def tokenize(batch: dict) -> dict:
        prompts = tokenizer.apply_chat_template([[{"role": "user", "content": p}] for p in batch["prompt"]],
                                                add_generation_prompt=True, tokenize=True)["input_ids"]
        out = {}
        for side in ("chosen", "rejected"):
            replies = tokenizer(batch[side], add_special_tokens=False)["input_ids"]
            out[f"{side}_ids"] = [p + r + [eos] for p, r in zip(prompts, replies, strict=True)]
        return out

    train = train.map(tokenize, batched=True, remove_columns=train.column_names)
    train = train.filter(lambda b: [max(len(c), len(r)) <= max_length
                                    for c, r in zip(b["chosen_ids"], b["rejected_ids"], strict=True)],
                         batched=True)
    return start, len(train)


def worker(path: str, data: Path, tokenizer_dir: Path, max_length: int) -> None:
    import datasets  # noqa: F401  both paths import the same libraries before the clock starts
    import torch  # noqa: F401
    import transformers  # noqa: F401

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as work:
        before = _rss_mib()
        start, kept = (ours if path == "ours" else peer)(data, tokenizer_dir, max_length, Path(work))
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "kept": kept, "peak_mib": _peak_mib(), "rss_before_mib": before}))


def stage_worker(data: Path, tokenizer_dir: Path, max_length: int, work: Path) -> None:
    """`rlhf reward` through the CLI, with clocks at the first training step and around the held-out check."""
    import yaml
    from trl import RewardTrainer

    from rlhf import cli
    from rlhf.stages import reward

    marks = {}
    train_step, evaluate = RewardTrainer.training_step, reward.evaluate_reward_model

    def timed_step(self, *args, **kwargs):
        marks.setdefault("first_step", time.time())
        return train_step(self, *args, **kwargs)

    def timed_evaluate(*args, **kwargs):
        marks["heldout_start"] = time.time()
        try:
            return evaluate(*args, **kwargs)
        finally:
            marks["heldout_end"] = time.time()

    RewardTrainer.training_step, reward.evaluate_reward_model = timed_step, timed_evaluate
    config = work / "reward.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"name": "bench", "output_dir": str(work / "runs"), "seed": SEED},
        "model": {"name_or_path": str(tokenizer_dir)},
        "data": {"preference": str(data), "eval_fraction": EVAL_FRACTION, "max_length": max_length},
        "reward": {"max_steps": 2, "batch_size": 8, "save_steps": 100},
        "logging": {"progress": False, "plots": False}}))
    code = cli.main(["reward", "--config", str(config)])
    print(json.dumps({"rc": code, **marks}))


def run_worker(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"worker {args[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--max-length", type=int, default=128, help="data.max_length (the tiny configs' value)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--stage", action="store_true", help="also run `rlhf reward` to its first training step")
    p.add_argument("--worker", choices=["ours", "peer", "stage"], help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "stage":
        return stage_worker(args.data, args.tokenizer, args.max_length, args.work)
    if args.worker:
        return worker(args.worker, args.data, args.tokenizer, args.max_length)

    from rlhf.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        data, tokenizer_dir = Path(tmp) / "pairs.jsonl", Path(tmp) / "tiny"
        write_pairs(data, args.rows, SEED)
        build_tiny(tokenizer_dir)
        print(f"{args.rows} pairs, {data.stat().st_size / 1e6:.0f} MB, data.max_length {args.max_length}, "
              f"{os.cpu_count()} CPUs")
        common = ["--data", str(data), "--tokenizer", str(tokenizer_dir), "--max-length", str(args.max_length)]
        results = {"ours": [], "peer": []}
        for r in range(args.rounds):
            for path in ("ours", "peer") if r % 2 == 0 else ("peer", "ours"):
                res = run_worker(["--worker", path, *common])
                results[path].append(res)
                print(f"round {r + 1} {path:>4}: {res['seconds']:6.1f} s  {args.rows / res['seconds']:7.0f} rows/s  "
                      f"{res['kept']} training pairs kept  peak RSS {res['peak_mib']:.0f} MiB "
                      f"({res['peak_mib'] - res['rss_before_mib']:+.0f} over {res['rss_before_mib']:.0f} before)")
        median = {path: statistics.median(r["seconds"] for r in res) for path, res in results.items()}
        if args.stage:
            start = time.time()
            res = run_worker(["--worker", "stage", *common, "--work", tmp])
            print(f"rlhf reward: first training step at {res['first_step'] - start:.1f} s after the command "
                  f"started; held-out check {res['heldout_end'] - res['heldout_start']:.1f} s")
        for path in ("ours", "peer"):
            print(f"{path}: median {median[path]:.1f} s, {args.rows / median[path]:.0f} rows/s")
        print(f"ratio ours/peer rows/s: {median['peer'] / median['ours']:.2f}")


if __name__ == "__main__":
    main()
